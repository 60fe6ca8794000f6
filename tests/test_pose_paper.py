"""The paper's pose route: HRNet-W32, the VideoPose3D lifter, its training on real infant motion,
ONNX export parity and the ``hrnet-videopose3d`` backend.

The backend test runs on a checkpoint made here from random weights: it checks plumbing (shapes,
caching, metadata), never accuracy. Accuracy is checked where it can be: the lifter, trained on real
infant motion, against an untrained lifter and two trivial baselines on held-out infants.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mam.errors import ModelLoadError  # noqa: E402
from mam.pose.base import available_backends, create_backend  # noqa: E402
from mam.pose.paper.backend import (  # noqa: E402
    DEFAULT_LIFTER,
    ENV_HRNET_WEIGHTS,
    SiteWeightsRequiredError,
    fit_aspect,
    load_hrnet,
)
from mam.pose.paper.hrnet import (  # noqa: E402
    PoseHighResolutionNet,
    checkpoint_filter_fn,
    decode_heatmaps,
    hrnet_w32,
)
from mam.pose.paper.lifter_train import (  # noqa: E402
    LifterConfig,
    evaluate_lifter,
    load_lifter,
    load_motion,
    project_clips,
    save_lifter_weights,
    split_by_group,
    train_lifter,
)
from mam.pose.paper.videopose3d import (  # noqa: E402
    TemporalModel,
    coco_to_h36m,
    coco_to_h36m_confidence,
    lift_sequence,
)
from mam.skeleton import JOINT_INDEX  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def _tiny_hrnet(seed: int) -> PoseHighResolutionNet:
    """The HRNet topology (four branches, every fuse path) at width 8, one module per stage."""
    torch.manual_seed(seed)
    model = PoseHighResolutionNet(width=8, stage_modules=(1, 1, 1), stage_blocks=1)
    for m in model.modules():  # non-trivial BatchNorm statistics, so a misplaced one shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _save_official_layout(model: torch.nn.Module, path: Path) -> Path:
    """As deep-high-resolution-net.pytorch saves after DataParallel training."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state, "perf": 0.7}, path)
    return path


# -- HRNet --------------------------------------------------------------------------------------
def test_hrnet_w32_size_and_heatmap_stride():
    model = hrnet_w32().eval()
    # HRNet-W32 256x192 has 28.5 M parameters (Sun et al. 2019, Table 1)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 28.5
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 256, 192)).shape == (1, 17, 64, 48)
        # stride 4 for other sizes too (the four-branch topology at width 8)
        assert _tiny_hrnet(0)(torch.zeros(2, 3, 128, 96)).shape == (2, 17, 32, 24)


def test_official_checkpoint_layout_loads(tmp_path):
    source = _tiny_hrnet(seed=1)
    ckpt = _save_official_layout(source, tmp_path / "final_state.pth")
    loaded, cfg = load_hrnet(ckpt)
    assert cfg == {"width": 8, "num_joints": 17, "stage_modules": [1, 1, 1], "stage_blocks": 1,
                   "final_conv_kernel": 1}  # fmt: skip
    x = torch.randn(2, 3, 256, 192)
    with torch.inference_mode():
        assert torch.equal(loaded(x), source(x))  # every tensor landed where it belongs
    # ImageNet-classification extras are dropped; a wrong shape is refused with its name
    extra = {**source.state_dict(), "classifier.weight": torch.zeros(3)}
    assert "classifier.weight" not in checkpoint_filter_fn(extra, source)
    wrong = {**source.state_dict(), "final_layer.weight": torch.zeros(17, 16, 1, 1)}
    with pytest.raises(ValueError, match="final_layer"):
        checkpoint_filter_fn(wrong, source)


def test_decode_heatmaps_recovers_subpixel_peaks():
    h, w = 64, 48
    yy, xx = np.mgrid[0:h, 0:w]
    truth = np.array([[10.3, 20.0], [30.8, 5.6], [40.0, 50.2]])  # (x, y)
    maps = np.stack([np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0) for x, y in truth])
    xy, maxval = decode_heatmaps(maps[None].astype(np.float32))
    assert np.abs(xy[0] - truth).max() <= 0.3  # argmax alone errs up to 0.5
    # the quarter-pixel shift goes toward the true peak
    assert xy[0, 0, 0] == pytest.approx(10.25) and xy[0, 1, 0] == pytest.approx(30.75)
    assert np.all(maxval > 0.9)


# -- VideoPose3D --------------------------------------------------------------------------------
def test_temporal_model_receptive_field_is_243_frames():
    model = TemporalModel(channels=32, dropout=0.0).eval()
    assert model.receptive_field() == 243
    x = torch.randn(1, 300, 17, 2)
    with torch.inference_mode():
        y = model(x)
        assert y.shape == (1, 300 - 242, 17, 3)
        # output frame 0 sees inputs 0..242 and nothing else
        x2 = x.clone()
        x2[:, 243] += 1.0
        assert torch.equal(model(x2)[:, 0], y[:, 0])
        x2[:, 242] += 1.0
        assert not torch.equal(model(x2)[:, 0], y[:, 0])
    seq = lift_sequence(model, np.random.default_rng(0).normal(size=(50, 17, 2)))
    assert seq.shape == (50, 17, 3) and np.all(seq[:, 0] == 0)  # edge padding: one pose per frame


def test_coco_to_h36m_mapping():
    rng = np.random.default_rng(0)
    coco = rng.normal(size=(4, 17, 2))
    h36m = coco_to_h36m(coco)
    j = JOINT_INDEX
    np.testing.assert_allclose(h36m[:, j["pelvis"]], (coco[:, 11] + coco[:, 12]) / 2, atol=1e-6)
    np.testing.assert_allclose(h36m[:, j["right_knee"]], coco[:, 14], atol=1e-6)
    np.testing.assert_allclose(h36m[:, j["left_wrist"]], coco[:, 9], atol=1e-6)
    np.testing.assert_allclose(h36m[:, j["thorax"]], (coco[:, 5] + coco[:, 6]) / 2, atol=1e-6)
    scores = np.ones((1, 17))
    scores[0, 12] = 0.1  # right hip
    conf = coco_to_h36m_confidence(scores)[0]
    assert conf[j["pelvis"]] == pytest.approx(0.1) and conf[j["left_hip"]] == 1.0


# -- lifter training ----------------------------------------------------------------------------
def test_split_keeps_heldout_clips_out_of_training(demo_npz):
    clips, groups = load_motion(demo_npz)
    split = split_by_group(groups, len(clips), seed=0)
    assert len(split.heldout_groups) == 2 and not np.intersect1d(split.train, split.heldout).size
    assert len(split.train) + len(split.heldout) == len(clips)
    named = split_by_group(groups, len(clips), heldout_groups=[next(iter(groups))])
    assert not np.intersect1d(named.train, named.heldout).size  # a group with reused clips too


def test_random_cameras_keep_the_body_rigid(demo_npz):
    clips, _ = load_motion(demo_npz)
    clips = clips[:6]
    uv, X = project_clips(clips, np.random.default_rng(0), LifterConfig().camera, flip=True)
    assert uv.shape == (6, 240, 17, 2) and X.shape == (6, 240, 17, 3)
    assert np.all(X[:, :, 0] == 0)  # root-relative
    bone = lambda p: np.linalg.norm(p[..., JOINT_INDEX["left_knee"], :]  # noqa: E731
                                    - p[..., JOINT_INDEX["left_hip"], :], axis=-1)  # fmt: skip
    right = lambda p: np.linalg.norm(p[..., JOINT_INDEX["right_knee"], :]  # noqa: E731
                                     - p[..., JOINT_INDEX["right_hip"], :], axis=-1)  # fmt: skip
    # rotation (and mirroring, which swaps sides) keeps every thigh's length
    assert np.allclose(np.sort(np.stack([bone(X), right(X)]), 0),
                       np.sort(np.stack([bone(clips), right(clips)]), 0), atol=1e-4)  # fmt: skip
    assert np.abs(uv).max() < 3.0  # in front of the camera, near the image


def test_tiny_lifter_learns_infant_depth(demo_npz):
    cfg = LifterConfig(channels=64, filter_widths=(3, 3, 3), epochs=3, minutes=10, dropout=0.1,
                      threads=1, seed=0)  # fmt: skip
    m = train_lifter(demo_npz, cfg).metrics
    # held-out infants: clearly better than its own initialisation and than the mean pose
    assert m["heldout_mpjpe"] < 0.5 * m["untrained_mpjpe"], m
    assert m["heldout_mpjpe"] < 0.5 * m["mean_pose_mpjpe"], m


def test_shipped_lifter_meets_its_recorded_mpjpe(demo_npz):
    if not DEFAULT_LIFTER.is_file():
        pytest.fail(f"shipped lifter missing: {DEFAULT_LIFTER}")
    model, meta = load_lifter(DEFAULT_LIFTER)
    assert meta["receptive_field"] == model.receptive_field() == 243
    clips, groups = load_motion(demo_npz)
    split = split_by_group(groups, len(clips), heldout_groups=meta["split"]["heldout_groups"])
    cfg = LifterConfig(seed=meta["training"]["seed"], noise=meta["training"]["noise"])
    m = evaluate_lifter(model, clips, split, cfg)
    assert m["heldout_mpjpe"] <= meta["metrics"]["heldout_mpjpe"] + 0.01, m
    assert m["heldout_mpjpe"] < 0.85 * m["flat_2d_mpjpe"], m  # beats 2D with an oracle scale


# -- the backend --------------------------------------------------------------------------------
def test_backend_refuses_to_run_without_site_weights(monkeypatch):
    monkeypatch.delenv(ENV_HRNET_WEIGHTS, raising=False)
    assert "hrnet-videopose3d" in available_backends()
    with pytest.raises(SiteWeightsRequiredError, match=ENV_HRNET_WEIGHTS) as e:
        create_backend("hrnet-videopose3d")
    assert isinstance(e.value, ModelLoadError)


def test_fit_aspect_letterboxes_the_frame():
    x, y, w, h = fit_aspect((0, 0, 1280, 720))
    assert (w, h) == pytest.approx((1280, 1280 * 4 / 3)) and y == pytest.approx(360 - h / 2)
    assert fit_aspect((10, 20, 30, 400))[2:] == pytest.approx((300, 400))


def test_backend_end_to_end_plumbing(tmp_path):
    """Random weights: checks shapes, caching and metadata, not accuracy."""
    hrnet = _save_official_layout(_tiny_hrnet(seed=2), tmp_path / "hrnet.pth")
    torch.manual_seed(3)
    lifter = save_lifter_weights(TemporalModel(filter_widths=(3, 3), channels=16),
                                 tmp_path / "lifter.pt")  # fmt: skip
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (90, 160, 3), dtype=np.uint8) for _ in range(11)]
    kw = dict(hrnet_weights=hrnet, lifter_weights=lifter, cache_dir=tmp_path / "cache",
              batch_size=4, min_confidence=0.0)  # fmt: skip
    seen = []
    with create_backend("hrnet-videopose3d", runtime="onnxruntime", **kw) as backend:
        seq = backend.estimate(iter(frames), progress=seen.append)
    assert seq.source == "hrnet-videopose3d" and seq.joints.shape == (11, 17, 3)
    assert np.isfinite(seq.joints).all() and np.all(seq.joints[:, 0] == 0)
    assert seq.confidence.shape == (11, 17) and seq.confidence.min() >= 0
    assert seq.meta["image_size"] == (160, 90) and seq.meta["image_joints"].shape == (11, 17, 2)
    assert seq.meta["config"]["runtime"] == {"hrnet": "onnxruntime", "lifter": "onnxruntime"}
    assert "camera" in seq.meta["axes"] and seen[-1] == 11
    records = sorted((tmp_path / "cache").glob("*.json"))
    assert len(records) == 2 and all(json.loads(r.read_text())["parity"] for r in records)
    stamps = [r.stat().st_mtime_ns for r in records]
    # the cache is reused, and PyTorch gives the same keypoints as the exported graphs
    torch_backend = create_backend("hrnet-videopose3d", runtime="pytorch", **kw)
    again = torch_backend.estimate(iter(frames))
    create_backend("hrnet-videopose3d", runtime="onnxruntime", **kw)
    assert [r.stat().st_mtime_ns for r in records] == stamps
    np.testing.assert_allclose(again.meta["image_joints"], seq.meta["image_joints"], atol=1e-3)
    np.testing.assert_allclose(again.joints, seq.joints, atol=1e-3)


# -- export -------------------------------------------------------------------------------------
def test_export_pose_networks_with_parity(tmp_path):
    from export.pose_networks import export_hrnet, export_lifter

    hrnet = _save_official_layout(_tiny_hrnet(seed=4), tmp_path / "site_hrnet.pth")
    path = export_hrnet(hrnet, tmp_path / "onnx")
    manifest = json.loads((tmp_path / "onnx" / "site_hrnet.onnx.json").read_text())
    assert manifest["parity"]["worst_vs_tolerance"] <= 1.0
    # a third frame count, not seen at export
    model, _ = load_hrnet(hrnet)
    x = np.random.default_rng(5).standard_normal((5, 3, 256, 192)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": x}
    )
    with torch.inference_mode():
        np.testing.assert_allclose(got[0], model(torch.from_numpy(x)).numpy(), atol=1e-4)
    torch.manual_seed(6)
    lifter = save_lifter_weights(TemporalModel(channels=32), tmp_path / "lifter.pt")
    lpath = export_lifter(lifter, tmp_path / "onnx")
    sess = ort.InferenceSession(str(lpath), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(7).standard_normal((1, 300, 17, 2)).astype(np.float32)
    assert sess.run(None, {"keypoints_2d": x})[0].shape == (1, 58, 17, 3)


@pytest.mark.needs_tensorrt
def test_hrnet_tensorrt_engine(tmp_path):
    from export.pose_networks import build_hrnet_engine, export_hrnet
    from mam.runtime import TensorRTEngine

    hrnet = _save_official_layout(_tiny_hrnet(seed=8), tmp_path / "hrnet.pth")
    onnx_path = export_hrnet(hrnet, tmp_path)
    engine_path = tmp_path / "hrnet.engine"
    build_hrnet_engine(onnx_path, engine_path, opt_frames=4, max_frames=8, precision="fp32")
    engine = TensorRTEngine(engine_path)
    x = torch.randn(6, 3, 256, 192)
    out = engine(images=x.cuda())["heatmaps"]
    torch.cuda.synchronize()
    model, _ = load_hrnet(hrnet)
    with torch.inference_mode():
        ref = model(x)
    assert (out.float().cpu() - ref).abs().max() < 1e-3


def test_command_lines_reach_the_lifter_trainer_and_its_export(tmp_path, capsys):
    """`mam train-lifter` is a subcommand with its own options; `python -m export pose-onnx`
    exports the shipped lifter with its parity recorded (well inside the tolerance)."""
    from export.__main__ import main as export_main
    from mam.cli import main as mam_main

    with pytest.raises(SystemExit) as e:
        mam_main(["train-lifter", "--help"])
    assert e.value.code == 0 and "mam train-lifter" in capsys.readouterr().out
    assert export_main(["pose-onnx", "--out", str(tmp_path)]) == 2  # nothing to export
    assert export_main(["pose-onnx", "--lifter", str(DEFAULT_LIFTER), "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "lifter_infant.onnx.json").read_text())
    assert manifest["parity"]["worst_vs_tolerance"] < 0.1


@pytest.mark.parametrize("content", [b"not a checkpoint", b"PK\x03\x04 truncated zip", b""])
def test_a_corrupt_site_checkpoint_is_a_model_load_error(tmp_path, content):
    from mam.pose.paper.backend import load_hrnet

    bad = tmp_path / "site_hrnet.pth"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match="do not load"):
        load_hrnet(bad)
