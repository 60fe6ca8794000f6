"""The load-test tooling (``loadtest/``): its arithmetic on synthetic data, and one short sweep
against a locally started service.

Locust is never imported here: it monkey-patches the interpreter (gevent), which would change
every other test in the session; the sweep runs in a child process instead.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.memory import memory_report
from loadtest.payloads import is_loopback
from loadtest.summary import SUMMARY_FIELDS, Level, grpc_status, summarize_level, verdict

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "loadtest" / "sweep.py"


def level(users: int, clips: float, p95: float, shed=0, other_5xx=0, other=0) -> Level:
    errors = shed + other_5xx + other
    return Level(
        scenario="tensors", users=users, seconds=10.0, requests=100, ok=100 - errors,
        req_per_s=clips / 10, clips_per_s=clips, p50_ms=p95 / 2, p95_ms=p95, p99_ms=p95 * 1.2,
        mean_ms=p95 / 2, max_ms=p95 * 2, errors=errors, error_rate=errors / 100, shed_503=shed,
        other_5xx=other_5xx, other_errors=other, errors_by_status="",
    )  # fmt: skip


def test_verdict_saturation_half_point_and_flags():
    levels = [
        level(1, 50.0, 110.0),
        level(2, 90.0, 150.0, other=1),  # a dropped connection below saturation
        level(4, 140.0, 300.0),
        level(8, 150.0, 600.0),  # saturation
        level(16, 145.0, 1200.0, shed=3),
        level(32, 120.0, 2500.0, shed=40, other_5xx=2),  # a crash above saturation
    ]
    v = verdict(levels)
    assert (v.saturation_clips_per_s, v.saturation_users) == (150.0, 8)
    # Half of 150 is 75: 90 clips/s (2 users) is closer than 50 (1 user).
    assert (v.half_users, v.half_p95_ms) == (2, 150.0)
    assert v.errors_below_saturation == [2]
    assert v.non_503_5xx == [32]
    assert v.shed_levels == [16, 32]
    text = "\n".join(v.lines())
    assert "150.0 clips/s (at 8 users)" in text and "60% of saturation" in text
    assert "FLAGGED at users [32]" in text


def test_verdict_half_point_ignores_levels_past_saturation_and_prefers_fewer_users():
    v = verdict([level(1, 30.0, 100.0), level(2, 70.0, 200.0), level(3, 50.0, 250.0),
                 level(4, 120.0, 400.0), level(8, 60.0, 9000.0)])  # fmt: skip
    assert v.saturation_users == 4
    # 60 clips/s at 8 users is exactly half, but that level is overloaded, not half loaded;
    # 70 (2 users) and 50 (3 users) are both 10 from 60: fewer users win.
    assert (v.half_users, v.half_p95_ms) == (2, 200.0)


def test_summarize_level_counts_only_the_scenario_and_times_only_successes():
    recs = [(0.1 * i, "POST /screen_instances", 100.0 + i, 200, 10, "") for i in range(100)]
    recs += [
        (1.0, "POST /screen_instances", 5.0, 503, 10, "shed"),
        (2.0, "POST /screen_instances", 9000.0, 504, 10, "timeout"),
        (3.0, "POST /screen_instances", 20.0, 0, 0, "connection reset"),
        (4.0, "GET /screen/status", 1.0, 500, 0, "not the scenario's request"),
    ]
    lv = summarize_level("tensors", 4, 20.0, recs, "POST /screen_instances")
    assert (lv.requests, lv.ok, lv.errors) == (103, 100, 3)
    assert (lv.shed_503, lv.other_5xx, lv.other_errors) == (1, 1, 1)
    assert lv.errors_by_status == "0:1 503:1 504:1"
    assert lv.req_per_s == pytest.approx(103 / 20) and lv.clips_per_s == pytest.approx(50.0)
    assert lv.p50_ms == pytest.approx(149.5) and lv.p99_ms == pytest.approx(198.01)
    assert lv.max_ms == 199.0  # the 9 s timeout is an error, not a latency
    empty = summarize_level("tensors", 1, 5.0, [], "POST /screen_instances")
    assert empty.requests == 0 and empty.error_rate == 0 and math.isnan(empty.p95_ms)


def test_grpc_unavailable_is_shed_only_when_the_service_says_overloaded():
    assert grpc_status("UNAVAILABLE", "overloaded") == 503
    assert grpc_status("UNAVAILABLE", None) == 0  # connection refused: not load shedding
    assert grpc_status("DEADLINE_EXCEEDED") == 504 and grpc_status("INTERNAL") == 500
    assert grpc_status("OK") == 200 and grpc_status("INVALID_ARGUMENT") == 422


def test_memory_report_uses_windows_after_warm_up():
    # 0-60 s growing (warm-up), then flat at 1000 MiB with one transient spike, then +5%.
    samples = [(t, 500 + 500 * t / 60) for t in range(0, 60, 5)]
    samples += [(t, 1000.0) for t in range(60, 300, 5)]
    samples[20] = (samples[20][0], 1400.0)
    samples += [(t, 1050.0) for t in range(300, 340, 5)]
    r = memory_report(samples, warmup_s=60, window_s=30)
    assert (r.start_mb, r.warm_mb, r.end_mb, r.max_mb) == (500.0, 1000.0, 1050.0, 1400.0)
    assert r.change == pytest.approx(0.05)
    assert "flat within 10%" in "\n".join(r.lines())
    assert "NOT flat" in "\n".join(memory_report(samples, 60).lines(limit=0.01))


def test_loopback_only():
    assert is_loopback("http://127.0.0.1:3000") and is_loopback("[::1]:8001")
    assert is_loopback("localhost:8001")
    assert not is_loopback("http://10.0.0.5:3000") and not is_loopback("127.0.0.1.nip.io")
    r = subprocess.run([sys.executable, str(SWEEP), "--url", "http://10.0.0.5:3000"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "refusing non-loopback" in r.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust is not installed (dev extra)"
)
@pytest.mark.skipif(importlib.util.find_spec("bentoml") is None, reason="needs the serve extra")
def test_short_sweep_against_a_local_server(tmp_path):
    cmd = [sys.executable, str(SWEEP), "--scenario", "tensors", "--levels", "1", "2",
           "--seconds", "5", "--warmup", "1", "--bags", "2", "--out", str(tmp_path)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "saturation throughput" in r.stdout and "closest to 50% of saturation" in r.stdout
    with open(tmp_path / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == SUMMARY_FIELDS
        rows = {int(row["users"]): row for row in reader}
    assert set(rows) == {1, 2}
    assert int(rows[1]["errors"]) == 0 and int(rows[1]["requests"]) > 0
    for row in rows.values():
        assert float(row["clips_per_s"]) > 0 and float(row["p95_ms"]) > 0
        assert int(row["other_5xx"]) == 0
    assert (tmp_path / "level_0001.csv").stat().st_size > 0
    with open(tmp_path / "half_load.csv", newline="") as f:  # the paced 50% level
        (half,) = list(csv.DictReader(f))
    assert half["scenario"] == "tensors@50%" and int(half["other_5xx"]) == 0
    assert "p95 at 50% offered load" in r.stdout
    assert "real infant motion" in r.stdout or "SIMULATED" in r.stdout
