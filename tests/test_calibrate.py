"""``mam calibrate``: the operating point a site chooses, checked by screening the very
recordings it was chosen on with the new weights (the screener's own decisions, not the
calibration code's arithmetic)."""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import pytest

from mam.cli import main
from mam.model.weights import load_meta
from mam.screening import Screener, default_weights
from mam.synth import SimParams, write_dataset
from mam.training.calibration import (
    MIN_KIND_INFANTS,
    SourceKindError,
    calibrated_version,
    choose_threshold,
    operating_point,
    records_of_kind,
)
from mam.training.dataset import load_datasets
from mam.training.evaluate import infant_data
from mam.training.train import TrainRecord

# FMs shares that overlap across the groups, so that the demo weights' scores overlap too and
# each target gives another threshold (with the simulator's default ranges they separate).
OVERLAP = {"continuous": (0.3, 0.6), "intermittent": (0.2, 0.5), "sporadic": (0.1, 0.4),
           "absent": (0.0, 0.3)}  # fmt: skip
LINE = re.compile(
    r"P\(risk\) >= (?P<t>[\d.]+) \(95% CI (?P<tlo>[\d.]+)-(?P<thi>[\d.]+)\); "
    r"sensitivity (?P<se>[\d.]+) \((?P<selo>[\d.]+)-(?P<sehi>[\d.]+)\), "
    r"specificity (?P<sp>[\d.]+) \((?P<splo>[\d.]+)-(?P<sphi>[\d.]+)\) on (?P<n>\d+) recordings"
)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """44 labelled pose files the demo weights never saw (22 risk), and their records."""
    d = write_dataset(tmp_path_factory.mktemp("site") / "site", MIN_KIND_INFANTS + 4, 7,
                      (20.0, 26.0), SimParams(fms_share=OVERLAP))  # fmt: skip
    return d, load_datasets([d])


def _calibrate(capsys, *args) -> tuple[int, str, str]:
    rc = main(["calibrate", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _screen(weights, records) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per record: truly risk, screened as risk (the model's label), P(risk), threshold used."""
    sc = Screener(weights)
    rs = [sc.screen_pose(r.pose(), infant_data(r.info)) for r in records]
    return (
        np.array([r.group == "risk" for r in records]),
        np.array([r.classification.model_label == "risk" for r in rs]),
        np.array([r.risk_probability for r in rs]),
        np.array([r.classification.threshold for r in rs]),
    )


def _printed(out: str) -> dict:
    m = LINE.search(out)
    assert m, out
    v = {k: float(x) for k, x in m.groupdict().items()}
    assert v["tlo"] <= v["thi"] and v["selo"] <= v["sehi"] and v["splo"] <= v["sphi"]
    return v


def test_target_sensitivity_holds_on_the_recordings_it_was_fitted_on(site, tmp_path, capsys):
    """The threshold screens at least 95% of the risk infants as risk, and no more than needed
    (the highest such threshold); printed with its interval; a new version in new files, the
    original weights untouched; the provenance names what was done and on which data."""
    data, records = site
    weights = default_weights()
    before = {p: _digest(p) for p in (weights, weights.with_suffix(".pt"))}
    old = load_meta(weights)[0]
    rc, out, err = _calibrate(capsys, "--weights", weights, "--data", data, "--out",
                              tmp_path / "site_cal", "--target-sensitivity", 0.95)  # fmt: skip
    assert rc == 0, err
    assert f"wrote {tmp_path / 'site_cal.json'}" in out
    printed = _printed(out)
    assert printed["n"] == len(records) and printed["se"] >= 0.95
    assert printed["selo"] <= printed["se"] <= printed["sehi"]

    risk, flagged, p, th = _screen(tmp_path / "site_cal.json", records)
    sensitivity = flagged[risk].mean()
    assert sensitivity >= 0.95
    # the highest threshold that reaches it: one risk infant fewer would fall short
    assert flagged[risk].sum() == math.ceil(0.95 * risk.sum())
    assert sensitivity == pytest.approx(printed["se"], abs=0.005)
    assert (~flagged[~risk]).mean() == pytest.approx(printed["sp"], abs=0.005)
    assert np.all(th == th[0]) and th[0] == pytest.approx(printed["t"], abs=5e-4)

    meta = load_meta(tmp_path / "site_cal.json")[0]
    assert meta.calibration_by_kind["pose_file"].risk_threshold == th[0]
    assert meta.version == calibrated_version(old.version) != old.version
    assert {p: _digest(p) for p in before} == before
    op = meta.provenance["calibration"]["operating_point"]["pose_file"]
    assert op["target"] == "sensitivity" and op["target_value"] == 0.95
    assert op["infants"] == len(records) and op["risk_infants"] == int(risk.sum())
    assert len(op["threshold_ci"]) == 2 and op["sensitivity_ci"][0] <= op["sensitivity"]
    assert {r.digest for r in records} <= set(meta.provenance["data_digests"]["calibration"])
    assert meta.provenance["recalibrated_from"][-1]["version"] == old.version
    # the other kind's calibration is the original's
    assert (meta.calibration_by_kind["video"].to_dict()
            == old.calibration_by_kind["video"].to_dict())  # fmt: skip


def test_target_specificity_and_youden(site, tmp_path, capsys):
    """``--target-specificity``: at least that share of the normal infants screened normal, by
    the lowest such threshold; the default is Youden's J, the best sensitivity + specificity
    over every cut of the screened P(risk); ``--version`` names the version."""
    data, records = site
    rc, out, err = _calibrate(capsys, "--data", data, "--target-specificity", 0.9,
                              "--out", tmp_path / "spec")  # fmt: skip
    assert rc == 0, err
    printed = _printed(out)
    risk, flagged, _, _ = _screen(tmp_path / "spec.json", records)
    cleared = ~flagged[~risk]
    assert cleared.mean() >= 0.9 and cleared.sum() == math.ceil(0.9 * (~risk).sum())
    assert cleared.mean() == pytest.approx(printed["sp"], abs=0.005)

    rc, out, err = _calibrate(capsys, "--data", data, "--out", tmp_path / "youden",
                              "--version", "2.0-site")  # fmt: skip
    assert rc == 0, err
    printed = _printed(out)
    risk, flagged, p, _ = _screen(tmp_path / "youden.json", records)
    j = flagged[risk].mean() + (~flagged[~risk]).mean() - 1
    best = max((p[risk] >= c).mean() + (p[~risk] < c).mean() - 1 for c in np.unique(p))
    assert j == pytest.approx(best, abs=1e-9) and j > 0.5
    assert load_meta(tmp_path / "youden.json")[0].version == "2.0-site"


def test_too_few_recordings_refused_unless_accepted(site, tmp_path, capsys):
    """Below the minimum: ``error [insufficient_data]`` naming the numbers, a fix line, exit 2,
    nothing written; ``--accept-small-data`` calibrates and records the shortfall."""
    data, records = site
    small = tmp_path / "small"
    small.mkdir()
    lines = (data / "infants.csv").read_text().splitlines()
    (small / "infants.csv").write_text("\n".join(lines[:13]) + "\n")
    (small / "poses").symlink_to(data / "poses")
    rc, out, err = _calibrate(capsys, "--data", small, "--out", tmp_path / "small_cal")
    assert rc == 2 and "Traceback" not in err
    assert "error [insufficient_data]: 12 pose_file recordings" in err
    assert f"at least {MIN_KIND_INFANTS}" in err and "\nfix: " in err
    assert not list(tmp_path.glob("small_cal*"))

    rc, out, err = _calibrate(capsys, "--data", small, "--out", tmp_path / "small_cal",
                              "--accept-small-data")  # fmt: skip
    assert rc == 0, err
    assert _printed(out)["n"] == 12 and "warning: " in out
    meta = load_meta(tmp_path / "small_cal.json")[0]
    assert any("on 12 recordings" in w for w in meta.provenance["small_data"])
    r = Screener(tmp_path / "small_cal.json").screen_pose(records[0].pose())
    assert any("on 12 recordings" in w for w in r.warnings)
    # calibrated again on enough recordings, the weights no longer warn of it
    rc, out, err = _calibrate(capsys, "--weights", tmp_path / "small_cal.json", "--data", data,
                              "--out", tmp_path / "enough")  # fmt: skip
    assert rc == 0, err
    meta = load_meta(tmp_path / "enough.json")[0]
    assert not any("on 12 recordings" in w for w in meta.provenance["small_data"])
    assert meta.version.endswith("+cal.2")

    rc, out, err = _calibrate(capsys, "--data", data, "--out", tmp_path / "v", "--kind", "video")
    assert rc == 2 and "error [source_kind]: no video recordings" in err and "\nfix: " in err


def test_operating_point_guarantees_its_target_and_bootstraps_an_interval():
    """On scores with known overlap: every target is met on the data and the next stricter
    cut would miss it; the intervals widen with fewer infants."""
    rng = np.random.default_rng(3)
    y = np.arange(200) < 80
    p = 1 / (1 + np.exp(-(np.where(y, 1.0, -1.0) + rng.normal(0, 1.2, 200))))
    for s in (0.5, 0.8, 0.9, 0.95, 1.0):
        t = choose_threshold(p, y, "sensitivity", s)
        assert (p[y] >= t).mean() >= s
        assert (p[y] >= p[y][p[y] >= t].min() + 1e-12).mean() < s
        t = choose_threshold(p, y, "specificity", s)
        assert (p[~y] < t).mean() >= s
        assert (p[~y] < p[~y][p[~y] < t].max()).mean() < s
    wide = operating_point(p[::5], y[::5], "sensitivity", 0.9, bootstrap=300)
    narrow = operating_point(p, y, "sensitivity", 0.9, bootstrap=300)
    assert narrow.sensitivity >= 0.9 and narrow.threshold_ci[0] <= narrow.threshold
    width = [np.diff(o.specificity_ci)[0] for o in (wide, narrow)]
    assert width[0] > width[1] > 0


def test_records_of_mixed_kinds_need_a_kind():
    def rec(source: str) -> TrainRecord:
        return TrainRecord("x", np.zeros((1, 17, 3)), "normal", source=source)

    mixed = [rec("precomputed"), rec("onnx"), rec("precomputed")]
    with pytest.raises(SourceKindError, match="several source kinds"):
        records_of_kind(mixed)
    kind, mine, left = records_of_kind(mixed, "pose_file")
    assert (kind, len(mine), left) == ("pose_file", 2, 1)
    assert records_of_kind(mixed[:1])[0] == "pose_file"
