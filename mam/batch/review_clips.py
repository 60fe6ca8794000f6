"""Cut a recording's top FMs clips into short MP4 files with the skeleton drawn over them.

Reviewing the clips most likely to show fidgety movements lifts beginners' GMA accuracy (paper:
+11 %); a skeleton overlay shows what the pose estimator followed. The 2D landmarks come from
running the pose backend that scored the recording (its ``meta["image_joints"]``) again on the
clip's own frames: the screening result keeps no pose, and re-estimating ~10 s of video costs
a few seconds, only when clips are asked for. The overlay is for orientation, not a measurement.

Frames come from :func:`mam.video.iter_frames` with ``start_s``/``end_s``: it seeks to the clip
(a clip near the end of a 15-minute recording must not cost a decode of the whole file), so
output frame ``k`` of the clip is frame ``round(start_s * 25) + k`` of the pipeline's stream.
Frames are decoded twice (once for the pose, once to draw and encode) to keep memory bounded
instead of holding ~240 frames.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from mam.errors import MamError
from mam.presentation import mmss_tenths
from mam.skeleton import BONES, FPS, JOINT_NAMES
from mam.video import VideoLimits, iter_frames

logger = logging.getLogger(__name__)

MAX_SIDE = 640
CRF = 26
# Lenient limits: the recording was screened already; here only the resolution check matters.
_LIMITS = VideoLimits(min_duration_s=0.0, max_duration_s=24 * 3600.0, max_file_bytes=2**62)
_LEFT = {i for i, n in enumerate(JOINT_NAMES) if n.startswith("left_")}
_RIGHT = {i for i, n in enumerate(JOINT_NAMES) if n.startswith("right_")}
# RGB; saturated colours that stand out on skin, blankets and bodysuits.
LEFT_RGB = (0, 255, 255)
RIGHT_RGB = (255, 0, 255)
AXIAL_RGB = (255, 255, 0)


@dataclass
class ReviewClip:
    """One cut clip: the file written (None on failure) and why it failed."""

    start_s: float
    end_s: float
    file: Path | None = None
    error: str | None = None
    seconds: float = 0.0  # time spent cutting (0 when an earlier run's file was reused)
    reused: bool = False


def clip_frames(
    video: str | os.PathLike, start_s: float, end_s: float, max_side: int | None = MAX_SIDE
) -> Iterator[np.ndarray]:
    """Frames ``round(start_s*25) .. round(end_s*25) - 1`` of the pipeline's own 25-fps stream
    (``mam.video.iter_frames``, which seeks), downscaled to ``max_side`` and cropped to even
    sizes, as H.264 4:2:0 needs."""
    for frame in iter_frames(video, _LIMITS, max_side=max_side, start_s=start_s, end_s=end_s):
        h, w = frame.shape[:2]
        yield frame[: h - h % 2, : w - w % 2]


def draw_skeleton(
    frame: np.ndarray, joints_2d: np.ndarray, confidence: np.ndarray | None = None
) -> np.ndarray:
    """Draw bones and joints (pixels ``[17, 2]``, NaN = not found) on an RGB frame, in place.
    Joints with confidence below 0.3 are drawn hollow: the estimator was unsure there."""
    import cv2

    h, w = frame.shape[:2]
    thick = max(2, round(max(h, w) / 240))
    ok = np.isfinite(joints_2d).all(axis=1)
    pts = np.where(ok[:, None], joints_2d, 0).round().astype(np.int32)
    bones = [(a, b) for a, b in BONES if ok[a] and ok[b]]
    for a, b in bones:  # a dark outline first, so light colours show on light blankets
        cv2.line(frame, tuple(pts[a]), tuple(pts[b]), (0, 0, 0), thick + 2, cv2.LINE_AA)
    for a, b in bones:
        colour = LEFT_RGB if b in _LEFT else RIGHT_RGB if b in _RIGHT else AXIAL_RGB
        cv2.line(frame, tuple(pts[a]), tuple(pts[b]), colour, thick, cv2.LINE_AA)
    for j in np.flatnonzero(ok):
        sure = confidence is None or confidence[j] >= 0.3
        cv2.circle(frame, tuple(pts[j]), thick + 1, (255, 255, 255), -1 if sure else 1, cv2.LINE_AA)
    return frame


def _caption(frame: np.ndarray, text: str) -> None:
    """Recording time on a dark box, top left: the player shows clip time, reviewers want the
    recording's."""
    import cv2

    h = frame.shape[0]
    scale = max(0.4, h / 720)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    pad = max(3, round(4 * scale))
    frame[: th + base + 2 * pad, : tw + 2 * pad] //= 3
    org = (pad, pad + th)
    cv2.putText(frame, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def cut_clip(
    video: str | os.PathLike,
    start_s: float,
    end_s: float,
    dest: str | os.PathLike,
    pose,
    max_side: int | None = MAX_SIDE,
) -> Path:
    """Write ``video[start_s:end_s]`` to ``dest`` (H.264 MP4, 25 fps) with the skeleton drawn.

    ``pose`` is the pose backend that scored the recording (an instance, kept by the caller, or
    its name: made and closed here); its result carries ``meta["image_joints"]``. Written to a
    temporary file first, so ``dest`` is either complete or absent."""
    from mam.pose import create_backend

    dest = Path(dest)
    own = isinstance(pose, str)
    pose = create_backend(pose) if own else pose
    try:
        seq = pose.estimate(clip_frames(video, start_s, end_s, max_side))
    finally:
        if own:
            pose.close()
    joints = seq.meta.get("image_joints")
    if joints is None:
        raise MamError(f"the {seq.source} pose backend gives no 2D image landmarks to draw")
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")  # its own: writers may race
    try:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            stream = out.add_stream(
                "libx264", rate=int(FPS), options={"preset": "veryfast", "crf": str(CRF)}
            )
            stream.pix_fmt = "yuv420p"
            frames = clip_frames(video, start_s, end_s, max_side)
            for i, img in enumerate(frames):
                if i == 0:
                    stream.height, stream.width = img.shape[:2]
                if i < len(joints):
                    draw_skeleton(img, joints[i], seq.confidence[i])
                _caption(img, mmss_tenths(start_s + i / FPS))
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, int(FPS))
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def cut_review_clips(
    video: str | os.PathLike,
    spans: list[tuple[float, float]],
    dest_dir: str | os.PathLike,
    names: list[str],
    pose,
    reuse: bool = True,
) -> list[ReviewClip]:
    """Cut each ``(start_s, end_s)`` span to ``dest_dir/names[i]``; never raises for one clip
    (the error is returned instead). ``reuse``: keep a file an earlier run wrote (names are
    expected to be content-addressed, so an existing file is this clip)."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    done: list[ReviewClip] = []
    for (a, b), name in zip(spans, names, strict=True):
        clip = ReviewClip(a, b)
        dest = dest_dir / name
        if reuse and dest.is_file() and dest.stat().st_size > 0:
            clip.file, clip.reused = dest, True
            done.append(clip)
            continue
        t = time.perf_counter()
        try:
            clip.file = cut_clip(video, a, b, dest, pose)
        except MamError as e:
            clip.error = f"{e.code}: {e}"
        except Exception as e:  # noqa: BLE001 - one clip must not fail the report
            clip.error = f"{type(e).__name__}: {e}"
        clip.seconds = time.perf_counter() - t
        if clip.error:
            logger.warning("review clip failed (%s)", clip.error.split(":", 1)[0])
        done.append(clip)
    return done
