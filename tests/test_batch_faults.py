"""``mam batch`` under faults: a damaged ledger, a result altered in it, a disk that fills during
the run, and ``kill -9`` of the batch process with its workers running. Each fault is a typed
``error [code]`` naming the file, with a ``fix:`` line and exit status 2, never a traceback; no
worker outlives its batch process."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from mam import batch
from mam.batch import ledger as ledger_mod
from mam.batch import outputs as outputs_mod
from mam.cli import main
from mam.errors import AlteredResultError, InputError, UnverifiedResultError
from mam.synth.motion import simulate_infant

REPO = Path(__file__).resolve().parent.parent


def _pose(path: Path, seed: int, seconds: float = 15.0) -> Path:
    sim = simulate_infant(np.random.default_rng(seed), f"i{seed}", "intermittent", seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, sim.joints)
    return path


def _run(src: Path, out: Path) -> int:
    return main(["batch", str(src), "--out", str(out), "--workers", "1", "-q"])


def _typed(capsys, code: str, *named: str) -> str:
    """The CLI's two lines for ``code``, naming every string in ``named``; no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"error [{code}]: "), err
    assert lines[1].startswith("fix: ") and len(lines) == 2, err
    assert "Traceback" not in err and "sqlite3" not in lines[0]
    for s in named:
        assert s in lines[0], (s, err)
    return lines[0]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    for i in range(2):
        _pose(root / f"p{i}.npy", 40 + i)
    return root


@pytest.fixture(scope="module")
def done(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "out"
    assert _run(src, out) == 0
    return out


@pytest.fixture
def out(done, tmp_path) -> Path:
    """A copy of a finished run, to damage."""
    copy = tmp_path / "out"
    shutil.copytree(done, copy)
    return copy


def _db(out: Path) -> sqlite3.Connection:
    return sqlite3.connect(out / "ledger.sqlite", isolation_level=None)


def test_garbage_ledger_is_corrupt_ledger_naming_the_file(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.sqlite").write_bytes(os.urandom(4096))
    assert _run(src, out) == 2
    _typed(capsys, "corrupt_ledger", str(out / "ledger.sqlite"))
    assert not (out / "results.csv").exists()


def test_truncated_ledger_and_damaged_shard_are_corrupt_ledger(out, src, tmp_path, capsys):
    shard = tmp_path / "shard"
    shutil.copytree(out, shard)
    ledger = shard / "ledger.sqlite"
    with _db(shard) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = ledger.read_bytes()
    ledger.write_bytes(data[:100] + b"\xff" * (len(data) - 100))  # header kept, pages destroyed
    rc = main(["batch", "merge", str(out), str(shard), "--out", str(tmp_path / "all")])
    assert rc == 2
    _typed(capsys, "corrupt_ledger", str(ledger))


def test_altered_result_is_refused_naming_file_and_job(out, src, capsys):
    before = (out / "results.csv").read_text()
    with _db(out) as db:
        key, result = db.execute("SELECT key, result FROM jobs WHERE status = 'done'").fetchone()
        res = json.loads(result)
        res["risk_probability"] = round(1.0 - res["risk_probability"], 4)  # a silent flip
        db.execute("UPDATE jobs SET result = ? WHERE key = ?", (json.dumps(res), key))
    # reused by a rerun: refused before anything is screened or written
    assert _run(src, out) == 2
    _typed(capsys, "altered_result", str(out / "ledger.sqlite"), key)
    assert (out / "results.csv").read_text() == before
    # outputs rebuilt from the ledger alone: refused too
    with pytest.raises(AlteredResultError, match=key):
        batch.write_outputs(out)
    assert (out / "results.csv").read_text() == before


def test_result_moved_to_another_job_is_refused(out, src, capsys):
    """The digest binds a result to its job: swapping two rows, digests and all, is found."""
    with _db(out) as db:
        (k1, r1, d1), (k2, r2, d2) = db.execute(
            "SELECT key, result, result_sha256 FROM jobs WHERE status = 'done' ORDER BY key"
        ).fetchall()
        assert r1 != r2
        db.execute("UPDATE jobs SET result = ?, result_sha256 = ? WHERE key = ?", (r2, d2, k1))
        db.execute("UPDATE jobs SET result = ?, result_sha256 = ? WHERE key = ?", (r1, d1, k2))
    assert _run(src, out) == 2
    _typed(capsys, "altered_result", str(out / "ledger.sqlite"))


def test_results_without_digest_are_screened_again(out, src, capsys):
    """A ledger from before digests (no column): its results are never reported unchecked:
    rebuilding outputs refuses them; a rerun screens them again and digests them."""
    with _db(out) as db:
        original = dict(db.execute("SELECT key, result FROM jobs"))
        db.execute("UPDATE jobs SET result = '{\"risk_probability\": 0.0864}'")  # unverifiable
        db.execute("ALTER TABLE jobs DROP COLUMN result_sha256")
    with pytest.raises(UnverifiedResultError, match="2 results"):
        batch.write_outputs(out)
    assert _run(src, out) == 0
    std = capsys.readouterr()
    assert "2 screened now, 0 from the ledger" in std.out
    assert "2 results in the ledger carried no digest" in std.err
    with _db(out) as db:
        rows = db.execute("SELECT key, result, result_sha256 FROM jobs").fetchall()

    def risk(results: dict[str, str]) -> dict[str, float]:
        return {k: json.loads(r)["risk_probability"] for k, r in results.items()}

    assert risk({k: r for k, r, _ in rows}) == risk(original)  # the true results, screened again
    assert all(d == ledger_mod.result_digest(k, r) for k, r, d in rows)
    batch.write_outputs(out)  # verified now


def test_shard_from_before_digests_is_refused_by_merge(out, tmp_path, capsys):
    shard = tmp_path / "old_shard"
    shutil.copytree(out, shard)
    with _db(shard) as db:
        db.execute("ALTER TABLE jobs DROP COLUMN result_sha256")
    rc = main(["batch", "merge", str(out), str(shard), "--out", str(tmp_path / "all")])
    assert rc == 0  # the same jobs, digested in the first shard: they win
    rc = main(["batch", "merge", str(shard), "--out", str(tmp_path / "old_only")])
    assert rc == 2
    _typed(capsys, "unverified_result", "2 results")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (sqlite3.OperationalError("database or disk is full"), "disk_full"),
        (sqlite3.DatabaseError("file is not a database"), "corrupt_ledger"),
        (sqlite3.DatabaseError("database disk image is malformed"), "corrupt_ledger"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "output_not_writable"),
        (sqlite3.OperationalError("unable to open database file"), "output_not_writable"),
        (sqlite3.OperationalError("disk I/O error"), "ledger_error"),
        (sqlite3.OperationalError("database is locked"), "ledger_error"),
    ],
)
def test_every_sqlite_error_is_typed_and_names_the_file(error, code, tmp_path):
    err = ledger_mod.typed_error(error, tmp_path / "ledger.sqlite")
    assert err.code == code and str(tmp_path / "ledger.sqlite") in str(err)
    assert isinstance(err, InputError) == (code != "ledger_error")  # exit 2, or 1 for the machine


class _FillingConnection:
    """A SQLite connection whose disk fills after ``room`` more job rows."""

    def __init__(self, real: sqlite3.Connection, room: int) -> None:
        self.real, self.room = real, room

    def execute(self, sql, params=()):
        if sql.startswith("INSERT OR REPLACE INTO jobs"):
            if self.room <= 0:
                raise sqlite3.OperationalError("database or disk is full")
            self.room -= 1
        return self.real.execute(sql, params)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_disk_filling_mid_run_is_disk_full_and_resumes(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        _pose(src / f"q{i}.npy", 60 + i)
    connect = sqlite3.connect
    monkeypatch.setattr(
        ledger_mod.sqlite3, "connect", lambda *a, **k: _FillingConnection(connect(*a, **k), 1)
    )
    assert _run(src, out) == 2
    _typed(capsys, "disk_full", str(out / "ledger.sqlite"))
    monkeypatch.setattr(ledger_mod.sqlite3, "connect", connect)
    assert _run(src, out) == 0  # space freed: the run resumes where the disk filled
    assert "2 screened now, 1 from the ledger" in capsys.readouterr().out


def test_disk_filling_while_outputs_are_written_is_disk_full(out, src, monkeypatch, capsys):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs_mod, "write_atomic", full)
    assert _run(src, out) == 2
    _typed(capsys, "disk_full", str(out))


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in procs if running(p)]


@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="POSIX signals")
def test_kill_9_leaves_no_worker_alive(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    n = 16
    for i in range(n):
        _pose(src / f"k{i:02d}.npy", 200 + i, 20.0)
    cmd = [sys.executable, "-m", "mam", "batch", str(src), "--out", str(out), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    parent = psutil.Process(proc.pid)
    workers: list[psutil.Process] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                kids = parent.children(recursive=True)
                workers = [p for p in kids if "spawn_main" in " ".join(p.cmdline())]
                with sqlite3.connect(out / "ledger.sqlite") as db:
                    n_done = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
            except (psutil.Error, sqlite3.Error):
                n_done = 0
            if len(workers) == 2 and n_done >= 1:
                break  # mid-run: a job finished, both workers busy with the next ones
            time.sleep(0.05)
        descendants = parent.children(recursive=True)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert len(workers) == 2 and 1 <= n_done < n, "not killed mid-run; the test proves nothing"
    gone_by = time.monotonic() + 10
    while _alive(descendants) and time.monotonic() < gone_by:
        time.sleep(0.1)
    left = _alive(descendants)
    for p in left:  # clean up before failing
        p.kill()
    assert not left, f"{len(left)} processes of the killed batch still alive after 10 s"
