"""``mam batch`` and ``mam batch merge``: archives, resumably, on this machine or a service."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mam.cli import options as O


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError("expected I/N with 0 <= I < N")
    return i, n


def register(sub) -> None:
    s = sub.add_parser("batch", help="screen an archive (folder or manifest CSV), resumably")
    O.add_verbose(s)
    s.add_argument("input", type=Path,
                   help="folder of recordings / .npy or .npz poses, or manifest .csv")  # fmt: skip
    s.add_argument("--out", type=Path, required=True, help="output folder (ledger, results)")
    s.add_argument("--workers", type=int, default=None, help="worker processes (default: cores)")
    s.add_argument("--retry-failed", action="store_true", help="screen failed recordings again")
    O.add_weights(s)
    O.add_pose_backend(s)
    O.add_quiet(s)
    s.add_argument("--clips", action="store_true",
                   help="also cut the top FMs clips, skeleton drawn (~6 s a clip)")  # fmt: skip
    s.add_argument("--shard", type=_shard, metavar="I/N",
                   help="screen only rows I, I+N, ... (one Indexed Job pod each)")  # fmt: skip
    s.add_argument(
        "--echo-dicom-uids",
        action="store_true",
        help="put DICOM recordings' study/series UIDs in results.fhir.ndjson",
    )
    s.add_argument("--dicom-sr", action="store_true",
                   help="also write a DICOM Comprehensive SR per result, OUT/sr/<result-id>.dcm"
                        " (with --echo-dicom-uids, in the recording's study)")  # fmt: skip
    s.add_argument("--service", metavar="URL",
                   help="screen through a running service (API key from MAM_API_KEY); "
                        "--workers requests at a time; it returns no poses to keep")  # fmt: skip
    s.add_argument("--no-keep-poses", dest="keep_poses", action="store_false",
                   help="do not keep each video's pose in OUT/poses/ (by default kept, so that "
                        "mam review's skeleton and --export do not estimate it again)")  # fmt: skip
    s.set_defaults(func=run)

    m = s.add_verb("merge", description="join the outputs of sharded batch runs")
    O.add_verbose(m)
    m.add_argument("shards", nargs="+", type=Path, help="shard output folders")
    m.add_argument("--out", type=Path, required=True, help="merged output folder")
    m.add_argument("--dicom-sr", action="store_true",
                   help="also write a DICOM Comprehensive SR per result, OUT/sr/<result-id>.dcm"
                        " (each opens a study of its own)")  # fmt: skip
    m.set_defaults(func=run_merge)


def _progress(quiet: bool):
    """A bar on a terminal, a line every 10 s otherwise (logs of a Job), or nothing."""
    if quiet:
        return None, None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc="batch", unit="rec")

        def progress(done: int, failed: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix(failed=failed, refresh=False)
            bar.refresh()

        return bar, progress
    t0 = time.monotonic()
    last = [0.0]

    def progress(done: int, failed: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 10:
            return
        last[0] = now
        rate = done / max(now - t0, 1e-9)
        eta = (total - done) / rate if rate else 0.0
        print(f"batch: {done}/{total} screened, {failed} failed, {rate * 60:.1f}/min, "
              f"ETA {eta:.0f} s", file=sys.stderr)  # fmt: skip

    return None, progress


def run(args: argparse.Namespace) -> int:
    from mam.batch import check_output_dir, run_batch

    if args.service:
        O.reject(args, ["weights", "pose_backend"], "the service screens with its own settings")
    check_output_dir(args.out)  # fail fast, before any work or progress bar
    if args.service and args.keep_poses and not args.quiet:
        print("mam batch: the service returns results, not poses: none are kept (mam review "
              "estimates a recording's pose when it first needs it)", file=sys.stderr)  # fmt: skip
    bar, progress = _progress(args.quiet)
    service = None
    if args.service:
        from mam.batch.service_client import ServiceClient

        service = ServiceClient(args.service)
    try:
        s = run_batch(args.input, args.out, args.workers, args.retry_failed, args.weights,
                      args.pose_backend, progress, shard=args.shard,
                      service=service, clips=args.clips,
                      echo_dicom_uids=args.echo_dicom_uids,
                      keep_poses=args.keep_poses, dicom_sr=args.dicom_sr)  # fmt: skip
    except ConnectionError as e:
        raise O.UsageError(str(e)) from None
    finally:
        if bar is not None:
            bar.close()
        if service is not None:
            service.close()
    held = f" (model {'; '.join(s.ledger_models)})" if s.ledger_models else ""
    print(f"{s.recordings} recordings: {s.done} done, {s.failed} failed "
          f"({s.screened} screened now, {s.skipped} from the ledger{held}, "
          f"{s.duplicates} duplicates); model {s.model}; results in {args.out}")  # fmt: skip
    if s.unverified:
        print(f"mam batch: {s.unverified} results in the ledger carried no digest (written before "
              "results were digested): screened again", file=sys.stderr)  # fmt: skip
    if s.other_model:
        print(f"mam batch: the ledger held results of another model for {s.other_model} of them: "
              f"screened again with {s.model}", file=sys.stderr)  # fmt: skip
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from mam.batch import merge_shards

    s = merge_shards(args.shards, args.out, dicom_sr=args.dicom_sr)
    print(f"{len(args.shards)} shards merged: {s.recordings} recordings, {s.done} done, "
          f"{s.failed} failed; results in {args.out}")  # fmt: skip
    return 0
