"""The model's identity (``mam.model.weights``: ``ModelMeta.digest``): what changes it, what does
not, and that every output of a screening carries it (result, text, results.csv, the batch
ledger, audit lines, FHIR, the ONNX export's names and manifest)."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from mam.batch import run_batch
from mam.cli import main
from mam.model.weights import ModelLoadError, load_meta, load_weights, save_weights, sha256_of
from mam.screening import DEFAULT_WEIGHTS, Screener
from mam.synth.motion import simulate_infant


def _copy_weights(dst: Path, stem: str = "site", edit=None) -> Path:
    """The shipped demo weights copied to ``dst/STEM.json`` (its ``.pt`` beside it), the JSON
    edited by ``edit(dict)`` as a person would by hand."""
    dst.mkdir(parents=True, exist_ok=True)
    d = json.loads(DEFAULT_WEIGHTS.read_text())
    shutil.copy(DEFAULT_WEIGHTS.parent / d["weights_file"], dst / d["weights_file"])
    if edit is not None:
        edit(d)
    js = dst / f"{stem}.json"
    js.write_text(json.dumps(d, indent=2))
    return js


def _pose(path: Path, seed: int, seconds: float = 15.0) -> Path:
    sim = simulate_infant(np.random.default_rng(seed), f"i{seed}", "intermittent", seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, sim.joints)
    return path


def _set(path: tuple, value):
    def edit(d: dict) -> None:
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


DEMO = load_meta(DEFAULT_WEIGHTS)[0]


@pytest.mark.parametrize(
    "path",
    [
        ("risk_threshold",),
        ("calibration", "b"),
        ("calibration_by_kind", "video", "risk_threshold"),
        ("fms_category_thresholds", "intermittent"),
        ("fms_clip_threshold",),
        ("clip_step",),
        ("smoothing_window",),
        ("normalizer", "mean", 0),
        ("info_mean", 1),
    ],
)
def test_what_decides_a_label_changes_the_digest(tmp_path, path):
    node = json.loads(DEFAULT_WEIGHTS.read_text())
    for k in path:
        node = node[k]
    new = node + 2 if isinstance(node, int) else node + 0.05
    js = _copy_weights(tmp_path, edit=_set(path, new))
    meta, pt, sha = load_meta(js)
    assert sha256_of(pt) == sha  # the file check alone would not notice the edit
    load_weights(js)  # ... and the weights still load
    assert meta.digest != DEMO.digest
    assert meta.recorded_digest in (None, DEMO.recorded_digest)  # the record is not what counts


def test_domain_record_and_representation_change_the_digest(tmp_path):
    def edit(d):
        d["domain"]["kinds"]["video"]["clip_threshold"] *= 1.1

    assert DEMO.domain is not None and "video" in DEMO.domain.to_dict()["kinds"]
    assert load_meta(_copy_weights(tmp_path / "a", edit=edit))[0].digest != DEMO.digest
    other = "world3d" if DEMO.representation != "world3d" else "image2d"
    js = _copy_weights(tmp_path / "b", edit=_set(("representation",), other))
    assert load_meta(js)[0].digest != DEMO.digest


def test_name_version_and_provenance_do_not_change_the_digest(tmp_path):
    def edit(d):
        d["name"], d["version"] = "site_a", "9.9.9"
        d["provenance"] = {"summary": "another description of the same weights"}
        d["metrics"] = {"auc": 0.5}

    meta = load_meta(_copy_weights(tmp_path, edit=edit))[0]
    assert (meta.name, meta.version) == ("site_a", "9.9.9")
    assert meta.digest == DEMO.digest


def test_same_weights_saved_twice_have_the_same_digest(tmp_path):
    model, meta = load_weights(DEFAULT_WEIGHTS)
    a = save_weights(model, meta, tmp_path / "a" / "first_name")
    b = save_weights(model, meta, tmp_path / "b" / "second")
    (ma, _, _), (mb, _, _) = load_meta(a), load_meta(b)
    # Whether or not the files' bytes differ (torch.save into a file embeds its name), the model
    # named by its digest is the same.
    assert ma.digest == mb.digest == DEMO.digest
    assert json.loads(a.read_text())["model_digest"] == ma.digest == ma.recorded_digest
    # other tensors are another model, whatever the metadata say
    with torch.no_grad():
        next(model.parameters())[0].mul_(1.01)
    c = save_weights(model, meta, tmp_path / "c" / "first_name")
    assert load_meta(c)[0].digest != DEMO.digest


def test_digest_without_the_pt_file_is_the_recorded_one(tmp_path):
    """A bento carries the JSON and the ONNX export, not the ``.pt``: the recorded tensors'
    digest stands in for the file, so the model keeps its identity there."""
    model, meta = load_weights(DEFAULT_WEIGHTS)
    js = save_weights(model, meta, tmp_path / "w" / "site")
    digest = load_meta(js)[0].digest
    js.with_suffix(".pt").unlink()
    assert load_meta(js)[0].digest == digest
    with pytest.raises(ModelLoadError):
        load_weights(js)


@pytest.fixture(scope="module")
def poses(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("poses")
    _pose(root / "a.npy", 1)
    _pose(root / "b.npy", 2, 12.0)
    return root


def test_result_carries_the_loaded_weights_digest(poses, tmp_path, monkeypatch, capsys):
    js = _copy_weights(tmp_path, edit=_set(("risk_threshold",), 0.9))
    meta = load_meta(js)[0]
    r = Screener(js).screen_pose_file(poses / "a.npy")
    assert r.model.digest == meta.digest != DEMO.digest
    assert r.model.weights_sha256 == load_meta(DEFAULT_WEIGHTS)[2]  # the same .pt file
    # mam screen: the text shows the digest's start; with MAM_AUDIT_FILE an audit line names it
    audit = tmp_path / "audit.jsonl"
    monkeypatch.setenv("MAM_AUDIT_FILE", str(audit))
    assert main(["screen", "--pose", str(poses / "a.npy"), "--weights", str(js), "-q"]) == 0
    assert f"digest {meta.digest[:12]}" in capsys.readouterr().out
    (line,) = [json.loads(x) for x in audit.read_text().splitlines()]
    assert (line["event"], line["protocol"], line["outcome"]) == ("screening_request", "cli", "ok")
    assert (line["model"], line["model_version"], line["model_digest"]) == (
        meta.name, meta.version, meta.digest)  # fmt: skip
    assert line["content_sha256"] == sha256_of(poses / "a.npy")
    assert str(poses) not in audit.read_text()


def _csv(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_batch_rerun_with_other_weights_screens_every_recording(poses, tmp_path, capsys):
    out = tmp_path / "out"
    other = _copy_weights(tmp_path / "w", "site_b", _set(("risk_threshold",), 0.9))
    other_digest = load_meta(other)[0].digest
    s = run_batch(poses, out, workers=1)
    assert (s.screened, s.skipped) == (2, 0)
    rows = _csv(out)
    assert {r["model_digest"] for r in rows.values()} == {DEMO.digest}
    assert {(r["model_name"], r["model_version"]) for r in rows.values()} == {
        (DEMO.name, DEMO.version)}  # fmt: skip
    # other weights: every recording screened again, the outputs carry the new model
    s = run_batch(poses, out, workers=1, weights=other)
    assert (s.screened, s.skipped, s.other_model) == (2, 0, 2)
    assert {r["model_digest"] for r in _csv(out).values()} == {other_digest}
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {d["model"]["digest"] for d in lines} == {other_digest}
    audit = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert [a["model_digest"] for a in audit] == [DEMO.digest] * 2 + [other_digest] * 2
    # the same weights again: the ledger's results, and the CLI says whose they are
    assert main(["batch", str(poses), "--out", str(out), "--workers", "1", "-q",
                 "--weights", str(other)]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "0 screened now, 2 from the ledger (model " in said
    assert f"{DEMO.name} {DEMO.version}, digest {other_digest[:12]}" in said
    # back to the demo weights: their results are still in the ledger
    s = run_batch(poses, out, workers=1)
    assert (s.screened, s.skipped) == (0, 2)
    assert {r["model_digest"] for r in _csv(out).values()} == {DEMO.digest}


def test_ledger_from_before_model_keys_is_screened_again(poses, tmp_path):
    out = tmp_path / "out"
    run_batch(poses, out, workers=1)
    with sqlite3.connect(out / "ledger.sqlite") as db:  # as an older mam wrote it
        db.execute("UPDATE jobs SET key = substr(key, 1, instr(key, '@') - 1)")
        db.execute("UPDATE paths SET key = substr(key, 1, instr(key, '@') - 1)")
    s = run_batch(poses, out, workers=1)
    assert (s.screened, s.skipped, s.other_model, s.done) == (2, 0, 2, 2)


def test_fhir_device_carries_the_digest(poses):
    from mam.fhir import FhirCodes, FhirContext, build_bundle

    screener = Screener(DEFAULT_WEIGHTS)
    r = screener.screen_pose_file(poses / "b.npy")
    bundle = build_bundle(r, FhirContext(result_id="r-1"), FhirCodes())
    (device,) = [e["resource"] for e in bundle["entry"]
                 if e["resource"]["resourceType"] == "Device"]  # fmt: skip
    assert device["version"][0] == {"value": DEMO.version}
    assert {"type": {"text": "model-digest"}, "value": DEMO.digest} in device["version"]
    assert any(DEMO.digest in i["value"] for i in device["identifier"])


def test_exports_are_named_by_the_weights_file_and_carry_the_digest(tmp_path, poses):
    """Two calibrations of one network exported into one folder keep their own files."""
    pytest.importorskip("onnxscript")
    from export.onnx import export_onnx
    from mam.runtime import load_manifest
    from mam.screening import ScreeningOptions

    a = _copy_weights(tmp_path, "site_a")
    b = _copy_weights(tmp_path, "site_b", _set(("risk_threshold",), 0.9))
    for js in (a, b):
        export_onnx(js, parity=False)
    for js in (a, b):
        manifest, _ = load_manifest(js)  # the runtime finds it and its files match
        assert {n["file"] for n in manifest["networks"].values()} == {
            f"{js.stem}.{role}.onnx" for role in ("clip", "bag", "info")}  # fmt: skip
        assert manifest["model_digest"] == load_meta(js)[0].digest
    r = Screener(b, ScreeningOptions(runtime="onnxruntime")).screen_pose_file(poses / "b.npy")
    assert (r.model.runtime, r.model.digest) == ("onnxruntime", load_meta(b)[0].digest)


def test_model_identity_names_the_digest_and_the_demo_weights(tmp_path):
    demo = Screener(DEFAULT_WEIGHTS).model_identity()
    assert (demo["name"], demo["digest"], demo["demo"]) == (DEMO.name, DEMO.digest, True)
    assert demo["provenance"]["summary"] and "data_digests" not in demo["provenance"]
    recalibrated = _copy_weights(tmp_path / "a", edit=_set(("risk_threshold",), 0.9))
    assert Screener(recalibrated).model_identity()["demo"] is True  # still the demo network
    site = Screener(_copy_weights(tmp_path / "b", edit=_set(("name",), "site_a"))).model_identity()
    assert site["demo"] is False and site["digest"] == DEMO.digest
    assert site["weights_sha256"] == demo["weights_sha256"]
    json.dumps(site)  # a JSON answer as it is


def test_recording_the_digest_in_older_weights_keeps_it_without_the_pt(tmp_path):
    """Weights saved before digests were recorded: ``record_digest`` adds it to the JSON (the
    ``.pt`` untouched), so a bento without the ``.pt`` names the same model."""
    from mam.model.weights import record_digest

    js = _copy_weights(tmp_path)
    old = json.loads(js.read_text())
    for key in ("tensors_sha256", "model_digest"):  # as weights saved before digests were
        old.pop(key, None)
    js.write_text(json.dumps(old, indent=2))
    pt_sha = sha256_of(tmp_path / "mam_demo.pt")
    assert record_digest(js) == DEMO.digest and sha256_of(tmp_path / "mam_demo.pt") == pt_sha
    (tmp_path / "mam_demo.pt").unlink()
    assert load_meta(js)[0].digest == DEMO.digest
