"""The inference interface, the backend registry and the choice of a backend.


A runtime answers three calls on numpy arrays (names and shapes as in ``export.onnx``):

* ``clip(instances [N, 240, 3, 17, 17]) -> (clip_features [N, D], clip_logits [N, 2])``
* ``bag(clip_logits [1, K, 2]) -> (bag_probs [1, 2], attention [1, K])``
* ``info(info [B, 4] normalised) -> info_logits [B, 2]``

and says what it is: ``backend``, ``device``, ``precision`` and ``details`` (providers, threads,
engine files, why a backend was skipped). Backends are registered by name (timm's
``@register_model``); asking for one falls back down ``tensorrt -> onnxruntime -> pytorch``
until one starts, and the log says what was chosen and why:

* ``tensorrt``: the clip network as a TensorRT engine built on this machine from the exported
  ONNX file (cached by TensorRT version, GPU name, ONNX sha256, precision and batch profile);
  the tiny bag head and Info branch run on ONNX Runtime CPU.
* ``onnxruntime``: the exported ONNX files; providers TensorRT -> CUDA -> CPU, whichever this
  onnxruntime build has (``device="cpu"`` pins CPU).
* ``pytorch``: the weights in eager PyTorch; development and training only.

``auto`` (the default) is ``onnxruntime`` when the weights have a current ONNX export beside them
(``NAME.onnx.json`` whose recorded weights hash matches), else ``pytorch``. ``MAM_RUNTIME``
chooses when the caller does not. torch is imported by the pytorch backend (and by the
tensorrt backend, which uses it for CUDA buffers) only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from mam.errors import ModelLoadError
from mam.model.weights import load_meta, sha256_of
from mam.runtime.sessions import RuntimeUnavailable, default_threads
from mam.settings import current

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "fp16"]

ORDER = ("tensorrt", "onnxruntime", "pytorch")
DEFAULT_MAX_BATCH = 64  # GPU: TensorRT profile max/opt (a 5-minute recording is ~80 clips)
# CPU: clips per ONNX Runtime call. Measured (reference configuration, 2 threads): 108 clips/s
# at 2-4, 78 at 64, where the activations (~4 MB a clip) fall out of cache.
CPU_BATCH = 4
ENV_BACKEND = "MAM_RUNTIME"


class InferenceRuntime:
    """Base of all backends. Subclasses set the attributes and implement the three calls.

    Args:
        weights: ``NAME.json`` of the weights.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``fp32`` or ``fp16`` (where the backend and device support it).
        max_batch: clips per call of the clip network, larger inputs are split (default:
            ``CPU_BATCH`` on CPU, ``DEFAULT_MAX_BATCH`` on GPU).
        threads: CPU threads (default: ``MAM_RUNTIME_THREADS`` or the CPUs this process may use).
    """

    name: str = "base"

    def __init__(
        self,
        weights: Path,
        *,
        device: Device = "auto",
        precision: Precision = "fp32",
        max_batch: int | None = None,
        threads: int | None = None,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.weights = Path(weights)
        self.asked_device: Device = device
        self.asked_precision: Precision = precision
        self.max_batch = max_batch
        self.threads = default_threads(threads)
        self.backend = self.name
        self.device = "cpu"
        self.precision = "fp32"
        self.details: dict = {}

    # -- the interface ---------------------------------------------------------------------------
    def clip(self, instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[N, 240, 3, 17, 17]`` float32 -> features ``[N, D]``, logits ``[N, 2]``."""
        x = np.ascontiguousarray(instances, dtype=np.float32)
        if x.ndim != 5:
            raise ValueError(f"instances must be [N, T, C, V, V], got shape {x.shape}")
        return self._clip(x)  # in chunks of batch() (mam.runtime.networks)

    def bag(self, clip_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B, K, 2]`` -> bag probabilities ``[B, 2]`` (column 1 = normal), attention
        ``[B, K]``."""
        return self._bag(np.ascontiguousarray(clip_logits, dtype=np.float32))

    def info(self, x: np.ndarray) -> np.ndarray:
        """Normalised infant data ``[B, 4]`` -> Info-branch logits ``[B, 2]``."""
        return self._info(np.ascontiguousarray(x, dtype=np.float32))

    def batch(self) -> int:
        """Clips per clip-network call on this backend's device."""
        return self.max_batch or (CPU_BATCH if self.device == "cpu" else DEFAULT_MAX_BATCH)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items() if k != "fallbacks")
        return f"{self.backend} on {self.device} ({self.precision}; {extra})"

    # -- for subclasses --------------------------------------------------------------------------
    def _clip(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All of ``x``; the backend's network runs it in chunks of ``batch()``."""
        raise NotImplementedError

    def _bag(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _info(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


_BACKENDS: dict[str, type[InferenceRuntime]] = {}


def register_backend(name: str) -> Callable[[type[InferenceRuntime]], type[InferenceRuntime]]:
    """Class decorator: make a backend available to ``create_runtime`` under ``name``."""

    def deco(cls: type[InferenceRuntime]) -> type[InferenceRuntime]:
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return deco


def available_backends() -> list[str]:
    return list(_BACKENDS)


# -- manifest of the ONNX export -----------------------------------------------------------------
def manifest_path(weights: str | Path) -> Path:
    """``models/NAME.json`` -> ``models/NAME.onnx.json`` (written by ``python -m export onnx``)."""
    p = Path(weights).with_suffix("")
    return p.with_name(p.name + ".onnx.json")


def load_manifest(weights: str | Path, *, verify_files: bool = True) -> tuple[dict, Path]:
    """The ONNX manifest of ``weights`` and its folder; ``RuntimeUnavailable`` when it is missing,
    stale (exported from other weights) or a file does not match its recorded sha256."""
    mpath = manifest_path(weights)
    if not mpath.is_file():
        raise RuntimeUnavailable(f"no ONNX export at {mpath}; run `python -m export onnx`")
    try:
        manifest = json.loads(mpath.read_text())
        networks = manifest["networks"]
        _, _, weights_sha = load_meta(weights)
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeUnavailable(f"corrupt ONNX manifest {mpath}: {e!r}") from e
    if manifest.get("weights_sha256") != weights_sha:
        raise RuntimeUnavailable(
            f"ONNX export {mpath.name} is stale (made from other weights); "
            "rerun `python -m export onnx`"
        )
    if verify_files:
        for role, net in networks.items():
            f = mpath.parent / net["file"]
            if not f.is_file() or sha256_of(f) != net["sha256"]:
                raise RuntimeUnavailable(f"{role} network {f} is missing or does not match {mpath}")
    return manifest, mpath.parent


def has_current_export(weights: str | Path) -> bool:
    try:
        load_manifest(weights, verify_files=False)
    except (RuntimeUnavailable, ModelLoadError):
        return False
    return True


# -- choosing one --------------------------------------------------------------------------------
def _chain(requested: str, weights: Path) -> list[str]:
    if requested == "auto":
        return ["onnxruntime", "pytorch"] if has_current_export(weights) else ["pytorch"]
    if requested not in _BACKENDS:
        raise ValueError(f"unknown runtime {requested!r}; known: auto, {', '.join(_BACKENDS)}")
    order = [b for b in ORDER if b in _BACKENDS] + [b for b in _BACKENDS if b not in ORDER]
    return order[order.index(requested) :]


def create_runtime(
    weights: str | Path,
    backend: str | None = None,
    *,
    device: Device = "auto",
    precision: Precision = "fp32",
    max_batch: int | None = None,
    threads: int | None = None,
) -> InferenceRuntime:
    """Start the first backend that works, from ``backend`` (or ``MAM_RUNTIME``, or ``auto``)
    down ``tensorrt -> onnxruntime -> pytorch``. ``ModelLoadError`` when none starts.

    Args:
        weights: ``NAME.json`` of the weights; ONNX files are looked for beside it.
        backend: ``auto``, ``tensorrt``, ``onnxruntime`` or ``pytorch``.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``fp32`` or ``fp16`` (GPU backends only; CPU stays fp32).
        max_batch: clips per clip-network call (default 4 on CPU, 64 on GPU; TensorRT: the
            engine profile's opt and max).
        threads: CPU threads for ONNX Runtime.
    """
    weights = Path(weights).with_suffix(".json")
    requested = (backend or current().runtime or "auto").strip().lower()
    chain = _chain(requested, weights)
    reasons: list[str] = []
    for name in chain:
        try:
            rt = _BACKENDS[name](
                weights, device=device, precision=precision, max_batch=max_batch, threads=threads
            )
        except RuntimeUnavailable as e:
            reasons.append(f"{name}: {e}")
            logger.warning("runtime %s unavailable (%s); trying the next one", name, e)
            continue
        rt.details["requested"] = requested
        if reasons:
            rt.details["fallbacks"] = reasons
        why = f"requested {requested}" + (f"; skipped {'; '.join(reasons)}" if reasons else "")
        logger.info("runtime: %s [%s]", rt.describe(), why)
        return rt
    raise ModelLoadError(f"no inference runtime could start: {'; '.join(reasons)}")
