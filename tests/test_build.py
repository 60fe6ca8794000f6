"""``mam build``: a site's weights into BentoML's model store and a bento that serves exactly
them with ``bentoml serve mam:<tag>`` (not the demo weights, whatever the checkout holds)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")

from mam.model.weights import load_meta  # noqa: E402
from mam.pose.precomputed import validate_pose_array  # noqa: E402
from mam.screening import DEFAULT_WEIGHTS, Screener  # noqa: E402
from tests.service_helpers import (  # noqa: E402
    API_KEY,
    multipart,
    npy_bytes,
    service_env,
    serving,
    simulated,
)
from tests.test_model_endpoint import site_copy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def mam(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mam.cli", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAM_", "BENTOML_"))}
    env |= {"BENTOML_HOME": str(tmp / "home"), "MAM_AUDIT_FILE": "off"}
    weights = site_copy(tmp / "site")
    r = mam(env, "build", "--weights", str(weights))
    assert r.returncode == 0, r.stderr
    tag = next(line.split()[-1] for line in r.stdout.splitlines() if line.startswith("bento:"))
    return {"tmp": tmp, "env": env, "weights": weights, "tag": tag, "out": r.stdout}


def test_the_model_store_holds_the_weights_with_digest_and_card(built):
    meta = load_meta(built["weights"])[0]
    assert f"site_model:1.0.0 (digest {meta.digest})" in built["out"]
    entry = built["tmp"] / "home" / "models" / "site_model" / "1.0.0"
    info = (entry / "model.yaml").read_text()
    assert meta.digest in info and "Screening of term infants at the test site" in info
    assert {"site_model.json", "site_model.onnx.json", "site_model.card.md"} <= {
        p.name for p in entry.iterdir()
    }
    assert not (entry / "site_model.pt").exists()  # serving runs the ONNX export
    name, version = built["tag"].split(":")
    src = built["tmp"] / "home" / "bentos" / name / version / "src"
    assert not list(src.glob("models/mam_demo*"))  # the bento carries no other weights
    assert not (src / "models" / "MODEL_CARD.md").exists()  # nor the demo's card


def test_other_weights_under_a_taken_version_are_refused(built):
    other = site_copy(built["tmp"] / "other", threshold_shift=-0.1)  # same name and version
    r = mam(built["env"], "build", "--weights", str(other))
    assert r.returncode == 2
    assert r.stderr.startswith("error [model_version_taken]"), r.stderr
    again = mam(built["env"], "build", "--weights", str(built["weights"]))
    assert again.returncode == 0, again.stderr  # the same weights reuse their entry


@contextlib.contextmanager
def bento_serving(target: str, env: dict, tmp: Path):
    """``bentoml serve TARGET`` (a bento tag or folder), run from ``tmp``; yields its base URL."""

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1",
                "--port", str(port)]  # fmt: skip

    log = tmp / f"serve-{time.monotonic_ns()}.log"
    with serving(env, log, command, cwd=tmp) as served:
        yield served.base


def serve_env(built: dict, audit: Path, home: Path | None = None) -> dict:
    from service.settings import hash_key

    return built["env"] | service_env(hash_key(API_KEY)) | {
        "MAM_AUDIT_FILE": str(audit),
        "BENTOML_RESULT_STORE": ":memory:",
        "TMPDIR": str(built["tmp"]),
    } | ({"BENTOML_HOME": str(home)} if home else {})  # fmt: skip


def test_bentoml_serve_of_the_bento_screens_with_those_weights(built):
    tmp, audit = built["tmp"], built["tmp"] / "audit.jsonl"
    with bento_serving(built["tag"], serve_env(built, audit), tmp) as base:
        doc = httpx.get(base + "/model", timeout=30).json()
        site = Screener(built["weights"])
        assert doc["digest"] == site.model_digest != Screener().model_digest
        assert (doc["name"], doc["version"], doc["demo"]) == ("site_model", "1.0.0", False)
        assert doc["intended_use"]["source"] == "model card"  # its own card, not the demo's
        _, joints, _ = simulated("absent", 2)
        files, data = multipart("pose", npy_bytes(joints), "application/octet-stream")
        r = httpx.post(base + "/screen_pose", files=files, data=data, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["model"]["digest"] == site.model_digest
        # Screened with the site's thresholds, as the library does with those weights.
        seq = validate_pose_array(joints)
        threshold = site.screen_pose(seq).classification.threshold
        assert result["classification"]["threshold"] == pytest.approx(threshold, abs=1e-6)
        assert threshold != Screener().screen_pose(seq).classification.threshold
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert lines and all(x.get("model_digest") == site.model_digest for x in lines)


def test_the_bento_as_the_image_holds_it_serves_them_without_the_model_store(built):
    """As ``bentoml containerize`` lays it out: the bento folder with its models inside,
    served by path, here with an empty model store beside it."""
    name, version = built["tag"].split(":")
    home = built["tmp"] / "home"
    image = built["tmp"] / "image" / "bento"
    shutil.copytree(home / "bentos" / name / version, image)
    shutil.copytree(home / "models" / "site_model", image / "models" / "site_model")
    empty = built["tmp"] / "empty-home"
    env = serve_env(built, built["tmp"] / "audit-image.jsonl", empty)
    with bento_serving(str(image), env, built["tmp"]) as base:
        doc = httpx.get(base + "/model", timeout=30).json()
    assert doc["digest"] == load_meta(built["weights"])[0].digest and doc["demo"] is False
    assert not (empty / "models" / "site_model").exists()  # not from a model store


def test_mam_weights_still_overrides_the_bento(built):
    env = serve_env(built, built["tmp"] / "audit-override.jsonl")
    env["MAM_WEIGHTS"] = str(DEFAULT_WEIGHTS)
    with bento_serving(built["tag"], env, built["tmp"]) as base:
        doc = httpx.get(base + "/model", timeout=30).json()
    assert doc["digest"] == load_meta(DEFAULT_WEIGHTS)[0].digest and doc["demo"] is True
