"""Probabilities that mean what they say: temperature scaling, calibration error, coverage.

A model's ``probability`` is calibrated when, of the titles it gives 0.9, about 90% are
right. Label smoothing and distillation from averaged teachers make ours under-confident,
so one temperature ``T`` is fitted on validation titles and baked into the exported graph.
The figures that describe it (ECE, reliability, the coverage table) are measured out of
sample: the validation titles are cut into two folds, and each title's calibrated
probabilities use a temperature fitted on the other fold (`calibrate`).
The fit minimises the log loss of the *top* probability as a forecast of "the predicted
category is right" (`top_label_log_loss`): that is the number a team thresholds, and the
loss is a proper scoring rule for it, smooth in ``T``. (The usual full negative
log-likelihood calibrates all the probabilities at once and left the top one slightly less
calibrated on the default model's validation titles.) Dividing
by one positive number keeps every title's ranking of the categories, so the predicted
category never changes. ``scores`` are a model's logits (an ensemble's: the log of its mean
probability, `meli.models.Ensemble`).

The expected calibration error (ECE) uses 15 equal-width bins of the top probability: the
mean over titles of |accuracy − mean probability| within each title's bin. The coverage
table says, for a threshold, which share of titles reach it and how accurate those are: what
a team reads to pick the threshold above which predictions are taken without review.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)
TARGET_ACCURACY = 0.99  # "coverage at 99% accuracy": the share of titles a team can take without review
FOLDS = 2  # cross-fitting: each fold's figures come from a temperature fitted on the others


def softmax(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = scores.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(scores: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """The usual fit's loss: the mean negative log-likelihood of the true category over all the
    probabilities (``fit_temperature(..., loss=nll)``: the comparison in this module's docstring)."""
    z = scores.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def top_label_log_loss(scores: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Log loss of the top probability as the chance that the top category is right."""
    return TopLabelLogLoss(scores, y)(temperature)


class TopLabelLogLoss:
    """`top_label_log_loss` of fixed scores as a function of the temperature, with what does
    not depend on it (each row's scores less its top one, which is right) worked out once:
    a fit evaluates it some eighty times."""

    def __init__(self, scores: np.ndarray, y: np.ndarray):
        z = scores.astype(np.float64)
        self.shifted = z - z.max(axis=1, keepdims=True)  # the top score is 0 after the shift
        self.right = scores.argmax(axis=1) == y
        self._work = np.empty_like(self.shifted)

    def __call__(self, temperature: float) -> float:
        e = np.exp(np.divide(self.shifted, temperature, out=self._work), out=self._work)
        top = np.clip(1.0 / e.sum(axis=1), 1e-12, 1 - 1e-12)
        return float(-np.mean(np.where(self.right, np.log(top), np.log1p(-top))))


def fit_temperature(scores: np.ndarray, y: np.ndarray, low: float = 0.05, high: float = 20.0,
                    loss=top_label_log_loss) -> float:
    """The temperature minimising `loss` on validation: a coarse scan of log T (the loss is
    unimodal in practice, but the scan does not rely on it), then a golden-section search
    around the best point."""
    if len(y) == 0:
        return 1.0
    at = TopLabelLogLoss(scores, y) if loss is top_label_log_loss else (lambda t: loss(scores, y, t))
    grid = np.linspace(math.log(low), math.log(high), 41)
    values = [at(math.exp(g)) for g in grid]
    i = int(np.argmin(values))
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = at(math.exp(c)), at(math.exp(d))
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = at(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = at(math.exp(d))
    return float(math.exp((a + b) / 2))


@dataclass(frozen=True)
class Bin:
    low: float
    high: float
    count: int
    accuracy: float  # nan when empty
    confidence: float


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[Bin]:
    top = probs.max(axis=1)
    right = probs.argmax(axis=1) == y
    index = np.minimum((top * bins).astype(np.int64), bins - 1)
    out = []
    for i in range(bins):
        mask = index == i
        n = int(mask.sum())
        out.append(Bin(i / bins, (i + 1) / bins, n, float(right[mask].mean()) if n else float("nan"),
                       float(top[mask].mean()) if n else float("nan")))
    return out


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    total = len(y)
    if total == 0:
        return float("nan")
    return float(sum(b.count / total * abs(b.accuracy - b.confidence) for b in reliability(probs, y, bins) if b.count))


@dataclass(frozen=True)
class CoverageRow:
    threshold: float
    share: float  # of titles whose top probability is at least the threshold
    accuracy: float  # of those titles (nan when none)


def coverage(probs: np.ndarray, y: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS) -> list[CoverageRow]:
    top = probs.max(axis=1)
    right = probs.argmax(axis=1) == y
    rows = []
    for t in thresholds:
        mask = top >= t
        rows.append(CoverageRow(t, float(mask.mean()) if len(y) else float("nan"),
                                float(right[mask].mean()) if mask.any() else float("nan")))
    return rows


def coverage_at_accuracy(probs: np.ndarray, y: np.ndarray, target: float = TARGET_ACCURACY) -> float:
    """The largest share of titles, most confident first, whose accuracy is at least `target`."""
    if len(y) == 0:
        return float("nan")
    order = np.argsort(-probs.max(axis=1), kind="stable")
    right = (probs.argmax(axis=1) == y)[order]
    running = np.cumsum(right) / np.arange(1, len(y) + 1)
    ok = np.flatnonzero(running >= target)
    return float((ok[-1] + 1) / len(y)) if len(ok) else 0.0


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it does on titles its fit did not see (cross-fitted folds)."""

    temperature: float
    ece_before: float
    ece_after: float
    coverage_at_99_before: float
    coverage_at_99_after: float
    coverage: tuple[CoverageRow, ...]  # after
    coverage_before: tuple[CoverageRow, ...]
    bins: tuple[Bin, ...]  # reliability after
    bins_before: tuple[Bin, ...]
    folds: int = FOLDS  # 1: the figures are in sample (too few titles to cut)

    def metrics(self) -> dict[str, float]:
        """Flat numbers, for the checkpoint and MLflow."""
        out = {
            "calibration_temperature": self.temperature,
            "calibration_ece_before": self.ece_before,
            "calibration_ece_after": self.ece_after,
            "calibration_coverage_at_99_before": self.coverage_at_99_before,
            "calibration_coverage_at_99_after": self.coverage_at_99_after,
            "calibration_folds": float(self.folds),
        }
        for row in self.coverage:
            out[_coverage_key("share", row.threshold)] = row.share
            out[_coverage_key("accuracy", row.threshold)] = row.accuracy
        return out


def calibrate(scores: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = 0) -> Calibration:
    """The temperature fitted on all of `scores` (what ships), and its figures measured out of
    sample: each title's calibrated probabilities come from a temperature fitted on the other
    folds (`folds` random folds; in sample only when there are too few titles to cut)."""
    before = softmax(scores)
    t = fit_temperature(scores, y)
    if len(y) >= 20 * folds and folds > 1:
        fold = np.random.default_rng(seed).permutation(len(y)) % folds
        after = np.empty_like(before)
        for k in range(folds):
            held = fold == k
            after[held] = softmax(scores[held], fit_temperature(scores[~held], y[~held]))
    else:
        folds, after = 1, softmax(scores, t)
    return Calibration(
        temperature=t,
        ece_before=expected_calibration_error(before, y),
        ece_after=expected_calibration_error(after, y),
        coverage_at_99_before=coverage_at_accuracy(before, y),
        coverage_at_99_after=coverage_at_accuracy(after, y),
        coverage=tuple(coverage(after, y)),
        coverage_before=tuple(coverage(before, y)),
        bins=tuple(reliability(after, y)),
        bins_before=tuple(reliability(before, y)),
        folds=folds,
    )


def _coverage_key(kind: str, threshold: float) -> str:
    """The flat metric that holds a coverage row's ``share`` or ``accuracy``."""
    return f"coverage_{kind}_{threshold:g}"


def coverage_shares(metrics: dict[str, float]) -> dict[float, float]:
    """The share of titles at or above each threshold, from flat metrics (thresholds absent there left out)."""
    return {t: metrics[_coverage_key("share", t)] for t in THRESHOLDS if _coverage_key("share", t) in metrics}


def coverage_table(metrics: dict[str, float]) -> str:
    """The coverage table from a checkpoint's flat metrics, as Markdown (empty if absent)."""
    rows = [(t, metrics.get(_coverage_key("share", t)), metrics.get(_coverage_key("accuracy", t))) for t in THRESHOLDS]
    if any(share is None for _, share, _ in rows):
        return ""
    lines = ["| probability at least | share of titles | their accuracy |", "|---|---|---|"]
    lines += [f"| {t:g} | {share:.1%} | {acc:.2%} |" for t, share, acc in rows]
    return "\n".join(lines)
