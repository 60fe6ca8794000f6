"""Write simulated infants in the training layout that a site produces (``mam.dataset``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mam.synth.motion import CATEGORIES, SimParams, simulate_infant


def write_dataset(
    out: str | Path,
    infants: int,
    seed: int,
    duration_s: tuple[float, float] = (60.0, 120.0),
    params: SimParams | None = None,
) -> Path:
    """``out/poses/ID.npy`` + ``infants.csv`` + ``fms_intervals.csv``; categories in rotation so
    every group is present. Returns ``out``."""
    out = Path(out)
    (out / "poses").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    params = params or SimParams()
    rows, intervals = [], []
    for i in range(infants):
        infant_id = f"sim{seed:04d}_{i:04d}"
        category = CATEGORIES[i % len(CATEGORIES)]
        sim = simulate_infant(rng, infant_id, category, float(rng.uniform(*duration_s)), params)
        rel = Path("poses") / f"{infant_id}.npy"
        np.save(out / rel, sim.joints)
        rows.append(
            {
                "id": infant_id,
                "file": rel.as_posix(),
                "group": sim.group,
                "fms_category": category,
                "sex": sim.sex,
                "gestational_age_weeks": sim.gestational_age_weeks,
                "birth_weight_g": sim.birth_weight_g,
                "corrected_age_weeks": sim.corrected_age_weeks,
            }
        )
        intervals += [
            {"id": infant_id, "start_s": round(a, 2), "end_s": round(b, 2)}
            for a, b in sim.fms_intervals_s
        ]
    with open(out / "infants.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "fms_intervals.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "start_s", "end_s"])
        w.writeheader()
        w.writerows(intervals)
    return out
