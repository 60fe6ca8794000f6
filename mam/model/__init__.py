"""The MAM network, its configuration, weights I/O and the reference-code importer.

``MAM`` is imported lazily: serving runs the exported networks on ONNX Runtime and must not need
PyTorch (the ``train`` extra).
"""

from mam.model.config import MAMConfig

__all__ = ["MAM", "MAMConfig"]


def __getattr__(name: str):
    if name == "MAM":
        from mam.model.network import MAM

        return MAM
    raise AttributeError(f"module 'mam.model' has no attribute {name!r}")
