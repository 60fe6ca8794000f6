"""The MAM weights in PyTorch: development and training, and the GPU route of machines that have
PyTorch with CUDA but no TensorRT (``MAM_TORCH_COMPILE=1``: the clip network compiled with CUDA
graphs, ``torch.compile(mode="reduce-overhead")``, on a batch padded to a fixed size so that one
graph serves every call)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from mam.runtime.base import InferenceRuntime, register_backend
from mam.runtime.sessions import RuntimeUnavailable

logger = logging.getLogger(__name__)
ENV_COMPILE = "MAM_TORCH_COMPILE"


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
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = model.to(device=device, dtype=self._dtype).eval()
        self._device = torch.device(device)
        self.device, self.precision = device, precision
        self._clips = self.model.forward_clips
        self.compiled = device == "cuda" and os.environ.get(ENV_COMPILE) == "1"
        if self.compiled:
            self._clips = torch.compile(self.model.forward_clips, mode="reduce-overhead")
        self.details = {
            "torch": torch.__version__,
            "intra_op_threads": torch.get_num_threads(),
            "max_batch": self.batch(),
            "compiled": self.compiled,
        }

    def _run(self, fn, *xs):
        torch = self._torch
        with torch.inference_mode():
            ts = [torch.from_numpy(x).to(self._device, self._dtype) for x in xs]
            out = fn(*ts)
        if isinstance(out, tuple):
            return tuple(o.float().cpu().numpy() for o in out)
        return out.float().cpu().numpy()

    def _clip(self, x):
        if not self.compiled or len(x) == self.batch():
            return self._run(self._clips, x)
        pad = np.zeros((self.batch() - len(x), *x.shape[1:]), x.dtype)  # one graph, one shape
        feats, logits = self._run(self._clips, np.concatenate([x, pad]))
        return feats[: len(x)], logits[: len(x)]

    def _bag(self, logits):
        return self._run(self.model.forward_bag, logits)

    def _info(self, x):
        return self._run(self.model.forward_info, x)
