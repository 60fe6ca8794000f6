"""End-to-end cost of screening one recording, split by stage.

Prints seconds per minute of video for decode, pose, features and model, and the ratio of video
time to wall time (>1 means faster than real time). One run, one machine; the figures are
ratios measured together, never assertions.

    python bench/pipeline.py [VIDEO] [--repeat N] [--max-side PX] [--pose-backend onnx]
    python bench/pipeline.py --synth-minutes 5 --size 1920x1080   # 5 min of full HD, the CPU target

``--synth-minutes`` renders a simulated infant (``mam.synth``, real-motion background) of that
length and size once, into ``runs/bench/`` (reused), and screens it. On a GPU machine, set
``MAM_POSE_DEVICE=cuda`` and ``MAM_POSE_RUNTIME`` (``pytorch`` where TensorRT is absent).

With a backend that decodes in its own thread (``onnx``), decode overlaps pose: its row is busy
time of the decode thread, and ``other`` is computed from the pose stage's wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from mam.pose.base import default_pose_backend
from mam.screening import Screener, ScreeningOptions
from mam.video import probe

DEMO = Path(__file__).resolve().parents[1] / "demo" / "infant_demo.mp4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("video", nargs="?", type=Path, default=DEMO)
    ap.add_argument("--repeat", type=int, default=1, help="runs to average")
    ap.add_argument("--max-side", type=int, default=1280, help="decode downscale bound")
    ap.add_argument("--pose-backend", default=default_pose_backend(), help="onnx, mediapipe, ...")
    ap.add_argument("--synth-minutes", type=float, help="render a simulated recording this long")
    ap.add_argument("--size", default="1920x1080", help="its size, WxH")
    args = ap.parse_args()
    if args.synth_minutes:
        args.video = _synth_recording(args.synth_minutes, args.size)

    info = probe(args.video)
    screener = Screener(
        options=ScreeningOptions(max_side=args.max_side, pose_backend=args.pose_backend)
    )
    totals: dict[str, float] = {}
    wall = 0.0
    for _ in range(args.repeat):
        t = time.perf_counter()
        r = screener.screen_video(args.video)
        wall += time.perf_counter() - t
        for k, v in r.timings_s.items():
            totals[k] = totals.get(k, 0.0) + v
    minutes = info.duration_s / 60 * args.repeat
    print(
        f"video: {args.video.name}, {info.width}x{info.height} {info.codec}, "
        f"{info.source_fps:.2f} fps, {info.duration_s:.1f} s; runs: {args.repeat}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, "
        f"runtime {screener.runtime.backend}/{screener.runtime.device}, "
        f"pose {args.pose_backend}"
    )
    print(f"{'stage':<10}{'s per video-minute':>20}{'share':>8}")
    for k in ("decode", "pose", "features", "model"):
        v = totals.get(k, 0.0)
        print(f"{k:<10}{v / minutes:>20.2f}{v / wall:>8.1%}")
    other = wall - sum(totals.get(k, 0.0) for k in ("pose_total", "features", "model"))
    print(f"{'other':<10}{other / minutes:>20.2f}{other / wall:>8.1%}")
    print(f"{'total':<10}{wall / minutes:>20.2f}{1:>8.0%}")
    print(f"real-time factor: {info.duration_s * args.repeat / wall:.2f}x (video s per wall s)")


def _synth_recording(minutes: float, size: str) -> Path:
    import numpy as np

    from mam.synth.backgrounds import load_library
    from mam.synth.motion import SimParams, simulate_infant
    from mam.synth.render import render_video

    w, h = (int(v) for v in size.lower().split("x"))
    out = Path("runs/bench") / f"synth_{minutes:g}min_{w}x{h}.mp4"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(18)
        sim = simulate_infant(rng, "bench", "intermittent", minutes * 60, SimParams(),
                              background=load_library("external"))  # fmt: skip
        t = time.perf_counter()
        render_video(sim.clean_joints, out, width=w, height=h,
                     preset="veryfast")  # fmt: skip
        print(f"rendered {out} in {time.perf_counter() - t:.0f} s")
    return out


if __name__ == "__main__":
    main()
