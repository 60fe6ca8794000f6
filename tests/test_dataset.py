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
    with pytest.raises(DatasetError, match="unknown id"):
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


# --- intake: every error at once, spreadsheet conventions, enough data -------------------------


def _spreadsheet(root, rows, header="id;file;group;fms_category;sex;gestational_age_weeks;"
                 "birth_weight_g;corrected_age_weeks"):  # fmt: skip
    """``infants.csv`` the way a spreadsheet saves "CSV UTF-8" in a ';' locale."""
    text = "\r\n".join([header, *(";".join(r) for r in rows)]) + "\r\n"
    (root / "infants.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())


@pytest.fixture
def no_pose_estimation(monkeypatch):
    """Counts every pose estimation of a recording (there must be none)."""
    import mam.pose.from_video as fv
    import mam.training.dataset as ds

    calls = []

    def counted(*a, **k):
        calls.append(a)
        raise AssertionError("a pose was estimated")

    monkeypatch.setattr(fv, "estimate_video_pose", counted)
    monkeypatch.setattr(ds, "cached_video_pose", counted)
    return calls


def test_spreadsheet_csv_with_three_errors_lists_all_before_any_pose(
    dataset, tmp_path, capsys, no_pose_estimation
):
    root = tmp_path / "site"
    (root / "videos").mkdir(parents=True)
    for i in range(6):  # recordings are only looked for: their bytes are never decoded here
        (root / "videos" / f"r{i}.mp4").write_bytes(b"not decoded by the check")
    poses = sorted((dataset / "poses").iterdir())
    (root / "p0.npy").write_bytes(poses[0].read_bytes())
    _spreadsheet(root, [
        ["a1", "videos/r0.mp4", "Normal", "Continuous", "F", "34,5", "2100", "12"],
        ["a2", "videos/r1.mp4", "maybe", "", "M", "38", "3200", "13"],  # error: line 3
        ["a3", "videos/r2.mp4", "at risk", "Absent", "male", "30", "1400", "12"],
        ["a4", "videos/missing.mp4", "normal", "", "", "", "", ""],  # error: line 5
        ["a5", "videos/r4.mp4", "RISK", "sporadic", "w", "33", "1900", "11"],
        ["a6", "videos/r5.mp4", "normal", "", "female", "39", "12", "12"],  # error: line 7
        ["a7", "p0.npy", " normal ", "", "", "", "", ""],
    ])  # fmt: skip
    (root / "fms_intervals.csv").write_bytes(b"\xef\xbb\xbfid;start_s;end_s\r\na1;2,5;14\r\n")
    for argv in (
        ["dataset", "check", str(root)],
        ["train", "--data", str(root), "--out", str(tmp_path / "w"), "--epochs", "1"],
    ):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        lines = err.splitlines()
        assert lines[0].startswith("error [invalid_dataset]: 3 problems") and lines[-1].startswith(
            "fix: "
        )
        assert len([x for x in lines if "infants.csv line" in x]) == 3
        assert "line 3: group must be one of normal, risk, got 'maybe'" in err
        assert "line 5: file 'videos/missing.mp4' not found" in err
        assert "line 7: " in err and "birth_weight_g" in err
    assert no_pose_estimation == []
    assert not (tmp_path / "w.json").exists()


def test_spreadsheet_conventions_are_read_and_reported(dataset):
    from mam.training.dataset import check_dataset

    with open(dataset / "infants.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    spell = {"normal": " Normal", "risk": "AT-RISK"}
    sex = {"male": "M", "female": "w"}
    out = []
    for r in rows:
        ga = str(r["gestational_age_weeks"]).replace(".", ",")
        r = {
            **r,
            "group": spell[r["group"]],
            "sex": sex[r["sex"]],
            "fms_category": r["fms_category"].capitalize(),
            "gestational_age_weeks": ga,
        }
        out.append([r[k] for k in rows[0]])
    header = ";".join(k.upper() if k == "id" else f" {k} " for k in rows[0])
    _spreadsheet(dataset, out, header)
    report = check_dataset([dataset])
    assert report.errors == []
    said = "\n".join(report.normalisations)
    for expected in ("UTF-8 byte-order mark", "separator ';'", "header 'ID' -> 'id'",
                     "group 'Normal' -> 'normal'", "group 'AT-RISK' -> 'risk'",
                     "sex 'w' -> 'female'", "fms_category 'Continuous' -> 'continuous'",
                     "decimal comma in gestational_age_weeks (8 rows)"):  # fmt: skip
        assert expected in said, said
    recs = load_dataset(dataset)
    by_id = {r["id"]: r for r in rows}
    for rec in recs:
        truth = by_id[rec.infant_id]
        assert rec.group == truth["group"] and rec.fms_category == truth["fms_category"]
        assert rec.info[0] == float(truth["sex"] == "male")
        assert rec.info[1] == pytest.approx(float(truth["gestational_age_weeks"]))


def _main_err(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_one_group_or_three_infants_is_a_typed_refusal_with_the_numbers(dataset, tmp_path, capsys):
    _rewrite(dataset / "infants.csv", lambda rows: [{**r, "group": "normal"} for r in rows])
    err = _main_err(["dataset", "check", str(dataset)], capsys)
    assert err.startswith("error [insufficient_data]: the data hold 8 infants (8 normal, 0 risk)")
    err = _main_err(["train", "--data", str(dataset), "--out", str(tmp_path / "w"),
                     "--accept-small-data"], capsys)  # fmt: skip
    assert "8 normal, 0 risk" in err and "fix: " in err
    _rewrite(
        dataset / "infants.csv",
        lambda rows: [{**r, "group": g} for r, g in zip(rows, ["normal", "normal", "risk"])],
    )
    (dataset / "fms_intervals.csv").unlink()
    err = _main_err(["train", "--data", str(dataset), "--out", str(tmp_path / "w"),
                     "--accept-small-data"], capsys)  # fmt: skip
    assert "3 infants (2 normal, 1 risk)" in err and "at least 2 infants of each group" in err
    assert not (tmp_path / "w.json").exists()


def test_below_the_minimums_train_refuses_unless_accepted_then_every_result_warns(
    dataset, tmp_path, capsys
):
    from mam.domain import kind_of
    from mam.training.fitting import MIN_CALIBRATION_INFANTS

    (dataset / "fms_intervals.csv").unlink()  # no intervals: the reference branch is off
    out = tmp_path / "w"
    argv = ["train", "--data", str(dataset), "--out", str(out), "--epochs", "1"]
    err = _main_err(argv, capsys)
    assert err.startswith("error [insufficient_data]: below the documented minimum sizes")
    assert f"calibrated on 2 held-out infants (1 normal, 1 risk); the minimum is " \
           f"{MIN_CALIBRATION_INFANTS}" in err  # fmt: skip
    assert main([*argv, "--accept-small-data"]) == 0
    text = capsys.readouterr().out
    assert "reference branch: off: no FMs intervals" in text
    assert "domain check, pose_file: described" in text and "domain check, video: not" in text
    assert text.splitlines()[-2] == f"wrote {out.with_suffix('.json')}"
    assert text.splitlines()[-1].startswith("Summary: trained on 8 infants")
    prov = json.loads(out.with_suffix(".json").read_text())["provenance"]
    assert prov["reference_branch"].startswith("off: no FMs intervals")
    assert prov["train_config"]["use_reference"] is False
    assert len(prov["small_data"]) == 2
    assert prov["data_declared"] == {"simulated": 8, "recordings": 0}
    recs = load_dataset(dataset)
    digests = prov["data_digests"]
    assert len(digests["train"]) == 6 and len(digests["calibration"]) == 2
    assert sorted(digests["train"] + digests["calibration"]) == sorted(r.digest for r in recs)
    assert {kind_of(r.source) for r in recs} == {"pose_file"}
    # What the finished weights answer for the held-out infants: the drift alerts' expectations.
    held = prov["heldout_results"]["pose_file"]
    assert held["recordings"] == 2 and 0 <= held["out_of_domain"] <= 1
    assert held["risk"] is None or held["risk"] in (0.0, 0.5, 1.0)

    pose = next((dataset / "poses").iterdir())
    assert main(["screen", "--pose", str(pose), "--weights", str(out.with_suffix(".json")),
                 "--format", "json"]) == 0  # fmt: skip
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert any("below the documented minimum data sizes" in w for w in warnings), warnings


def test_declaration_and_folders_together(dataset, tmp_path):
    import shutil

    from mam.training.dataset import check_dataset

    assert json.loads((dataset / "dataset.json").read_text()) == {"data": "simulated"}
    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    (other / "dataset.json").unlink()
    report = check_dataset([dataset, other])
    assert len(report.errors) == 8 and all("ids must differ" in e for e in report.errors)
    assert any("no dataset.json" in n and "count as recordings" in n for n in report.notes)
    _rewrite(other / "infants.csv", lambda rows: [{**r, "id": r["id"] + "b"} for r in rows])
    _rewrite(other / "fms_intervals.csv", lambda rows: [{**r, "id": r["id"] + "b"} for r in rows])
    plan = check_dataset([dataset, other]).plan
    assert plan.declared == {"simulated": 8, "recordings": 8} and plan.infants == 16
    (other / "dataset.json").write_text('{"data": "real"}')
    assert "expected" in check_dataset([dataset, other]).errors[0]


def test_a_pose_file_that_names_its_backend_counts_as_a_video(dataset):
    """A kept or exported pose (``source`` entry) is of the kind it came from, in the check's
    plan before any pose is estimated and in the records training sees."""
    import numpy as np

    from mam.domain import kind_of
    from mam.pose import available_backends
    from mam.training.dataset import check_dataset

    backend = available_backends()[0]
    poses = sorted((dataset / "poses").iterdir())
    for p in poses[:4]:
        np.savez(p.with_suffix(".npz"), joints=np.load(p), source=np.array(backend))
    _rewrite(dataset / "infants.csv",
             lambda rows: [{**r, "file": r["file"].replace(".npy", ".npz")} if i < 4 else r
                           for i, r in enumerate(rows)])  # fmt: skip
    plan = check_dataset([dataset]).plan
    assert {k: sum(n.values()) for k, n in plan.kinds.items()} == {"video": 4, "pose_file": 4}
    kinds = [kind_of(r.source) for r in load_dataset(dataset)]
    assert kinds.count("video") == 4 and kinds.count("pose_file") == 4
