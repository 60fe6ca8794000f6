"""The training layout (``mam synth`` writes it, ``mam.training.dataset`` checks it) and
``mam evaluate``."""

from __future__ import annotations

import csv
import json

import pytest

from mam.cli import main
from mam.pose.base import default_pose_backend
from mam.training.dataset import DatasetError, load_dataset


@pytest.fixture
def dataset(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "d"), "--infants", "8", "--seed", "4",
                 "--min-s", "30", "--max-s", "40"]) == 0  # fmt: skip
    return tmp_path / "d"


def _rewrite(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_synth_writes_the_layout(dataset):
    recs = load_dataset(dataset)
    assert len(recs) == 8
    assert {r.group for r in recs} == {"normal", "risk"}
    assert all(r.joints.shape[1:] == (17, 3) and r.info.shape == (4,) for r in recs)
    # continuous infants have FMs intervals, absent ones an empty list (annotated: none)
    by_id = {r.infant_id: r for r in recs}
    with open(dataset / "infants.csv") as f:
        cats = {row["id"]: row["fms_category"] for row in csv.DictReader(f)}
    assert all(by_id[i].fms_intervals_s for i, c in cats.items() if c == "continuous")
    assert all(by_id[i].fms_intervals_s == [] for i, c in cats.items() if c == "absent")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: rows + [rows[0]], "duplicate id"),
        (lambda rows: [{**rows[0], "group": "maybe"}, *rows[1:]], "group must be one of"),
        (lambda rows: [{**rows[0], "file": "poses/nope.npy"}, *rows[1:]], "not found"),
        (lambda rows: [{**rows[0], "id": ""}, *rows[1:]], "missing id"),
        (lambda rows: [{**rows[0], "birth_weight_g": "12"}, *rows[1:]], "birth_weight_g"),
    ],
)
def test_bad_rows_are_named(dataset, edit, message):
    _rewrite(dataset / "infants.csv", edit)
    with pytest.raises(DatasetError, match=message) as e:
        load_dataset(dataset)
    assert "line" in str(e.value)


def test_bad_intervals(dataset):
    _rewrite(dataset / "fms_intervals.csv", lambda rows: [{**rows[0], "end_s": "9999"}, *rows[1:]])
    with pytest.raises(DatasetError, match="after the recording"):
        load_dataset(dataset)
    _rewrite(dataset / "fms_intervals.csv", lambda rows: [{**rows[0], "id": "ghost"}, *rows[1:]])
    with pytest.raises(DatasetError, match="unknown ids"):
        load_dataset(dataset)


def test_evaluate_json(dataset, capsys):
    assert main(["evaluate", "--data", str(dataset), "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["infants"] == 8 and res["risk_infants"] == 4
    # the shipped demo weights were trained on the same simulator: they must rank these
    assert res["auc"] >= 0.9 and res["fms_frequency_auc"] >= 0.9
    assert res["median_kappa"] is not None and res["median_kappa"] > 0.5


def test_recordings_are_posed_once_and_cached_by_content(tmp_path, monkeypatch):
    import numpy as np

    import mam.pose.from_video as fv
    from mam.synth.motion import simulate_infant
    from mam.synth.render import render_video

    sim = simulate_infant(np.random.default_rng(1), "v", "continuous", 10.0)
    root = tmp_path / "d"
    root.mkdir()
    render_video(sim.clean_joints, root / "rec.mp4", width=320, height=240, preset="ultrafast")
    (root / "infants.csv").write_text("id,file,group\nv1,rec.mp4,normal\n")
    first = load_dataset(root)
    assert len(list((root / ".pose_cache").glob(f"{default_pose_backend()}-*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("pose estimated again")

    monkeypatch.setattr(fv, "estimate_video_pose", boom)
    (root / "copy.mp4").write_bytes((root / "rec.mp4").read_bytes())  # same content, new name
    (root / "infants.csv").write_text("id,file,group\nv1,rec.mp4,normal\nv2,copy.mp4,risk\n")
    again = load_dataset(root)
    np.testing.assert_array_equal(again[0].joints, first[0].joints)
    np.testing.assert_array_equal(again[1].joints, first[0].joints)
    assert first[0].info is None and first[0].fms_intervals_s is None
