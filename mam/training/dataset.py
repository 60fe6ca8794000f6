"""The training layout a site can produce without code (README, "Training data").

``DIR/infants.csv``: id, file, group (normal/risk), fms_category (optional), sex,
gestational_age_weeks, birth_weight_g, corrected_age_weeks; ``file`` is relative to DIR and is
either a pose file (``.npy``/``.npz`` ``[T, 17, 3]`` at 25 fps) or a recording, whose pose is
estimated once and cached in ``DIR/.pose_cache`` by content hash. ``DIR/fms_intervals.csv``
(optional): id, start_s, end_s of annotated FMs, from which the reference clips are cut.
Every row is checked before training.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mam.errors import InputError
from mam.gma import FMS_CATEGORIES, GROUPS
from mam.pose import fill_gaps, load_pose_file
from mam.pose.base import default_pose_backend
from mam.pose.from_video import cached_video_pose
from mam.schemas import InfantData
from mam.training.train import TrainRecord

POSE_SUFFIXES = (".npy", ".npz")
POSE_CACHE = ".pose_cache"


class DatasetError(InputError):
    code = "invalid_dataset"


def load_dataset(
    root: str | Path, max_gap_s: float = 0.5, pose_backend: str | None = None
) -> list[TrainRecord]:
    pose_backend = pose_backend or default_pose_backend()
    root = Path(root)
    table = root / "infants.csv"
    if not table.is_file():
        raise DatasetError(f"{table} not found")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    intervals: dict[str, list[tuple[float, float]]] = {}
    iv_path = root / "fms_intervals.csv"
    if iv_path.is_file():
        with open(iv_path, newline="") as f:
            for n, r in enumerate(csv.DictReader(f), start=2):
                try:
                    a, b = float(r["start_s"]), float(r["end_s"])
                except (KeyError, ValueError) as e:
                    raise DatasetError(f"fms_intervals.csv line {n}: {e}") from None
                if not 0 <= a < b:
                    raise DatasetError(f"fms_intervals.csv line {n}: need 0 <= start_s < end_s")
                intervals.setdefault(r["id"], []).append((a, b))
    seen: set[str] = set()
    records = []
    for n, r in enumerate(rows, start=2):
        where = f"infants.csv line {n}"
        rid = (r.get("id") or "").strip()
        if not rid:
            raise DatasetError(f"{where}: missing id")
        if rid in seen:
            raise DatasetError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        if r.get("group") not in GROUPS:
            raise DatasetError(f"{where}: group must be one of {GROUPS}, got {r.get('group')!r}")
        category = (r.get("fms_category") or "").strip() or None
        if category is not None and category not in FMS_CATEGORIES:
            raise DatasetError(f"{where}: fms_category must be one of {FMS_CATEGORIES}")
        path = root / (r.get("file") or "")
        if not path.is_file():
            raise DatasetError(f"{where}: file {r.get('file')!r} not found")
        if path.suffix.lower() in POSE_SUFFIXES:
            seq = load_pose_file(path)
        else:
            seq = cached_video_pose(path, root / POSE_CACHE, pose_backend)
        seq = fill_gaps(seq, max_gap_s)
        fields = {
            k: (r.get(k) or None)
            for k in ("sex", "gestational_age_weeks", "birth_weight_g", "corrected_age_weeks")
        }
        try:
            infant = InfantData.parse(**fields)
        except InputError as e:
            raise DatasetError(f"{where}: {e}") from None
        iv = intervals.get(rid)
        if iv and max(b for _, b in iv) > seq.duration_s + 0.05:
            raise DatasetError(f"{where}: an FMs interval ends after the recording")
        records.append(
            TrainRecord(
                infant_id=rid,
                joints=seq.joints,
                group=r["group"],
                fms_intervals_s=(iv or []) if iv_path.is_file() else None,
                info=np.asarray(infant.vector()) if infant else None,
                fms_category=category,
                image_joints=seq.meta.get("image_joints"),
                source=seq.source,
            )
        )
    unknown = set(intervals) - seen
    if unknown:
        raise DatasetError(f"fms_intervals.csv names unknown ids: {sorted(unknown)[:5]}")
    return records


def load_datasets(folders, pose_backend: str | None = None, max_gap_s: float = 0.5):
    """Records of one or more dataset folders (ids must differ across them)."""
    records = [r for d in folders for r in load_dataset(d, max_gap_s, pose_backend)]
    ids = [r.infant_id for r in records]
    if len(set(ids)) != len(ids):
        raise DatasetError("the same infant id appears in more than one dataset folder")
    return records
