"""How fast the review app answers on a 1,000-recording worklist (the target: within 200 ms), in one
run, over HTTP on loopback (uvicorn in a thread, an httpx client logged in).

The batch folder is made here: one genuine screening result of a simulated 3-minute infant
(``Screener.screen_pose``; 48 clips), copied to ``--recordings`` ledger rows with varied
probabilities, categories and domain flags, pointing at copies of the demo recording; a third of
them carry reviews (fields and two FMs intervals each) in the SQLite review store. Each route is
timed ``--repeat`` times after a warm-up; figures, never assertions. The first worklist reads
the ledger and parses every result ("cold"); later changes of the ledger (a batch still
running) re-parse and re-render only the new rows ("after the ledger grew", one row each).

    python bench/review_pages.py                      # 1000 recordings, 30 repeats
    python bench/review_pages.py --recordings 5000 --db postgresql+psycopg://mam@host/db
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mam.batch import Item, Ledger  # noqa: E402
from mam.batch.report import page_stem  # noqa: E402
from mam.pose.precomputed import validate_pose_array  # noqa: E402
from mam.review import ReviewConfig, create_app  # noqa: E402
from mam.review.auth import add_user  # noqa: E402
from mam.review.store import ReviewStore  # noqa: E402
from mam.screening import Screener  # noqa: E402
from mam.synth.motion import simulate_infant  # noqa: E402

DEMO = ROOT / "demo" / "infant_demo.mp4"
CATS = ("continuous", "intermittent", "sporadic", "absent")


def build(folder: Path, n: int, db: str | None) -> tuple[ReviewConfig, list[str]]:
    sim = simulate_infant(np.random.default_rng(1), "bench", "intermittent", 180.0)
    base = json.loads(Screener().screen_pose(validate_pose_array(sim.joints)).model_dump_json())
    base["model"]["pose_backend"] = "onnx"
    archive, out = folder / "archive", folder / "out"
    (archive / "ward").mkdir(parents=True)
    out.mkdir()
    rng = np.random.default_rng(2)
    ledger = Ledger(out / "ledger.sqlite")
    rids = []
    try:
        for i in range(n):
            path = f"ward/{i:04d}.mp4"
            if i < 20:  # a few real files (the rest are listed but gone from the archive)
                shutil.copy(DEMO, archive / path)
            r = json.loads(json.dumps(base))
            r["risk_probability"] = float(rng.random())
            r["normal_probability"] = 1 - r["risk_probability"]
            r["fms_frequency"] = float(rng.random())
            r["domain"]["in_domain"] = bool(rng.random() < 0.8)
            r["classification"]["label"] = ("risk", "normal", "indeterminate")[i % 3]
            r["fms_category"] = CATS[i % 4]
            key = f"{i:064x}"
            ledger.set_path(Item(archive / path, path, f"infant-{i:04d}"), key, key, 1, 1)
            ledger.finish(key, key, "video", "done", result=json.dumps(r))
            rids.append(page_stem({"path": path, "id": f"infant-{i:04d}"}))
    finally:
        ledger.close()
    add_user(out / "review_users", "bench", "bench-password")
    config = ReviewConfig(out_dir=out, archive_root=archive, db_url=db)
    store = ReviewStore(config.database_url)
    try:
        for k, rid in enumerate(rids[: n // 3]):
            state = "done" if k % 2 else "in_progress"
            store.set_fields(rid, "bench", {"category": (CATS[k % 4], 0), "note": ("n", 0),
                                            "state": (state, 0)})  # fmt: skip
            store.add_interval(rid, "bench", f"iv-{k:08d}-a", 3.0, 15.0)
            store.add_interval(rid, "bench", f"iv-{k:08d}-b", 40.0, 60.0)
    finally:
        store.close()
    return config, rids


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    import httpx
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recordings", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--db", help="review store URL (default: SQLite in the batch folder)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    folder = Path(tempfile.mkdtemp(prefix="mam-review-bench-"))
    try:
        t = time.perf_counter()
        config, rids = build(folder, args.recordings, args.db)
        print(f"built {args.recordings} recordings in {time.perf_counter() - t:.1f} s")
        app = create_app(config)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning", access_log=False))  # fmt: skip
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)[1]
            t = time.perf_counter()
            c.post("/login", data={"name": "bench", "password": "bench-password",
                                   "csrf_token": token})  # fmt: skip
            login_ms = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            home = c.get("/")
            cold_ms = (time.perf_counter() - t) * 1000
            csrf = re.search(r'name="csrf-token" content="([^"]+)"', home.text)[1]
            hdr = {"x-csrf-token": csrf}
            rid = rids[5]  # reviewed, with a real file
            n = [0]

            def put():
                n[0] += 1
                body = {"changes": {"note": {"value": f"note {n[0]}", "base_rev": None}}}
                c.put(f"/api/r/{rid}/fields", json=body, headers=hdr).raise_for_status()

            routes = {
                "worklist  GET /": lambda: c.get("/").raise_for_status(),
                "recording GET /r/<rid>": lambda: c.get(f"/r/{rid}").raise_for_status(),
                "annotation GET /api/r/<rid>": lambda: c.get(f"/api/r/{rid}").raise_for_status(),
                "save a field PUT /api/r/<rid>/fields": put,
                "video 1 MiB range GET /r/<rid>/video": lambda: c.get(
                    f"/r/{rid}/video", headers={"range": "bytes=0-1048575"}
                ).raise_for_status(),
                "export page GET /export": lambda: c.get("/export").raise_for_status(),
            }
            print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"python {platform.python_version()}, store "
                  f"{'postgresql' if args.db else 'sqlite'}; worklist page "
                  f"{len(home.content) / 1024:.0f} KiB, {args.recordings} recordings")  # fmt: skip
            print(f"login (scrypt check) {login_ms:.0f} ms; cold worklist (ledger parsed) "
                  f"{cold_ms:.0f} ms\n")  # fmt: skip
            print(f"{'route':40s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
            added = [0]

            def worklist_after_a_new_row():  # a batch run still adding rows
                added[0] += 1
                ledger = Ledger(config.out_dir / "ledger.sqlite")
                try:
                    key = f"new{added[0]:061x}"
                    path = f"ward/new-{added[0]}.mp4"
                    result = ledger.rows([f"ward/{0:04d}.mp4"])[0]["result"]
                    ledger.set_path(Item(Path(path), path, f"new-{added[0]}"), key, key, 1, 1)
                    ledger.finish(key, key, "video", "done", result=result)
                finally:
                    ledger.close()
                t = time.perf_counter()
                c.get("/").raise_for_status()
                return (time.perf_counter() - t) * 1000

            routes["worklist after the ledger grew"] = worklist_after_a_new_row
            for name, fn in routes.items():
                if name.startswith("worklist after"):
                    ms = sorted(fn() for _ in range(min(args.repeat, 10)))
                else:
                    ms = sorted(timed(fn, args.repeat))
                p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
                print(f"{name:40s} {statistics.median(ms):8.1f} {p95:8.1f} {ms[-1]:8.1f}")
        server.should_exit = True
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
