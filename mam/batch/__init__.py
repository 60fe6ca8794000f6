"""Screening archives: ``mam batch INPUT --out DIR`` and what it writes.

``archive`` (what to screen), ``ledger`` (durable progress), ``runner`` (worker processes or a
running service, resumable, sharded), ``poses`` (each video's pose, kept for the review app and
training), ``outputs`` (results.csv / .jsonl), ``report`` (HTML pages
clinicians read), ``review_clips`` (the top FMs clips cut with the skeleton), ``service_client``
(``--service URL``). Every recording goes through the one pipeline, ``mam.screening``.
"""

from mam.batch.archive import (
    INFANT_FIELDS,
    POSE_SUFFIXES,
    VIDEO_SUFFIXES,
    InvalidManifestError,
    Item,
    UnreadableFileError,
    collect,
)
from mam.batch.ledger import LEDGER, Ledger, job_key
from mam.batch.outputs import CSV_COLUMNS, RESULTS_CSV, RESULTS_JSONL, write_outputs
from mam.batch.runner import (
    BatchSummary,
    DiskFullError,
    OutputNotWritableError,
    check_output_dir,
    merge_shards,
    run_batch,
)

__all__ = [
    "CSV_COLUMNS",
    "INFANT_FIELDS",
    "LEDGER",
    "POSE_SUFFIXES",
    "RESULTS_CSV",
    "RESULTS_JSONL",
    "VIDEO_SUFFIXES",
    "BatchSummary",
    "DiskFullError",
    "InvalidManifestError",
    "Item",
    "Ledger",
    "OutputNotWritableError",
    "UnreadableFileError",
    "check_output_dir",
    "collect",
    "job_key",
    "merge_shards",
    "run_batch",
    "write_outputs",
]
