"""The BlazePose networks in PyTorch, built from the same converted graph as the ONNX path.

The GPU machines this project is lent have PyTorch with CUDA but neither TensorRT nor
onnxruntime-gpu (no wheels within their carry limit), so the pose networks need a PyTorch form.
``onnx2torch`` would do it but imports torchvision (its NMS converter), which is not installed
with the CPU torch wheel here; and the two graphs use only eleven operators. So ``GraphModule``
runs our own ONNX translation of the wheel's tflite files (``mam.pose.blazepose.convert``) node by
node with ``torch.nn.functional``: the same weights, the same layout decisions, outputs equal to
ONNX Runtime's within float rounding (``tests/test_pose_onnx.py``). The node list is fixed at
construction, so the module traces: ``torch.compile`` and CUDA graphs apply on a GPU, in fp16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mam.errors import DependencyMissingError


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise DependencyMissingError(
            "the pytorch pose runtime needs torch (pip install -e '.[train]', or a GPU image)"
        ) from exc
    return torch


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def build(onnx_path: str | Path):
    """A ``torch.nn.Module`` computing the graph at ``onnx_path``: NHWC float input ``input``,
    a dict of the graph's named outputs."""
    import onnx
    from onnx import numpy_helper

    torch = _torch()
    import torch.nn.functional as F
    from torch import nn

    model = onnx.load(str(onnx_path))
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    supported = {"Transpose", "Pad", "Conv", "Clip", "Add", "DepthToSpace", "Resize", "Reshape",
                 "Concat", "Identity", "MaxPool", "Sigmoid"}  # fmt: skip
    unknown = {n.op_type for n in graph.node} - supported
    if unknown:
        raise ValueError(f"operators without a PyTorch translation: {sorted(unknown)}")

    class GraphModule(nn.Module):
        """One BlazePose network as a fixed sequence of functional ops (module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.steps: list[tuple] = []
            self.outputs = [o.name for o in graph.output]
            names: dict[str, str] = {}

            def buf(name: str, dtype=None) -> str:
                if name not in names:
                    key = f"c{len(names)}"
                    arr = consts[name]
                    t = torch.from_numpy(np.array(arr))  # a writable copy
                    self.register_buffer(key, t if dtype is None else t.to(dtype))
                    names[name] = key
                return names[name]

            for node in graph.node:
                a = _attrs(node)
                ins, out, op = list(node.input), node.output[0], node.op_type
                if op == "Conv":
                    pads = list(a.get("pads", [0, 0, 0, 0]))
                    self.steps.append((op, ins[0], out, buf(ins[1]),
                                       buf(ins[2]) if len(ins) > 2 and ins[2] else None,
                                       tuple(a.get("strides", [1, 1])),
                                       tuple(a.get("dilations", [1, 1])), a.get("group", 1),
                                       pads))  # fmt: skip
                elif op == "Clip":
                    lo = float(consts[ins[1]]) if len(ins) > 1 and ins[1] else None
                    hi = float(consts[ins[2]]) if len(ins) > 2 and ins[2] else None
                    self.steps.append((op, ins[0], out, lo, hi))
                elif op == "Pad":
                    p = consts[ins[1]].astype(int).tolist()  # [x1_begin.., x1_end..] NCHW
                    n = len(p) // 2
                    begin, end = p[:n], p[n:]
                    torch_pads: list[int] = []
                    for d in reversed(range(n)):  # F.pad: last dimension first
                        torch_pads += [begin[d], end[d]]
                    self.steps.append((op, ins[0], out, tuple(torch_pads)))
                elif op == "Reshape":
                    self.steps.append((op, ins[0], out, tuple(consts[ins[1]].tolist())))
                elif op == "Resize":
                    scales = consts[ins[2]].tolist()
                    mode = a.get("coordinate_transformation_mode", b"half_pixel")
                    mode = mode.decode() if isinstance(mode, bytes) else mode
                    if mode not in ("half_pixel", "align_corners"):
                        raise ValueError(f"Resize mode {mode} has no PyTorch translation")
                    self.steps.append((op, ins[0], out, tuple(scales[2:]), mode == "align_corners"))
                elif op == "MaxPool":
                    pads = list(a.get("pads", [0, 0, 0, 0]))
                    self.steps.append((op, ins[0], out, tuple(a["kernel_shape"]),
                                       tuple(a["strides"]), pads))  # fmt: skip
                elif op == "DepthToSpace":
                    mode = a.get("mode", b"DCR")
                    mode = mode.decode() if isinstance(mode, bytes) else mode
                    self.steps.append((op, ins[0], out, int(a["blocksize"]), mode))
                elif op == "Transpose":
                    self.steps.append((op, ins[0], out, tuple(a["perm"])))
                elif op == "Concat":
                    self.steps.append((op, tuple(ins), out, int(a["axis"])))
                elif op == "Add":
                    b = buf(ins[1]) if ins[1] in consts else None
                    self.steps.append((op, ins[0], out, b, None if b else ins[1]))
                else:  # Identity, Sigmoid
                    self.steps.append((op, ins[0], out))

        def forward(self, x):
            env = {"input": x}
            for step in self.steps:
                op, src, out = step[0], step[1], step[2]
                v = env[src] if isinstance(src, str) else None
                if op == "Conv":
                    _, _, _, w, b, stride, dil, group, pads = step
                    t, left, bottom, right = pads
                    if (t, left) == (bottom, right):
                        y = F.conv2d(v, getattr(self, w), getattr(self, b) if b else None,
                                     stride, (t, left), dil, group)  # fmt: skip
                    else:
                        v = F.pad(v, (left, right, t, bottom))
                        y = F.conv2d(v, getattr(self, w), getattr(self, b) if b else None,
                                     stride, 0, dil, group)  # fmt: skip
                elif op == "Clip":
                    y = torch.clamp(v, step[3], step[4])
                elif op == "Pad":
                    y = F.pad(v, step[3])
                elif op == "Reshape":
                    y = v.reshape(step[3])
                elif op == "Resize":
                    y = F.interpolate(v, scale_factor=step[3], mode="bilinear",
                                      align_corners=step[4])  # fmt: skip
                elif op == "MaxPool":
                    t, left, bottom, right = step[5]
                    v = F.pad(v, (left, right, t, bottom), value=float("-inf"))
                    y = F.max_pool2d(v, step[3], step[4])
                elif op == "DepthToSpace":
                    bs, mode = step[3], step[4]
                    n, c, h, w = v.shape
                    if mode == "DCR":  # TensorFlow's order: block index before channel
                        y = v.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
                    else:
                        y = v.reshape(n, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
                    y = y.reshape(n, c // (bs * bs), h * bs, w * bs)
                elif op == "Transpose":
                    y = v.permute(step[3])
                elif op == "Concat":
                    y = torch.cat([env[s] for s in src], dim=step[3])
                elif op == "Add":
                    other = getattr(self, step[3]) if step[3] else env[step[4]]
                    y = v + other
                elif op == "Sigmoid":
                    y = torch.sigmoid(v)
                else:
                    y = v
                env[out] = y
            return {name: env[name] for name in self.outputs}

    return GraphModule().eval()


def torch_network(
    path: Path,
    device: str = "cpu",
    precision: str = "fp32",
    *,
    max_batch: int | None = None,
    compile: bool = False,
):
    """A converted BlazePose network on PyTorch (``MAM_POSE_RUNTIME=pytorch``) as a
    ``mam.runtime.networks.TorchNetwork``: CUDA and fp16 when a GPU is there, optionally
    compiled; numpy in and out like the ONNX Runtime route."""
    from mam.runtime.networks import TorchNetwork
    from mam.runtime.sessions import RuntimeUnavailable

    torch = _torch()
    if device == "cuda" and not torch.cuda.is_available():
        raise DependencyMissingError("device cuda asked, but torch sees no CUDA device")
    dtype = torch.float16 if precision == "fp16" and device == "cuda" else torch.float32
    module = build(path).to(torch.device(device), dtype)
    fn = torch.compile(module, mode="reduce-overhead") if compile else module
    try:
        return TorchNetwork(fn, inputs=["input"], outputs=module.outputs, device=device,
                            dtype=precision, max_batch=max_batch)  # fmt: skip
    except RuntimeUnavailable as exc:
        raise DependencyMissingError(str(exc)) from exc
