"""The one place where ONNX Runtime sessions are made, for every network of the pipeline.

The MAM networks (``mam.runtime.onnx_runtime``), the BlazePose networks (``mam.pose.blazepose``)
and the paper route's HRNet and lifter (``mam.pose.paper``) all come here, so the decisions that
matter on a serving machine are taken once:

* CUDA libraries are preloaded once per process before the first CUDA session: onnxruntime-gpu
  finds the CUDA/cuDNN libraries of the nvidia-* wheels only once they are loaded (torch does it
  on import; serving imports no torch), and a session would otherwise fall back to CPU quietly;
* threads: intra-op ``threads`` (default ``MAM_RUNTIME_THREADS`` or the CPUs this process may
  use), inter-op 1, and worker threads that sleep instead of spinning. NOTE: spinning halved the
  pose networks' throughput on 2 shared cores (measured: 2 threads 48-64 crops/s spinning,
  101-125 without); every deployment here shares its cores (decoding, pose, other workers);
* providers: TensorRT (with the caller's options) and CUDA where this build has them and the
  device allows, CPU always last.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

ENV_THREADS = "MAM_RUNTIME_THREADS"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
Device = Literal["auto", "cpu", "cuda"]

_preloaded = False
_lock = threading.Lock()


class RuntimeUnavailable(RuntimeError):
    """A backend cannot start here; the message says why (and what to do)."""


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(threads: int | None = None) -> int:
    """``threads``, else ``MAM_RUNTIME_THREADS``, else the usable CPUs."""
    from mam.settings import current

    return threads or current().runtime_threads or cpu_count()


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeUnavailable(
            "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)"
        ) from e
    return ort


def _preload_cuda(ort) -> None:
    global _preloaded
    with _lock:
        if _preloaded:
            return
        _preloaded = True
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            try:
                preload()
            except Exception as e:  # noqa: BLE001 - a missing library shows in the providers
                logger.warning("onnxruntime could not preload CUDA libraries: %s", e)


def ort_session(
    path: str | Path,
    *,
    device: Device = "cpu",
    threads: int | None = None,
    tensorrt_options: dict | None = None,
):
    """An ``onnxruntime.InferenceSession`` for ``path`` (module docstring).

    Args:
        device: ``cpu`` pins the CPU provider; ``auto`` takes a GPU provider where this build
            has one; ``cuda`` requires one (``RuntimeUnavailable`` otherwise).
        threads: intra-op threads (default: ``MAM_RUNTIME_THREADS`` or the usable CPUs).
        tensorrt_options: options of ONNX Runtime's TensorRT provider; without them it is not
            used (it builds its own engines, which only the clip network is worth).
    """
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    providers: list = []
    if device != "cpu":
        if "CUDAExecutionProvider" in available:
            _preload_cuda(ort)
        for p in GPU_PROVIDERS:
            if p not in available:
                continue
            if p == "TensorrtExecutionProvider":
                if tensorrt_options is not None:
                    providers.append((p, tensorrt_options))
            else:
                providers.append(p)
        if device == "cuda" and not providers:
            raise RuntimeUnavailable(f"device cuda asked, but onnxruntime has only {available}")
    providers.append("CPUExecutionProvider")
    so = ort.SessionOptions()
    so.intra_op_num_threads = default_threads(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=providers)


def on_gpu(session) -> bool:
    return session.get_providers()[0] in GPU_PROVIDERS
