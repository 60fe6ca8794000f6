"""The archive figure: recordings per hour through ``mam batch`` for 5-minute 1080p recordings,
in process and through the service (``mam batch --service URL`` against a ``mam serve`` started
here), as a ratio measured in one run.

The archive is ``--recordings`` distinct simulated infants (real-motion backgrounds, the external
pool), each ``--seconds`` long at ``--size``, 25 fps, rendered by ``mam synth --render`` (one
rendering process per core) into ``--cache-dir`` and reused by later runs: rendering 5 minutes of
1080p costs about as much as screening it several times. Each pass is the whole ``mam batch``
command as a user runs it (default workers: one per core; with ``--service``, that many requests
at a time) into a fresh output folder; passes alternate in-process / service (ABBA over
``--rounds``) so that load from other processes on a shared machine hits both alike. The service
is started once before the first pass (its start-up is not counted: a service is long-lived) with
``--no-auth`` on a free loopback port and the gRPC port off; it uses the same cores.

    python bench/archive_throughput.py                       # 3 x 5 min 1080p, 1 round each
    python bench/archive_throughput.py --rounds 2 --cache-dir /tmp/archive-cache

Figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAM = [sys.executable, "-m", "mam"]


def render_archive(cache: Path, n: int, seconds: int, size: str, seed: int) -> Path:
    """``n`` rendered recordings (cached under ``cache``); returns their folder."""
    name = f"archive-n{n}-{seconds}s-{size}-seed{seed}"
    done = cache / name
    if len(list((done / "videos").glob("*.mp4"))) == n:
        return done / "videos"
    partial = cache / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    subprocess.run(
        [*MAM, "synth", "--out", str(partial), "--infants", str(n), "--seed", str(seed),
         "--min-s", str(seconds), "--max-s", str(seconds), "--backgrounds", "real", "--pool",
         "external", "--render", size, "--workers", str(min(n, os.cpu_count() or 1))],
        check=True, cwd=ROOT,
    )  # fmt: skip
    shutil.rmtree(done, ignore_errors=True)
    partial.rename(done)
    print(f"rendered {n} recordings in {time.perf_counter() - t:.0f} s (cached)", flush=True)
    return done / "videos"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*MAM, "serve", "--port", str(port), "--grpc-port", "0", "--no-auth"],
        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mam serve exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit("mam serve was not ready within 300 s")


def batch_pass(videos: Path, out: Path, service: str | None) -> tuple[float, dict]:
    """One whole ``mam batch`` command; wall seconds and each recording's answer (by file name:
    classification and FMs frequency, or the error code)."""
    cmd = [*MAM, "batch", str(videos), "--out", str(out), "-q"]
    if service:
        cmd += ["--service", service]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"mam batch failed ({r.returncode}): {r.stderr[-2000:]}")
    lines = (out / "results.jsonl").read_text().splitlines()
    results = [json.loads(line) for line in lines if line.strip()]
    return wall, {
        Path(x["path"]).name: x.get("error_code")
        or (x["classification"]["label"], round(x["fms_frequency"], 4))
        for x in results
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recordings", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1, help="passes of each, alternating (ABBA)")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "mam-archive",
                    help="rendered recordings, reused between runs")  # fmt: skip
    ap.add_argument("--no-service", action="store_true", help="in-process passes only")
    args = ap.parse_args(argv)
    videos = render_archive(args.cache_dir, args.recordings, args.seconds, args.size, args.seed)
    n = len(list(videos.glob("*.mp4")))
    tmp = Path(tempfile.mkdtemp(prefix="mam-archive-bench-"))
    service = proc = None
    try:
        if not args.no_service:
            port = free_port()
            t = time.perf_counter()
            proc = start_service(port, tmp / "serve.log")
            service = f"http://127.0.0.1:{port}"
            print(f"mam serve ready in {time.perf_counter() - t:.0f} s", flush=True)
        print(f"# {os.cpu_count()} CPUs; {n} recordings of {args.seconds} s at {args.size}, "
              f"25 fps; load {loadavg()}", flush=True)  # fmt: skip
        kinds = ["in-process"] + ([] if service is None else ["service"])
        walls: dict[str, list[float]] = {k: [] for k in kinds}
        answers = []
        for r in range(args.rounds):
            order = kinds if r % 2 == 0 else kinds[::-1]
            for k in order:
                out = tmp / f"out-{k}-{r}"
                before = loadavg()
                wall, got = batch_pass(videos, out, service if k == "service" else None)
                walls[k].append(wall)
                answers.append(got)
                errors = [v for v in got.values() if isinstance(v, str)]
                print(f"round {r + 1} {k:10s} {wall:7.1f} s, {n - len(errors)}/{n} screened"
                      f"{' (errors: ' + ', '.join(sorted(set(errors))) + ')' if errors else ''}; "
                      f"{n / wall * 3600:6.1f} recordings/hour, "
                      f"{n * args.seconds / wall:5.2f}x real time; load {before} -> "
                      f"{loadavg()}", flush=True)  # fmt: skip
        figures = {"same_answers": all(a == answers[0] for a in answers)}
        print("every pass gave the same answers" if figures["same_answers"] else
              "the passes' answers differ")  # fmt: skip
        for k in kinds:
            wall = statistics.median(walls[k])
            figures[k] = {"wall_s": [round(w, 1) for w in walls[k]],
                          "recordings_per_hour": round(n / wall * 3600, 1),
                          "x_real_time": round(n * args.seconds / wall, 2)}  # fmt: skip
            print(f"{k:10s} median {wall:7.1f} s: {n / wall * 3600:6.1f} recordings/hour "
                  f"({n * args.seconds / wall:.2f}x real time)")  # fmt: skip
        if service is not None:
            ratio = statistics.median(walls["in-process"]) / statistics.median(walls["service"])
            figures["service_over_in_process"] = round(ratio, 3)
            print(f"service / in-process throughput: {ratio:.2f} (same run)")
        print(json.dumps(figures))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
