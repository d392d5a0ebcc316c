"""What a training run shows a user: curves, the per-category table, the confused pairs."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from meli.calibration import Calibration  # noqa: E402
from meli.metrics import CategoryRow, confused_pairs, per_category  # noqa: E402
from meli.train.trainer import TrainResult  # noqa: E402


def plot_curves(result: TrainResult, path: Path) -> Path:
    """Loss and validation accuracy by epoch; an ensemble gets one line per member (and a
    distilled student its own)."""
    members = sorted({m.member for m in result.history}, key=lambda k: (k < 0, k))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for member in members:
        history = [m for m in result.history if m.member == member]
        name = f"{history[0].model_name} " if len(members) > 1 else ""
        epochs = [m.epoch for m in history]
        # like with like: both measured at the epoch's end, in eval mode, as plain cross-entropy
        ax_loss.plot(epochs, [m.train_eval_loss for m in history], marker="o", label=f"{name}train")
        ax_loss.plot(epochs, [m.val_loss for m in history], marker="o", label=f"{name}validation")
        ax_acc.plot(epochs, [m.val_balanced_accuracy for m in history], marker="o", label=f"{name}balanced accuracy")
        if len(members) == 1:
            ax_acc.plot(epochs, [m.val_accuracy for m in history], marker=".", label="accuracy")
            ax_acc.axvline(result.best_epoch, color="grey", linestyle="--", label=f"best epoch ({result.best_epoch})")
    ax_loss.set(title="cross-entropy at the end of each epoch", xlabel="epoch")
    ax_loss.legend()
    ax_acc.set(title="validation", xlabel="epoch")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def category_report(result: TrainResult) -> list[CategoryRow]:
    return per_category(result.val_true, result.val_pred, result.checkpoint.labels)


def write_category_csv(rows: list[CategoryRow], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["category", "precision", "recall", "f1", "support"])
        for r in rows:
            w.writerow([r.category, f"{r.precision:.4f}", f"{r.recall:.4f}", f"{r.f1:.4f}", r.support])
    return path


def write_confusions_csv(result: TrainResult, path: Path, top: int = 50) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true_category", "predicted_category", "count"])
        w.writerows(confused_pairs(result.val_true, result.val_pred, result.checkpoint.labels, top))
    return path


def plot_worst_categories(rows: list[CategoryRow], path: Path, n: int = 30) -> Path:
    worst = rows[:n]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(worst) + 1)))
    ax.barh([r.category for r in worst][::-1], [r.f1 for r in worst][::-1])
    ax.set(title=f"validation F1, {len(worst)} worst categories", xlabel="F1", xlim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_calibration(calibration: Calibration, path: Path) -> Path:
    """Reliability diagram (accuracy against mean probability, by bin of the top probability)
    and coverage-accuracy curve (share of titles kept against their accuracy, by threshold),
    before and after the temperature."""
    fig, (ax_rel, ax_cov) = plt.subplots(1, 2, figsize=(10, 4))
    ax_rel.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    for bins, name in ((calibration.bins_before, f"before (ECE {calibration.ece_before:.3f})"),
                       (calibration.bins, f"T = {calibration.temperature:.2f} (ECE {calibration.ece_after:.3f})")):
        used = [b for b in bins if b.count]
        ax_rel.plot([b.confidence for b in used], [b.accuracy for b in used], marker="o", label=name)
    ax_rel.set(title="reliability (validation)", xlabel="mean top probability in bin", ylabel="accuracy",
               xlim=(0, 1), ylim=(0, 1))
    ax_rel.legend()
    for rows, name in ((calibration.coverage_before, "before"), (calibration.coverage, "calibrated")):
        ax_cov.plot([r.share for r in rows], [r.accuracy for r in rows], marker="o", label=name)
        if name == "calibrated":
            for r in rows:
                ax_cov.annotate(f"{r.threshold:g}", (r.share, r.accuracy), textcoords="offset points", xytext=(3, 3),
                                fontsize=7)
    ax_cov.set(title="coverage vs accuracy, by probability threshold", xlabel="share of titles at or above",
               ylabel="their accuracy")
    ax_cov.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def coverage_rows(calibration: Calibration) -> dict[str, list]:
    """The coverage table, before and after, as MLflow table columns."""
    before = {r.threshold: r for r in calibration.coverage_before}
    return {
        "threshold": [r.threshold for r in calibration.coverage],
        "share": [r.share for r in calibration.coverage],
        "accuracy": [r.accuracy for r in calibration.coverage],
        "share_uncalibrated": [before[r.threshold].share for r in calibration.coverage],
        "accuracy_uncalibrated": [before[r.threshold].accuracy for r in calibration.coverage],
    }
