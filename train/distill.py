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

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from meli.checkpoint import Checkpoint
from meli.tokenizer import Encoded, Tokenizer


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

    def __post_init__(self) -> None:
        if self.recombined < 0:
            raise ValueError("distill.recombined must be 0 or more")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ValueError("distill.teacher_weight must be between 0 and 1")
        if self.epochs < 0:
            raise ValueError("distill.epochs must be 0 or more")


def recombine_titles(titles: pa.Array, labels: np.ndarray, n: int, seed: int | tuple[int, ...]) -> pa.Array:
    """`n` new titles, each the first half of a training title's words + the second half of
    another's: of the same category (label index) for half of them, of any title otherwise."""
    if n == 0 or len(titles) == 0:
        return pa.array([], pa.string())
    rng = np.random.default_rng(seed)
    words = [(t or "").split() for t in titles.to_pylist()]
    order = np.argsort(labels, kind="stable")  # titles grouped by label: a random partner of the same label
    starts = np.searchsorted(labels[order], labels)
    ends = np.searchsorted(labels[order], labels, side="right")
    first = rng.integers(0, len(words), n)
    same = rng.random(n) < 0.5
    partner = np.where(same, order[starts[first] + (rng.random(n) * (ends[first] - starts[first])).astype(np.int64)],
                       rng.integers(0, len(words), n))
    out = []
    for a, b in zip(first, partner):
        wa, wb = words[a], words[b]
        out.append(" ".join(wa[: (len(wa) + 1) // 2] + wb[len(wb) // 2 :]))
    return pa.array(out, pa.string())


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
    """A trained model (an ensemble's checkpoint) as a teacher, reading titles with its own tokenizer."""

    checkpoint: Checkpoint
    _model: nn.Module = field(init=False, repr=False)
    _tokenizer: Tokenizer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._model, self._tokenizer = self.checkpoint.build_model(), self.checkpoint.tokenizer()

    @property
    def members(self) -> int:
        return self.checkpoint.members

    def probabilities(self, titles: pa.Array, device: torch.device) -> np.ndarray:
        return teacher_probabilities(self._model, self._tokenizer.encode_batch(titles), device)


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


def as_teacher(teacher: Checkpoint | Teacher) -> Teacher:
    return CheckpointTeacher(teacher) if isinstance(teacher, Checkpoint) else teacher


def soft_targets(probs: np.ndarray, labels: np.ndarray, unseen: np.ndarray, teacher_weight: float,
                 smoothing: float) -> np.ndarray:
    """Training targets: the teachers' probabilities, except for the first ``len(labels)`` rows
    (real titles) that the teachers never trained on (`unseen`), whose targets mix them with
    the smoothed true label (``teacher_weight`` of teacher). Recombined rows keep the teachers'."""
    targets = probs.astype(np.float32, copy=True)
    rows = np.flatnonzero(unseen)
    k = probs.shape[1]
    hard = np.full((len(rows), k), smoothing / k, dtype=np.float32)
    hard[np.arange(len(rows)), labels[rows]] += 1.0 - smoothing
    targets[rows] = teacher_weight * targets[rows] + (1.0 - teacher_weight) * hard
    return targets


class TransferSet:
    """A student's training rows: the real titles, whose targets are fixed once, followed by
    recombined titles labelled by the teacher (a checkpoint, or any `Teacher`). `epoch(k)`
    gives set ``k`` of recombined titles (set 0 is drawn from the fit's seed alone): a fit
    draws set 0 once, or with ``distill.fresh`` a new set every epoch, so the student sees more
    of the teachers' answers at the cost of labelling each set."""

    def __init__(self, train, labels: np.ndarray, tokenizer: Tokenizer, teacher: Checkpoint | Teacher,
                 teacher_titles: pa.Array | None, config, device: torch.device):
        self.titles, self.labels, self.tokenizer, self.device = train.titles, labels, tokenizer, device
        self.seed, self.n = config.seed, round(config.distill.recombined * len(train))
        self.teacher = as_teacher(teacher)
        self.real = tokenizer.encode_batch(train.titles)
        unseen = (np.zeros(len(train), dtype=bool) if teacher_titles is None
                  else ~pc.is_in(train.titles, value_set=teacher_titles).to_numpy(zero_copy_only=False))
        self.real_targets = soft_targets(self.teach(train.titles), labels, unseen, config.distill.teacher_weight, config.label_smoothing)

    def epoch(self, k: int) -> tuple[Encoded, np.ndarray]:
        """(encoded rows, (rows, n_labels) targets): the real titles, then recombined set ``k``."""
        extra = recombine_titles(self.titles, self.labels, self.n, self.seed if k == 0 else (self.seed, k))
        return self.real.concat(self.tokenizer.encode_batch(extra)), np.concatenate([self.real_targets, self.teach(extra)])

    def teach(self, titles: pa.Array) -> np.ndarray:
        """The teacher's probabilities for titles."""
        return self.teacher.probabilities(titles, self.device)
