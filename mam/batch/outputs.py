"""``results.csv`` (one row per recording), ``results.jsonl`` (full results) and
``results.fhir.ndjson`` (one HL7 FHIR R4 Bundle per result, ``mam.batch.fhir``) and, when asked,
``sr/<result-id>.dcm`` (a DICOM Comprehensive SR per result, ``mam.dicom_sr``), rebuilt from the
ledger alone in one pass, written atomically, so they can be written again at any time. An SR is
the same bytes for the same result (its UIDs and times come from the result), so one that is
already there as it would be written is left untouched; any other is replaced; one of a result no
longer current (its recording screened again with other weights) is removed, with or without
``dicom_sr`` (``remove_superseded_srs``). A result whose pose
the batch kept (``mam.batch.poses``) names it in ``results.jsonl`` as ``pose_file`` (relative to
the folder). ``results.csv`` names the model of each result (``model_name``, ``model_version`` and
the full ``model_digest``, ``mam.model.weights``); empty for rows without a result. Every result
is checked against the digest the ledger wrote with it (``mam.batch.ledger``) before anything is
written: an altered result is an ``altered_result`` error, never a row."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from mam.batch.ledger import LEDGER, Ledger
from mam.batch.poses import kept_pose
from mam.files import write_atomic

logger = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
RESULTS_JSONL = "results.jsonl"
CSV_COLUMNS = (
    "id",
    "path",
    "risk_probability",
    "classification",
    "fms_frequency",
    "fms_category",
    "probabilities_usable",
    "in_domain",
    "domain_score",
    "indeterminate_reason",
    "tracked_fraction",
    "error_code",
    "model_name",
    "model_version",
    "model_digest",
)


def write_outputs(
    out: str | Path,
    ledger: Ledger | None = None,
    paths: Iterable[str] | None = None,
    fhir_contexts: dict | None = None,
    dicom_sr: bool = False,
) -> tuple[Path, Path]:
    """``results.csv``, ``results.jsonl`` and ``results.fhir.ndjson`` from the ledger (all
    paths, or the given ones), written atomically; safe to run again at any time. Raises
    ``AlteredResultError`` / ``UnverifiedResultError`` (nothing written) for a result that does
    not match its digest / has none.
    ``fhir_contexts``: the caller's references per (path, id) (``mam.batch.fhir``; a context's
    ``file`` is the DICOM recording whose UIDs the FHIR Bundle and the SR echo).
    ``dicom_sr``: also ``sr/<result-id>.dcm`` per result (``write_srs``). Either way the SRs of
    superseded results are removed (``remove_superseded_srs``)."""
    out = Path(out)
    own = ledger is None
    ledger = ledger or Ledger(out / LEDGER)
    try:
        rows = ledger.rows(paths, verify=True)  # an altered result is an error
    finally:
        if own:
            ledger.close()
    fc, fj = io.StringIO(newline=""), io.StringIO()
    w = csv.DictWriter(fc, CSV_COLUMNS)
    w.writeheader()
    for r in rows:
        base = {"path": r["path"], "id": r["id"]}
        if r["status"] == "done":
            res = json.loads(r["result"])
            w.writerow(
                base
                | {
                    "risk_probability": res["risk_probability"],
                    "classification": res["classification"]["label"],
                    "fms_frequency": res["fms_frequency"],
                    "fms_category": res["fms_category"],
                    "probabilities_usable": res["probabilities_usable"],
                    "in_domain": res["domain"]["in_domain"],
                    "domain_score": res["domain"]["score"],
                    "indeterminate_reason": "; ".join(res["classification"]["reasons"]),
                    "tracked_fraction": res["quality"]["tracked_fraction"],
                    "error_code": "",
                    "model_name": res["model"]["name"],
                    "model_version": res["model"]["version"],
                    "model_digest": res["model"].get("digest", ""),
                }
            )
            kept = kept_pose(out, res["model"]["pose_backend"], r["sha256"])
            pose = {"pose_file": kept.relative_to(out).as_posix()} if kept else {}
            fj.write(json.dumps(base | {"sha256": r["sha256"]} | pose | res) + "\n")
        else:
            code = r["error_code"] or "not_screened"  # not_screened: killed before its turn
            w.writerow(base | {"error_code": code})
            fj.write(json.dumps(base | {"error_code": code, "error": r["error"] or ""}) + "\n")
    # Unique temporary names (mam.files): two runs writing the same folder never share one.
    csv_path = write_atomic(out / RESULTS_CSV, fc.getvalue().encode())
    jsonl_path = write_atomic(out / RESULTS_JSONL, fj.getvalue().encode())
    from mam.batch.fhir import write_fhir  # lazy: mam.fhir only when outputs are written

    write_fhir(out, rows, fhir_contexts)
    if dicom_sr:
        write_srs(out, rows, fhir_contexts)
    # With or without dicom_sr: an SR of a superseded result must not reach the PACS later.
    remove_superseded_srs(out, None if own else ledger)
    return csv_path, jsonl_path


SR_DIR = "sr"
# The names write_srs gives (a result id, ``mam.fhir.result_id_for``: a UUID 5): only these files
# of OUT/sr/ are the writer's to remove.
_SR_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.dcm")


def write_srs(out: str | Path, rows: list[dict], row_contexts: dict | None = None) -> int:
    """``OUT/sr/<result-id>.dcm``: a DICOM Comprehensive SR (the ``dicom-sr`` format) per done
    ledger row (``Ledger.rows``). The result id is the FHIR Bundle's
    (``mam.batch.fhir.row_result_id``), so both outputs name one result alike. A row whose
    context names its DICOM recording (``--echo-dicom-uids``) gets an SR that joins its study
    (the header read now; a recording gone or unreadable opens a study of its own). An SR already
    on disk with the same bytes is not written again (it keeps its inode and mtime); a changed
    one is replaced atomically. Returns how many were written."""
    from datetime import UTC, datetime

    from mam import formats
    from mam.batch.fhir import RowContext, row_result_id
    from mam.dicom_sr import read_source
    from mam.errors import MamError
    from mam.schemas import ScreeningResult

    folder = Path(out) / SR_DIR
    sr = formats.get("dicom-sr")
    written = 0
    for r in rows:
        if r["status"] != "done":
            continue
        rc = (row_contexts or {}).get((r["path"], r["id"])) or RowContext()
        source = None
        if rc.file is not None:
            try:
                source = read_source(rc.file)
            except (MamError, OSError):
                source = None  # gone or unreadable now: the SR opens its own study
        result_id = row_result_id(r["key"], r["path"], r["id"])
        issued = datetime.fromtimestamp(r["finished_at"], UTC) if r["finished_at"] else None
        result = ScreeningResult.model_validate_json(r["result"])
        data = sr.to_bytes(result, formats.RenderContext(result_id, source=source, issued=issued))
        path = folder / f"{result_id}.dcm"
        try:
            if path.read_bytes() == data:
                continue  # written by an earlier run of the same result
        except OSError:
            pass  # not there (or unreadable): write it
        folder.mkdir(exist_ok=True)
        write_atomic(path, data)
        written += 1
    return written


def remove_superseded_srs(out: str | Path, ledger: Ledger | None = None) -> int:
    """Remove the SRs in ``OUT/sr/`` of results that are no longer current, so that the folder
    (what ``mam dicom store OUT`` sends) holds only SRs of current results: a recording screened
    again with other weights has a new result id, and its old SR names a superseded result. The
    current results are every done row of the whole ledger (``Ledger.current_done``), not only
    the paths of this run, so shards writing one folder keep each other's. Only files named as
    ``write_srs`` names them are touched; the ledger can rebuild any SR removed (switching back
    to the old weights does). The folder is listed before the ledger is read: an SR is written
    after its result is committed, so one written meanwhile by another run is seen as current.
    Returns how many were removed."""
    from mam.batch.fhir import row_result_id

    folder = Path(out) / SR_DIR
    if not folder.is_dir():
        return 0
    names = {p.name for p in folder.iterdir() if _SR_NAME.fullmatch(p.name) and p.is_file()}
    if not names:
        return 0
    own = ledger is None
    ledger = ledger or Ledger(Path(out) / LEDGER)
    try:
        current = {f"{row_result_id(k, p, i)}.dcm" for k, p, i in ledger.current_done()}
    finally:
        if own:
            ledger.close()
    removed = 0
    for name in sorted(names - current):
        (folder / name).unlink(missing_ok=True)  # missing: another run removed it first
        removed += 1
    if removed:
        logger.info("batch: removed %d SR(s) of superseded results", removed)
    return removed
