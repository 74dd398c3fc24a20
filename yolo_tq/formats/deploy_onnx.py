"""The deployable ONNX: an exported model's weights stored as low-bit codes and decoded inside the graph with
ordinary ONNX operators, so that stock runtimes (onnxruntime, OpenVINO, `ultralytics.YOLO("x.onnx")`) run the
small file as it is, and fold the decoding away when they load it.

What each weight initializer becomes (the name it had is kept as the decoder's output, so every consumer reads the
same tensor as before):

  ternary      a weight whose every output channel holds at most {n_c, 0, p_c} (n_c < 0 < p_c): TTQ layers and
               BitLinear layers, after Ultralytics' Conv+BN fusion (which multiplies each channel by one factor).
               Codes 0 -> 0, 1 -> p_c, 2 -> n_c, base 3, 5 per byte (1.6 bits; formats.codes.pack_trits), and a
               float32 table [C, 2] of (p_c, n_c). Decoded by Cast -> Gather(lut[243, 5]) -> Reshape -> Slice ->
               Reshape [C, K] -> GatherElements(Pad(table) [C, 3], axis 1) -> Reshape. A table lookup returns the
               stored float itself, so the decoded weight equals the fused weight bit for bit.
  grid         a weight whose every output channel is q·step_c for integers q of a 2- or 4-bit grid (LSQ layers,
               fused or not): codes + 2^(B-1), 8/B per byte (formats.codes.pack_bits), and float32 steps [C].
               Decoded by Cast -> Gather(lut[256, 8/B] of the signed codes) -> Reshape -> Slice -> Reshape [C, K] ->
               Mul(steps [C, 1]) -> Reshape; equal to the fused weight up to float rounding, and to FP16 rounding
               when the checkpoint stored its weights in FP16 as Ultralytics does (GRID_MAX_REL_ERROR).
  int8         any other conv weight (rest="int8"): symmetric per output channel (formats.codes.
               quantize_int8_per_channel, FP16 scales), decoded by Cast(int32) -> Cast(float) -> Mul(scale
               [C, 1, 1, 1]). The detour through int32 costs nothing on disk: OpenVINO 2026.4 takes a direct
               Convert(i8) -> Multiply as its own compressed-weight pattern, and its ConvertWeightCompressedConv1x1
               ToMatmul pass then throws on a 1x1 conv fed by a Split (every C3k2 block); through int32 it folds the
               decoder when it compiles, like onnxruntime.
  fp16         (rest="fp16") Cast of a float16 initializer; rest="fp32" leaves them as they are.
  codebook     a large float constant with few distinct values (the Detect head's anchor points and strides):
               uint8 indices into a float32 table, decoded by Cast -> Gather. Exact.

Biases and every small tensor stay float32; `keep_float` names weights that must stay exact (the DFL projection).

Why ordinary operators and not DequantizeLinear with INT2/INT4: docs/method.md ("The deployable ONNX").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..io import CheckpointError
from .codes import GRID_MAX_REL_ERROR, TRITS_PER_BYTE, grid_codes, pack_bits, pack_trits, quantize_int8_per_channel

REST_CHOICES = ("int8", "fp16", "fp32")
META_KEY = "yolo_tq"  # metadata_props key holding the encoding summary (JSON)
MIN_OPSET = 13  # Slice, Pad and GatherElements with tensor inputs
INT8_MAX_REL_ERROR = 0.5 / 127 * (1 + 2**-9)  # half a step; the FP16 scale is rounded up by at most 2^-10
CODEBOOK_MIN_NUMEL, CODEBOOK_MAX_VALUES = 1024, 256
KINDS = ("ternary", "grid", "int8", "fp16", "codebook")
LUT_NAME = "yolo_tq.trit_lut"
DECODER_PREFIX = "q"  # names of the decoder nodes (q1, q2, ...); the model's own nodes have none


class DeployOnnxError(CheckpointError):
    """A graph that cannot be encoded, or an encoded file that does not decode to its source."""


@dataclass(frozen=True)
class Encoded:
    """What one initializer became: kind (KINDS), its shape, bytes before and after, and the code width in bits."""

    name: str
    kind: str
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    bits: float = 32.0


# ---------------------------------------------------------------------------------------------------- pure math
def channel_ternary_table(w: np.ndarray) -> np.ndarray | None:
    """[C, 2] float32 (p_c, n_c) when every output channel of `w` holds only {n_c, 0, p_c} (p_c >= 0 >= n_c; 0
    where a channel has no value of that sign), else None."""
    w2 = np.asarray(w, dtype=np.float32).reshape(w.shape[0], -1)
    if w2.size == 0 or not np.isfinite(w2).all():
        return None
    pos, neg = np.maximum(w2.max(1), 0), np.minimum(w2.min(1), 0)
    ok = (w2 == 0) | (w2 == pos[:, None]) | (w2 == neg[:, None])
    return np.stack([pos, neg], 1).astype(np.float32) if ok.all() else None


def ternary_codes(w: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Flat uint8 codes of `w` against its channel table: 0 -> 0, 1 -> p_c, 2 -> n_c."""
    w2 = np.asarray(w, dtype=np.float32).reshape(w.shape[0], -1)
    codes = np.zeros(w2.shape, np.uint8)
    codes[(w2 > 0) & (w2 == table[:, :1])] = 1
    codes[(w2 < 0) & (w2 == table[:, 1:])] = 2
    return codes.reshape(-1)


def trit_lut() -> np.ndarray:
    """[243, 5] int32: the five base-3 digits of each byte value pack_trits writes (first code least significant)."""
    v = np.arange(3**TRITS_PER_BYTE, dtype=np.int32)[:, None]
    return (v // 3 ** np.arange(TRITS_PER_BYTE, dtype=np.int32)) % 3


def grid_lut(bits: int) -> np.ndarray:
    """[256, 8/bits] float32: the signed codes in each byte value pack_bits writes (first code lowest)."""
    per, v = 8 // bits, np.arange(256, dtype=np.int32)[:, None]
    return ((v >> (bits * np.arange(per, dtype=np.int32))) % 2**bits - 2 ** (bits - 1)).astype(np.float32)


def decode_ternary_np(packed: np.ndarray, table: np.ndarray, shape) -> np.ndarray:
    """What the graph computes from (packed bytes, [C, 2] table): numpy mirror of the decoder, for tests."""
    n = int(np.prod(shape))
    codes = trit_lut()[packed.astype(np.int32)].reshape(-1)[:n].reshape(shape[0], -1)
    full = np.concatenate([np.zeros((table.shape[0], 1), np.float32), table], 1)
    return np.take_along_axis(full, codes.astype(np.int64), 1).reshape(shape)


# ----------------------------------------------------------------------------------------------- graph building
class _Builder:
    """Collects the initializers and nodes that decode the encoded weights (placed before every other node)."""

    def __init__(self):
        self.inits: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._consts: dict[tuple, str] = {}
        self._n = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, values) -> str:
        """A shared int64 constant (shapes, slice bounds, pads)."""
        key = tuple(int(v) for v in values)
        if key not in self._consts:
            self._consts[key] = self.init(f"yolo_tq.i64.{len(self._consts)}", np.array(key, np.int64))
        return self._consts[key]

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        self._n += 1
        out = output or f"{DECODER_PREFIX}{self._n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{DECODER_PREFIX}{self._n}", **attrs))
        return out

    def lut(self) -> str:
        if LUT_NAME not in {t.name for t in self.inits}:
            self.init(LUT_NAME, trit_lut())
        return LUT_NAME

    def ternary(self, name: str, w: np.ndarray, table: np.ndarray) -> None:
        c, n = w.shape[0], w.size
        packed = pack_trits(torch.from_numpy(ternary_codes(w, table))).numpy()
        x = self.node("Cast", [self.init(f"{name}.codes", packed)], to=TensorProto.INT32)
        x = self.node("Gather", [self.lut(), x], axis=0)
        x = self.node("Reshape", [x, self.ints([-1])])
        x = self.node("Slice", [x, self.ints([0]), self.ints([n])])
        x = self.node("Reshape", [x, self.ints([c, n // c])])
        t = self.node("Pad", [self.init(f"{name}.table", table), self.ints([0, 1, 0, 0])], mode="constant")
        x = self.node("GatherElements", [t, x], axis=1)
        self.node("Reshape", [x, self.ints(w.shape)], output=name)

    def grid(self, name: str, w: np.ndarray, codes: np.ndarray, steps: np.ndarray, bits: int) -> None:
        c, n = w.shape[0], w.size
        lut = f"yolo_tq.grid{bits}_lut"
        if lut not in {t.name for t in self.inits}:
            self.init(lut, grid_lut(bits))
        packed = pack_bits(torch.from_numpy(codes), bits).numpy()
        x = self.node("Cast", [self.init(f"{name}.grid{bits}", packed)], to=TensorProto.INT32)
        x = self.node("Gather", [lut, x], axis=0)
        x = self.node("Reshape", [x, self.ints([-1])])
        x = self.node("Slice", [x, self.ints([0]), self.ints([n])])
        x = self.node("Reshape", [x, self.ints([c, n // c])])
        x = self.node("Mul", [x, self.init(f"{name}.steps", steps.astype(np.float32).reshape(c, 1))])
        self.node("Reshape", [x, self.ints(w.shape)], output=name)

    def int8(self, name: str, w: np.ndarray) -> None:
        """Per-channel INT8 with FP16 scales (as the packed file), FP32 scales where FP16 cannot hold one."""
        try:
            q, scale = quantize_int8_per_channel(torch.from_numpy(w.copy()), torch.float16)
        except ValueError:
            q, scale = quantize_int8_per_channel(torch.from_numpy(w.copy()), torch.float32)
        s = self.init(f"{name}.scale", scale.numpy().reshape((-1,) + (1,) * (w.ndim - 1)))
        if scale.dtype == torch.float16:
            s = self.node("Cast", [s], to=TensorProto.FLOAT)
        x = self.node("Cast", [self.init(f"{name}.int8", q.numpy())], to=TensorProto.INT32)  # see module docstring
        x = self.node("Cast", [x], to=TensorProto.FLOAT)
        self.node("Mul", [x, s], output=name)

    def fp16(self, name: str, w: np.ndarray) -> None:
        self.node("Cast", [self.init(f"{name}.fp16", w.astype(np.float16))], output=name, to=TensorProto.FLOAT)

    def codebook(self, name: str, w: np.ndarray, values: np.ndarray) -> None:
        idx = np.searchsorted(values, w).astype(np.uint8)
        x = self.node("Cast", [self.init(f"{name}.index", idx)], to=TensorProto.INT32)
        self.node("Gather", [self.init(f"{name}.values", values.astype(np.float32)), x], output=name, axis=0)


def _codebook_values(a: np.ndarray) -> np.ndarray | None:
    if a.dtype != np.float32 or a.size < CODEBOOK_MIN_NUMEL or not np.isfinite(a).all():
        return None
    values = np.unique(a)
    return values if values.size <= CODEBOOK_MAX_VALUES else None


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def conv_weight_names(model: onnx.ModelProto) -> list[str]:
    """Names of the initializers that are Conv weights, in graph order."""
    inits = {t.name for t in model.graph.initializer}
    return list(dict.fromkeys(n.input[1] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits))


def _encode_one(b: _Builder, name: str, a: np.ndarray, is_conv: bool, rest: str) -> tuple[str, float] | None:
    """Add the decoder of one initializer; returns (its kind, bits per weight), or None if it stays as it is."""
    if is_conv and a.dtype == np.float32 and a.ndim >= 2:
        table = channel_ternary_table(a)
        if table is not None:
            b.ternary(name, a, table)
            return "ternary", 8 / TRITS_PER_BYTE
        grid = grid_codes(torch.from_numpy(a.copy()))
        if grid is not None:
            b.grid(name, a, grid[0].numpy(), grid[1].numpy(), grid[2])
            return "grid", float(grid[2])
        if rest in ("int8", "fp16"):
            getattr(b, rest)(name, a)
            return rest, {"int8": 8.0, "fp16": 16.0}[rest]
        return None
    values = _codebook_values(a)
    if values is not None:
        b.codebook(name, a, values)
        return "codebook", 8.0
    return None


def encode_model(model: onnx.ModelProto, rest: str = "int8", keep_float=(), info: dict | None = None
                 ) -> tuple[onnx.ModelProto, list[Encoded]]:
    """A copy of `model` whose weights are stored as codes (module docstring) and the record of each change.
    `keep_float`: initializer names left as they are; `info` goes into the metadata under META_KEY."""
    if rest not in REST_CHOICES:
        raise DeployOnnxError(f"rest must be one of {', '.join(REST_CHOICES)}, got {rest!r}")
    if read_summary(model) is not None:
        raise DeployOnnxError("this ONNX is already a deployable (encoded) file; encode the plain export instead")
    if _opset(model) < MIN_OPSET:
        raise DeployOnnxError(f"the ONNX graph has opset {_opset(model)}; the low-bit decoder needs >= {MIN_OPSET}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g, b, done = out.graph, _Builder(), []
    convs, keep = set(conv_weight_names(out)), set(keep_float)
    kept = []
    for t in g.initializer:
        a, first = numpy_helper.to_array(t), len(b.inits)
        coded = None if t.name in keep else _encode_one(b, t.name, a, t.name in convs, rest)
        if coded is None:
            kept.append(t)
            continue
        after = sum(x.ByteSize() for x in b.inits[first:] if x.name.startswith(t.name + "."))
        done.append(Encoded(t.name, coded[0], tuple(a.shape), t.ByteSize(), after, coded[1]))
    del g.initializer[:]
    g.initializer.extend(kept + b.inits)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(b.nodes + nodes)
    summary = {"format": "yolo-tq-deploy-onnx", "rest": rest, **encoding_counts(done), **(info or {})}
    _set_meta(out, META_KEY, json.dumps(summary, sort_keys=True))
    return out, done


def _base36(i: int) -> str:
    digits, out = "0123456789abcdefghijklmnopqrstuvwxyz", ""
    while True:
        out, i = digits[i % 36] + out, i // 36
        if not i:
            return out


def short_names(model: onnx.ModelProto) -> None:
    """The written file's last step, after verify_encoding (which finds decoded tensors by their names): every
    tensor but the graph's inputs and outputs, initializers and decoder outputs included, gets a short base-36 name,
    and every node loses its name. Nothing reads them by name; yolo11n stages 1-3 + BitLinear_TTQ at 640: 33 KB."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return
    fixed, rename = {x.name for x in list(g.input) + list(g.output)}, {}

    def short(name: str) -> str:
        if not name or name in fixed:
            return name
        return rename.setdefault(name, _base36(len(rename)))

    for t in g.initializer:
        t.name = short(t.name)
    for n in g.node:
        n.name = ""
        for field in (n.input, n.output):
            names = [short(x) for x in field]
            del field[:]
            field.extend(names)
    del g.value_info[:]


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def encoding_counts(done: list[Encoded]) -> dict:
    """Per kind: how many tensors, and their bytes before and after."""
    out = {}
    for kind in KINDS:
        xs = [e for e in done if e.kind == kind]
        out[kind] = {"tensors": len(xs), "bytes_before": sum(e.bytes_before for e in xs),
                     "bytes_after": sum(e.bytes_after for e in xs)}
    return out


def read_summary(model: onnx.ModelProto) -> dict | None:
    """The encoding summary a deployable ONNX carries (None for any other ONNX)."""
    for p in model.metadata_props:
        if p.key == META_KEY:
            try:
                return json.loads(p.value)
            except ValueError:
                return None
    return None


# ------------------------------------------------------------------------------------------------- verification
def decoded_tensors(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Run only the decoder nodes of an encoded model (onnxruntime, CPU) and return the named decoded tensors."""
    import onnxruntime as ort

    if not names:
        return {}
    wanted = set(names)
    nodes = [n for n in model.graph.node if is_decoder(n)]
    used = {i for n in nodes for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in used]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    g = helper.make_graph(nodes, "yolo_tq_decoders", [], outs, inits)
    m = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the decoders, not their folds
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(names, {})
    missing = wanted - set(names)
    if missing:
        raise DeployOnnxError(f"no decoder for {sorted(missing)[0]}")
    return dict(zip(names, got))


def is_decoder(node: onnx.NodeProto) -> bool:
    return node.name.startswith(DECODER_PREFIX) and node.name[len(DECODER_PREFIX):].isdigit()


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (0 for two zero tensors)."""
    scale = float(np.abs(b).max()) if b.size else 0.0
    err = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if b.size else 0.0
    return err / scale if scale > 0 else err


def verify_encoding(source: onnx.ModelProto, encoded: onnx.ModelProto, done: list[Encoded]) -> dict:
    """Decode every encoded tensor in onnxruntime and compare it with the source's: the largest relative error per
    kind. Ternary and codebook tensors must come back exactly, grid ones within float rounding, INT8 within half a
    step of its channel."""
    src = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    got = decoded_tensors(encoded, [e.name for e in done])
    worst: dict[str, float] = {}
    for e in done:
        err = rel_error(got[e.name], src[e.name])
        worst[e.kind] = max(worst.get(e.kind, 0.0), err)
        if e.kind in ("ternary", "codebook") and not np.array_equal(got[e.name], src[e.name]):
            raise DeployOnnxError(f"{e.name}: the decoded {e.kind} tensor differs from the source (rel {err:.3g})")
        limit = {"int8": INT8_MAX_REL_ERROR, "grid": GRID_MAX_REL_ERROR}.get(e.kind)
        if limit is not None and err > limit:
            raise DeployOnnxError(f"{e.name}: {e.kind} decoding error {err:.3g} exceeds {limit:.3g}")
    return {f"max_rel_error_{k}": v for k, v in sorted(worst.items())}


def records(done: list[Encoded]) -> list[dict]:
    return [asdict(e) for e in done]
