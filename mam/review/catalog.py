"""The recordings a review app serves: the rows of a batch ledger (``DIR/ledger.sqlite``, written
by ``mam batch``), each under an opaque id, and where each recording lies in the archive.

* A recording's id in URLs and in the review store is the report's page stem
  (:func:`mam.batch.report.page_stem`: a hash of its ledger path and id), never the path or the
  id, which may name a patient. The browser never sends a path.
* :meth:`Catalog.locate` turns a ledger path into a file under the archive root, and refuses
  anything that resolves outside it (``..``, absolute paths elsewhere, symbolic links pointing
  out): no path, whatever the ledger or a request holds, escapes the root.
* The ledger is re-read when it changes (a batch run may still be adding rows); each result is
  parsed once (rows whose job did not change keep their parse) into the few numbers the
  worklist shows, and in full for one page.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mam.batch.archive import POSE_SUFFIXES
from mam.batch.ledger import LEDGER, Ledger
from mam.batch.report import page_stem


@dataclass
class Recording:
    rid: str
    path: str  # as in the ledger: relative to the archive root (or absolute, from a manifest)
    id: str
    key: str | None
    sha256: str | None
    status: str  # done | failed | not_screened
    kind: str  # video | pose
    error_code: str = ""
    error: str = ""
    result_json: str | None = None
    summary: dict = field(default_factory=dict)
    version: tuple = ()  # (job key, status, finished_at): what a re-read compares

    def result(self):
        """The full :class:`mam.schemas.ScreeningResult` (None unless screened)."""
        from mam.schemas import ScreeningResult

        if self.result_json is None:
            return None
        return ScreeningResult.model_validate_json(self.result_json)


def _summary(result: dict) -> dict:
    c = result.get("classification", {})
    d = result.get("domain", {})
    q = result.get("quality", {})
    return {
        "label": c.get("label"),
        "reasons": c.get("reasons", []),
        "risk_probability": result.get("risk_probability"),
        "fms_frequency": result.get("fms_frequency"),
        "fms_category": result.get("fms_category"),
        "usable": result.get("probabilities_usable"),
        "in_domain": d.get("in_domain"),
        "domain_score": d.get("score"),
        "tracked_fraction": q.get("tracked_fraction"),
        "duration_s": q.get("duration_s"),
        "pose_backend": result.get("model", {}).get("pose_backend"),
        "model": model_identity(result.get("model", {})),
    }


def model_identity(model: dict) -> dict:
    """Name, version, digest prefix of the model that made a result, and whether its weights
    are the demo ones (trained on simulated movement: not for clinical use)."""
    provenance = model.get("provenance")
    prov = json.dumps(provenance) if not isinstance(provenance, str) else provenance
    return {
        "name": model.get("name") or "?",
        "version": model.get("version") or "?",
        "digest": (model.get("digest") or "")[:12],
        "demo": model.get("name") == "mam_demo" or "simulated" in (prov or "").lower(),
    }


class Catalog:
    """Recordings of one batch output folder, by id.

    Args:
        out_dir: the folder ``mam batch --out`` wrote (its ``ledger.sqlite``).
        archive_root: where the ledger's paths start (``mam batch``'s INPUT folder, or a
            manifest's folder); None: recordings cannot be played or re-posed.
    """

    def __init__(self, out_dir: str | Path, archive_root: str | Path | None) -> None:
        self.out_dir = Path(out_dir)
        self.ledger_path = self.out_dir / LEDGER
        if not self.ledger_path.is_file():
            raise FileNotFoundError(f"no {LEDGER} in the batch output folder")
        self.root = Path(archive_root).resolve() if archive_root is not None else None
        self._stamp: tuple | None = None
        self._recs: dict[str, Recording] = {}
        self._snap: tuple[tuple | None, list[Recording]] = (None, [])
        self._lock = threading.Lock()

    def _ledger_stamp(self) -> tuple:
        parts = []
        for p in (self.ledger_path, self.ledger_path.with_name(LEDGER + "-wal")):
            try:
                st = p.stat()
                parts.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                parts.append(None)
        return tuple(parts)

    def refresh(self) -> None:
        stamp = self._ledger_stamp()
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            ledger = Ledger(self.ledger_path)
            try:
                rows = ledger.rows()
            finally:
                ledger.close()
            recs: dict[str, Recording] = {}
            for row in rows:
                rid = page_stem(row)
                old = self._recs.get(rid)
                version = (row["key"], row["status"], row["finished_at"])
                if old is not None and old.version == version:
                    recs[rid] = old  # unchanged since the last read: not parsed again
                    continue
                status = row["status"] or "not_screened"
                kind = "pose" if Path(row["path"]).suffix.lower() in POSE_SUFFIXES else "video"
                rec = Recording(
                    rid=rid, path=row["path"], id=row["id"], key=row["key"],
                    sha256=row["sha256"], status=status, kind=kind,
                    error_code=row["error_code"] or ("" if status == "done" else status),
                    error=row["error"] or "", version=version,
                )  # fmt: skip
                if status == "done" and row["result"] and row.get("verified") is False:
                    # Changed inside the ledger since it was written (mam.batch.ledger's digest):
                    # never shown, exported or compared as if the model had said it.
                    rec.status, rec.error_code = "failed", "altered_result"
                    rec.error = "the stored result does not match its digest"
                elif status == "done" and row["result"]:
                    try:
                        rec.summary = _summary(json.loads(row["result"]))
                        rec.result_json = row["result"]
                    except (ValueError, AttributeError):
                        rec.status, rec.error_code = "failed", "invalid_result"
                        rec.error = "the stored result cannot be read"
                recs[rid] = rec
            self._recs, self._stamp = recs, stamp
            self._snap = (stamp, list(recs.values()))

    def snapshot(self) -> tuple[tuple | None, list[Recording]]:
        """``(stamp, recordings)`` read together; the stamp changes whenever the ledger is
        re-read."""
        self.refresh()
        return self._snap

    def all(self) -> list[Recording]:
        return self.snapshot()[1]

    def get(self, rid: str) -> Recording | None:
        self.refresh()
        return self._recs.get(rid)

    def locate(self, rec: Recording) -> Path | None:
        """The recording's file under the archive root, or None when there is no root, the path
        resolves outside it, or nothing is there (any more)."""
        if self.root is None:
            return None
        try:
            p = (self.root / rec.path).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            return None
        if not p.is_relative_to(self.root) or not p.is_file():
            return None
        return p

    def why_missing(self, rec: Recording) -> str:
        if self.root is None:
            return "the review app was started without --archive, so recordings cannot be played"
        try:
            p = (self.root / rec.path).resolve()
        except (OSError, RuntimeError, ValueError):
            return "the recording's path cannot be resolved"
        if not p.is_relative_to(self.root):
            return "the recording's path lies outside the archive root, so it is not served"
        return "the recording is no longer in the archive at its path"
