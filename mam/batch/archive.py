"""What a batch run screens: the recordings of a folder or of a manifest CSV, with infant data.

A folder is walked recursively for recordings and ``.npy`` / ``.npz`` pose files (what ``mam
screen --pose`` reads, ``mam.pose.load_pose_file``: a pose ``mam batch`` kept, or ``mam review
--export`` wrote, is screened as the video kind it came from); a manifest has a ``file`` column
(relative paths resolve against the CSV's folder), optional ``id`` and the four infant fields,
and may be saved by a spreadsheet (``mam.spreadsheet``). What a batch wrote is not screened
again: the walk skips the ``poses/``, ``sr/`` and ``reports/`` folders of a batch output folder
(one holding ``ledger.sqlite``), so ``--out`` may lie inside the input folder.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mam.dicom_video import is_dicom
from mam.errors import FileNotFoundInputError, InputError
from mam.spreadsheet import SpreadsheetCSV

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".dcm"})
POSE_SUFFIXES = frozenset({".npy", ".npz"})
# A batch output folder (one holding its ledger, mam.batch.ledger.LEDGER) and its own folders
# (mam.batch.poses.POSES, outputs.SR_DIR, report.REPORTS_DIR): kept poses, SRs and clips are
# outputs, not recordings.
OUTPUT_MARK = "ledger.sqlite"
OUTPUT_DIRS = ("poses", "sr", "reports")
INFANT_FIELDS = ("sex", "gestational_age_weeks", "birth_weight_g", "corrected_age_weeks")


class InvalidManifestError(InputError):
    code = "invalid_manifest"


class UnreadableFileError(InputError):
    """The file exists but cannot be read (permissions, I/O error)."""

    code = "unreadable_file"


@dataclass
class Item:
    """One recording to report: where it is, how the report names it, and its infant data."""

    file: Path  # resolved location
    path: str  # as reported (relative to the input folder, or as written in the manifest)
    id: str
    infant: dict[str, str] = field(default_factory=dict)  # raw manifest fields; empty: none

    @property
    def kind(self) -> str:
        return "pose" if self.file.suffix.lower() in POSE_SUFFIXES else "video"


def collect(input_path: str | Path) -> list[Item]:
    """The recordings of a folder (recursive, sorted) or of a manifest CSV."""
    src = Path(input_path)
    if src.is_dir():
        suffixes = VIDEO_SUFFIXES | POSE_SUFFIXES
        found = list(src.rglob("*"))
        outputs = {p.parent / d for p in found if p.name == OUTPUT_MARK for d in OUTPUT_DIRS}
        # PACS exports often name DICOM objects without an extension (IM000001): sniffed. A
        # dangling link to a recording is kept, so that it is reported (file_not_found).
        files = sorted(
            p for p in found
            if ((p.suffix.lower() in suffixes and (p.is_file() or p.is_symlink()))
                or (not p.suffix and p.is_file() and is_dicom(p)))
            and not (outputs and outputs.intersection(p.parents))
        )  # fmt: skip
        items = []
        for p in files:
            rel = p.relative_to(src).as_posix()
            items.append(Item(p, rel, rel.rsplit(".", 1)[0]))
        return items
    if src.is_file() and src.suffix.lower() == ".csv":
        return _read_manifest(src)
    if not src.exists():
        raise FileNotFoundInputError(f"batch input not found: {src}")
    raise InputError(f"batch input must be a folder or a manifest .csv: {src}")


@dataclass
class _ManifestReport:
    errors: list[str] = field(default_factory=list)
    normalisations: list[str] = field(default_factory=list)


def _read_manifest(csv_path: Path) -> list[Item]:
    """The manifest's rows, read as a spreadsheet saves CSV (``mam.spreadsheet``: byte-order
    mark, ``;`` and decimal comma, header case, ``F``/``M``), every bad line reported at once;
    each normalisation is logged (column names and spellings only, never a value of a row)."""
    report = _ManifestReport()
    reader = SpreadsheetCSV(csv_path, "manifest", report)
    try:
        rows = reader.rows(["file"])
    except OSError as e:
        raise InvalidManifestError(f"cannot read the manifest: {type(e).__name__}") from None
    except csv.Error as e:
        raise InvalidManifestError(f"the manifest is not CSV: {e}") from None
    items, seen = [], {}
    for line, row in rows:
        name = reader.value(row, "file")
        if not name:
            reader.error(line, "empty 'file'")
            continue
        ident = reader.value(row, "id") or Path(name).stem
        if ident in seen:
            reader.error(line, f"duplicate id (first on line {seen[ident]})")
            continue
        seen[ident] = line
        p = Path(name)
        file = p if p.is_absolute() else csv_path.parent / p
        infant = {k: reader.value(row, k) for k in INFANT_FIELDS}
        items.append(Item(file, name, ident, {k: v for k, v in infant.items() if v}))
    reader.report_counts()
    if report.errors:
        n = len(report.errors)
        raise InvalidManifestError(
            f"{n} problem{'s' if n > 1 else ''} in the manifest (all listed):\n"
            + "\n".join(f"  {e}" for e in report.errors)
        )
    for what in report.normalisations:
        logger.warning("normalised: %s", what)
    return items


def parse_infant(raw: dict[str, str]):
    from mam.errors import InvalidInfantDataError
    from mam.schemas import InfantData

    if not raw:
        return None
    fields: dict[str, object] = {k: raw.get(k) for k in INFANT_FIELDS}
    for k in INFANT_FIELDS[1:]:
        v = fields[k]
        if v is not None:
            try:
                fields[k] = float(v)
            except ValueError:
                raise InvalidInfantDataError(f"invalid infant data: {k} is not a number") from None
    return InfantData.parse(**fields)
