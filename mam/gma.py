"""The words of General Movements Assessment every part of the project uses (one vocabulary).

Prechtl's FMs categories, from most to least fidgety movement, and the paper's grouping of them
(Gao, Yao et al. 2023): normal = continuous or intermittent FMs; risk = sporadic or absent FMs.
A result the model cannot speak for has neither: it is ``indeterminate``.
"""

from __future__ import annotations

from typing import Literal

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
