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
from mam.runtime.onnx_runtime import run_bag, run_info, small_sessions
from mam.runtime.sessions import RuntimeUnavailable
from mam.runtime.tensorrt_engines import TensorRTEngine, build_engines, import_tensorrt


@register_backend("tensorrt")
class TensorRTBackend(InferenceRuntime):
    """The clip network as a TensorRT engine, built on this machine on first use (or beforehand
    by ``python -m export tensorrt``) and then cached; bag head and Info branch on ORT CPU."""

    def __init__(self, weights: Path, **kw) -> None:
        super().__init__(weights, **kw)
        if self.asked_device == "cpu":
            raise RuntimeUnavailable("TensorRT runs on CUDA devices only; device cpu was asked")
        trt = import_tensorrt()
        try:
            import torch
        except ImportError as e:
            raise RuntimeUnavailable("the tensorrt backend needs torch for CUDA buffers") from e
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("no CUDA device visible")
        manifest, folder = load_manifest(weights)
        engines = build_engines(
            manifest_path(weights),
            opt_batch=self.max_batch or DEFAULT_MAX_BATCH,
            max_batch=self.max_batch or DEFAULT_MAX_BATCH,
            precision=self.asked_precision,
        )
        sidecar = json.loads(engines["clip"].with_suffix(".json").read_text())
        self._torch = torch
        self._engine = TensorRTEngine(engines["clip"])
        nets = manifest["networks"]
        self._bag_sess, self._info_sess = small_sessions(folder, nets)
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
        torch = self._torch
        outs = self._engine(instances=torch.from_numpy(x).to("cuda"))
        torch.cuda.current_stream().synchronize()
        return (
            outs["clip_features"].float().cpu().numpy(),
            outs["clip_logits"].float().cpu().numpy(),
        )

    def _bag(self, logits):
        return run_bag(self._bag_sess, logits)

    def _info(self, x):
        return run_info(self._info_sess, x)
