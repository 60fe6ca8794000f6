"""Write simulated infants in the training layout that a site produces (``mam.training.dataset``).

Pose files by default; with ``render`` every infant becomes a recording (``mam.synth.render``)
whose pose the pipeline estimates like any other video, so weights can learn what the pose model
really produces rather than clean simulator joints. Ground truth stays in ``infants.csv`` /
``fms_intervals.csv``; the rendered truth (clean 3D joints, their 2D projection, the FMs mask)
goes to ``truth/ID.npz`` for measuring the pose stage.
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mam.synth.motion import CATEGORIES, SimParams, SimulatedInfant, simulate_infant

Background = Literal["simulated", "real"]


@dataclass(frozen=True)
class RenderSpec:
    """How recordings are rendered: frame sizes drawn per infant, encoder quality."""

    sizes: tuple[tuple[int, int], ...] = ((960, 540),)
    crf: int = 28

    @classmethod
    def parse(cls, text: str, crf: int = 28) -> RenderSpec:
        """``"640x360,960x540"`` -> sizes."""
        try:
            sizes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(","))
        except ValueError:
            raise ValueError(f"expected sizes like 960x540[,1280x720]; got {text!r}") from None
        if not sizes or any(len(s) != 2 or s[0] % 2 or s[1] % 2 or min(s) < 64 for s in sizes):
            raise ValueError(f"sizes must be even WIDTHxHEIGHT of at least 64 px; got {text!r}")
        return cls(sizes, crf)  # type: ignore[arg-type]


def _render_one(job: tuple) -> None:
    from mam.synth.render import render_video

    clean, mask, video, truth, size, seed, crf = job
    res = render_video(clean, video, width=size[0], height=size[1], seed=seed, crf=crf)
    np.savez_compressed(truth, clean_joints=clean, keypoints_2d=res.keypoints_2d, fms_mask=mask)


def write_dataset(
    out: str | Path,
    infants: int,
    seed: int,
    duration_s: tuple[float, float] = (60.0, 120.0),
    params: SimParams | None = None,
    *,
    background: Background = "simulated",
    pool: str = "train",
    render: RenderSpec | None = None,
    workers: int = 1,
    prefix: str = "sim",
) -> Path:
    """``out/poses/ID.npy`` (or ``out/videos/ID.mp4`` with ``render``) + ``infants.csv`` +
    ``fms_intervals.csv``; categories in rotation so every group is present. ``background``
    ``"real"`` draws each infant's movement background from the real-motion ``pool``
    (``mam.synth.backgrounds``). Simulation is sequential and seeded, rendering runs in
    ``workers`` processes, so the data do not depend on the number of workers. Returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    params = params or SimParams()
    library = None
    if background == "real":
        from mam.synth.backgrounds import load_library

        library = load_library(pool)  # type: ignore[arg-type]
    elif background != "simulated":
        raise ValueError(f"background must be 'simulated' or 'real', got {background!r}")
    rows, intervals, jobs = [], [], []
    for i in range(infants):
        infant_id = f"{prefix}{seed:04d}_{i:04d}"
        category = CATEGORIES[i % len(CATEGORIES)]
        sim: SimulatedInfant = simulate_infant(
            rng, infant_id, category, float(rng.uniform(*duration_s)), params, background=library
        )
        if render is None:
            rel = Path("poses") / f"{infant_id}.npy"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(out / rel, sim.joints)
        else:
            rel = Path("videos") / f"{infant_id}.mp4"
            size = render.sizes[int(rng.integers(len(render.sizes)))]
            for d in ("videos", "truth"):
                (out / d).mkdir(parents=True, exist_ok=True)
            jobs.append((sim.clean_joints, sim.fms_mask, str(out / rel),
                         str(out / "truth" / f"{infant_id}.npz"), size,
                         int(rng.integers(1 << 31)), render.crf))  # fmt: skip
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
    out.mkdir(parents=True, exist_ok=True)
    if jobs:
        todo = [j for j in jobs if not (os.path.isfile(j[2]) and os.path.isfile(j[3]))]
        if workers > 1:
            with ProcessPoolExecutor(workers) as ex:
                list(ex.map(_render_one, todo))
        else:
            for j in todo:
                _render_one(j)
    with open(out / "infants.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "fms_intervals.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "start_s", "end_s"])
        w.writeheader()
        w.writerows(intervals)
    # What the infants are, for the weights' provenance and model card (mam.training.dataset).
    (out / "dataset.json").write_text(json.dumps({"data": "simulated"}) + "\n")
    return out
