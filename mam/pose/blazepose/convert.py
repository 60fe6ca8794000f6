"""BlazePose tflite networks (from the mediapipe wheel) -> ONNX, converted here and cached.

Why our own converter: the converters on PyPI could not do it in this environment (measured
2026-11-26). tf2onnx 1.17.0 imports TensorFlow at package import (its
tflite path too), and no TensorFlow wheel fits beside mediapipe's pins without a second ~600 MB
stack; tflite2onnx 0.4.1 (last release 2022) stops at ``DENSIFY`` (the detector's sparse weights)
and has no ``DEPTH_TO_SPACE`` nor float16 ``DEQUANTIZE``. The two BlazePose networks use eleven
TFLite operators, so they are translated here with the maintained flatbuffer bindings of the
``tflite`` package (2.18.0: the TFLite schema, pure Python) and ``onnx.helper``:

* weights: float16 ``DEQUANTIZE`` and sparse ``DENSIFY`` (CSR per dimension) are folded into
  float32 initialisers at conversion time;
* layout: the graph keeps TFLite's NHWC input (frames crop straight into it) and transposes once to
  NCHW; convolution weights are rearranged (OHWI -> OIHW; depthwise 1HWC -> C1HW); tensors leave
  NCHW again before each ``RESHAPE`` and at 4D outputs, so outputs equal TFLite's;
* ``SAME`` padding becomes explicit pads from the static shapes (TensorFlow puts the odd pixel at
  the end); the batch axis is dynamic (``RESHAPE`` targets get ``-1`` there), for batched frames;
* only the outputs the pipeline reads are kept (``LANDMARK_OUTPUTS``): the landmark network's
  segmentation decoder (upsampling to 256 x 256) is dead code for pose and is pruned.

Converted files live outside the repository in ``MAM_POSE_CACHE`` (default ``~/.cache/mam/pose``),
named by the tflite file's sha256 and :data:`CONVERTER_VERSION`, written atomically; they are made
at image build time (``python -m export blazepose``) or lazily on first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mam.errors import DependencyMissingError
from mam.files import write_atomic
from mam.model.weights import sha256_of
from mam.pose.base import ENV_POSE_CACHE, pose_cache_dir

logger = logging.getLogger(__name__)

CONVERTER_VERSION = "mam-tflite-onnx-1"
OPSET = 17  # ONNX Runtime >= 1.13 and TensorRT 8.5+ parse it; Resize and Pad as used here exist
ENV_CACHE = ENV_POSE_CACHE
BATCH_AXIS = "frames"

DETECTOR = "pose_detection"
LANDMARK = "pose_landmark_full"
# tflite output index -> ONNX output name; outputs not listed are pruned.
DETECTOR_OUTPUTS = {0: "boxes", 1: "scores"}  # [N, 2254, 12] raw, [N, 2254, 1] logits
LANDMARK_OUTPUTS = {
    0: "landmarks",  # [N, 195]: 39 x (x, y, z, visibility logit, presence logit), crop pixels
    1: "pose_flag",  # [N, 1]: pose presence, already a probability (the graph ends in LOGISTIC)
    3: "heatmap",  # [N, 64, 64, 39]: logits, for the heatmap refinement of x and y
    4: "world_landmarks",  # [N, 117]: 39 x (x, y, z) metres, crop axes
}
_TFLITE_FILES = {
    DETECTOR: ("pose_detection", "pose_detection.tflite"),
    LANDMARK: ("pose_landmark", "pose_landmark_full.tflite"),
}
_OUTPUTS = {DETECTOR: DETECTOR_OUTPUTS, LANDMARK: LANDMARK_OUTPUTS}
_INSTALL_HINT = "pip install 'tflite==2.18.0' 'onnx==1.22.0' (or pip install -e '.[pose-onnx]')"


class ConversionError(RuntimeError):
    """The tflite graph holds something this converter does not translate."""


def _import_tflite():
    try:
        import tflite
    except ImportError as exc:
        raise DependencyMissingError(
            f"converting BlazePose to ONNX needs the tflite schema package: {_INSTALL_HINT}"
        ) from exc
    return tflite


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise DependencyMissingError(f"converting BlazePose needs onnx: {_INSTALL_HINT}") from exc
    return onnx


# --- where things are ----------------------------------------------------------------------------
def tflite_path(network: str) -> Path:
    """The tflite file of ``network`` inside the installed mediapipe wheel (never downloaded)."""
    if network not in _TFLITE_FILES:
        raise ValueError(f"unknown BlazePose network {network!r}; known: {sorted(_TFLITE_FILES)}")
    # find_spec locates the wheel without importing it (importing mediapipe costs ~1.2 s of
    # start-up, matplotlib and its task APIs included, for two files on disk).
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyMissingError(
            "the BlazePose weights come from the mediapipe 0.10.21 wheel: "
            "pip install 'mediapipe==0.10.21'"
        )
    folder, name = _TFLITE_FILES[network]
    path = Path(next(iter(spec.submodule_search_locations))).resolve() / "modules" / folder / name
    if not path.is_file():
        raise DependencyMissingError(f"{name} is not in this mediapipe install ({path.parent})")
    return path


cache_dir = pose_cache_dir  # converted weights never enter the repository


def cache_key(tflite_sha256: str) -> str:
    """Short key of what makes a converted file stale: the weights and this converter."""
    parts = {"tflite_sha256": tflite_sha256, "converter": CONVERTER_VERSION, "opset": OPSET}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ConvertedModel:
    network: str
    onnx_path: Path
    tflite_path: Path
    tflite_sha256: str


def ensure_onnx(network: str, cache: Path | None = None, force: bool = False) -> ConvertedModel:
    """The ONNX file of ``network`` (``pose_detection`` or ``pose_landmark_full``), converted
    into the cache when missing or stale. Safe when several processes start together: each
    writes its own temporary file and renames it into place."""
    src = tflite_path(network)
    sha = sha256_of(src)
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / f"{network}.{cache_key(sha)}.onnx"
    if target.is_file() and not force:
        return ConvertedModel(network, target, src, sha)
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to ONNX (%s) into %s", src.name, CONVERTER_VERSION, folder)
    model = convert_tflite(src, _OUTPUTS[network])
    data = model.SerializeToString()
    sidecar = {
        "network": network,
        "tflite": src.name,
        "tflite_sha256": sha,
        "converter": CONVERTER_VERSION,
        "opset": OPSET,
        "outputs": list(_OUTPUTS[network].values()),
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
    }
    write_atomic(target.with_suffix(".json"), json.dumps(sidecar, indent=2).encode())
    write_atomic(target, data)  # last: its presence means both are complete
    return ConvertedModel(network, target, src, sha)


def ensure_all(cache: Path | None = None, force: bool = False) -> dict[str, ConvertedModel]:
    return {n: ensure_onnx(n, cache, force) for n in (DETECTOR, LANDMARK)}


# --- tflite reading ------------------------------------------------------------------------------
def _densify(tfl, tensor, values: np.ndarray) -> np.ndarray:
    """Dense array of a sparse constant (TFLite sparsity: per traversed dimension DENSE or
    SPARSE_CSR; block-sparse layouts are not used by BlazePose and are refused)."""
    sp = tensor.Sparsity()
    shape = tensor.ShapeAsNumpy().tolist()
    order = sp.TraversalOrderAsNumpy().tolist()
    if sp.BlockMapLength() or sorted(order) != list(range(len(shape))):
        raise ConversionError(f"block-sparse tensor {tensor.Name()!r} is not supported")
    vectors = {
        tfl.SparseIndexVector.Int32Vector: tfl.Int32Vector,
        tfl.SparseIndexVector.Uint16Vector: tfl.Uint16Vector,
        tfl.SparseIndexVector.Uint8Vector: tfl.Uint8Vector,
    }

    def read(kind, table) -> np.ndarray:
        vec = vectors[kind]()
        vec.Init(table.Bytes, table.Pos)
        return vec.ValuesAsNumpy().astype(np.int64)

    prefix = np.zeros(1, np.int64)  # position of each path so far in its level's storage
    coords = np.zeros((1, 0), np.int64)
    for level in range(len(order)):
        meta = sp.DimMetadata(level)
        if meta.Format() == tfl.DimensionType.DENSE:
            n = meta.DenseSize()
            prefix = (prefix[:, None] * n + np.arange(n)).ravel()
            new = np.tile(np.arange(n), len(coords))
            coords = np.repeat(coords, n, axis=0)
        else:
            seg = read(meta.ArraySegmentsType(), meta.ArraySegments())
            idx = read(meta.ArrayIndicesType(), meta.ArrayIndices())
            counts = seg[prefix + 1] - seg[prefix]
            starts = np.repeat(seg[prefix], counts)
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            prefix = starts + offsets
            new = idx[prefix]
            coords = np.repeat(coords, counts, axis=0)
        coords = np.concatenate([coords, new[:, None]], axis=1)
    dense = np.zeros(shape, values.dtype)
    ordered = np.empty_like(coords)
    ordered[:, order] = coords
    dense[tuple(ordered.T)] = values[prefix]
    return dense


class _Converter:
    """One pass over a tflite subgraph, emitting ONNX nodes (NCHW inside, NHWC at the edges)."""

    def __init__(self, tfl, onnx, data: bytes, outputs: dict[int, str]) -> None:
        self.tfl, self.onnx, self.h = tfl, onnx, onnx.helper
        self.model = tfl.Model.GetRootAsModel(data, 0)
        if self.model.SubgraphsLength() != 1:
            raise ConversionError("expected one subgraph")
        self.g = self.model.Subgraphs(0)
        self.outputs = outputs
        ops = tfl.BuiltinOperator
        self.op_names = {v: k for k, v in vars(ops).items() if not k.startswith("_")}
        self.consts: dict[int, np.ndarray] = {}
        self.names: dict[int, str] = {}  # tflite tensor -> ONNX value name (NCHW if 4D)
        self.nodes: list = []
        self.inits: list = []
        self._uid = 0

    # helpers
    def uid(self, base: str) -> str:
        self._uid += 1
        return f"{base}_{self._uid}"

    def tensor(self, i: int):
        return self.g.Tensors(i)

    def shape(self, i: int) -> list[int]:
        return self.tensor(i).ShapeAsNumpy().tolist()

    def const(self, arr: np.ndarray, base: str) -> str:
        name = self.uid(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.uid(base)
        self.nodes.append(self.h.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def buffer_array(self, i: int) -> np.ndarray | None:
        t = self.tensor(i)
        buf = self.model.Buffers(t.Buffer())
        if buf is None or buf.DataLength() == 0:
            return None
        raw = buf.DataAsNumpy().tobytes()
        dtypes = {
            self.tfl.TensorType.FLOAT32: np.float32,
            self.tfl.TensorType.FLOAT16: np.float16,
            self.tfl.TensorType.INT32: np.int32,
            self.tfl.TensorType.INT64: np.int64,
        }
        if t.Type() not in dtypes:
            raise ConversionError(f"constant {t.Name()!r} has unsupported type {t.Type()}")
        arr = np.frombuffer(raw, dtypes[t.Type()])
        if t.Sparsity() is not None:
            return arr  # values only; DENSIFY lays them out
        return arr.reshape(self.shape(i))

    def value(self, i: int) -> np.ndarray | None:
        if i not in self.consts:
            arr = self.buffer_array(i)
            if arr is None:
                return None
            self.consts[i] = arr
        return self.consts[i]

    def activation(self, x: str, code: int) -> str:
        act = self.tfl.ActivationFunctionType
        if code == act.NONE:
            return x
        if code == act.RELU:
            return self.node("Relu", [x], "relu")
        if code == act.RELU6:
            lo = self.const(np.array(0, np.float32), "zero")
            hi = self.const(np.array(6, np.float32), "six")
            return self.node("Clip", [x, lo, hi], "relu6")
        raise ConversionError(f"fused activation {code} is not supported")

    @staticmethod
    def same_pads(size: list[int], kernel: list[int], stride: list[int], dil: list[int]):
        begin, end = [], []
        for n, k, s, d in zip(size, kernel, stride, dil):
            out = -(-n // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
            begin.append(total // 2)
            end.append(total - total // 2)
        return begin + end

    def options(self, op, cls):
        table = op.BuiltinOptions()
        opts = cls()
        opts.Init(table.Bytes, table.Pos)
        return opts

    # conversion
    def run(self):
        h, onnx = self.h, self.onnx
        if self.g.InputsLength() != 1:
            raise ConversionError("expected one input")
        in_idx = self.g.Inputs(0)
        n, height, width, ch = self.shape(in_idx)
        self.names[in_idx] = self.node("Transpose", ["input"], "to_nchw", perm=[0, 3, 1, 2])
        for k in range(self.g.OperatorsLength()):
            self.convert_op(self.g.Operators(k))
        outs = []
        out_info = []
        for k in range(self.g.OutputsLength()):
            if k not in self.outputs:
                continue
            idx = self.g.Outputs(k)
            name = self.names[idx]
            shape = self.shape(idx)
            if len(shape) == 4:
                name = self.node("Transpose", [name], "to_nhwc", perm=[0, 2, 3, 1])
            final = self.outputs[k]
            self.nodes.append(h.make_node("Identity", [name], [final], name=final))
            out_info.append(
                h.make_tensor_value_info(final, onnx.TensorProto.FLOAT, [BATCH_AXIS, *shape[1:]])
            )
            outs.append(final)
        graph = h.make_graph(
            self.nodes,
            "blazepose",
            [
                h.make_tensor_value_info(
                    "input", onnx.TensorProto.FLOAT, [BATCH_AXIS, height, width, ch]
                )
            ],
            out_info,
            self.inits,
        )
        model = h.make_model(
            graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name=CONVERTER_VERSION
        )
        model.ir_version = 8
        model = _prune(onnx, model)
        onnx.checker.check_model(model)
        return model

    def convert_op(self, op) -> None:
        tfl = self.tfl
        code = self.model.OperatorCodes(op.OpcodeIndex())
        opcode = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = self.op_names.get(opcode, str(opcode))
        ins = [op.Inputs(j) for j in range(op.InputsLength())]
        out = op.Outputs(0)
        B = tfl.BuiltinOperator
        if opcode == B.DEQUANTIZE:
            src = self.value(ins[0])
            if src is None:
                raise ConversionError("DEQUANTIZE of a non-constant tensor")
            self.consts[out] = src.astype(np.float32)
        elif opcode == B.DENSIFY:
            t = self.tensor(ins[0])
            self.consts[out] = _densify(tfl, t, self.buffer_array(ins[0]))
        elif opcode in (B.CONV_2D, B.DEPTHWISE_CONV_2D):
            self.conv(op, opcode == B.DEPTHWISE_CONV_2D, ins, out)
        elif opcode == B.ADD:
            opts = self.options(op, tfl.AddOptions)
            a, b = (self.input(i) for i in ins)
            y = self.node("Add", [a, b], "add")
            self.names[out] = self.activation(y, opts.FusedActivationFunction())
        elif opcode == B.PAD:
            pads = self.value(ins[1]).astype(np.int64)  # [4, 2] NHWC (begin, end)
            if len(pads) != 4:
                raise ConversionError("PAD of a non-4D tensor")
            nchw = pads[[0, 3, 1, 2]]
            p = self.const(np.concatenate([nchw[:, 0], nchw[:, 1]]), "pads")
            self.names[out] = self.node("Pad", [self.input(ins[0]), p], "pad", mode="constant")
        elif opcode == B.MAX_POOL_2D:
            opts = self.options(op, tfl.Pool2DOptions)
            k = [opts.FilterHeight(), opts.FilterWidth()]
            s = [opts.StrideH(), opts.StrideW()]
            pads = [0, 0, 0, 0]
            if opts.Padding() == tfl.Padding.SAME:
                pads = self.same_pads(self.shape(ins[0])[1:3], k, s, [1, 1])
            y = self.node(
                "MaxPool", [self.input(ins[0])], "maxpool", kernel_shape=k, strides=s, pads=pads
            )
            self.names[out] = self.activation(y, opts.FusedActivationFunction())
        elif opcode == B.RESIZE_BILINEAR:
            opts = self.options(op, tfl.ResizeBilinearOptions)
            ih, iw = self.shape(ins[0])[1:3]
            oh, ow = self.shape(out)[1:3]
            mode = (
                "align_corners"
                if opts.AlignCorners()
                else "half_pixel"
                if opts.HalfPixelCenters()
                else "asymmetric"
            )
            scales = self.const(np.array([1, 1, oh / ih, ow / iw], np.float32), "scales")
            self.names[out] = self.node(
                "Resize",
                [self.input(ins[0]), "", scales],
                "resize",
                mode="linear",
                coordinate_transformation_mode=mode,
            )
        elif opcode == B.DEPTH_TO_SPACE:
            opts = self.options(op, tfl.DepthToSpaceOptions)
            self.names[out] = self.node(
                "DepthToSpace",
                [self.input(ins[0])],
                "d2s",
                blocksize=opts.BlockSize(),
                mode="DCR",  # TensorFlow's channel order
            )
        elif opcode == B.LOGISTIC:
            self.names[out] = self.node("Sigmoid", [self.input(ins[0])], "sigmoid")
        elif opcode == B.RESHAPE:
            x = self.input(ins[0])
            if len(self.shape(ins[0])) == 4:
                x = self.node("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1])
            target = [-1, *self.shape(out)[1:]]
            if len(target) == 4:
                raise ConversionError("RESHAPE to 4D is not supported")
            shp = self.const(np.array(target, np.int64), "shape")
            self.names[out] = self.node("Reshape", [x, shp], "reshape")
        elif opcode == B.CONCATENATION:
            opts = self.options(op, tfl.ConcatenationOptions)
            rank = len(self.shape(out))
            axis = opts.Axis() % rank
            if rank == 4:
                axis = {0: 0, 1: 2, 2: 3, 3: 1}[axis]
            y = self.node("Concat", [self.input(i) for i in ins], "concat", axis=axis)
            self.names[out] = self.activation(y, opts.FusedActivationFunction())
        else:
            raise ConversionError(f"TFLite operator {name} is not supported by {CONVERTER_VERSION}")

    def input(self, i: int) -> str:
        if i in self.names:
            return self.names[i]
        arr = self.value(i)
        if arr is None:
            raise ConversionError(f"tensor {self.tensor(i).Name()!r} is used before it is made")
        if arr.ndim == 4:
            arr = arr.transpose(0, 3, 1, 2)
        self.names[i] = self.const(arr.astype(np.float32), "const")
        return self.names[i]

    def conv(self, op, depthwise: bool, ins: list[int], out: int) -> None:
        tfl = self.tfl
        cls = tfl.DepthwiseConv2DOptions if depthwise else tfl.Conv2DOptions
        opts = self.options(op, cls)
        w = self.value(ins[1])
        if w is None:
            raise ConversionError("convolution with non-constant weights")
        w = w.astype(np.float32)
        if depthwise:
            w = w.transpose(3, 0, 1, 2)  # [1, H, W, C*M] -> [C*M, 1, H, W]
            group = self.shape(ins[0])[3]
        else:
            w = w.transpose(0, 3, 1, 2)  # [O, H, W, I] -> [O, I, H, W]
            group = 1
        k = list(w.shape[2:])
        s = [opts.StrideH(), opts.StrideW()]
        d = [opts.DilationHFactor(), opts.DilationWFactor()]
        pads = [0, 0, 0, 0]
        if opts.Padding() == tfl.Padding.SAME:
            pads = self.same_pads(self.shape(ins[0])[1:3], k, s, d)
        inputs = [self.input(ins[0]), self.const(w, "weight")]
        if len(ins) > 2 and ins[2] >= 0:
            bias = self.value(ins[2])
            if bias is None:
                raise ConversionError("convolution with non-constant bias")
            inputs.append(self.const(bias.astype(np.float32), "bias"))
        y = self.node(
            "Conv",
            inputs,
            "dwconv" if depthwise else "conv",
            kernel_shape=k,
            strides=s,
            dilations=d,
            pads=pads,
            group=group,
        )
        self.names[out] = self.activation(y, opts.FusedActivationFunction())


def _prune(onnx, model):
    """Drop nodes and initialisers that no kept output needs (the segmentation decoder)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    inits = [t for t in g.initializer if t.name in needed]
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


def convert_tflite(path: str | Path, outputs: dict[int, str]):
    """Translate the tflite file at ``path`` into an ``onnx.ModelProto``; ``outputs`` maps the
    tflite output indices to keep onto ONNX output names."""
    tfl, onnx = _import_tflite(), _import_onnx()
    data = Path(path).read_bytes()
    return _Converter(tfl, onnx, data, outputs).run()
