"""MediaPipe's temporal landmark filters (``smooth_landmarks=True``), ported to numpy.

From ``pose_landmark_filtering`` (mediapipe 0.10.21, Apache-2.0), so that the ``onnx`` backend's
output jitters like the ``mediapipe`` backend's:

* image landmarks: a one-euro filter per coordinate (min cutoff 0.1, beta 40, derivative cutoff
  1) on pixel values, its speed term scaled by 1 / the landmarks' bounding-box size
  (``LandmarksSmoothingCalculator``);
* world landmarks: the same filter without that scaling (``disable_value_scaling``);
* visibility: a low-pass filter with alpha 0.1 (``VisibilitySmoothingCalculator``).

Filters restart after every untracked frame, as MediaPipe's do when the landmarks vanish.
NOTE: the legacy ``solutions`` API stamps frames 1/30 s apart whatever the video's rate, so the
filter runs at 30 Hz here too: the point is to match that backend, not to re-tune it.
"""

from __future__ import annotations

import numpy as np

FREQUENCY = 30.0
LANDMARK_FILTER = {"min_cutoff": 0.1, "beta": 40.0, "derivate_cutoff": 1.0}
VISIBILITY_ALPHA = 0.1


def _alpha(cutoff: np.ndarray | float, frequency: float = FREQUENCY) -> np.ndarray | float:
    te = 1.0 / frequency
    tau = 1.0 / (2 * np.pi * cutoff)
    return 1.0 / (1.0 + tau / te)


def one_euro(values: np.ndarray, value_scale: np.ndarray | None = None) -> np.ndarray:
    """Filter ``values [T, ...]`` (one tracked run, in order) with MediaPipe's one-euro filter;
    ``value_scale [T]`` multiplies the speed estimate (1 when ``None``)."""
    out = np.empty_like(values, dtype=np.float64)
    if len(values) == 0:
        return out
    p = LANDMARK_FILTER
    a_d = _alpha(p["derivate_cutoff"])
    x_prev = values[0].astype(np.float64)
    dx_prev = np.zeros_like(x_prev)
    out[0] = x_prev
    for t in range(1, len(values)):
        scale = 1.0 if value_scale is None else value_scale[t]
        dx = (values[t] - x_prev) * scale * FREQUENCY
        dx_prev = a_d * dx + (1 - a_d) * dx_prev
        a = _alpha(p["min_cutoff"] + p["beta"] * np.abs(dx_prev))
        x_prev = a * values[t] + (1 - a) * x_prev
        out[t] = x_prev
    return out


def low_pass(values: np.ndarray, alpha: float = VISIBILITY_ALPHA) -> np.ndarray:
    out = np.empty_like(values, dtype=np.float64)
    if len(values):
        out[0] = values[0]
        for t in range(1, len(values)):
            out[t] = alpha * values[t] + (1 - alpha) * out[t - 1]
    return out


def _runs(tracked: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of consecutive tracked frames."""
    edges = np.diff(np.concatenate([[0], tracked.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def smooth_sequence(
    image: np.ndarray, world: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth ``image [T, 33, 4]`` (normalised x, y, z, visibility; NaN rows untracked) and
    ``world [T, 33, 4]`` (metres, visibility) like MediaPipe's tracking graph."""
    width, height = size
    image, world = image.copy(), world.copy()
    tracked = np.isfinite(image).all(axis=(1, 2))
    px = np.array([width, height, width], np.float64)
    for a, b in _runs(tracked):
        xyz = image[a:b, :, :3] * px  # the filter works on pixels
        extent = xyz[..., :2].max(axis=1) - xyz[..., :2].min(axis=1)
        scale = 1.0 / np.maximum(extent.mean(axis=1), 1e-6)  # 1 / mean bbox side
        image[a:b, :, :3] = one_euro(xyz, scale) / px
        vis = low_pass(image[a:b, :, 3])
        image[a:b, :, 3] = vis
        world[a:b, :, :3] = one_euro(world[a:b, :, :3])
        world[a:b, :, 3] = vis
    return image, world
