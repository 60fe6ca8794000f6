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

from mam import DISCLAIMER
from mam.cli import options as O
from mam.errors import MamError


def register(sub) -> None:
    s = sub.add_parser("screen", help="screen one recording (or a precomputed pose file)")
    O.add_verbose(s)
    s.add_argument("video", nargs="?", type=Path,
                   help="recording (mp4/mov/avi/mkv..., or a DICOM video object)")  # fmt: skip
    s.add_argument("--pose", type=Path, help="precomputed 3D pose .npy [T, 17, 3] at 25 fps")
    O.add_infant(s)
    s.add_argument("--format", choices=["text", "json", "fhir", "dicom-sr"], default="text",
                   help="output format (fhir: an HL7 FHIR R4 transaction Bundle; dicom-sr: a "
                        "DICOM Comprehensive SR, written to --out)")  # fmt: skip
    s.add_argument("--out", type=Path, metavar="FILE",
                   help="write the output to FILE (atomically) instead of stdout; required "
                        "with --format dicom-sr")  # fmt: skip
    g = s.add_argument_group("FHIR output (--format fhir)")
    g.add_argument("--fhir-subject", metavar="Patient/ID",
                   help="the patient of the result (a FHIR reference; never logged)")  # fmt: skip
    g.add_argument("--fhir-encounter", metavar="Encounter/ID", help="the encounter, likewise")
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
    if args.format != "fhir":
        O.reject(args, ["fhir_subject", "fhir_encounter"], "only with --format fhir")
    if args.format not in ("fhir", "dicom-sr"):
        O.reject(args, ["echo_dicom_uids"], "only with --format fhir or --format dicom-sr")
    if args.format == "dicom-sr" and args.out is None:
        raise O.UsageError("--format dicom-sr writes a binary DICOM file: give --out FILE.dcm")
    if args.out is not None:
        _check_out(args.out)  # before any work
    fhir = _fhir_context(args) if args.format == "fhir" else None  # references checked first
    source = None
    if args.format == "dicom-sr" and args.echo_dicom_uids and args.video is not None:
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
    if args.format == "dicom-sr":
        from mam.dicom_sr import sr_bytes

        _write(args.out, sr_bytes(result, result_id, source))
        return 0
    if fhir is not None:
        import json

        from mam.fhir import FhirCodes, build_bundle

        output = json.dumps(build_bundle(result, fhir, FhirCodes.from_env()), indent=2)
    else:
        output = result.model_dump_json(indent=2) if args.format == "json" else text(result)
    if args.out is None:
        print(output)
    else:
        _write(args.out, (output + "\n").encode())
    return 0


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
    from mam.audit import ENV_FILE, OFF, STDOUT, AuditLog

    target = os.environ.get(ENV_FILE, "")
    return AuditLog.from_env() if target and target.lower() not in (OFF, STDOUT) else None


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
        subject=args.fhir_subject,
        encounter=args.fhir_encounter,
        study_instance_uid=getattr(uids, "study_instance_uid", None),
        series_instance_uid=getattr(uids, "series_instance_uid", None),
    )


def _p(x: float) -> str:
    """Three decimals, without printing a tiny probability as if it were zero."""
    return "<0.001" if x < 0.0005 else ">0.999" if x > 0.9995 else f"{x:.3f}"


def text(r) -> str:
    """The result as a clinician reads it: the answer, whether its numbers may be used, why."""
    c, d = r.classification, r.domain
    unusable = "" if r.probabilities_usable else "   [not to be used: see the warning]"
    if c.label == "indeterminate":
        head = "Classification:    INDETERMINATE (the model cannot speak for this recording)"
    else:
        head = (f"Classification:    {c.label.upper()} (P(risk) = {_p(r.risk_probability)}, "
                f"threshold {c.threshold:.2f})")  # fmt: skip
    score = "not scored" if d.score is None else f"score {d.score:.2f}, threshold {d.threshold:.2f}"
    lines = [
        head,
        f"P(risk):           {_p(r.risk_probability)} (model alone: {c.model_label}){unusable}",
        f"FMs frequency:     {r.fms_frequency:.2f} of {len(r.clips)} clips ({r.fms_category})"
        + unusable,
        f"Training domain:   {'in domain' if d.in_domain else 'OUT OF DOMAIN'} ({score})",
        f"Tracking quality:  {r.quality.tracked_fraction:.0%} of {r.quality.duration_s:.0f} s "
        f"tracked, longest gap {r.quality.longest_gap_s:.1f} s",
        "Top FMs clips:     "
        + ", ".join(
            f"{c.start_s:.1f}-{c.end_s:.1f} s (P={c.fms_probability:.2f})" for c in r.top_fms_clips
        ),
        f"Model:             {r.model.name} {r.model.version}, digest {r.model.digest[:12]} "
        f"({r.model.provenance}); "
        f"{r.model.runtime}/{r.model.device}; pose {r.model.pose_backend}",
    ]
    lines += [f"Warning:           {w}" for w in r.warnings]
    lines.append(DISCLAIMER)
    return "\n".join(lines)
