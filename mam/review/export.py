"""Reviewers' judgements -> the training layout ``mam train --data`` reads, and the agreement
report.

``export_annotations(catalog, store, OUT)`` writes, for every recording whose review is marked
done (with a category and a group):

* ``OUT/infants.csv``: ``id, file, group, fms_category, sex, gestational_age_weeks,
  birth_weight_g, corrected_age_weeks`` (the infant data the batch run was given, if any);
* ``OUT/fms_intervals.csv``: ``id, start_s, end_s``, the reviewer's FMs intervals;
* ``OUT/poses/<rid>.npz`` (a video: the pose the model saw, as ``mam batch`` kept it, estimated
  again only where it kept none (:mod:`mam.review.pose`); with its 2D image joints, so every
  pose representation can be trained, and the backend that made it, so ``mam train`` takes it
  as the ``video`` kind and the weights' domain check knows recordings of that kind) or
  ``OUT/poses/<rid>.npy`` (a pose file: copied, the ``pose_file`` kind);
* ``OUT/dataset.json``: ``{"data": "recordings", ...}``, the declaration ``mam train`` records in
  the weights (real recordings, not simulated ones; ``mam synth`` writes ``"simulated"``), with
  the exported recordings per source kind;
* ``OUT/agreement.csv`` and ``agreement.json``: the reviewer against the model per recording
  (:mod:`mam.review.agreement`), and ``OUT/export.json``: counts, and the recordings left out
  with the reason.

File names are hashes, never paths; ``id`` is the ledger's id (the site's own key, which the
training data need). The folder is built beside ``OUT`` and renamed into place, so it is either
complete or absent, and checked with :func:`mam.training.dataset.load_dataset` (the loader of
``mam train``) where the training extra is installed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mam.review.agreement import agreement_row, summarise
from mam.review.catalog import Catalog
from mam.review.pose import PoseUnavailable, pose_for_export
from mam.review.store import ReviewStore

logger = logging.getLogger(__name__)

INFANT_COLUMNS = ("id", "file", "group", "fms_category", "sex", "gestational_age_weeks",
                  "birth_weight_g", "corrected_age_weeks")  # fmt: skip
DATASET_JSON = "dataset.json"
AGREEMENT_COLUMNS = ("id", "clips", "reviewer_fms_clips", "model_fms_clips", "clip_agreement",
                     "kappa", "verdicts", "verdicts_agree", "reviewer_category", "model_category",
                     "reviewer_group", "model_label", "model_usable", "category_agrees",
                     "group_agrees")  # fmt: skip


class ExportError(Exception):
    pass


@dataclass
class ExportSummary:
    out: Path
    exported: int = 0
    groups: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)  # mam.domain.kind_of -> recordings
    intervals: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"id", "reason"}
    agreement: dict = field(default_factory=dict)
    validated: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "exported": self.exported, "groups": self.groups, "kinds": self.kinds,
            "intervals": self.intervals,
            "skipped": self.skipped, "agreement": self.agreement, "validated": self.validated,
            "seconds": round(self.seconds, 2),
        }  # fmt: skip


def _csv(rows: list[dict], columns) -> bytes:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, columns)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def _frames(pose_file: Path) -> int:
    with open(pose_file, "rb") as f:
        head = f.read(2)
    if head == b"PK":
        with np.load(pose_file, allow_pickle=False) as z:
            return int(z["joints"].shape[0])
    return int(np.load(pose_file, mmap_mode="r", allow_pickle=False).shape[0])


def _kind(pose_file: Path) -> str:
    """The source kind ``mam train`` will take an exported pose file as (``mam.domain``)."""
    from mam.domain import kind_of
    from mam.pose.precomputed import SOURCE

    source = SOURCE
    if pose_file.suffix == ".npz":
        with np.load(pose_file, allow_pickle=False) as z:
            if "source" in z.files:
                source = str(z["source"])
    return kind_of(source)


def export_annotations(
    catalog: Catalog,
    store: ReviewStore,
    out: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Write the training layout and the agreement report to ``out`` (new or empty)."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError("the export folder exists and is not empty; choose a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part-{uuid.uuid4().hex[:8]}")
    (tmp / "poses").mkdir(parents=True)
    summary = ExportSummary(out)
    try:
        _write(catalog, store, tmp, summary, progress)
        summary.validated = _validate(tmp)
        summary.seconds = time.perf_counter() - t0
        (tmp / "export.json").write_text(json.dumps(summary.as_dict(), indent=2))
        (tmp / DATASET_JSON).write_text(json.dumps(
            {"data": "recordings", "written_by": "mam review --export",
             "kinds": dict(sorted(summary.kinds.items()))}, indent=2))  # fmt: skip
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("review export: %d recordings, %d left out", summary.exported,
                len(summary.skipped))  # fmt: skip
    return summary


def _write(catalog, store, tmp: Path, summary: ExportSummary, progress) -> None:
    states = store.summaries()
    recs = [r for r in catalog.all() if states.get(r.rid, {}).get("state") == "done"]
    infants, intervals, agreement = [], [], []
    used_ids: set[str] = set()
    for n, rec in enumerate(recs, start=1):
        if progress:
            progress(n - 1, len(recs))
        ann = store.annotation(rec.rid)
        fields = {k: v["value"] for k, v in ann["fields"].items()}

        def skip(reason: str, rec=rec) -> None:
            summary.skipped.append({"id": rec.id, "reason": reason})

        if not fields.get("category") or not fields.get("group"):
            skip("marked done without a final category and group")
            continue
        if rec.status != "done" or rec.sha256 is None:
            skip("not screened, so there is no pose the model saw")
            continue
        result = rec.result()
        try:
            if rec.kind == "pose":
                src = catalog.locate(rec)
                if src is None:
                    raise PoseUnavailable("recording_missing", catalog.why_missing(rec))
                rel = f"poses/{rec.rid}{src.suffix.lower()}"
                shutil.copyfile(src, tmp / rel)
            else:
                backend = result.model.pose_backend
                cached = pose_for_export(catalog.out_dir, catalog.locate(rec), rec.sha256,
                                         backend)  # fmt: skip
                rel = f"poses/{rec.rid}.npz"
                shutil.copyfile(cached, tmp / rel)
            duration = _frames(tmp / rel) / 25.0
        except PoseUnavailable as e:
            skip(f"{e.code}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - one recording must not stop the export
            skip(f"{getattr(e, 'code', 'internal_error')}: the pose could not be had")
            continue
        ident = rec.id
        k = 2
        while ident in used_ids:
            ident, k = f"{rec.id}~{k}", k + 1
        used_ids.add(ident)
        inf = result.infant
        infants.append({
            "id": ident, "file": rel, "group": fields["group"],
            "fms_category": fields["category"],
            "sex": inf.sex if inf else "",
            "gestational_age_weeks": inf.gestational_age_weeks if inf else "",
            "birth_weight_g": inf.birth_weight_g if inf else "",
            "corrected_age_weeks": inf.corrected_age_weeks if inf else "",
        })  # fmt: skip
        kept = []
        for iv in ann["intervals"]:
            a, b = iv["start_s"], min(iv["end_s"], duration)
            if a < b:
                intervals.append({"id": ident, "start_s": a, "end_s": b})
                kept.append({"start_s": a, "end_s": b})
        summary.intervals += len(kept)
        summary.groups[fields["group"]] = summary.groups.get(fields["group"], 0) + 1
        kind = _kind(tmp / rel)
        summary.kinds[kind] = summary.kinds.get(kind, 0) + 1
        agreement.append(agreement_row(ident, result, {"fields": ann["fields"],
                                                       "intervals": kept}))  # fmt: skip
    if progress:
        progress(len(recs), len(recs))
    summary.exported = len(infants)
    summary.agreement = summarise(agreement)
    (tmp / "infants.csv").write_bytes(_csv(infants, INFANT_COLUMNS))
    (tmp / "fms_intervals.csv").write_bytes(_csv(intervals, ("id", "start_s", "end_s")))
    (tmp / "agreement.csv").write_bytes(_csv(agreement, AGREEMENT_COLUMNS))
    (tmp / "agreement.json").write_text(
        json.dumps({"summary": summary.agreement, "recordings": agreement}, indent=2)
    )


def _validate(folder: Path) -> str:
    """Load the export with ``mam train``'s own loader (it checks every row)."""
    if not (folder / "infants.csv").read_text().strip().count("\n"):
        return "no recordings exported"
    try:
        from mam.training.dataset import load_dataset
    except ImportError:
        return "not checked: the training extra (torch) is not installed"
    recs = load_dataset(folder)
    return f"read by mam train's loader: {len(recs)} infants"
