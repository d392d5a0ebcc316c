"""int8 matrix products whose answer depends on one title only.

onnxruntime's dynamic quantization picks one activation scale for a whole call, so a title's
probabilities moved with the titles it was scored beside. Here every row (title) gets its own
scale, computed inside the graph from that row alone, and the products are exact integer
arithmetic, so a title's output is the same in any batch, at any padding length, with any
number of threads:

- activations, per row: ``scale = max(|x|) / 127``, ``q = round(x / scale)``; stored in uint8
  as ``q + 128`` where the input can be negative, as ``q`` after a ReLU;
- weights, per output column, symmetric: 7 bits (``|q| <= 63``) where the stored input
  reaches 255, 8 bits (``|q| <= 127``) after a ReLU. Either way a pair of uint8 x int8
  products stays inside int16 (255 * 63 * 2 and 127 * 127 * 2 < 32,768), so CPUs without
  VNNI (whose AVX2 kernel adds pairs in int16 with saturation) compute the same integers as
  those with it. (The last layer, after a ReLU, is where the eighth bit matters most.)
- ``y = float(q_x @ q_w) * w_scale * x_scale + bias``, in that order, in float32.

`Int8Linear` is the torch twin of that arithmetic: `int8_twin` swaps it in for every
``nn.Linear`` of a scoring module, and `int8_graph` rewrites the exported float graph's
``Gemm`` nodes (matched by weight name) with the same integers and scales, so that the
parity check can hold the int8 graph to the same 1e-5 as a float one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from meli.export.compaction import CompactMLP

X_QMAX = 127  # activations: |q| <= 127
W_QMAX = {False: 63, True: 127}  # weights, by whether the input is unsigned (after a ReLU): see above
EPS = 1e-30  # an all-zero row (an empty title) gets this as its largest value: scale > 0, q = 0
MATMULS = "int8-row"  # the model card's name for this arithmetic ("int8" was the dynamic kind)


@dataclass(frozen=True)
class Int8Weights:
    """One ``nn.Linear``'s weights as the int8 graph stores them."""

    weight: np.ndarray  # (in, out) int8, |q| <= W_QMAX[...]
    scale: np.ndarray  # (out,) float32
    bias: np.ndarray  # (out,) float32

    @classmethod
    def of(cls, linear: nn.Linear, qmax: int) -> "Int8Weights":
        w = linear.weight.detach().to(torch.float32).cpu().numpy()  # (out, in)
        amax = np.maximum(np.abs(w).max(axis=1), np.float32(EPS)).astype(np.float32)
        scale = (amax / np.float32(qmax)).astype(np.float32)
        q = np.clip(np.rint(w / scale[:, None]), -qmax, qmax).astype(np.int8)
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(w.shape[0])
        return cls(np.ascontiguousarray(q.T), scale, bias.to(torch.float32).cpu().numpy())


class Int8Linear(nn.Module):
    """The int8 graph's arithmetic in torch: ``(B, in)`` float32 → ``(B, out)`` float32."""

    def __init__(self, weights: Int8Weights, unsigned_input: bool):
        super().__init__()
        self.unsigned_input = unsigned_input  # after a ReLU: x >= 0, q in [0, 127]; else [-127, 127]
        self.register_buffer("weight", torch.from_numpy(weights.weight.astype(np.float64)))  # exact as float64
        self.register_buffer("scale", torch.from_numpy(weights.scale))
        self.register_buffer("bias", torch.from_numpy(weights.bias))
        self.weights = weights

    qmax = float(X_QMAX)

    @property
    def x_zero(self) -> int:
        """The uint8 that stands for 0: q + x_zero is what the graph stores."""
        return 0 if self.unsigned_input else X_QMAX + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = x.amax(dim=1, keepdim=True) if self.unsigned_input else x.abs().amax(dim=1, keepdim=True)
        x_scale = top.clamp(min=EPS) / self.qmax  # (B, 1)
        low = 0.0 if self.unsigned_input else -self.qmax
        q = torch.round(x / x_scale).clamp(low, self.qmax)  # (B, in), whole numbers
        acc = (q.to(torch.float64) @ self.weight).to(torch.float32)  # exact integers, then int32 -> float32
        return acc * self.scale * x_scale + self.bias


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear, bool]]:
    """Every ``nn.Linear`` of `module` with its name and whether its input comes out of a ReLU
    (the layer before it in its ``nn.Sequential``, dropout aside)."""
    found = []
    for seq_name, seq in module.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        previous = None
        for i, layer in enumerate(seq):
            if isinstance(layer, nn.Linear):
                found.append((f"{seq_name}.{i}" if seq_name else str(i), layer, isinstance(previous, nn.ReLU)))
            if not isinstance(layer, nn.Dropout):
                previous = layer
    return found


def fold_temperature(module: nn.Module) -> nn.Module:
    """A copy of a one-model `CompactMLP` with its temperature divided into the last layer's
    weights and bias (one pass over the scores less in the graph). Ensembles, whose
    temperature divides a log mean probability, are returned as they are."""
    if not isinstance(module, CompactMLP) or len(module.heads) != 1 or module.temperature == 1.0:
        return module
    folded = copy.deepcopy(module)
    last = folded.heads[0][-1]
    if not isinstance(last, nn.Linear):
        return module
    with torch.no_grad():
        last.weight.div_(module.temperature)
        last.bias.div_(module.temperature)
    folded.temperature = 1.0
    return folded


def int8_twin(module: nn.Module) -> nn.Module:
    """A copy of `module` whose every ``nn.Linear`` computes as the int8 graph does."""
    twin = copy.deepcopy(module)
    for name, linear, unsigned in _linears(twin):
        parent_name, _, index = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else twin
        parent[int(index)] = Int8Linear(Int8Weights.of(linear, W_QMAX[unsigned]), unsigned)
    return twin.eval()


def int8_graph(proto: onnx.ModelProto, twin: nn.Module) -> onnx.ModelProto:
    """`proto` (exported from the float module `twin` was made from) with each ``Gemm`` over a
    weight of `twin`'s `Int8Linear`s replaced by that layer's int8 arithmetic. Every layer must
    be found: a float product left behind would be an error, not a slower graph."""
    layers = {f"{name}.weight": m for name, m in twin.named_modules() if isinstance(m, Int8Linear)}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    initializers = {i.name for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    replaced: set[str] = set()

    def const(name: str, value: np.ndarray) -> str:
        added.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    one = const("int8.one", np.array(1.0, np.float32))
    eps = const("int8.eps", np.array(EPS, np.float32))
    axis1 = const("int8.axis1", np.array([1], np.int64))
    flat = const("int8.flat", np.array([-1], np.int64))
    for node in graph.node:
        layer = layers.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if layer is None:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) != 0 or attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("beta", 1.0) != 1.0 or node.input[1] not in initializers:
            raise ValueError(f"Gemm {node.name or node.output[0]}: not the x @ W.T + b of an nn.Linear")
        x, y, p = node.input[0], node.output[0], f"int8.{node.input[1].removesuffix('.weight')}"
        w = layer.weights
        const(f"{p}.w", w.weight)
        const(f"{p}.w_scale", w.scale)
        const(f"{p}.w_zero", np.zeros(w.scale.shape, np.int8))
        const(f"{p}.bias", w.bias)
        const(f"{p}.qmax", np.array(layer.qmax, np.float32))
        if layer.unsigned_input:
            nodes.append(helper.make_node("ReduceMax", [x, axis1], [f"{p}.top"], keepdims=1))
        else:
            nodes.append(helper.make_node("Abs", [x], [f"{p}.abs"]))
            nodes.append(helper.make_node("ReduceMax", [f"{p}.abs", axis1], [f"{p}.top"], keepdims=1))
        nodes += [
            helper.make_node("Max", [f"{p}.top", eps], [f"{p}.top_eps"]),
            helper.make_node("Div", [f"{p}.top_eps", f"{p}.qmax"], [f"{p}.x_scale"]),  # (B, 1)
            helper.make_node("Reshape", [f"{p}.x_scale", flat], [f"{p}.x_scale_row"]),  # (B,)
        ]
        quantize_inputs = [x, f"{p}.x_scale_row"]
        if not layer.unsigned_input:  # q + 128 in uint8: QuantizeLinear takes the zero point per row
            nodes += [
                helper.make_node("Shape", [f"{p}.x_scale_row"], [f"{p}.rows"]),
                helper.make_node("ConstantOfShape", [f"{p}.rows"], [f"{p}.x_zero"],
                                 value=numpy_helper.from_array(np.array([layer.x_zero], np.uint8))),
            ]
            quantize_inputs.append(f"{p}.x_zero")
        zero = const(f"{p}.x_zero_scalar", np.array(layer.x_zero, np.uint8))
        nodes += [
            # round(x / scale) (+ the zero point), saturated to uint8: per row (axis 0)
            helper.make_node("QuantizeLinear", quantize_inputs, [f"{p}.xq"], axis=0),
            # float(q_x @ q_w) * w_scale, fused by onnxruntime
            helper.make_node("MatMulIntegerToFloat", [f"{p}.xq", f"{p}.w", one, f"{p}.w_scale", zero, f"{p}.w_zero"],
                             [f"{p}.u"], domain="com.microsoft"),
            helper.make_node("Mul", [f"{p}.u", f"{p}.x_scale"], [f"{p}.v"]),
            helper.make_node("Add", [f"{p}.v", f"{p}.bias"], [y]),
        ]
        replaced.update(node.input[1:])  # the float weight and bias: the layer's own copies replace them
    missing = sorted(set(layers) - {name for name in replaced if name in layers})
    if missing:
        raise ValueError(f"the exported graph has no Gemm over {', '.join(missing)}")
    del graph.node[:]
    graph.node.extend(nodes)
    still_read = {name for node in nodes for name in node.input}
    kept = [i for i in graph.initializer if i.name not in replaced or i.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    del graph.value_info[:]  # the float graph's intermediate shapes no longer all hold
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out
