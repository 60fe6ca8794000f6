"""Pose backend protocol and the pose sequence every backend returns.

A backend turns a stream of 25-fps RGB frames into 3D positions of the 17 Human3.6M joints
(``mam.skeleton``) with a per-joint confidence. Frames where nothing was tracked are NaN; gap
filling and the quality report are shared by all backends (``mam.pose.quality``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from mam.skeleton import FPS, NUM_JOINTS

ENV_POSE_CACHE = "MAM_POSE_CACHE"
ENV_POSE_BACKEND = "MAM_POSE_BACKEND"
DEFAULT_POSE_BACKEND = "onnx"
"""BlazePose in ONNX (``mam.pose.blazepose``): the mediapipe wheel's own networks, about 3x the
frames/s of the mediapipe package on CPU, with the same screening results (README)."""


def default_pose_backend() -> str:
    """``MAM_POSE_BACKEND`` if set, else ``DEFAULT_POSE_BACKEND``."""
    return os.environ.get(ENV_POSE_BACKEND) or DEFAULT_POSE_BACKEND


# Where a backend runs its networks, by configuration (the service and the CLI create backends
# by name only): MAM_POSE_RUNTIME (onnxruntime, tensorrt, ...) and MAM_POSE_DEVICE (cpu, cuda).
ENV_POSE_RUNTIME = "MAM_POSE_RUNTIME"
ENV_POSE_DEVICE = "MAM_POSE_DEVICE"


def cpu_onnx_pose(backend: str) -> bool:
    """Whether ``backend`` is ``onnx`` on its default route, ONNX Runtime on the CPU (neither
    ``MAM_POSE_RUNTIME`` nor ``MAM_POSE_DEVICE`` points elsewhere)."""
    runtime = os.environ.get(ENV_POSE_RUNTIME) or "onnxruntime"
    device = os.environ.get(ENV_POSE_DEVICE) or "cpu"
    return backend == "onnx" and runtime == "onnxruntime" and device == "cpu"


@dataclass
class PoseSequence:
    """3D joints ``[T, 17, 3]`` float32 at 25 fps; NaN rows where the frame was not tracked.

    ``confidence`` is ``[T, 17]`` in [0, 1] (0 where untracked). ``source`` names the backend.
    """

    joints: np.ndarray
    confidence: np.ndarray
    fps: float = FPS
    source: str = "unknown"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.joints.ndim != 3 or self.joints.shape[1:] != (NUM_JOINTS, 3):
            raise ValueError(f"joints must be [T, {NUM_JOINTS}, 3], got {self.joints.shape}")
        if self.confidence.shape != self.joints.shape[:2]:
            raise ValueError(
                f"confidence must be {self.joints.shape[:2]}, got {self.confidence.shape}"
            )

    @property
    def num_frames(self) -> int:
        return int(self.joints.shape[0])

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


class PoseBackend(Protocol):
    """What a pose estimator must provide. Frames arrive in order, RGB uint8 ``[H, W, 3]``."""

    name: str

    def estimate(
        self, frames: Iterable[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> PoseSequence:
        """Track the infant through ``frames`` (25 fps). ``progress(n)`` is called per frame."""
        ...

    def close(self) -> None: ...


_BACKENDS: dict[str, Callable[..., PoseBackend]] = {}


def register_backend(
    name: str,
) -> Callable[[Callable[..., PoseBackend]], Callable[..., PoseBackend]]:
    """Register a backend factory under ``name`` (``mam screen --pose-backend NAME``)."""

    def deco(factory: Callable[..., PoseBackend]) -> Callable[..., PoseBackend]:
        _BACKENDS[name] = factory
        return factory

    return deco


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def create_backend(name: str, **kwargs) -> PoseBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown pose backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name](**kwargs)


def iter_chunks(frames: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    """Group a frame stream into lists of ``size`` (batched backends)."""
    chunk: list[np.ndarray] = []
    for f in frames:
        chunk.append(f)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_frame(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """The frame contract of every backend: RGB uint8 ``[H, W, 3]``, one size per video."""
    if (
        not isinstance(frame, np.ndarray)
        or frame.dtype != np.uint8
        or frame.ndim != 3
        or frame.shape[2] != 3
    ):
        got = (
            f"{frame.dtype} {list(frame.shape)}"
            if isinstance(frame, np.ndarray)
            else type(frame).__name__
        )
        raise ValueError(f"frames must be RGB uint8 [H, W, 3]; got {got}")
    if size is not None and (frame.shape[1], frame.shape[0]) != size:
        raise ValueError(
            f"frame size changed within one video: {size} -> {(frame.shape[1], frame.shape[0])}"
        )
    return np.ascontiguousarray(frame)


def pose_cache_dir() -> Path:
    """``MAM_POSE_CACHE`` or ``~/.cache/mam/pose``: pose networks converted or exported on this
    machine (never in the repository), shared by the backends that need them."""
    env = os.environ.get(ENV_POSE_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "mam" / "pose"
