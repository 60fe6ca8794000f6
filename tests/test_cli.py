"""The command line as a user meets it: options in any place, options that would do nothing
refused, every error with a one-line fix."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import mam.batch
import mam.errors
import mam.training.calibration
import mam.training.dataset
import mam.training.fitting
from mam.cli import main, parse
from mam.cli.errors import HINTS


def _codes() -> set[str]:
    found = set()
    for module in (
        mam.errors,
        mam.batch,
        mam.training.dataset,
        mam.training.fitting,
        mam.training.calibration,
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
