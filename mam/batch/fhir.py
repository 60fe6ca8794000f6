"""FHIR output of a batch run: ``results.fhir.ndjson``, one transaction Bundle per recording with
a result, one per line (NDJSON of Bundles, not a Bulk Data export of resources; ``write_fhir``).
``mam fhir push DIR --base-url URL`` sends them through the durable outbox
(``mam.fhir.outbox``); rebuilding the file gives the same Bundles, so pushing it again sends
nothing new, and a result that changed is sent as a correction.

The references are the caller's: a manifest may carry ``fhir_subject`` (``Patient/<id>``) and
``fhir_encounter`` (``Encounter/<id>``) columns, or the patient by identifier
(``fhir_patient_identifier``, ``SYSTEM|VALUE``: a conditional reference), the order
(``fhir_order_identifier``, ``SYSTEM|VALUE``: ``basedOn``) and ``accession_number``, checked
before any work (``InvalidFhirReferenceError`` naming the line, never the value). A folder
input, or a merge of shards, gives Bundles without a subject. ``echo_dicom_uids`` puts a DICOM
recording's study and series UIDs in its Bundle (read from the file when the outputs are
written).

Each Bundle's result id is derived from the ledger key, the path and the id (``result_id_for``),
so the file is the same every time it is rebuilt and one recording reported under two paths gives
two results (they may be two patients' copies).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mam import formats
from mam.fhir import FhirCodes, FhirContext, InvalidFhirReferenceError, result_id_for
from mam.files import write_atomic
from mam.formats import RenderContext

RESULTS_FHIR = "results.fhir.ndjson"
MANIFEST_COLUMNS = ("fhir_subject", "fhir_encounter", "fhir_patient_identifier",
                    "fhir_order_identifier", "accession_number")  # fmt: skip
# Manifest column -> FhirContext field.
_LINKAGE = {
    "fhir_subject": "subject",
    "fhir_encounter": "encounter",
    "fhir_patient_identifier": "patient_identifier",
    "fhir_order_identifier": "order_identifier",
    "accession_number": "accession_number",
}

__all__ = ["MANIFEST_COLUMNS", "RESULTS_FHIR", "RowContext", "contexts", "row_result_id",
           "write_fhir"]  # fmt: skip


@dataclass(frozen=True)
class RowContext:
    """What the caller gave for one reported recording."""

    subject: str | None = None
    encounter: str | None = None
    file: Path | None = None  # the recording, when its DICOM UIDs are to be echoed
    patient_identifier: str | None = None
    order_identifier: str | None = None
    accession_number: str | None = None


def row_result_id(key: str, path: str, ident: str) -> str:
    return result_id_for(f"{key}|{path}|{ident}")


def contexts(input_path: str | Path, items, echo_dicom_uids: bool = False) -> dict:
    """``{(path, id): RowContext}`` for ``items`` (``mam.batch.archive.collect``'s, in order)."""
    src = Path(input_path)
    refs: list[dict] = [{}] * len(items)
    if src.is_file() and src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        if len(rows) == len(items):
            refs = []
            for line, row in enumerate(rows, start=2):
                given = {f: (row.get(c) or "").strip() or None for c, f in _LINKAGE.items()}
                try:
                    FhirContext("check", **given)
                except InvalidFhirReferenceError as e:
                    raise InvalidFhirReferenceError(f"manifest line {line}: {e}") from None
                refs.append(given)
    return {
        (item.path, item.id): RowContext(file=item.file if echo_dicom_uids else None, **given)
        for item, given in zip(items, refs)
    }


def _sha256(value: str | None) -> str | None:
    """The ledger's file digest when it is a SHA-256 (the Provenance's input entity)."""
    return value if value and re.fullmatch(r"[0-9a-f]{64}", value) else None


def write_fhir(out: str | Path, rows: list[dict], row_contexts: dict | None = None,
               codes: FhirCodes | None = None) -> Path:  # fmt: skip
    """``results.fhir.ndjson`` from ledger rows (``Ledger.rows``), written atomically."""
    from mam.dicom_video import read_uids
    from mam.errors import MamError
    from mam.schemas import ScreeningResult

    codes = codes or FhirCodes.from_env()
    fhir_format = formats.get("fhir")
    lines = []
    for r in rows:
        if r["status"] != "done":
            continue
        rc = (row_contexts or {}).get((r["path"], r["id"])) or RowContext()
        uids = None
        if rc.file is not None:
            try:
                uids = read_uids(rc.file)
            except (MamError, OSError):
                uids = None
        ctx = FhirContext(
            result_id=row_result_id(r["key"], r["path"], r["id"]),
            subject=rc.subject,
            encounter=rc.encounter,
            patient_identifier=rc.patient_identifier,
            order_identifier=rc.order_identifier,
            accession_number=rc.accession_number,
            content_sha256=_sha256(r.get("sha256")),
            issued=datetime.fromtimestamp(r["finished_at"], UTC) if r["finished_at"] else None,
            study_instance_uid=getattr(uids, "study_instance_uid", None),
            series_instance_uid=getattr(uids, "series_instance_uid", None),
        )
        result = ScreeningResult.model_validate_json(r["result"])
        rc = RenderContext(ctx.result_id, fhir=ctx, issued=ctx.issued, codes=codes, pretty=False)
        lines.append(fhir_format.render(result, rc))  # one line: the compact Bundle
    text = "".join(line + "\n" for line in lines)
    return write_atomic(Path(out) / RESULTS_FHIR, text.encode())
