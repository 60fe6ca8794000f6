"""Recording -> pose sequence: decode at 25 fps and run a pose backend, timing both.

Shared by screening and by training-data preparation (which caches the result per recording's
content hash, so that training twice does not estimate pose twice).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from mam.files import write_atomic
from mam.model.weights import sha256_of
from mam.pose.base import DEFAULT_POSE_BACKEND, PoseBackend, PoseSequence, create_backend
from mam.pose.precomputed import load_pose_file
from mam.skeleton import FPS
from mam.video import VideoLimits, iter_frames, probe

logger = logging.getLogger(__name__)


class _TimedIter:
    """Wraps the frame iterator to separate decode time from pose time.

    A backend that decodes in its own thread (``onnx``) overlaps the two: ``overlapped`` is then
    True, and decode time is busy time of that thread, not a part of the wall time."""

    def __init__(self, it: Iterator[np.ndarray]) -> None:
        self.it, self.seconds = it, 0.0
        self.caller, self.overlapped = threading.get_ident(), False

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        self.overlapped |= threading.get_ident() != self.caller
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t


def estimate_video_pose(
    path: str | Path,
    backend: str | PoseBackend | Callable[[], PoseBackend] = DEFAULT_POSE_BACKEND,
    limits: VideoLimits | None = None,
    max_side: int | None = 1280,
    progress: Callable[[int, int], None] | None = None,
    segments: int = 1,
    executor: Executor | None = None,
) -> tuple[PoseSequence, dict[str, float]]:
    """Pose of a whole recording and ``{"decode": s, "pose": s, "pose_total": s}``.

    ``pose_total`` is the wall time of both stages. With a backend that decodes in its own thread
    (``onnx``) ``decode`` overlaps ``pose`` (which then equals ``pose_total``) instead of adding to
    it. ``progress(done, total)`` is called as frames go through pose.

    ``segments`` > 1 (with a backend name or factory, and an ``executor`` of that many threads)
    splits the recording into contiguous parts, each decoded from its own seek point and tracked
    by its own backend in its own thread, then joined in order: decoding and pose spread over a
    machine's cores (the GPU route; each part starts with a detection, as after a lost track)."""
    limits = limits or VideoLimits()
    total = probe(path, limits).num_frames_25fps  # a bad file fails before any backend starts
    if segments > 1 and executor is not None and not hasattr(backend, "estimate"):
        return _in_segments(path, backend, limits, max_side, progress, total, segments, executor)
    frames = _TimedIter(iter_frames(path, limits, max_side=max_side))
    # A name makes a backend for this recording only; an instance (or a function that gives
    # one, called once the file is known to be good) is the caller's to keep.
    estimator = (
        create_backend(backend) if isinstance(backend, str)
        else backend() if callable(backend) and not hasattr(backend, "estimate") else backend
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        cb = (lambda n: progress(n, total)) if progress else None
        seq = estimator.estimate(frames, progress=cb)
    finally:
        if isinstance(backend, str):
            estimator.close()
    wall = time.perf_counter() - t0  # decode included, overlapped or not
    pose = wall if frames.overlapped else wall - frames.seconds
    return seq, {"decode": frames.seconds, "pose": pose, "pose_total": wall}


MIN_SEGMENT_FRAMES = 250  # 10 s: shorter parts spend more on detection and start-up than they save


def _in_segments(path, backend, limits, max_side, progress, total, segments, executor):
    n = max(1, min(segments, total // MIN_SEGMENT_FRAMES))
    bounds = [(k * total // n, (k + 1) * total // n) for k in range(n)]
    done = [0] * n
    lock = threading.Lock()
    t0 = time.perf_counter()

    def part(k: int):
        a, b = bounds[k]
        frames = iter_frames(path, limits, max_side=max_side, start_s=a / FPS, end_s=b / FPS)

        def cb(m: int) -> None:
            with lock:
                done[k] = m
                if progress:
                    progress(sum(done), total)

        est = create_backend(backend) if isinstance(backend, str) else backend()
        try:
            return est.estimate(frames, progress=cb)
        finally:
            if isinstance(backend, str):
                est.close()

    parts = list(executor.map(part, range(n)))
    wall = time.perf_counter() - t0
    meta = dict(parts[0].meta)
    if all("image_joints" in p.meta for p in parts):
        meta["image_joints"] = np.concatenate([p.meta["image_joints"] for p in parts])
    meta["segments"] = n
    seq = PoseSequence(
        joints=np.concatenate([p.joints for p in parts]),
        confidence=np.concatenate([p.confidence for p in parts]),
        source=parts[0].source,
        meta=meta,
    )
    return seq, {"pose": wall, "pose_total": wall}  # decoding runs inside every part


CACHE_FORMAT = 2  # 2: image joints and size kept, so every pose representation can be built


def cached_video_pose(path: str | Path, cache_dir: str | Path, backend: str = DEFAULT_POSE_BACKEND):
    """Pose of a recording, from ``cache_dir/<backend>-v<format>-<sha256>.npz`` when it was done
    before. Keyed by content, not name, so a renamed or copied recording is not estimated
    again. The 2D image joints are kept with the 3D ones (``meta["image_joints"]``)."""
    cache = Path(cache_dir) / f"{backend}-v{CACHE_FORMAT}-{sha256_of(Path(path))}.npz"
    if cache.is_file():
        seq = load_pose_file(cache)
        seq.source = backend
        return seq
    seq, _ = estimate_video_pose(path, backend)
    write_pose_cache(seq, cache)
    logger.info("pose cached for a recording (%d frames)", seq.num_frames)
    return seq


def write_pose_cache(seq, dest: str | Path) -> Path:
    """A pose as an ``.npz`` that ``load_pose_file`` reads (``joints``, ``confidence``, ``fps``,
    and the 2D ``image_joints`` with their frame ``image_size`` where the backend gives them),
    written by rename: an interrupted run leaves no half-written entry."""
    arrays = {"joints": seq.joints, "confidence": seq.confidence, "fps": seq.fps}
    if "image_joints" in seq.meta:
        arrays["image_joints"] = seq.meta["image_joints"]
    if "image_size" in seq.meta:
        arrays["image_size"] = np.asarray(seq.meta["image_size"], np.int32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(dest, buf.getvalue())
