"""Checkpoint → one self-sufficient ONNX file (graph + weights + model card), checked.

The graph: ``token_ids`` int64 ``[batch, sequence]`` (both axes dynamic) → softmax
``probabilities`` float32 ``[batch, n_labels]``. Weights are embedded (no ``.onnx.data``
side file) and the card (tokenizer, vocabulary, labels, provenance, and which id encoding
the graph reads) goes in ``metadata_props``. A mean-pooling MLP is exported as its scoring
model over *compact* ids (`meli.export.compaction`: fused rows for words and head words, unused
rows dropped, a float16 table by default); other models read the full ids, with unused rows
dropped. Any sequence length from 1 up runs; titles longer than the tokenizer's
``max_length`` are truncated by the tokenizer before they reach the graph, so the graph
never sees a length it was not built for.
"""

from __future__ import annotations

import datetime as dt
import logging
import warnings
from typing import Literal

import onnx
import torch
from torch import nn

from meli.export.compaction import Precision, compact_mlp, compactable, drop_unused_rows
from meli.export.quantize import MATMULS, fold_temperature, int8_graph, int8_twin
from meli import __version__
from meli.checkpoint import Checkpoint
from meli.models import Calibrated
from meli.onnx_model import INPUT_NAME, OUTPUT_NAME, ModelCard

log = logging.getLogger(__name__)

OPSET = 20


def model_card(ckpt: Checkpoint, extra_provenance: dict | None = None, encoding: str = "full", precision: str = "fp32",
               matmuls: str = "fp32") -> ModelCard:
    import onnxruntime

    provenance = {
        **ckpt.provenance,
        "metrics": ckpt.metrics,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "export_versions": {
            "meli": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        **(extra_provenance or {}),
    }
    return ModelCard(spec=ckpt.spec, provenance=provenance, encoding=encoding, precision=precision, matmuls=matmuls)


Matmuls = Literal["fp32", "int8-row"]


def scoring_module(ckpt: Checkpoint, precision: Precision = "fp16", matmuls: Matmuls = "fp32") -> tuple[nn.Module, str, str]:
    """The torch module that computes what the ONNX graph computes, the id encoding it reads
    and its table precision. The parity check runs this same module against onnxruntime: for
    int8 matrix products it is the twin that does the graph's integer arithmetic
    (`meli.export.quantize`), with the temperature folded into the last layer as the graph has it."""
    model = ckpt.build_model()
    if compactable(model):
        module, stats = compact_mlp(model, ckpt.tokenizer(), precision, ckpt.temperature)
        log.info("%s", stats.summary())
        encoding = "compact"
    else:
        log.info("%s", drop_unused_rows(model).summary())
        module, encoding, precision = Calibrated(model, ckpt.temperature).eval(), "full", "fp32"
    if matmuls == MATMULS:
        module = int8_twin(fold_temperature(module))
    elif matmuls != "fp32":
        raise ValueError(f"unknown matrix products {matmuls!r}; expected fp32 or {MATMULS}")
    return module, encoding, precision


def to_onnx(ckpt: Checkpoint, extra_provenance: dict | None = None, precision: Precision = "fp16",
            quantize: bool = False) -> onnx.ModelProto:
    """Export `ckpt` with dynamic batch and sequence axes, card attached, fully checked.

    `quantize`: int8 matrix products with a scale per title (`meli.export.quantize`;
    `meli-export` turns it on unless ``--no-quantize``): faster on CPUs, as deterministic as
    float ones; the parity check measures what they cost against the checkpoint. Only for
    models that read compact ids (mean-pooling MLPs) with the float16 table: its sums are
    exact in any order (`meli.export.compaction.on_grid`), so every input of a product is the
    same bit for bit in any batch, in torch as in onnxruntime, and per-title rounding cannot
    land on the other side of a step. A float32 table's sums, and a CNN's convolutions, round
    differently with the batch's shape: those keep float products, whose differences stay at
    float rounding (within parity's 1e-5 bound)."""
    model, encoding, precision = scoring_module(ckpt, precision)
    twin = None
    if quantize and encoding == "compact" and precision == "fp16":
        model = fold_temperature(model)
        twin = int8_twin(model)
    elif quantize:
        log.info("int8 matrix products are for mean-pooling MLPs with a float16 table; this %s keeps float products",
                 ckpt.model_kind if encoding != "compact" else "float32 table")
    # an example with batch > 1 and a length that no axis could be mistaken for a constant
    example = torch.randint(2, ckpt.model_config.n_ids, (3, 7), dtype=torch.int64)
    dims = {INPUT_NAME: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    exporter_log = logging.getLogger("torch.onnx")  # warns about torchvision ops we never use
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dims,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    if twin is not None:
        proto = int8_graph(proto, twin)
    card = model_card(ckpt, extra_provenance, encoding, precision, MATMULS if twin is not None else "fp32")
    for key, value in card.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "meli-categorizer product-title classifier"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def signature(proto: onnx.ModelProto) -> dict:
    """The graph's inputs and outputs, with dynamic axes by name, as JSON-ready data."""

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output), "opset": OPSET}
