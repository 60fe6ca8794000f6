"""HRNet-W32 top-down 2D keypoint network (COCO 17 keypoints) and its heatmap decoding.

The paper's pose route (Gao, Yao et al. 2023, Methods): HRNet (Sun et al., CVPR 2019) fine-tuned on
5 annotated frames from each of 298 infant videos, as the 2D "kernel" of VideoPose3D. No infant
weights were published, so a site provides its own fine-tuned checkpoint; this module only defines
the network so that such a checkpoint loads.

Architecture and parameter names follow ``lib/models/pose_hrnet.py`` of
deep-high-resolution-net.pytorch (the code simple-HRNet, which the paper used, also loads), so
``pose_hrnet_w32_256x192.pth`` and checkpoints fine-tuned from it load through
:func:`checkpoint_filter_fn`: stem (two stride-2 3x3 convs) -> ``layer1`` (4 bottlenecks, 256 ch)
-> stages 2-4 with 2, 3, 4 parallel branches (W, 2W, 4W, 8W channels at strides 4, 8, 16, 32)
exchanging information in fuse layers -> 1x1 ``final_layer`` on the stride-4 branch. Input
``[N, 3, 256, 192]`` (RGB, ImageNet mean/std), output heatmaps ``[N, 17, 64, 48]``.

Decoding (:func:`decode_heatmaps`) is the reference's ``get_final_preds`` without DARK: argmax,
then a quarter-pixel shift toward the higher neighbour; the confidence is the heatmap maximum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
INPUT_SIZE = (256, 192)  # (height, width): the 3:4 portrait crop of the W32 256x192 model
HEATMAP_STRIDE = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BN_MOMENTUM = 0.1


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=_BN_MOMENTUM)


def _conv_bn(cin: int, cout: int, stride: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _bn(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _bn(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.downsample(x))


def _blocks(block: type[nn.Module], cin: int, planes: int, num: int) -> nn.Sequential:
    """``num`` blocks; the first gets a 1x1 projection when the channel count changes."""
    down = None
    if cin != planes * block.expansion:
        down = nn.Sequential(
            nn.Conv2d(cin, planes * block.expansion, 1, bias=False), _bn(planes * block.expansion)
        )
    layers = [block(cin, planes, 1, down)]
    layers += [block(planes * block.expansion, planes) for _ in range(num - 1)]
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then every output branch sums all inputs resampled to it:
    finer inputs by chains of stride-2 3x3 convs, coarser ones by a 1x1 conv and nearest upsampling.

    NOTE: the reference's fuse-layer BatchNorms use the default momentum and the branch/stage
    containers are ``nn.Sequential``/``nn.ModuleList`` with ``None`` placeholders: kept, since
    parameter names must match the official checkpoints.
    """

    def __init__(self, channels: Sequence[int], num_blocks: int, multi_scale_output: bool = True):
        super().__init__()
        n = len(channels)
        self.num_branches = n
        self.branches = nn.ModuleList(_blocks(BasicBlock, c, c, num_blocks) for c in channels)
        self.fuse_layers = None
        if n > 1:
            fuse = []
            for i in range(n if multi_scale_output else 1):
                row: list[nn.Module | None] = []
                for j in range(n):
                    if j > i:  # coarser -> finer
                        row.append(
                            nn.Sequential(
                                nn.Conv2d(channels[j], channels[i], 1, 1, 0, bias=False),
                                nn.BatchNorm2d(channels[i]),
                                nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
                            )
                        )
                    elif j == i:
                        row.append(None)
                    else:  # finer -> coarser: i - j stride-2 convs, ReLU between them
                        steps = []
                        for k in range(i - j):
                            last = k == i - j - 1
                            cout = channels[i] if last else channels[j]
                            conv = [nn.Conv2d(channels[j], cout, 3, 2, 1, bias=False)]
                            conv += [nn.BatchNorm2d(cout)] + ([] if last else [nn.ReLU(True)])
                            steps.append(nn.Sequential(*conv))
                        row.append(nn.Sequential(*steps))
                fuse.append(nn.ModuleList(row))
            self.fuse_layers = nn.ModuleList(fuse)
        self.relu = nn.ReLU(True)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[i]
            for j, layer in enumerate(row):
                if j != i:
                    y = y + layer(xs[j])
            out.append(self.relu(y))
        return out


class PoseHighResolutionNet(nn.Module):
    """HRNet for top-down heatmap keypoint estimation (SimpleBaseline-style head).

    Args:
        width: channels of the highest-resolution branch (32 for HRNet-W32, 48 for W48); the
            branches have ``width * (1, 2, 4, 8)``.
        num_joints: heatmap channels (17 COCO keypoints).
        stage_modules: HighResolutionModules in stages 2, 3 and 4 (reference: 1, 4, 3).
        stage_blocks: BasicBlocks per branch in each module (reference: 4).
        final_conv_kernel: kernel of the heatmap layer, 1 or 3 (reference: 1).
    """

    def __init__(
        self,
        *,
        width: int = 32,
        num_joints: int = len(COCO_KEYPOINTS),
        stage_modules: tuple[int, int, int] = (1, 4, 3),
        stage_blocks: int = 4,
        final_conv_kernel: int = 1,
    ) -> None:
        super().__init__()
        if width < 1 or num_joints < 1 or stage_blocks < 1 or min(stage_modules) < 1:
            raise ValueError("width, num_joints, stage_blocks and stage_modules must be >= 1")
        if len(stage_modules) != 3:
            raise ValueError(f"stage_modules needs 3 entries (stages 2-4), got {stage_modules}")
        if final_conv_kernel not in (1, 3):
            raise ValueError(f"final_conv_kernel must be 1 or 3, got {final_conv_kernel}")
        self.config = {
            "width": width,
            "num_joints": num_joints,
            "stage_modules": list(stage_modules),
            "stage_blocks": stage_blocks,
            "final_conv_kernel": final_conv_kernel,
        }
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = _bn(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = _bn(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _blocks(Bottleneck, 64, 64, 4)
        pre = [256]
        for s, modules in enumerate(stage_modules, start=2):
            channels = [width * 2**b for b in range(s)]
            setattr(self, f"transition{s - 1}", self._transition(pre, channels))
            last_stage = s == 4
            stage = [
                HighResolutionModule(channels, stage_blocks, not (last_stage and m == modules - 1))
                for m in range(modules)
            ]
            setattr(self, f"stage{s}", nn.Sequential(*stage))
            pre = channels
        pad = final_conv_kernel // 2
        self.final_layer = nn.Conv2d(width, num_joints, final_conv_kernel, 1, pad)

    @staticmethod
    def _transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
        """Existing branches keep their input (``None``, or a 3x3 conv if the width changes); a
        new branch comes from the coarsest previous one by stride-2 convs."""
        layers: list[nn.Module | None] = []
        for i, c in enumerate(cur):
            if i < len(pre):
                layers.append(None if c == pre[i] else _conv_bn(pre[i], c, 1, relu=True))
            else:
                steps = [
                    _conv_bn(pre[-1], c if k == i - len(pre) else pre[-1], 2, relu=True)
                    for k in range(i + 1 - len(pre))
                ]
                layers.append(nn.Sequential(*steps))
        return nn.ModuleList(layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` normalised RGB -> stride-4 features ``[N, width, H/4, W/4]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for s in (2, 3, 4):
            transition = getattr(self, f"transition{s - 1}")
            # NOTE: as the reference: a new branch grows from the last (coarsest) output
            xs = [ys[i] if t is None else t(ys[-1]) for i, t in enumerate(transition)]
            ys = getattr(self, f"stage{s}")(xs)
        return ys[0]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.final_layer(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 256, 192]`` -> heatmaps ``[N, num_joints, 64, 48]``."""
        return self.forward_head(self.forward_features(x))


def hrnet_w32(**kwargs) -> PoseHighResolutionNet:
    """HRNet-W32 as in ``w32_256x192_adam_lr1e-3.yaml`` (28.5 M parameters)."""
    return PoseHighResolutionNet(width=32, **kwargs)


def checkpoint_filter_fn(state: Mapping, model: nn.Module | None = None) -> dict:
    """An HRNet checkpoint in any of its usual wrappings -> this module's state dict.

    Accepts the bare state dict of ``pose_hrnet_w32_256x192.pth``, a training checkpoint
    (``{"state_dict": ...}`` or ``{"model": ...}``), and ``DataParallel`` keys (``module.``).
    With ``model``, keys the model does not have (ImageNet-classification heads such as
    ``incre_modules``/``classifier``) are dropped; shape mismatches raise ``ValueError``.
    """
    for wrapper in ("state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        out[k.removeprefix("module.")] = v
    if model is not None:
        own = model.state_dict()
        out = {k: v for k, v in out.items() if k in own}
        bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in out.items()
               if v.shape != own[k].shape]  # fmt: skip
        if bad:
            raise ValueError(f"checkpoint does not fit this HRNet: {bad[:5]}")
    return out


# -- pre- and post-processing (numpy) -------------------------------------------------------------
def normalize_images(images: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]`` with ImageNet mean and std."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def decode_heatmaps(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps ``[N, J, h, w]`` -> keypoints ``[N, J, 2]`` (x, y in heatmap pixels) and
    maxima ``[N, J]``.

    Argmax, then a quarter-pixel shift toward the larger neighbour on each axis (the reference
    ``get_final_preds`` with its default post-processing, no DARK). Keypoints whose maximum is not
    positive are left at the argmax and should be treated as missing by the caller.
    """
    hm = np.asarray(heatmaps, dtype=np.float32)
    if hm.ndim != 4:
        raise ValueError(f"heatmaps must be [N, J, h, w], got {hm.shape}")
    N, J, h, w = hm.shape
    flat = hm.reshape(N, J, h * w)
    idx = flat.argmax(axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0]
    px, py = idx % w, idx // w
    coords = np.stack([px, py], axis=-1).astype(np.float32)
    n, j = np.meshgrid(np.arange(N), np.arange(J), indexing="ij")
    inner = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)  # as the reference: 1 < p < size - 1
    xr, xl = np.clip(px + 1, 0, w - 1), np.clip(px - 1, 0, w - 1)
    yd, yu = np.clip(py + 1, 0, h - 1), np.clip(py - 1, 0, h - 1)
    dx = hm[n, j, py, xr] - hm[n, j, py, xl]
    dy = hm[n, j, yd, px] - hm[n, j, yu, px]
    coords += 0.25 * np.stack([np.sign(dx), np.sign(dy)], axis=-1) * inner[..., None]
    return coords, maxvals
