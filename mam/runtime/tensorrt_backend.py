"""The MAM clip network as a TensorRT engine; bag head and Info branch on ONNX Runtime CPU."""

from __future__ import annotations

import json
from pathlib import Path

from mam.runtime.base import (
    DEFAULT_MAX_BATCH,
    InferenceRuntime,
    load_manifest,
    manifest_path,
    register_backend,
)
from mam.runtime.networks import TensorRTNetwork
from mam.runtime.onnx_runtime import run_bag, run_info, small_networks
from mam.runtime.sessions import RuntimeUnavailable
from mam.runtime.tensorrt_engines import build_engines, import_tensorrt


@register_backend("tensorrt")
class TensorRTBackend(InferenceRuntime):
    """The clip network as a TensorRT engine, built on this machine on first use (or beforehand
    by ``python -m export tensorrt``) and then cached; bag head and Info branch on ORT CPU."""

    def __init__(self, weights: Path, **kw) -> None:
        super().__init__(weights, **kw)
        if self.asked_device == "cpu":
            raise RuntimeUnavailable("TensorRT runs on CUDA devices only; device cpu was asked")
        trt = import_tensorrt()
        TensorRTNetwork.require_cuda()  # before an engine is built for nothing
        manifest, folder = load_manifest(weights)
        engines = build_engines(
            manifest_path(weights),
            opt_batch=self.max_batch or DEFAULT_MAX_BATCH,
            max_batch=self.max_batch or DEFAULT_MAX_BATCH,
            precision=self.asked_precision,
        )
        sidecar = json.loads(engines["clip"].with_suffix(".json").read_text())
        self._clip_net = TensorRTNetwork(engines["clip"], max_batch=self.max_batch
                                         or DEFAULT_MAX_BATCH)  # fmt: skip
        nets = manifest["networks"]
        self._bag_net, self._info_net = small_networks(folder, nets)
        self.device = "cuda"
        self.precision = sidecar["precision_built"]
        self.details = {
            "tensorrt": trt.__version__,
            "gpu": sidecar["gpu"],
            "engine": engines["clip"].name,
            "profile": sidecar["profile"],
            "max_batch": self.batch(),
        }

    def _clip(self, x):
        out = self._clip_net.run({"instances": x}, batch=self.batch())
        return out["clip_features"], out["clip_logits"]

    def _bag(self, logits):
        return run_bag(self._bag_net, logits)

    def _info(self, x):
        return run_info(self._info_net, x)
