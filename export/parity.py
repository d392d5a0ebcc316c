"""Parity: torch (eager, fp32) and onnxruntime must agree on real titles.

Both sides get the same token ids, in batches padded to each batch's longest title, so the
batches mix sequence lengths. The check passes when the largest absolute difference of any
probability is within `atol` (1e-5, Hugging Face Optimum's norm for exported models) and the
top-1 category is the same on every row. Every figure is reported before the verdict.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from meli.checkpoint import Checkpoint
from meli.errors import MeliError
from meli.onnx_model import OnnxModel

ATOL = 1e-5


class ParityError(MeliError):
    """torch and onnxruntime disagree beyond the tolerance."""


@dataclass(frozen=True)
class ParityReport:
    rows: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    top1_mismatches: int
    atol: float
    providers: list[str]
    batch_size: int
    min_length: int
    max_length: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.top1_mismatches == 0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)

    def summary(self) -> str:
        return (
            f"parity on {self.rows} titles (lengths {self.min_length}..{self.max_length}, {', '.join(self.providers)}): "
            f"max |diff| {self.max_abs_diff:.2e} (atol {self.atol:.0e}), mean {self.mean_abs_diff:.2e}, "
            f"top-1 agreement {self.top1_agreement:.4%} ({self.top1_mismatches} mismatches)"
        )


def check_parity(
    ckpt: Checkpoint, onnx_model: OnnxModel, titles: pa.Array, *, atol: float = ATOL, batch_size: int = 256
) -> ParityReport:
    if len(titles) == 0:
        raise MeliError("parity check needs at least one title")
    model = ckpt.build_model()
    tokenizer = ckpt.tokenizer()
    max_diff, sum_diff, n_values, mismatches = 0.0, 0.0, 0, 0
    lengths = []
    torch.set_grad_enabled(False)
    try:
        for start in range(0, len(titles), batch_size):
            enc = tokenizer.encode_batch(titles.slice(start, batch_size))
            lengths.append(enc.lengths)
            expected = torch.softmax(model(torch.from_numpy(enc.ids)), dim=-1).numpy()
            got = onnx_model.predict(enc.ids)
            diff = np.abs(expected.astype(np.float64) - got.astype(np.float64))
            max_diff = max(max_diff, float(diff.max()))
            sum_diff += float(diff.sum())
            n_values += diff.size
            mismatches += int((expected.argmax(1) != got.argmax(1)).sum())
    finally:
        torch.set_grad_enabled(True)
    all_lengths = np.concatenate(lengths)
    rows = len(titles)
    return ParityReport(
        rows=rows,
        max_abs_diff=max_diff,
        mean_abs_diff=sum_diff / n_values,
        top1_agreement=1.0 - mismatches / rows,
        top1_mismatches=mismatches,
        atol=atol,
        providers=[onnx_model.provider],
        batch_size=batch_size,
        min_length=int(all_lengths.min()),
        max_length=int(all_lengths.max()),
    )


def require_parity(report: ParityReport) -> None:
    if not report.passed:
        raise ParityError(f"parity check failed: {report.summary()}; no model.onnx was written")
