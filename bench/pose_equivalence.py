"""Is the ``onnx`` pose backend equivalent to ``mediapipe`` on the screening task?

Screens the same recordings through both backends and compares what a clinician would read:
the classification, the FMs frequency and P(risk). Recordings: the demo, and the first
``--n`` infants (half normal, half risk) of the external rendered set that
``recipes/demo_weights.py generate`` writes (``runs/demo_weights/external``); their pose is cached
per backend next to them, so a second run only screens.

    python bench/pose_equivalence.py [--n 12]

Figures, never assertions; written to ``runs/demo_weights/equivalence.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mam.screening import Screener, ScreeningOptions  # noqa: E402
from mam.training.dataset import load_dataset  # noqa: E402
from mam.training.evaluate import infant_data  # noqa: E402

ROOT = Path("runs/demo_weights")
DEMO = Path(__file__).resolve().parents[1] / "demo" / "infant_demo.mp4"
BACKENDS = ("onnx", "mediapipe")


def _subset(n: int) -> Path:
    """A folder with the first n/2 normal and n/2 risk infants of the external set."""
    src = (ROOT / "external").resolve()
    out = ROOT / f"equivalence_{n}"
    with open(src / "infants.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pick = [r for r in rows if r["group"] == "normal"][: n // 2]
    pick += [r for r in rows if r["group"] == "risk"][: n - len(pick)]
    out.mkdir(parents=True, exist_ok=True)
    for name in ("videos", ".pose_cache"):
        if (src / name).exists() and not (out / name).exists():
            (out / name).symlink_to(src / name)
    with open(out / "infants.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(pick)
    ids = {r["id"] for r in pick}
    with open(src / "fms_intervals.csv", newline="") as f:
        intervals = [r for r in csv.DictReader(f) if r["id"] in ids]
    with open(out / "fms_intervals.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "start_s", "end_s"])
        w.writeheader()
        w.writerows(intervals)
    return out


def _summary(r) -> dict:
    return {
        "classification": r.classification.label,
        "model_label": r.classification.model_label,
        "fms_frequency": r.fms_frequency,
        "risk_probability": r.risk_probability,
        "in_domain": r.domain.in_domain,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=12)
    args = ap.parse_args(argv)
    screeners = {b: Screener(options=ScreeningOptions(pose_backend=b)) for b in BACKENDS}
    out: dict = {"demo": {b: _summary(s.screen_video(DEMO)) for b, s in screeners.items()}}
    print("demo", json.dumps(out["demo"]), flush=True)
    folder = _subset(args.n)
    per = {}
    for b, s in screeners.items():
        for rec in load_dataset(folder, pose_backend=b):
            per.setdefault(rec.infant_id, {"truth": rec.group})[b] = _summary(
                s.screen_pose(rec.pose(), infant_data(rec.info))
            )
    a, m = (np.array([[v[b][k] for v in per.values()] for b in BACKENDS]) for k in
            ("classification", "fms_frequency"))  # fmt: skip
    risk = np.array([[v[b]["risk_probability"] for v in per.values()] for b in BACKENDS])
    out["recordings"] = per
    out["summary"] = {
        "recordings": len(per),
        "same_classification": float(np.mean(a[0] == a[1])),
        "fms_frequency_abs_diff": {"median": float(np.median(np.abs(m[0] - m[1]))),
                                   "max": float(np.max(np.abs(m[0] - m[1])))},
        "risk_probability_abs_diff": {"median": float(np.median(np.abs(risk[0] - risk[1]))),
                                      "max": float(np.max(np.abs(risk[0] - risk[1])))},
        "correct": {b: float(np.mean([v[b]["classification"] == v["truth"]
                                      for v in per.values()])) for b in BACKENDS},
    }  # fmt: skip
    print(json.dumps(out["summary"], indent=1))
    (ROOT / "equivalence.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
