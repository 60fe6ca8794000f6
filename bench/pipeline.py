"""End-to-end cost of screening one recording, split by stage.

Prints seconds per minute of video for decode, pose, features and model, and the ratio of video
time to wall time (>1 means faster than real time). One run, one machine; the figures are
ratios measured together, never assertions.

    python bench/pipeline.py [VIDEO] [--repeat N] [--max-side PX] [--pose-backend onnx]

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

from mam.screening import Screener, ScreeningOptions
from mam.video import probe

DEMO = Path(__file__).resolve().parents[1] / "demo" / "infant_demo.mp4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("video", nargs="?", type=Path, default=DEMO)
    ap.add_argument("--repeat", type=int, default=1, help="runs to average")
    ap.add_argument("--max-side", type=int, default=1280, help="decode downscale bound")
    ap.add_argument("--pose-backend", default="mediapipe", help="mediapipe, onnx, ...")
    args = ap.parse_args()

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
        f"torch threads {torch.get_num_threads()}, runtime {screener.runtime}/{screener.device}, "
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


if __name__ == "__main__":
    main()
