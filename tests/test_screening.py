"""The screening pipeline and the ``mam screen`` CLI, end to end on generated files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mam import DISCLAIMER, errors
from mam.cli import main
from mam.pose.base import default_pose_backend
from mam.schemas import InfantData, ScreeningResult
from mam.screening import DEFAULT_WEIGHTS, Screener, ScreeningOptions
from mam.synth.motion import simulate_infant
from mam.video import VideoLimits
from tests.media import truncate, write_audio_only, write_video

INFANT_ARGS = [
    "--sex", "female",
    "--gestational-age-weeks", "34",
    "--birth-weight-g", "2100",
    "--corrected-age-weeks", "12",
]  # fmt: skip


@pytest.fixture(scope="module")
def screener() -> Screener:
    return Screener(DEFAULT_WEIGHTS)


@pytest.fixture(scope="module")
def sim_pose(tmp_path_factory):
    """A simulated 40 s recording with continuous FMs, as a pose file."""
    sim = simulate_infant(np.random.default_rng(5), "t", "continuous", 40.0)
    path = tmp_path_factory.mktemp("pose") / "pose.npy"
    np.save(path, sim.joints)
    return path, sim


@pytest.fixture(scope="module")
def rendered_video(tmp_path_factory):
    """11 s of a simulated infant rendered small: enough for one instance."""
    from mam.synth.render import render_video

    sim = simulate_infant(np.random.default_rng(3), "v", "intermittent", 11.0)
    path = tmp_path_factory.mktemp("video") / "infant.mp4"
    render_video(sim.clean_joints, path, width=480, height=360, seed=1, preset="ultrafast")
    return path


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_pose_file_json_result(capsys, sim_pose):
    path, sim = sim_pose
    code, out, _ = _cli(capsys, "screen", "--pose", str(path), "--format", "json", *INFANT_ARGS)
    assert code == 0
    r = ScreeningResult.model_validate_json(out)
    d = json.loads(out)
    for key in (
        "risk_probability", "normal_probability", "classification", "fms_frequency",
        "fms_category", "clips", "top_fms_clips", "quality", "model", "disclaimer",
    ):  # fmt: skip
        assert key in d
    assert abs(r.risk_probability + r.normal_probability - 1) < 1e-3
    # 1000 frames, step 90: starts 0, 90, ..., 720; the 40 frames after 960 are under half a
    # step, so no tail clip. Each clip lasts 9.6 s.
    assert [c.start_s for c in r.clips] == [round(i * 3.6, 2) for i in range(9)]
    assert all(abs(c.end_s - c.start_s - 9.6) < 1e-6 for c in r.clips)
    assert r.fms_frequency == pytest.approx(
        np.mean([c.fms_probability > 0.5 for c in r.clips]), abs=1e-4
    )
    assert r.top_fms_clips[0].fms_probability == max(c.fms_probability for c in r.clips)
    assert abs(sum(c.attention_weight for c in r.clips) - 1) < 1e-3
    assert r.model.used_info_branch and r.disclaimer == DISCLAIMER
    assert r.model.pose_backend == "precomputed"


def test_info_branch_changes_the_result(screener, sim_pose):
    path, _ = sim_pose
    without = screener.screen_pose_file(path)
    preterm = InfantData(
        sex="male", gestational_age_weeks=26, birth_weight_g=800, corrected_age_weeks=12
    )
    term = InfantData(
        sex="female", gestational_age_weeks=40, birth_weight_g=3600, corrected_age_weeks=12
    )
    a, b = screener.screen_pose_file(path, preterm), screener.screen_pose_file(path, term)
    assert not without.model.used_info_branch and any("w/o info" in w for w in without.warnings)
    assert a.model.used_info_branch and b.model.used_info_branch
    # clip scores do not depend on infant data
    assert [c.fms_probability for c in a.clips] == [c.fms_probability for c in b.clips]
    # P(normal) does (unrounded: a clear recording can saturate the rounded result)
    from mam.features import build_instances
    from mam.pose import load_pose_file

    inst = build_instances(load_pose_file(path).joints, screener.meta.normalizer)
    p_pre = screener.score_instances(inst.tensors, preterm).normal_probability
    p_term = screener.score_instances(inst.tensors, term).normal_probability
    assert p_pre != p_term


def test_trained_demo_model_tells_simulated_groups_apart(screener):
    """The shipped demo weights score held-out simulated normal infants above risk ones."""
    rng = np.random.default_rng(123)
    normal = [simulate_infant(rng, "n", "continuous", 60.0) for _ in range(3)]
    risk = [simulate_infant(rng, "r", "absent", 60.0) for _ in range(3)]
    from mam.pose.base import PoseSequence

    def p_risk(sim):
        seq = PoseSequence(sim.joints, np.isfinite(sim.joints[..., 0]).astype(np.float32))
        return screener.screen_pose(seq).risk_probability

    assert max(map(p_risk, normal)) < min(map(p_risk, risk))


def test_out_of_window_age_is_a_warning(capsys, sim_pose):
    path, _ = sim_pose
    args = [*INFANT_ARGS[:-1], "30"]
    code, out, _ = _cli(capsys, "screen", "--pose", str(path), "--format", "json", *args)
    assert code == 0
    assert any("outside the 9-20 week window" in w for w in json.loads(out)["warnings"])


@pytest.mark.parametrize(
    "args",
    [
        ["--sex", "female"],  # partial infant data
        [*INFANT_ARGS[:-2], "--birth-weight-g", "20"],  # impossible birth weight
        [*INFANT_ARGS[:2], "--gestational-age-weeks", "80", *INFANT_ARGS[4:]],
    ],
)
def test_invalid_infant_data(capsys, sim_pose, args):
    path, _ = sim_pose
    rc, _, err = _cli(capsys, "screen", "--pose", str(path), *args)
    assert rc == 2
    lines = err.strip().splitlines()  # the error, then how to fix it
    assert "invalid_infant_data" in lines[0] and len(lines) == 2 and lines[1].startswith("fix: ")


def _bad_files(tmp):
    blank = write_video(tmp / "blank.mp4", lambda i: np.full((120, 160, 3), 90, np.uint8),
                        n_frames=275, size=(160, 120))  # fmt: skip
    short = write_video(tmp / "short.mp4", 100, size=(160, 120))
    good = write_video(tmp / "good.mp4", 300, size=(160, 120))
    zero = tmp / "zero.mp4"
    zero.write_bytes(b"")
    text = tmp / "text.mp4"
    text.write_text("this is not a video\n" * 50)
    return {
        "missing": (tmp / "nope.mp4", "file_not_found"),
        "zero": (zero, "empty_file"),
        "text": (text, "not_a_video"),
        "audio": (write_audio_only(tmp / "audio.m4a"), "not_a_video"),
        "truncated": (truncate(good, 0.5, tmp / "trunc.mp4"), "corrupt_video"),
        "short": (short, "video_too_short"),
        "blank": (blank, "no_infant_detected"),
    }


def test_bad_videos_give_one_line_typed_errors(capsys, tmp_path):
    for name, (path, code) in _bad_files(tmp_path).items():
        rc, out, err = _cli(capsys, "screen", str(path), "-q")
        assert rc == 2, name
        assert err.strip().startswith(f"error [{code}]:"), (name, err)
        lines = err.strip().splitlines()  # the error, then how to fix it
        assert len(lines) == 2 and lines[1].startswith("fix: "), name
        assert out == "", name


def test_bad_pose_file(capsys, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((100, 16, 3), np.float32))
    rc, _, err = _cli(capsys, "screen", "--pose", str(bad))
    assert rc == 2 and "error [invalid_pose]" in err
    short = tmp_path / "short.npy"
    np.save(short, np.zeros((100, 17, 3), np.float32))
    rc, _, err = _cli(capsys, "screen", "--pose", str(short))
    assert rc == 2 and "error [video_too_short]" in err


def test_limits_are_configurable(tmp_path):
    path = write_video(tmp_path / "v.mp4", 300, size=(320, 240))
    tight = Screener(options=ScreeningOptions(limits=VideoLimits(max_duration_s=10.0)))
    with pytest.raises(errors.VideoTooLongError):
        tight.screen_video(path)
    small = Screener(options=ScreeningOptions(limits=VideoLimits(max_width=200, max_height=200)))
    with pytest.raises(errors.ResolutionTooLargeError):
        small.screen_video(path)


def test_rendered_video_end_to_end(screener, rendered_video):
    r = screener.screen_video(rendered_video)
    assert r.quality.tracked_fraction > 0.9
    assert r.quality.duration_s == pytest.approx(11.0, abs=0.05)
    assert len(r.clips) == 1 and r.model.pose_backend == default_pose_backend()
    assert {"decode", "pose", "pose_total", "features", "model"} <= set(r.timings_s)
    # decode overlaps pose (a reader thread), so the wall time is at most their sum
    assert r.timings_s["pose_total"] <= r.timings_s["decode"] + r.timings_s["pose"] + 2e-3


def test_console_script_text_output(sim_pose):
    """The installed entry point prints the text result and the disclaimer."""
    path, _ = sim_pose
    proc = subprocess.run(
        [sys.executable, "-m", "mam", "screen", "--pose", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Classification:" in proc.stdout and DISCLAIMER in proc.stdout


def test_screening_runs_without_pytorch(sim_pose):
    """Serving does not need torch (the ``train`` extra): ONNX Runtime runs the networks."""
    path, _ = sim_pose
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from mam.cli import main\n"
        f"sys.exit(main(['screen', '--pose', {str(path)!r}, '--format', 'json']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = ScreeningResult.model_validate_json(proc.stdout)
    assert r.model.runtime == "onnxruntime" and r.model.device == "cpu"


def test_pose_backend_is_made_once_per_thread_and_kept(monkeypatch, tmp_path):
    """Making a backend can cost seconds (graphs, sessions, weight hashes): a Screener keeps one
    per thread (backends hold per-video state, so threads never share one), and a backend given
    to estimate_video_pose stays open for the next recording."""
    from concurrent.futures import ThreadPoolExecutor

    from mam.pose import base
    from mam.pose.from_video import estimate_video_pose

    made, closed = [], []

    class Counting:
        name = "counting"

        def __init__(self):
            made.append(self)

        def estimate(self, frames, progress=None):
            n = sum(1 for _ in frames)
            return base.PoseSequence(np.zeros((n, 17, 3), np.float32), np.ones((n, 17), np.float32))

        def close(self):
            closed.append(self)

    monkeypatch.setitem(base._BACKENDS, "counting", Counting)
    s = Screener(options=ScreeningOptions(pose_backend="counting"))
    mine = s.pose_estimator()
    assert s.pose_estimator() is mine and len(made) == 1
    with ThreadPoolExecutor(1) as pool:
        theirs = pool.submit(s.pose_estimator).result()
    assert theirs is not mine and len(made) == 2
    video = write_video(tmp_path / "v.mp4", 250)  # 10 s: one clip
    estimate_video_pose(video, mine)
    assert closed == []  # the caller's instance: kept
    estimate_video_pose(video, "counting")
    assert len(made) == 3 and closed == [made[-1]]  # made by name for one recording: closed
