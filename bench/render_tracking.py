"""How well BlazePose tracks a rendered infant: detection rate and 2D error vs ground truth.

Renders real infant motion (``mam.synth.real_motion``) with ``mam.synth.render`` (or re-uses a
video rendered by ``mam.synth.demo`` with the same settings), runs MediaPipe BlazePose (legacy
solutions API, full model, tracking mode) and compares its 13 directly matching landmarks with
the exact projection of the rendered joints.

    python bench/render_tracking.py --video demo/infant_demo.mp4        # measure the demo
    python bench/render_tracking.py --seconds 20 --seed 3 --rotation 90  # render, then measure
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mam.synth import demo
from mam.synth.real_motion import DEMO_GROUP, default_data_path, load_demo_motion
from mam.synth.render import make_camera, project, render_video, run_blazepose, tracking_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=default_data_path())
    ap.add_argument("--group", default=DEMO_GROUP)
    ap.add_argument("--video", help="measure this video (rendered with the same settings)")
    ap.add_argument("--seconds", type=float, default=demo.DEMO_SECONDS)
    ap.add_argument("--start", type=float, default=0.0, help="skip this many seconds of motion")
    ap.add_argument("--seed", type=int, default=demo.DEMO_SEED)
    ap.add_argument("--rotation", type=float, default=0.0)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--crf", type=int, default=demo.DEMO_CRF)
    args = ap.parse_args(argv)

    joints = load_demo_motion(args.data, args.group, seconds=args.start + args.seconds)
    joints = joints[round(args.start * 25) :]
    cam = make_camera(joints, args.width, args.height, seed=args.seed, rotation_deg=args.rotation)
    gt = project(joints, cam)
    info: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.video
        if path is None:
            path = os.path.join(tmp, "render.mp4")
            res = render_video(joints, path, camera=cam, seed=args.seed, crf=args.crf)
            info["render_fps"] = round(res.fps, 1)
            info["size_mb"] = round(os.path.getsize(path) / 1e6, 2)
        t0 = time.perf_counter()
        lm = run_blazepose(path)
        info["blazepose_fps"] = round(len(lm) / (time.perf_counter() - t0), 1)
    rep = tracking_report(lm, gt)
    print(json.dumps({**info, **{k: round(v, 4) for k, v in rep.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
