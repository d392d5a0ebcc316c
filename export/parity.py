"""Parity: the exported file must compute what torch computes, on real titles.

Two comparisons, every figure reported before the verdict:

- **graph**: the torch module that computes what the graph computes
  (`meli.export.onnx_export.scoring_module`: for int8 matrix products, the twin that does the
  graph's integer arithmetic, `meli.export.quantize`) against onnxruntime, on the same token
  ids (the encoding the graph reads), in batches padded to each batch's longest title so that
  lengths mix. Passes when the largest absolute difference of any probability is within
  `atol` (1e-5, Hugging Face Optimum's norm for exported models) and the top-1 category is the
  same on every row. Every kind of graph `meli-export` writes is held to this.
- **checkpoint**: the trained model on its full ids against onnxruntime on the graph's ids.
  A float32 table with float products computes the same sums, so there too `atol` holds. A
  float16 table rounds every row and int8 products round every activation: there the top-1
  category must agree on at least `MIN_ROUNDED_AGREEMENT` (`MIN_QUANTIZED_AGREEMENT`) of the
  titles and no probability may move by more than `MAX_ROUNDED_DIFF[...]` (a graph that lost
  its temperature, or whose rounding went wrong, fails here).

A model file from before per-title scales (``matmuls = "int8"``, onnxruntime's dynamic
quantization) has no twin: its graph comparison is reported only, and the checkpoint bounds
decide.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from meli.checkpoint import Checkpoint
from meli.errors import MeliError
from meli.onnx_model import OnnxModel

ATOL = 1e-5
MIN_ROUNDED_AGREEMENT = 0.999  # a float16 table
MIN_QUANTIZED_AGREEMENT = 0.98  # int8 products: held to their twin at ATOL; rounding may flip a weak model's near-ties
# the largest change of a probability against the trained checkpoint that rounding may make
MAX_ROUNDED_DIFF = {"fp16": 5e-3, "int8-row": 0.05, "int8": 0.1}
LEGACY_DYNAMIC = "int8"  # onnxruntime's dynamic quantization: no twin, not deterministic


class ParityError(MeliError):
    """torch and onnxruntime disagree beyond the tolerance."""


@dataclass(frozen=True)
class ParityReport:
    rows: int
    max_abs_diff: float  # graph: exported torch module vs onnxruntime
    mean_abs_diff: float
    top1_agreement: float
    top1_mismatches: int
    checkpoint_max_abs_diff: float  # trained model (full ids) vs onnxruntime
    checkpoint_top1_agreement: float
    precision: str
    matmuls: str
    atol: float
    providers: list[str]
    batch_size: int
    min_length: int
    max_length: int
    source: str = ""  # the file the titles came from

    @property
    def exact(self) -> bool:
        """A float32 table and float products: the checkpoint's own sums."""
        return self.precision == "fp32" and self.matmuls == "fp32"

    @property
    def checkpoint_bound(self) -> float:
        """The largest |difference| of a probability allowed against the checkpoint."""
        if self.exact:
            return self.atol
        return MAX_ROUNDED_DIFF["fp16" if self.matmuls == "fp32" else self.matmuls]

    @property
    def min_checkpoint_agreement(self) -> float:
        if self.exact:
            return 1.0
        return MIN_ROUNDED_AGREEMENT if self.matmuls == "fp32" else MIN_QUANTIZED_AGREEMENT

    @property
    def passed(self) -> bool:
        graph = self.max_abs_diff <= self.atol and self.top1_mismatches == 0
        checkpoint = (self.checkpoint_max_abs_diff <= self.checkpoint_bound
                      and self.checkpoint_top1_agreement >= self.min_checkpoint_agreement)
        return (graph or self.matmuls == LEGACY_DYNAMIC) and checkpoint

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)

    def summary(self) -> str:
        return (
            f"parity on {self.rows:,} titles{' of ' + self.source if self.source else ''} "
            f"(lengths {self.min_length}..{self.max_length}, {', '.join(self.providers)}): "
            f"max |diff| {self.max_abs_diff:.2e} (atol {self.atol:.0e}), mean {self.mean_abs_diff:.2e}, "
            f"top-1 agreement {self.top1_agreement:.4%} ({self.top1_mismatches} mismatches); "
            f"against the trained checkpoint ({self.precision} table, {self.matmuls} matrix products): "
            f"max |diff| {self.checkpoint_max_abs_diff:.2e} (bound {self.checkpoint_bound:.0e}), "
            f"top-1 agreement {self.checkpoint_top1_agreement:.4%} (at least {self.min_checkpoint_agreement:.1%})"
        )


def check_parity(
    ckpt: Checkpoint, onnx_model: OnnxModel, titles: pa.Array, *, atol: float = ATOL, batch_size: int = 256,
    source: str | os.PathLike = "",
) -> ParityReport:
    from meli.export.onnx_export import scoring_module

    if len(titles) == 0:
        raise MeliError("parity check needs at least one title")
    trained = ckpt.probability_model()  # the trained weights, calibrated like the graph
    card = onnx_model.card
    graph, _, _ = scoring_module(ckpt, card.precision, "fp32" if card.matmuls == LEGACY_DYNAMIC else card.matmuls)
    tokenizer = ckpt.tokenizer()
    max_diff, sum_diff, n_values, mismatches = 0.0, 0.0, 0, 0
    ckpt_diff, ckpt_mismatches = 0.0, 0
    lengths = []
    with torch.no_grad():
        for start in range(0, len(titles), batch_size):
            batch = titles.slice(start, batch_size)
            full = tokenizer.encode_batch(batch)
            enc = tokenizer.encode_batch(batch, compact=True) if card.compact else full
            lengths.append(enc.lengths)
            ids = np.ascontiguousarray(enc.ids)
            expected = graph(torch.from_numpy(ids)).numpy()
            reference = trained(torch.from_numpy(np.ascontiguousarray(full.ids))).numpy()
            got = onnx_model.predict(ids)
            diff = np.abs(expected.astype(np.float64) - got.astype(np.float64))
            max_diff = max(max_diff, float(diff.max()))
            sum_diff += float(diff.sum())
            n_values += diff.size
            mismatches += int((expected.argmax(1) != got.argmax(1)).sum())
            ckpt_diff = max(ckpt_diff, float(np.abs(reference.astype(np.float64) - got).max()))
            ckpt_mismatches += int((reference.argmax(1) != got.argmax(1)).sum())
    all_lengths = np.concatenate(lengths)
    rows = len(titles)
    return ParityReport(
        rows=rows,
        max_abs_diff=max_diff,
        mean_abs_diff=sum_diff / n_values,
        top1_agreement=1.0 - mismatches / rows,
        top1_mismatches=mismatches,
        checkpoint_max_abs_diff=ckpt_diff,
        checkpoint_top1_agreement=1.0 - ckpt_mismatches / rows,
        precision=card.precision,
        matmuls=card.matmuls,
        atol=atol,
        providers=[onnx_model.provider],
        batch_size=batch_size,
        min_length=int(all_lengths.min()),
        max_length=int(all_lengths.max()),
        source=str(source),
    )


def require_parity(report: ParityReport) -> None:
    if not report.passed:
        raise ParityError(f"parity check failed: {report.summary()}; no model.onnx was written")
