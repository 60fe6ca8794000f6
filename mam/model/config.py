"""Typed hyper-parameters of MAM, saved next to the weights.

Two presets matter: ``paper()`` follows the Methods text (no temporal convolution, separate but
identical spatial and temporal encoders) and ``reference()`` follows the authors' code
(github.com/qiang-Blazer/MAM ``model/STTransformer.py``; DESIGN.md lists where they differ).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

from mam.skeleton import FPS, NUM_JOINTS

Fusion = Literal["logit", "reference"]


@dataclass(frozen=True)
class MAMConfig:
    """Everything needed to rebuild the network.

    Args:
        clip_frames: frames per instance (paper: 240 = 9.6 s at 25 fps).
        num_joints: joints per frame (Human3.6M: 17).
        in_channels: coordinate axes (3).
        embed_dim: token width of both Transformers (paper: 64).
        num_heads: attention heads (paper: 4).
        ffn_dim: feed-forward width (paper: 256; the published checkpoint: 2048).
        num_layers: encoder layers per Transformer (paper: 2; the published checkpoint: 1).
        dropout: dropout inside the Transformer layers (PyTorch default 0.1 in the reference).
        conv_dropout: dropout after the convolutions and before the Info head (reference: 0.6).
        temporal_conv_repeats: how many times one temporal Conv2D is applied (reference: 2, shared
            weights; paper: 0).
        time_window: temporal kernel (reference demo: 10).
        time_step: temporal stride (reference demo: 1).
        share_encoder: one Transformer object for space and time (reference) or two (paper).
        share_fusion: one attention-fusion module for joints and time (reference) or two.
        fusion_hidden: hidden widths of the joint/time attention MLP (reference HEAD: (64, 32);
            published checkpoint: (64,)).
        bag_hidden: hidden widths of the bag attention MLP over clip probabilities (32, 16).
        info_features: Info-branch inputs (sex, gestational age, birth weight, corrected age).
        info_hidden: Info-branch hidden width (32).
        temporal_difference: feed the clip network frame-to-frame changes (per second) of the
            difference matrices instead of the matrices themselves. Not in the paper; a fixed
            first layer, so the public input stays ``[N, 240, 3, 17, 17]``. Measured on simulated
            data: posture dominates raw positions and a compact model barely learns FMs from them
            on a CPU budget, while velocities learn at once (DESIGN.md asks to measure this).
        fusion: how bag and Info predictions combine. ``logit`` adds log-odds (uncapped, ours);
            ``reference`` reproduces softmax(p_bag + p_info), which caps outputs to [0.12, 0.88].
    """

    clip_frames: int = 240
    num_joints: int = NUM_JOINTS
    in_channels: int = 3
    fps: float = FPS
    embed_dim: int = 64
    num_heads: int = 4
    ffn_dim: int = 256
    num_layers: int = 2
    dropout: float = 0.1
    conv_dropout: float = 0.6
    temporal_conv_repeats: int = 0
    time_window: int = 10
    time_step: int = 1
    share_encoder: bool = False
    share_fusion: bool = False
    fusion_hidden: tuple[int, ...] = (64, 32)
    bag_hidden: tuple[int, ...] = (32, 16)
    info_features: int = 4
    info_hidden: int = 32
    temporal_difference: bool = False
    fusion: Fusion = "logit"

    def __post_init__(self) -> None:
        if self.fusion not in ("logit", "reference"):
            raise ValueError(f"fusion must be 'logit' or 'reference', got {self.fusion!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        if self.tokens_in_time() < 1:
            raise ValueError("temporal convolutions leave no frames; shrink time_window/step")

    def tokens_in_time(self) -> int:
        """Frames left for the temporal Transformer after the temporal convolutions."""
        t = self.clip_frames
        for _ in range(self.temporal_conv_repeats):
            t = (t - self.time_window) // self.time_step + 1
        return t

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fusion_hidden"] = list(self.fusion_hidden)
        d["bag_hidden"] = list(self.bag_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MAMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MAMConfig keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("fusion_hidden", "bag_hidden"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def paper(cls, **kw) -> MAMConfig:
        """The Methods text: two identical 2-layer encoders, no temporal convolution."""
        return cls(**kw)

    @classmethod
    def reference(cls, **kw) -> MAMConfig:
        """The authors' code at HEAD: shared encoder and fusion, temporal conv applied twice."""
        base = dict(
            temporal_conv_repeats=2,
            share_encoder=True,
            share_fusion=True,
            fusion="reference",
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def reference_clip_checkpoint(cls, **kw) -> MAMConfig:
        """Shape of the one published checkpoint (`checkpoints/1/clip_only.pth`)."""
        base = dict(num_layers=1, ffn_dim=2048, fusion_hidden=(64,))
        base.update(kw)
        return cls.reference(**base)
