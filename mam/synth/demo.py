"""Render the bundled demo recording from real infant motion.

    python -m mam.synth.demo --out demo/infant_demo.mp4 [--seconds 60]

The motion is the continuous bag ``Data_derivation/FM-/0005`` of the MAM reference
implementation's published demo tensors (github.com/qiang-Blazer/MAM, ``prepared_data/``, MIT
licence, copyright 2023 qiang-Blazer), stitched, put in the camera-aligned frame and retargeted
to infant bone lengths by :mod:`mam.synth.real_motion`. The figure is a synthetic rendering and
the recording carries no clinical label.
"""

from __future__ import annotations

import argparse
import os

from mam.synth.real_motion import DEMO_GROUP, default_data_path, load_demo_motion
from mam.synth.render import render_video

DEMO_SECONDS = 60.0
DEMO_SEED = 1  # seeds camera placement and appearance
DEMO_CRF = 28
DEMO_SIZE = (1280, 720)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render the demo infant recording.")
    ap.add_argument("--out", default="demo/infant_demo.mp4")
    ap.add_argument("--data", default=default_data_path(), help="mam_demo_poses.npz")
    ap.add_argument("--group", default=DEMO_GROUP)
    ap.add_argument("--seconds", type=float, default=DEMO_SECONDS)
    ap.add_argument("--seed", type=int, default=DEMO_SEED)
    ap.add_argument("--crf", type=int, default=DEMO_CRF)
    ap.add_argument("--width", type=int, default=DEMO_SIZE[0])
    ap.add_argument("--height", type=int, default=DEMO_SIZE[1])
    ap.add_argument("--rotation", type=float, default=0.0, help="0, 90, 180 or 270")
    args = ap.parse_args(argv)

    joints = load_demo_motion(args.data, args.group, seconds=args.seconds)
    res = render_video(
        joints,
        args.out,
        width=args.width,
        height=args.height,
        seed=args.seed,
        crf=args.crf,
        rotation_deg=args.rotation,
    )
    size = os.path.getsize(args.out)
    print(
        f"{args.out}: {res.frames} frames {args.width}x{args.height}, {size / 1e6:.2f} MB, "
        f"rendered at {res.fps:.1f} fps"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
