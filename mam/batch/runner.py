"""Batch screening of an archive: ``mam batch INPUT --out DIR``.

INPUT is a folder (walked recursively for recordings and ``.npy`` / ``.npz`` pose files, not
into a batch output folder's own ``poses/``, ``sr/`` or ``reports/``) or a manifest CSV
(``file`` required; optional ``id``, ``sex``, ``gestational_age_weeks``, ``birth_weight_g``,
``corrected_age_weeks``; relative paths resolve against the CSV's folder). Every recording goes
through the one pipeline (:class:`mam.screening.Screener`) in worker processes, one Screener per
worker.

Durable progress: ``DIR/ledger.sqlite`` (WAL) holds one row per screening job, keyed by the
recording's sha256 (plus the infant data, when a manifest gives them) and the model's digest
(``mam.model.weights``; other weights screen every recording again), committed by the parent as
soon as the job finishes. A rerun skips jobs that are done and retries failed ones only with
``retry_failed``; killing the run loses at most the jobs in flight. The same content under two
paths is screened once and reported for both. ``results.csv`` and ``results.jsonl`` are written
at the end of each run from the ledger alone (``write_outputs``).

Bad input never stops a run: it becomes a failed row with the pipeline's error code
(``MamError.code``), or ``internal_error`` for anything unexpected. An output folder that cannot
be created or written, or a full disk, fails before any work starts; a disk that fills during
the run, a damaged ledger or a result altered in it (each result is checked against its digest,
``mam.batch.ledger``) stops the run with a typed error naming the file. Workers exit when the
batch process dies, even by ``kill -9`` (``_die_with_parent``).

Each video's pose is kept in ``DIR/poses/`` by content hash (``mam.batch.poses``; off with
``keep_poses=False``), written by the worker that estimated it; a job whose pose is kept reads
it instead of estimating again.

Infant data are health data: log lines carry counts only, never paths, ids or results. Each job
run writes one line to the audit trail (``mam.audit``; ``DIR/audit.jsonl`` unless
``MAM_AUDIT_FILE`` says otherwise): content digest, result id, outcome.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import errno
import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mam.audit import AuditLog, key_id
from mam.batch.archive import Item, UnreadableFileError, collect, parse_infant
from mam.batch.fhir import contexts, row_result_id
from mam.batch.ledger import LEDGER, Ledger, job_key
from mam.batch.outputs import write_outputs
from mam.batch.poses import kept_pose_path, merge_kept_poses
from mam.errors import (  # DiskFullError, OutputNotWritableError: mam.batch's too
    DiskFullError,
    FileNotFoundInputError,
    InputError,
    MamError,
    OutputNotWritableError,
)
from mam.model.weights import sha256_of

logger = logging.getLogger(__name__)

MIN_FREE_BYTES = 50 * 1024 * 1024
AUDIT_FILE = "audit.jsonl"


# -- workers --------------------------------------------------------------------------------------
_SCREENER = None


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Make this worker exit when the batch process that started it dies, even by ``kill -9``
    (which runs no clean-up): on Linux the kernel sends SIGKILL when the parent goes
    (``prctl(PR_SET_PDEATHSIG)``; strictly, when the parent's thread that started the worker
    does, and the pool's workers are started and used by the one thread that runs the batch);
    everywhere, a thread that exits once the parent pid changes (checked every second)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still works
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="mam-parent-watch", daemon=True).start()


def _init_worker(
    weights: str | None, pose_backend: str | None, threads: int = 0, parent: int | None = None
) -> None:
    """One worker's screener; ``threads``: its share of the CPUs for ONNX Runtime (0: all);
    ``parent``: the batch process's pid, to exit with it (none in-process)."""
    global _SCREENER
    if parent is not None:
        _die_with_parent(parent)
    from mam.pose.base import default_pose_backend
    from mam.screening import Screener, ScreeningOptions

    options = ScreeningOptions(
        pose_backend=pose_backend or default_pose_backend(), threads=threads or None
    )
    _SCREENER = Screener(weights, options)


def _screen_keeping(file: str, infant, keep: Path):
    """Screen a video from its kept pose where there is one; else estimate the pose, keep it
    (by rename, whatever the screening then says of it) and screen it."""
    from mam.pose import load_pose_file
    from mam.pose.from_video import write_pose_cache

    if keep.is_file():
        try:
            seq = load_pose_file(keep)
        except MamError:
            logger.warning("batch: a kept pose could not be read; estimating it again")
        else:
            return _SCREENER.screen_pose(seq, infant)
    seq, timings = _SCREENER.pose_video(file)
    try:
        write_pose_cache(seq, keep)
    except OSError as e:
        logger.warning("batch: a pose could not be kept (%s)", type(e).__name__)
    return _SCREENER.screen_pose(seq, infant, timings=timings)


def _screen_one(
    file: str, kind: str, infant: dict[str, str], keep: str | None = None
) -> tuple[str, str | None, str, str]:
    """-> (status, error_code, error, result JSON). Never raises for a bad recording.
    ``keep``: where the video's pose is kept (``mam.batch.poses``), None not to keep it."""
    try:
        parsed = parse_infant(infant)
        if kind == "pose":
            r = _SCREENER.screen_pose_file(file, parsed)
        elif keep is not None:
            r = _screen_keeping(file, parsed, Path(keep))
        else:
            r = _SCREENER.screen_video(file, parsed)
        return "done", None, "", r.model_dump_json()
    except MamError as e:
        return "failed", e.code, str(e), ""
    except Exception as e:  # noqa: BLE001 - one bad recording must not stop the archive
        return "failed", "internal_error", f"{type(e).__name__}: {e}", ""


# -- the run --------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    recordings: int = 0  # paths reported
    screened: int = 0  # jobs run this time
    skipped: int = 0  # jobs already in the ledger
    duplicates: int = 0  # paths sharing a job with an earlier path
    done: int = 0  # paths with a result, after the run
    failed: int = 0  # paths with an error code, after the run
    model: str = ""  # the model of this run, as a person reads it (describe_model)
    ledger_models: list[str] = field(default_factory=list)  # models of the skipped results
    other_model: int = 0  # jobs screened although the ledger held another model's result
    unverified: int = 0  # jobs screened again: their result in the ledger carried no digest


def describe_model(name: str, version: str, digest: str | None) -> str:
    """``mam_demo 0.3.1, digest 2c09d2985495``: a model as the CLI names it."""
    return f"{name} {version}, digest {(digest or 'unknown')[:12]}"


def _run_model(weights, service) -> tuple[str, dict | None]:
    """(the model's part of every job key, its name, version and digest): the weights' digest;
    through a service, the digest its ``GET /model`` names (``ServiceClient.model``), else the
    key ``service`` and no identity."""
    if service is None:
        from mam.model.weights import load_meta
        from mam.screening import default_weights

        meta = load_meta(weights or default_weights())[0]
        return meta.digest, {"name": meta.name, "version": meta.version, "digest": meta.digest}
    try:
        info = service.model() if hasattr(service, "model") else None
    except Exception:  # noqa: BLE001 - a service that cannot say is keyed as one model
        info = None
    if info and info.get("digest"):
        ident = {k: str(info.get(k, "?")) for k in ("name", "version", "digest")}
        return ident["digest"], ident
    return "service", None


Progress = Callable[[int, int, int], None]  # (finished, failed, total jobs this run)


def check_output_dir(out: str | Path, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Create ``out`` and make sure it is writable with some room to spare; fail fast if not."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise OutputNotWritableError(
            f"cannot write to the output folder {out}: {e.strerror or type(e).__name__}"
        ) from None
    free = shutil.disk_usage(out).free
    if free < min_free_bytes:
        raise DiskFullError(
            f"only {free // 2**20} MB free under {out}; at least {min_free_bytes // 2**20} MB "
            "are needed for the ledger and results"
        )
    return out


def run_batch(
    input_path: str | Path,
    out: str | Path,
    workers: int | None = None,
    retry_failed: bool = False,
    weights: str | Path | None = None,
    pose_backend: str | None = None,
    progress: Progress | None = None,
    min_free_bytes: int = MIN_FREE_BYTES,
    shard: tuple[int, int] | None = None,
    service=None,
    clips: bool = False,
    audit: AuditLog | None = None,
    echo_dicom_uids: bool = False,
    keep_poses: bool = True,
    dicom_sr: bool = False,
) -> BatchSummary:
    """Screen every recording of ``input_path`` into ``out``; see the module docstring.

    ``shard=(i, n)`` keeps the recordings whose position in the input is ``i`` modulo ``n`` (one
    pod of a Kubernetes Indexed Job each; ``merge_shards`` joins their outputs). ``service``, a
    :class:`mam.batch.service_client.ServiceClient`, screens through a running service instead of
    worker processes, ``workers`` requests at a time. Reports (``index.html``, a page per
    recording) are always written; ``clips`` also cuts the top FMs clips with the skeleton.
    ``audit``: where each job's audit line goes (default ``MAM_AUDIT_FILE`` or
    ``DIR/audit.jsonl``); ``echo_dicom_uids`` puts DICOM UIDs in ``results.fhir.ndjson``.
    ``keep_poses``: keep each video's pose in ``DIR/poses/`` (``mam.batch.poses``; never through
    a service, which returns results only). ``dicom_sr``: also a DICOM SR per result in
    ``DIR/sr/``, written with the other outputs (``mam.batch.outputs.write_srs``)."""
    out = check_output_dir(out, min_free_bytes)
    items = collect(input_path)
    fhir_contexts = contexts(input_path, items, echo_dicom_uids)  # references checked first
    if shard is not None:
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise InputError(f"shard must be I/N with 0 <= I < N; received {i}/{n}")
        items = items[i::n]
    if service is not None:
        service.check()
    workers = max(1, workers or os.cpu_count() or 1)
    model_key, ident = _run_model(weights, service)  # weights that do not load fail here
    own_audit = audit is None
    audit = audit or AuditLog.from_env(default=out / AUDIT_FILE)
    label = describe_model(**ident) if ident else "the service's model (it names no digest)"
    prior_model = audit.model
    if ident:  # every job's audit line names the model
        audit.set_model(ident["name"], ident["version"], ident["digest"])
    summary = BatchSummary(recordings=len(items), model=label)
    ledger = None
    try:
        ledger = Ledger(out / LEDGER)
        todo: dict[str, tuple[Item, str]] = {}  # key -> (first item, sha256)
        seen: set[str] = set()
        from_ledger: list[str] = []
        for item in items:
            key, sha = _register(ledger, item, retry_failed, model_key)
            if key in seen:
                summary.duplicates += 1
                continue
            seen.add(key)
            if sha is None:
                continue  # unreadable: already recorded as failed
            status = ledger.status(key)  # a done result is checked against its digest
            if status == "unverified":
                summary.unverified += 1
            elif status == "done" or (status == "failed" and not retry_failed):
                summary.skipped += 1
                if status == "done":
                    from_ledger.append(key)
                continue
            else:
                summary.other_model += ledger.has_other_model(key)
            todo[key] = (item, sha)
        summary.ledger_models = [describe_model(*m) for m in ledger.result_models(from_ledger)]
        logger.info(
            "batch: %d recordings, %d to screen (%d of them held by the ledger for another model),"
            " %d already in the ledger, %d duplicates",
            len(items), len(todo), summary.other_model, summary.skipped, summary.duplicates,
        )  # fmt: skip
        summary.screened = len(todo)
        if service is not None:
            _run_service_jobs(ledger, todo, workers, service, progress, audit)
        else:
            keep = out if keep_poses else None
            _run_jobs(ledger, todo, workers, weights, pose_backend, progress, audit, keep)
        paths = [i.path for i in items]
        with _disk_full_is_typed(out):
            write_outputs(out, ledger, paths, fhir_contexts, dicom_sr=dicom_sr)
        rows = ledger.rows(paths)
        from mam.batch.report import write_reports  # lazy: matplotlib only when reports are written

        videos = {(i.path, i.id): i.file for i in items if i.kind == "video"}
        with _disk_full_is_typed(out):
            write_reports(out, rows, recording_of=lambda r: videos.get((r["path"], r["id"])),
                          clips=clips)  # fmt: skip
        for r in rows:
            if r["status"] == "done":
                summary.done += 1
            else:
                summary.failed += 1
    finally:
        if ledger is not None:
            ledger.close()
        audit.model = prior_model
        if own_audit:
            audit.close()
    logger.info("batch: %d done, %d failed", summary.done, summary.failed)
    return summary


@contextlib.contextmanager
def _disk_full_is_typed(out: Path):
    """A disk that fills while outputs are written is ``disk_full``, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"the disk under {out} filled up while writing results") from None
        raise


def _audit_job(audit, key: str, item: Item, sha, status: str, code, api_key=None) -> None:
    """One audit line per job run: digest, result id (of its first path), outcome."""
    if audit is None:
        return
    audit.record(
        "batch_job", route="batch", protocol="batch", content_sha256=sha,
        result_id=row_result_id(key, item.path, item.id),
        api_key_id=key_id(api_key) if api_key else None,
        outcome="ok" if status == "done" else (code or "internal_error"),
    )  # fmt: skip


def _register(
    ledger: Ledger, item: Item, retry_failed: bool, model: str | None = None
) -> tuple[str, str | None]:
    """Hash the file (reusing the ledger's hash if size and mtime are unchanged) and record its
    path under the job of its content and ``model``. A file that cannot be read becomes a failed
    job at once; then sha256 is None."""
    try:
        st = item.file.stat()
        sha = ledger.cached_hash(item.path, st.st_size, st.st_mtime_ns) or sha256_of(item.file)
    except OSError as e:
        err: MamError = (
            FileNotFoundInputError(f"file not found: {item.path}")
            if isinstance(e, FileNotFoundError)
            else UnreadableFileError(f"cannot read {item.path}: {e.strerror or type(e).__name__}")
        )
        key = "unreadable:" + hashlib.sha256(item.path.encode()).hexdigest()
        if retry_failed or ledger.status(key) is None:
            ledger.finish(key, None, item.kind, "failed", err.code, str(err))
        ledger.set_path(item, key)
        return key, None
    key = job_key(sha, item.infant, model)
    ledger.set_path(item, key, sha, st.st_size, st.st_mtime_ns)
    return key, sha


def _run_jobs(ledger, todo, workers, weights, pose_backend, progress, audit=None, keep=None):
    """Screen ``todo`` in worker processes; ``keep``: the output folder whose ``poses/`` keeps
    each video's pose (None: none kept)."""
    total, finished, failed = len(todo), 0, 0
    if not total:
        return
    weights = str(weights) if weights else None
    from mam.pose.base import default_pose_backend

    backend = pose_backend or default_pose_backend()

    def keep_path(item: Item, sha: str) -> str | None:
        if keep is None or item.kind == "pose":
            return None  # a pose file is its own pose
        return str(kept_pose_path(keep, backend, sha))

    def record(key: str, outcome: tuple[str, str | None, str, str]) -> None:
        nonlocal finished, failed
        item, sha = todo[key]
        status, code, msg, result = outcome
        ledger.finish(key, sha, item.kind, status, code, msg, result or None)
        _audit_job(audit, key, item, sha, status, code)
        finished += 1
        failed += status == "failed"
        if progress:
            progress(finished, failed, total)

    jobs = list(todo.items())
    if workers == 1:
        _init_worker(weights, pose_backend)
        for key, (item, sha) in jobs:
            record(key, _screen_one(str(item.file), item.kind, item.infant, keep_path(item, sha)))
        return
    pending = list(reversed(jobs))
    while pending:
        # spawn, not fork: forking a process that already holds ONNX Runtime / MediaPipe threads
        # (or a test runner's) can deadlock the children.
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker,
            initargs=(weights, pose_backend, max(1, (os.cpu_count() or 1) // workers),
                      os.getpid()),
        ) as pool:  # fmt: skip
            running: dict[cf.Future, str] = {}
            try:
                while pending or running:
                    while pending and len(running) < 2 * workers:
                        key, (item, sha) = pending.pop()
                        fut = pool.submit(_screen_one, str(item.file), item.kind, item.infant,
                                          keep_path(item, sha))  # fmt: skip
                        running[fut] = key
                    done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        key = running.pop(fut)
                        try:
                            outcome = fut.result()
                        except cf.process.BrokenProcessPool:
                            raise
                        except Exception as e:  # noqa: BLE001
                            outcome = ("failed", "internal_error", type(e).__name__, "")
                        record(key, outcome)  # a ledger error (disk full) stops the run
            except MamError:
                pool.shutdown(wait=False, cancel_futures=True)  # only the jobs in flight finish
                raise
            except cf.process.BrokenProcessPool:
                # A worker died (e.g. a native crash): the jobs in flight fail, the rest go on in
                # a fresh pool.
                for key in running.values():
                    record(key, ("failed", "internal_error", "worker process died", ""))
                logger.warning("batch: a worker process died; %d jobs failed", len(running))


def _run_service_jobs(ledger, todo, workers, service, progress, audit=None) -> None:
    """The same jobs as ``_run_jobs``, as requests to a service (bounded: ``workers`` at once)."""
    total, finished, failed = len(todo), 0, 0
    api_key = getattr(service, "api_key", None)  # the key the client sends, for its audit id

    def one(item: Item):
        try:
            parsed = parse_infant(item.infant)
        except MamError as e:
            return "failed", e.code, str(e), ""
        infant = parsed.model_dump() if parsed is not None else None
        return service.screen(item.file, item.kind, infant)

    with cf.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(one, item): (key, item, sha) for key, (item, sha) in todo.items()}
        for fut in cf.as_completed(futures):
            key, item, sha = futures[fut]
            status, code, msg, result = fut.result()
            ledger.finish(key, sha, item.kind, status, code, msg, result or None)
            _audit_job(audit, key, item, sha, status, code, api_key)
            finished += 1
            failed += status == "failed"
            if progress:
                progress(finished, failed, total)


def merge_shards(
    shards: Iterable[str | Path], out: str | Path, dicom_sr: bool = False
) -> BatchSummary:
    """Join the ledgers of shard folders into ``out`` (a done result wins over a failure of the
    same job), and their kept poses, and write one set of outputs for all their recordings
    (``dicom_sr``: an SR per result too, as ``run_batch`` writes them)."""
    out = check_output_dir(out)
    ledger = Ledger(out / LEDGER)
    try:
        for d in shards:
            src = Path(d) / LEDGER
            if not src.is_file():
                raise FileNotFoundInputError(f"no {LEDGER} in shard folder {d}")
            ledger.merge(src)  # digests travel with results; write_outputs checks them
            if Path(d).resolve() != out.resolve():
                with _disk_full_is_typed(out):
                    merge_kept_poses(d, out)
        with _disk_full_is_typed(out):
            write_outputs(out, ledger, dicom_sr=dicom_sr)
        rows = ledger.rows()
        from mam.batch.report import write_reports

        with _disk_full_is_typed(out):
            write_reports(out, rows)  # pages without clips: the pods' video paths are not here
    finally:
        ledger.close()
    done = sum(r["status"] == "done" for r in rows)
    return BatchSummary(recordings=len(rows), done=done, failed=len(rows) - done)
