"""Classification metrics on integer labels: balanced accuracy and a per-category report.

Balanced accuracy is the course's metric: the mean over categories present in ``y_true`` of
the recall of each (scikit-learn's ``balanced_accuracy_score``; tests check they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    classes, true_idx = np.unique(y_true, return_inverse=True)
    if len(classes) == 0:
        return float("nan")
    support = np.bincount(true_idx, minlength=len(classes))
    hits = np.bincount(true_idx[y_true == y_pred], minlength=len(classes))
    return float(np.mean(hits / support))


@dataclass(frozen=True)
class CategoryRow:
    category: str
    precision: float
    recall: float
    f1: float
    support: int


def per_category(y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, ...]) -> list[CategoryRow]:
    """Precision, recall and F1 of every category with support or predictions, worst F1 first."""
    n = len(labels)
    tp = np.bincount(y_true[y_true == y_pred], minlength=n)
    support = np.bincount(y_true, minlength=n)
    predicted = np.bincount(y_pred, minlength=n)
    rows = []
    for i in np.flatnonzero((support > 0) | (predicted > 0)):
        p = tp[i] / predicted[i] if predicted[i] else 0.0
        r = tp[i] / support[i] if support[i] else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        rows.append(CategoryRow(labels[i], float(p), float(r), float(f), int(support[i])))
    return sorted(rows, key=lambda row: (row.f1, row.category))


def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, ...], top: int = 20) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted) mistakes."""
    wrong = y_true != y_pred
    if not wrong.any():
        return []
    pairs, counts = np.unique(np.stack([y_true[wrong], y_pred[wrong]], axis=1), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    return [(labels[pairs[i, 0]], labels[pairs[i, 1]], int(counts[i])) for i in order]
