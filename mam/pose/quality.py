"""Post-processing shared by every pose backend: gap filling and the tracking-quality report.

BlazePose is trained on adults (DESIGN.md), so every screening reports how well the infant was
tracked, and refuses to screen when too little of the video carries a pose.

Frame categories used throughout (per frame, over all 17 joints):

* **tracked**: every joint finite and none interpolated, i.e. the estimator saw the pose;
* **interpolated**: every joint finite, at least one filled by :func:`fill_gaps`;
* **missing**: at least one joint NaN (untracked, or a gap too long to fill).

:func:`fill_gaps` records what it filled in ``seq.meta["interpolated"]`` (bool ``[T, 17]``),
which is how :func:`assess_quality` tells interpolated from tracked frames.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from mam.errors import InsufficientTrackingError, NoInfantDetectedError
from mam.pose.base import PoseSequence

INTERPOLATED_META_KEY = "interpolated"

DEFAULT_MAX_GAP_S = 0.5
"""Longest run of untracked frames that :func:`fill_gaps` bridges (12 frames at 25 fps)."""

INTERPOLATED_CONFIDENCE_FACTOR = 0.5
"""An interpolated joint gets this fraction of the lower confidence of the two frames around it."""

DEFAULT_MIN_TRACKED_FRACTION = 0.5
""":func:`check_trackable` refuses videos with fewer tracked frames than this."""

# Thresholds of the quality warnings (advisory; they never block a screening).
WARN_TRACKED_FRACTION = 0.9
WARN_LONGEST_GAP_S = 1.0
WARN_MEAN_CONFIDENCE = 0.5


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the runs of True in a 1-D bool array (stop exclusive)."""
    padded = np.concatenate(([False], mask.astype(bool), [False]))
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _interpolated_mask(seq: PoseSequence) -> np.ndarray:
    mask = seq.meta.get(INTERPOLATED_META_KEY)
    if mask is None:
        return np.zeros(seq.joints.shape[:2], dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != seq.joints.shape[:2]:
        raise ValueError(
            f"meta[{INTERPOLATED_META_KEY!r}] must be {seq.joints.shape[:2]}, got {mask.shape}"
        )
    return mask


def fill_gaps(
    seq: PoseSequence,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    confidence_factor: float = INTERPOLATED_CONFIDENCE_FACTOR,
) -> PoseSequence:
    """Linearly interpolate short runs of NaN frames, per joint.

    A run of ``n`` missing frames of a joint is filled when it has a finite frame on both sides
    and ``n / fps <= max_gap_s``; longer runs, and runs at the start or end of the sequence, stay
    NaN (nothing is extrapolated). A joint is missing in a frame when any of its coordinates is NaN.

    Args:
        seq: the sequence to fill; it is not modified.
        max_gap_s: longest gap to bridge, in seconds (0 disables filling).
        confidence_factor: an interpolated joint gets ``confidence_factor`` times the lower
            confidence of the two frames bracketing the gap (0 marks interpolated joints as unseen).

    Returns:
        A new :class:`PoseSequence`; ``meta["interpolated"]`` (bool ``[T, 17]``) marks the filled
        joints, OR-ed with any mask already there.
    """
    if not max_gap_s >= 0:
        raise ValueError(f"max_gap_s must be >= 0, got {max_gap_s}")
    if not 0.0 <= confidence_factor <= 1.0:
        raise ValueError(f"confidence_factor must be in [0, 1], got {confidence_factor}")
    joints = np.array(seq.joints, dtype=np.float32, copy=True)
    confidence = np.array(seq.confidence, dtype=np.float32, copy=True)
    interpolated = _interpolated_mask(seq).copy()
    image = seq.meta.get("image_joints")
    image = None if image is None else np.array(image, dtype=np.float32, copy=True)
    num_frames, num_joints = joints.shape[:2]
    # 1e-9 so that e.g. 0.48 s * 25 fps counts as 12 frames despite floating point.
    max_gap = math.floor(max_gap_s * seq.fps + 1e-9)
    frames = np.arange(num_frames, dtype=np.float64)

    for j in range(num_joints):
        missing = ~np.isfinite(joints[:, j]).all(axis=-1)
        if not missing.any() or missing.all():
            continue
        runs = [(a, b) for a, b in _runs(missing) if a > 0 and b < num_frames and b - a <= max_gap]
        if not runs:
            continue
        fill = np.concatenate([np.arange(a, b) for a, b in runs])
        valid = ~missing
        for arr in (joints, image) if image is not None else (joints,):
            for axis in range(arr.shape[2]):  # the 2D image joints share the 3D joints' gaps
                arr[fill, j, axis] = np.interp(
                    frames[fill], frames[valid], arr[valid, j, axis].astype(np.float64)
                )
        for a, b in runs:
            confidence[a:b, j] = confidence_factor * min(confidence[a - 1, j], confidence[b, j])
        interpolated[fill, j] = True

    meta = dict(seq.meta)
    meta[INTERPOLATED_META_KEY] = interpolated
    if image is not None:
        meta["image_joints"] = image
    return PoseSequence(
        joints=joints, confidence=confidence, fps=seq.fps, source=seq.source, meta=meta
    )


@dataclass(frozen=True)
class PoseQuality:
    """How well a pose sequence was tracked (see the module docstring for the frame categories).

    ``tracked_fraction`` is ``frames_tracked / frames_total`` (0 for an empty sequence);
    ``longest_gap_s`` is the longest run of frames that were not tracked (interpolated or missing);
    ``mean_confidence`` averages all joints over the tracked frames (0 when none).
    """

    frames_total: int
    frames_tracked: int
    tracked_fraction: float
    frames_interpolated: int
    frames_missing: int
    longest_gap_s: float
    mean_confidence: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def assess_quality(seq: PoseSequence) -> PoseQuality:
    """Count tracked, interpolated and missing frames and collect advisory warnings."""
    total = seq.num_frames
    complete = np.isfinite(seq.joints).all(axis=(1, 2))
    any_interpolated = _interpolated_mask(seq).any(axis=1)
    tracked = complete & ~any_interpolated
    n_tracked = int(tracked.sum())
    n_interpolated = int((complete & any_interpolated).sum())
    n_missing = total - n_tracked - n_interpolated
    fraction = n_tracked / total if total else 0.0
    longest = max((b - a for a, b in _runs(~tracked)), default=0) / seq.fps
    mean_conf = float(np.mean(seq.confidence[tracked])) if n_tracked else 0.0

    warnings: list[str] = []
    if total and n_tracked and fraction < WARN_TRACKED_FRACTION:
        warnings.append(f"the pose was tracked in only {fraction:.0%} of frames")
    if n_tracked and longest > WARN_LONGEST_GAP_S:
        warnings.append(f"the longest stretch without a tracked pose is {longest:.1f} s")
    if n_tracked and mean_conf < WARN_MEAN_CONFIDENCE:
        warnings.append(f"low mean landmark confidence ({mean_conf:.2f})")
    if n_tracked and n_missing:
        warnings.append(f"{n_missing} of {total} frames have no pose")
    return PoseQuality(
        frames_total=total,
        frames_tracked=n_tracked,
        tracked_fraction=fraction,
        frames_interpolated=n_interpolated,
        frames_missing=n_missing,
        longest_gap_s=longest,
        mean_confidence=mean_conf,
        warnings=warnings,
    )


def check_trackable(
    quality: PoseQuality, min_tracked_fraction: float = DEFAULT_MIN_TRACKED_FRACTION
) -> None:
    """Refuse a video whose pose was not tracked well enough to screen.

    Raises:
        NoInfantDetectedError: no frame was tracked.
        InsufficientTrackingError: fewer than ``min_tracked_fraction`` of the frames were tracked.
    """
    if not 0.0 <= min_tracked_fraction <= 1.0:
        raise ValueError(f"min_tracked_fraction must be in [0, 1], got {min_tracked_fraction}")
    if quality.frames_tracked == 0:
        raise NoInfantDetectedError(
            f"No infant was detected in any of the {quality.frames_total} frames. Check that the "
            "whole infant is visible and well lit."
        )
    if quality.tracked_fraction < min_tracked_fraction:
        raise InsufficientTrackingError(
            f"The infant was tracked in {quality.tracked_fraction:.1%} of frames "
            f"({quality.frames_tracked} of {quality.frames_total}); at least "
            f"{min_tracked_fraction:.0%} are needed."
        )
