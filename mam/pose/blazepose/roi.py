"""The rotated, square crop the landmark network sees: from a detection or from landmarks.

Ported from MediaPipe's ``pose_detection_to_roi`` and ``pose_landmarks_to_roi`` graphs (mediapipe
0.10.21, Apache-2.0): ``AlignmentPointsRectsCalculator`` (centre = first alignment point, side =
twice its distance to the second, rotation so that the hip -> "scale point" vector points up, i.e.
``90 deg - atan2(-(y1 - y0), x1 - x0)``) followed by ``RectTransformationCalculator`` with
``square_long`` and scale 1.25. The alignment points are detector keypoints 0 and 1, or the
landmark network's auxiliary landmarks 33 and 34 when tracking from the previous frame.

An ROI is a row ``(x_centre, y_centre, width, height, rotation)``: centre and sizes normalised by
the frame width / height (MediaPipe's ``NormalizedRect``), rotation in radians; batches are
``[N, 5]`` arrays. :func:`crop_matrix` and :func:`crop` turn it into the 256 x 256 input with the
same corner convention as MediaPipe's OpenCV ``ImageToTensorCalculator`` (rect corners map to the
outer edges of the output), so landmarks project back with the plain rotation of
``LandmarkProjectionCalculator``.
"""

from __future__ import annotations

import numpy as np

from mam.pose.blazepose._cv import cv2_module

ROI_SCALE = 1.25
CROP_SIZE = 256
ROI_FIELDS = ("x_center", "y_center", "width", "height", "rotation")


def normalize_radians(angle: np.ndarray | float) -> np.ndarray:
    return angle - 2 * np.pi * np.floor((angle + np.pi) / (2 * np.pi))


def roi_from_alignment_points(
    start: np.ndarray, end: np.ndarray, width: int, height: int, scale: float = ROI_SCALE
) -> np.ndarray:
    """ROIs ``[N, 5]`` from alignment points ``start``/``end`` ``[N, 2]`` (normalised x, y)."""
    size = np.array([width, height], np.float64)
    p0 = np.asarray(start, np.float64).reshape(-1, 2) * size
    p1 = np.asarray(end, np.float64).reshape(-1, 2) * size
    d = p1 - p0
    side = 2.0 * np.hypot(d[:, 0], d[:, 1]) * scale  # square in pixels, so square_long is a no-op
    rotation = normalize_radians(np.pi / 2 - np.arctan2(-d[:, 1], d[:, 0]))
    return np.stack([p0[:, 0] / width, p0[:, 1] / height, side / width, side / height, rotation], 1)


def crop_matrix(roi: np.ndarray, width: int, height: int, size: int = CROP_SIZE) -> np.ndarray:
    """``[2, 3]`` affine from crop pixels to frame pixels (for ``cv2.WARP_INVERSE_MAP``)."""
    cx, cy, w, h, angle = roi
    w_px, h_px = w * width, h * height
    c, s = np.cos(angle), np.sin(angle)
    # frame = centre + R(angle) @ ((u / size - 0.5) * w_px, (v / size - 0.5) * h_px)
    ax, ay = w_px / size, h_px / size
    return np.array(
        [
            [c * ax, -s * ay, cx * width - c * w_px / 2 + s * h_px / 2],
            [s * ax, c * ay, cy * height - s * w_px / 2 - c * h_px / 2],
        ]
    )


def crop(
    frame: np.ndarray,
    roi: np.ndarray,
    out: np.ndarray | None = None,
    size: int = CROP_SIZE,
    replicate_border: bool = True,
) -> np.ndarray:
    """The landmark network's input for one ROI: ``[size, size, 3]`` float32 in [0, 1] (warped on
    uint8, then scaled, like MediaPipe's OpenCV converter; border replicated, its default)."""
    cv2 = cv2_module()
    height, width = frame.shape[:2]
    warped = cv2.warpAffine(
        frame,
        crop_matrix(roi, width, height, size),
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE if replicate_border else cv2.BORDER_CONSTANT,
    )
    if out is None:
        out = np.empty((size, size, 3), np.float32)
    np.multiply(warped, 1.0 / 255.0, out=out, casting="unsafe")
    return out
