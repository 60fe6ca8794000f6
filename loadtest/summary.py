"""Per-level figures and the sweep's verdict, from recorded requests (no locust import, so the
tests can check the arithmetic without gevent's monkey-patching).

A *record* is one completed request: ``(t_s, name, latency_ms, status, clips, error)`` with
``status`` HTTP-like (gRPC codes are mapped, see :func:`grpc_status`; 0: no response at all).
Latency percentiles are over successful requests only: a shed request answers fast and would
make an overloaded level look quick.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

RECORD_FIELDS = ("t_s", "name", "latency_ms", "status", "clips", "error")


@dataclass
class Level:
    scenario: str
    users: int
    seconds: float
    requests: int
    ok: int
    req_per_s: float
    clips_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int
    error_rate: float
    shed_503: int
    other_5xx: int
    other_errors: int
    errors_by_status: str
    # From the server's /metrics over the window (NaN without them): where the time went.
    queue_wait_ms: float = math.nan  # mean wait of a batcher call beyond its batch's compute
    compute_ms: float = math.nan  # mean clip-network time per executed batch
    batch_rows: float = math.nan  # mean instances per executed batch
    # Cores used over the window (NaN unknown): the service, the load process, anything else.
    server_cpu: float = math.nan
    client_cpu: float = math.nan
    other_cpu: float = math.nan


SUMMARY_FIELDS = tuple(f.name for f in fields(Level))


def grpc_status(code_name: str, mam_code: str | None = None) -> int:
    """HTTP-like status of a gRPC outcome, so both protocols share one breakdown. UNAVAILABLE is
    503 (shed) only when the service said ``overloaded``; otherwise it is a transport failure."""
    if code_name == "OK":
        return 200
    if code_name == "UNAVAILABLE":
        return 503 if mam_code == "overloaded" else 0
    return {
        "INVALID_ARGUMENT": 422,
        "UNAUTHENTICATED": 401,
        "PERMISSION_DENIED": 403,
        "NOT_FOUND": 404,
        "RESOURCE_EXHAUSTED": 413,
        "DEADLINE_EXCEEDED": 504,
        "INTERNAL": 500,
        "UNKNOWN": 500,
        "UNIMPLEMENTED": 501,
        "DATA_LOSS": 500,
    }.get(code_name, 0)


def is_ok(status: int) -> bool:
    return 200 <= status < 400


def summarize_level(
    scenario: str, users: int, seconds: float, records: Sequence[tuple], primary: str
) -> Level:
    """Figures of one level over the requests named ``primary`` (the scenario's unit of work)."""
    rows = [r for r in records if r[1] == primary]
    ok = [r for r in rows if is_ok(r[3])]
    lat = np.array([r[2] for r in ok], float)
    q = np.percentile(lat, [50, 95, 99]) if len(lat) else [math.nan] * 3
    bad = Counter(r[3] for r in rows if not is_ok(r[3]))
    shed = bad.get(503, 0)
    other_5xx = sum(n for s, n in bad.items() if 500 <= s < 600 and s != 503)
    n_err = sum(bad.values())
    return Level(
        scenario=scenario,
        users=users,
        seconds=round(seconds, 2),
        requests=len(rows),
        ok=len(ok),
        req_per_s=len(rows) / seconds if seconds > 0 else math.nan,
        clips_per_s=sum(r[4] for r in ok) / seconds if seconds > 0 else math.nan,
        p50_ms=float(q[0]),
        p95_ms=float(q[1]),
        p99_ms=float(q[2]),
        mean_ms=float(lat.mean()) if len(lat) else math.nan,
        max_ms=float(lat.max()) if len(lat) else math.nan,
        errors=n_err,
        error_rate=n_err / len(rows) if rows else 0.0,
        shed_503=shed,
        other_5xx=other_5xx,
        other_errors=n_err - shed - other_5xx,
        errors_by_status=" ".join(f"{s}:{n}" for s, n in sorted(bad.items())),
    )


@dataclass
class Verdict:
    saturation_clips_per_s: float
    saturation_users: int
    half_users: int  # up to saturation, the level whose throughput is closest to 50% of it
    half_clips_per_s: float
    half_p95_ms: float
    errors_below_saturation: list[int]  # levels below the saturating one with any error
    non_503_5xx: list[int]  # levels with a 5xx other than 503 (crashes, timeouts)
    shed_levels: list[int]  # levels where the service shed load (503)

    def lines(self) -> list[str]:
        sat = self.saturation_clips_per_s
        frac = self.half_clips_per_s / sat if sat else math.nan
        return [
            f"saturation throughput: {sat:.1f} clips/s (at {self.saturation_users} users)",
            f"p95 at the level closest to 50% of saturation: {self.half_p95_ms:.0f} ms "
            f"(at {self.half_users} users, {self.half_clips_per_s:.1f} clips/s = {frac:.0%} "
            "of saturation)",
            "errors below saturation: "
            + (
                f"at users {self.errors_below_saturation}"
                if self.errors_below_saturation
                else "none"
            ),  # fmt: skip
            "5xx other than 503: "
            + (f"FLAGGED at users {self.non_503_5xx}" if self.non_503_5xx else "none"),
            "load shedding (503): "
            + (f"at users {self.shed_levels}" if self.shed_levels else "never"),
        ]


def verdict(levels: Sequence[Level]) -> Verdict:
    """Saturation = the highest clips/s of any level. The "50%" level is, among the levels up to
    the saturating one (the rising side: past saturation throughput can fall again, and such a
    level is overloaded, not half loaded), the one whose clips/s is closest to half of it (ties:
    fewer users); it is reported with its actual share, which a closed-loop sweep may leave far
    from 50% (the sweep then measures a paced level, see ``sweep.half_load``)."""
    if not levels:
        raise ValueError("no levels")
    sat = max(levels, key=lambda lv: (lv.clips_per_s, -lv.users))
    half = sat.clips_per_s / 2
    rising = [lv for lv in levels if lv.users <= sat.users]
    near = min(rising, key=lambda lv: (abs(lv.clips_per_s - half), lv.users))
    return Verdict(
        saturation_clips_per_s=sat.clips_per_s,
        saturation_users=sat.users,
        half_users=near.users,
        half_clips_per_s=near.clips_per_s,
        half_p95_ms=near.p95_ms,
        errors_below_saturation=[lv.users for lv in levels if lv.users < sat.users and lv.errors],
        non_503_5xx=[lv.users for lv in levels if lv.other_5xx],
        shed_levels=[lv.users for lv in levels if lv.shed_503],
    )


def write_records(path: Path, records: Iterable[tuple]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RECORD_FIELDS)
        for t, name, ms, status, clips, err in records:
            w.writerow([f"{t:.3f}", name, f"{ms:.1f}", status, clips, err])


def write_levels(path: Path, levels: Iterable[Level]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, SUMMARY_FIELDS)
        w.writeheader()
        for lv in levels:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in asdict(lv).items()})  # fmt: skip


def read_levels(path: Path) -> list[Level]:
    """The rows of a ``summary.csv`` back as levels."""
    types = {f.name: f.type for f in fields(Level)}
    conv = {"int": int, "float": float, "str": str}
    with open(path, newline="") as f:
        return [Level(**{k: conv[types[k]](v) for k, v in r.items() if k in types})
                for r in csv.DictReader(f)]  # fmt: skip


HEADER = (f"{'users':>5} {'req/s':>7} {'clips/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'reqs':>6} {'errors':>6} {'err %':>6} {'503':>5} {'5xx':>5} {'other':>5} "
          f"{'wait ms':>7} {'rows':>5} {'cpu srv/cli/oth':>15}")  # fmt: skip


def row(lv: Level) -> str:
    return (f"{lv.users:5d} {lv.req_per_s:7.2f} {lv.clips_per_s:8.1f} {lv.p50_ms:8.0f} "
            f"{lv.p95_ms:8.0f} {lv.p99_ms:8.0f} {lv.requests:6d} {lv.errors:6d} "
            f"{lv.error_rate:6.1%} {lv.shed_503:5d} {lv.other_5xx:5d} {lv.other_errors:5d} "
            f"{lv.queue_wait_ms:7.0f} {lv.batch_rows:5.1f} "
            f"{lv.server_cpu:5.2f}/{lv.client_cpu:4.2f}/{lv.other_cpu:4.2f}"
            + (f"  [{lv.errors_by_status}]" if lv.errors else ""))  # fmt: skip


def metric_sums(text: str, names: Sequence[str]) -> dict[str, float]:
    """Sum of every sample of each named metric in a Prometheus text exposition."""
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            try:
                out[name] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                pass
    return out


SERVER_METRICS = (
    "mam_queue_wait_seconds_sum", "mam_queue_wait_seconds_count",
    "mam_model_compute_seconds_sum", "mam_model_compute_seconds_count",
    "mam_batch_rows_sum", "mam_batch_rows_count",
)  # fmt: skip


def server_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean queue wait, compute per batch and rows per batch between two ``metric_sums``."""

    def mean(name: str, scale: float = 1.0) -> float:
        n = after[name + "_count"] - before[name + "_count"]
        return (after[name + "_sum"] - before[name + "_sum"]) / n * scale if n > 0 else math.nan

    return {
        "queue_wait_ms": mean("mam_queue_wait_seconds", 1000.0),
        "compute_ms": mean("mam_model_compute_seconds", 1000.0),
        "batch_rows": mean("mam_batch_rows"),
    }
