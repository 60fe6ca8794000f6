"""One network as one call on numpy arrays, whatever runs it: ONNX Runtime, TensorRT or PyTorch.

Every network of the pipeline runs through here: the MAM clip network, bag head and Info branch
(``mam.runtime``'s backends), the BlazePose detector and landmark network
(``mam.pose.blazepose``), and the paper route's HRNet and lifter (``mam.pose.paper``). So the run
loop is written once: the batch axis (axis 0 of every input) is cut into chunks of at most
``max_batch``, each chunk goes to the device, runs, is synchronised and comes back to the host
as float32 numpy, and the chunks' outputs are joined in order. A network answers with a dict of
its named outputs.

Runners: :class:`OrtNetwork` (a session from ``mam.runtime.sessions``, the one session factory),
:class:`TensorRTNetwork` (an engine from ``mam.runtime.tensorrt_engines``; CUDA buffers through
torch) and :class:`TorchNetwork` (a module or function in eager PyTorch, optionally on a batch
padded to a fixed size so that one compiled CUDA graph serves every call). Importing this module
imports none of onnxruntime, tensorrt or torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mam.runtime.sessions import Device, RuntimeUnavailable, on_gpu, ort_session


class Network:
    """Base of the runners: named float32 inputs in, named float32 outputs out.

    Args:
        inputs: the input names, in the order a positional call takes them.
        max_batch: largest batch (axis 0) per run; larger inputs are run in chunks (None: all at
            once).
        runtime: what runs it (``onnxruntime``, ``tensorrt``, ``pytorch``), for logs and records.
    """

    def __init__(self, inputs: Sequence[str], max_batch: int | None, runtime: str) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.inputs = list(inputs)
        self.max_batch = max_batch
        self.runtime = runtime
        self.device = "cpu"
        self.providers: list[str] = []
        self.detail: dict = {}

    def __call__(self, *args: np.ndarray, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Positional inputs in ``inputs`` order, or named ones; the dict of named outputs."""
        named = dict(zip(self.inputs, args), **inputs)
        return self.run(named)

    def run(self, inputs: dict[str, np.ndarray], batch: int | None = None) -> dict[str, np.ndarray]:
        """``inputs`` through the network in chunks of ``batch`` (default ``max_batch``) along
        axis 0, outputs joined in order."""
        xs = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        n = len(next(iter(xs.values())))
        b = batch or self.max_batch or n
        if n <= b:
            return self._run(xs)
        parts = [self._run({k: v[i : i + b] for k, v in xs.items()}) for i in range(0, n, b)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One chunk: to the device, run, synchronise, back to the host."""
        raise NotImplementedError


class OrtNetwork(Network):
    """An ONNX file on ONNX Runtime (``mam.runtime.sessions.ort_session``: providers, threads).

    Args:
        path: the ONNX file.
        device: ``cpu`` pins the CPU provider; ``auto`` takes a GPU provider where this build has
            one; ``cuda`` requires one (``RuntimeUnavailable`` otherwise).
        threads: intra-op threads (default: ``MAM_RUNTIME_THREADS`` or the usable CPUs).
        max_batch: largest batch per ``session.run``.
        tensorrt_options: options of ONNX Runtime's TensorRT provider (without them it is not
            used).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: Device = "cpu",
        threads: int | None = None,
        max_batch: int | None = None,
        tensorrt_options: dict | None = None,
    ) -> None:
        self.session = ort_session(
            path, device=device, threads=threads, tensorrt_options=tensorrt_options
        )
        super().__init__([i.name for i in self.session.get_inputs()], max_batch, "onnxruntime")
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.device = "cuda" if on_gpu(self.session) else "cpu"
        self.detail = {"providers": self.providers, "onnx": Path(path).name}

    def _run(self, inputs):
        return dict(zip(self.outputs, self.session.run(None, inputs)))


class TensorRTNetwork(Network):
    """A serialised TensorRT engine (``mam.runtime.tensorrt_engines.TensorRTEngine``) on CUDA;
    ``max_batch`` is the engine profile's largest batch."""

    def __init__(self, engine_path: str | Path, *, max_batch: int) -> None:
        from mam.runtime.tensorrt_engines import TensorRTEngine

        self._torch = self.require_cuda()
        self.engine = TensorRTEngine(Path(engine_path))
        super().__init__(self.engine.inputs, max_batch, "tensorrt")
        self.outputs = list(self.engine.outputs)
        self.device = "cuda"
        self.providers = ["TensorRT"]
        self.detail = {"engine": Path(engine_path).name}

    @classmethod
    def from_onnx(
        cls,
        onnx_path: Path,
        stem: str,
        *,
        input_name: str,
        input_shape: list,
        profile: tuple[int, int, int],
        precision: str = "fp16",
        cache_dir: Path | None = None,
        onnx_sha256: str | None = None,
    ) -> TensorRTNetwork:
        """The engine of an ONNX file with a batch profile ``(min, opt, max)`` on axis 0, from
        the engine cache or built on this GPU (``mam.runtime.tensorrt_engines.cached_engine``)."""
        from mam.runtime.tensorrt_engines import cached_engine

        cls.require_cuda()  # before anything is built for a route that cannot run
        engine, _ = cached_engine(onnx_path, stem, input_name=input_name, input_shape=input_shape,
                                  profile=profile, precision=precision, cache_dir=cache_dir,
                                  onnx_sha256=onnx_sha256)  # fmt: skip
        net = cls(engine, max_batch=profile[2])
        net.detail["profile"] = list(profile)
        return net

    @staticmethod
    def require_cuda():
        """torch (its CUDA buffers), once tensorrt, torch and a CUDA device are all here;
        ``RuntimeUnavailable`` saying which is missing."""
        from mam.runtime.tensorrt_engines import import_tensorrt

        import_tensorrt()
        try:
            import torch
        except ImportError as e:
            raise RuntimeUnavailable("TensorRT here needs torch for CUDA buffers") from e
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("no CUDA device visible")
        return torch

    def _run(self, inputs):
        torch = self._torch
        outs = self.engine(**{k: torch.from_numpy(v).to("cuda") for k, v in inputs.items()})
        torch.cuda.current_stream().synchronize()
        return {k: v.float().cpu().numpy() for k, v in outs.items()}


class TorchNetwork(Network):
    """A module (or any function of tensors) in eager PyTorch.

    Args:
        fn: called with the inputs as tensors, in ``inputs`` order; returns a tensor, a tuple of
            tensors (named by ``outputs``) or a dict of named tensors.
        inputs: input names.
        outputs: output names of a tensor or tuple result.
        device: ``cpu``, ``cuda`` (``RuntimeUnavailable`` when torch sees no CUDA device) or
            ``auto`` (CUDA where there is one).
        dtype: ``fp32`` or ``fp16`` (fp16 on CUDA only; CPU stays fp32).
        max_batch: largest batch per call.
        fixed_batch: pad every chunk to ``max_batch`` (one shape, so one compiled CUDA graph
            serves every call); the padding is dropped from the outputs.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        inputs: Sequence[str] = ("input",),
        outputs: Sequence[str] = ("output",),
        device: str = "cpu",
        dtype: str = "fp32",
        max_batch: int | None = None,
        fixed_batch: bool = False,
    ) -> None:
        try:
            import torch
        except ImportError as e:
            raise RuntimeUnavailable("torch is not installed (pip install 'mam[train]')") from e
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable("device cuda asked, but torch sees no CUDA device")
        if fixed_batch and max_batch is None:
            raise ValueError("fixed_batch needs max_batch")
        super().__init__(inputs, max_batch, "pytorch")
        self._torch = torch
        self.fn = fn
        self.outputs = list(outputs)
        self.device = device
        self.dtype = torch.float16 if dtype == "fp16" and device == "cuda" else torch.float32
        self.fixed_batch = fixed_batch
        self.providers = [f"pytorch-{device}-{str(self.dtype).split('.')[-1]}"]
        self.detail = {"device": device, "torch": torch.__version__}

    def _run(self, inputs):
        torch = self._torch
        n = len(next(iter(inputs.values())))
        pad = self.max_batch - n if self.fixed_batch else 0
        if pad > 0:
            inputs = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                      for k, v in inputs.items()}  # fmt: skip
        with torch.inference_mode():
            ts = [torch.from_numpy(inputs[k]).to(self.device, self.dtype) for k in self.inputs]
            out = self.fn(*ts)
            if isinstance(out, dict):
                named = out
            else:
                named = dict(zip(self.outputs, out if isinstance(out, tuple) else (out,)))
            return {k: v[:n].float().cpu().numpy() for k, v in named.items()}
