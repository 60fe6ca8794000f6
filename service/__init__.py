"""The screening service: BentoML REST with adaptive batching, and a KServe v2 gRPC server.

A thin shell over :mod:`mam`: every model call goes through :mod:`mam.runtime` (ONNX Runtime or
TensorRT) and every result is built by :class:`mam.screening.Screener`. ``service.app`` holds the
BentoML services; ``bentoml serve service.app:Screening`` (or ``mam serve``) starts them.
"""

import os

# Health-data service: no usage analytics leave the process (BentoML sends them by default).
# BentoML's own variable, written for it: not a setting of ours (mam.settings).
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
