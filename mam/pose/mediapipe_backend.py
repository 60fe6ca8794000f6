"""The offline default pose backend: MediaPipe BlazePose (legacy ``solutions.pose`` API).

MediaPipe 0.10.21 (Apache-2.0) is the newest release whose wheel carries the BlazePose weights
(``pose_detection.tflite``, ``pose_landmark_full.tflite``) and runs without a network (DESIGN.md,
"Pose: the offline default and the GPU route"). BlazePose is trained on adults; the tracking quality
of every video is reported by ``mam.pose.quality``.

Per frame the graph runs in tracking mode (``static_image_mode=False``: detection only when the
track is lost, landmark smoothing on). What the backend returns:

* ``joints``: ``pose_world_landmarks`` (metric 3D, metres; x toward the image right, y down, z away
  from the camera; adult-scaled) mapped to the 17 Human3.6M joints (``mam.pose.mapping``) and made
  pelvis-relative (the pelvis row is exactly 0); NaN rows where no pose was found;
* ``confidence``: per joint, the minimum landmark visibility (``mam.pose.mapping.map_confidence``);
  0 where no pose was found;
* ``meta["image_joints"]``: the 2D image landmarks mapped the same way, in pixels ``[T, 17, 2]``
  (x right, y down), for drawing; ``meta["image_size"]`` is ``(width, height)``;
* ``meta["swaps_repaired"]``: how many frames had their arms / legs relabelled by the left/right
  swap repair, decided once on the image landmarks (pixels) and applied to image and world
  landmarks and visibility alike.

DESIGN.md measured that world z barely follows infant motion and that the 2D image landmarks'
velocities correlate better with the true motion than the world ones: which representation feeds the
model is decided downstream; both are returned.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, Self

import numpy as np

from mam.errors import DependencyMissingError
from mam.pose.base import PoseBackendBase, PoseSequence, check_frame, register_backend
from mam.pose.mapping import NUM_LANDMARKS, landmarks_to_sequence

logger = logging.getLogger(__name__)

NAME = "mediapipe"
_MODEL_FILES = {
    0: "pose_landmark_lite.tflite",
    1: "pose_landmark_full.tflite",
    2: "pose_landmark_heavy.tflite",
}
_INSTALL_HINT = (
    "The 'mediapipe' pose backend needs mediapipe 0.10.21, the last release that ships the "
    "BlazePose weights and runs offline: pip install 'mediapipe==0.10.21'"
)


def _import_mediapipe_pose():
    """Import ``mediapipe.solutions.pose`` on first use (takes ~0.6 s and pulls in matplotlib)."""
    try:
        import mediapipe  # noqa: F401  (the package must import for its solutions to load)
        from mediapipe.python.solutions import pose as mp_pose
    except ImportError as exc:
        raise DependencyMissingError(
            f"{_INSTALL_HINT} ({exc.name or 'mediapipe'} not importable)"
        ) from exc
    return mp_pose


# absl/glog lines ("W0000 00:00:1796299508.065473  4739 file.cc:114] ...") and TF-Lite's.
_NATIVE_LOG = re.compile(
    rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w.-]+:\d+\]"
    rb"|INFO: Created TensorFlow Lite|WARNING: All log messages before absl::InitializeLog)"
)


_DRAINED = b"\x00mam: stderr filter drained\x00"
_filter_lock = threading.Lock()
_filter_installed = False


def install_native_log_filter() -> None:
    """Drop MediaPipe's native log lines from stderr, for the rest of the process; idempotent.

    MediaPipe's C++ side (absl, TF-Lite) writes INFO/WARNING lines straight to file descriptor
    2, some from its graph threads after a call has returned, some through duplicates of fd 2 it
    takes itself (the XNNPACK delegate line), and neither GLOG_minloglevel nor
    TF_CPP_MIN_LOG_LEVEL reaches them; a redirect around calls cannot catch them all. So fd 2
    becomes a pipe once, before the graph exists, and a thread forwards every line to the real
    stderr except those that look like native log lines (``_NATIVE_LOG``).
    """
    global _filter_installed
    with _filter_lock:
        if _filter_installed:
            return
        try:
            sys.stderr.flush()
            real = os.dup(2)
            read_end, write_end = os.pipe()
        except (OSError, AttributeError, ValueError):
            return

        drained = threading.Event()

        def pump() -> None:
            with os.fdopen(read_end, "rb", buffering=0) as src:
                pending = b""
                while chunk := src.read(65536):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    drained.set() if _DRAINED in lines else None
                    out = b"".join(
                        x + b"\n" for x in lines if x != _DRAINED and not _NATIVE_LOG.match(x)
                    )
                    if out:
                        os.write(real, out)

        def drain() -> None:  # at exit: what is still in the pipe reaches the terminal first
            sys.stderr.flush()
            if os.fstat(2).st_ino != pipe_inode:  # fd 2 was pointed elsewhere meanwhile
                return
            os.write(2, _DRAINED + b"\n")
            drained.wait(timeout=2.0)
            # fd 2 stays on the pipe: graph threads still starting or stopping keep writing.

        threading.Thread(target=pump, name="mediapipe-stderr", daemon=True).start()
        pipe_inode = os.fstat(write_end).st_ino
        os.dup2(write_end, 2)
        os.close(write_end)
        atexit.register(drain)
        _filter_installed = True


def _landmarks_array(landmark_list) -> np.ndarray:
    """``[33, 4]`` (x, y, z, visibility) from a ``NormalizedLandmarkList`` / ``LandmarkList``."""
    return np.array([(p.x, p.y, p.z, p.visibility) for p in landmark_list.landmark], np.float64)


@register_backend(NAME)
class MediaPipePoseBackend(PoseBackendBase):  # declares nothing: one pass, its own runtime
    """BlazePose (full model) through MediaPipe's legacy ``solutions.pose`` graph.

    One instance tracks one video at a time (not thread-safe); the graph is reset at the start of
    every :meth:`estimate` call, so instances can be reused across videos. Use as a context manager
    or call :meth:`close`.

    Args:
        min_detection_confidence: person-detector score needed to start a track.
        min_tracking_confidence: landmark-model score needed to keep a track (below it the
            detector runs again on the next frame).
        model_complexity: 1 = BlazePose full, the only landmark model in the 0.10.21 wheel;
            0 (lite) and 2 (heavy) work only where their ``.tflite`` file has been put next to it.
        smooth_landmarks: MediaPipe's temporal landmark filter.
        repair_swaps: relabel arms / legs whose left-right labels disagree with the face's.
        quiet: drop MediaPipe's native log lines from stderr (``install_native_log_filter``).
    """

    name = NAME

    def __init__(
        self,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        model_complexity: Literal[0, 1, 2] = 1,
        smooth_landmarks: bool = True,
        repair_swaps: bool = True,
        quiet: bool = True,
    ) -> None:
        for label, value in (
            ("min_detection_confidence", min_detection_confidence),
            ("min_tracking_confidence", min_tracking_confidence),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {value}")
        if model_complexity not in _MODEL_FILES:
            raise ValueError(f"model_complexity must be 0, 1 or 2, got {model_complexity}")
        if quiet:
            install_native_log_filter()  # before the library loads and dups fd 2
        mp_pose = _import_mediapipe_pose()
        model_file = (
            Path(mp_pose.__file__).resolve().parents[2]
            / "modules"
            / "pose_landmark"
            / _MODEL_FILES[model_complexity]
        )
        if not model_file.is_file():
            # NOTE: mediapipe would try to download it, which fails offline and writes into
            # site-packages; refuse early instead.
            raise DependencyMissingError(
                f"BlazePose model file {model_file.name} is not bundled with this mediapipe "
                "install; use model_complexity=1 (full) or place the file in "
                f"{model_file.parent}"
            )
        self.repair_swaps = repair_swaps
        self.quiet = quiet
        self.config = {
            "model_complexity": model_complexity,
            "min_detection_confidence": min_detection_confidence,
            "min_tracking_confidence": min_tracking_confidence,
            "smooth_landmarks": smooth_landmarks,
        }
        self._pose = mp_pose.Pose(
            static_image_mode=False,
            model_complexity=model_complexity,
            smooth_landmarks=smooth_landmarks,
            enable_segmentation=False,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )
        self._used = False

    # --- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the MediaPipe graph; idempotent."""
        pose, self._pose = getattr(self, "_pose", None), None
        if pose is not None:
            pose.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- inference -------------------------------------------------------------------------------
    def estimate(
        self, frames: Iterable[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> PoseSequence:
        """Track the person through ``frames`` (RGB uint8 ``[H, W, 3]``, 25 fps, in order).

        ``progress(n)`` is called after each frame with the number of frames done so far.
        """
        if self._pose is None:
            raise RuntimeError("MediaPipePoseBackend is closed")
        if self._used:
            self._pose.reset()  # a new video: drop the previous track and smoothing state
        self._used = True

        image: list[np.ndarray] = []  # [33, 4] normalised x, y, z, visibility
        world: list[np.ndarray] = []  # [33, 4] metres
        missing = np.full((NUM_LANDMARKS, 4), np.nan)
        size: tuple[int, int] | None = None
        start = time.perf_counter()
        for t, frame in enumerate(frames):
            frame = check_frame(frame, size)
            size = size or (frame.shape[1], frame.shape[0])
            result = self._pose.process(frame)
            if result.pose_landmarks is not None and result.pose_world_landmarks is not None:
                image.append(_landmarks_array(result.pose_landmarks))
                world.append(_landmarks_array(result.pose_world_landmarks))
            else:
                image.append(missing)
                world.append(missing)
            if progress is not None:
                progress(t + 1)
        elapsed = time.perf_counter() - start
        return landmarks_to_sequence(
            image, world, size, source=NAME, config=self.config,
            repair_swaps=self.repair_swaps, elapsed=elapsed,
        )  # fmt: skip
