"""CSV files as spreadsheets save them, read in one place: the training layout's tables
(``mam.training.dataset``) and the batch manifest (``mam.batch.archive``).

Excel's and LibreOffice's "CSV" differs from Python's by locale: a UTF-8 byte-order mark ("CSV
UTF-8"), ``;`` separators with a decimal comma, Windows-1252 text, headers and values in any
case with stray spaces, and the site's own spellings of fixed vocabularies (``Normal``, ``F``).
Each is read and reported as a normalisation (never silently), and every bad line is collected
rather than raised, so the user sees all of them at once. Torch-free: the batch runner and the
service's environment use it.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mam.gma import FMS_CATEGORIES

NUMBER_FIELDS = ("gestational_age_weeks", "birth_weight_g", "corrected_age_weeks", "start_s",
                 "end_s")  # fmt: skip
# Spellings a spreadsheet carries, after lower case and runs of space, '_' and '-' made one space.
SPELLINGS: dict[str, dict[str, str]] = {
    "group": {
        "normal": "normal", "n": "normal", "norm": "normal", "typical": "normal",
        "typically developing": "normal", "td": "normal",
        "risk": "risk", "r": "risk", "at risk": "risk", "atrisk": "risk", "high risk": "risk",
        "highrisk": "risk", "abnormal": "risk",
    },
    "sex": {
        "male": "male", "m": "male", "boy": "male", "männlich": "male", "maennlich": "male",
        "female": "female", "f": "female", "girl": "female", "w": "female",
        "weiblich": "female",
    },
    "fms_category": {**{c: c for c in FMS_CATEGORIES}, "continual": "continuous"},
}  # fmt: skip
MISSING = ("", "na", "n/a")


def _key(value: str) -> str:
    return re.sub(r"[\s_\-]+", " ", value.strip().lower())


class SpreadsheetCSV:
    """Reads one CSV as a spreadsheet saves it, recording what it normalised.

    Args:
        path: the CSV.
        label: how messages name it (``DIR/infants.csv``).
        report: where errors and normalisations go: any object with ``errors`` and
            ``normalisations`` lists of strings (``mam.training.dataset.DatasetReport``).
    """

    def __init__(self, path: Path, label: str, report) -> None:
        self.path, self.label, self.report = path, label, report
        self.counts: Counter = Counter()
        self.delimiter = ","

    def error(self, line: int | None, message: str) -> None:
        where = f"{self.label} line {line}" if line else self.label
        self.report.errors.append(f"{where}: {message}")

    def rows(self, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
        raw = self.path.read_bytes()
        if raw.startswith(codecs.BOM_UTF8):
            self.report.normalisations.append(f"{self.label}: UTF-8 byte-order mark skipped")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
            self.report.normalisations.append(
                f"{self.label}: not UTF-8, read as Windows-1252 (save it as CSV UTF-8)"
            )
        if not text.strip():
            self.error(None, "the file is empty (it needs a header line)")
            return []
        first = text.splitlines()[0]
        self.delimiter = max((",", ";", "\t"), key=first.count)
        if self.delimiter != ",":
            self.report.normalisations.append(
                f"{self.label}: separator {self.delimiter!r} (not ',')"
            )
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self.delimiter)
        header = next(reader)
        names = [_key(h).replace(" ", "_") for h in header]
        renamed = [f"{h!r} -> {n!r}" for h, n in zip(header, names) if h != n]
        if renamed:
            self.report.normalisations.append(f"{self.label}: header {', '.join(renamed)}")
        missing = [c for c in required if c not in names]
        if missing:
            self.error(1, f"no column {', '.join(map(repr, missing))} (the header has "
                          f"{', '.join(map(repr, names))})")  # fmt: skip
            return []
        out = []
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(names) and any(v.strip() for v in values[len(names) :]):
                self.error(line, f"{len(values)} values for {len(names)} columns (a separator "
                                 "inside a value? quote it)")  # fmt: skip
                continue
            row = {}
            for name, v in zip(names, values + [""] * (len(names) - len(values))):
                if v != v.strip():
                    self.counts["stray spaces around a value"] += 1
                row[name] = v.strip()
            out.append((line, row))
        return out

    def value(self, row: dict[str, str], column: str) -> str | None:
        """The cell, None when empty; a known spelling of a fixed vocabulary mapped to it."""
        v = row.get(column, "")
        if v.lower() in MISSING:
            if v:
                self.counts[f"{column} {v!r} read as missing"] += 1
            return None
        spellings = SPELLINGS.get(column)
        if spellings is not None:
            canon = spellings.get(_key(v))
            if canon is not None and canon != v:
                self.counts[f"{column} {v!r} -> {canon!r}"] += 1
            return canon if canon is not None else v
        if column in NUMBER_FIELDS and self.delimiter != "," and re.fullmatch(r"-?\d+,\d+", v):
            self.counts[f"decimal comma in {column}"] += 1
            return v.replace(",", ".")
        return v

    def number(self, row: dict[str, str], column: str, line: int) -> float | None:
        v = self.value(row, column)
        if v is None:
            self.error(line, f"{column} is missing")
            return None
        try:
            return float(v)
        except ValueError:
            self.error(line, f"{column} must be a number, got {v!r}")
            return None

    def report_counts(self) -> None:
        for what, n in sorted(self.counts.items()):
            self.report.normalisations.append(
                f"{self.label}: {what} ({n} {'row' if n == 1 else 'rows'})"
            )
