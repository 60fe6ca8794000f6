"""The whole ``mam screen`` command, start-up included, as a user runs it (the time a user waits).

Runs ``python -m mam screen RECORDING --pose-backend B --format json`` in a fresh process for
each backend, alternating rounds so that load from other processes on a shared machine hits
both alike, and prints per backend the median wall seconds, the real-time factor (recording
seconds / wall seconds), the pose stage's share and the seconds outside the pipeline's own timings
(interpreter, imports, weights, writing the result); then the ratio of the two in the same run,
which is the figure that carries across machines (absolute seconds on a shared 2-core machine
vary by up to 2x from one minute to the next).

    python bench/screen_command.py [RECORDING] [--repeat 3] [--backends onnx mediapipe]

One run, one machine: the figures are ratios measured together, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "infant_demo.mp4"


def screen_once(video: Path, backend: str) -> tuple[float, dict]:
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "mam", "screen", str(video), "--pose-backend", backend,
         "--format", "json"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    return time.perf_counter() - t, json.loads(out.stdout)


def pipeline_s(timings: dict[str, float]) -> float:
    """Seconds inside the screening pipeline from ``timings_s``: pose (its wall time, decoding
    included), features and model."""
    return sum(timings.get(k, 0.0) for k in ("pose_total", "features", "model"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("video", nargs="?", type=Path, default=DEMO)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["onnx", "mediapipe"])
    args = ap.parse_args(argv)
    from mam.video import probe

    duration = probe(args.video).duration_s
    print(f"{args.video.name}: {duration:.0f} s recording, {os.cpu_count()} CPUs, "
          f"{args.repeat} alternating rounds")  # fmt: skip
    walls: dict[str, list[float]] = {b: [] for b in args.backends}
    last: dict[str, dict] = {}
    for _ in range(args.repeat):
        for b in args.backends:
            wall, result = screen_once(args.video, b)
            walls[b].append(wall)
            last[b] = result
    rows = {}
    for b in args.backends:
        wall = statistics.median(walls[b])
        t = last[b]["timings_s"]
        rows[b] = {
            "wall_s": round(wall, 2),
            "rounds_s": [round(w, 2) for w in walls[b]],
            "x_real_time": round(duration / wall, 2),
            "pose_share": round(t["pose_total"] / wall, 3),
            # Whatever the pipeline's own timings leave out: interpreter, imports, weights,
            # probing and writing the result (the last round's).
            "outside_pipeline_s": round(walls[b][-1] - pipeline_s(t), 2),
            "classification": last[b]["classification"]["label"],
        }
        print(f"{b:10s} median {wall:6.2f} s ({duration / wall:4.2f}x real time; rounds "
              f"{', '.join(f'{w:.1f}' for w in walls[b])}); pose {t['pose_total']:.1f} s, "
              f"start-up and output {rows[b]['outside_pipeline_s']:.2f} s; "
              f"answer {rows[b]['classification']}")  # fmt: skip
    if len(args.backends) == 2:
        a, b = args.backends
        ratio = statistics.median(walls[b]) / statistics.median(walls[a])
        rows["ratio"] = round(ratio, 2)
        print(f"{a} is {ratio:.2f}x faster than {b}, whole command, same run")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
