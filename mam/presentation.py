"""How numbers are shown to people, one way everywhere: the CLI's text, the batch report, the
review app and the output formats (``mam.formats``) all format a probability and a recording
time through here, so a page and a terminal never disagree about the same result."""

from __future__ import annotations

import math

__all__ = ["mmss", "mmss_tenths", "probability"]


def probability(x: float | None) -> str:
    """Three decimals, without printing a tiny probability as if it were zero (``<0.001``) or a
    near-certain one as if it were certain (``>0.999``); ``""`` for no value. Plain text: a Jinja
    template escapes the ``<`` and ``>`` itself."""
    if x is None:
        return ""
    return "<0.001" if x < 0.0005 else ">0.999" if x >= 0.9995 else f"{x:.3f}"  # never "1.000"


def mmss(seconds: float, up: bool = False) -> str:
    """``mm:ss`` (``h:mm:ss`` from an hour), rounded down, or up with ``up`` (a clip's end, so
    the span shown always covers the clip)."""
    s = math.ceil(seconds - 1e-9) if up else math.floor(seconds + 1e-9)
    h, rest = divmod(max(0, s), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def mmss_tenths(seconds: float) -> str:
    """``mm:ss.t``: the running time burnt into a review clip's frames."""
    s = int(seconds)
    return f"{s // 60:02d}:{s % 60:02d}.{int(round((seconds - s) * 10)) % 10}"
