"""Where the CPU path spends its time, by stage, and what each knob buys.

Screens one recording with the ``onnx`` pose backend under several settings and prints, per
setting: frames per second through pose, the busy share of each stage (decoding in its thread;
detector, crops, landmark network and landmark decoding in the pose thread; the rest: smoothing,
swap repair, mapping, features, model) and what the result says (FMs frequency, category,
classification, and the mean 2D distance of the joints from the first setting's, in pixels of
the recording), so that a faster setting is only taken when the screening does not change.
Parts in parallel add their threads' busy seconds, so their shares can sum past 1.

    python bench/cpu_path.py [VIDEO] [--repeat 2]

One run, one machine: the figures are ratios measured together, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mam.pose import create_backend  # noqa: E402
from mam.pose.base import backend_class  # noqa: E402
from mam.pose.from_video import estimate_video_pose  # noqa: E402
from mam.screening import Screener, ScreeningOptions  # noqa: E402
from mam.video import probe  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "demo" / "infant_demo.mp4"
# name: (decode max side, ONNX threads, detect every N frames, landmark batch, parts: None for
# one pass, else the parts posed at once). The first is 0.3.0's path, the last today's default.
SETTINGS = {
    "0.3.0: one pass, 2 ONNX threads": (1280, 2, 50, 4, None),
    "one pass, 1 thread": (1280, 1, 50, 4, None),
    "decode at 640 px": (640, 2, 50, 4, None),
    "detect every 100": (1280, 2, 100, 4, None),
    "batch 8": (1280, 2, 50, 8, None),
    "30 s parts one after another, 2 threads": (1280, 2, 50, 4, 1),
    "30 s parts, 2 at once x 1 thread (default)": (1280, 1, 50, 4, 2),
}


def run(video, max_side, threads, detect_every, batch, parallel, screener):
    def make():
        return create_backend("onnx", threads=threads, detect_every=detect_every,
                              batch_size=batch)  # fmt: skip

    t = time.perf_counter()
    if parallel is None:
        seq, timings = estimate_video_pose(video, make(), max_side=max_side, part_frames=None)
    elif parallel == 1:
        seq, timings = estimate_video_pose(video, make(), max_side=max_side)
    else:
        with ThreadPoolExecutor(parallel) as pool:
            part_frames = backend_class("onnx").part_frames
            seq, timings = estimate_video_pose(video, make, max_side=max_side, executor=pool,
                                               part_frames=part_frames)  # fmt: skip
    wall = time.perf_counter() - t
    t = time.perf_counter()
    r = screener.screen_pose(seq, timings=timings)
    rest = time.perf_counter() - t
    return seq, timings, wall, rest, r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("video", nargs="?", type=Path, default=DEMO)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    info = probe(args.video)
    screener = Screener(options=ScreeningOptions(pose_backend="onnx"))
    print(f"{args.video.name}: {info.width}x{info.height}, {info.duration_s:.0f} s, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    ref = None
    rows = {}
    for name, setting in SETTINGS.items():
        best = None
        for _ in range(args.repeat):
            out = run(args.video, *setting, screener)
            best = out if best is None or out[2] < best[2] else best
        seq, timings, wall, rest, r = best
        img = seq.meta["image_joints"] * (info.width / seq.meta["image_size"][0])
        if ref is None:
            ref = img
        px = float(np.nanmean(np.linalg.norm(img - ref, axis=-1)))
        sec = seq.meta["stats"]["seconds"]
        total = wall + rest
        busy = {"decode (own thread)": timings.get("decode", 0.0), **sec}
        busy["other pose work"] = max(wall - sum(sec.values()), 0.0)
        busy["features + model"] = rest
        rows[name] = {
            "frames_per_s": round(seq.num_frames / wall, 1),
            "real_time_factor": round(info.duration_s / total, 2),
            "share": {k: round(v / total, 3) for k, v in busy.items()},
            "detections": seq.meta["stats"]["detections"],
            "fms_frequency": r.fms_frequency,
            "fms_category": r.fms_category,
            "classification": r.classification.model_label,
            "mean_px_from_first": round(px, 2),
        }
        print(name, json.dumps(rows[name]), flush=True)
    Path("runs").mkdir(exist_ok=True)
    Path("runs/cpu_path.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
