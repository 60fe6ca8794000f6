"""Batch output folders, reviewers and logged-in clients for the review app's tests (helpers,
not tests).

``make_batch`` screens simulated infants' pose files with the real batch runner
(:func:`mam.batch.run_batch`) and adds one video recording to the ledger the way the runner
records it (a small real MP4 in the archive, with a genuine screening result), so the app
sees every kind of row without the cost of posing a video in each test.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mam.batch import Item, Ledger, run_batch
from mam.batch.report import page_stem
from mam.review.auth import add_user
from mam.review.config import ReviewConfig
from mam.synth import write_dataset
from tests.media import moving_square_frames, write_video

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22", "carol": "carol-secret-333",
             "dan": "dan-secret-4444"}  # fmt: skip
# alice: the senior (signs off) and admin (exports); the others: assessors.
ROLES = {"alice": "senior,admin", "bob": "assessor", "carol": "assessor", "dan": "assessor"}
VIDEO_PATH = "videos/ward_B_infant.mp4"


@dataclass
class Batch:
    archive: Path
    out: Path
    truth: dict[str, dict]  # ledger id -> {"group", "fms_category", "intervals": [(a, b)]}
    rids: dict[str, str]  # ledger id -> rid


def make_batch(tmp: Path, infants: int = 6, seconds: float = 30.0, video: bool = True) -> Batch:
    archive, out = tmp / "archive", tmp / "out"
    sim = write_dataset(tmp / "sim", infants=infants, seed=5, duration_s=(seconds, seconds))
    (archive / "poses").mkdir(parents=True)
    truth: dict[str, dict] = {}
    with open(sim / "infants.csv") as f:
        for row in csv.DictReader(f):
            shutil.copy(sim / row["file"], archive / "poses" / Path(row["file"]).name)
            truth["poses/" + row["id"]] = {
                "group": row["group"], "fms_category": row["fms_category"], "intervals": []
            }  # fmt: skip
    with open(sim / "fms_intervals.csv") as f:
        for row in csv.DictReader(f):
            truth["poses/" + row["id"]]["intervals"].append(
                (float(row["start_s"]), float(row["end_s"]))
            )
    run_batch(archive, out, workers=1)
    if video:
        add_video_row(out, archive)
    ledger = Ledger(out / "ledger.sqlite")
    try:
        rids = {r["id"]: page_stem(r) for r in ledger.rows()}
    finally:
        ledger.close()
    return Batch(archive, out, truth, rids)


def add_video_row(
    out: Path, archive: Path, path: str = VIDEO_PATH, pose_backend: str | None = None,
    mutate=None,
) -> str:  # fmt: skip
    """A video recording in the ledger, as the runner records one: a real 12 s MP4 in the
    archive under ``path``, with the genuine result of a screened pose file (the app never
    re-screens; only the file's hash, kind and ``model.pose_backend`` matter here).
    ``mutate(doc)`` changes the result's JSON document first (a result the test needs)."""
    from mam.model.weights import sha256_of

    video = archive / path
    video.parent.mkdir(parents=True, exist_ok=True)
    if not video.exists():
        write_video(video, moving_square_frames(300, 160, 120), 25, n_frames=300)
    sha = sha256_of(video)
    ledger = Ledger(out / "ledger.sqlite")
    try:
        result = next(r["result"] for r in ledger.rows() if r["status"] == "done")
        if pose_backend is not None or mutate is not None:
            doc = json.loads(result)
            if pose_backend is not None:
                doc["model"]["pose_backend"] = pose_backend
            if mutate is not None:
                mutate(doc)
            result = json.dumps(doc)
        item = Item(video, path, path.rsplit(".", 1)[0])
        ledger.set_path(item, sha, sha, video.stat().st_size, video.stat().st_mtime_ns)
        ledger.finish(sha, sha, "video", "done", result=result)
        return page_stem({"path": path, "id": item.id})
    finally:
        ledger.close()


def config(batch: Batch, **kw) -> ReviewConfig:
    users = batch.out / "review_users"
    if not users.is_file():
        for name, pw in PASSWORDS.items():
            add_user(users, name, pw, ROLES[name])
    return ReviewConfig(out_dir=batch.out, archive_root=batch.archive, **kw)


def login(client, name: str = "alice", password: str | None = None):
    """Log ``client`` (a Starlette TestClient) in; returns the session's CSRF token."""
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"name": name, "password": password or PASSWORDS[name],
                                    "csrf_token": token}, follow_redirects=False)  # fmt: skip
    assert r.status_code == 303, r.text
    home = client.get("/")
    return re.search(r'name="csrf-token" content="([^"]+)"', home.text).group(1)


# -- real servers the tests need, installed with the system's package manager ---------------------
def _apt_install(*packages: str) -> str | None:
    """Install Debian packages with apt-get; None on success, else why not."""
    import os
    import subprocess

    if shutil.which("apt-get") is None:
        return "apt-get is not available on this system"
    if os.geteuid() != 0:
        return "apt-get needs root, and the tests do not run as root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *packages]
    for cmd in (install, ["apt-get", "update", "-q"], install):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode == 0 and cmd[1] == "install":
            return None
    return f"apt-get install {' '.join(packages)} failed: {r.stderr.strip()[-300:]}"


def _pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_server():
    """A throwaway PostgreSQL server (generator: yields its SQLAlchemy URL, then stops it and
    removes its files). Debian's ``postgresql`` is installed with apt-get when missing; the
    caller skips with the reason when that is impossible (a ``str`` is yielded instead)."""
    import os
    import socket
    import subprocess
    import tempfile

    bindir = _pg_bindir()
    if bindir is None:
        why = _apt_install("postgresql")
        bindir = _pg_bindir()
        if bindir is None:
            yield f"no PostgreSQL server: {why or 'installed, but initdb not found'}"
            return
    base = Path(tempfile.mkdtemp(prefix="mam-review-pg-"))
    user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            yield "running as root and there is no 'postgres' user to run the server as"
            return
        os.chown(base, pw.pw_uid, pw.pw_gid)
        user = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    try:
        subprocess.run(user + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                               "mam", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(user + [str(bindir / "pg_ctl"), "-D", str(data), "-l",
                               str(base / "log"), "-w", "-o", opts, "start"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        shutil.rmtree(base, ignore_errors=True)
        yield f"PostgreSQL did not start: {type(e).__name__}"
        return
    try:
        yield f"postgresql+psycopg://mam@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                               "-w", "stop"], capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


def chromium() -> tuple[str, str] | str:
    """``(chromium, chromedriver)`` paths, installing Debian's ``chromium`` and
    ``chromium-driver`` with apt-get when missing; else the reason why not (a ``str``)."""

    def found():
        b = shutil.which("chromium") or shutil.which("chromium-browser")
        d = shutil.which("chromedriver")
        return (b, d) if b and d else None

    if found() is None:
        why = _apt_install("chromium", "chromium-driver")
        if found() is None:
            return f"no chromium + chromedriver: {why or 'installed, but not on PATH'}"
    return found()
