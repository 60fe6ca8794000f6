"""The MAM weights in PyTorch: development and training, and the GPU route of machines that have
PyTorch with CUDA but no TensorRT (``MAM_TORCH_COMPILE=1``: the clip network compiled with CUDA
graphs, ``torch.compile(mode="reduce-overhead")``, on a batch padded to a fixed size so that one
graph serves every call)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from mam.runtime.base import InferenceRuntime, register_backend
from mam.runtime.networks import TorchNetwork
from mam.runtime.sessions import RuntimeUnavailable
from mam.settings import current

logger = logging.getLogger(__name__)


@register_backend("pytorch")
class PyTorchBackend(InferenceRuntime):
    """Eager PyTorch on the weights themselves: development, training and reference only."""

    def __init__(self, weights: Path, **kw) -> None:
        super().__init__(weights, **kw)
        try:
            import torch
        except ImportError as e:
            raise RuntimeUnavailable("torch is not installed (pip install 'mam[train]')") from e
        from mam.model.weights import load_weights

        self._torch = torch
        device = self.asked_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable("device cuda asked, but torch sees no CUDA device")
        precision = self.asked_precision
        if precision == "fp16" and device == "cpu":
            logger.warning("fp16 asked on CPU: the pytorch backend runs fp32 there")
            precision = "fp32"
        model, _ = load_weights(weights)
        dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.precision = device, precision
        clips = self.model.forward_clips
        self.compiled = device == "cuda" and current().torch_compile
        if self.compiled:
            clips = torch.compile(self.model.forward_clips, mode="reduce-overhead")
        net = partial(TorchNetwork, device=device, dtype=precision)
        # Compiled: every chunk padded to one batch size, so one CUDA graph serves every call.
        self._clip_net = net(clips, inputs=["instances"], outputs=["clip_features", "clip_logits"],
                             max_batch=self.batch(), fixed_batch=self.compiled)  # fmt: skip
        self._bag_net = net(self.model.forward_bag, inputs=["clip_logits"],
                            outputs=["bag_probs", "attention"])  # fmt: skip
        self._info_net = net(self.model.forward_info, inputs=["info"], outputs=["info_logits"])
        self.details = {
            "torch": torch.__version__,
            "intra_op_threads": torch.get_num_threads(),
            "max_batch": self.batch(),
            "compiled": self.compiled,
        }

    def _clip(self, x):
        out = self._clip_net.run({"instances": x}, batch=self.batch())
        return out["clip_features"], out["clip_logits"]

    def _bag(self, logits):
        out = self._bag_net(clip_logits=logits)
        return out["bag_probs"], out["attention"]

    def _info(self, x):
        return self._info_net(info=x)["info_logits"]
