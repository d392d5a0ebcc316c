"""The trained MLP → the scoring model: one small table over compact ids, then the heads.

A mean-pooling MLP computes ``sum of the rows of a title's ids / how many ids`` and then its
hidden layers. Both the sum and the count are additive, so any group of ids that always
comes together can be stored as one row holding the group's sum, with the group's size as
its count. The compact encoding (`meli.tokenizer.Tokenizer`) uses that for the two groups
that make up most ids: a known word together with all its character n-grams (one *fused*
row instead of one per n-gram), and a known head token written ``head_repeat`` times (one row). A title
then reaches the graph as a few ids instead of all of them, and the graph computes what the
trained model computes on the full ids.

The table keeps only the rows a title can reach: rows training never touched (zero, most
hash buckets) share one zero row that still counts 1, and padding is a zero row that counts
0. It is stored as float16 on a fixed grid (``precision = "fp16"``, the default: half the
bytes, the fastest to read in onnxruntime of the formats tried, and sums that are exact in any
order, see `on_grid`; the rounding's effect on probabilities is measured and reported by the
parity check) or as float32 (``"fp32"``: the checkpoint's outputs to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meli.models import CNN, MLP, Ensemble
from meli.tokenizer import PAD, Tokenizer

Precision = Literal["fp16", "fp32"]
PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class CompactionStats:
    ids_before: int  # rows of the trained table (full id space)
    rows_after: int  # rows of the scoring table
    fused_rows: int
    precision: str

    def summary(self) -> str:
        return (f"scoring table: {self.rows_after:,} rows ({self.fused_rows:,} fused words and head words) "
                f"for {self.ids_before:,} trained rows, stored {self.precision}")


class PooledTable(nn.Module):
    """Compact ids → the mean of the rows they stand for: ``(B, T)`` int64 → ``(B, width)``.

    Each row carries, in one more column, how many ids it stands for, so one lookup and one
    sum give both the sum of the rows and the count to divide it by. Lookups are
    `F.embedding`, which exports as ONNX ``Gather`` (on int32 row numbers: no cast)."""

    def __init__(self, remap: torch.Tensor, table: torch.Tensor, count: torch.Tensor):
        super().__init__()
        self.register_buffer("remap", remap.to(torch.int32).unsqueeze(1))  # (n_compact_ids, 1): id → row
        # (R, width + 1) float16 or float32: the rows, then their counts (whole numbers, exact in float16)
        self.register_buffer("table", torch.cat([table, count.to(table.dtype).unsqueeze(1)], dim=1))

    @property
    def width(self) -> int:
        return self.table.shape[1] - 1

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(token_ids, self.remap).squeeze(-1)  # (B, T) int32
        summed = F.embedding(rows, self.table).to(torch.float32).sum(1)  # (B, width + 1)
        n = summed[:, -1:].clamp(min=1.0)  # (B, 1); an empty title → 1, never NaN
        return summed[:, :-1] / n


class CompactMLP(nn.Module):
    """`PooledTable` + each member's head; the mean of the members' probabilities, calibrated
    as `meli.models.Calibrated` does it: ``softmax(scores / temperature)``, the scores being
    one model's logits or an ensemble's log mean probability."""

    def __init__(self, pooled: PooledTable, heads: list[nn.Module], width: int, temperature: float = 1.0):
        super().__init__()
        self.pooled = pooled
        self.heads = nn.ModuleList(heads)
        self.width = width  # embedding width of one member
        self.temperature = float(temperature)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        x = self.pooled(token_ids)  # (B, members * width)
        logits = [h(x[:, i * self.width : (i + 1) * self.width]) for i, h in enumerate(self.heads)]
        if len(logits) == 1:
            scores = logits[0]
        else:
            mean = torch.stack([torch.softmax(z, dim=-1) for z in logits]).mean(0).clamp(min=1e-30)
            # onnxruntime takes the log of a whole tensor in vector chunks with a scalar tail, whose
            # results differ in the last bit: rows padded to a multiple of 16 values start every
            # row's chunks at the same place, so a row's log is the same in any batch
            pad = (-mean.shape[-1]) % LOG_ALIGN
            scores = torch.log(F.pad(mean, (0, pad), value=1.0))[:, : mean.shape[-1]] if pad else torch.log(mean)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        return torch.softmax(scores, dim=-1)  # (B, n_labels)


GRID = 2.0 ** -14  # every float16 table value is a whole multiple of this
LOG_ALIGN = 16  # floats: the widest vector chunk (AVX-512) an element-wise log works in


def on_grid(table: torch.Tensor) -> torch.Tensor:
    """`table` as float16 whose every value is a whole multiple of `GRID`: float16 values of
    magnitude 2**-4 and up already are; smaller ones are rounded to the grid (by at most
    2**-15). Sums of such values are exact in float32 while they stay below 2**24 * GRID =
    1,024 in magnitude, so a title's pooled sum is the same
    bit for bit in any order of addition: in any batch, at any padding, in torch or in
    onnxruntime, whose reduction order changes with the batch's shape. That is what lets the
    int8 products' per-title rounding see the same inputs every time."""
    half = table.to(torch.float16)
    small = half.abs() < 2.0 ** -4
    snapped = torch.round(half.to(torch.float64) / GRID) * GRID
    return torch.where(small, snapped.to(torch.float16), half)


def compactable(model: nn.Module) -> bool:
    """Mean-pooling MLPs (and ensembles of them) can read compact ids; CNNs and attention cannot."""
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    return all(isinstance(m, MLP) and m.config.pooling == "mean" for m in members)


def fused_groups(tokenizer: Tokenizer) -> tuple[list[int], list[list[int]]]:
    """For each vocabulary token that has a fused id: (fused id, the full ids it stands for)."""
    ptr, ids = tokenizer.fused_groups()
    fused, groups = [], []
    for i in range(len(ptr) - 1):
        if ptr[i + 1] > ptr[i]:
            fused.append(tokenizer.fused_offset + i)
            groups.append(ids[ptr[i] : ptr[i + 1]].tolist())
    return fused, groups


def compact_mlp(model: nn.Module, tokenizer: Tokenizer, precision: Precision = "fp16",
                temperature: float = 1.0) -> tuple[CompactMLP, CompactionStats]:
    """The scoring model of a trained mean-pooling MLP (or ensemble of them)."""
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    weight = torch.cat([m.embedding.weight.detach().to(torch.float64) for m in members], dim=1)  # (n_ids, M*E)
    n_ids = weight.shape[0]
    if n_ids != tokenizer.n_ids:
        raise ValueError(f"embedding has {n_ids} rows, the tokenizer {tokenizer.n_ids} ids")
    fused_ids, groups = fused_groups(tokenizer)
    flat = torch.tensor([i for g in groups for i in g], dtype=torch.int64)
    offsets = torch.tensor(np.cumsum([0] + [len(g) for g in groups[:-1]]), dtype=torch.int64)
    fused_rows = F.embedding_bag(flat, weight, offsets, mode="sum") if groups else weight[:0]
    fused_count = torch.tensor([len(g) for g in groups], dtype=torch.float64)

    used = weight.ne(0).any(dim=1)
    used[PAD] = False
    used_ids = torch.nonzero(used).squeeze(1)
    # rows: 0 = padding (counts 0), 1 = an id training never touched (zeros, counts 1), the raw
    # rows in use, then the fused rows
    zero = torch.zeros(1, weight.shape[1], dtype=torch.float64)
    table = torch.cat([zero, zero, weight[used_ids], fused_rows])
    count = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), torch.ones(len(used_ids), dtype=torch.float64), fused_count])
    remap = torch.ones(tokenizer.n_compact_ids, dtype=torch.int64)  # by default: the zero row counting 1
    remap[PAD] = 0
    remap[used_ids] = torch.arange(2, 2 + len(used_ids))
    remap[torch.tensor(fused_ids, dtype=torch.int64)] = torch.arange(2 + len(used_ids), len(table))
    if precision not in PRECISIONS:
        raise ValueError(f"unknown table precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    stored = on_grid(table) if precision == "fp16" else table.to(PRECISIONS[precision])
    pooled = PooledTable(remap, stored, count)
    heads = [m.head for m in members]
    stats = CompactionStats(n_ids, len(table), len(fused_ids), precision)
    return CompactMLP(pooled, heads, members[0].config.embedding_dim, temperature).eval(), stats


# ----------------------------------------------------------------------------- full ids (CNN)
class RemappedEmbedding(nn.Module):
    """``weight[remap[ids]]``: an embedding table that stores only the rows in use."""

    def __init__(self, remap: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("remap", remap.to(torch.int32))  # half the bytes of int64
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.remap[token_ids].to(torch.int64), self.weight)


def drop_unused_rows(model: nn.Module) -> CompactionStats:
    """For models that read full ids (CNNs, attention pooling): replace, in place, each
    embedding table by a `RemappedEmbedding` of its non-zero rows, every unused id sent to
    the zero padding row. Their masks read the original ids, so outputs are unchanged."""
    before = after = 0
    for module in model.modules():
        if not isinstance(module, (MLP, CNN)):
            continue
        names = ["embedding", "token_score"] if isinstance(module, MLP) and module.config.pooling == "attention" else ["embedding"]
        weights = [getattr(module, n).weight.detach() for n in names]
        used = torch.zeros(weights[0].shape[0], dtype=torch.bool)
        for w in weights:
            used |= w.ne(0).any(dim=1)
        used[0] = True
        rows = torch.nonzero(used).squeeze(1)  # sorted, starts with 0
        remap = torch.zeros(len(used), dtype=torch.int64)
        remap[rows] = torch.arange(len(rows))
        for name, w in zip(names, weights):
            setattr(module, name, RemappedEmbedding(remap, w[rows].clone()))
        before += len(used)
        after += len(rows)
    return CompactionStats(before, after, 0, "fp32")
