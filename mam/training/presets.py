"""Named training recipes (``TrainConfig.preset``, ``mam train --preset``) and the network sizes
they use; importing this loads no torch, so the command line can list them quickly."""

from __future__ import annotations

from mam.model.config import MAMConfig


def compact_model_config(**kw) -> MAMConfig:
    """A small configuration that trains on a 2-core CPU in minutes (about 30x cheaper than the
    paper's): width 32, one layer, a temporal conv of stride 5 before the Transformers, velocity
    input, no dropout on the convolutions (per-frame dropout noise looks like small fast motion,
    exactly the signal FMs are)."""
    base = dict(
        temporal_difference=True,
        embed_dim=32,
        ffn_dim=64,
        num_layers=1,
        temporal_conv_repeats=1,
        time_window=5,
        time_step=5,
        fusion_hidden=(32,),
        conv_dropout=0.0,
        dropout=0.0,
    )
    base.update(kw)
    return MAMConfig(**base)


MODEL_CONFIGS = {
    "compact": compact_model_config,
    "paper": MAMConfig.paper,
    "reference": MAMConfig.reference,
}
"""Network sizes by name (``mam train --config``)."""

PRESETS: dict[str, dict] = {
    "compact": dict(model="compact", epochs=8, optimizer="adamw", lr=5e-4, max_lr=3e-3,
                    ref_clips_per_step=16, instances_per_bag=8),
    "paper": dict(model="paper"),
}  # fmt: skip
"""The ``TrainConfig`` fields each preset sets (``model`` by name); the rest keep their
defaults, which are the paper's."""
