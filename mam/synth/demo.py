"""Render the bundled demo recording from real infant motion.

    mam synth demo --out demo/infant_demo.mp4 [--seconds 60]
    python -m mam.synth.demo --out demo/infant_demo.mp4       # the same command

The motion is the continuous bag ``Data_derivation/FM-/0005`` of the MAM reference
implementation's published demo tensors (github.com/qiang-Blazer/MAM, ``prepared_data/``, MIT
licence, copyright 2023 qiang-Blazer), stitched, put in the camera-aligned frame and retargeted
to infant bone lengths by :mod:`mam.synth.real_motion`. The figure is a synthetic rendering and
the recording carries no clinical label.
"""

from __future__ import annotations

import os

from mam.synth.real_motion import DEMO_GROUP, default_data_path, load_demo_motion
from mam.synth.render import RenderResult, render_video

DEMO_SECONDS = 60.0
DEMO_SEED = 1  # seeds camera placement and appearance
DEMO_CRF = 28
DEMO_SIZE = (1280, 720)


def render_demo(
    out: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    group: str | None = None,
    seconds: float | None = None,
    seed: int | None = None,
    crf: int | None = None,
    width: int | None = None,
    height: int | None = None,
    rotation: float = 0.0,
) -> RenderResult:
    """Render the demo recording to ``out``; a parameter left ``None`` takes the value the
    shipped recording was made with (``DEMO_*``, motion from :func:`default_data_path`)."""
    joints = load_demo_motion(
        data or default_data_path(),
        group or DEMO_GROUP,
        seconds=DEMO_SECONDS if seconds is None else seconds,
    )
    return render_video(
        joints,
        str(out),
        width=width or DEMO_SIZE[0],
        height=height or DEMO_SIZE[1],
        seed=DEMO_SEED if seed is None else seed,
        crf=DEMO_CRF if crf is None else crf,
        rotation_deg=rotation,
    )


if __name__ == "__main__":
    import sys

    from mam.cli import main

    raise SystemExit(main(["synth", "demo", *sys.argv[1:]]))
