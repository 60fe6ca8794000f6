"""``mam batch`` throughput on an archive of demo recordings, and what the ledger and the outputs
cost as a share of the run, in one run.

The archive is ``--recordings`` copies of ``demo/infant_demo.mp4`` (60 s, 720p), remuxed with a
distinct container comment each so that their content hashes differ (identical content would be
screened once, by design). For 1 and 2 workers: recordings per hour, video-seconds per
wall-second. Overhead: hashing, the ledger's writes, ``results.csv``/``results.jsonl`` and the
HTML reports, each timed on its own over the finished ledger, as a share of the 1-worker run.
Figures, never assertions.

    python bench/batch_throughput.py                 # 4 recordings
    python bench/batch_throughput.py --recordings 8 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mam import batch  # noqa: E402
from mam.model.weights import sha256_of  # noqa: E402

DEMO = ROOT / "demo" / "infant_demo.mp4"


def make_archive(folder: Path, n: int) -> float:
    """``n`` distinct-hash remuxes of the demo; returns the seconds of video per recording."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with av.open(str(DEMO)) as src, av.open(str(folder / f"rec{i:03d}.mp4"), "w") as dst:
            dst.metadata["comment"] = f"bench copy {i}"
            s_in = src.streams.video[0]
            s_out = dst.add_stream_from_template(s_in)
            for packet in src.demux(s_in):
                if packet.dts is None:
                    continue
                packet.stream = s_out
                dst.mux(packet)
    with av.open(str(DEMO)) as c:
        return float(c.duration / av.time_base)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recordings", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mam-batch-bench-"))
    try:
        archive = tmp / "archive"
        video_s = make_archive(archive, args.recordings)
        print(f"# {platform.machine()}, {os.cpu_count()} CPUs; {args.recordings} recordings of "
              f"{video_s:.0f} s (demo, 720p)")  # fmt: skip
        walls = {}
        for w in args.workers:
            out = tmp / f"out-w{w}"
            t = time.perf_counter()
            s = batch.run_batch(archive, out, workers=w)
            walls[w] = time.perf_counter() - t
            rate = args.recordings / walls[w]
            print(f"workers={w}: {walls[w]:.1f} s, {s.done} done, {s.failed} failed; "
                  f"{rate * 3600:.0f} recordings/hour, "
                  f"{rate * video_s:.2f} video-s per wall-s")  # fmt: skip

        # Overhead, each part on its own, against the first run.
        w0 = args.workers[0]
        out = tmp / f"out-w{w0}"
        files = sorted(archive.iterdir())
        t = time.perf_counter()
        for f in files:
            sha256_of(f)
        hashing = time.perf_counter() - t
        ledger = batch.Ledger(out / batch.LEDGER)
        rows = ledger.rows()
        scratch = batch.Ledger(tmp / "scratch.sqlite")
        t = time.perf_counter()
        for r in rows:  # the same writes a run makes: one path row and one job row each
            item = batch.Item(Path(r["path"]), r["path"], r["id"])
            scratch.set_path(item, r["key"], r["sha256"], 1, 1)
            scratch.finish(r["key"], r["sha256"], "video", r["status"], r["error_code"],
                           r["error"], r["result"])  # fmt: skip
        writes = time.perf_counter() - t
        scratch.close()
        t = time.perf_counter()
        batch.write_outputs(out, ledger)
        outputs = time.perf_counter() - t
        reports = float("nan")
        try:
            from mam.batch.report import write_reports

            t = time.perf_counter()
            write_reports(out, rows)
            reports = time.perf_counter() - t
        except ImportError:
            pass
        ledger.close()
        total = walls[w0]
        for name, v in [("hashing", hashing), ("ledger writes", writes),
                        ("results.csv/jsonl", outputs), ("HTML reports", reports)]:  # fmt: skip
            print(f"{name:>18}: {v * 1e3:8.1f} ms  {v / total:7.3%} of the {w0}-worker run")
        share = (hashing + writes + outputs + (0 if reports != reports else reports)) / total
        print(f"{'all':>18}: {share:7.3%} (target < 2%)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
