"""``mam screen``: one recording (also a DICOM video object) or pose file -> the result, as text,
JSON, an HL7 FHIR R4 Bundle (``--format fhir``, see ``mam.fhir``) or a DICOM Comprehensive SR
(``--format dicom-sr``, see ``mam.dicom_sr``). Text goes to stdout or ``--out FILE``; the SR is
binary, so it needs ``--out`` (never written to a terminal or a pipe by accident)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

from mam import formats
from mam.cli import options as O
from mam.errors import MamError


def register(sub) -> None:
    s = sub.add_parser("screen", help="screen one recording (or a precomputed pose file)")
    O.add_verbose(s)
    s.add_argument("video", nargs="?", type=Path,
                   help="recording (mp4/mov/avi/mkv..., or a DICOM video object)")  # fmt: skip
    s.add_argument("--pose", type=Path, help="precomputed 3D pose .npy [T, 17, 3] at 25 fps")
    O.add_infant(s)
    s.add_argument("--format", choices=formats.names(), default="text",
                   help="output format (" + "; ".join(
                       f"{f.name}: {f.help}" + (", written to --out" if f.binary else "")
                       for f in formats.formats()) + ")")  # fmt: skip
    s.add_argument("--out", type=Path, metavar="FILE",
                   help="write the output to FILE (atomically) instead of stdout; required "
                        "with a binary format (" + ", ".join(
                            f.name for f in formats.formats() if f.binary) + ")")  # fmt: skip
    g = s.add_argument_group("FHIR output (--format fhir)")
    O.add_fhir_linkage(g)
    g.add_argument("--echo-dicom-uids", action="store_true",
                   help="put a DICOM recording's study and series UIDs in the Bundle; with "
                        "--format dicom-sr, file the SR in the recording's study (its patient "
                        "and study attributes, accession number) referencing its series and "
                        "SOP instance")  # fmt: skip
    O.add_weights(s)
    O.add_pose_backend(s)
    s.add_argument("--no-abstain", action="store_true",
                   help="research use: keep the model's label when the recording is out of its "
                        "training domain (still marked not to be used)")  # fmt: skip
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mam.schemas import InfantData
    from mam.screening import Screener, ScreeningOptions

    if (args.video is None) == (args.pose is None):
        raise O.UsageError("give exactly one of VIDEO or --pose POSE.npy")
    if args.pose is not None:
        O.reject(args, ["pose_backend"], "not used with --pose (the poses are given)")
    fmt = formats.get(args.format)
    if "fhir" not in fmt.uses:
        O.reject(args, O.FHIR_LINKAGE, "only with " + _using("fhir"))
    if "dicom_source" not in fmt.uses:
        O.reject(args, ["echo_dicom_uids"], "only with " + _using("dicom_source"))
    if fmt.binary and args.out is None:
        raise O.UsageError(f"--format {fmt.name} writes a binary file ({fmt.media_type}): "
                           "give --out FILE")  # fmt: skip
    if args.out is not None:
        _check_out(args.out)  # before any work
    fhir = _fhir_context(args) if "fhir" in fmt.uses else None  # references checked first
    source = None
    if fhir is None and args.echo_dicom_uids and args.video is not None:
        from mam.dicom_sr import read_source

        source = read_source(args.video)  # checked before any screening
    infant = InfantData.parse(
        sex=args.sex,
        gestational_age_weeks=args.gestational_age_weeks,
        birth_weight_g=args.birth_weight_g,
        corrected_age_weeks=args.corrected_age_weeks,
    )
    screener = Screener(
        args.weights,
        ScreeningOptions(pose_backend=args.pose_backend, abstain=not args.no_abstain),
    )
    audit, t0 = _audit_log(), time.perf_counter()
    if audit is not None:
        audit.set_model(screener.meta.name, screener.meta.version, screener.model_digest)
    result_id = fhir.result_id if fhir is not None else str(uuid.uuid4())
    try:
        result = _screen(args, screener, infant)
    except MamError as e:
        _audit(audit, args, result_id, e.code, t0)
        raise
    _audit(audit, args, result_id, "ok", t0)
    output = fmt.render(result, formats.RenderContext(result_id, fhir=fhir, source=source))
    if isinstance(output, bytes):
        _write(args.out, output)
    elif args.out is None:
        print(output)
    else:
        _write(args.out, (output + "\n").encode())
    return 0


def _using(need: str) -> str:
    """``--format fhir or --format dicom-sr``: the formats that read an input."""
    return " or ".join(f"--format {f.name}" for f in formats.formats() if need in f.uses)


def _check_out(path: Path) -> None:
    from mam.errors import OutputNotWritableError

    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputNotWritableError(f"--out {path}: not a file in a folder you can write to")


def _write(path: Path, data: bytes) -> None:
    from mam.errors import OutputNotWritableError
    from mam.files import write_atomic

    try:
        write_atomic(path, data)
    except OSError as e:
        raise OutputNotWritableError(f"--out {path}: {e.strerror or type(e).__name__}") from None


def _audit_log():
    """The audit trail when ``MAM_AUDIT_FILE`` names a file (stdout carries the result here, so
    ``-`` writes none, as does ``off`` or no setting)."""
    from mam.audit import OFF, STDOUT, AuditLog
    from mam.settings import current

    s = current()
    target = s.audit_file or ""
    return AuditLog.from_settings(s) if target and target.lower() not in (OFF, STDOUT) else None


def _audit(audit, args: argparse.Namespace, result_id: str, outcome: str, t0: float) -> None:
    """One ``screening_request`` line: content digest, result id, outcome, model; no path."""
    if audit is None:
        return
    from mam.model.weights import sha256_of

    try:
        sha = sha256_of(args.pose if args.pose is not None else args.video)
    except OSError:
        sha = None
    try:
        audit.record("screening_request", route="screen", protocol="cli", content_sha256=sha,
                     result_id=result_id, format=args.format, outcome=outcome,
                     duration_ms=(time.perf_counter() - t0) * 1000)  # fmt: skip
    finally:
        audit.close()


def _screen(args: argparse.Namespace, screener, infant):
    if args.pose is not None:
        return screener.screen_pose_file(args.pose, infant)
    else:
        bar = progress = None
        if sys.stderr.isatty() and not args.quiet:
            from tqdm import tqdm

            bar = tqdm(desc="pose", unit="frame")

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

        try:
            return screener.screen_video(args.video, infant, progress)
        finally:
            if bar is not None:
                bar.close()


def _fhir_context(args: argparse.Namespace):
    from mam.dicom_video import read_uids
    from mam.fhir import FhirContext

    uids = read_uids(args.video) if args.echo_dicom_uids and args.video is not None else None
    return FhirContext(
        result_id=str(uuid.uuid4()),
        **O.fhir_linkage(args),
        content_sha256=_content_sha256(args),
        study_instance_uid=getattr(uids, "study_instance_uid", None),
        series_instance_uid=getattr(uids, "series_instance_uid", None),
    )


def _content_sha256(args: argparse.Namespace) -> str | None:
    """SHA-256 of the screened file: the FHIR Provenance's input entity (never its path)."""
    from mam.model.weights import sha256_of

    path = args.pose if args.pose is not None else args.video
    try:
        return sha256_of(path) if path is not None else None
    except OSError:
        return None  # a missing file fails with its own error when it is screened
