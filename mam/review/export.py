"""Reviewers' judgements -> the training layout ``mam train --data`` reads, and the agreement
report.

``export_annotations(catalog, store, OUT)`` writes, for every recording with a verdict, the
verdict it has (:func:`verdict_of`): the senior's signed-off one; without a sign-off, the
assessors' when every assessor who finished agrees on category and group (their FMs intervals
then: where all of them marked FMs); left out, with the reason in ``export.json``, when they
disagree, when the category is abnormal FMs (the paper excludes these infants) or not
assessable, or when it has no category and group:

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
* ``OUT/agreement.csv`` and ``agreement.json``: the exported verdict against the model per
  recording (:mod:`mam.review.agreement`), and, for every recording with finished reviews, the
  assessors against each other (``inter_assessor.csv``: clip kappa, category and group
  agreement per pair) and each against the model (``assessor_model.csv``), summarised in
  ``agreement.json``;
* ``OUT/outcomes.csv``: the follow-up outcomes recorded (CP at 2 years, source) per recording;
* ``OUT/export.json``: counts, and the recordings left out with the reason.

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

from mam.review.agreement import (
    agreement_row,
    assessors_agreement,
    summarise,
    summarise_assessors,
)
from mam.review.catalog import Catalog
from mam.review.pose import PoseUnavailable, pose_for_export
from mam.review.store import FINAL, ReviewStore

logger = logging.getLogger(__name__)

INFANT_COLUMNS = ("id", "file", "group", "fms_category", "sex", "gestational_age_weeks",
                  "birth_weight_g", "corrected_age_weeks")  # fmt: skip
DATASET_JSON = "dataset.json"
AGREEMENT_COLUMNS = ("id", "clips", "reviewer_fms_clips", "model_fms_clips", "clip_agreement",
                     "kappa", "verdicts", "verdicts_agree", "reviewer_category", "model_category",
                     "reviewer_group", "model_label", "model_usable", "category_agrees",
                     "group_agrees", "source")  # fmt: skip
PAIR_COLUMNS = ("id", "assessor_a", "assessor_b", "clips", "kappa", "category_a", "category_b",
                "category_agrees", "group_agrees")  # fmt: skip
MODEL_COLUMNS = ("id", "assessor", "clips", "kappa", "category", "model_category",
                 "category_agrees", "group_agrees")  # fmt: skip
OUTCOME_COLUMNS = ("id", "cp_2y", "outcome_source", "recorded_by", "recorded_at", "exported")
LEFT_OUT = {
    "abnormal": "abnormal FMs: the paper excludes these infants",
    "not_assessable": "not assessable (crying, sleeping or a poor recording)",
}


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


def _intersect(lists: list[list[dict]]) -> list[dict]:
    """Where every assessor marked FMs: the intersection of their interval lists."""
    cur = [(i["start_s"], i["end_s"]) for i in lists[0]]
    for other in lists[1:]:
        nxt = []
        for a0, b0 in cur:
            for iv in other:
                a, b = max(a0, iv["start_s"]), min(b0, iv["end_s"])
                if a < b:
                    nxt.append((a, b))
        cur = nxt
    return [{"start_s": a, "end_s": b} for a, b in sorted(cur)]


def verdict_of(reviews: dict[str, dict]) -> tuple[dict | None, str]:
    """``(verdict, source)`` of a recording from its reviews (``ReviewStore.reviews``):
    ``verdict`` is ``{"fields": {...}, "intervals": [...]}``; ``source`` is ``signed_off``,
    ``agreed`` (no sign-off; every finished assessor has the same category and group), or,
    with no verdict, why not (``""``: nobody has finished)."""
    final = reviews.get(FINAL)
    if final and final["fields"].get("state", {}).get("value") == "signed_off":
        return final, "signed_off"
    done = [rv for name, rv in sorted(reviews.items())
            if name != FINAL and rv["fields"].get("state", {}).get("value") == "done"]  # fmt: skip
    if not done:
        return None, ""
    pick = {(rv["fields"].get("category", {}).get("value"),
             rv["fields"].get("group", {}).get("value")) for rv in done}  # fmt: skip
    if len(pick) > 1:
        return None, f"{len(done)} assessors disagree and no senior has signed off"
    intervals = done[0]["intervals"] if len(done) == 1 else _intersect(
        [rv["intervals"] for rv in done])  # fmt: skip
    return {"fields": done[0]["fields"], "intervals": intervals}, "agreed"


def _write(catalog, store, tmp: Path, summary: ExportSummary, progress) -> None:
    touched = store.summaries()
    recs = [r for r in catalog.all() if r.rid in touched]
    infants, intervals, agreement, pairs, versus = [], [], [], [], []
    exported: dict[str, str] = {}
    used_ids: set[str] = set()
    for n, rec in enumerate(recs, start=1):
        if progress:
            progress(n - 1, len(recs))
        reviews = store.reviews(rec.rid)

        def skip(reason: str, rec=rec) -> None:
            summary.skipped.append({"id": rec.id, "reason": reason})

        finished = {k: v for k, v in reviews.items() if k != FINAL
                    and v["fields"].get("state", {}).get("value") == "done"}  # fmt: skip
        result = rec.result() if rec.status == "done" else None
        if result is not None and finished:
            a = assessors_agreement(rec.id, result, finished)
            pairs += a["pairs"]
            versus += a["model"]
        ann, source = verdict_of(reviews)
        if ann is None:
            if source:
                skip(source)
            continue
        fields = {k: v["value"] for k, v in ann["fields"].items()}
        if fields.get("category") in LEFT_OUT:
            skip(LEFT_OUT[fields["category"]])
            continue
        if not fields.get("category") or not fields.get("group"):
            skip("marked done without a final category and group")
            continue
        if rec.status != "done" or rec.sha256 is None:
            skip("not screened, so there is no pose the model saw")
            continue
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
        exported[rec.rid] = ident
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
        row = agreement_row(ident, result, {"fields": ann["fields"], "intervals": kept})
        agreement.append({**row, "source": source})
    if progress:
        progress(len(recs), len(recs))
    summary.exported = len(infants)
    summary.agreement = {**summarise(agreement), **summarise_assessors(pairs, versus)}
    outcomes = []
    by_rid = {r.rid: r for r in catalog.all()}
    for rid, o in sorted(store.outcomes().items()):
        if rid in by_rid:
            outcomes.append({
                "id": exported.get(rid, by_rid[rid].id), "cp_2y": o["cp_2y"] or "",
                "outcome_source": o["outcome_source"] or "", "recorded_by": o["by"],
                "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(o["at"])),
                "exported": rid in exported,
            })  # fmt: skip
    (tmp / "infants.csv").write_bytes(_csv(infants, INFANT_COLUMNS))
    (tmp / "fms_intervals.csv").write_bytes(_csv(intervals, ("id", "start_s", "end_s")))
    (tmp / "agreement.csv").write_bytes(_csv(agreement, AGREEMENT_COLUMNS))
    (tmp / "inter_assessor.csv").write_bytes(_csv(pairs, PAIR_COLUMNS))
    (tmp / "assessor_model.csv").write_bytes(_csv(versus, MODEL_COLUMNS))
    (tmp / "outcomes.csv").write_bytes(_csv(outcomes, OUTCOME_COLUMNS))
    (tmp / "agreement.json").write_text(json.dumps(
        {"summary": summary.agreement, "recordings": agreement, "inter_assessor": pairs,
         "assessor_model": versus}, indent=2))  # fmt: skip


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
