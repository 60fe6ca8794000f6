"""The site loop, end to end, as a hospital runs it on its own recordings: ``mam batch`` on
rendered videos, reviews entered through the review app's HTTP API, ``mam review --export``,
``mam train`` on the export, ``mam screen`` of one of those recordings with the new weights.

Two things must hold: the weights know the kind of input the recordings are (``video``: the
exported poses carry the backend that made them), so screening one of them is not refused as
"never trained on this kind"; and each recording's pose is estimated once in the whole loop
(batch keeps it; the overlay, the export and training read it), counted at the pipeline's one
entry point and at the pose backend itself.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mam.cli import main
from mam.model.weights import sha256_of

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx2
    from starlette.testclient import TestClient

INFANTS = 6  # in rotation over the four FMs categories: 4 normal, 2 risk
SECONDS = 20.0
SIZE = (640, 360)
NEVER_TRAINED = "never trained on this kind"


@pytest.fixture
def posed(monkeypatch) -> tuple[Counter, list[int]]:
    """Counts pose estimations: per recording (its content hash) at the pipeline's entry point
    (``estimate_video_pose``, wherever it is called from), and per call of the backend itself
    (frames), so a route that bypassed the entry point would show too. Batch runs with one
    worker, in this process."""
    import mam.pose.from_video as fv
    import mam.screening as screening
    from mam.pose.blazepose.backend import OnnxPoseBackend

    recordings: Counter = Counter()
    frames: list[int] = []
    entry = fv.estimate_video_pose

    def counted(path, *a, **kw):
        recordings[sha256_of(Path(path))] += 1
        return entry(path, *a, **kw)

    backend_estimate = OnnxPoseBackend.estimate

    def counted_backend(self, *a, **kw):
        seq = backend_estimate(self, *a, **kw)
        frames.append(seq.num_frames)
        return seq

    monkeypatch.delenv("MAM_POSE_BACKEND", raising=False)  # the default backend, counted here
    monkeypatch.setattr(fv, "estimate_video_pose", counted)
    monkeypatch.setattr(screening, "estimate_video_pose", counted)
    monkeypatch.setattr(OnnxPoseBackend, "estimate", counted_backend)
    return recordings, frames


def _review(out: Path, archive: Path, truth: dict, intervals: dict) -> None:
    """Every recording reviewed through the app's API as a clinician would: the skeleton
    overlay opened, the FMs intervals marked, category and group set, marked done."""
    from mam.batch import Ledger
    from mam.batch.report import page_stem
    from mam.review import create_app
    from mam.review.auth import add_user
    from mam.review.config import ReviewConfig
    from tests import review_helpers as H

    add_user(out / "review_users", "alice", H.PASSWORDS["alice"])
    ledger = Ledger(out / "ledger.sqlite")
    try:
        rids = {r["id"]: page_stem(r) for r in ledger.rows()}
    finally:
        ledger.close()
    assert set(rids) == set(truth)
    app = create_app(ReviewConfig(out_dir=out, archive_root=archive))
    with TestClient(app, base_url="http://testserver") as c:
        csrf = H.login(c)
        hdr = {"x-csrf-token": csrf}
        for ident, row in truth.items():
            rid = rids[ident]
            r = c.get(f"/r/{rid}/pose").json()  # the overlay: drawn from the kept pose at once
            assert r["state"] == "done" and r["backend"] == "onnx", r
            assert (r["overlay"]["width"], r["overlay"]["height"]) == SIZE
            for k, (a, b) in enumerate(intervals.get(ident, [])):
                iv = {"id": f"iv-{rid[4:]}-{k:03d}", "start_s": a, "end_s": b}
                r = c.post(f"/api/r/{rid}/intervals", headers=hdr, json=iv)
                assert r.status_code == 201, r.text
            changes = {"category": row["fms_category"], "group": row["group"], "state": "done"}
            r = c.put(f"/api/r/{rid}/fields", headers=hdr,
                      json={"changes": {k: {"value": v, "base_rev": None}
                                        for k, v in changes.items()}})  # fmt: skip
            assert r.status_code == 200, r.text


def _screen(args: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main(["screen", *args, "--format", "json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def test_batch_review_export_train_screen_poses_each_recording_once(tmp_path, posed, capsys):
    from mam.batch.poses import kept_pose_path
    from mam.synth import write_dataset
    from mam.synth.dataset import RenderSpec

    recordings, frames = posed
    sim = write_dataset(tmp_path / "site", infants=INFANTS, seed=11, duration_s=(SECONDS, SECONDS),
                        render=RenderSpec((SIZE,)), workers=2)  # fmt: skip
    archive, out = sim / "videos", tmp_path / "batch"
    with open(sim / "infants.csv") as f:
        truth = {r["id"]: r for r in csv.DictReader(f)}
    intervals: dict[str, list[tuple[float, float]]] = {}
    with open(sim / "fms_intervals.csv") as f:
        for r in csv.DictReader(f):
            intervals.setdefault(r["id"], []).append((float(r["start_s"]), float(r["end_s"])))
    shas = {ident: sha256_of(archive / f"{ident}.mp4") for ident in truth}

    # 1. The archive, screened; each video's pose kept.
    assert main(["batch", str(archive), "--out", str(out), "--workers", "1", "-q"]) == 0
    with open(out / "results.csv") as f:
        assert [r["error_code"] for r in csv.DictReader(f)] == [""] * INFANTS
    assert recordings == Counter(shas.values())  # each posed once
    assert len(frames) == INFANTS and sum(frames) == INFANTS * SECONDS * 25
    kept = {ident: kept_pose_path(out, "onnx", sha) for ident, sha in shas.items()}
    assert all(p.is_file() for p in kept.values())

    # 2. Reviewed in the app (overlay included), 3. exported, 4. trained on: no pose estimated.
    _review(out, archive, truth, intervals)
    export, weights = tmp_path / "export", tmp_path / "weights" / "site"
    assert main(["review", str(out), "--archive", str(archive), "--export", str(export)]) == 0
    assert json.loads((export / "dataset.json").read_text())["data"] == "recordings"
    assert json.loads((export / "export.json").read_text())["kinds"] == {"video": INFANTS}
    assert main(["train", "--data", str(export), "--out", str(weights), "--epochs", "1",
                 "--instances-per-bag", "4", "--no-reference",  # 20 s: no 9.6 s without FMs
                 "--accept-small-data"]) == 0  # fmt: skip
    assert recordings == Counter(shas.values()) and len(frames) == INFANTS
    w = json.loads(weights.with_suffix(".json").read_text())
    assert "video" in w["domain"]["kinds"]  # the weights know recordings of this kind

    # 5. One of those recordings screened with the new weights: from its kept pose (the video
    # kind, nothing estimated), then from the video itself (its one new estimation).
    ident = sorted(truth)[0]
    wpath = str(weights.with_suffix(".json"))
    from_pose = _screen(["--pose", str(kept[ident]), "--weights", wpath], capsys)
    assert recordings == Counter(shas.values()) and len(frames) == INFANTS
    from_video = _screen([str(archive / f"{ident}.mp4"), "--weights", wpath], capsys)
    assert recordings[shas[ident]] == 2 and sum(recordings.values()) == INFANTS + 1
    for r in (from_pose, from_video):
        assert r["domain"]["kind"] == "video" and r["model"]["pose_backend"] == "onnx"
        assert r["domain"]["score"] is not None  # described, so measured, in domain or not
        assert not any(NEVER_TRAINED in x for x in r["classification"]["reasons"])
    # The kept pose is the pose the model saw: the same clips, the same numbers.
    assert from_pose["clips"] == from_video["clips"]
    assert from_pose["risk_probability"] == from_video["risk_probability"]
    np.testing.assert_equal(from_pose["domain"]["clip_scores"], from_video["domain"]["clip_scores"])


def test_a_kept_pose_names_its_backend_and_kind_or_is_refused(tmp_path, capsys):
    """``source`` makes a pose file the video kind; a name no backend has, or a kind that does
    not match it, is an ``invalid_pose`` error; files without it stay pose files."""
    from mam.domain import kind_of
    from mam.errors import InvalidPoseError
    from mam.pose import load_pose_file

    joints = np.random.default_rng(0).normal(0, 0.1, (60, 17, 3)).astype(np.float32)
    cases = {"plain.npy": None, "plain.npz": {}, "onnx.npz": {"source": "onnx"},
             "both.npz": {"source": "mediapipe", "kind": "video"}}  # fmt: skip
    for name, extra in cases.items():
        p = tmp_path / name
        np.save(p, joints) if extra is None else np.savez(p, joints=joints, **extra)
    assert kind_of(load_pose_file(tmp_path / "plain.npy").source) == "pose_file"
    assert kind_of(load_pose_file(tmp_path / "plain.npz").source) == "pose_file"
    assert load_pose_file(tmp_path / "onnx.npz").source == "onnx"
    assert kind_of(load_pose_file(tmp_path / "both.npz").source) == "video"
    for extra in ({"source": "my-own-tracker"}, {"source": "onnx", "kind": "pose_file"},
                  {"source": np.array([1, 2])}, {"kind": "video"}):  # fmt: skip
        np.savez(tmp_path / "bad.npz", joints=joints, **extra)
        with pytest.raises(InvalidPoseError):
            load_pose_file(tmp_path / "bad.npz")
    assert main(["screen", "--pose", str(tmp_path / "bad.npz")]) == 2
    assert "error [invalid_pose]" in capsys.readouterr().err
