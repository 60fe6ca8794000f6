"""The package installs like any other: a wheel, installed outside the checkout, screens the demo.

The wheel is built from a copy of the sources (so the checkout gets no ``build/`` folder) with the
test interpreter's setuptools, offline, and installed with ``--no-deps`` into a fresh virtual
environment that reads its dependencies from the test interpreter's site-packages through a
``.pth`` file. Entries of a ``.pth`` file are appended after the new environment's own
site-packages, and the ``.pth`` files inside them are not run, so neither an editable install of
the checkout (its finder is started by such a ``.pth``) nor the checkout itself can shadow the
wheel; the test still asserts where ``mam`` was imported from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from mam.model.weights import load_meta
from mam.schemas import ScreeningResult

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "infant_demo.mp4"
MAX_WHEEL_MB = 8.0  # the demo weights, their ONNX export, the lifter and the real motion: ~5.6

PROBE = """
import json, mam
from mam.pose.paper.backend import DEFAULT_LIFTER
from mam.screening import default_weights
from mam.synth.real_motion import default_data_path, load_clips
clips, groups = load_clips(default_data_path())
print(json.dumps({"mam": mam.__file__, "weights": str(default_weights()),
                  "lifter": str(DEFAULT_LIFTER), "lifter_file": DEFAULT_LIFTER.is_file(),
                  "poses": default_data_path(), "clips": list(clips.shape), "groups": len(groups)}))
"""


def _shipped_models() -> list[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data["tool"]["setuptools"]["package-data"]["mam._shipped"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (p.stdout[-2000:] + p.stderr[-4000:]).strip()
    assert p.returncode == 0, f"{cmd[:3]} exited {p.returncode}:\n{tail}"
    return p.stdout


def _clean_env() -> dict[str, str]:
    """The test's environment without anything that points Python or mam at the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MAM_"))}
    env.pop("VIRTUAL_ENV", None)
    if "MAM_POSE_CACHE" in os.environ:  # a cache of converted pose networks, not a model path
        env["MAM_POSE_CACHE"] = os.environ["MAM_POSE_CACHE"]
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the sources the wheel is made of."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mam", "service"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    (src / "models").mkdir()
    for name in _shipped_models():
        shutil.copy2(REPO / "models" / name, src / "models" / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(src)]
    _run([*cmd, "-w", str(tmp / "dist")], cwd=tmp, env=_clean_env())
    (whl,) = (tmp / "dist").glob("mam-*.whl")
    return whl


def test_the_wheel_holds_what_screening_needs_and_little_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("mam/_shipped/") for n in names if n.startswith("mam/_shipped/")}
    assert shipped == set(_shipped_models())
    assert {"mam_demo.json", "mam_demo.onnx.json", "lifter_infant.pt", "MODEL_CARD.md"} <= shipped
    data = {"mam/synth/data/mam_demo_poses.npz", "mam/synth/data/LICENSE"}
    assert data <= names, "the real motion ships only with its licence notice"
    assert "MIT License" in zipfile.ZipFile(wheel).read("mam/synth/data/LICENSE").decode()
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"models", "tests", "demo", "bench", "export"}, tops
    assert wheel.stat().st_size < MAX_WHEEL_MB * 2**20


def test_an_installed_wheel_screens_the_demo_from_another_folder(wheel, tmp_path):
    assert not tmp_path.resolve().is_relative_to(REPO)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    env = _clean_env()
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=tmp_path, env=env).strip()  # fmt: skip
    here = sysconfig.get_paths()
    deps = dict.fromkeys([*site.getsitepackages(), here["purelib"], here["platlib"]])
    (Path(purelib) / "_test_deps.pth").write_text("\n".join(p for p in deps if Path(p).is_dir()))
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "-I", str(wheel)],
         cwd=tmp_path, env=env)  # fmt: skip

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(DEMO, elsewhere / "demo.mp4")
    probe = json.loads(_run([str(python), "-c", PROBE], cwd=elsewhere, env=env))
    inside = Path(purelib).resolve()
    for key in ("mam", "weights", "lifter", "poses"):
        assert Path(probe[key]).resolve().is_relative_to(inside), (key, probe[key])
    assert probe["lifter_file"] and probe["clips"] == [495, 240, 17, 3] and probe["groups"] > 0

    out = _run([str(bindir / "mam"), "screen", "demo.mp4", "--format", "json"], elsewhere, env)
    result = ScreeningResult.model_validate(json.loads(out))
    _, _, shipped_sha = load_meta(REPO / "models" / "mam_demo.json")
    assert result.model.name == "mam_demo" and result.model.weights_sha256 == shipped_sha
    assert result.model.runtime == "onnxruntime", "the shipped ONNX export was not found"
    assert result.quality.clips_assessed > 0 and len(result.clips) == result.quality.clips_assessed
    assert result.classification.label in ("normal", "risk", "indeterminate")
    assert result.risk_probability + result.normal_probability == pytest.approx(1.0)
