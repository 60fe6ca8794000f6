"""VideoPose3D temporal lifter: 2D keypoint sequences -> root-relative 3D joints.

The paper's 3D stage (Gao, Yao et al. 2023, Methods): VideoPose3D (Pavllo et al., CVPR 2019) on
the 2D keypoints of a fine-tuned HRNet, giving the 17 Human3.6M joints per frame. The network is the
one of VideoPose3D's ``common/model.py`` ``TemporalModel``: a 1D convolution over time expands
``17 x 2`` inputs to ``channels``, then residual blocks of a dilated convolution (width ``w_i``,
dilation ``prod(w_<i)``) and a 1x1 convolution, then a 1x1 convolution to ``17 x 3``. With filter
widths ``3, 3, 3, 3, 3`` one output frame sees 243 input frames (:meth:`receptive_field`).

Inference over a whole sequence (:func:`lift_sequence`) pads both ends by repeating the edge frames,
as VideoPose3D's ``evaluate`` does, so the output has one 3D pose per input frame.

The 2D input of a whole sequence is made root-relative and scale-free (:func:`normalize_2d`, not
in VideoPose3D: here camera distance and zoom are unknown). The lifter's input joint order is
Human3.6M's (``mam.skeleton``); 2D keypoints in COCO order are
mapped once by :func:`coco_to_h36m` (the paper maps COCO keypoints to H36M joints). 2D input is
in VideoPose3D's screen coordinates (:func:`normalize_screen_coordinates`: x in [-1, 1], y scaled
by the same factor, so the aspect ratio is kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mam.skeleton import NUM_JOINTS

# -- COCO 17 -> Human3.6M 17 (the one place this mapping lives) -----------------------------------
# Each H36M joint as {COCO keypoint index: weight}; weights sum to 1.
# NOTE: the usual conversion (e.g. VideoPose3D's in-the-wild detections, MotionBERT's coco2h36m):
# pelvis = mid-hips, thorax = mid-shoulders, spine = mid(pelvis, thorax), neck/nose = nose,
# head = mid-eyes. COCO has no crown, so "head" sits lower than Human3.6M's head joint; the lifter
# is trained on projected H36M joints, so this offset is one a site's fine-tuning cannot remove.
COCO_TO_H36M: tuple[dict[int, float], ...] = (
    {11: 0.5, 12: 0.5},  # pelvis
    {12: 1.0},  # right_hip
    {14: 1.0},  # right_knee
    {16: 1.0},  # right_ankle
    {11: 1.0},  # left_hip
    {13: 1.0},  # left_knee
    {15: 1.0},  # left_ankle
    {5: 0.25, 6: 0.25, 11: 0.25, 12: 0.25},  # spine = mid(pelvis, thorax)
    {5: 0.5, 6: 0.5},  # thorax
    {0: 1.0},  # neck_nose
    {1: 0.5, 2: 0.5},  # head = mid-eyes
    {5: 1.0},  # left_shoulder
    {7: 1.0},  # left_elbow
    {9: 1.0},  # left_wrist
    {6: 1.0},  # right_shoulder
    {8: 1.0},  # right_elbow
    {10: 1.0},  # right_wrist
)
assert len(COCO_TO_H36M) == NUM_JOINTS


def coco_to_h36m(keypoints: np.ndarray) -> np.ndarray:
    """COCO keypoints ``[..., 17, D]`` -> Human3.6M joints ``[..., 17, D]`` (float32)."""
    x = np.asarray(keypoints, dtype=np.float64)
    if x.ndim < 2 or x.shape[-2] != 17:
        raise ValueError(f"COCO keypoints must be [..., 17, D], got {x.shape}")
    out = np.stack([sum(w * x[..., i, :] for i, w in m.items()) for m in COCO_TO_H36M], axis=-2)
    return out.astype(np.float32)


def coco_to_h36m_confidence(scores: np.ndarray) -> np.ndarray:
    """Per-joint confidence ``[..., 17]``: the minimum over the COCO keypoints a joint is built
    from (as ``mam.pose.mapping.map_confidence`` does for BlazePose)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim < 1 or s.shape[-1] != 17:
        raise ValueError(f"scores must be [..., 17], got {s.shape}")
    return np.stack([s[..., sorted(m)].min(axis=-1) for m in COCO_TO_H36M], -1).astype(np.float32)


def normalize_screen_coordinates(x: np.ndarray, w: float, h: float) -> np.ndarray:
    """Pixels -> VideoPose3D screen coordinates: ``[0, w]`` -> ``[-1, 1]``, y by the same scale."""
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    return (np.asarray(x, np.float32) / w * 2 - np.array([1, h / w], np.float32)).astype(np.float32)


def normalize_2d(keypoints_2d: np.ndarray) -> np.ndarray:
    """``[T, J, 2]`` -> root-relative 2D divided by the sequence's RMS joint-to-root distance.

    NOTE: not in VideoPose3D, whose fixed Human3.6M cameras make image position and size carry
    depth. Here the camera's distance and zoom are unknown (any site, any tripod), so where the
    infant sits in the frame and how large it appears say nothing about its 3D pose; removing
    both lets a small lifter spend its capacity on depth. One scale per sequence, so limb motion
    toward the camera still changes the 2D lengths the lifter sees.
    """
    x = np.asarray(keypoints_2d, dtype=np.float32)
    if x.ndim != 3 or x.shape[-1] != 2:
        raise ValueError(f"keypoints must be [T, J, 2], got {x.shape}")
    rel = x - x[:, :1]
    scale = float(np.sqrt(np.mean(np.sum(rel**2, axis=-1)))) if len(x) else 1.0
    return rel / max(scale, 1e-6)


# -- the network ----------------------------------------------------------------------------------
class TemporalModel(nn.Module):
    """VideoPose3D's temporal convolutional lifter (non-optimised form, any sequence length).

    Input ``[N, T, J, 2]``, output ``[N, T - receptive_field() + 1, J, 3]``.

    Args:
        num_joints_in: 2D joints in (17, Human3.6M order).
        in_features: coordinates per input joint (2).
        num_joints_out: 3D joints out (17).
        filter_widths: temporal kernel widths, all odd; ``(3, 3, 3, 3, 3)`` gives 243 frames.
        causal: use only past frames (real-time); off as in the paper's offline use.
        dropout: dropout after every block.
        channels: convolution channels (VideoPose3D: 1024; a few hundred suffice for one pose
            representation, see ``mam.pose.paper.lifter_train``).
    """

    def __init__(
        self,
        *,
        num_joints_in: int = NUM_JOINTS,
        in_features: int = 2,
        num_joints_out: int = NUM_JOINTS,
        filter_widths: Sequence[int] = (3, 3, 3, 3, 3),
        causal: bool = False,
        dropout: float = 0.25,
        channels: int = 1024,
    ) -> None:
        super().__init__()
        filter_widths = tuple(int(f) for f in filter_widths)
        if not filter_widths or any(f < 1 or f % 2 == 0 for f in filter_widths):
            raise ValueError(f"filter widths must be odd and >= 1, got {filter_widths}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.config = {
            "num_joints_in": num_joints_in,
            "in_features": in_features,
            "num_joints_out": num_joints_out,
            "filter_widths": list(filter_widths),
            "causal": causal,
            "dropout": dropout,
            "channels": channels,
        }
        self.num_joints_in, self.in_features = num_joints_in, in_features
        self.num_joints_out = num_joints_out
        self.drop = nn.Dropout(dropout)
        self.relu = nn.ReLU(inplace=True)
        self.expand_conv = nn.Conv1d(
            num_joints_in * in_features, channels, filter_widths[0], bias=False
        )
        self.expand_bn = nn.BatchNorm1d(channels, momentum=0.1)
        self.pad = [filter_widths[0] // 2]
        self.causal_shift = [filter_widths[0] // 2 if causal else 0]
        convs, bns = [], []
        dilation = filter_widths[0]
        for w in filter_widths[1:]:
            self.pad.append((w - 1) * dilation // 2)
            self.causal_shift.append((w // 2) * dilation if causal else 0)
            convs += [
                nn.Conv1d(channels, channels, w, dilation=dilation, bias=False),
                nn.Conv1d(channels, channels, 1, bias=False),
            ]
            bns += [nn.BatchNorm1d(channels, momentum=0.1), nn.BatchNorm1d(channels, momentum=0.1)]
            dilation *= w
        self.layers_conv = nn.ModuleList(convs)
        self.layers_bn = nn.ModuleList(bns)
        self.shrink = nn.Conv1d(channels, num_joints_out * 3, 1)

    def receptive_field(self) -> int:
        """Input frames that one output frame depends on (243 for widths 3, 3, 3, 3, 3)."""
        return 1 + 2 * sum(self.pad)

    def set_bn_momentum(self, momentum: float) -> None:
        """VideoPose3D decays the BatchNorm momentum during training."""
        self.expand_bn.momentum = momentum
        for bn in self.layers_bn:
            bn.momentum = momentum

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, T, J, 2]`` -> ``[N, channels, T - receptive_field() + 1]``."""
        N, T, J, F = x.shape
        if J != self.num_joints_in or F != self.in_features:
            raise ValueError(
                f"expected [N, T, {self.num_joints_in}, {self.in_features}], got {tuple(x.shape)}"
            )
        x = x.reshape(N, T, J * F).permute(0, 2, 1)  # [N, T, J*2] -> [N, J*2, T]
        x = self.drop(self.relu(self.expand_bn(self.expand_conv(x))))
        for i in range(len(self.pad) - 1):
            pad, shift = self.pad[i + 1], self.causal_shift[i + 1]
            res = x[:, :, pad + shift : x.shape[2] - pad + shift]
            x = self.drop(self.relu(self.layers_bn[2 * i](self.layers_conv[2 * i](x))))
            x = res + self.drop(
                self.relu(self.layers_bn[2 * i + 1](self.layers_conv[2 * i + 1](x)))
            )
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        N, _, T = features.shape
        x = self.shrink(features)  # [N, J*3, T]
        return x.permute(0, 2, 1).reshape(N, T, self.num_joints_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def pad_edges(keypoints_2d: np.ndarray, receptive_field: int, causal: bool = False) -> np.ndarray:
    """Repeat the first and last frames so that the lifter returns one pose per input frame
    (VideoPose3D ``evaluate``: ``np.pad(..., 'edge')``). ``[T, J, 2]`` -> ``[T + rf - 1, J, 2]``."""
    pad = (receptive_field - 1) // 2
    before, after = (2 * pad, 0) if causal else (pad, pad)
    return np.pad(keypoints_2d, ((before, after), (0, 0), (0, 0)), mode="edge")


def lift_sequence(
    model: TemporalModel,
    keypoints_2d: np.ndarray,
    *,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Screen-coordinate 2D joints ``[T, 17, 2]`` -> root-relative 3D ``[T, 17, 3]`` (float32).

    The input is normalised by :func:`normalize_2d` here, as in training.

    The whole sequence goes through the network at once (a 5-minute recording is 7,500 frames,
    a few MB of activations); the root joint is set to exactly 0, as VideoPose3D does.
    """
    x = np.asarray(keypoints_2d, dtype=np.float32)
    if x.ndim != 3 or x.shape[1:] != (model.num_joints_in, model.in_features):
        raise ValueError(f"keypoints must be [T, {model.num_joints_in}, 2], got {x.shape}")
    if len(x) == 0:
        return np.zeros((0, model.num_joints_out, 3), np.float32)
    padded = pad_edges(normalize_2d(x), model.receptive_field(), bool(model.config["causal"]))
    param = next(model.parameters())
    with torch.inference_mode():
        out = model(torch.from_numpy(padded)[None].to(device or param.device, param.dtype))
    out = out[0].float().cpu().numpy()
    return out - out[:, :1]
