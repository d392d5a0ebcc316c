"""Distillation: one student learns what an ensemble of teachers predicts.

An ensemble of N models is more accurate than one, and N times as dear to score. A single
student of the members' shape, trained to reproduce the teachers' averaged probabilities,
keeps most of that accuracy at one model's cost. Its training set is the labelled titles
plus *recombined* ones: the first half of one training title's words followed by the second
half of another's (of the same category half of the time, of any other the rest), so the
student also learns how the teachers answer titles none of them saw. Real titles' targets
take the teachers' probabilities where the teachers trained on them (there the teachers
know the label, and add what else each title resembles), and mix them with the (smoothed)
true label where the teachers never saw the title (the validation titles of a refit: there
the teachers only predict); recombined titles have no true label and take the teachers'
probabilities alone. On the real data, pure teacher targets did better than a 50/50 mix on
the titles the teachers had seen.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Protocol

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from tqdm.auto import tqdm

from meli.checkpoint import Checkpoint, load_checkpoint
from meli.models import MLP, Ensemble
from meli.tokenizer import Encoded, Tokenizer
from meli.train.row_adam import PooledRows
from meli.train.shards import Corpus, Expander, Shards, ShardWriter, TargetWriter, encoded_in_order, scattered_chunks


@dataclass(frozen=True)
class DistillConfig:
    """How a student is distilled from the ensemble's members (``members > 1``)."""

    enabled: bool = False  # ship one student instead of the ensemble
    recombined: float = 1.0  # recombined titles per training title, labelled by the teachers
    teacher_weight: float = 0.5  # titles the teachers never saw: this much teacher, the rest the smoothed true label
    epochs: int = 0  # the student's epochs; 0: the config's epochs
    # the refit's student learns from the members refitted on train + validation (which have
    # seen every real title) instead of their selection fits
    refit_teachers: bool = False
    fresh: bool = False  # new recombined titles every epoch (the teachers label each set) instead of one set
    # each title's target keeps the teachers' top_k probabilities (the rest share what is left
    # evenly): `SparseTargets`; at least the number of categories keeps them all
    top_k: int = 128
    # more than top_k while the student's target files stay within this many GiB (4 bytes a
    # kept probability): every category on small data, top_k on millions of titles (`k_for`)
    target_gib: float = 0.0
    # the student's arithmetic (`TrainConfig.precision`: "auto", "fp32", "bf16"; "auto" with
    # the config's `bf16_min_batch` and the student's own batch), apart from the members'
    precision: Literal["auto", "fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        if self.recombined < 0:
            raise ValueError("distill.recombined must be 0 or more")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ValueError("distill.teacher_weight must be between 0 and 1")
        if self.epochs < 0:
            raise ValueError("distill.epochs must be 0 or more")
        if self.top_k < 1:
            raise ValueError("distill.top_k must be at least 1")
        if self.target_gib < 0:
            raise ValueError("distill.target_gib must be 0 or more")

    def k_for(self, rows: int, n_labels: int) -> int:
        """How many of the teachers' probabilities each of `rows` titles keeps: `top_k`, or more
        while ``rows`` targets of ``k + 1`` slots fit `target_gib`, never more than `n_labels`."""
        fits = int(self.target_gib * 2**30) // (4 * max(rows, 1)) - 1
        return min(n_labels, max(self.top_k, fits))


class Recombiner:
    """Draws recombined titles: the first half of a training title's words + the second half of
    another's, of the same category (label index) for half of them, of any title otherwise."""

    def __init__(self, titles: pa.Array, labels: np.ndarray):
        self.titles, self.labels = titles, labels
        self.order = np.argsort(labels, kind="stable")  # titles grouped by label: a random partner of the same label
        self.starts = np.searchsorted(labels[self.order], labels)
        self.ends = np.searchsorted(labels[self.order], labels, side="right")

    def pairs(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(first, partner) row numbers of `n` recombined titles."""
        size = len(self.labels)
        first = rng.integers(0, size, n)
        same = rng.random(n) < 0.5
        span = self.ends[first] - self.starts[first]
        partner = np.where(same, self.order[self.starts[first] + (rng.random(n) * span).astype(np.int64)],
                           rng.integers(0, size, n))
        return first, partner

    def draw(self, n: int, seed: int | tuple[int, ...], block: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The pairs of `n` recombined titles, `block` at a time, block ``b`` drawn from
        ``(seed, b)``: the same titles however the caller reads them."""
        seed = seed if isinstance(seed, tuple) else (seed,)
        for b, start in enumerate(range(0, n, block)):
            yield self.pairs(min(block, n - start), np.random.default_rng((*seed, b)))

    def titles_of(self, first: np.ndarray, partner: np.ndarray) -> pa.Array:
        """The recombined titles of pairs (`pairs`)."""
        out = []
        heads = self.titles.take(pa.array(first)).to_pylist()
        tails = self.titles.take(pa.array(partner)).to_pylist()
        for a, b in zip(heads, tails):
            wa, wb = (a or "").split(), (b or "").split()
            out.append(" ".join(wa[: (len(wa) + 1) // 2] + wb[len(wb) // 2 :]))
        return pa.array(out, pa.string())


def recombine_titles(titles: pa.Array, labels: np.ndarray, n: int, seed: int | tuple[int, ...]) -> pa.Array:
    """`n` recombined titles (`Recombiner`) drawn from `seed`."""
    if n == 0 or len(titles) == 0:
        return pa.array([], pa.string())
    recombiner = Recombiner(titles, labels)
    return pa.concat_arrays([recombiner.titles_of(*pairs) for pairs in recombiner.draw(n, seed)])


def model_scores(model: nn.Module, encoded: Encoded, device: torch.device, batch_size: int = 2048) -> np.ndarray:
    """What `model` returns (logits; an ensemble's log mean probability) for encoded titles:
    ``(N, n_labels)`` float32. Each batch is padded on its own (no padded copy of all titles)."""
    model = model.to(device).eval()
    n = len(encoded.lengths)
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x = torch.from_numpy(encoded.rows(np.arange(start, min(n, start + batch_size)))).to(device)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def teacher_probabilities(teacher: nn.Module, encoded: Encoded, device: torch.device, batch_size: int = 2048) -> np.ndarray:
    """The teacher's (uncalibrated) probabilities for encoded titles: ``(N, n_labels)`` float32."""
    scores = torch.from_numpy(model_scores(teacher, encoded, device, batch_size))
    return torch.softmax(scores, dim=-1).numpy() if len(scores) else scores.numpy()


class Teacher(Protocol):
    """What a student learns from: the probabilities of `members` models for any titles."""

    members: int

    def probabilities(self, titles: pa.Array, device: torch.device) -> np.ndarray:
        """``(len(titles), n_labels)`` float32, labels in the student's order."""
        ...


@dataclass
class CheckpointTeacher:
    """A trained model (an ensemble's checkpoint) as a teacher, reading titles with its own
    tokenizer. Mean-pooling MLPs on the CPU are read the fast way (`pooled_probabilities`)."""

    checkpoint: Checkpoint
    _model: nn.Module = field(init=False, repr=False)
    _tokenizer: Tokenizer = field(init=False, repr=False)
    _expander: Expander | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self._model, self._tokenizer = self.checkpoint.build_model(shared=True), self.checkpoint.tokenizer()

    @property
    def members(self) -> int:
        return self.checkpoint.members

    def probabilities(self, titles: pa.Array, device: torch.device) -> np.ndarray:
        members = list(self._model.members) if isinstance(self._model, Ensemble) else [self._model]
        if device.type == "cpu" and all(isinstance(m, MLP) and m.config.pooling == "mean" for m in members):
            self._expander = self._expander or Expander.of(self._tokenizer)
            return pooled_probabilities(members, self._expander, self._tokenizer.encode_batch(titles, compact=True))
        return teacher_probabilities(self._model, self._tokenizer.encode_batch(titles), device)


def pooled_probabilities(members: list[nn.Module], expander: Expander, encoded: Encoded, batch_size: int = 4096) -> np.ndarray:
    """The mean probability of mean-pooling MLPs `members` for compactly encoded titles, as
    their ensemble's softmax gives it, with each title's mean of rows taken by the compiled
    loop over its flat ids (no padded batch, no id-by-id tensor)."""
    n = len(encoded.offsets) - 1
    out = np.zeros((n, members[0].config.n_labels), np.float32)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(n, start + batch_size))
            values, offsets = expander.flat(encoded, rows)
            keep = np.ones(len(values), dtype=bool)
            total = None
            for m in members:
                pooled = PooledRows(m.embedding.weight).pool(values, offsets, keep)
                p = torch.softmax(m.head(pooled.detach()), dim=-1)
                total = p if total is None else total + p
            out[rows] = (total / len(members)).numpy()
    return out


@dataclass(frozen=True)
class WeightedTeachers:
    """Teachers of several kinds as one: their probabilities averaged with `weights`."""

    teachers: tuple[Teacher, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.teachers) != len(self.weights) or not self.teachers:
            raise ValueError("one weight per teacher, and at least one teacher")
        if min(self.weights) < 0 or not sum(self.weights) > 0:
            raise ValueError(f"teacher weights must be 0 or more and not all 0, got {self.weights}")

    @property
    def members(self) -> int:
        return sum(t.members for t in self.teachers)

    def probabilities(self, titles: pa.Array, device: torch.device) -> np.ndarray:
        total = sum(w * t.probabilities(titles, device) for t, w in zip(self.teachers, self.weights))
        return (total / sum(self.weights)).astype(np.float32)


def as_teacher(teacher: Checkpoint | Teacher | Path) -> Teacher:
    """A teacher from a checkpoint, or from the checkpoint file it was written to (read now)."""
    if isinstance(teacher, Path):
        teacher = load_checkpoint(teacher)
    return CheckpointTeacher(teacher) if isinstance(teacher, Checkpoint) else teacher


@dataclass(frozen=True)
class SparseTargets:
    """Soft targets without a titles x categories matrix: per title, the teachers' ``k`` most
    probable categories with their probabilities, one more slot for the true label's share
    (titles the teachers never saw), and ``base``: what every other category gets (the
    teachers' remaining mass shared evenly, plus the smoothed label's floor). With ``k`` at
    least the number of categories they are the dense targets exactly; `dense` rebuilds those."""

    idx: np.ndarray  # (n, k + 1) int64: the top-k categories, then the true label
    val: np.ndarray  # (n, k + 1) float32
    base: np.ndarray  # (n,) float32

    @property
    def k(self) -> int:
        return self.idx.shape[1] - 1

    @classmethod
    def of(cls, probs: np.ndarray, labels: np.ndarray, unseen: np.ndarray, teacher_weight: float, smoothing: float,
           top_k: int) -> "SparseTargets":
        """The targets of titles whose teachers' probabilities are `probs`: the teachers' own,
        except for titles the teachers never trained on (`unseen`), whose targets mix them with
        the smoothed true label (``teacher_weight`` of teacher)."""
        n, n_labels = probs.shape
        k = min(top_k, n_labels)
        top = (np.argpartition(-probs, k - 1, axis=1)[:, :k] if k < n_labels
               else np.broadcast_to(np.arange(n_labels), (n, n_labels)))
        val = np.take_along_axis(probs, top, axis=1).astype(np.float32)
        rest = n_labels - k
        base = (np.clip(1.0 - val.sum(1), 0.0, None) / rest if rest else np.zeros(n)).astype(np.float32)
        w = np.where(unseen, teacher_weight, 1.0).astype(np.float32)
        floor = np.where(unseen, (1.0 - teacher_weight) * smoothing / n_labels, 0.0).astype(np.float32)
        val = w[:, None] * val + floor[:, None]
        base = w * base + floor
        label_share = np.where(unseen, (1.0 - teacher_weight) * (1.0 - smoothing), 0.0).astype(np.float32)
        idx = np.concatenate([top, np.asarray(labels, np.int64)[:, None]], axis=1)
        return cls(idx.astype(np.int64), np.concatenate([val, label_share[:, None]], axis=1).astype(np.float32), base)

    def dense(self, n_labels: int) -> np.ndarray:
        """The ``(n, n_labels)`` targets these stand for."""
        out = np.repeat(self.base[:, None], n_labels, axis=1)
        rows = np.arange(len(self.base))[:, None]
        out[rows, self.idx[:, : self.k]] = 0.0  # the top-k slots hold their whole value
        np.add.at(out, (np.repeat(rows, self.k + 1, axis=1), self.idx), self.val)
        return out


def soft_cross_entropy(logits: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` against `SparseTargets` rows (the same as against their
    `dense` matrix): ``-sum_c t_c log p_c`` with ``t`` = base everywhere, the top-k slots' own
    values in their place, and the last slot's value added."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, idx)  # (B, k + 1)
    weight = val.clone()
    weight[:, :-1] -= base.unsqueeze(1)  # the top-k slots replace the base; the label slot adds to it
    return -((weight * picked).sum(1) + base * logp.sum(1)).mean()


class TransferSet:
    """A student's training rows, written to shard folders (`meli.train.shards`) with their
    sparse targets: the real titles, labelled by the teacher once, and set ``k`` of recombined
    titles labelled by the teacher (`corpus(k)`; set 0 is drawn from the fit's seed alone). A
    fit uses set 0, or with ``distill.fresh`` a new set every epoch, so the student sees more of
    the teachers' answers at the cost of labelling each set. Titles go through the teacher
    ``chunk_rows`` at a time, so no titles x categories matrix is ever held. The teacher trained
    on the first `teacher_saw` real titles (None: on all of them); the rest (a refit's
    validation titles, after the training ones) are titles it never saw."""

    def __init__(self, folder: Path, train, labels: np.ndarray, n_labels: int, tokenizer: Tokenizer,
                 teacher: Checkpoint | Teacher | Path, teacher_saw: int | None, config, device: torch.device, compact: bool,
                 chunk_rows: int = 16_384, quiet: bool = True):
        self.folder, self.titles, self.labels, self.tokenizer, self.device = Path(folder), train.titles, labels, tokenizer, device
        self.seed, self.n = config.seed, round(config.distill.recombined * len(train))
        self.settings, self.smoothing, self.compact = config.distill, config.label_smoothing, compact
        self.chunk_rows, self.quiet, self.n_labels = chunk_rows, quiet, n_labels
        self.k = config.distill.k_for(len(train) + self.n, n_labels)  # one set of recombined titles at a time
        self.teacher = as_teacher(teacher)
        self.recombiner = Recombiner(train.titles, labels)
        self.expander = Expander.of(tokenizer) if compact else None  # built once: every set's corpus shares it
        saw = len(train) if teacher_saw is None else teacher_saw
        chunks = ((train.titles.take(rows), labels[rows], rows >= saw)
                  for rows in scattered_chunks(len(train), chunk_rows, self.seed))
        self.real = self._write(self.folder / "real", chunks, len(train), "teacher: training titles")
        self._sets: dict[int, Shards] = {}

    def corpus(self, k: int) -> Corpus:
        """The real titles, then recombined set ``k`` (made on first use; the previous set's
        files are removed when a later one is made)."""
        if k not in self._sets:
            for old in list(self._sets):
                shutil.rmtree(self._sets.pop(old).folder, ignore_errors=True)
            def chunks():
                for pairs in self.recombiner.draw(self.n, self.seed if k == 0 else (self.seed, k)):
                    for start in range(0, len(pairs[0]), self.chunk_rows):
                        first, partner = (p[start : start + self.chunk_rows] for p in pairs)
                        yield self.recombiner.titles_of(first, partner), self.labels[first], np.zeros(len(first), bool)

            self._sets[k] = self._write(self.folder / f"recombined-{k}", chunks(), self.n, "teacher: recombined titles")
        return Corpus((self.real, self._sets[k]), self.expander)

    def teach(self, titles: pa.Array) -> np.ndarray:
        """The teacher's probabilities for titles."""
        return self.teacher.probabilities(titles, self.device)

    def _write(self, folder: Path, chunks, total: int, what: str) -> Shards:
        writer = ShardWriter(folder, self.compact)
        targets = TargetWriter(folder, self.k + 1, self.n_labels)
        try:
            with tqdm(total=total, desc=what, unit="title", unit_scale=True, leave=False,
                      disable=True if self.quiet else None) as bar:
                for (titles, labels, unseen), encoded in encoded_in_order(self.tokenizer, chunks, lambda c: c[0], self.compact):
                    writer.append(encoded, labels)
                    t = SparseTargets.of(self.teach(titles), labels, unseen, self.settings.teacher_weight,
                                         self.smoothing, self.k)
                    targets.append(t.idx, t.val, t.base)
                    bar.update(len(titles))
            writer.close()
            targets.close()
        except BaseException:
            writer.abort()
            raise
        return Shards.open(folder)
