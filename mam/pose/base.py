"""Pose backend protocol and the pose sequence every backend returns.

A backend turns a stream of 25-fps RGB frames into 3D positions of the 17 Human3.6M joints
(``mam.skeleton``) with a per-joint confidence. Frames where nothing was tracked are NaN; gap
filling and the quality report are shared by all backends (``mam.pose.quality``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from mam.skeleton import FPS, NUM_JOINTS

ENV_POSE_CACHE = "MAM_POSE_CACHE"
DEFAULT_POSE_BACKEND = "onnx"
"""BlazePose in ONNX (``mam.pose.blazepose``): the mediapipe wheel's own networks, about 3x the
frames/s of the mediapipe package on CPU, with the same screening results (README)."""


def default_pose_backend() -> str:
    """``MAM_POSE_BACKEND`` if set, else ``DEFAULT_POSE_BACKEND``."""
    from mam.settings import current

    return current().pose_backend


# Where a backend runs its networks, by configuration (the service and the CLI create backends
# by name only): MAM_POSE_RUNTIME (onnxruntime, tensorrt, ...) and MAM_POSE_DEVICE (cpu, cuda).
ENV_POSE_RUNTIME = "MAM_POSE_RUNTIME"
ENV_POSE_DEVICE = "MAM_POSE_DEVICE"


def pose_runtime_env() -> tuple[str | None, str | None]:
    """``(MAM_POSE_RUNTIME, MAM_POSE_DEVICE)`` as set (``mam.settings``), None where unset: the
    one place backends get them (each checks them against what it can run, ``resolve_runtime``)."""
    from mam.settings import current

    s = current()
    return s.pose_runtime, s.pose_device


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


class PoseBackendBase:
    """What a backend class declares about itself, so that callers (``mam.pose.from_video``,
    ``mam.screening``) ask the class (:func:`backend_class`) and never test a backend's name.

    Attributes:
        name: the registry name (``mam screen --pose-backend NAME``).
        part_frames: a recording is posed in parts of this many frames
            (``mam.pose.from_video.part_bounds``); None: in one pass.
        takes_threads: the constructor takes ``threads=`` (CPU threads of its networks), so a
            part posed in its own thread can be given its share of the CPUs.
        runtimes: the runtimes its networks can run on (``MAM_POSE_RUNTIME``), the default first;
            empty where the backend runs its own (``mediapipe``).
        devices: the devices (``MAM_POSE_DEVICE``), the default first.
    """

    name: ClassVar[str] = "unknown"
    part_frames: ClassVar[int | None] = None
    takes_threads: ClassVar[bool] = False
    runtimes: ClassVar[tuple[str, ...]] = ()
    devices: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def resolve_runtime(
        cls, runtime: str | None = None, device: str | None = None
    ) -> tuple[str, str]:
        """``(runtime, device)``: the arguments, else ``MAM_POSE_RUNTIME`` / ``MAM_POSE_DEVICE``,
        else the class's defaults; ``ValueError`` for one it cannot run on."""
        env_runtime, env_device = pose_runtime_env()
        runtime = runtime or env_runtime or (cls.runtimes[0] if cls.runtimes else "")
        device = device or env_device or (cls.devices[0] if cls.devices else "")
        if runtime not in cls.runtimes or device not in cls.devices:
            raise ValueError(
                f"the {cls.name} pose backend runs on {', '.join(cls.runtimes) or 'nothing'}, on "
                f"{', '.join(cls.devices) or 'nothing'} ({ENV_POSE_RUNTIME}, {ENV_POSE_DEVICE}); "
                f"got {runtime!r}, {device!r}"
            )
        return runtime, device

    @classmethod
    def parts_in_parallel(cls) -> bool:
        """Whether a recording's parts are worth posing at once, one thread and one share of the
        CPUs each: posed in parts, given a thread count, and on ONNX Runtime on the CPU by the
        current settings (on a GPU the parts would queue for one device)."""
        if not (cls.part_frames and cls.takes_threads):
            return False
        try:
            return cls.resolve_runtime() == ("onnxruntime", "cpu")
        except ValueError:
            return False  # the backend refuses to start; its own error says why


_BACKENDS: dict[str, Callable[..., PoseBackend]] = {}


def register_backend(
    name: str,
) -> Callable[[Callable[..., PoseBackend]], Callable[..., PoseBackend]]:
    """Register a backend factory under ``name`` (``mam screen --pose-backend NAME``): a
    :class:`PoseBackendBase` subclass, or any callable (which then declares nothing)."""

    def deco(factory: Callable[..., PoseBackend]) -> Callable[..., PoseBackend]:
        _BACKENDS[name] = factory
        return factory

    return deco


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def _factory(name: str) -> Callable[..., PoseBackend]:
    if name not in _BACKENDS:
        raise ValueError(f"unknown pose backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name]


def backend_class(name: str) -> type[PoseBackendBase]:
    """The class registered as ``name``, to ask what it declares (:class:`PoseBackendBase`); a
    factory that is no such class declares the defaults (one pass, no threads, no runtimes)."""
    factory = _factory(name)
    if isinstance(factory, type) and issubclass(factory, PoseBackendBase):
        return factory
    return PoseBackendBase


def create_backend(name: str, **kwargs) -> PoseBackend:
    return _factory(name)(**kwargs)


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


def ort_pose_network(
    path: str | Path, device: str, threads: int | None = None, max_batch: int | None = None
):
    """A pose network on ONNX Runtime (``mam.runtime.networks.OrtNetwork``): ``cpu`` pins the
    CPU, any other device takes a GPU provider where this build has one; an ONNX Runtime that
    cannot start is a ``DependencyMissingError`` (a fix the user can make)."""
    from mam.errors import DependencyMissingError
    from mam.runtime.networks import OrtNetwork
    from mam.runtime.sessions import RuntimeUnavailable

    try:
        return OrtNetwork(path, device="cpu" if device == "cpu" else "auto", threads=threads,
                          max_batch=max_batch)  # fmt: skip
    except RuntimeUnavailable as exc:
        raise DependencyMissingError(f"a pose network on ONNX Runtime: {exc}") from exc


def pose_cache_dir() -> Path:
    """``MAM_POSE_CACHE`` or ``~/.cache/mam/pose``: pose networks converted or exported on this
    machine (never in the repository), shared by the backends that need them."""
    from mam.settings import current

    return current().pose_cache or Path.home() / ".cache" / "mam" / "pose"
