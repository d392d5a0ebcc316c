"""Adam on the rows of an embedding table that a batch uses, without sparse tensors.

A batch of titles touches a few thousand of the table's hundreds of thousands of rows.
torch's ``SparseAdam`` updates only those rows, but through sparse COO gradients (coalesced,
then a dozen sparse-dense operations per step), which dominated each training step on the CPU.
`RowSparseEmbedding` gathers the batch's distinct rows into a small dense leaf tensor
(``torch.unique`` + ``inverse``), so the backward pass yields a dense gradient of just
those rows, and `RowAdam` applies SparseAdam's exact update to them with a few gathers and
one scatter. Same arithmetic as ``torch.optim.SparseAdam`` (the tests compare them), and
faster on the CPU.

For the mean-pooling MLP on the CPU, `PooledRows` goes one step further: the mean of each
title's rows (with word dropout) is one compiled loop over the flat ids (numba, both cores),
and the backward pass and the same SparseAdam update are one more, writing straight into the
table; no gather, unique or scatter tensors are made. `RowAdam` drives either, so the learning
rate schedules, the optimizer state and its arithmetic are the same (the tests hold the
two to each other and to ``torch.optim.SparseAdam``).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class RowSparseEmbedding(nn.Module):
    """Training-time stand-in for an ``nn.Embedding(padding_idx=0)``, holding its weight."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        if embedding.padding_idx not in (None, 0):
            raise ValueError("RowSparseEmbedding expects padding_idx 0")
        self.weight = embedding.weight
        self.rows: torch.Tensor | None = None  # the last training batch's distinct ids, sorted
        self.sub: torch.Tensor | None = None  # their rows, a leaf that receives the gradient

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.embedding(token_ids, self.weight, padding_idx=0)
        rows, inverse = torch.unique(token_ids, return_inverse=True)  # (U,), token_ids.shape
        self.rows = rows
        self.sub = self.weight.detach().index_select(0, rows).requires_grad_()  # (U, E)
        padding = 0 if int(rows[0]) == 0 else None  # sorted: id 0 comes first when present
        return F.embedding(inverse, self.sub, padding_idx=padding)

    @property
    def pending(self) -> bool:
        """Whether the last forward's rows have a gradient to apply."""
        return self.sub is not None and self.sub.grad is not None

    @torch.no_grad()
    def adam_step(self, moments: torch.Tensor, step_size: float, beta1: float, beta2: float, eps: float) -> None:
        """SparseAdam's update of the rows the last forward gathered."""
        sub = self.sub
        if sub is None or sub.grad is None:
            return
        rows, grad = self.rows, sub.grad
        picked = moments.index_select(0, rows)  # (U, 2E)
        exp_avg, exp_avg_sq = picked.chunk(2, dim=1)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        moments.index_copy_(0, rows, picked)
        update = exp_avg.div(exp_avg_sq.sqrt().add_(eps)).mul_(-step_size)
        # rows are distinct (torch.unique), so a gather and a scatter replace index_add_
        self.weight.data.index_copy_(0, rows, self.weight.data.index_select(0, rows).add_(update))
        self.sub = None


class PooledRows:
    """The training-time mean pooling of a mean-pooling MLP's table, compiled (see the module
    docstring). `pool` gives ``(B, E)`` means that receive the gradient; `RowAdam.step` then
    moves the rows they read. Ids 0 (padding) and dropped ids count neither in the mean nor in
    the update; a title with no id left pools to zeros."""

    def __init__(self, weight: torch.Tensor):
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError("PooledRows runs on float32 CPU tables")
        self.weight = weight
        self._slot = np.full(weight.shape[0], -1, dtype=np.int64)  # id -> its place among a batch's rows
        self._marked = np.zeros(weight.shape[0], dtype=np.uint8)  # ids a batch reads, cleared as they are listed
        self._last: tuple | None = None

    def pool(self, values: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> torch.Tensor:
        """Mean of the rows of each title's kept ids: title t is ``values[offsets[t]:offsets[t + 1]]``."""
        table = self.weight.detach().numpy()
        out = np.empty((len(offsets) - 1, table.shape[1]), dtype=np.float32)
        counts = np.empty(len(offsets) - 1, dtype=np.float32)
        _pool_forward(table, values, offsets, keep, out, counts)
        pooled = torch.from_numpy(out).requires_grad_()
        self._last = (values, offsets, keep, counts, pooled)
        return pooled

    @property
    def pending(self) -> bool:
        return self._last is not None and self._last[-1].grad is not None

    @torch.no_grad()
    def adam_step(self, moments: torch.Tensor, step_size: float, beta1: float, beta2: float, eps: float) -> None:
        if not self.pending:
            return
        values, offsets, keep, counts, pooled = self._last
        _pooled_adam(self.weight.detach().numpy(), moments.numpy(), values, offsets, keep, counts,
                     pooled.grad.numpy(), self._slot, self._marked, step_size, beta1, beta2, eps)
        self._last = None


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _pool_forward(table, values, offsets, keep, out, counts):
    width = table.shape[1]
    for t in nb.prange(len(offsets) - 1):
        for d in range(width):
            out[t, d] = 0.0
        n = 0
        for j in range(offsets[t], offsets[t + 1]):
            v = values[j]
            if keep[j] and v != 0:
                n += 1
                for d in range(width):
                    out[t, d] += table[v, d]
        c = max(n, 1)
        counts[t] = c
        for d in range(width):
            out[t, d] /= c


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _pooled_adam(table, moments, values, offsets, keep, counts, grad, slot, marked, step_size, beta1, beta2, eps):
    """Each distinct kept id's gradient (the sum of its titles' gradients over their counts),
    then SparseAdam's update of its row. The occurrences are grouped by id first (a counting
    sort), so each thread sums and updates whole rows of its own: the rows are read and
    written once, and no batch-sized gradient buffer is zeroed or scattered into. The rows
    are visited in id order (the ids are listed by a scan of `marked`, one byte an id), so the
    table and its moments are walked front to back rather than at random: fewer cache and
    TLB misses, the same arithmetic. `slot` is -1 and `marked` 0 everywhere between calls."""
    width = table.shape[1]
    f32 = np.float32
    step_size, eps = f32(step_size), f32(eps)
    b1, b2, c1, c2 = f32(beta1), f32(beta2), f32(1.0 - beta1), f32(1.0 - beta2)
    n_titles = len(offsets) - 1
    for j in range(len(values)):  # how often each kept id occurs, counted in its slot
        v = values[j]
        if keep[j] and v != 0:
            if slot[v] < 0:
                slot[v] = 0
                marked[v] = 1
            slot[v] += 1
    rows = np.empty(len(values), dtype=np.int64)
    starts = np.zeros(len(values) + 1, dtype=np.int64)  # occurrences of the s-th id: title_of[starts[s]:starts[s + 1]]
    n_rows = 0
    for v in range(len(marked)):  # the distinct ids in id order; each slot becomes the id's place
        if marked[v]:
            marked[v] = 0
            rows[n_rows] = v
            starts[n_rows + 1] = starts[n_rows] + slot[v]
            slot[v] = n_rows
            n_rows += 1
    fill = starts[:n_rows].copy()
    title_of = np.empty(starts[n_rows], dtype=np.int32)
    for t in range(n_titles):  # in title order, so each id's sum runs in the same order as before
        for j in range(offsets[t], offsets[t + 1]):
            v = values[j]
            if keep[j] and v != 0:
                s = slot[v]
                title_of[fill[s]] = t
                fill[s] += 1
    scaled = np.empty_like(grad)  # each title's gradient over its count: what each of its ids adds
    for t in range(n_titles):
        inv = f32(1.0) / counts[t]
        for d in range(width):
            scaled[t, d] = grad[t, d] * inv
    block = 256
    for b in nb.prange((n_rows + block - 1) // block):
        g = np.empty(width, dtype=np.float32)
        for s in range(b * block, min(n_rows, b * block + block)):
            r = rows[s]
            for d in range(width):
                g[d] = 0.0
            for k in range(starts[s], starts[s + 1]):
                t = title_of[k]
                for d in range(width):
                    g[d] += scaled[t, d]
            for d in range(width):
                m = b1 * moments[r, d] + c1 * g[d]
                v2 = b2 * moments[r, width + d] + c2 * g[d] * g[d]
                moments[r, d] = m
                moments[r, width + d] = v2
                table[r, d] -= step_size * (m / (np.sqrt(v2) + eps))
            slot[r] = -1


class RowAdam(torch.optim.Optimizer):
    """``SparseAdam``'s update, applied to the rows `table` read in its last forward."""

    def __init__(self, table: "RowSparseEmbedding | PooledRows", lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__([table.weight], dict(lr=lr, betas=betas, eps=eps))
        self.table = table

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: each forward gathers a fresh leaf, with no gradient yet."""

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if not self.table.pending:
            return
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        weight = self.table.weight
        state = self.state[weight]
        if not state:
            state["step"] = 0
            # both moments side by side: one gather and one scatter per step
            state["moments"] = torch.zeros(weight.shape[0], 2 * weight.shape[1], dtype=weight.dtype, device=weight.device)
        state["step"] += 1
        step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
        self.table.adam_step(state["moments"], step_size, beta1, beta2, group["eps"])
