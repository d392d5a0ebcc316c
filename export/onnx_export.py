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
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from meli.export.compaction import Precision, compact_mlp, compactable, drop_unused_rows
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


def scoring_module(ckpt: Checkpoint, precision: Precision = "fp16") -> tuple[nn.Module, str, str]:
    """The torch module that the ONNX graph is exported from, the id encoding it reads and
    its table precision. The parity check runs this same module against onnxruntime."""
    model = ckpt.build_model()
    if compactable(model):
        module, stats = compact_mlp(model, ckpt.tokenizer(), precision, ckpt.temperature)
        log.info("%s", stats.summary())
        return module, "compact", precision
    log.info("%s", drop_unused_rows(model).summary())
    return Calibrated(model, ckpt.temperature).eval(), "full", "fp32"


def to_onnx(ckpt: Checkpoint, extra_provenance: dict | None = None, precision: Precision = "fp16",
            quantize: bool = False) -> onnx.ModelProto:
    """Export `ckpt` with dynamic batch and sequence axes, card attached, fully checked.

    `quantize`: int8 matrix products (`quantize_matmuls`; `meli-export` turns it on unless
    ``--no-quantize``), a little agreement with the checkpoint traded for speed; the parity
    check measures what it costs."""
    model, encoding, precision = scoring_module(ckpt, precision)
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
    if quantize:
        proto = quantize_matmuls(proto)
    card = model_card(ckpt, extra_provenance, encoding, precision, "int8" if quantize else "fp32")
    for key, value in card.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "meli-categorizer product-title classifier"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def quantize_matmuls(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's dynamic quantization of the MatMul/Gemm nodes: int8 weights, and each
    call's activations quantized with one scale per tensor (so a title's probabilities can
    move by a rounding step with the rows it is scored beside). 1.4x the default MLP graph's
    speed on 2 CPU cores, 1.3-1.6x meli-score's end to end; measured cost in the README."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    clean = onnx.ModelProto()
    clean.CopyFrom(proto)
    del clean.graph.value_info[:]  # the exporter's intermediate shapes trip the quantizer's shape inference
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        onnx.save(clean, str(src))
        logging.disable(logging.WARNING)  # the quantizer's advice to pre-process is for image models
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(str(dst))


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
