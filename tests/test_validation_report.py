"""``mam evaluate --out DIR``: the validation report (``mam.training.report``), the leakage
check, the model card from the weights' own provenance, the FMs-frequency baseline and the
paper's Table 2 beside MAM, and the report in the real browser.

One small model is trained once (compact configuration, 1 epoch) on simulated infants whose
folder declares them recordings; a disjoint set is simulated with another seed.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mam.cli import main
from mam.model.weights import load_meta, save_weights
from mam.screening import DEFAULT_WEIGHTS
from mam.synth import write_dataset
from mam.training.dataset import load_dataset
from mam.training.evaluate import fms_frequency_baseline
from mam.training.fitting import fit
from mam.training.model_card import CardInfoError, load_card_info, render
from mam.training.report import (
    NO_DATA,
    abstention_by_reason,
    check_output_paths,
    subgroups,
)
from mam.training.train import TrainConfig, compact_model_config
from tests.test_review_browser import driver  # noqa: F401 - the real-browser fixture

CI_KEYS = ("ppv", "npv", "pr_auc", "median_kappa", "auc", "sensitivity", "specificity")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """A training folder declared as recordings, weights fitted on it, and a disjoint set."""
    tmp = tmp_path_factory.mktemp("validation")
    train = write_dataset(tmp / "train", infants=16, seed=21, duration_s=(25, 25))
    (train / "dataset.json").write_text('{"data": "recordings"}')
    other = write_dataset(tmp / "other", infants=8, seed=22, duration_s=(25, 25))
    records = load_dataset(train)
    cfg = TrainConfig(model=compact_model_config(), epochs=1, optimizer="adamw", lr=5e-4,
                      max_lr=3e-3, ref_clips_per_step=16, instances_per_bag=8, seed=0,
                      threads=2)  # fmt: skip
    model, meta = fit(records, cfg, name="ward_b", version="1.2.0",
                      provenance={"summary": "ward B, 2025", "data": [str(train)],
                                  "infants": len(records)},
                      categories=[r.fms_category for r in records], progress=False)  # fmt: skip
    weights = save_weights(model, meta, tmp / "ward_b")
    info = tmp / "card.json"
    info.write_text(json.dumps({"site": "Ward B", "intended_use": "Second reader for GMA at 3 "
                                "months corrected age", "population": "Infants of ward B",
                                "contacts": ["gma-team@example.org"]}))  # fmt: skip
    return {"tmp": tmp, "train": train, "other": other, "weights": weights, "info": info}


def _evaluate(site, data, out: Path, capsys, *extra) -> tuple[int, str, str]:
    rc = main(["evaluate", "--data", str(data), "--weights", str(site["weights"]), "--out",
               str(out), *extra])  # fmt: skip
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def leaked(site, tmp_path_factory):
    """Evaluated on its own training folder, into an --out folder that does not exist yet."""
    out = site["tmp"] / "no" / "such" / "folder"
    card = out / "MODEL_CARD.md"
    mp = pytest.MonkeyPatch()
    err, stdout = io.StringIO(), io.StringIO()
    mp.setattr(sys, "stderr", err)
    mp.setattr(sys, "stdout", stdout)
    try:
        rc = main(["evaluate", "--data", str(site["train"]), "--weights", str(site["weights"]),
                   "--out", str(out), "--model-card", str(card), "--card-info",
                   str(site["info"])])  # fmt: skip
    finally:
        mp.undo()
    return {"rc": rc, "out": out, "card": card, "err": err.getvalue(),
            "report": json.loads((out / "report.json").read_text())}  # fmt: skip


def test_evaluating_on_the_training_data_warns_loudly_and_out_may_be_a_new_folder(leaked):
    assert leaked["rc"] == 0
    warnings = [x for x in leaked["err"].splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "were used to train" in warnings[0]
    check = leaked["report"]["leakage"]["checks"]["evaluation"]
    n_cal = check["calibration"]
    assert check["checked"] and check["leaked"] and leaked["report"]["leakage"]["warning"]
    assert check["train"] + n_cal == 16 and 0 < n_cal < 16  # every infant: trained or calibrated
    html = (leaked["out"] / "report.html").read_text()
    assert 'class="leakage" id="leakage-warning-' in html
    assert html.index("leakage-warning") < html.index("What was evaluated")  # at the top


def test_evaluating_on_disjoint_data_does_not_warn(site, tmp_path, capsys):
    rc, _, err = _evaluate(site, site["other"], tmp_path / "r", capsys)
    assert rc == 0 and "warning:" not in err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    check = report["leakage"]["checks"]["evaluation"]
    assert check["checked"] and check["train"] == 0 and check["calibration"] == 0
    assert not report["leakage"]["warning"]
    assert "leakage-warning" not in (tmp_path / "r" / "report.html").read_text()


def test_weights_without_digests_say_the_check_was_not_done(site, tmp_path, capsys):
    rc = main(["evaluate", "--data", str(site["other"]), "--weights", str(DEFAULT_WEIGHTS),
               "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0 and "warning:" not in err and "leakage not checked" in err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["leakage"]["not_checked"] == ["evaluation"]
    assert "Leakage check not done" in (tmp_path / "r" / "report.html").read_text()


def test_report_json_holds_every_metric_with_its_interval(leaked):
    s = leaked["report"]["sets"][0]
    assert s["infants"] == 16
    for k in CI_KEYS:
        m = s["metrics"][k]
        assert m["value"] is not None, k
        lo, hi = m["ci"]
        assert lo <= m["value"] + 1e-9 and m["value"] <= hi + 1e-9, k
    c = s["confusion"]["all"]
    assert sum(c.values()) == 16 and c["tp"] + c["fn"] == s["risk_infants"]
    bins = s["calibration_curve"]
    assert len(bins) == 10 and sum(b["infants"] for b in bins) == 16
    op = s["operating_point"]
    assert op["tpr"] == pytest.approx(c["tp"] / (c["tp"] + c["fn"]))
    assert {g["variable"] for g in s["subgroups"]} == {"sex", "gestational age",
                                                       "corrected age"}  # fmt: skip
    # no infant identifier anywhere in the report
    text = (leaked["out"] / "report.json").read_text()
    assert "sim0021_0000" not in text and "per_infant" not in text


def test_the_card_of_weights_declared_recordings_never_says_simulated(leaked):
    card = leaked["card"].read_text()
    assert card.startswith("# Model card: `ward_b` 1.2.0")
    assert "simulated" not in card.lower()
    assert "Second reader for GMA" in card and "gma-team@example.org" in card
    assert "Declared data: 16 recordings" in card
    # the shipped demo weights keep their card's wording
    meta, _, _ = load_meta(DEFAULT_WEIGHTS)
    demo = render(meta, {})
    assert "**Demonstration weights trained on SIMULATED infants. Not for clinical use.**" in demo


def test_card_info_is_checked_before_any_work(tmp_path, capsys):
    bad = tmp_path / "card.json"
    bad.write_text('{"intended_use": "x", "populaton": "typo"}')
    with pytest.raises(CardInfoError, match="populaton"):
        load_card_info(bad)
    rc = main(["evaluate", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
               "--card-info", str(bad)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error [invalid_card_info]") and "Traceback" not in err


def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(Exception, match="cannot write") as e:
        check_output_paths(tmp_path / "ok", [blocker / "MODEL_CARD.md"])
    assert e.value.code == "output_not_writable"
    rc = main(["evaluate", "--data", str(tmp_path / "nowhere"), "--out", str(blocker / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error [output_not_writable]")


def test_subgroups_list_every_band_and_infants_without_data():
    pi = {
        "risk": [True, False, True, False, True],
        "risk_probability": [0.9, 0.2, 0.8, 0.6, 0.4],
        "threshold": [0.5] * 5,
        "fms_frequency": [0.1, 0.9, 0.2, 0.5, 0.3],
        "fms_category": ["absent", "continuous", "sporadic", "intermittent", None],
        "indeterminate": [False, False, True, False, False],
        "sex": ["male", "female", "male", "female", None],
        "gestational_age_weeks": [28.0, 32.0, 36.9, 40.0, None],
        "corrected_age_weeks": [10.0, 12.0, 15.0, 19.0, None],
    }
    rows = {(r["variable"], r["group"]): r for r in subgroups(pi)}
    assert rows[("gestational age", "< 32 weeks")]["infants"] == 1
    assert rows[("gestational age", "32-37 weeks")]["infants"] == 2  # 32 and 36.9
    assert rows[("gestational age", ">= 37 weeks")]["infants"] == 1
    assert rows[("corrected age", "< 9 weeks")]["infants"] == 0  # listed, empty
    male = rows[("sex", "male")]
    assert male["infants"] == 2 and male["sensitivity"] == 1.0 and male["abstention_rate"] == 0.5
    for variable in ("sex", "gestational age", "corrected age"):
        assert rows[(variable, NO_DATA)]["infants"] == 1


def test_abstention_is_counted_per_reason_with_numbers_masked():
    pi = {"indeterminate": [True, True, False, True],
          "reasons": [["the infant was tracked in only 61% of the frames"],
                      ["the infant was tracked in only 70% of the frames", "no movement"],
                      [], ["no movement"]]}  # fmt: skip
    a = abstention_by_reason(pi)
    assert a["infants"] == 3 and a["rate"] == 0.75
    by = {r["reason"]: r["infants"] for r in a["by_reason"]}
    assert by == {"the infant was tracked in only N% of the frames": 2, "no movement": 2}


def test_fms_frequency_alone_calls_risk_below_the_intermittent_cutoff():
    f = np.array([0.05, 0.2, 0.3, 0.3, 0.6, 0.9])
    y = [True, True, True, False, False, False]
    fold = {"per_infant": {"risk": y, "fms_frequency": f.tolist(), "fms_category": [None] * 6},
            "model": {"fms_category_thresholds": {"intermittent": 0.3}}}  # fmt: skip
    r = fms_frequency_baseline(fold)
    # below 0.3: the first two (risk); 0.3 itself is intermittent, normal
    assert r["cutoff"] == 0.3 and r["confusion"] == {"tp": 2, "fp": 0, "fn": 1, "tn": 3}
    assert r["auc"] == pytest.approx(8.5 / 9)  # 1 - frequency ranks risk high; one tie
    cv = fms_frequency_baseline({"folds": [fold, {**fold, "model": {
        "fms_category_thresholds": {"intermittent": 0.5}}}]})  # fmt: skip
    assert cv["cutoffs"] == [0.3, 0.5] and cv["k"] == 2
    assert cv["sensitivity"] == pytest.approx((2 / 3 + 1) / 2) and cv["sensitivity_sd"] > 0


def test_cross_validation_card_report_text_and_baselines(site, tmp_path, capsys, monkeypatch):
    """--folds with --external and --baselines: the card describes the recipe (not the demo
    weights), the text output has the external set and the paper's table, and no temporary
    weights are left behind."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out, card = tmp_path / "r", tmp_path / "cards" / "CARD.md"
    rc = main(["evaluate", "--data", str(site["train"]), "--folds", "2", "--epochs", "1",
               "--external", str(site["other"]), "--baselines", "--model-card", str(card),
               "--out", str(out)])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0 and "warning:" not in cap.err
    assert list(scratch.iterdir()) == []  # the folds' and the all-data model's weights: gone
    first = card.read_text().splitlines()[0]
    assert "cross-validated" in first and "mam_demo" not in first
    assert "simulated" not in card.read_text().lower()  # declared recordings
    text = cap.out
    assert "\nrisk_infants" in text.split("\nexternal\n")[1]  # the external set, printed
    for method in ("MAM", "FMs frequency", "EML", "infant data"):
        assert f"\n{method} " in text, method
    assert "baselines, cross-validation" in text and "baselines, external" in text
    report = json.loads((out / "report.json").read_text())
    assert [s["title"] for s in report["sets"]] == ["cross-validation (2 folds)", "external"]
    cv = report["sets"][0]
    assert cv["infants"] == 16 and len(cv["per_fold"]) == 2
    assert cv["metrics"]["auc"]["sd"] is not None and cv["metrics"]["ppv"]["ci"] is not None
    b = report["baselines"]["cross-validation (2 folds)"]
    assert set(b) == {"MAM", "FMs frequency", "EML", "infant data"}
    cut = [f["fms_category_thresholds"]["intermittent"] for f in cv["per_fold"]]
    assert b["FMs frequency"]["cutoffs"] == cut
    assert set(report["baselines"]["external"]) == set(b)
    checks = report["leakage"]["checks"]
    assert checks["cross-validation (2 folds)"]["train"] == 0
    assert checks["external"]["checked"] and not checks["external"]["leaked"]


def test_baselines_need_folds_or_an_external_set(site, tmp_path, capsys):
    rc = main(["evaluate", "--data", str(site["other"]), "--baselines"])
    assert rc == 2 and "--baselines needs --folds or --external" in capsys.readouterr().err


@pytest.mark.browser
def test_the_report_shows_its_curves_in_the_browser(leaked, driver):  # noqa: F811
    from selenium.webdriver.common.by import By

    driver.get((leaked["out"] / "report.html").as_uri())
    figs = driver.find_elements(By.CSS_SELECTOR, "figure.fig svg")
    assert len(figs) == 3  # ROC, PR, reliability
    for svg in figs:
        assert svg.size["width"] > 100 and svg.size["height"] > 100
    for curve in ("roc", "pr"):
        dots = driver.find_elements(By.CSS_SELECTOR, f'[id^="operating-point-{curve}"]')
        assert len(dots) == 1, curve
        r = driver.execute_script("return arguments[0].getBoundingClientRect()", dots[0])
        assert r["width"] > 0 and r["height"] > 0
    box = driver.find_element(By.CSS_SELECTOR, '.leakage[id^="leakage-warning"]')
    assert box.is_displayed() and box.value_of_css_property("border-top-color") in (
        "rgba(176, 0, 32, 1)", "rgb(176, 0, 32)")  # fmt: skip
    assert "not a diagnosis" in driver.find_element(By.ID, "disclaimer").text
    assert not driver.find_elements(By.CSS_SELECTOR, "script, link, img, iframe, object")
    urls = driver.execute_script(  # offline: no address anywhere but XML namespace names
        "return [...document.querySelectorAll('*')].flatMap(e => [...e.attributes])"
        ".filter(a => !a.name.startsWith('xmlns') && /(https?:)?\\/\\//.test(a.value))"
        ".map(a => a.name)"
    )
    assert urls == []
