"""Shipped weights -> three ONNX graphs + a manifest, with an ONNX Runtime vs PyTorch parity check.

The MAM network (Gao, Yao et al., Nat. Commun. 2023) is cut where serving needs it:

* ``NAME.clip.onnx``: ``instances`` ``[N, 240, 3, 17, 17]`` -> ``clip_features`` ``[N, D]``,
  ``clip_logits`` ``[N, 2]`` (column 1 = FMs present); N is dynamic, so one graph serves any
  batch of clips (a 5-minute recording is about 80).
* ``NAME.bag.onnx``: ``clip_logits`` ``[B, K, 2]`` -> ``bag_probs`` ``[B, 2]``, ``attention``
  ``[B, K]``; B and K dynamic (serving passes B = 1, one recording).
* ``NAME.info.onnx``: ``info`` ``[B, 4]`` (normalised with ``info_mean``/``info_std``) ->
  ``info_logits`` ``[B, 2]``.

The fusion of the two branches and the calibration are a few lines of numpy in
``mam.screening`` and need no graph. ``NAME.onnx.json`` records what a runtime needs without
torch: names, shapes, opset, the preprocessing statistics copied from the weights' metadata, the
weights' sha256 (so a stale export is detected) and each file's sha256.

Layout after timm ``timm/utils/onnx.py`` (named inputs/outputs, dynamic batch axis,
``onnx.checker``, runtime parity). Exporter: ``torch.onnx.export(..., dynamo=True)``. Measured here
(torch 2.13): the TorchScript exporter cannot export the shipped model (no ``aten::diff``) nor
``nn.TransformerEncoder`` in eval (its fused ``_transformer_encoder_layer_fwd``; traced with grad on
it gave a graph off by 1.3); on the written-out encoders it matched, and ran at 97 vs dynamo's 105
clips/s (reference configuration, batch 4, 2 threads). So dynamo, and the legacy exporter only as
an option to compare; the parity check refuses a wrong graph either way.

The Transformer encoders are exported written out (``for_export``): same weights, same maths,
about 1.3-1.7x faster on ONNX Runtime CPU than the graph torch makes of ``nn.TransformerEncoder``
(see ``ExportEncoderLayer``); ``bench/clip_throughput.py --plain-graph`` measures both.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from mam.features import CLIP_FRAMES, difference_matrices
from mam.files import write_atomic
from mam.model.network import MAM
from mam.model.weights import ModelMeta, load_meta, load_weights, sha256_of
from mam.shipped import demo_poses

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
DEFAULT_OPSET = 18  # ONNX Runtime >= 1.14 and TensorRT 8.6-11 all parse opset 18
PARITY_ATOL = 1e-4
PARITY_BATCHES = (1, 7, 64)
SHARED_POSES = demo_poses()  # the real infant motion shipped with the package

Exporter = Literal["dynamo", "torchscript"]


class ExportEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (post-norm, ReLU, batch-first) in eval, written out for
    export with the same weights: token projections as 2-D ``Gemm`` (bias fused) and each head's
    query, key and value as slices of the packed projection, so no head transpose is needed.

    NOTE: PyTorch's ``multi_head_attention_forward`` exports as some six transposes per layer on
    ``[N*T*V, E]`` activations, and ONNX Runtime runs ``Transpose`` on one thread: measured here
    (reference configuration, 2 threads, batch 32) it was a fifth of the time and the graph ran
    at about eager's speed. This form ran about 1.35x faster; a head transpose kept instead of
    slices, or the opset-23 ``Attention`` op, measured no better.
    """

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        attn = layer.self_attn
        if layer.norm_first or not attn._qkv_same_embed_dim or attn.bias_k is not None:
            raise ValueError("only post-norm layers with packed q/k/v projections are rewritten")
        if layer.activation is not torch.nn.functional.relu:
            raise ValueError("only ReLU feed-forward layers are rewritten")
        self.heads = attn.num_heads
        self.in_proj_weight, self.in_proj_bias = attn.in_proj_weight, attn.in_proj_bias
        self.out_proj, self.linear1, self.linear2 = attn.out_proj, layer.linear1, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, E = x.shape
        D = E // self.heads
        flat = x.reshape(B * L, E)
        qkv = nn.functional.linear(flat, self.in_proj_weight, self.in_proj_bias).reshape(B, L, -1)
        heads = []
        for h in range(self.heads):  # [B, L, D] slices of the packed [B, L, 3E] projection
            q = qkv[:, :, h * D : (h + 1) * D] * D**-0.5
            k = qkv[:, :, E + h * D : E + (h + 1) * D]
            v = qkv[:, :, 2 * E + h * D : 2 * E + (h + 1) * D]
            heads.append(torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v)
        y = torch.cat(heads, dim=-1).reshape(B * L, E)
        flat = self.norm1(flat + self.out_proj(y))
        flat = self.norm2(flat + self.linear2(torch.relu(self.linear1(flat))))
        return flat.reshape(B, L, E)


class ExportEncoder(nn.Module):
    """``nn.TransformerEncoder`` (no final norm, no masks) as a stack of ``ExportEncoderLayer``."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        if encoder.norm is not None:
            raise ValueError("encoders with a final norm are not rewritten")
        self.layers = nn.ModuleList(ExportEncoderLayer(layer) for layer in encoder.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def for_export(model: MAM) -> MAM:
    """A copy of ``model`` whose Transformer encoders are ``ExportEncoder``s (same weights and
    the same sharing between space and time); the parity check compares it with ``model``."""
    m = copy.deepcopy(model).eval()
    enc = m.clip_encoder
    spatial = ExportEncoder(enc.spatial_encoder)
    shared = enc.temporal_encoder is enc.spatial_encoder
    temporal = spatial if shared else ExportEncoder(enc.temporal_encoder)
    enc.spatial_encoder, enc.temporal_encoder = spatial, temporal
    return m


class ClipNetwork(nn.Module):
    """``instances`` -> (``clip_features``, ``clip_logits``): ``MAM.forward_clips``."""

    def __init__(self, model: MAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, instances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_clips(instances)


class BagHead(nn.Module):
    """``clip_logits`` ``[B, K, 2]`` -> (``bag_probs``, ``attention``): ``MAM.forward_bag``."""

    def __init__(self, model: MAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, clip_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_bag(clip_logits)


class InfoBranch(nn.Module):
    """``info`` ``[B, 4]`` -> ``info_logits`` ``[B, 2]``: ``MAM.forward_info``."""

    def __init__(self, model: MAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, info: torch.Tensor) -> torch.Tensor:
        return self.model.forward_info(info)


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its role, wrapper, example input and named, shaped IO."""

    role: str
    module: type[nn.Module]
    inputs: dict[str, list]  # name -> shape, str entries are dynamic axes
    outputs: dict[str, list]


def graph_specs(model: MAM) -> list[GraphSpec]:
    cfg = model.cfg
    V, C = cfg.num_joints, cfg.in_channels
    return [
        GraphSpec(
            "clip",
            ClipNetwork,
            {"instances": ["N", cfg.clip_frames, C, V, V]},
            {"clip_features": ["N", cfg.embed_dim], "clip_logits": ["N", 2]},
        ),
        GraphSpec(
            "bag",
            BagHead,
            {"clip_logits": ["B", "K", 2]},
            {"bag_probs": ["B", 2], "attention": ["B", "K"]},
        ),
        GraphSpec(
            "info",
            InfoBranch,
            {"info": ["B", cfg.info_features]},
            {"info_logits": ["B", 2]},
        ),
    ]


def _example(shape: list, sizes: dict[str, int], rng: np.random.Generator) -> torch.Tensor:
    # NOTE: dynamic axes get sizes > 1 in the example: torch.export specialises a size-1 axis.
    concrete = [sizes[d] if isinstance(d, str) else d for d in shape]
    return torch.from_numpy(rng.standard_normal(concrete).astype(np.float32))


def export_graph(
    model: MAM, spec: GraphSpec, path: Path, *, opset: int, exporter: Exporter
) -> Path:
    """Export one graph to ``path`` (single file, weights inside), check it, return ``path``."""
    import onnx

    wrapper = spec.module(model).eval()
    rng = np.random.default_rng(0)
    sizes = {"N": 3, "B": 2, "K": 5}
    args = tuple(_example(s, sizes, rng) for s in spec.inputs.values())
    names_in, names_out = list(spec.inputs), list(spec.outputs)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # torch's exporter internals raise FutureWarnings about its own deprecated helpers
        warnings.simplefilter("ignore", FutureWarning)
        if exporter == "dynamo":
            dims = {d: torch.export.Dim(d, min=1) for d in sizes}
            dynamic_shapes = tuple(
                {i: dims[d] for i, d in enumerate(shape) if isinstance(d, str)}
                for shape in spec.inputs.values()
            )
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                input_names=names_in,
                output_names=names_out,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
            proto = program.model_proto
        elif exporter == "torchscript":
            import io

            buf = io.BytesIO()
            axes = {
                n: {i: d for i, d in enumerate(s) if isinstance(d, str)}
                for n, s in {**spec.inputs, **spec.outputs}.items()
            }
            torch.onnx.export(
                wrapper,
                args,
                buf,
                dynamo=False,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=axes,
                opset_version=opset,
            )
            proto = onnx.load_from_string(buf.getvalue())
        else:
            raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    proto.doc_string = f"MAM {spec.role} network ({spec.module.__doc__.strip()})"
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, proto.SerializeToString())  # one file: no external data
    return path


# -- parity ------------------------------------------------------------------------------------
def parity_instances(meta: ModelMeta, n: int, npz: Path | None = SHARED_POSES) -> np.ndarray:
    """``n`` instances ``[n, 240, 3, 17, 17]`` float32 of real infant motion when ``npz`` (the
    shared demo poses) exists, else of simulated motion (``mam.synth.motion``)."""
    if npz is not None and Path(npz).is_file():
        clips = np.load(npz)["clips"][:n].astype(np.float32)  # [n, 240, 17, 3]
        return np.stack([difference_matrices(meta.normalizer.apply(c)) for c in clips])
    from mam.features import build_instances
    from mam.synth.motion import simulate_infant

    frames = CLIP_FRAMES + (n - 1) * meta.clip_step
    sim = simulate_infant(np.random.default_rng(0), "parity", "continuous", frames / 25.0 + 1.0)
    inst = build_instances(np.nan_to_num(sim.joints), meta.normalizer, step=meta.clip_step)
    return inst.tensors[:n]


def parity_source(npz: Path | None = SHARED_POSES) -> str:
    if npz is not None and Path(npz).is_file():
        return "real infant motion (shared/data/mam_demo_poses.npz)"
    return "simulated infant motion (mam.synth.motion.simulate_infant, seed 0)"


def check_parity(
    model: MAM,
    meta: ModelMeta,
    files: dict[str, Path],
    *,
    batches: tuple[int, ...] = PARITY_BATCHES,
    atol: float = PARITY_ATOL,
    npz: Path | None = SHARED_POSES,
    threads: int | None = None,
) -> dict[str, float]:
    """Largest absolute ONNX Runtime (CPU) vs PyTorch difference per output over ``batches``;
    ``ValueError`` when any exceeds ``atol``."""
    from mam.runtime.sessions import ort_session

    sess = {role: ort_session(p, device="cpu", threads=threads) for role, p in files.items()}
    worst: dict[str, float] = {}

    def record(name: str, a: np.ndarray, b: torch.Tensor) -> None:
        worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(a - b.numpy()))))

    x_all = parity_instances(meta, max(batches), npz)
    info_rng = np.random.default_rng(1)
    with torch.inference_mode():
        for n in batches:
            x = x_all[:n]
            feats, logits = model.forward_clips(torch.from_numpy(x))
            o_feats, o_logits = sess["clip"].run(None, {"instances": x})
            record("clip_features", o_feats, feats)
            record("clip_logits", o_logits, logits)
            # the bag head on the torch logits, so its error is its own
            probs, att = model.forward_bag(logits[None])
            o_probs, o_att = sess["bag"].run(None, {"clip_logits": logits[None].numpy()})
            record("bag_probs", o_probs, probs)
            record("attention", o_att, att)
            info = info_rng.standard_normal((n, meta.config.info_features)).astype(np.float32)
            record("info_logits", sess["info"].run(None, {"info": info})[0],
                   model.forward_info(torch.from_numpy(info)))  # fmt: skip
    bad = {k: v for k, v in worst.items() if not v <= atol}
    if bad:
        raise ValueError(f"ONNX Runtime vs PyTorch parity failed (atol {atol}): {bad}")
    return worst


# -- manifest ----------------------------------------------------------------------------------
def manifest_path(weights_json: str | Path) -> Path:
    """``models/NAME.json`` -> ``models/NAME.onnx.json``."""
    p = Path(weights_json).with_suffix("")
    return p.with_name(p.name + ".onnx.json")


@dataclass
class ExportResult:
    manifest: Path
    files: dict[str, Path]
    parity: dict[str, float] = field(default_factory=dict)


def export_onnx(
    weights: str | Path,
    out_dir: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "dynamo",
    parity: bool = True,
    parity_batches: tuple[int, ...] = PARITY_BATCHES,
    atol: float = PARITY_ATOL,
    npz: Path | None = SHARED_POSES,
    rewrite_encoders: bool = True,
) -> ExportResult:
    """Export the clip network, bag head and Info branch of ``weights`` (``NAME.json``).

    Args:
        weights: the weights' metadata file, e.g. ``models/mam_demo.json``.
        out_dir: where ``NAME.{clip,bag,info}.onnx`` and ``NAME.onnx.json`` go, NAME being the
            weights file's stem (default: beside the weights, so the runtime finds them).
        opset: ONNX opset.
        exporter: ``dynamo`` (default) or ``torchscript`` (legacy, for comparison).
        parity: run the ONNX Runtime vs PyTorch check (``ValueError`` beyond ``atol``).
        parity_batches: clip batch sizes checked: 1, an odd one and the largest.
        atol: absolute tolerance of the parity check.
        npz: real poses for the check (simulated poses when absent).
        rewrite_encoders: export the Transformer encoders as ``ExportEncoder`` (same maths,
            faster on ONNX Runtime); the parity check still compares with the original model.
    """
    import onnx
    import onnxruntime

    weights = Path(weights).with_suffix(".json")
    model, meta = load_weights(weights)
    _, _, weights_sha = load_meta(weights)
    out = Path(out_dir) if out_dir is not None else weights.parent
    files: dict[str, Path] = {}
    networks: dict[str, dict] = {}
    graph_model = for_export(model) if rewrite_encoders else model
    for spec in graph_specs(model):
        # Named after the weights file, not the network: two calibrations of one network
        # exported side by side keep their own files.
        path = out / f"{weights.stem}.{spec.role}.onnx"
        export_graph(graph_model, spec, path, opset=opset, exporter=exporter)
        files[spec.role] = path
        networks[spec.role] = {
            "file": path.name,
            "sha256": sha256_of(path),
            "inputs": [{"name": k, "shape": v, "dtype": "float32"} for k, v in spec.inputs.items()],
            "outputs": [
                {"name": k, "shape": v, "dtype": "float32"} for k, v in spec.outputs.items()
            ],
        }
        logger.info("exported %s (%d bytes)", path, path.stat().st_size)
    worst: dict[str, float] = {}
    if parity:
        worst = check_parity(model, meta, files, batches=parity_batches, atol=atol, npz=npz)
        logger.info("parity ONNX Runtime vs PyTorch: %s", worst)
    manifest = {
        "format_version": MANIFEST_FORMAT,
        "name": meta.name,
        "version": meta.version,
        "weights": weights.name,
        "weights_sha256": weights_sha,
        # The model's identity when exported (mam.model.weights); the graphs hold the tensors,
        # the calibration and thresholds stay in the weights JSON.
        "model_digest": meta.digest,
        "exporter": f"torch.onnx {exporter} (torch {torch.__version__.split('+')[0]})",
        "encoders": "ExportEncoder (sliced heads)" if rewrite_encoders else "nn.TransformerEncoder",
        "onnx_version": onnx.__version__,
        "opset": opset,
        "clip_frames": meta.config.clip_frames,
        "num_joints": meta.config.num_joints,
        "fps": meta.config.fps,
        "clip_step": meta.clip_step,
        "smoothing_window": meta.smoothing_window,
        "normalizer": meta.normalizer.to_dict(),
        "info_features": list(meta.to_dict()["info_features"]),
        "info_mean": list(meta.info_mean),
        "info_std": list(meta.info_std),
        "fusion": meta.config.fusion,
        "networks": networks,
        "parity": {
            "checked": bool(parity),
            "against": f"torch eager vs onnxruntime {onnxruntime.__version__} CPU",
            "batches": list(parity_batches),
            "atol": atol,
            "data": parity_source(npz),
            # rounded to one significant figure so a re-export on another machine reads the same
            "max_abs_diff": {k: float(f"{v:.0e}") for k, v in worst.items()},
        },
    }
    mpath = out / manifest_path(weights).name
    write_atomic(mpath, (json.dumps(manifest, indent=2) + "\n").encode())
    return ExportResult(mpath, files, worst)
