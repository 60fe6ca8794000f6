"""``export``: ONNX graphs of the shipped weights, their manifest and parity with PyTorch, and the
TensorRT engine cache key. TensorRT builds are ``gpu`` tests that skip without tensorrt/CUDA.

Regenerate the shipped export after retraining: ``python -m export onnx``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.__main__ import main as export_main
from export.onnx import PARITY_ATOL, check_parity, for_export, parity_instances
from mam.model.config import MAMConfig
from mam.model.network import MAM
from mam.model.weights import load_meta, load_weights, sha256_of
from mam.runtime import build_engines, engine_cache_key, load_manifest
from mam.screening import DEFAULT_WEIGHTS

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``python -m export onnx --out TMP`` with its built-in parity check at N = 1, 7, 64."""
    out = tmp_path_factory.mktemp("onnx")
    assert export_main(["onnx", "--weights", str(DEFAULT_WEIGHTS), "--out", str(out)]) == 0
    return out, json.loads((out / "mam_demo.onnx.json").read_text())


def test_manifest_names_shapes_and_hashes(exported):
    out, m = exported
    meta, _, weights_sha = load_meta(DEFAULT_WEIGHTS)
    assert m["name"] == meta.name and m["version"] == meta.version
    assert m["weights_sha256"] == weights_sha and m["opset"] >= 17
    assert m["model_digest"] == meta.digest
    assert m["normalizer"] == meta.normalizer.to_dict()
    assert m["info_mean"] == list(meta.info_mean) and m["info_std"] == list(meta.info_std)
    nets = m["networks"]
    assert set(nets) == {"clip", "bag", "info"}
    for role, net in nets.items():
        assert net["file"] == f"mam_demo.{role}.onnx"
        assert sha256_of(out / net["file"]) == net["sha256"]
    clip = nets["clip"]
    assert clip["inputs"] == [
        {"name": "instances", "shape": ["N", 240, 3, 17, 17], "dtype": "float32"}
    ]
    assert [o["name"] for o in clip["outputs"]] == ["clip_features", "clip_logits"]
    assert [o["name"] for o in nets["bag"]["outputs"]] == ["bag_probs", "attention"]


def test_graphs_have_dynamic_axes_and_pass_the_checker(exported):
    import onnx

    out, m = exported
    for net in m["networks"].values():
        proto = onnx.load(str(out / net["file"]))
        onnx.checker.check_model(proto, full_check=True)
        sess = ort.InferenceSession(str(out / net["file"]), providers=["CPUExecutionProvider"])
        for spec, io in zip(net["inputs"], sess.get_inputs()):
            assert io.name == spec["name"]
            assert isinstance(io.shape[0], str)  # dynamic batch / bag axis


def test_parity_within_tolerance(exported):
    _, m = exported
    p = m["parity"]
    assert p["checked"] and p["batches"] == [1, 7, 64] and p["atol"] == PARITY_ATOL
    assert set(p["max_abs_diff"]) == {
        "clip_features", "clip_logits", "bag_probs", "attention", "info_logits",
    }  # fmt: skip
    assert all(v <= PARITY_ATOL for v in p["max_abs_diff"].values())


def test_parity_check_refuses_a_wrong_graph(exported):
    out, m = exported
    model, meta = load_weights(DEFAULT_WEIGHTS)
    with torch.no_grad():
        model.clip_head.bias += 0.01  # the graphs no longer match these weights
    files = {r: out / n["file"] for r, n in m["networks"].items()}
    with pytest.raises(ValueError, match="parity failed"):
        check_parity(model, meta, files, batches=(1, 3))


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_export_form_of_the_encoders_is_the_same_network(preset):
    """``for_export`` writes the encoders out (ONNX Runtime runs them faster), same maths, same
    weights, same sharing between space and time."""
    torch.manual_seed(0)
    model = MAM(getattr(MAMConfig, preset)()).eval()
    fast = for_export(model)
    enc = fast.clip_encoder
    assert (enc.temporal_encoder is enc.spatial_encoder) == model.cfg.share_encoder
    x = torch.randn(3, 240, 3, 17, 17)
    with torch.inference_mode():
        for a, b in zip(model.forward_clips(x), fast.forward_clips(x)):
            assert (a - b).abs().max() < 1e-5


def test_parity_inputs_without_shared_data():
    _, meta = load_weights(DEFAULT_WEIGHTS)
    x = parity_instances(meta, 5, npz=None)
    assert x.shape == (5, 240, 3, 17, 17) and x.dtype == np.float32 and np.isfinite(x).all()


def test_shipped_export_is_current():
    """models/ holds an export of the shipped weights; after retraining, rerun the export."""
    manifest, folder = load_manifest(DEFAULT_WEIGHTS)  # raises when stale or tampered
    assert folder == DEFAULT_WEIGHTS.parent and manifest["parity"]["checked"]


# -- TensorRT -----------------------------------------------------------------------------------
def _key(**kw):
    base = dict(
        trt_version="10.9.0",
        gpu_name="NVIDIA H100 80GB HBM3",
        onnx_sha256="ab" * 32,
        precision="fp16",
        profile=(1, 64, 64),
    )
    return engine_cache_key(**{**base, **kw})


def test_engine_cache_key():
    k = _key()
    assert k == _key() and len(k) == 20 and int(k, 16) >= 0
    assert _key(gpu_name=" NVIDIA H100 80GB HBM3\n") == k  # nvidia-smi's whitespace
    for change in (
        {"trt_version": "11.0.0"},
        {"gpu_name": "NVIDIA H200"},
        {"onnx_sha256": "cd" * 32},
        {"precision": "fp32"},
        {"profile": (1, 32, 64)},
    ):
        assert _key(**change) != k, change


def test_tensorrt_command_without_tensorrt_is_one_line_error(capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here: the gpu test covers the build")
    except ImportError:
        pass
    assert export_main(["tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error [tensorrt_unavailable]:") and len(err.splitlines()) == 1


@pytest.mark.needs_tensorrt  # engines are built on the GPU that runs them
def test_tensorrt_engine_build_cache_and_parity(tmp_path):
    from mam.runtime import manifest_path
    from mam.runtime.tensorrt_backend import TensorRTBackend

    engines = build_engines(manifest_path(DEFAULT_WEIGHTS), cache_dir=tmp_path, max_batch=16)
    engine = engines["clip"]
    stamp = engine.stat().st_mtime_ns
    assert build_engines(manifest_path(DEFAULT_WEIGHTS), cache_dir=tmp_path, max_batch=16) == {
        "clip": engine
    }
    assert engine.stat().st_mtime_ns == stamp  # served from the cache
    model, meta = load_weights(DEFAULT_WEIGHTS)
    x = parity_instances(meta, 16)
    rt = TensorRTBackend(DEFAULT_WEIGHTS, device="cuda", precision="fp32", max_batch=16)
    feats, logits = rt.clip(x)
    with torch.inference_mode():
        ref_f, ref_l = model.forward_clips(torch.from_numpy(x))
    # TF32 may be on for fp32 engines: a looser bound than the CPU parity
    assert np.abs(logits - ref_l.numpy()).max() < 1e-2
    assert np.abs(feats - ref_f.numpy()).max() < 1e-2
