"""The words of General Movements Assessment every part of the project uses (one vocabulary).

Prechtl's FMs categories, from most to least fidgety movement, and the paper's grouping of them
(Gao, Yao et al. 2023): normal = continuous or intermittent FMs; risk = sporadic or absent FMs.
A result the model cannot speak for has neither: it is ``indeterminate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from mam.skeleton import FPS

FmsCategory = Literal["continuous", "intermittent", "sporadic", "absent"]
FMS_CATEGORIES: tuple[FmsCategory, ...] = ("continuous", "intermittent", "sporadic", "absent")
Group = Literal["normal", "risk"]
GROUPS: tuple[Group, ...] = ("normal", "risk")
GROUP_OF: dict[str, Group] = {
    "continuous": "normal",
    "intermittent": "normal",
    "sporadic": "risk",
    "absent": "risk",
}
INDETERMINATE = "indeterminate"

# A 9.6 s clip shows FMs when P(FMs) exceeds this (the FMs frequency's definition, paper).
FMS_CLIP_THRESHOLD = 0.5


def clip_fms_labels(
    fms_mask: np.ndarray, clips: Sequence, threshold: float = FMS_CLIP_THRESHOLD, fps: float = FPS
) -> tuple[list[bool], list[bool]]:
    """``(annotated, model)`` FMs label per clip: annotated when more than half of the clip's
    frames are FMs in ``fms_mask``, model when its P(FMs) exceeds ``threshold`` (the paper's
    expert annotation rule, Fig. 3b)."""
    annotated, model = [], []
    for c in clips:
        seg = fms_mask[round(c.start_s * fps) : round(c.end_s * fps)]
        annotated.append(bool(seg.size and seg.mean() > 0.5))
        model.append(c.fms_probability > threshold)
    return annotated, model


def clip_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two per-clip FMs labellings; both constant (kappa undefined): 1 when
    they agree, else 0. NaN without clips."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.size == 0:
        return float("nan")
    po = float(np.mean(a == b))
    pa, pb = a.mean(), b.mean()
    pe = float(pa * pb + (1 - pa) * (1 - pb))
    if pe >= 1.0 - 1e-12:
        return 1.0 if po == 1.0 else 0.0
    return (po - pe) / (1 - pe)
