"""Import checkpoints written by the authors' reference code (github.com/qiang-Blazer/MAM, MIT).

One key-remapping function, like timm's ``checkpoint_filter_fn``. The architecture is read off the
tensor shapes (layers, feed-forward width, fusion MLP), so both the published ``clip_only.pth``
(1 layer, FFN 2048, 2-linear fusion MLP) and the current code's model (2 layers, FFN 256,
3-linear fusion MLP, bag attention, Info branch) load. The temporal stride is not stored in a
checkpoint; the reference demo uses ``time_window=10, time_step=1``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from mam.errors import ModelLoadError
from mam.model.config import MAMConfig
from mam.model.network import MAM

_PREFIX_MAP = (
    ("cnn.", ("clip_encoder.joint_conv.",)),
    ("tcn.", ("clip_encoder.time_conv.",)),
    # NOTE: the reference uses one encoder and one fusion module for both space and time.
    (
        "transformer_encoder.",
        ("clip_encoder.spatial_encoder.", "clip_encoder.temporal_encoder."),
    ),
    (
        "attention.attention.",
        ("clip_encoder.joint_pool.attention.", "clip_encoder.time_pool.attention."),
    ),
    ("linear.", ("clip_head.",)),
    ("attention2.attention.", ("bag_pool.attention.",)),
    ("info_linear1.", ("info_branch.0.",)),
    ("info_linear2.", ("info_branch.3.",)),
)


def _mlp_hidden(sd: dict[str, torch.Tensor], prefix: str) -> tuple[int, ...]:
    idx = sorted(
        int(m.group(1)) for k in sd if (m := re.fullmatch(re.escape(prefix) + r"(\d+)\.weight", k))
    )
    return tuple(int(sd[f"{prefix}{i}.weight"].shape[0]) for i in idx[:-1])


def config_from_reference(sd: dict[str, torch.Tensor], time_step: int = 1) -> MAMConfig:
    """Infer the architecture of a reference state dict from its shapes."""
    try:
        layers = {
            int(m.group(1))
            for k in sd
            if (m := re.match(r"transformer_encoder\.layers\.(\d+)\.", k))
        }
        embed, in_ch = sd["cnn.weight"].shape[:2]
        return MAMConfig.reference(
            in_channels=int(in_ch),
            num_joints=int(sd["cnn.weight"].shape[3]) + 1,
            embed_dim=int(embed),
            num_layers=len(layers),
            ffn_dim=int(sd["transformer_encoder.layers.0.linear1.weight"].shape[0]),
            time_window=int(sd["tcn.weight"].shape[2]),
            time_step=time_step,
            fusion_hidden=_mlp_hidden(sd, "attention.attention."),
            bag_hidden=_mlp_hidden(sd, "attention2.attention.") or (32, 16),
            info_hidden=int(sd["info_linear1.weight"].shape[0])
            if "info_linear1.weight" in sd
            else 32,
            # PyTorch's TransformerEncoderLayer default, which the reference does not change.
            dropout=0.1,
        )
    except KeyError as e:
        raise ModelLoadError(f"not a MAM reference checkpoint: missing {e}") from e


def convert_reference_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename reference keys to ours; shared reference modules fill both of our roles."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for src, dsts in _PREFIX_MAP:
            if key.startswith(src):
                for dst in dsts:
                    out[dst + key[len(src) :]] = value
                break
        else:
            raise ModelLoadError(f"unexpected key in reference checkpoint: {key}")
    return out


def load_reference_checkpoint(path: str | Path, time_step: int = 1) -> MAM:
    """Build a :class:`MAM` from a reference-code checkpoint (state dict or pickled module)."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ModelLoadError(f"cannot read reference checkpoint {path}: {e}") from e
    sd = obj.state_dict() if hasattr(obj, "state_dict") else obj
    cfg = config_from_reference(sd, time_step=time_step)
    model = MAM(cfg)
    missing, unexpected = model.load_state_dict(convert_reference_state_dict(sd), strict=False)
    # The published clip-only checkpoint has no bag head or Info branch: those stay untrained.
    bad = [k for k in missing if not k.startswith(("bag_pool.", "info_branch."))]
    if bad or unexpected:
        raise ModelLoadError(f"checkpoint does not fit: missing {bad}, unexpected {unexpected}")
    return model.eval()
