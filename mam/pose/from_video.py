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
from typing import Literal

import numpy as np

from mam.dicom_video import is_dicom
from mam.domain import kind_of
from mam.files import write_atomic
from mam.model.weights import sha256_of
from mam.pose.base import (
    DEFAULT_POSE_BACKEND,
    PoseBackend,
    PoseSequence,
    available_backends,
    backend_class,
    create_backend,
)
from mam.pose.precomputed import load_pose_file
from mam.pose.stride import Strided, pose_stride, upsample
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


# A backend that declares ``part_frames`` (``mam.pose.base.PoseBackendBase``; the ``onnx`` backend:
# 750, 30 s at 25 fps) defines a recording's pose as posed in parts of that many frames, each part
# after the first tracked from PART_WARMUP_FRAMES before its start (dropped again) so that its
# track, crop smoothing and landmark filters have settled. Parts run in parallel threads where a
# caller has cores for them (``mam screen``: two single-threaded parts keep 2 cores busier than
# one part whose two network threads wait while one thread decodes and crops, bench/cpu_path.py)
# and one after another elsewhere (the service's video threads, batch workers, training data),
# with the same joints either way: a tracker's output depends on where it starts, and a result
# must not depend on the machine that computed it.
PART_WARMUP_FRAMES = 25


def part_bounds(total: int, part_frames: int | None) -> list[tuple[int, int]]:
    """Frame ranges ``[a, b)`` of a recording's parts: ``total // part_frames`` of equal length
    (at least one), so the split depends on the recording alone."""
    n = max(1, total // part_frames) if part_frames else 1
    return [(k * total // n, (k + 1) * total // n) for k in range(n)]


def backend_part_frames(backend) -> int | None:
    """The part length that a backend (a name, class or instance) declares; None for a function
    that makes one, which declares nothing (one part)."""
    if isinstance(backend, str):
        return backend_class(backend).part_frames
    return getattr(backend, "part_frames", None)


def estimate_video_pose(
    path: str | Path,
    backend: str | PoseBackend | Callable[[], PoseBackend] = DEFAULT_POSE_BACKEND,
    limits: VideoLimits | None = None,
    max_side: int | None = 1280,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
    part_backend: str | Callable[[], PoseBackend] | None = None,
    part_frames: int | None | Literal["auto"] = "auto",
) -> tuple[PoseSequence, dict[str, float]]:
    """Pose of a whole recording and ``{"decode": s, "pose": s, "pose_total": s}``.

    ``pose_total`` is the wall time of both stages. With a backend that decodes in its own thread
    (``onnx``) ``decode`` overlaps ``pose`` (which then equals ``pose_total``) instead of adding to
    it. ``progress(done, total)`` is called as frames go through pose.

    The recording is posed in the parts of :func:`part_bounds` (``part_frames``: ``"auto"`` is
    what the backend declares, :func:`backend_part_frames`), joined in order.
    With an ``executor`` they run in its threads, each decoding from its own seek point with its
    own backend from ``part_backend`` (a name or factory, e.g. with fewer threads each); without
    one, one after another through ``backend``. A DICOM video object goes in one pass (its
    stream has no index to seek by)."""
    limits = limits or VideoLimits()
    total = probe(path, limits).num_frames_25fps  # a bad file fails before any backend starts
    if part_frames == "auto":
        part_frames = backend_part_frames(backend)
    if is_dicom(path):  # a bare elementary stream: no index to seek a part's start by
        part_frames = None
    bounds = part_bounds(total, part_frames)
    if len(bounds) > 1 and executor is not None:
        maker = part_backend if part_backend is not None else backend
        if hasattr(maker, "estimate"):
            raise TypeError("parallel parts need a backend name or factory, not an instance")
        return _in_parallel(path, maker, limits, max_side, progress, total, bounds, executor)
    # A name makes a backend for this recording only; an instance (or a function that gives
    # one, called once the file is known to be good) is the caller's to keep.
    estimator = (
        create_backend(backend) if isinstance(backend, str)
        else backend() if callable(backend) and not hasattr(backend, "estimate") else backend
    )  # fmt: skip
    counter = _Progress(progress, total, bounds)
    t0 = time.perf_counter()
    try:
        done = [_pose_part(path, limits, max_side, bounds[k], estimator, counter, k)
                for k in range(len(bounds))]  # fmt: skip
    finally:
        if isinstance(backend, str):
            estimator.close()
    wall = time.perf_counter() - t0  # decode included, overlapped or not
    decode = sum(f.seconds for _, f in done)
    pose = wall if any(f.overlapped for _, f in done) else wall - decode
    return _join([p for p, _ in done]), {"decode": decode, "pose": pose, "pose_total": wall}


def _pose_part(path, limits, max_side, bound, estimator, counter, k, threads=0):
    """One part through ``estimator``, and its timed frames: decoded from
    ``PART_WARMUP_FRAMES`` before its start (fewer at the recording's start), the warm-up
    dropped again."""
    a, b = bound
    lead = min(PART_WARMUP_FRAMES, a)
    frames = _TimedIter(iter_frames(path, limits, max_side=max_side, start_s=(a - lead) / FPS,
                                    end_s=b / FPS, threads=threads))  # fmt: skip
    stride = pose_stride()
    if stride > 1:  # opt-in speed candidate (mam.pose.stride), judged by the screening bench
        cb = counter.callback(k, lead)  # posed frames -> frames covered (also checks a cancel)
        progress = cb and (lambda m: cb(m * stride))
        if hasattr(estimator, "frame_stride"):  # interpolates its raw landmarks, then smooths
            estimator.frame_stride = stride
            try:
                return _drop_lead(estimator.estimate(frames, progress=progress), lead), frames
            finally:
                estimator.frame_stride = 1
        strided = Strided(frames, stride)
        seq = estimator.estimate(strided, progress=progress)
        return _drop_lead(_upsample_sequence(seq, stride, strided.seen), lead), frames
    seq = estimator.estimate(frames, progress=counter.callback(k, lead))
    return _drop_lead(seq, lead), frames


def _upsample_sequence(seq: PoseSequence, stride: int, total: int) -> PoseSequence:
    """A pose of every ``stride``-th frame back to ``total`` frames (``mam.pose.stride``)."""
    meta = dict(seq.meta)
    if "image_joints" in meta:
        meta["image_joints"] = upsample(meta["image_joints"], stride, total)
    meta["pose_stride"] = stride
    joints, confidence = (upsample(x, stride, total) for x in (seq.joints, seq.confidence))
    return PoseSequence(joints, confidence, seq.fps, seq.source, meta)


class _Progress:
    """Frames posed so far over every part, warm-up frames not counted."""

    def __init__(self, progress, total: int, bounds) -> None:
        self.progress, self.total = progress, total
        self.done = [0] * len(bounds)
        self.lock = threading.Lock()

    def callback(self, k: int, lead: int) -> Callable[[int], None] | None:
        if self.progress is None:
            return None

        def cb(m: int) -> None:
            with self.lock:
                self.done[k] = max(0, m - lead)
                n = sum(self.done)
            self.progress(n, self.total)

        return cb


def _in_parallel(path, backend, limits, max_side, progress, total, bounds, executor):
    counter = _Progress(progress, total, bounds)
    t0 = time.perf_counter()

    def part(k: int) -> PoseSequence:
        est = create_backend(backend) if isinstance(backend, str) else backend()
        try:
            # One decoder thread a part: the parts already spread decoding over the cores.
            return _pose_part(path, limits, max_side, bounds[k], est, counter, k, threads=1)[0]
        finally:
            if isinstance(backend, str):
                est.close()

    seq = _join(list(executor.map(part, range(len(bounds)))))
    wall = time.perf_counter() - t0
    return seq, {"pose": wall, "pose_total": wall}  # decoding runs inside every part


def _drop_lead(seq: PoseSequence, lead: int) -> PoseSequence:
    """A part without the warm-up frames that came before its own start."""
    if not lead:
        return seq
    meta = dict(seq.meta)
    if "image_joints" in meta:
        meta["image_joints"] = meta["image_joints"][lead:]
    return PoseSequence(seq.joints[lead:], seq.confidence[lead:], seq.fps, seq.source, meta)


def _sum_stats(stats: list[dict]) -> dict:
    """The parts' backend counters (``{"detections": n, "seconds": {...}}``) added up."""
    out = {}
    for k, v in stats[0].items():
        if isinstance(v, dict):
            out[k] = _sum_stats([s[k] for s in stats])
        elif isinstance(v, int | float):
            out[k] = sum(s[k] for s in stats)
    return out


def _join(parts: list[PoseSequence]) -> PoseSequence:
    if len(parts) == 1:
        return parts[0]
    meta = dict(parts[0].meta)
    if all("image_joints" in p.meta for p in parts):
        meta["image_joints"] = np.concatenate([p.meta["image_joints"] for p in parts])
    stats = [p.meta.get("stats") for p in parts]
    if all(isinstance(s, dict) for s in stats):
        meta["stats"] = _sum_stats(stats)
    meta["parts"] = len(parts)
    return PoseSequence(
        joints=np.concatenate([p.joints for p in parts]),
        confidence=np.concatenate([p.confidence for p in parts]),
        fps=parts[0].fps,
        source=parts[0].source,
        meta=meta,
    )


CACHE_FORMAT = 3  # 2: image joints and size kept (every pose representation); 3: posed in parts


def pose_cache_name(backend: str, sha256: str) -> str:
    """``<backend>-v<format>-<sha256>.npz``: a recording's pose named by the backend that made it
    and the recording's content, wherever poses are kept (training's ``.pose_cache``, the
    ``poses/`` of a ``mam batch`` output folder)."""
    return f"{backend}-v{CACHE_FORMAT}-{sha256}.npz"


def cached_video_pose(path: str | Path, cache_dir: str | Path, backend: str = DEFAULT_POSE_BACKEND):
    """Pose of a recording, from ``cache_dir/<backend>-v<format>-<sha256>.npz`` when it was done
    before. Keyed by content, not name, so a renamed or copied recording is not estimated
    again. The 2D image joints are kept with the 3D ones (``meta["image_joints"]``)."""
    cache = Path(cache_dir) / pose_cache_name(backend, sha256_of(Path(path)))
    if cache.is_file():
        seq = load_pose_file(cache)
        seq.source = backend  # entries written before the file named its backend
        return seq
    seq, _ = estimate_video_pose(path, backend)
    write_pose_cache(seq, cache)
    logger.info("pose cached for a recording (%d frames)", seq.num_frames)
    return seq


def write_pose_cache(seq, dest: str | Path) -> Path:
    """A pose as an ``.npz`` that ``load_pose_file`` reads (``joints``, ``confidence``, ``fps``,
    and the 2D ``image_joints`` with their frame ``image_size`` where the backend gives them),
    written by rename: an interrupted run leaves no half-written entry.

    A pose backend's output also records ``source`` (the backend's name) and ``kind``
    (``video``), so that the file, screened or trained on, counts as the kind of input it came
    from (``mam.domain.kind_of``), not as a pose file given by the caller."""
    arrays = {"joints": seq.joints, "confidence": seq.confidence, "fps": seq.fps}
    if "image_joints" in seq.meta:
        arrays["image_joints"] = seq.meta["image_joints"]
    if seq.meta.get("image_size") is not None:
        arrays["image_size"] = np.asarray(seq.meta["image_size"], np.int32)
    if seq.source in available_backends():
        arrays["source"] = np.asarray(seq.source)
        arrays["kind"] = np.asarray(kind_of(seq.source))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(dest, buf.getvalue())
