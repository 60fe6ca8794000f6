"""Pose every Nth frame only, the landmarks interpolated linearly back to every frame.

An opt-in speed candidate (``MAM_POSE_STRIDE``), never the default: fidgety movements are 1-4 Hz,
under the Nyquist limit of 12.5 poses a second, and the features smooth over 5 frames. Whether it
changes the screening answer is for ``bench/screening_equivalence.py`` to say. The default path
reads nothing of it but the unset variable.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

ENV_POSE_STRIDE = "MAM_POSE_STRIDE"


def pose_stride() -> int:
    """``MAM_POSE_STRIDE`` as a whole number >= 1; 1 (every frame posed) where unset."""
    from mam.settings import current

    return current().pose_stride  # a malformed value: InvalidSettingError, an InputError


class Strided:
    """Every ``stride``-th item of ``items`` (the first included); ``seen`` counts them all."""

    def __init__(self, items: Iterable, stride: int) -> None:
        self.items, self.stride, self.seen = items, stride, 0

    def __iter__(self) -> Iterator:
        for i, item in enumerate(self.items):
            self.seen = i + 1
            if i % self.stride == 0:
                yield item


def upsample(x: np.ndarray, stride: int, total: int) -> np.ndarray:
    """``x`` (``[n, ...]``, rows at frames 0, stride, 2 stride, ...) at every one of ``total``
    frames, each value linear between its posed neighbours and held after the last; a frame
    next to an untracked (NaN) one is NaN too, as where the infant was is unknown there."""
    x = np.asarray(x)
    at = np.arange(len(x)) * stride
    t = np.arange(total)
    flat = x.reshape(len(x), -1).astype(np.float64)
    out = np.empty((total, flat.shape[1]))
    for c in range(flat.shape[1]):
        out[:, c] = np.interp(t, at, flat[:, c])
    return out.reshape(total, *x.shape[1:]).astype(x.dtype)
