"""Headless load sweep over concurrency, and a bounded soak, with the locust scenarios.

    python loadtest/sweep.py [--scenario tensors|grpc|video] [--levels 1 2 4 8 16 32 64]
                             [--seconds 30] [--out DIR] [--url URL | (start a local server)]
    python loadtest/sweep.py --soak --minutes 10 --users 8

Per level: N closed-loop users (no think time) start at once, a warm-up passes, then every
request completed in the next ``--seconds`` is recorded; users stop and the service drains
before the next level. Printed and written (``summary.csv``, ``level_NNNN.csv`` with every
request): throughput (req/s; clips/s of successful requests), p50/p95/p99 latency of successful
requests, error rate, and errors by status (503 = shed by design; any other 5xx is flagged).
Then the saturation throughput (max clips/s), the p95 at the level closest to half of it, and
the flags; then one more level that offers half the saturating rate as Poisson arrivals, since
closed-loop levels rarely land near 50% (``half_load.csv``). Per level also, from the server's
metrics and the process table: the batcher's mean queue wait, rows per batch, and the cores used
by the server, the load process and anything else (a disturbed level shows there). The soak
records the RSS of the server's process tree every ``--sample-s`` seconds.

Locust runs as a library (``Environment`` + ``LocalRunner``) in one load process rather than
``locust --headless --csv`` per level: the payloads are built once for all levels, every
request's status and instance count reach a listener directly (locust's own CSVs keep neither
the status nor the clips, so 503s could not be told from other 5xx), and each level gets a
fresh environment, so no statistic leaks across levels. By default the service is started here
(``service.process.ServerProcess``: loopback, free ports, auth off, a temporary BENTOML_HOME)
and stopped at the end, and the load process is this script again with ``--url`` (see
``serve_and_run``); ``--url`` alone targets a running service, loopback only unless
``--allow-remote``. The load process is one gevent loop, so at most one core, shared with the
server: part of what is measured.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.memory import (  # noqa: E402
    cpu_seconds,
    cpu_split,
    memory_report,
    tree_breakdown,
    tree_memory,
    tree_pids,
)
from loadtest.payloads import is_loopback  # noqa: E402
from loadtest.summary import (  # noqa: E402
    HEADER,
    SERVER_METRICS,
    is_ok,
    metric_sums,
    read_levels,
    row,
    server_figures,
    summarize_level,
    verdict,
    write_levels,
    write_records,
)

SCENARIOS = ("tensors", "grpc", "video")
gevent = lf = None  # the load process imports them after monkey-patching (see run_load)


def scenario(name: str):
    """(User class, name of the request that is the scenario's unit of work)."""
    return {
        "tensors": (lf.TensorsUser, lf.TENSORS),
        "grpc": (lf.GrpcUser, lf.GRPC),
        "video": (lf.VideoUser, lf.VIDEO),
    }[name]


class Recorder:
    """Request listener: keeps ``(t_s, name, latency_ms, status, clips, error)`` while active."""

    def __init__(self) -> None:
        self.records: list[tuple] = []
        self.active = False
        self.t0 = self.t1 = time.perf_counter()

    def begin(self) -> None:
        self.records, self.active, self.t0 = [], True, time.perf_counter()

    def end(self) -> float:
        self.active, self.t1 = False, time.perf_counter()
        return self.t1 - self.t0

    def __call__(self, request_type, name, response_time, response_length, response=None,
                 context=None, exception=None, **_kw) -> None:  # fmt: skip
        if not self.active:
            return
        ctx = context or {}
        status = ctx.get("status")
        if status is None:
            status = getattr(response, "status_code", None) or 0
        if exception is not None and is_ok(status):
            status = 0  # e.g. a 200 without a result
        err = "" if exception is None else f"{type(exception).__name__}: {exception}"[:200]
        t = time.perf_counter() - self.t0
        self.records.append((t, name, float(response_time), int(status), ctx.get("clips", 0), err))


def start_users(user_class, users: int, host: str):
    from locust.env import Environment

    env = Environment(user_classes=[user_class], host=host)
    rec = Recorder()
    env.events.request.add_listener(rec)
    runner = env.create_local_runner()
    runner.start(users, spawn_rate=min(max(users, 1), 100))  # locust warns above 100/s
    deadline = time.monotonic() + 30
    while runner.user_count < users and time.monotonic() < deadline:
        gevent.sleep(0.1)
    return runner, rec


def scrape(base: str) -> str:
    """The service's /metrics (no key needed), or '' when it cannot be read."""
    import urllib.request

    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            return r.read().decode()
    except OSError:
        return ""


def drain(base: str, timeout_s: float = 300.0) -> None:
    """Wait until the service has no request in flight and no recording queued, so the next
    level does not start on the previous one's backlog (users that stopped mid-request leave
    work running on the server)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = scrape(base)
        if not text:
            gevent.sleep(2)
            return
        busy = metric_sums(text, ("mam_requests_in_flight", "mam_video_jobs"))
        if sum(busy.values()) <= 0:
            return
        gevent.sleep(0.5)
    print(f"warning: service still busy after {timeout_s:g} s", flush=True)


class Window:
    """Server metrics and every process's CPU time at both ends of a measured window."""

    def __init__(self, base: str, server_pid: int | None) -> None:
        self.base, self.server_pid = base, server_pid
        self.metrics = metric_sums(scrape(self.base), SERVER_METRICS)
        self.cpu, self.t = cpu_seconds(), time.perf_counter()

    def close(self) -> dict[str, float]:
        cpu, seconds = cpu_seconds(), time.perf_counter() - self.t  # before the slow scrape
        figures = server_figures(self.metrics, metric_sums(scrape(self.base), SERVER_METRICS))
        if self.server_pid is not None:
            server = tree_pids(self.server_pid)
            client = tree_pids(os.getpid())
            srv, cli, oth = cpu_split(self.cpu, cpu, server, client, seconds)
            figures |= {"server_cpu": srv, "client_cpu": cli, "other_cpu": oth}
        return figures


def measure(user_class, users: int, args, base: str, out_csv: Path, label: str, primary: str):
    """One level: start, warm up, record ``--seconds``, stop, write its requests, drain."""
    runner, rec = start_users(user_class, users, base)
    gevent.sleep(args.warmup)
    window = Window(base, args.server_pid)
    rec.begin()
    gevent.sleep(args.seconds)
    elapsed = rec.end()
    extra = window.close()
    runner.quit()
    write_records(out_csv, rec.records)
    drain(base)
    return dataclasses.replace(summarize_level(label, users, elapsed, rec.records, primary),
                               **extra)  # fmt: skip


def sweep(args, base: str, out: Path) -> int:
    user_class, primary = scenario(args.scenario)
    levels = []
    print(f"\n{args.scenario}: {args.seconds:g} s per level after {args.warmup:g} s warm-up; "
          f"latency over successful requests ({primary!r})", flush=True)  # fmt: skip
    print(HEADER, flush=True)
    for users in args.levels:
        csv_path = out / f"level_{users:04d}.csv"
        levels.append(measure(user_class, users, args, base, csv_path, args.scenario, primary))
        write_levels(out / "summary.csv", levels)  # rewritten per level: partial runs keep it
        print(row(levels[-1]), flush=True)
    v = verdict(levels)
    print()
    for line in v.lines():
        print(line)
    flagged = bool(v.non_503_5xx)
    if args.half_users and v.saturation_clips_per_s > 0:  # a service started elsewhere
        print("(the 50% level runs on the same service right after the sweep: its batcher may "
              "still wait as it learned under the heaviest levels)")  # fmt: skip
        flagged |= half_load(args, base, out, user_class, primary, levels)
    print(f"\nwritten: {out}/summary.csv and level_NNNN.csv", flush=True)
    return 1 if flagged else 0


def half_load(args, base, out, user_class, primary, levels) -> bool:
    """p95 at 50% of saturation, measured: closed-loop levels jump (here one user can already
    load the service most of the way), so offer half the saturating request rate as Poisson
    arrivals spread over ``--half-users`` users (``locustfile.poisson_pacing``) and measure."""
    sat = max(levels, key=lambda lv: (lv.clips_per_s, -lv.users))
    if not sat.clips_per_s > 0:
        print("no throughput recorded: no 50% level")
        return False
    rate = 0.5 * sat.req_per_s
    users = args.half_users
    paced = type(f"Paced{user_class.__name__}", (user_class,),
                 {"wait_time": lf.poisson_pacing(rate / users)})  # fmt: skip
    lv = measure(paced, users, args, base, out / "level_half.csv", f"{args.scenario}@50%",
                 primary)  # fmt: skip
    write_levels(out / "half_load.csv", [lv])
    share = lv.clips_per_s / sat.clips_per_s
    print(f"p95 at 50% offered load (Poisson arrivals, {rate:.2f} req/s over {users} users): "
          f"{lv.p95_ms:.0f} ms (p50 {lv.p50_ms:.0f}, p99 {lv.p99_ms:.0f}; achieved "
          f"{lv.clips_per_s:.1f} clips/s = {share:.0%} of saturation; errors {lv.errors}"
          + (f" [{lv.errors_by_status}]" if lv.errors else "") + ")", flush=True)  # fmt: skip
    return bool(lv.other_5xx)


def soak(args, base: str, out: Path, pid: int | None) -> int:
    """One level for ``--minutes``; the server tree's memory every ``--sample-s`` seconds."""
    user_class, primary = scenario(args.scenario)
    seconds = args.minutes * 60
    print(f"\nsoak: {args.scenario}, {args.users} users, {args.minutes:g} min; RSS of the "
          f"server's process tree every {args.sample_s:g} s", flush=True)  # fmt: skip
    if pid is None:
        print("no server pid (--server-pid): memory is not recorded", flush=True)
    mem_rows: list[tuple] = []
    rec = Recorder()
    last_cpu = [cpu_seconds(), time.perf_counter()]
    me = tree_pids(os.getpid())

    def sample(t: float) -> None:
        n, rss, pss = tree_memory(pid)
        done = [r for r in rec.records if r[1] == primary]
        errors = sum(1 for r in done if not is_ok(r[3]))
        cpu, now = cpu_seconds(), time.perf_counter()
        _, _, other = cpu_split(last_cpu[0], cpu, tree_pids(pid), me, now - last_cpu[1])
        last_cpu[:] = [cpu, now]
        roles = ";".join(f"{k}={v:.0f}" for k, v in sorted(tree_breakdown(pid).items()))
        mem_rows.append((t, n, rss, pss, len(done), errors, other, os.getloadavg()[0], roles))

    if pid is not None:
        sample(0.0)  # before load
    runner, rec = start_users(user_class, args.users, base)
    rec.begin()
    window = None
    stop, next_print = rec.t0 + seconds, rec.t0 + 60
    while (now := time.perf_counter()) < stop:
        if window is None and now - rec.t0 >= args.warmup_s:
            window = Window(base, pid)  # the judged part starts after the warm-up
        if pid is not None:
            sample(now - rec.t0)
        if now >= next_print:
            done = sum(1 for r in rec.records if r[1] == primary)
            last = f", RSS {mem_rows[-1][2]:.0f} MiB" if mem_rows else ""
            print(f"  {now - rec.t0:5.0f} s: {done} requests{last}", flush=True)
            next_print += 60
        gevent.sleep(max(0.0, min(args.sample_s, stop - time.perf_counter())))
    if pid is not None:
        sample(time.perf_counter() - rec.t0)
    elapsed = rec.end()
    judged = elapsed - args.warmup_s
    extra = window.close() if window is not None else {}
    runner.quit()
    write_records(out / "soak_requests.csv", rec.records)
    with open(out / "memory.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "processes", "rss_mb", "pss_mb", "requests", "errors", "other_cpu",
                    "load1", "rss_mb_by_process"])  # fmt: skip
        for t, n, rss, pss, done, errors, other, load1, roles in mem_rows:
            w.writerow([f"{t:.1f}", n, f"{rss:.1f}", "" if pss is None else f"{pss:.1f}", done,
                        errors, f"{other:.2f}", f"{load1:.2f}", roles])  # fmt: skip
    after = [r for r in rec.records if r[0] >= args.warmup_s]
    lv = summarize_level(f"{args.scenario} soak", args.users, judged, after, primary)
    lv = dataclasses.replace(lv, **extra)
    write_levels(out / "soak_summary.csv", [lv])
    print(f"\nafter the {args.warmup_s:g} s warm-up:")
    print(HEADER)
    print(row(lv))
    if pid is not None and len(mem_rows) > 1:
        report = memory_report([(r[0], r[2]) for r in mem_rows[1:]], args.warmup_s)
        report.start_mb = mem_rows[0][2]  # before any load
        for line in report.lines():
            print(line)
        print(f"RSS by process, before load: {mem_rows[0][8]}; at the end: {mem_rows[-1][8]}")
        pss = [r[3] for r in mem_rows if r[3] is not None]
        if len(pss) > 1:
            print(f"server PSS: start {pss[0]:.0f} MiB, end {pss[-1]:.0f} MiB, max {max(pss):.0f}"
                  " MiB")  # fmt: skip
    print(f"written: {out}/memory.csv, soak_requests.csv, soak_summary.csv", flush=True)
    return 1 if lv.other_5xx else 0


def server_env(args, tmp: Path, grpc_port: int) -> dict[str, str]:
    from service.process import private_task_store

    (tmp / "tmp").mkdir(parents=True, exist_ok=True)
    env = os.environ | {
        "MAM_AUTH_DISABLED": "1",
        "MAM_GRPC_PORT": str(grpc_port),
        "MAM_GRPC_HOST": "127.0.0.1",
        "BENTOML_HOME": str(tmp / "home"),
        "BENTOML_RESULT_STORE": private_task_store(),
        "BENTOML_DO_NOT_TRACK": "True",
        "TMPDIR": str(tmp / "tmp"),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=SCENARIOS, default="tensors")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds per level not measured")
    p.add_argument("--out", type=Path, help="default: runs/loadtest/<time>-<scenario>")
    p.add_argument("--url", help="a running service (default: start one here)")
    p.add_argument("--grpc", help="its gRPC target (default: the URL's host, port 8001)")
    p.add_argument("--server-pid", type=int, help="its root process, for the soak's memory")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    p.add_argument(
        "--no-backoff",
        action="store_true",
        help="resend at once after a 503 (default: wait Retry-After, jittered)",
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the started server, e.g. MAM_MAX_LATENCY_MS=2000",
    )
    p.add_argument(
        "--half-users",
        type=int,
        default=8,
        help="users of the paced 50%%-of-saturation level after the sweep (0: skip)",
    )
    p.add_argument(
        "--half-only",
        action="store_true",
        help="only the 50%% level, at half the saturation in OUT/summary.csv",
    )
    p.add_argument("--bags", type=int, default=8, help="distinct real bags sent in turn")
    p.add_argument("--instances", type=int, help="cap instances per request (default: whole bag)")
    p.add_argument("--soak", action="store_true", help="one level for --minutes, with memory")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--sample-s", type=float, default=5.0, help="soak: memory sampling period")
    p.add_argument("--warmup-s", type=float, default=60.0, help="soak: not judged before this")
    p.add_argument("--poll-s", type=float, default=1.0, help="video: status polling period")
    return p.parse_args(argv)


def serve_and_run(args, argv: list[str], out: Path) -> int:
    """Start the service here, then run the load from a child process against it (this script
    with ``--url``): the load side is gevent-patched (locust), and ``ServerProcess``'s readiness
    check uses httpx, whose httpcore imports trio when installed, which fails under gevent's
    patched ``select``.

    The 50% level gets a fresh service: BentoML's adaptive batcher holds batches while their
    wait is below the mean wait of its last 50 batches, so after the overloaded levels it keeps
    waiting for nearly full batches, and a half-load level measured right after them would
    measure that memory, not half load."""
    if args.soak or not args.half_users:
        return with_server(args, argv, out, "server.log")
    rc = with_server(args, [*argv, "--half-users", "0"], out, "server.log")
    if (out / "summary.csv").is_file():
        rc = max(rc, with_server(args, [*argv, "--half-only"], out, "server-half.log"))
    return rc


def with_server(args, argv: list[str], out: Path, log_name: str) -> int:
    import subprocess

    from service.process import ServerProcess
    from tests.service_helpers import free_port

    with tempfile.TemporaryDirectory(prefix="mam-load-") as tmp:
        port, gport = free_port(), free_port()
        env = server_env(args, Path(tmp), gport)
        shown = " ".join(f"{k}={v}" for k, v in sorted(env.items())
                         if k.startswith("MAM_") and "KEY" not in k)  # fmt: skip
        print(f"starting the service (loopback, auth off): {shown}", flush=True)
        t = time.perf_counter()
        with ServerProcess(port, env, out / log_name) as server:
            print(f"ready in {time.perf_counter() - t:.0f} s at {server.base}", flush=True)
            child = [sys.executable, str(Path(__file__).resolve()), *argv, "--url", server.base,
                     "--grpc", f"127.0.0.1:{gport}", "--server-pid", str(server.proc.pid),
                     "--out", str(out)]  # fmt: skip
            return subprocess.run(child, env=os.environ | {"PYTHONUNBUFFERED": "1"}).returncode


def run_load(args, out: Path) -> int:
    """The load side, in a gevent-patched process: locust's users against ``args.url``."""
    global gevent, lf
    from gevent import monkey

    monkey.patch_all()  # before locust and before anything opens a socket
    import gevent as _gevent

    from loadtest import locustfile as _lf

    gevent, lf = _gevent, _lf
    base = args.url.rstrip("/")
    grpc_target = args.grpc or lf.grpc_target(base)
    lf.configure(api_key=os.environ.get("MAM_API_KEY", ""), grpc_target=grpc_target,
                 bags=args.bags, instances=args.instances, poll_s=args.poll_s,
                 backoff=not args.no_backoff)  # fmt: skip
    described = lf.payloads().describe()  # built now, not inside the first level
    with open(out / "run.txt", "a") as f:
        f.write(f"url={base} grpc={grpc_target} cpus={os.cpu_count()} "
                f"backoff={not args.no_backoff}\npayload: {described}\n")  # fmt: skip
    if args.soak:
        return soak(args, base, out, args.server_pid)
    if args.half_only:
        user_class, primary = scenario(args.scenario)
        levels = read_levels(out / "summary.csv")
        return int(half_load(args, base, out, user_class, primary, levels))
    return sweep(args, base, out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    targets = [t for t in (args.url, args.grpc) if t]
    bad = [t for t in targets if not is_loopback(t)]
    if bad and not args.allow_remote:
        print(f"refusing non-loopback target(s) {bad} (loopback only; --allow-remote to "
              "override)", file=sys.stderr)  # fmt: skip
        return 2
    if args.out is None:
        name = time.strftime("%Y%m%d-%H%M%S-") + args.scenario + ("-soak" if args.soak else "")
        args.out = ROOT / "runs" / "loadtest" / name
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.url:
        with open(args.out / "run.txt", "w") as f:
            f.write("python loadtest/sweep.py " + " ".join(argv) + "\n")
        return serve_and_run(args, argv, args.out)
    return run_load(args, args.out)


if __name__ == "__main__":
    sys.exit(main())
