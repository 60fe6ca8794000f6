"""``mam.runtime``: backend choice and fallback, ONNX Runtime vs PyTorch parity, and the
screening pipeline giving the same result through either. GPU backends are ``gpu`` tests that
skip with the reason when this machine has no CUDA device or TensorRT."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from mam import errors
from mam.model.network import MAM
from mam.model.weights import Calibration, KindCalibration, load_weights
from mam.pose.base import PoseSequence
from mam.runtime import InferenceRuntime, RuntimeUnavailable, create_runtime, load_manifest
from mam.runtime.base import ENV_BACKEND
from mam.schemas import InfantData
from mam.screening import (
    DEFAULT_WEIGHTS,
    Screener,
    ScreeningOptions,
    fuse_normal_probability,
    normal_log_odds,
)
from mam.synth.motion import simulate_infant

ort = pytest.importorskip("onnxruntime")
ATOL = 1e-4
PRETERM = InfantData(
    sex="male", gestational_age_weeks=26, birth_weight_g=800, corrected_age_weeks=12
)


def _copy_model(dst, *, onnx: bool):
    for f in DEFAULT_WEIGHTS.parent.glob("mam_demo.*"):
        if onnx or "onnx" not in f.name:
            shutil.copy(f, dst / f.name)
    return dst / DEFAULT_WEIGHTS.name


@pytest.fixture(scope="module")
def pose():
    sim = simulate_infant(np.random.default_rng(5), "t", "continuous", 40.0)
    return PoseSequence(sim.joints, np.isfinite(sim.joints[..., 0]).astype(np.float32))


@pytest.fixture(scope="module")
def instances():
    """11 simulated instances: an odd count, more than one chunk at max_batch 4."""
    from mam.features import build_instances

    _, meta = load_weights(DEFAULT_WEIGHTS)
    sim = simulate_infant(np.random.default_rng(8), "r", "intermittent", 50.0)
    return build_instances(sim.joints, meta.normalizer).tensors[:11]


# -- choice and fallback ------------------------------------------------------------------------
def test_auto_prefers_onnxruntime_when_exported(monkeypatch):
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    rt = create_runtime(DEFAULT_WEIGHTS)
    assert (rt.backend, rt.device, rt.precision) == ("onnxruntime", "cpu", "fp32")
    assert rt.details["providers"][-1] == "CPUExecutionProvider"
    assert rt.details["intra_op_threads"] >= 1 and "fallbacks" not in rt.details


def test_auto_without_export_is_pytorch(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    rt = create_runtime(_copy_model(tmp_path, onnx=False))
    assert rt.backend == "pytorch"


def test_env_var_chooses(monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "pytorch")
    assert create_runtime(DEFAULT_WEIGHTS).backend == "pytorch"
    assert create_runtime(DEFAULT_WEIGHTS, "onnxruntime").backend == "onnxruntime"  # argument wins


def test_tensorrt_falls_back_to_onnxruntime_cpu_with_reason(caplog, tensorrt_and_cuda):
    if tensorrt_and_cuda:
        pytest.skip("TensorRT and CUDA are here: nothing to fall back from")
    with caplog.at_level(logging.INFO, logger="mam.runtime"):
        rt = create_runtime(DEFAULT_WEIGHTS, "tensorrt")
    assert (rt.backend, rt.device) == ("onnxruntime", "cpu")
    assert rt.details["requested"] == "tensorrt"
    assert rt.details["fallbacks"][0].startswith("tensorrt: ")
    text = caplog.text
    assert "runtime tensorrt unavailable" in text and "runtime: onnxruntime on cpu" in text


def test_stale_or_tampered_export_is_not_used(tmp_path):
    weights = _copy_model(tmp_path, onnx=True)
    manifest = tmp_path / "mam_demo.onnx.json"
    load_manifest(weights)  # a faithful copy is fine
    clip = tmp_path / "mam_demo.clip.onnx"
    clip.write_bytes(clip.read_bytes()[:-1] + b"\0")
    with pytest.raises(RuntimeUnavailable, match="does not match"):
        load_manifest(weights)
    rt = create_runtime(weights, "onnxruntime")
    assert rt.backend == "pytorch" and "does not match" in rt.details["fallbacks"][0]
    m = json.loads(manifest.read_text())
    m["weights_sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    with pytest.raises(RuntimeUnavailable, match="stale"):
        load_manifest(weights)
    assert create_runtime(weights).backend == "pytorch"  # auto: no current export


def test_unknown_backend_and_nothing_starting(monkeypatch):
    with pytest.raises(ValueError, match="unknown runtime"):
        create_runtime(DEFAULT_WEIGHTS, "tflite")

    class Broken(InferenceRuntime):
        def __init__(self, weights, **kw):
            raise RuntimeUnavailable("broken on purpose")

    from mam.runtime import base

    monkeypatch.setitem(base._BACKENDS, "pytorch", Broken)
    with pytest.raises(errors.ModelLoadError, match="broken on purpose"):
        create_runtime(DEFAULT_WEIGHTS, "pytorch")


# -- parity ---------------------------------------------------------------------------------------
def test_onnxruntime_matches_pytorch(instances):
    a = create_runtime(DEFAULT_WEIGHTS, "onnxruntime", max_batch=4)
    b = create_runtime(DEFAULT_WEIGHTS, "pytorch")
    fa, la = a.clip(instances)
    fb, lb = b.clip(instances)
    assert fa.shape == (11, fb.shape[1]) and la.shape == (11, 2)
    assert np.abs(fa - fb).max() < ATOL and np.abs(la - lb).max() < ATOL
    for x, y in zip(a.bag(lb[None]), b.bag(lb[None])):
        assert np.abs(x - y).max() < ATOL
    info = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert np.abs(a.info(info) - b.info(info)).max() < ATOL


def test_network_runs_in_chunks_joined_in_order():
    """The one run loop (``mam.runtime.networks``): an input larger than ``max_batch`` goes in
    chunks of at most that size and the outputs come back whole and in order; ``fixed_batch``
    pads every chunk to one shape (one compiled CUDA graph) and drops the padding again."""
    from mam.runtime.networks import OrtNetwork, TorchNetwork

    seen: list[int] = []

    def fn(x):
        seen.append(len(x))
        return x * 2, x.sum(1)

    x = np.random.default_rng(1).standard_normal((7, 3)).astype(np.float32)
    net = TorchNetwork(fn, inputs=["x"], outputs=["double", "total"], max_batch=3)
    out = net(x)
    assert seen == [3, 3, 1]
    np.testing.assert_array_equal(out["double"], x * 2)
    np.testing.assert_allclose(out["total"], x.sum(1), rtol=1e-6)
    seen.clear()
    padded = TorchNetwork(fn, inputs=["x"], outputs=["double", "total"], max_batch=3,
                          fixed_batch=True)(x)  # fmt: skip
    assert seen == [3, 3, 3] and padded["double"].shape == (7, 3)
    np.testing.assert_array_equal(padded["double"], out["double"])
    manifest, folder = load_manifest(DEFAULT_WEIGHTS)
    info = OrtNetwork(folder / manifest["networks"]["info"]["file"], threads=1, max_batch=2)
    z = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    whole = info.run({"info": z}, batch=5)["info_logits"]
    np.testing.assert_allclose(info(z)["info_logits"], whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("infant", [None, PRETERM], ids=["without-info", "with-info"])
def test_screening_same_through_onnxruntime_and_pytorch(pose, infant):
    results = {
        name: Screener(DEFAULT_WEIGHTS, ScreeningOptions(runtime=name)).screen_pose(pose, infant)
        for name in ("onnxruntime", "pytorch")
    }
    a, b = results["onnxruntime"], results["pytorch"]
    assert (a.model.runtime, a.model.device, a.model.precision) == ("onnxruntime", "cpu", "fp32")
    assert b.model.runtime == "pytorch"
    assert a.risk_probability == pytest.approx(b.risk_probability, abs=ATOL)
    assert a.classification == b.classification and a.fms_category == b.fms_category
    for ca, cb in zip(a.clips, b.clips, strict=True):
        assert ca.fms_probability == pytest.approx(cb.fms_probability, abs=ATOL)
        assert ca.attention_weight == pytest.approx(cb.attention_weight, abs=ATOL)


@pytest.mark.parametrize("fusion", ["logit", "reference"])
def test_numpy_fusion_matches_the_network(fusion):
    """The fusion the pipeline runs (numpy) is the network's (torch) ``forward_fusion``."""
    _, meta = load_weights(DEFAULT_WEIGHTS)
    meta.config = type(meta.config).from_dict({**meta.config.to_dict(), "fusion": fusion})
    meta.calibration = meta.calibration_without_info = Calibration()
    model = MAM(meta.config).eval()
    rng = np.random.default_rng(0)
    bag = rng.dirichlet([1, 1], size=5).astype(np.float32)
    info = rng.standard_normal((5, 2)).astype(np.float32)
    for i in (None, info):
        with torch.inference_mode():
            ref = model.forward_fusion(
                torch.from_numpy(bag), None if i is None else torch.from_numpy(i)
            )[:, 1].numpy()
        assert np.abs(fuse_normal_probability(bag, i, meta) - ref).max() < 1e-5
    with torch.inference_mode():
        z = model.normal_logit(torch.from_numpy(bag), torch.from_numpy(info)).numpy()
    assert np.abs(normal_log_odds(bag, info) - z).max() < 1e-4


def test_calibration_weighs_the_two_branches():
    _, meta = load_weights(DEFAULT_WEIGHTS)
    meta.calibration = Calibration(a=2.0, b=0.5, c=0.3, method="platt")
    meta.calibration_without_info = Calibration(a=3.0, b=-1.0, method="platt")
    bag = np.array([[0.2, 0.8], [0.9, 0.1]])
    info = np.array([[0.0, 1.5], [2.0, -1.0]])
    zb, zi = np.log(bag[:, 1] / bag[:, 0]), info[:, 1] - info[:, 0]
    expected = 1 / (1 + np.exp(-(2.0 * zb + 0.5 + 0.3 * zi)))
    assert np.allclose(fuse_normal_probability(bag, info, meta), expected)
    assert np.allclose(fuse_normal_probability(bag, None, meta), 1 / (1 + np.exp(-(3 * zb - 1))))
    # A kind with a calibration of its own uses it; every other kind the overall one.
    meta.calibration_by_kind = {
        "video": KindCalibration(Calibration(a=1.0), Calibration(a=0.5, b=2.0), 0.3, 50)
    }
    own = 1 / (1 + np.exp(-(0.5 * zb + 2.0)))
    assert np.allclose(fuse_normal_probability(bag, None, meta, "video"), own)
    assert np.allclose(fuse_normal_probability(bag, None, meta, "pose_file"),
                       fuse_normal_probability(bag, None, meta))  # fmt: skip
    assert meta.calibrated("video").risk_threshold == 0.3
    assert meta.calibrated("pose_file").risk_threshold == meta.risk_threshold
    back = type(meta).from_dict(meta.to_dict())
    assert (
        back.calibration_by_kind["video"].to_dict() == meta.calibration_by_kind["video"].to_dict()
    )


# -- GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_onnxruntime_cuda_matches_cpu(instances):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (install onnxruntime-gpu on a GPU)")
    gpu = create_runtime(DEFAULT_WEIGHTS, "onnxruntime", device="cuda")
    cpu = create_runtime(DEFAULT_WEIGHTS, "onnxruntime", device="cpu")
    assert gpu.device == "cuda"
    assert np.abs(gpu.clip(instances)[1] - cpu.clip(instances)[1]).max() < 1e-3


@pytest.mark.needs_tensorrt
def test_tensorrt_backend_screening(pose):
    trt = Screener(DEFAULT_WEIGHTS, ScreeningOptions(runtime="tensorrt", precision="fp16"))
    cpu = Screener(DEFAULT_WEIGHTS, ScreeningOptions(runtime="onnxruntime", device="cpu"))
    a, b = trt.screen_pose(pose, PRETERM), cpu.screen_pose(pose, PRETERM)
    assert a.model.runtime == "tensorrt" and a.model.device == "cuda"
    assert a.risk_probability == pytest.approx(b.risk_probability, abs=2e-2)
