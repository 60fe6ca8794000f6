"""The MAM network (``mam.model``): parity with the authors' reference code, config presets,
dynamic clip and bag sizes, fusion, the temporal-difference input layer and weight files.

Golden outputs: ``shared/reference/*.npz``, produced by running the authors' own PyTorch code
(github.com/qiang-Blazer/MAM) on CPU in eval mode; ``shared/reference/README.md`` says how they
were made and how to regenerate them. Those tests skip when ``shared/`` is not beside the repo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mam.errors import ModelLoadError
from mam.features import Normalizer, difference_matrices
from mam.model.config import MAMConfig
from mam.model.network import MAM
from mam.model.reference import config_from_reference, load_reference_checkpoint
from mam.model.weights import ModelMeta, load_weights, save_weights
from mam.skeleton import NUM_JOINTS

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _keep_rng_state():
    """Seed every test and restore torch's global RNG afterwards (torchvision's habit)."""
    state = torch.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(state)


def _inputs(poses: np.ndarray) -> torch.Tensor:
    """``[N, 240, 17, 3]`` poses -> ``[N, 240, 3, 17, 17]`` (no smoothing or normalisation)."""
    return torch.from_numpy(np.stack([difference_matrices(p) for p in poses]))


def _random_clips(n: int, frames: int = 240, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    poses = np.cumsum(rng.normal(scale=0.05, size=(n, frames, NUM_JOINTS, 3)), axis=1)
    poses += rng.normal(size=(n, 1, NUM_JOINTS, 3))
    return _inputs(poses.astype(np.float32))


# --- parity with the reference code ---------------------------------------------------------------
def test_clip_only_checkpoint_matches_reference(reference_dir: Path):
    model = load_reference_checkpoint(reference_dir / "clip_only.pth")
    assert not model.training
    ref = np.load(reference_dir / "reference_clip_only_outputs.npz")
    with torch.no_grad():
        features, logits = model.forward_clips(_inputs(ref["poses"]))
    np.testing.assert_allclose(features.numpy(), ref["clip_features"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits.numpy(), ref["clip_logits"], atol=ATOL, rtol=0)
    probs = torch.softmax(logits, dim=1).numpy()
    np.testing.assert_allclose(probs, ref["clip_probabilities"], atol=ATOL, rtol=0)
    # The golden outputs are not degenerate: the clips get different predictions.
    assert np.ptp(ref["clip_probabilities"][:, 1]) > 1e-3


def test_full_model_matches_reference(reference_dir: Path):
    model = load_reference_checkpoint(reference_dir / "reference_full_model.state_dict.pt")
    ref = np.load(reference_dir / "reference_full_model.npz")
    with torch.no_grad():
        features, logits = model.forward_clips(_inputs(ref["poses"]))
        # Rows 0-7 are the bag rows: 2 infants x 4 instances, in row order.
        bag, attention = model.forward_bag(logits[:8].reshape(2, 4, 2))
        fused = model.forward_fusion(bag, model.forward_info(torch.from_numpy(ref["info"])))
    np.testing.assert_allclose(features.numpy(), ref["clip_features"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits.numpy(), ref["clip_logits"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(bag.numpy(), ref["bag_output_without_info"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(fused.numpy(), ref["bag_output_with_info"], atol=ATOL, rtol=0)
    assert attention.shape == (2, 4)
    np.testing.assert_allclose(attention.sum(1).numpy(), 1.0, atol=1e-6)


def test_config_from_reference_infers_architecture(reference_dir: Path):
    clip_sd = torch.load(reference_dir / "clip_only.pth", map_location="cpu", weights_only=True)
    cfg = config_from_reference(clip_sd)
    assert (cfg.num_layers, cfg.ffn_dim, cfg.fusion_hidden) == (1, 2048, (64,))
    assert cfg == MAMConfig.reference_clip_checkpoint()
    full_sd = torch.load(
        reference_dir / "reference_full_model.state_dict.pt", map_location="cpu", weights_only=True
    )
    cfg = config_from_reference(full_sd)
    assert (cfg.num_layers, cfg.ffn_dim, cfg.fusion_hidden) == (2, 256, (64, 32))
    assert (cfg.bag_hidden, cfg.info_hidden, cfg.time_window) == ((32, 16), 32, 10)
    assert cfg.share_encoder and cfg.share_fusion and cfg.temporal_conv_repeats == 2
    with pytest.raises(ModelLoadError):
        config_from_reference({"something.else": torch.zeros(1)})


# --- presets and dynamic sizes ------------------------------------------------------------------
def test_paper_and_reference_presets_differ():
    paper = MAM(MAMConfig.paper())
    ref = MAM(MAMConfig.reference())
    assert paper.clip_encoder.temporal_encoder is not paper.clip_encoder.spatial_encoder
    assert paper.clip_encoder.time_pool is not paper.clip_encoder.joint_pool
    assert isinstance(paper.clip_encoder.time_conv, torch.nn.Identity)
    assert ref.clip_encoder.temporal_encoder is ref.clip_encoder.spatial_encoder
    assert ref.clip_encoder.time_pool is ref.clip_encoder.joint_pool
    assert isinstance(ref.clip_encoder.time_conv, torch.nn.Conv2d)
    # 240 frames -> 231 -> 222 with the reference's twice-applied kernel-10 conv.
    assert MAMConfig.paper().tokens_in_time() == 240
    assert MAMConfig.reference().tokens_in_time() == 222
    assert MAMConfig.paper().fusion == "logit" and MAMConfig.reference().fusion == "reference"
    n_paper = sum(p.numel() for p in paper.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_paper > n_ref  # two encoders and two pools vs one of each (plus one small conv)


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_any_number_of_clips(preset: str):
    model = MAM(getattr(MAMConfig, preset)()).eval()
    x = _random_clips(7)
    with torch.no_grad():
        feats7, logits7 = model.forward_clips(x)
        for n in (1, 3):
            feats, logits = model.forward_clips(x[:n])
            assert feats.shape == (n, 64) and logits.shape == (n, 2)
            # A clip's output does not depend on which other clips share the batch.
            np.testing.assert_allclose(feats.numpy(), feats7[:n].numpy(), atol=1e-5)
    assert feats7.shape == (7, 64) and logits7.shape == (7, 2)
    # Different clips give different representations.
    assert torch.pdist(feats7).min() > 1e-4


def test_forward_one_bag_of_any_size():
    model = MAM(MAMConfig.paper()).eval()
    info = torch.tensor([1.0, -0.5, 0.3, 0.8])
    with torch.no_grad():
        for k in (1, 3, 5):
            out = model(_random_clips(k, seed=k), info)
            assert out["clip_logits"].shape == (k, 2)
            assert out["attention"].shape == (k,)
            assert out["probs"].shape == (2,)
            assert float(out["probs"].sum()) == pytest.approx(1.0, abs=1e-6)
            assert float(out["attention"].sum()) == pytest.approx(1.0, abs=1e-6)


def test_bag_masking_gives_zero_weight_and_same_result():
    model = MAM(MAMConfig.paper()).eval()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 2, generator=g) * 3
    mask = torch.tensor(
        [
            [True] * 6,
            [True, True, True, False, False, False],
            [True, False, True, False, True, False],
        ]
    )
    with torch.no_grad():
        probs, weights = model.forward_bag(logits, mask)
        assert torch.all(weights[~mask] == 0)
        np.testing.assert_allclose(weights.sum(1).numpy(), 1.0, atol=1e-6)
        for b in range(3):
            alone, w_alone = model.forward_bag(logits[b : b + 1, mask[b]])
            np.testing.assert_allclose(probs[b].numpy(), alone[0].numpy(), atol=1e-6)
            np.testing.assert_allclose(weights[b, mask[b]].numpy(), w_alone[0].numpy(), atol=1e-6)
        # Whatever sits in the masked slots changes nothing.
        scrambled = logits.clone()
        scrambled[~mask] = torch.randn(int((~mask).sum()), 2, generator=g) * 50
        probs2, _ = model.forward_bag(scrambled, mask)
        np.testing.assert_allclose(probs2.numpy(), probs.numpy(), atol=1e-6)
        # ...while changing a real clip does change the bag.
        scrambled[1, 0] = -scrambled[1, 0]
        probs3, _ = model.forward_bag(scrambled, mask)
        assert not torch.allclose(probs3[1], probs[1], atol=1e-4)


# --- fusion ---------------------------------------------------------------------------------------
def _confident_bag(model: MAM, p_normal: float, k: int = 8) -> torch.Tensor:
    z = float(np.log(p_normal / (1 - p_normal)))
    logits = torch.tensor([0.0, z]).repeat(1, k, 1)  # [1, K, 2]: every clip at p_normal
    bag, _ = model.forward_bag(logits)
    return bag


def test_logit_fusion_is_not_capped_and_reference_fusion_is():
    logit_model = MAM(MAMConfig.paper()).eval()
    ref_model = MAM(MAMConfig.reference()).eval()
    strong_normal = torch.tensor([[-6.0, 6.0]])
    strong_risk = torch.tensor([[6.0, -6.0]])
    mild = torch.tensor([[0.2, -0.2]])
    with torch.no_grad():
        high = _confident_bag(logit_model, 0.999)
        low = _confident_bag(logit_model, 0.001)
        assert float(high[0, 1]) == pytest.approx(0.999, abs=1e-4)
        assert float(logit_model.forward_fusion(high)[0, 1]) > 0.95
        assert float(logit_model.forward_fusion(high, mild)[0, 1]) > 0.95
        assert float(logit_model.forward_fusion(high, strong_normal)[0, 1]) > 0.999
        assert float(logit_model.forward_fusion(low, strong_risk)[0, 1]) < 0.001
        # Log-odds add: bag at 0.999 and info at even odds -> 0.999.
        even = torch.zeros(1, 2)
        assert float(logit_model.forward_fusion(high, even)[0, 1]) == pytest.approx(0.999, 1e-3)

        high_r = _confident_bag(ref_model, 0.999)
        low_r = _confident_bag(ref_model, 0.001)
        outs = [
            ref_model.forward_fusion(b, i)[0, 1].item()
            for b in (high_r, low_r)
            for i in (strong_normal, strong_risk, mild)
        ]
        # softmax(p_bag + p_info) of two probability vectors: the log-odds are at most 2, so
        # every output lies in [sigmoid(-2), sigmoid(2)] = [0.1192, 0.8808].
        cap = 1.0 / (1.0 + np.exp(-2.0))
        assert all(1 - cap - 1e-6 <= p <= cap + 1e-6 for p in outs), outs
        # The cap is reached, so the range is the reference's squashing, not a weak model.
        assert max(outs) > 0.87 and min(outs) < 0.13
        # Without info the reference fusion is the bag's probability itself.
        assert float(ref_model.forward_fusion(high_r)[0, 1]) == pytest.approx(0.999, abs=1e-4)


# --- temporal difference layer --------------------------------------------------------------------
def test_temporal_difference_ignores_constant_posture():
    """With ``temporal_difference`` the network sees frame-to-frame changes (the first frame's
    change is zero by construction), so a posture offset held over the whole clip cancels in every
    frame; the same offset changes the output of the plain network, and an offset starting at
    frame 1 (frame 0 untouched) does not cancel."""
    x = _random_clips(2, seed=3)
    rng = np.random.default_rng(4)
    offset = torch.from_numpy(difference_matrices(rng.normal(size=(1, NUM_JOINTS, 3))))
    x_const = x + offset  # same posture offset in every frame
    x_late = x.clone()
    x_late[:, 1:] += offset  # every frame except the first
    td = MAM(MAMConfig.paper(temporal_difference=True)).eval()
    plain = MAM(MAMConfig.paper()).eval()
    with torch.no_grad():
        base = td.forward_features(x)
        np.testing.assert_allclose(td.forward_features(x_const).numpy(), base.numpy(), atol=1e-4)
        assert (td.forward_features(x_late) - base).abs().max() > 1e-3
        assert (plain.forward_features(x_const) - plain.forward_features(x)).abs().max() > 1e-3
        # Only changes reach the network: a clip frozen in any posture looks like any other
        # frozen clip.
        frozen_a = x[:1, :1].repeat(1, 240, 1, 1, 1)
        frozen_b = x[1:, 100:101].repeat(1, 240, 1, 1, 1)
        np.testing.assert_allclose(
            td.forward_features(frozen_a).numpy(), td.forward_features(frozen_b).numpy(), atol=1e-5
        )


# --- config and weight files ----------------------------------------------------------------------
def test_config_round_trip_and_unknown_keys():
    for cfg in (
        MAMConfig.paper(),
        MAMConfig.reference(),
        MAMConfig.reference_clip_checkpoint(),
        MAMConfig(temporal_difference=True, fusion_hidden=(16,), bag_hidden=(8, 4, 2)),
    ):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert MAMConfig.from_dict(d) == cfg
    d = MAMConfig.paper().to_dict()
    d["num_layer"] = 3  # a typo must not be silently ignored
    with pytest.raises(ValueError, match="num_layer"):
        MAMConfig.from_dict(d)
    with pytest.raises(ValueError):
        MAMConfig(fusion="softmax")
    with pytest.raises(ValueError):
        MAMConfig(embed_dim=64, num_heads=5)
    with pytest.raises(ValueError):
        MAMConfig(temporal_conv_repeats=30)


def test_save_load_weights_round_trip_and_tampering(tmp_path: Path):
    cfg = MAMConfig.paper(num_layers=1, ffn_dim=64)
    model = MAM(cfg).eval()
    meta = ModelMeta(
        name="test", version="0.0.1", config=cfg, normalizer=Normalizer((0.0, 0.1, 0.0), (1, 2, 3))
    )
    js = save_weights(model, meta, tmp_path / "w" / "model")
    assert js.name == "model.json" and (tmp_path / "w" / "model.pt").is_file()
    loaded, meta2 = load_weights(js)
    assert not loaded.training
    assert meta2.config == cfg and meta2.normalizer == meta.normalizer and meta2.name == "test"
    assert meta2.digest == json.loads(js.read_text())["model_digest"] and len(meta2.digest) == 64
    x = _random_clips(3, seed=5)
    info = torch.tensor([0.0, 1.0, -1.0, 0.5])
    with torch.no_grad():
        a, b = model(x, info), loaded(x, info)
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    # Loading by the stem works too.
    load_weights(tmp_path / "w" / "model")

    pt = tmp_path / "w" / "model.pt"
    blob = bytearray(pt.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    pt.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError):
        load_weights(js)
    pt.unlink()
    with pytest.raises(ModelLoadError):
        load_weights(js)
    with pytest.raises(ModelLoadError):
        load_weights(tmp_path / "nowhere.json")


def test_weights_metadata_version_and_corruption(tmp_path: Path):
    cfg = MAMConfig.paper(num_layers=1, ffn_dim=64)
    meta = ModelMeta(name="t", version="1", config=cfg, normalizer=Normalizer())
    js = save_weights(MAM(cfg), meta, tmp_path / "m")
    d = json.loads(js.read_text())
    d["format_version"] = 999
    js.write_text(json.dumps(d))
    with pytest.raises(ModelLoadError):
        load_weights(js)
    js.write_text("{not json")
    with pytest.raises(ModelLoadError):
        load_weights(js)


# --- bad weight files ----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["no_hash", "no_file", "not_an_object"])
def test_incomplete_metadata_raises_model_load_error(tmp_path: Path, damage: str):
    cfg = MAMConfig.paper(num_layers=1, ffn_dim=64)
    js = save_weights(MAM(cfg), ModelMeta("t", "1", cfg, Normalizer()), tmp_path / "m")
    d = json.loads(js.read_text())
    if damage == "no_hash":
        del d["weights_sha256"]
    elif damage == "no_file":
        del d["weights_file"]
    else:
        d = [d]
    js.write_text(json.dumps(d))
    with pytest.raises(ModelLoadError):
        load_weights(js)


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_bad_reference_checkpoint_raises_model_load_error(tmp_path: Path, content: bytes | None):
    path = tmp_path / "bad.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError):
        load_reference_checkpoint(path)
