"""Pose sequence -> MAM input instances (paper, Methods: "3D information acquisition and
pre-processing", "Input features construction", "Definition of bag and instance").

Steps, in order: 5-frame moving average; per-axis normalisation with statistics saved with the
model; per-frame signed per-axis difference matrices ``[T, 3, 17, 17]``; split into 240-frame
instances (9.6 s at 25 fps) with a configurable step (paper: 90).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mam.errors import InsufficientTrackingError, InvalidTensorError, VideoTooShortError
from mam.skeleton import FPS, NUM_JOINTS

CLIP_FRAMES = 240
CLIP_STEP = 90
SMOOTHING_WINDOW = 5


def moving_average(joints: np.ndarray, window: int = SMOOTHING_WINDOW) -> np.ndarray:
    """Centred moving average over time of ``[T, ...]``; the window shrinks at both ends so the
    length is unchanged and no value is invented past the recording. NaN frames stay NaN and do
    not leak into their neighbours' averages (they are skipped)."""
    if window < 1 or window % 2 == 0:
        raise ValueError("window must be a positive odd number")
    x = np.asarray(joints, dtype=np.float64)
    valid = np.isfinite(x)
    filled = np.where(valid, x, 0.0)
    half = window // 2
    pad = [(half, half)] + [(0, 0)] * (x.ndim - 1)
    csum = np.cumsum(np.pad(filled, pad), axis=0)
    ccnt = np.cumsum(np.pad(valid.astype(np.float64), pad), axis=0)
    csum = np.concatenate([np.zeros_like(csum[:1]), csum])
    ccnt = np.concatenate([np.zeros_like(ccnt[:1]), ccnt])
    s = csum[window:] - csum[:-window]
    n = ccnt[window:] - ccnt[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = s / n
    out[~valid] = np.nan
    return out.astype(np.float32)


@dataclass(frozen=True)
class Normalizer:
    """Per-axis mean and standard deviation of all (pelvis-relative) coordinates of the training
    poses (paper: "the mean and standard deviation of all coordinates in each of the three
    dimensions"). Differences cancel the mean, so in practice the std sets the units."""

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def fit(cls, sequences: Sequence[np.ndarray]) -> Normalizer:
        xyz = np.concatenate([np.asarray(s, np.float64).reshape(-1, 3) for s in sequences])
        xyz = xyz[np.isfinite(xyz).all(axis=1)]
        if len(xyz) == 0:
            raise ValueError("no finite coordinates to fit the normaliser on")
        std = xyz.std(axis=0)
        if np.all(std <= 0):
            raise ValueError("no coordinate axis varies")
        # An axis without variance (z of the image-plane representation) keeps unit scale.
        std = np.where(std > 0, std, 1.0)
        return cls(tuple(map(float, xyz.mean(axis=0))), tuple(map(float, std)))

    def apply(self, joints: np.ndarray) -> np.ndarray:
        m = np.asarray(self.mean, np.float32)
        s = np.asarray(self.std, np.float32)
        return ((np.asarray(joints, np.float32) - m) / s).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(tuple(d["mean"]), tuple(d["std"]))


def difference_matrices(joints: np.ndarray) -> np.ndarray:
    """``[T, V, 3]`` -> ``[T, 3, V, V]`` float32 with ``d[t, c, i, j] = x[t, i, c] - x[t, j, c]``.

    NOTE: the paper calls these "distances"; the reference data are signed, so are we (DESIGN.md).
    """
    x = np.asarray(joints, np.float32).transpose(0, 2, 1)  # [T, 3, V]
    return x[:, :, :, None] - x[:, :, None, :]


def clip_bounds(
    num_frames: int, clip_frames: int = CLIP_FRAMES, step: int = CLIP_STEP, cover_tail: bool = True
) -> list[tuple[int, int]]:
    """``(start, end)`` frame ranges of the instances of a recording of ``num_frames``.

    Starts at 0, 90, 180, ... (paper). With ``cover_tail`` one more instance ending at the last
    frame is added when the regular grid would leave more than ``step // 2`` frames unseen, so the
    end of a recording is assessed too.
    """
    if step < 1:
        raise ValueError("step must be >= 1")
    if num_frames < clip_frames:
        return []
    bounds = [(s, s + clip_frames) for s in range(0, num_frames - clip_frames + 1, step)]
    if cover_tail and num_frames - bounds[-1][1] > step // 2:
        bounds.append((num_frames - clip_frames, num_frames))
    return bounds


def intervals_to_mask(
    intervals_s: Sequence[tuple[float, float]], num_frames: int, fps: float = FPS
) -> np.ndarray:
    """Per-frame truth ``[T]`` from annotated ``(start_s, end_s)`` intervals (e.g. FMs)."""
    mask = np.zeros(num_frames, bool)
    for a, b in intervals_s:
        mask[int(round(a * fps)) : int(round(b * fps))] = True
    return mask


@dataclass
class Instances:
    """A recording's bag: instance tensors ``[N, 240, 3, 17, 17]`` float32 and their times."""

    tensors: np.ndarray
    start_frames: np.ndarray
    end_frames: np.ndarray
    fps: float = FPS

    @property
    def start_s(self) -> np.ndarray:
        return self.start_frames / self.fps

    @property
    def end_s(self) -> np.ndarray:
        return self.end_frames / self.fps

    def __len__(self) -> int:
        return int(self.tensors.shape[0])


def prepare_sequence(
    joints: np.ndarray, normalizer: Normalizer, smoothing_window: int = SMOOTHING_WINDOW
) -> np.ndarray:
    """Pelvis-relative (as a pose lifter's output is), smoothed, normalised ``[T, 17, 3]``."""
    joints = np.asarray(joints, np.float32)
    return normalizer.apply(moving_average(joints - joints[:, :1], smoothing_window))


def build_instances(
    joints: np.ndarray,
    normalizer: Normalizer,
    *,
    clip_frames: int = CLIP_FRAMES,
    step: int = CLIP_STEP,
    smoothing_window: int = SMOOTHING_WINDOW,
    fps: float = FPS,
) -> Instances:
    """Full feature path for one recording's pose ``[T, 17, 3]`` at 25 fps.

    Instances touching an untracked (NaN) frame are left out rather than filled with invented
    motion; the result says which times were assessed.
    """
    joints = np.asarray(joints, np.float32)
    if joints.ndim != 3 or joints.shape[1:] != (NUM_JOINTS, 3):
        raise ValueError(f"joints must be [T, {NUM_JOINTS}, 3], got {joints.shape}")
    T = joints.shape[0]
    if T < clip_frames:
        raise VideoTooShortError(
            f"recording has {T / fps:.1f} s of pose; at least {clip_frames / fps:.1f} s are needed"
        )
    smoothed = prepare_sequence(joints, normalizer, smoothing_window)
    tracked = np.isfinite(smoothed).all(axis=(1, 2))
    bounds = [(s, e) for s, e in clip_bounds(T, clip_frames, step) if tracked[s:e].all()]
    if not bounds:
        raise InsufficientTrackingError(
            "no 9.6 s stretch of the recording was tracked without a gap; nothing to assess"
        )
    diffs = difference_matrices(np.nan_to_num(smoothed))
    tensors = np.stack([diffs[s:e] for s, e in bounds])
    starts = np.array([s for s, _ in bounds])
    ends = np.array([e for _, e in bounds])
    return Instances(tensors, starts, ends, fps)


def validate_instances(
    tensors: object, *, clip_frames: int = CLIP_FRAMES, max_instances: int = 1024
) -> np.ndarray:
    """Check instance tensors sent from outside (service, gRPC) and return them as float32.

    Beyond shape, dtype and finiteness, a difference matrix is antisymmetric with a zero
    diagonal; checking that catches tensors with swapped axes or that are not differences at all,
    which would otherwise score as confidently as real ones.

    Raises:
        InvalidTensorError: with what was expected and what was received.
    """
    shape = f"[N, {clip_frames}, 3, {NUM_JOINTS}, {NUM_JOINTS}]"
    if not isinstance(tensors, np.ndarray):
        raise InvalidTensorError(f"expected an array {shape}; received {type(tensors).__name__}")
    if tensors.ndim != 5 or tensors.shape[1:] != (clip_frames, 3, NUM_JOINTS, NUM_JOINTS):
        raise InvalidTensorError(
            f"expected instances of shape {shape}; received {list(tensors.shape)}"
        )
    n = tensors.shape[0]
    if not 1 <= n <= max_instances:
        raise InvalidTensorError(f"expected 1 to {max_instances} instances; received {n}")
    if tensors.dtype.kind != "f" or tensors.dtype.itemsize not in (2, 4, 8):
        raise InvalidTensorError(
            f"expected float16/float32/float64 instances; received dtype {tensors.dtype}"
        )
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(tensors, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InvalidTensorError("expected finite values; received NaN or +-inf")
    scale = max(float(np.abs(x).max()), 1e-6)
    err = float(np.abs(x - expand_differences(x[..., 0])).max())
    if err > 1e-3 * scale:
        raise InvalidTensorError(
            "expected joint-difference matrices on the last two axes (d[i, j] = x_i - x_j, so "
            f"d[i, j] = d[i, 0] - d[j, 0]); received matrices off by up to {err / scale:.2g} of "
            "their scale. Are the axes in the order [N, frames, xyz, joints, joints]?"
        )
    return x


def expand_differences(relative: np.ndarray) -> np.ndarray:
    """``[..., V]`` positions relative to joint 0 (``d[..., :, 0]``) -> the difference matrices
    ``[..., V, V]``. A difference matrix holds V numbers' worth of information in V x V; sending
    the V between processes is 17x less to copy, and expanding it back is exact up to rounding."""
    r = np.asarray(relative, np.float32)
    return r[..., :, None] - r[..., None, :]
