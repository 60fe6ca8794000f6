"""The MAM network (Gao, Yao et al., Nat. Commun. 2023, Methods and Supplementary Figs. 1-2).

Three parts, each reachable on its own so that export, training losses and tests can use them:

* clip network: instance tensor ``[N, 240, 3, 17, 17]`` -> clip representation ``[N, D]``
  (``forward_features``) -> FMs logits ``[N, 2]`` (``forward_head``; column 1 = FMs present);
* bag head: attention-based multiple-instance fusion over any number of clip probability vectors;
* Info branch: sex, gestational age, birth weight, corrected age -> normal/risk logits.

Layout follows VideoPose3D's compact model file and timm's ``forward_features``/``forward_head``
split. Device and dtype always come from the caller.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mam.model.config import MAMConfig

_EPS = 1e-6


class AttentionPool(nn.Module):
    """Attention-based fusion (Supplementary Fig. 2): MLP with Tanh -> softmax -> weighted sum.

    Args:
        in_dim: width of the vectors being fused.
        hidden: hidden widths of the scoring MLP; each hidden layer is Linear + Tanh.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, 1))
        # NOTE: named `attention` so reference-code keys map one to one (attention.attention.0...).
        self.attention = nn.Sequential(*layers)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, L, C]``, ``mask`` ``[B, L]`` (True = real) -> ``[B, C]``, ``[B, L]``."""
        scores = self.attention(x).squeeze(-1)  # [B, L]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        pooled = torch.bmm(weights.unsqueeze(1), x).squeeze(1)
        return pooled, weights


def sinusoidal_encoding(length: int, dim: int) -> torch.Tensor:
    """Fixed sine/cosine positional encoding ``[length, dim]`` (as in the reference code)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def _encoder(cfg: MAMConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=cfg.embed_dim,
        nhead=cfg.num_heads,
        dim_feedforward=cfg.ffn_dim,
        dropout=cfg.dropout,
        batch_first=True,
    )
    return nn.TransformerEncoder(layer, num_layers=cfg.num_layers, enable_nested_tensor=False)


def offdiagonal_index(num_joints: int) -> torch.Tensor:
    """Flat indices of ``[V, V]`` without the diagonal, row by row: row i holds j != i in order.

    NOTE: the reference code's input is ``[V, V-1, C, T]`` built exactly this way; the public
    tensor keeps the (zero) diagonal so that it stays the paper's ``[T, C, V, V]``.
    """
    v = num_joints
    return torch.tensor([i * v + j for i in range(v) for j in range(v) if j != i])


class ClipEncoder(nn.Module):
    """Spatio-temporal Transformer (Supplementary Fig. 1): instance tensor -> clip vector."""

    def __init__(self, cfg: MAMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        v, e = cfg.num_joints, cfg.embed_dim
        self.register_buffer("offdiag", offdiagonal_index(v), persistent=False)
        # Conv2D of size [1, V-1]: fuses each joint's row of differences into one token (paper).
        self.joint_conv = nn.Conv2d(cfg.in_channels, e, kernel_size=(1, v - 1))
        self.conv_dropout = nn.Dropout(cfg.conv_dropout)
        if cfg.temporal_conv_repeats:
            # NOTE: not in the paper; the reference applies this one conv twice (shared weights).
            self.time_conv: nn.Module = nn.Conv2d(
                e, e, kernel_size=(cfg.time_window, 1), stride=(cfg.time_step, 1)
            )
        else:
            self.time_conv = nn.Identity()
        self.spatial_encoder = _encoder(cfg)
        self.temporal_encoder = self.spatial_encoder if cfg.share_encoder else _encoder(cfg)
        self.joint_pool = AttentionPool(e, cfg.fusion_hidden)
        self.time_pool = (
            self.joint_pool if cfg.share_fusion else AttentionPool(e, cfg.fusion_hidden)
        )
        self.register_buffer(
            "pos_encoding", sinusoidal_encoding(cfg.tokens_in_time(), e), persistent=False
        )
        self.pos_dropout = nn.Dropout(cfg.conv_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, T, C, V, V]`` signed differences -> ``[N, D]``."""
        N, T, C, V, _ = x.shape
        if self.cfg.temporal_difference:
            # Per-second change; the first frame repeats so that T is kept.
            x = torch.cat([x[:, :1], x], dim=1).diff(dim=1) * self.cfg.fps
        # [N, T, C, V, V] -> [N*T, C, V, V-1]: drop the zero diagonal.
        x = x.reshape(N * T, C, V * V).index_select(2, self.offdiag).reshape(N * T, C, V, V - 1)
        x = self.conv_dropout(torch.relu(self.joint_conv(x)))  # [N*T, E, V, 1]
        E = x.shape[1]
        if self.cfg.temporal_conv_repeats:
            x = x.reshape(N, T, E, V).permute(0, 2, 1, 3)  # [N, E, T, V]
            for _ in range(self.cfg.temporal_conv_repeats):
                x = self.conv_dropout(torch.relu(self.time_conv(x)))
            T = x.shape[2]
            x = x.permute(0, 2, 3, 1).reshape(N * T, V, E)  # [N*T', V, E]
        else:
            x = x.reshape(N * T, E, V).transpose(1, 2)  # [N*T, V, E]
        x = self.spatial_encoder(x)
        x, _ = self.joint_pool(x)  # [N*T, E]
        x = x.reshape(N, T, E) + self.pos_encoding[:T]
        x = self.temporal_encoder(self.pos_dropout(x))
        x, _ = self.time_pool(x)  # [N, E]
        return x


class MAM(nn.Module):
    """Main Branch (clip network + bag head) and Info Branch. The Ref Branch is a training-time
    use of the same clip network on labelled clips (``mam.training.train``), so it has no weights
    of its own.

    Args:
        cfg: hyper-parameters; saved with the weights.
    """

    def __init__(self, cfg: MAMConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MAMConfig()
        self.clip_encoder = ClipEncoder(cfg)
        self.clip_head = nn.Linear(cfg.embed_dim, 2)
        self.bag_pool = AttentionPool(2, cfg.bag_hidden)
        self.info_branch = nn.Sequential(
            nn.Linear(cfg.info_features, cfg.info_hidden),
            nn.ReLU(),
            nn.Dropout(cfg.conv_dropout),
            nn.Linear(cfg.info_hidden, 2),
        )

    # -- clip network ---------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clip representation ``[N, D]``: what the triplet and closeness losses act on."""
        return self.clip_encoder(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """FMs logits ``[N, 2]``; column 1 = FMs present."""
        return self.clip_head(features)

    def forward_clips(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return features, self.forward_head(features)

    # -- bag head and Info branch ---------------------------------------------------------------
    def forward_bag(
        self, clip_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse clips of each bag: ``[B, K, 2]`` logits -> bag probabilities ``[B, 2]``
        (column 1 = normal, i.e. FMs present) and attention weights ``[B, K]``."""
        return self.bag_pool(torch.softmax(clip_logits, dim=-1), mask)

    def forward_info(self, info: torch.Tensor) -> torch.Tensor:
        """Info-branch logits ``[B, 2]`` (column 1 = normal) from normalised infant data."""
        return self.info_branch(info)

    def normal_logit(
        self, bag_probs: torch.Tensor, info_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log-odds of normal ``[B]``: the bag's log-odds plus, if given, the Info branch's.

        Adding log-odds is a product of experts: neither branch caps the other, unlike the
        reference's softmax(p_bag + p_info).
        """
        p = bag_probs[:, 1].clamp(_EPS, 1 - _EPS)
        z = torch.log(p) - torch.log1p(-p)
        if info_logits is not None:
            z = z + (info_logits[:, 1] - info_logits[:, 0])
        return z

    def forward_fusion(
        self, bag_probs: torch.Tensor, info_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final ``[B, 2]`` probabilities (column 1 = normal), per ``cfg.fusion``."""
        if self.cfg.fusion == "reference":
            if info_logits is None:
                return bag_probs
            # NOTE: reference fusion, kept only for parity; caps outputs to [0.12, 0.88].
            return torch.softmax(bag_probs + torch.softmax(info_logits, dim=1), dim=1)
        p = torch.sigmoid(self.normal_logit(bag_probs, info_logits))
        return torch.stack([1 - p, p], dim=1)

    def forward(self, x: torch.Tensor, info: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One bag: instances ``[K, T, C, V, V]`` of one recording (+ optional info ``[4]``)."""
        features, logits = self.forward_clips(x)
        bag_probs, attention = self.forward_bag(logits.unsqueeze(0))
        info_logits = self.forward_info(info.reshape(1, -1)) if info is not None else None
        return {
            "clip_features": features,
            "clip_logits": logits,
            "attention": attention[0],
            "bag_probs": bag_probs[0],
            "probs": self.forward_fusion(bag_probs, info_logits)[0],
        }
