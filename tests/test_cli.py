"""The command line as a user meets it: options in any place, options that would do nothing
refused, every error with a one-line fix."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import mam.batch
import mam.errors
import mam.review.study
import mam.training.calibration
import mam.training.dataset
import mam.training.fitting
from mam.cli import main, parse
from mam.cli.errors import HINTS
from mam.cli.options import train_config


def _codes() -> set[str]:
    found = set()
    for module in (
        mam.errors,
        mam.batch,
        mam.training.dataset,
        mam.training.fitting,
        mam.training.calibration,
        mam.review.study,
    ):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, mam.errors.MamError):
                found.add(cls.code)
    return found


def test_every_error_code_has_a_one_line_fix():
    codes = _codes()
    assert {"video_too_short", "invalid_pose", "disk_full", "invalid_dataset"} <= codes
    assert codes <= set(HINTS), codes - set(HINTS)
    assert all("\n" not in h and len(h) < 120 for h in HINTS.values())


def test_verbose_before_or_after_the_subcommand(tmp_path):
    pose = tmp_path / "p.npy"
    np.save(pose, np.zeros((300, 17, 3), np.float32))
    for argv in (["-v", "screen", "--pose", str(pose)], ["screen", "--pose", str(pose), "-v"],
                 ["screen", "-v", "--pose", str(pose)]):  # fmt: skip
        assert parse(argv).verbose is True
    assert parse(["screen", "--pose", str(pose)]).verbose is False
    assert parse(["batch", "merge", "a", "b", "--out", "c", "-v"]).verbose is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["screen", "--pose", "p.npy", "--pose-backend", "onnx"], "--pose-backend: not used"),
        (["evaluate", "--data", "d", "--epochs", "3"], "--epochs: training options need --folds"),
        (["evaluate", "--data", "d", "--folds", "5", "--weights", "w.json"], "--weights"),
        (["synth", "--out", "o", "--infants", "2", "--pool", "external"], "--backgrounds real"),
        (["synth", "--out", "o", "--infants", "2", "--workers", "2"], "only with --render"),
        (["batch", "a", "--out", "o", "--service", "http://x", "--weights", "w"], "service"),
        (["serve", "--hash-key", "k", "--port", "9"], "only prints a digest"),
        (["screen"], "exactly one of VIDEO or --pose"),
    ],
)
def test_options_a_command_would_ignore_are_refused(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mam {argv[0]}: ") and message in err, err


def test_an_error_says_its_code_and_how_to_fix_it(capsys, tmp_path):
    assert main(["screen", str(tmp_path / "missing.mp4")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("error [file_not_found]: ")
    assert lines[1] == "fix: " + HINTS["file_not_found"]


def test_dataset_check_is_a_command_with_typed_errors(capsys, tmp_path):
    assert "check" in parse(["dataset", "check", str(tmp_path)]).func.__name__
    assert main(["dataset", "check", str(tmp_path / "nowhere"), str(tmp_path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error [invalid_dataset]: 2 problems in the training data (all listed):"
    assert lines[1].endswith("nowhere: not a folder")
    assert lines[2].endswith("infants.csv: not found (every dataset folder needs one)")
    assert lines[-1] == "fix: " + HINTS["invalid_dataset"]
    assert "insufficient_data" in _codes()


def test_every_command_and_verb_is_a_real_subcommand(capsys):
    """`batch merge`, `synth demo` and `train-lifter` are parsed by argparse like the others: their
    options, help and refusals; `mam batch INPUT` keeps its positional (`./merge` is a folder)."""
    merge = parse(["batch", "merge", "s0", "s1", "--out", "all"])
    assert (merge.func.__name__, merge.prog, [str(s) for s in merge.shards]) == (
        "run_merge", "mam batch merge", ["s0", "s1"])  # fmt: skip
    run = parse(["batch", "./merge", "--out", "r", "--workers", "2"])
    assert (run.func.__name__, str(run.input), run.given) == ("run", "merge", {"out", "workers"})
    demo = parse(["-v", "synth", "demo", "--seconds", "3"])
    assert (demo.func.__name__, demo.seconds, demo.verbose) == ("run_demo", 3.0, True)
    assert parse(["synth", "--out", "o", "--infants", "2"]).func.__name__ == "run"
    lifter = parse(["train-lifter", "--data", "m.npz", "--out", "l.pt", "--minutes", "1"])
    assert (lifter.func.__name__, lifter.minutes, lifter.channels) == (
        "run_train_lifter",
        1.0,
        None,
    )
    for argv, usage in ((["batch", "merge", "--help"], "usage: mam batch merge"),
                        (["synth", "demo", "--help"], "usage: mam synth demo"),
                        (["train-lifter", "--help"], "usage: mam train-lifter"),
                        (["batch", "--help"], "mam batch merge")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            parse(argv)
        assert e.value.code == 0 and usage in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # a verb's own options are checked by its parser
        parse(["batch", "merge", "s0", "--workers", "2", "--out", "x"])
    assert e.value.code == 2 and "--workers" in capsys.readouterr().err


def test_train_options_are_a_preset_with_overrides():
    """`mam train` is `TrainConfig.preset("compact")`; `--preset paper` the paper's recipe;
    an option given replaces that one field only."""
    from mam.model.config import MAMConfig
    from mam.training.train import TrainConfig

    base = ["train", "--data", "d", "--out", "o"]
    assert train_config(parse(base)) == TrainConfig.preset("compact")
    paper = train_config(parse([*base, "--preset", "paper"]))
    assert paper == TrainConfig() and (paper.epochs, paper.optimizer) == (300, "sgd")
    mixed = train_config(
        parse([*base, "--preset", "paper", "--epochs", "5", "--config", "compact"])
    )
    assert (mixed.epochs, mixed.optimizer, mixed.lr) == (5, "sgd", TrainConfig().lr)
    assert mixed.model == TrainConfig.preset("compact").model != MAMConfig.paper()
    compact = TrainConfig.preset("compact")
    assert (compact.epochs, compact.optimizer, compact.lr) == (8, "adamw", 5e-4)
    with pytest.raises(ValueError, match="unknown training preset"):
        TrainConfig.preset("fast")


def test_synth_demo_and_train_lifter_run_from_their_subcommands(tmp_path, capsys):
    """`mam synth demo` (and `python -m mam.synth.demo`, the same command) writes a recording of
    the asked length; `mam train-lifter` trains and records the options it was given."""
    import json
    import subprocess
    import sys

    import av

    from mam.shipped import demo_poses

    video = tmp_path / "demo.mp4"
    argv = ["--out", str(video), "--seconds", "2", "--width", "160", "--height", "96"]
    assert main(["synth", "demo", *argv]) == 0
    with av.open(str(video)) as f:
        frames = sum(1 for _ in f.decode(video=0))
    assert frames == 50 and "160x96" in capsys.readouterr().out
    again = tmp_path / "again.mp4"
    argv[1] = str(again)
    subprocess.run([sys.executable, "-m", "mam.synth.demo", *argv], check=True, timeout=120)
    assert again.stat().st_size > 0

    out = tmp_path / "lifter.pt"
    argv = ["train-lifter", "--data", str(demo_poses()), "--out", str(out), "--channels", "16",
            "--filter-widths", "3,3", "--epochs", "1", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["config"]["channels"] == 16 and sidecar["training"]["epochs"] == 1
    assert sidecar["training"]["command"] == "mam " + " ".join(argv)
    assert "held-out MPJPE" in capsys.readouterr().out


def test_evaluate_scores_the_external_set_with_an_all_data_model_then_deletes_it(monkeypatch):
    """With folds, the external set is scored by weights trained on all the data, saved to a
    temporary folder that is gone once the result is returned."""
    from unittest.mock import MagicMock

    import mam.model.weights
    import mam.training.evaluate as ev
    from mam.training.pipeline import evaluate_sets

    seen = []

    def save(model, meta, path):
        path.with_suffix(".json").write_text("{}")
        return path.with_suffix(".json")

    def evaluate(weights, records, *a, **k):
        seen.append((weights, weights.is_file(), list(records)))
        return {"scored": len(records)}

    monkeypatch.setattr(mam.training.fitting, "fit", lambda *a, **k: (MagicMock(), MagicMock()))
    monkeypatch.setattr(mam.model.weights, "save_weights", save)
    monkeypatch.setattr(ev, "cross_validate", lambda *a, **k: {"folds": 3})
    monkeypatch.setattr(ev, "evaluate", evaluate)
    records = [MagicMock(fms_category="normal") for _ in range(4)]
    res = evaluate_sets(records, ["ext-a", "ext-b"], cfg=MagicMock(), folds=3)
    assert res == {"folds": 3, "external": {"scored": 2}}
    ((weights, existed, scored),) = seen
    assert existed and scored == ["ext-a", "ext-b"]
    assert not weights.exists() and not weights.parent.exists()
