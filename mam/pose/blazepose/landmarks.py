"""Landmark-network outputs -> image and world landmarks of the frame (numpy, batched).

A port of MediaPipe's ``pose_landmark_by_roi`` post-processing (mediapipe 0.10.21, Apache-2.0):
``TensorsToLandmarksCalculator`` (39 landmarks of x, y, z in crop pixels / 256, visibility and
presence through a sigmoid), ``RefineLandmarksFromHeatmapCalculator`` (kernel 7: where the
sigmoid heatmap within 3 cells of a landmark peaks at >= 0.5, x and y become the heatmap-weighted
mean cell), ``LandmarkProjectionCalculator`` (rotate by the ROI angle, scale by its size, shift to
its centre) and ``WorldLandmarkProjectionCalculator`` (world x, y rotated by the ROI angle; metres,
origin between the hips). Landmarks 33 and 34 are auxiliary: the alignment points for the next
frame's ROI. The pose-presence flag (already a probability) gates the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mam.pose.blazepose.roi import CROP_SIZE

NUM_ALL = 39  # 33 pose landmarks + 6 auxiliary
NUM_POSE = 33
HEATMAP_KERNEL = 7
MIN_HEATMAP_CONFIDENCE = 0.5


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class LandmarkBatch:
    """Per crop: ``image [N, 39, 3]`` (x, y normalised to the frame, z scaled like x),
    ``world [N, 39, 3]`` metres, ``visibility``/``presence`` ``[N, 39]``, ``flag [N]``."""

    image: np.ndarray
    world: np.ndarray
    visibility: np.ndarray
    presence: np.ndarray
    flag: np.ndarray


def refine_with_heatmap(xy: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """``xy [N, L, 2]`` normalised to the crop, ``heatmap [N, H, W, L]`` logits -> refined xy.

    NOTE: MediaPipe checks the row against the heatmap *height* by mistake (``center_col >=
    hm_height``); the heatmap is square, so the port keeps plain bounds.
    """
    n, hm_h, hm_w, num = heatmap.shape
    off = (HEATMAP_KERNEL - 1) // 2
    col = (xy[..., 0] * hm_w).astype(np.int64)  # C++ float -> int truncates toward zero
    row = (xy[..., 1] * hm_h).astype(np.int64)
    inside = (col >= 0) & (col < hm_w) & (row >= 0) & (row < hm_h)
    k = np.arange(-off, off + 1)
    rows = row[..., None] + k  # [N, L, K]
    cols = col[..., None] + k
    row_ok = (rows >= 0) & (rows < hm_h)
    col_ok = (cols >= 0) & (cols < hm_w)
    rr = np.clip(rows, 0, hm_h - 1)
    cc = np.clip(cols, 0, hm_w - 1)
    b = np.arange(n)[:, None, None, None]
    lm = np.arange(num)[None, :, None, None]
    conf = _sigmoid(heatmap[b, rr[..., :, None], cc[..., None, :], lm].astype(np.float64))
    conf = conf * (row_ok[..., :, None] & col_ok[..., None, :])  # outside the map: no weight
    total = conf.sum(axis=(2, 3))
    peak = conf.max(axis=(2, 3))
    safe = np.where(total > 0, total, 1.0)
    new_x = (conf * cols[..., None, :]).sum(axis=(2, 3)) / hm_w / safe
    new_y = (conf * rows[..., :, None]).sum(axis=(2, 3)) / hm_h / safe
    use = inside & (peak >= MIN_HEATMAP_CONFIDENCE) & (total > 0)
    out = xy.copy()
    out[..., 0] = np.where(use, new_x, xy[..., 0])
    out[..., 1] = np.where(use, new_y, xy[..., 1])
    return out


def decode_landmarks(
    landmarks: np.ndarray,
    world: np.ndarray,
    flag: np.ndarray,
    heatmap: np.ndarray | None,
    rois: np.ndarray,
    crop_size: int = CROP_SIZE,
) -> LandmarkBatch:
    """Raw outputs of N crops (``[N, 195]``, ``[N, 117]``, ``[N, 1]``, ``[N, 64, 64, 39]``) and
    their ROIs ``[N, 5]`` -> landmarks in frame coordinates."""
    n = landmarks.shape[0]
    raw = landmarks.reshape(n, NUM_ALL, 5).astype(np.float64)
    xyz = raw[..., :3] / crop_size
    visibility = _sigmoid(raw[..., 3])
    presence = _sigmoid(raw[..., 4])
    if heatmap is not None:
        xyz[..., :2] = refine_with_heatmap(xyz[..., :2], heatmap)
    cx, cy, w, h, angle = (rois[:, i, None] for i in range(5))
    c, s = np.cos(angle), np.sin(angle)
    x, y = xyz[..., 0] - 0.5, xyz[..., 1] - 0.5
    image = np.stack([(c * x - s * y) * w + cx, (s * x + c * y) * h + cy, xyz[..., 2] * w], axis=-1)
    wr = world.reshape(n, NUM_ALL, 3).astype(np.float64)
    world_rot = np.stack(
        [c * wr[..., 0] - s * wr[..., 1], s * wr[..., 0] + c * wr[..., 1], wr[..., 2]], axis=-1
    )
    return LandmarkBatch(image, world_rot, visibility, presence, flag.reshape(n).astype(np.float64))
