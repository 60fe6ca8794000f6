"""``mam batch``: a small generated archive of good and bad files, resume, kill and resume."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mam import batch
from mam.batch import runner
from mam.cli import main
from mam.gma import FMS_CATEGORIES
from mam.synth.motion import simulate_infant
from tests.media import write_video

REPO = Path(__file__).resolve().parent.parent


def _pose(path: Path, seed: int, seconds: float = 20.0) -> Path:
    sim = simulate_infant(np.random.default_rng(seed), f"i{seed}", "intermittent", seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, sim.joints)
    return path


def _csv(out: Path, by: str = "path") -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return {r[by]: r for r in csv.DictReader(f)}


def _jobs(out: Path) -> dict[str, tuple[str, str | None, float]]:
    with sqlite3.connect(out / "ledger.sqlite") as db:
        rows = db.execute("SELECT key, status, error_code, finished_at FROM jobs").fetchall()
    return {k: (s, c, t) for k, s, c, t in rows}


EXPECTED_ERRORS = {
    "bad/zero.mp4": "empty_file",
    "bad/text.mp4": "not_a_video",
    "bad/short.mp4": "video_too_short",
    "bad/blank.mkv": "no_infant_detected",
    "bad/dangling.mp4": "file_not_found",
}
GOOD = ["a.npy", "nested/deeper/b.npy", "c.npy", "dup_of_a.npy"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    _pose(root / "a.npy", 1)
    _pose(root / "nested" / "deeper" / "b.npy", 2, 25.0)
    _pose(root / "c.npy", 3, 15.0)
    shutil.copy(root / "a.npy", root / "dup_of_a.npy")
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("not a video at all\n" * 40)
    write_video(bad / "short.mp4", 100, size=(160, 120))
    write_video(bad / "blank.mkv", lambda i: np.full((120, 160, 3), 90, np.uint8),
                n_frames=260, size=(160, 120))  # fmt: skip
    (bad / "dangling.mp4").symlink_to(root / "no_such_file.mp4")
    (root / "notes.txt").write_text("ignored: not a recording suffix")
    return root


@pytest.fixture(scope="module")
def archive_run(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "results"  # created by the run
    rc = main(["batch", str(archive), "--out", str(out), "--workers", "1", "-q"])
    assert rc == 0
    return out


def test_archive_rows_and_error_codes(archive_run):
    rows = _csv(archive_run)
    assert set(rows) == set(GOOD) | set(EXPECTED_ERRORS)  # notes.txt is not a recording
    for path, code in EXPECTED_ERRORS.items():
        assert rows[path]["error_code"] == code, path
        assert rows[path]["risk_probability"] == "", path
    for path in GOOD:
        r = rows[path]
        assert r["error_code"] == "", path
        assert 0.0 <= float(r["risk_probability"]) <= 1.0
        # the batch carries the model's word, whatever it is (its accuracy: test_screening.py)
        assert r["classification"] in {"normal", "risk", "indeterminate"}
        usable = r["classification"] != "indeterminate"
        assert (
            r["probabilities_usable"] == str(usable) and bool(r["indeterminate_reason"]) != usable
        )
        assert r["fms_category"] in {*FMS_CATEGORIES, "indeterminate"}
        assert 0.5 <= float(r["tracked_fraction"]) <= 1.0
        assert r["model_name"] and len(r["model_digest"]) == 64  # tests/test_model_identity.py
    assert rows["nested/deeper/b.npy"]["id"] == "nested/deeper/b"
    # the duplicate is reported with the same result, but screened once
    dup, a = rows["dup_of_a.npy"], rows["a.npy"]
    assert {k: v for k, v in dup.items() if k not in ("id", "path")} == {
        k: v for k, v in a.items() if k not in ("id", "path")
    }
    jobs = _jobs(archive_run)
    assert len(jobs) == len(GOOD) - 1 + len(EXPECTED_ERRORS)
    assert sum(s == "done" for s, _, _ in jobs.values()) == len(GOOD) - 1


def test_jsonl_full_results_and_failures(archive_run):
    lines = [json.loads(x) for x in (archive_run / "results.jsonl").read_text().splitlines()]
    by_path = {d["path"]: d for d in lines}
    assert len(lines) == len(GOOD) + len(EXPECTED_ERRORS)
    good = by_path["c.npy"]
    assert good["clips"] and good["quality"]["clips_assessed"] == len(good["clips"])
    assert good["disclaimer"] and good["sha256"] == by_path["c.npy"]["sha256"]
    assert good["model"]["used_info_branch"] is False
    fail = by_path["bad/short.mp4"]
    assert set(fail) == {"path", "id", "error_code", "error"}
    assert fail["error_code"] == "video_too_short" and fail["error"]


def test_outputs_regenerate_from_ledger(archive_run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(archive_run / "ledger.sqlite", copy / "ledger.sqlite")
    batch.write_outputs(copy)
    assert (copy / "results.csv").read_text() == (archive_run / "results.csv").read_text()
    assert (copy / "results.jsonl").read_text() == (archive_run / "results.jsonl").read_text()


def test_rerun_skips_done_and_retry_failed_reruns_failures(archive, archive_run, capsys):
    before = _jobs(archive_run)
    assert main(["batch", str(archive), "--out", str(archive_run), "--workers", "1", "-q"]) == 0
    assert "0 screened now" in capsys.readouterr().out
    assert _jobs(archive_run) == before  # nothing screened again, failures kept
    assert main(["batch", str(archive), "--out", str(archive_run), "--workers", "1", "-q",
                 "--retry-failed"]) == 0  # fmt: skip
    after = _jobs(archive_run)
    assert set(after) == set(before)
    for key, (status, code, t) in before.items():
        if status == "done":
            assert after[key] == (status, code, t), "a done recording was screened again"
        else:
            assert after[key][2] > t, "a failed recording was not retried"
            assert after[key][:2] == (status, code)


def test_logs_carry_counts_only(archive, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        batch.run_batch(archive, tmp_path / "o", workers=1)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("mam.batch"))
    assert "recordings" in text  # it does log
    for name in ["a.npy", "b.npy", "nested", "zero", "dangling", str(archive)]:
        assert name not in text


def test_manifest_with_infant_data(archive, tmp_path):
    man = tmp_path / "man"
    man.mkdir()
    _pose(man / "poses" / "x.npy", 11)
    _pose(man / "poses" / "y.npy", 12)
    rows = [
        ["file", "id", "sex", "gestational_age_weeks", "birth_weight_g", "corrected_age_weeks"],
        ["poses/x.npy", "inf-001", "female", "34", "2100", "12"],
        ["poses/y.npy", "inf-002", "", "", "", ""],
        [str(archive / "c.npy"), "inf-003", "male", "30", "1500", "14"],  # absolute path
        ["poses/x.npy", "inf-004", "male", "80", "2100", "12"],  # impossible GA
        ["poses/missing.npy", "inf-005", "", "", "", ""],
    ]
    with open(man / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "out"
    summary = batch.run_batch(man / "manifest.csv", out, workers=1)
    assert (summary.recordings, summary.done, summary.failed) == (5, 3, 2)
    res = _csv(out, by="id")
    assert set(res) == {f"inf-00{i}" for i in range(1, 6)}
    assert res["inf-001"]["path"] == "poses/x.npy" and res["inf-001"]["error_code"] == ""
    assert res["inf-004"]["error_code"] == "invalid_infant_data"
    full = {d["id"]: d for d in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert full["inf-001"]["model"]["used_info_branch"] is True
    assert full["inf-001"]["infant"]["sex"] == "female"
    assert full["inf-002"]["model"]["used_info_branch"] is False
    assert full["inf-003"]["model"]["used_info_branch"] is True
    assert full["inf-004"]["error_code"] == "invalid_infant_data"
    assert full["inf-005"]["error_code"] == "file_not_found"
    # same content with other infant data is another job; same content and data would not be
    assert len(_jobs(out)) == 5


def test_manifest_without_file_column(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("id,path\n1,a.npy\n")
    rc = main(["batch", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "-q"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("error [invalid_manifest]:")


def test_unwritable_out_fails_fast(archive, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = main(["batch", str(archive), "--out", str(blocker / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error [output_not_writable]:") and lines[1].startswith("fix: ")
    assert not (blocker / "out").exists()


def test_full_disk_fails_fast(archive, tmp_path, monkeypatch):
    def tiny(path):
        return shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6)

    monkeypatch.setattr(runner.shutil, "disk_usage", tiny)
    with pytest.raises(batch.DiskFullError, match="MB free"):
        batch.run_batch(archive, tmp_path / "o", workers=1)
    assert not (tmp_path / "o" / "ledger.sqlite").exists()


def test_unexpected_exception_is_an_internal_error_row(tmp_path, monkeypatch):
    from mam.screening import Screener

    src = tmp_path / "src"
    _pose(src / "p.npy", 21)
    _pose(src / "q.npy", 22)
    calls = []

    def boom(self, path, infant=None):
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("simulated bug")
        return original(self, path, infant)

    original = Screener.screen_pose_file
    monkeypatch.setattr(Screener, "screen_pose_file", boom)
    s = batch.run_batch(src, tmp_path / "o", workers=1)
    assert (s.done, s.failed) == (1, 1)
    codes = sorted(r["error_code"] for r in _csv(tmp_path / "o").values())
    assert codes == ["", "internal_error"]


def test_two_workers_match_one(archive, archive_run, tmp_path):
    out = tmp_path / "o2"
    s = batch.run_batch(archive, out, workers=2)
    # every unique job but the dangling link, which fails before any worker sees it
    assert s.screened == len(GOOD) - 1 + len(EXPECTED_ERRORS) - 1
    assert _csv(out) == _csv(archive_run)


def test_kill_and_resume(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    n = 40
    for i in range(n):
        _pose(src / f"r{i:02d}.npy", 100 + i, 25.0)
    cmd = [sys.executable, "-m", "mam", "batch", str(src), "--out", str(out), "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    ledger = out / "ledger.sqlite"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if ledger.exists():
                try:
                    if sum(s == "done" for s, _, _ in _jobs(out).values()) >= 3:
                        break
                except sqlite3.OperationalError:
                    pass  # schema not created yet
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before = _jobs(out)
    assert 3 <= len(before) < n, "the run finished before it was killed; the test proves nothing"
    assert all(s == "done" for s, _, _ in before.values())

    rerun = subprocess.run(cmd + ["-q"], cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{n - len(before)} screened now, {len(before)} from the ledger" in rerun.stdout
    after = _jobs(out)
    assert len(after) == n and all(s == "done" for s, _, _ in after.values())
    for key, row in before.items():
        assert after[key] == row, "a recording finished before the kill was screened again"
    rows = _csv(out)
    assert len(rows) == n and all(r["error_code"] == "" for r in rows.values())


def test_shards_merge_to_the_unsharded_outputs(archive, archive_run, tmp_path):
    """An Indexed Job's pods each screen I/N of the rows; merged, they equal one whole run."""
    shards = [tmp_path / f"shard-{i}" for i in range(3)]
    for i, d in enumerate(shards):
        assert main(["batch", str(archive), "--out", str(d), "--shard", f"{i}/3",
                     "--workers", "1", "-q"]) == 0  # fmt: skip
    sizes = [len(_csv(d)) for d in shards]
    assert sum(sizes) == len(_csv(archive_run)) and max(sizes) - min(sizes) <= 1
    merged = tmp_path / "merged"
    assert main(["batch", "merge", *map(str, shards), "--out", str(merged)]) == 0
    assert _csv(merged) == _csv(archive_run)


def test_merge_dicom_sr_writes_an_sr_per_merged_result_as_mam_batch_does(tmp_path):
    """``mam batch merge --dicom-sr``: one SR per done result of every shard in ``OUT/sr/``,
    named by the merged FHIR Bundle's result id, the same bytes as a shard run with
    ``--dicom-sr`` writes for it; without the flag, none."""
    pytest.importorskip("highdicom")
    src = tmp_path / "src"
    _pose(src / "a.npy", 11, 12.0)
    _pose(src / "b.npy", 12, 12.0)
    (src / "bad.mp4").write_bytes(b"")  # a failed row: no SR
    shards = [tmp_path / f"shard-{i}" for i in range(2)]
    for i, d in enumerate(shards):
        assert main(["batch", str(src), "--out", str(d), "--shard", f"{i}/2", "--workers", "1",
                     "-q", "--dicom-sr"]) == 0  # fmt: skip
    by_shard = {f.name: f.read_bytes() for d in shards for f in (d / "sr").glob("*.dcm")}
    plain, merged = tmp_path / "plain", tmp_path / "merged"
    assert main(["batch", "merge", *map(str, shards), "--out", str(plain)]) == 0
    assert not (plain / "sr").exists()
    assert main(["batch", "merge", *map(str, shards), "--out", str(merged), "--dicom-sr"]) == 0
    done = [r for r in _csv(merged).values() if not r["error_code"]]
    assert len(done) == 2 and len(_csv(merged)) == 3
    ids = {json.loads(line)["identifier"]["value"] for line in
           (merged / "results.fhir.ndjson").read_text().splitlines()}  # fmt: skip
    srs = {f.name: f.read_bytes() for f in (merged / "sr").glob("*.dcm")}
    assert {n.removesuffix(".dcm") for n in srs} == ids and len(ids) == 2
    assert srs == by_shard


def test_bad_shard_spec_is_refused(archive, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["batch", str(archive), "--out", str(tmp_path / "o"), "--shard", "3/3"])
    assert "0 <= I < N" in capsys.readouterr().err


def test_run_writes_an_index_and_a_page_per_recording(archive_run):
    import re

    index = (archive_run / "index.html").read_text()
    pages = re.findall(r'href="(reports/[^"]+\.html)"', index)
    assert len(set(pages)) == len(_csv(archive_run))
    for page in set(pages):
        text = (archive_run / page).read_text()
        assert "Decision support only" in text
    for code in EXPECTED_ERRORS.values():
        assert code in index


# -- kept poses -----------------------------------------------------------------------------------
FAKE_BACKEND = "batch-test-fake"
FAKE_POSED: list[int] = []  # frames of each estimation


class _SimPose:
    """A pose backend that 'tracks' a simulated infant through any video (one per estimate)."""

    name = FAKE_BACKEND

    def estimate(self, frames, progress=None):
        from mam.pose.base import PoseSequence

        n = sum(1 for _ in frames)
        FAKE_POSED.append(n)
        sim = simulate_infant(np.random.default_rng(7), "fake", "intermittent", n / 25 + 1)
        joints = np.asarray(sim.joints[:n], np.float32)
        image = joints[..., :2] * 200 + 80
        return PoseSequence(joints, np.ones(joints.shape[:2], np.float32), source=FAKE_BACKEND,
                            meta={"image_joints": image, "image_size": (160, 120)})  # fmt: skip

    def close(self) -> None:
        pass


def _video_archive(root: Path) -> Path:
    from mam.pose.base import register_backend

    register_backend(FAKE_BACKEND)(lambda **kw: _SimPose())
    (root / "v").mkdir(parents=True)
    write_video(root / "v" / "ward.mp4", 300, size=(160, 120))
    _pose(root / "p.npy", 4)
    return root


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def _kept(out: Path) -> list[Path]:
    return sorted((out / "poses").glob("*.npz")) if (out / "poses").is_dir() else []


def test_video_poses_are_kept_by_content_and_read_again(tmp_path):
    from mam.model.weights import sha256_of
    from mam.pose import load_pose_file

    src, out = _video_archive(tmp_path / "src"), tmp_path / "out"
    before = len(FAKE_POSED)
    assert main(["batch", str(src), "--out", str(out), "--workers", "1", "-q",
                 "--pose-backend", FAKE_BACKEND]) == 0  # fmt: skip
    assert len(FAKE_POSED) == before + 1  # the video; the pose file is its own pose
    sha = sha256_of(src / "v" / "ward.mp4")
    kept = _kept(out)
    assert [p.name for p in kept] == [f"{FAKE_BACKEND}-v3-{sha}.npz"]
    seq = load_pose_file(kept[0])
    assert seq.source == FAKE_BACKEND and seq.num_frames == 300  # the video kind, not pose_file
    assert seq.meta["image_joints"].shape == (300, 17, 2)
    lines = {d["path"]: d for d in _lines(out)}
    assert lines["v/ward.mp4"]["pose_file"] == f"poses/{kept[0].name}"
    assert "pose_file" not in lines["p.npy"]
    # The same recording again, with other infant data (another job): its kept pose is read.
    man = tmp_path / "manifest.csv"
    man.write_text("file,id,sex,gestational_age_weeks,birth_weight_g,corrected_age_weeks\n"
                   f"{src / 'v' / 'ward.mp4'},again,female,38,3100,12\n")  # fmt: skip
    s = batch.run_batch(man, out, workers=1, pose_backend=FAKE_BACKEND)
    assert (s.screened, s.done) == (1, 1) and len(FAKE_POSED) == before + 1
    again = _lines(out)[0]
    first = lines["v/ward.mp4"]
    # the same pose: the same clips, FMs frequency and domain check (infant data change P(risk))
    assert again["clips"] == first["clips"] and again["domain"] == first["domain"]
    assert again["fms_frequency"] == first["fms_frequency"] and again["model"]["used_info_branch"]
    assert again["model"]["pose_backend"] == FAKE_BACKEND and again["pose_file"]


def test_no_keep_poses_and_merge_carries_them(tmp_path):
    src = _video_archive(tmp_path / "src")
    off = tmp_path / "off"
    assert main(["batch", str(src), "--out", str(off), "--workers", "1", "-q", "--no-keep-poses",
                 "--pose-backend", FAKE_BACKEND]) == 0  # fmt: skip
    assert _kept(off) == [] and not any("pose_file" in d for d in _lines(off))
    shards = [tmp_path / f"shard-{i}" for i in range(2)]
    for i, d in enumerate(shards):
        assert main(["batch", str(src), "--out", str(d), "--shard", f"{i}/2", "--workers", "1",
                     "-q", "--pose-backend", FAKE_BACKEND]) == 0  # fmt: skip
    assert sum(len(_kept(d)) for d in shards) == 1
    merged = tmp_path / "merged"
    assert main(["batch", "merge", *map(str, shards), "--out", str(merged)]) == 0
    assert [p.name for p in _kept(merged)] == [p.name for d in shards for p in _kept(d)]
    assert sum("pose_file" in d for d in _lines(merged)) == 1


def test_npz_poses_are_screened_as_mam_screen_pose_reads_them(tmp_path):
    """A folder or a manifest may give ``.npz`` pose files, kept ones included: each is screened
    as ``mam screen --pose`` screens it (a kept pose as the video kind it came from, a plain one
    as a pose file), and the kept poses of a batch output folder inside the input folder are
    outputs, not recordings to screen again."""
    from mam.batch.archive import OUTPUT_DIRS, OUTPUT_MARK
    from mam.batch.ledger import LEDGER
    from mam.batch.outputs import SR_DIR
    from mam.batch.poses import POSES
    from mam.batch.report import REPORTS_DIR

    assert (set(OUTPUT_DIRS), OUTPUT_MARK) == ({POSES, SR_DIR, REPORTS_DIR}, LEDGER)
    src = _video_archive(tmp_path / "src")
    out = src / "screened"  # inside the input folder
    argv = ["batch", str(src), "--out", str(out), "--workers", "1", "-q",
            "--pose-backend", FAKE_BACKEND]  # fmt: skip
    assert main(argv) == 0
    (kept,) = _kept(out)
    s = batch.run_batch(src, out, workers=1, pose_backend=FAKE_BACKEND)
    assert (s.recordings, s.screened, s.skipped) == (2, 0, 2)  # not its own kept pose

    poses = tmp_path / "poses"
    poses.mkdir()
    shutil.copy(kept, poses / "kept.npz")
    np.savez(poses / "plain.npz", joints=np.load(src / "p.npy"))
    folder = tmp_path / "folder"
    s = batch.run_batch(poses, folder, workers=1)
    assert (s.recordings, s.done) == (2, 2)
    man = tmp_path / "manifest.csv"
    man.write_text("file,id\nposes/kept.npz,k\nposes/plain.npz,p\n")
    manifest = tmp_path / "manifest-out"
    s = batch.run_batch(man, manifest, workers=1)
    assert (s.recordings, s.done) == (2, 2)
    by_folder = {d["path"]: d for d in _lines(folder)}
    by_manifest = {d["path"].removeprefix("poses/"): d for d in _lines(manifest)}
    for name, kind in (("kept.npz", "video"), ("plain.npz", "pose_file")):
        screened = tmp_path / f"{name}.json"
        assert main(["screen", "--pose", str(poses / name), "--format", "json",
                     "--out", str(screened)]) == 0  # fmt: skip
        want = json.loads(screened.read_text())
        assert want["domain"]["kind"] == kind
        for got in (by_folder[name], by_manifest[name]):
            for k in ("risk_probability", "fms_frequency", "classification", "domain", "clips"):
                assert got[k] == want[k], (name, k)
