"""The training layout a site can produce without code (README, "Training data layout").

``DIR/infants.csv``: id, file, group (normal/risk), fms_category (optional), sex,
gestational_age_weeks, birth_weight_g, corrected_age_weeks; ``file`` is relative to DIR and is
either a pose file (``.npy``/``.npz`` ``[T, 17, 3]`` at 25 fps) or a recording, whose pose is
estimated once and cached in ``DIR/.pose_cache`` by content hash. ``DIR/fms_intervals.csv``
(optional): id, start_s, end_s of annotated FMs, from which the reference clips are cut.
``DIR/dataset.json`` (optional): ``{"data": "simulated" | "recordings"}``, what the infants are.

``check_dataset`` reads every row and file of the folders before any pose is estimated and
returns all errors at once (file and line), the spreadsheet conventions it normalised (UTF-8
byte-order mark, ``;`` separator, decimal comma, case and common spellings of the fixed
vocabularies) and what training will do with the data (``Plan``). ``load_datasets`` runs it
first, so ``mam train`` and ``mam evaluate`` fail with every error before posing anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mam.domain import kind_of
from mam.errors import InputError
from mam.gma import FMS_CATEGORIES, GROUPS
from mam.pose import fill_gaps, load_pose_file
from mam.pose.base import PoseSequence, default_pose_backend
from mam.pose.from_video import cached_video_pose
from mam.schemas import InfantData
from mam.spreadsheet import SpreadsheetCSV as _Reader
from mam.training.fitting import (
    InsufficientDataError,
    data_problem,
    data_shortfalls,
    domain_coverage,
    reference_branch,
    stratified_split,
)
from mam.training.train import TrainRecord

POSE_SUFFIXES = (".npy", ".npz")
POSE_CACHE = ".pose_cache"
DECLARATION = "dataset.json"
DECLARED = ("simulated", "recordings")
INFANT_FIELDS = ("sex", "gestational_age_weeks", "birth_weight_g", "corrected_age_weeks")

__all__ = ["DatasetError", "InsufficientDataError", "check_dataset", "load_dataset",
           "load_datasets"]  # fmt: skip


class DatasetError(InputError):
    code = "invalid_dataset"


@dataclass
class InfantRow:
    """One checked row of ``infants.csv``; ``seq`` is the loaded pose of a pose file (None for a
    recording, posed later)."""

    folder: Path
    line: int
    infant_id: str
    path: Path
    group: str
    fms_category: str | None
    infant: InfantData | None
    seq: PoseSequence | None
    intervals: list[tuple[float, float]] | None
    interval_lines: list[int]
    simulated: bool

    @property
    def kind(self) -> str:
        return kind_of(self.seq.source) if self.seq is not None else "video"


@dataclass
class Plan:
    """What training will do with the data: counts only (no identifiers)."""

    groups: dict[str, int]
    kinds: dict[str, dict[str, int]]  # kind -> group -> infants
    with_intervals: int  # infants with at least one FMs interval
    annotated_without: int  # in an fms_intervals.csv folder, but no interval
    unannotated: int  # in a folder without fms_intervals.csv
    reference_branch: str
    calibration_fraction: float
    held_out: dict[str, int]  # group -> infants held out to calibrate
    domain: dict[str, dict[str, int]]  # kind -> {"train": n, "held_out": n}
    coverage: dict[str, str]
    declared: dict[str, int]
    problem: str | None  # why training is impossible
    shortfalls: list[str]  # below the documented minimums

    @property
    def infants(self) -> int:
        return sum(self.groups.values())

    def lines(self) -> list[str]:
        g = self.groups
        out = [f"infants: {self.infants} ({g['normal']} normal, {g['risk']} risk)"]
        for kind, n in self.kinds.items():
            out.append(f"  {kind}: {sum(n.values())} ({n['normal']} normal, {n['risk']} risk)")
        out.append(
            f"FMs intervals: {self.with_intervals} infants with, {self.annotated_without} "
            f"annotated without any, {self.unannotated} not annotated"
        )
        out.append(f"reference branch: {self.reference_branch}")
        h = self.held_out
        out.append(
            f"calibration hold-out (fraction {self.calibration_fraction:g}): "
            f"{sum(h.values())} infants ({h['normal']} normal, {h['risk']} risk)"
        )
        for kind, n in self.domain.items():
            out.append(f"domain check, {kind}: {n['train']} training and {n['held_out']} "
                       f"held-out recordings; {self.coverage[kind]}")  # fmt: skip
        out.append(f"declared: {self.declared['simulated']} simulated, "
                   f"{self.declared['recordings']} recordings")  # fmt: skip
        if self.problem:
            out.append(f"cannot train: {self.problem}")
        for s in self.shortfalls:
            out.append(f"below the documented minimum: {s}")
        return out


@dataclass
class DatasetReport:
    """Every error (file and line), every normalisation, notes, and the plan (None while there
    are errors)."""

    errors: list[str] = field(default_factory=list)
    normalisations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: list[InfantRow] = field(default_factory=list)
    plan: Plan | None = None

    def raise_for_errors(self) -> None:
        if self.errors:
            n = len(self.errors)
            raise DatasetError(
                f"{n} problem{'s' if n > 1 else ''} in the training data (all listed):\n"
                + "\n".join(f"  {e}" for e in self.errors)
            )

    def lines(self) -> list[str]:
        out = [f"normalised: {s}" for s in self.normalisations]
        out += [f"note: {s}" for s in self.notes]
        return out + (self.plan.lines() if self.plan else [])


def _declaration(folder: Path, label: str, report: DatasetReport) -> bool:
    """Whether the folder declares its infants simulated (``dataset.json``)."""
    path = folder / DECLARATION
    if not path.is_file():
        report.notes.append(
            f"{label}: no {DECLARATION}: the data were not declared; they count as recordings "
            '(write {"data": "recordings"} or {"data": "simulated"})'
        )
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig")).get("data")
    except (ValueError, AttributeError):
        data = None
    if data not in DECLARED:
        report.errors.append(f'{label}/{DECLARATION}: expected {{"data": "simulated"}} or '
                             '{"data": "recordings"}')  # fmt: skip
        return False
    return data == "simulated"


def _pose_file(path: Path) -> tuple[PoseSequence | None, str | None]:
    try:
        return load_pose_file(path), None
    except InputError as e:
        return None, e.message.replace(str(path), "the file")


def _check_folder(folder: Path, label: str, report: DatasetReport) -> list[InfantRow]:
    table = folder / "infants.csv"
    if not folder.is_dir():
        report.errors.append(f"{label}: not a folder")
        return []
    if not table.is_file():
        report.errors.append(f"{label}/infants.csv: not found (every dataset folder needs one)")
        return []
    simulated = _declaration(folder, label, report)
    reader = _Reader(table, f"{label}/infants.csv", report)
    rows: list[InfantRow] = []
    first_line: dict[str, int] = {}
    for line, r in reader.rows(("id", "file", "group")):
        ok = True
        rid = reader.value(r, "id")
        if rid is None:
            reader.error(line, "missing id")
            ok = False
        elif rid in first_line:
            reader.error(line, f"duplicate id (first on line {first_line[rid]})")
            ok = False
        else:
            first_line[rid] = line
        group = reader.value(r, "group")
        if group not in GROUPS:
            reader.error(line, f"group must be one of {', '.join(GROUPS)}, got {group!r}")
            ok = False
        category = reader.value(r, "fms_category")
        if category is not None and category not in FMS_CATEGORIES:
            reader.error(line, f"fms_category must be empty or one of "
                               f"{', '.join(FMS_CATEGORIES)}, got {category!r}")  # fmt: skip
            ok = False
        fields: dict[str, object] = {}
        numbers_ok = True
        for col in INFANT_FIELDS:
            v = reader.value(r, col)
            if v is not None and col != "sex":
                try:
                    v = float(v)
                except ValueError:
                    reader.error(line, f"{col} must be a number, got {v!r}")
                    numbers_ok = False
            fields[col] = v
        infant = None
        try:
            infant = InfantData.parse(**fields) if numbers_ok else None
        except InputError as e:
            reader.error(line, str(e))
            ok = False
        ok = ok and numbers_ok
        seq = None
        file = reader.value(r, "file")
        path = folder / (file or "")
        if file is None:
            reader.error(line, "file is missing")
            ok = False
        elif not path.is_file():
            reader.error(line, f"file {file!r} not found")
            ok = False
        elif path.stat().st_size == 0:
            reader.error(line, f"file {file!r} is empty")
            ok = False
        elif path.suffix.lower() in POSE_SUFFIXES:
            seq, why = _pose_file(path)
            if why:
                reader.error(line, f"file {file!r}: {why}")
                ok = False
        if ok:
            rows.append(InfantRow(folder, line, rid, path, group, category, infant, seq, None,
                                  [], simulated))  # fmt: skip
    reader.report_counts()
    iv_path = folder / "fms_intervals.csv"
    if not iv_path.is_file():
        report.notes.append(f"{label}: no fms_intervals.csv: no reference clips from this folder")
        return rows
    by_id = {row.infant_id: row for row in rows}
    for row in rows:
        row.intervals = []
    reader = _Reader(iv_path, f"{label}/fms_intervals.csv", report)
    for line, r in reader.rows(("id", "start_s", "end_s")):
        rid = reader.value(r, "id")
        a, b = reader.number(r, "start_s", line), reader.number(r, "end_s", line)
        if rid is None:
            reader.error(line, "missing id")
            continue
        if rid not in first_line:
            reader.error(line, "unknown id (not in infants.csv)")
            continue
        if a is None or b is None:
            continue
        if not 0 <= a < b:
            reader.error(line, "need 0 <= start_s < end_s")
            continue
        row = by_id.get(rid)
        if row is None:  # its infants.csv row has an error of its own
            continue
        if row.seq is not None and b > row.seq.duration_s + 0.05:
            reader.error(line, f"the interval ends after the recording ({row.seq.duration_s:.1f} "
                               "s)")  # fmt: skip
            continue
        row.intervals.append((a, b))
        row.interval_lines.append(line)
    reader.report_counts()
    return rows


def _plan(rows: Sequence[InfantRow], fraction: float, seed: int, use_reference: bool) -> Plan:
    groups = [r.group for r in rows]
    kinds = [r.kind for r in rows]
    held = (
        stratified_split(groups, fraction, seed) if fraction > 0 and rows
        else np.zeros(len(rows), bool)
    )  # fmt: skip
    g, k = np.asarray(groups), np.asarray(kinds)
    tr_k, ho_k = k[~held].tolist(), k[held].tolist()
    return Plan(
        groups={x: int((g == x).sum()) for x in GROUPS},
        kinds={
            kind: {x: int(((k == kind) & (g == x)).sum()) for x in GROUPS}
            for kind in sorted(set(kinds))
        },  # fmt: skip
        with_intervals=sum(bool(r.intervals) for r in rows),
        annotated_without=sum(r.intervals == [] for r in rows),
        unannotated=sum(r.intervals is None for r in rows),
        reference_branch=reference_branch([r.intervals for r in rows], use_reference),
        calibration_fraction=fraction,
        held_out={x: int((g[held] == x).sum()) for x in GROUPS},
        domain={
            kind: {"train": tr_k.count(kind), "held_out": ho_k.count(kind)}
            for kind in ("video", "pose_file")
        },  # fmt: skip
        coverage=domain_coverage(tr_k, ho_k),
        declared={
            "simulated": sum(r.simulated for r in rows),
            "recordings": sum(not r.simulated for r in rows),
        },  # fmt: skip
        problem=data_problem(groups, held),
        shortfalls=data_shortfalls(groups, kinds, held),
    )


def check_dataset(
    folders: Sequence[str | Path],
    calibration_fraction: float = 0.2,
    seed: int = 0,
    use_reference: bool = True,
) -> DatasetReport:
    """Check every row and file of the dataset folders without estimating any pose (pose files
    are read and validated, recordings only found); the plan assumes ``mam train``'s split."""
    report = DatasetReport()
    seen: dict[str, str] = {}
    for folder in folders:
        folder = Path(folder)
        label = str(folder).rstrip("/") or "."
        for row in _check_folder(folder, label, report):
            if row.infant_id in seen:
                report.errors.append(
                    f"{label}/infants.csv line {row.line}: the same id is in {seen[row.infant_id]}"
                    " (ids must differ across dataset folders)"
                )
                continue
            seen[row.infant_id] = f"{label}/infants.csv line {row.line}"
            report.rows.append(row)
    if not report.errors:
        report.plan = _plan(report.rows, calibration_fraction, seed, use_reference)
    return report


def check_trainable(plan: Plan, accept_small_data: bool) -> None:
    """``InsufficientDataError`` when training is impossible, or below the documented minimums
    and not accepted."""
    if plan.problem:
        raise InsufficientDataError(plan.problem)
    if plan.shortfalls and not accept_small_data:
        raise InsufficientDataError(
            "below the documented minimum sizes: " + "; ".join(plan.shortfalls)
            + " (add infants, or pass --accept-small-data to train anyway: the weights record it"
            " and every result carries a warning)"
        )  # fmt: skip


def load_datasets(
    folders: Sequence[str | Path],
    pose_backend: str | None = None,
    max_gap_s: float = 0.5,
    report: DatasetReport | None = None,
) -> list[TrainRecord]:
    """Records of one or more dataset folders (ids must differ across them), after
    ``check_dataset`` (or the ``report`` it gave) found no error."""
    report = report if report is not None else check_dataset(folders)
    report.raise_for_errors()
    pose_backend = pose_backend or default_pose_backend()
    records, late = [], []
    for row in report.rows:
        seq = row.seq
        if seq is None:
            seq = cached_video_pose(row.path, row.folder / POSE_CACHE, pose_backend)
            for a_b, line in zip(row.intervals or [], row.interval_lines):
                if a_b[1] > seq.duration_s + 0.05:
                    late.append(f"{row.folder}/fms_intervals.csv line {line}: the interval ends "
                                f"after the recording ({seq.duration_s:.1f} s)")  # fmt: skip
        seq = fill_gaps(seq, max_gap_s)
        records.append(
            TrainRecord(
                infant_id=row.infant_id,
                joints=seq.joints,
                group=row.group,
                fms_intervals_s=row.intervals,
                info=np.asarray(row.infant.vector()) if row.infant else None,
                fms_category=row.fms_category,
                image_joints=seq.meta.get("image_joints"),
                source=seq.source,
                simulated=row.simulated,
            )
        )
    DatasetReport(errors=late).raise_for_errors()
    return records


def load_dataset(
    root: str | Path, max_gap_s: float = 0.5, pose_backend: str | None = None
) -> list[TrainRecord]:
    return load_datasets([root], pose_backend, max_gap_s)
