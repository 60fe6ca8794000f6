"""BlazePose 33 landmarks -> Human3.6M 17 joints, and the left/right swap repair.

MAM's inputs are built on the 17 Human3.6M joints (``mam.skeleton``; paper, Methods). The
offline pose backend is MediaPipe BlazePose (33 landmarks, trained on adults). The mapping and the
head rule below are the ones measured in DESIGN.md ("Pose: the offline default and the GPU route",
"Rendering a recording that BlazePose tracks"):

* pelvis = mid(L hip 23, R hip 24); R hip/knee/ankle = 24, 26, 28; L hip/knee/ankle = 23, 25, 27;
* thorax = mid(L shoulder 11, R shoulder 12); spine = mid(pelvis, thorax);
* neck/nose = nose 0;
* head = mid-ears + 2.9 x (mid-ears - mouth), ears 7, 8 and mouth = mid(9, 10)
  (25 px error on rendered infants vs 53 px for extrapolating from the thorax);
* L shoulder/elbow/wrist = 11, 13, 15; R shoulder/elbow/wrist = 12, 14, 16.

Every joint is a fixed linear combination of landmarks (:data:`JOINT_WEIGHTS`), so one table drives
both positions and confidences. BlazePose's "left" is the person's left, as in Human3.6M.

Per-joint confidence (:func:`map_confidence`) is the **minimum** visibility of the landmarks the
joint is built from: a derived joint (pelvis, spine, head) is only as reliable as its least visible
part, and the minimum never reports a joint as confident when half of its inputs were guessed.

Left/right swap repair (:func:`find_left_right_swaps`): BlazePose's main failure on infants is
relabelling a body half (both shoulders/arms, or both hips/legs) for dozens of frames while the face
stays right. A half is relabelled when the face's left direction
``(L eye 2 - R eye 5) + (L ear 7 - R ear 8)`` points against that half's left direction (shoulders
``11 - 12`` for the arms, hips ``23 - 24`` for the legs), i.e. their dot product is negative. On
rendered infant video this removed about two-thirds of the swaps (DESIGN.md). It cannot see a mirror
of the whole body including the face. It works in 2D (image) or 3D (world) coordinates alike.
"""

from __future__ import annotations

import logging

import numpy as np

from mam.skeleton import FPS, JOINT_NAMES, NUM_JOINTS

logger = logging.getLogger(__name__)

NUM_LANDMARKS = 33

BLAZEPOSE_LANDMARKS: tuple[str, ...] = (
    "nose",
    "left_eye_inner",
    "left_eye",
    "left_eye_outer",
    "right_eye_inner",
    "right_eye",
    "right_eye_outer",
    "left_ear",
    "right_ear",
    "mouth_left",
    "mouth_right",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_pinky",
    "right_pinky",
    "left_index",
    "right_index",
    "left_thumb",
    "right_thumb",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
    "left_heel",
    "right_heel",
    "left_foot_index",
    "right_foot_index",
)
LANDMARK_INDEX = {name: i for i, name in enumerate(BLAZEPOSE_LANDMARKS)}

HEAD_EXTRAPOLATION = 2.9
"""head = mid-ears + k * (mid-ears - mouth); k measured on rendered infants (DESIGN.md)."""

_K = HEAD_EXTRAPOLATION
# Each H36M joint as {landmark index: weight}; weights sum to 1 (affine combinations).
# head = (1 + k) * mid(7, 8) - k * mid(9, 10)
JOINT_WEIGHTS: tuple[dict[int, float], ...] = (
    {23: 0.5, 24: 0.5},  # pelvis
    {24: 1.0},  # right_hip
    {26: 1.0},  # right_knee
    {28: 1.0},  # right_ankle
    {23: 1.0},  # left_hip
    {25: 1.0},  # left_knee
    {27: 1.0},  # left_ankle
    {11: 0.25, 12: 0.25, 23: 0.25, 24: 0.25},  # spine = mid(pelvis, thorax)
    {11: 0.5, 12: 0.5},  # thorax
    {0: 1.0},  # neck_nose
    {7: (1 + _K) / 2, 8: (1 + _K) / 2, 9: -_K / 2, 10: -_K / 2},  # head
    {11: 1.0},  # left_shoulder
    {13: 1.0},  # left_elbow
    {15: 1.0},  # left_wrist
    {12: 1.0},  # right_shoulder
    {14: 1.0},  # right_elbow
    {16: 1.0},  # right_wrist
)
assert len(JOINT_WEIGHTS) == NUM_JOINTS == len(JOINT_NAMES)

# Body halves relabelled by the swap repair: (left, right) landmark pairs.
ARM_PAIRS: tuple[tuple[int, int], ...] = (
    (11, 12),
    (13, 14),
    (15, 16),
    (17, 18),
    (19, 20),
    (21, 22),
)
LEG_PAIRS: tuple[tuple[int, int], ...] = ((23, 24), (25, 26), (27, 28), (29, 30), (31, 32))


def _check_landmarks(landmarks: np.ndarray, what: str) -> None:
    if landmarks.ndim < 2 or landmarks.shape[-2] != NUM_LANDMARKS:
        raise ValueError(f"{what} must be [..., {NUM_LANDMARKS}, D], got {landmarks.shape}")


def map_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Map BlazePose landmark positions ``[..., 33, D]`` to H36M joints ``[..., 17, D]`` (float32).

    Works for any leading shape (frames) and any coordinate count D (2D image, 3D world). A joint
    is NaN only where a landmark it is built from is NaN.
    """
    x = np.asarray(landmarks, dtype=np.float64)
    _check_landmarks(x, "landmarks")
    out = np.empty(x.shape[:-2] + (NUM_JOINTS, x.shape[-1]), dtype=np.float64)
    for j, weights in enumerate(JOINT_WEIGHTS):
        out[..., j, :] = sum(w * x[..., i, :] for i, w in weights.items())
    return out.astype(np.float32)


def map_confidence(visibility: np.ndarray) -> np.ndarray:
    """Per-joint confidence ``[..., 17]`` from landmark visibility ``[..., 33]`` (float32).

    The minimum visibility over the landmarks a joint is built from, clipped to [0, 1]; NaN -> 0.
    """
    v = np.asarray(visibility, dtype=np.float64)
    if v.ndim < 1 or v.shape[-1] != NUM_LANDMARKS:
        raise ValueError(f"visibility must be [..., {NUM_LANDMARKS}], got {v.shape}")
    v = np.nan_to_num(np.clip(v, 0.0, 1.0), nan=0.0)
    out = np.stack([v[..., sorted(w)].min(axis=-1) for w in JOINT_WEIGHTS], axis=-1)
    return out.astype(np.float32)


def face_left_direction(landmarks: np.ndarray) -> np.ndarray:
    """The face's left direction ``(L eye - R eye) + (L ear - R ear)``, ``[..., D]``."""
    x = np.asarray(landmarks, dtype=np.float64)
    _check_landmarks(x, "landmarks")
    return (x[..., 2, :] - x[..., 5, :]) + (x[..., 7, :] - x[..., 8, :])


def find_left_right_swaps(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames whose arms or legs are labelled mirror-wise to the face.

    Args:
        landmarks: positions ``[T, 33, D]`` (image pixels or world metres; use pixels, not
            coordinates normalised separately per axis, so that directions are not distorted).

    Returns:
        ``(arms, legs)``: bool ``[T]`` masks of frames where the shoulders' (``11 - 12``) or the
        hips' (``23 - 24``) left direction has a negative dot product with the face's. Frames with
        NaN landmarks are never flagged.
    """
    x = np.asarray(landmarks, dtype=np.float64)
    _check_landmarks(x, "landmarks")
    face = face_left_direction(x)
    shoulders = x[..., 11, :] - x[..., 12, :]
    hips = x[..., 23, :] - x[..., 24, :]
    with np.errstate(invalid="ignore"):
        arms = np.sum(face * shoulders, axis=-1) < 0
        legs = np.sum(face * hips, axis=-1) < 0
    return arms, legs


def apply_left_right_swaps(values: np.ndarray, arms: np.ndarray, legs: np.ndarray) -> np.ndarray:
    """Exchange the left and right landmarks of the arms / legs on the flagged frames.

    ``values`` is ``[T, 33, ...]`` (positions ``[T, 33, D]`` or visibility ``[T, 33]``); a new
    array is returned, the input is not modified.
    """
    v = np.array(values, copy=True)
    if v.ndim < 2 or v.shape[1] != NUM_LANDMARKS:
        raise ValueError(f"values must be [T, {NUM_LANDMARKS}, ...], got {v.shape}")
    arms = np.asarray(arms, dtype=bool)
    legs = np.asarray(legs, dtype=bool)
    if arms.shape != (v.shape[0],) or legs.shape != (v.shape[0],):
        raise ValueError(f"masks must be [{v.shape[0]}], got {arms.shape} and {legs.shape}")
    for mask, pairs in ((arms, ARM_PAIRS), (legs, LEG_PAIRS)):
        if not mask.any():
            continue
        left = [p[0] for p in pairs]
        right = [p[1] for p in pairs]
        frames = np.flatnonzero(mask)[:, None]
        v[frames, left + right] = v[frames, right + left]
    return v


def repair_left_right_swaps(landmarks: np.ndarray) -> np.ndarray:
    """:func:`find_left_right_swaps` then :func:`apply_left_right_swaps` on the same array.

    To relabel several arrays of one recording consistently (image and world landmarks,
    visibility), find the swaps once and apply them to each.
    """
    arms, legs = find_left_right_swaps(landmarks)
    return apply_left_right_swaps(landmarks, arms, legs)


def landmarks_to_sequence(
    image: list[np.ndarray],
    world: list[np.ndarray],
    size: tuple[int, int] | None,
    *,
    source: str,
    config: dict,
    repair_swaps: bool = True,
    elapsed: float = float("nan"),
    meta: dict | None = None,
):
    """Per-frame BlazePose output -> ``PoseSequence``: the one tail of both BlazePose backends.

    ``image`` holds ``[33, 4]`` (x, y normalised to the frame, z, visibility) and ``world``
    ``[33, 4]`` (metres) per frame, NaN where nothing was found. Swaps are decided once on the
    image landmarks (pixels) and applied to image, world and visibility alike; joints are made
    pelvis-relative; ``meta`` adds backend-specific keys to the common ones."""
    from mam.pose.base import PoseSequence

    if not image:
        return PoseSequence(
            joints=np.zeros((0, NUM_JOINTS, 3), np.float32),
            confidence=np.zeros((0, NUM_JOINTS), np.float32),
            fps=FPS,
            source=source,
            meta={"image_joints": np.zeros((0, NUM_JOINTS, 2), np.float32), "image_size": None},
        )
    img, wld = np.stack(image), np.stack(world)
    width, height = size
    pixels = img[..., :2] * np.array([width, height], dtype=np.float64)
    visibility = img[..., 3]
    detected = np.isfinite(img).all(axis=(1, 2))
    arms = legs = np.zeros(len(img), dtype=bool)
    if repair_swaps:
        arms, legs = find_left_right_swaps(pixels)
        pixels = apply_left_right_swaps(pixels, arms, legs)
        wld = apply_left_right_swaps(wld, arms, legs)
        visibility = apply_left_right_swaps(visibility, arms, legs)
    joints = map_landmarks(wld[..., :3])
    joints -= joints[:, :1]  # pelvis-relative (world origin is already about mid-hip)
    confidence = map_confidence(visibility)
    confidence[~detected] = 0.0
    logger.info(
        "%s: pose found in %d of %d frames (%.1f frames/s); arms relabelled on %d, legs on %d",
        source, int(detected.sum()), len(img), len(img) / elapsed if elapsed > 0 else float("nan"),
        int(arms.sum()), int(legs.sum()),
    )  # fmt: skip
    return PoseSequence(
        joints=joints,
        confidence=confidence,
        fps=FPS,
        source=source,
        meta={
            "image_joints": map_landmarks(pixels),
            "image_size": (int(width), int(height)),
            "swaps_repaired": {"arms": int(arms.sum()), "legs": int(legs.sum())},
            "axes": "x right, y down, z away from the camera; metres; pelvis-relative",
            "config": dict(config),
            **(meta or {}),
        },
    )
