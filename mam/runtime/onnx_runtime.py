"""The exported MAM graphs on ONNX Runtime (``mam.runtime.networks.OrtNetwork``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mam.runtime.base import DEFAULT_MAX_BATCH, InferenceRuntime, load_manifest, register_backend
from mam.runtime.networks import OrtNetwork
from mam.runtime.sessions import import_onnxruntime
from mam.runtime.tensorrt_engines import engine_cache_dir


@register_backend("onnxruntime")
class OnnxRuntimeBackend(InferenceRuntime):
    """The exported graphs on ONNX Runtime. The clip network gets the best provider this build
    has (TensorRT, CUDA, CPU); the bag head and Info branch (a few hundred FLOPs) stay on CPU."""

    def __init__(self, weights: Path, **kw) -> None:
        super().__init__(weights, **kw)
        ort = import_onnxruntime()
        manifest, folder = load_manifest(weights)
        nets = manifest["networks"]
        self._clip_net = OrtNetwork(
            folder / nets["clip"]["file"], device=self.asked_device, threads=self.threads,
            tensorrt_options=self._trt_ep_options(nets["clip"]),
        )  # fmt: skip
        self._bag_net, self._info_net = small_networks(folder, nets)
        used = self._clip_net.providers
        self.device = self._clip_net.device
        self.precision = (
            "fp16" if used[0] == "TensorrtExecutionProvider" and self.asked_precision == "fp16"
            else "fp32"
        )  # fmt: skip
        self.details = {
            "onnxruntime": ort.__version__,
            "providers": used,
            "intra_op_threads": self.threads,
            "inter_op_threads": 1,
            "max_batch": self.batch(),
            "opset": manifest.get("opset"),
        }

    def _trt_ep_options(self, clip: dict) -> dict:
        # NOTE: ORT's TensorRT provider builds its own engine; it gets the same N profile.
        name = clip["inputs"][0]["name"]
        rest = "x".join(str(d) for d in clip["inputs"][0]["shape"][1:])
        return {
            "trt_fp16_enable": self.asked_precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engine_cache_dir() / "ort_trt"),
            "trt_profile_min_shapes": f"{name}:1x{rest}",
            "trt_profile_opt_shapes": f"{name}:{self.max_batch or DEFAULT_MAX_BATCH}x{rest}",
            "trt_profile_max_shapes": f"{name}:{self.max_batch or DEFAULT_MAX_BATCH}x{rest}",
        }

    def _clip(self, x):
        out = self._clip_net.run({"instances": x}, batch=self.batch())
        return out["clip_features"], out["clip_logits"]

    def _bag(self, logits):
        return run_bag(self._bag_net, logits)

    def _info(self, x):
        return run_info(self._info_net, x)


def small_networks(folder: Path, nets: dict) -> tuple[OrtNetwork, OrtNetwork]:
    """The bag head and Info branch (a few hundred FLOPs): one CPU thread each, whatever runs
    the clip network."""
    bag, info = (
        OrtNetwork(folder / nets[role]["file"], device="cpu", threads=1) for role in ("bag", "info")
    )
    return bag, info


def run_bag(network: OrtNetwork, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = network(clip_logits=logits)
    return out["bag_probs"], out["attention"]


def run_info(network: OrtNetwork, x: np.ndarray) -> np.ndarray:
    return network(info=x)["info_logits"]
