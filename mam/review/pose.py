"""The pose the model saw, for the skeleton overlay and the training export.

``mam batch`` keeps each video's pose in ``DIR/poses/<backend>-v<format>-<sha256>.npz``
(:mod:`mam.batch.poses`), named by the backend that scored it (``result.model.pose_backend``)
and the content hash the ledger recorded, so the overlay and the export read the very pose the
model saw. Only where the batch kept none (``--no-keep-poses``, ``--service``, a folder from
before poses were kept) is it estimated again, on demand, with that backend and the screening's
own decode settings (:func:`mam.pose.from_video.estimate_video_pose`, frames at most 1280 px on
a side), and written to the same place, so a recording is estimated at most once for both uses.
The file is the training layout's pose format (``joints``, ``confidence``, ``fps``,
``image_joints``) plus the frame size the 2D joints are in and the backend that made it
(``source``), so exported training data keep the kind of input they came from. Before
estimating, the file's hash is checked against the ledger's: a recording changed since it was
screened is refused, not silently re-posed. Poses this app cached in ``DIR/.review_cache/pose/``
before the batch kept them are still read (and moved to ``DIR/poses/``, backend recorded).

Jobs run one at a time in a background thread (pose estimation is the heavy part of the whole
pipeline); the page polls their progress. Logs carry counts only.
"""

from __future__ import annotations

import base64
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

LEGACY_CACHE_DIR = Path(".review_cache") / "pose"  # where this app cached poses before
LEGACY_CACHE_FORMAT = 1
MAX_SIDE = 1280  # as mam.screening.ScreeningOptions.max_side: the frames the model's pose saw


class PoseUnavailable(Exception):
    """No pose can be had for this recording (``code``: why, in a word)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PoseJob:
    state: str = "running"  # running | done | failed
    done: int = 0
    total: int = 0
    code: str = ""
    message: str = ""


def cache_path(out_dir: Path, backend: str, sha256: str) -> Path:
    """Where a recording's pose is kept (by ``mam batch``, or by this app when it estimated it)."""
    from mam.batch.poses import kept_pose_path

    return kept_pose_path(out_dir, backend, sha256)


def find_pose(out_dir: Path, backend: str, sha256: str) -> Path | None:
    """The kept pose of a recording, or None. A pose this app cached under its old name is
    moved to the kept place first, with the backend that made it recorded in the file."""
    dest = cache_path(out_dir, backend, sha256)
    if dest.is_file():
        return dest
    old = Path(out_dir) / LEGACY_CACHE_DIR / f"{backend}-v{LEGACY_CACHE_FORMAT}-{sha256}.npz"
    if not old.is_file():
        return None
    try:
        _with_source(old, backend, dest)
    except FileNotFoundError:  # another thread moved it first
        return dest if dest.is_file() else None
    old.unlink(missing_ok=True)
    return dest


def _with_source(src: Path, backend: str, dest: Path) -> None:
    """``src``'s arrays with the ``source`` / ``kind`` entries of ``write_pose_cache``, written
    to ``dest`` by rename."""
    import io

    from mam.domain import kind_of
    from mam.files import write_atomic
    from mam.pose import available_backends

    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if backend in available_backends():
        arrays["source"], arrays["kind"] = np.asarray(backend), np.asarray(kind_of(backend))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, buf.getvalue())


def estimate_and_cache(video: Path, sha256: str, backend: str, dest: Path, progress=None):
    """Estimate ``video``'s pose with ``backend`` and write it to ``dest`` (atomically).
    Returns the :class:`mam.pose.PoseSequence`."""
    from mam.model.weights import sha256_of
    from mam.pose import available_backends
    from mam.pose.from_video import estimate_video_pose, write_pose_cache
    from mam.video import VideoLimits

    if backend not in available_backends():
        raise PoseUnavailable(
            "backend_unavailable", f"the {backend!r} pose backend that scored it is not here"
        )
    if sha256_of(video) != sha256:
        raise PoseUnavailable(
            "recording_changed",
            "the file differs from the one screened (its content hash changed); screen it "
            "again with mam batch",
        )
    limits = VideoLimits(min_duration_s=0.0, max_duration_s=24 * 3600.0, max_file_bytes=2**62)
    seq, _ = estimate_video_pose(video, backend, limits, MAX_SIDE, progress)
    image = seq.meta.get("image_joints")
    if image is None:
        raise PoseUnavailable("no_image_joints", f"the {backend} backend gives no 2D joints")
    seq.meta["image_size"] = seq.meta.get("image_size") or (0, 0)
    write_pose_cache(seq, dest)
    logger.info("review: pose cached for a recording (%d frames)", seq.num_frames)
    return seq


def overlay_payload(npz: Path) -> dict:
    """The 2D joints of a cached pose for the browser's canvas: frame ``f``, joint ``j``, axis
    ``a`` at ``f*34 + j*2 + a`` of little-endian uint16, in 1/65534 of the frame's width or
    height (65535: not found), base64; plus the bones and per-joint side for colouring."""
    from mam.skeleton import BONES, JOINT_NAMES

    with np.load(npz, allow_pickle=False) as z:
        image = np.asarray(z["image_joints"], np.float64)
        size = z["image_size"] if "image_size" in z.files else None
        fps = float(z["fps"]) if "fps" in z.files else 25.0
    w, h = (int(size[0]), int(size[1])) if size is not None and size[0] > 0 else (0, 0)
    if not w:  # no frame size recorded: the joints' own extent
        w = int(np.nanmax(image[..., 0], initial=1)) + 1
        h = int(np.nanmax(image[..., 1], initial=1)) + 1
    rel = image / np.asarray([w, h], np.float64)
    ok = np.isfinite(rel).all(axis=-1, keepdims=True) & (rel >= 0).all(-1, keepdims=True)
    ok &= (rel <= 1).all(-1, keepdims=True)
    q = np.where(ok, np.round(np.nan_to_num(rel) * 65534), 65535).astype("<u2")
    side = ["left" if n.startswith("left_") else "right" if n.startswith("right_") else "axial"
            for n in JOINT_NAMES]  # fmt: skip
    return {
        "fps": fps,
        "frames": int(image.shape[0]),
        "joints": int(image.shape[1]),
        "width": w,
        "height": h,
        "data": base64.b64encode(q.tobytes()).decode(),
        "bones": [list(b) for b in BONES],
        "side": side,
    }


class PoseJobs:
    """Background pose estimation, one recording at a time, results in the cache.

    Args:
        out_dir: the batch output folder (the cache lives under it).
        workers: recordings estimated at once (1: pose estimation saturates the machine).
    """

    def __init__(self, out_dir: Path, workers: int = 1) -> None:
        self.out_dir = Path(out_dir)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="review-pose")
        self._jobs: dict[str, PoseJob] = {}
        self._lock = threading.Lock()

    def cached(self, backend: str, sha256: str) -> Path | None:
        return find_pose(self.out_dir, backend, sha256)

    def status(self, key: str) -> PoseJob | None:
        with self._lock:
            return self._jobs.get(key)

    def start(self, key: str, video: Path, sha256: str, backend: str) -> PoseJob:
        """Start (or join) the job of ``key``; a failed job is started again."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state in ("running", "done"):
                return job
            job = self._jobs[key] = PoseJob()
        dest = cache_path(self.out_dir, backend, sha256)

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        def run() -> None:
            try:
                estimate_and_cache(video, sha256, backend, dest, progress)
                job.state = "done"
            except PoseUnavailable as e:
                job.state, job.code, job.message = "failed", e.code, str(e)
            except Exception as e:  # noqa: BLE001 - reported to the page, never raised in a thread
                code = getattr(e, "code", None) or "internal_error"
                job.state, job.code = "failed", code
                job.message = "pose estimation failed" + (f" ({code})" if code else "")
                logger.warning("review: pose estimation failed (%s)", type(e).__name__)

        self._pool.submit(run)
        return job

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def pose_for_export(out_dir: Path, video: Path | None, sha256: str, backend: str) -> Path:
    """The kept pose file of a video recording, estimating it now only if none was kept."""
    found = find_pose(out_dir, backend, sha256)
    if found is not None:
        return found
    dest = cache_path(out_dir, backend, sha256)
    if video is None:
        raise PoseUnavailable(
            "recording_missing", "the recording is not in the archive and its pose was not kept"
        )
    estimate_and_cache(video, sha256, backend, dest)
    return dest
