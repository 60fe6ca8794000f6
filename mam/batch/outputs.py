"""``results.csv`` (one row per recording), ``results.jsonl`` (full results) and
``results.fhir.ndjson`` (one HL7 FHIR R4 Bundle per result, ``mam.batch.fhir``), rebuilt from the
ledger alone, written atomically, so they can be written again at any time."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path

from mam.batch.ledger import LEDGER, Ledger
from mam.files import write_atomic

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
)


def write_outputs(
    out: str | Path,
    ledger: Ledger | None = None,
    paths: Iterable[str] | None = None,
    fhir_contexts: dict | None = None,
) -> tuple[Path, Path]:
    """``results.csv``, ``results.jsonl`` and ``results.fhir.ndjson`` from the ledger (all
    paths, or the given ones), written atomically; safe to run again at any time.
    ``fhir_contexts``: the caller's FHIR references per (path, id) (``mam.batch.fhir``)."""
    out = Path(out)
    own = ledger is None
    ledger = ledger or Ledger(out / LEDGER)
    try:
        rows = ledger.rows(paths)
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
                }
            )
            fj.write(json.dumps(base | {"sha256": r["sha256"]} | res) + "\n")
        else:
            code = r["error_code"] or "not_screened"  # not_screened: killed before its turn
            w.writerow(base | {"error_code": code})
            fj.write(json.dumps(base | {"error_code": code, "error": r["error"] or ""}) + "\n")
    # Unique temporary names (mam.files): two runs writing the same folder never share one.
    csv_path = write_atomic(out / RESULTS_CSV, fc.getvalue().encode())
    jsonl_path = write_atomic(out / RESULTS_JSONL, fj.getvalue().encode())
    from mam.batch.fhir import write_fhir  # lazy: mam.fhir only when outputs are written

    write_fhir(out, rows, fhir_contexts)
    return csv_path, jsonl_path
