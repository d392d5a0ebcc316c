"""The training loop: tokenize, build the vocabulary, fit, keep the best epoch.

Mini-batches are padded to their own longest title. The embedding table is large (words,
bigrams and hashed n-gram buckets) and each batch touches few rows of it, so only those
rows are updated, with SparseAdam's arithmetic (`meli.train.row_adam`); the rest of the network
gets the configured optimizer, so a step costs what the batch touches, not what the table
holds.
Validation runs after every epoch; the epoch with the best balanced accuracy is kept, and
training stops after `patience` epochs without improvement.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from meli.calibration import Calibration
from meli.checkpoint import Checkpoint
from meli.contract import ModelSpec
from meli.dataset import LabelledSplit, check_labels
from meli.errors import MeliError
from meli.metrics import balanced_accuracy
from meli.models import build_model
from meli.tokenizer import Tokenizer
from meli.vocabulary import build_vocabulary
from meli.train.config import TrainConfig
from meli.train.row_adam import RowAdam, RowSparseEmbedding
from meli.train.distill import Teacher, TransferSet
from meli.train.embeddings import init_embedding, word_vectors

log = logging.getLogger(__name__)


STUDENT = -1  # EpochMetrics.member of a distilled student's epochs


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float  # the running mean of the optimised loss over the epoch (dropout, smoothing or soft targets)
    val_loss: float
    val_balanced_accuracy: float
    val_accuracy: float
    seconds: float
    member: int = 0  # which ensemble member (0 for a single model; STUDENT for a distilled student)
    train_eval_loss: float = float("nan")  # val_loss's measure on up to 5,000 training titles at the epoch's end

    @property
    def model_name(self) -> str:
        return "student" if self.member == STUDENT else f"member{self.member + 1}"


@dataclass
class TrainResult:
    checkpoint: Checkpoint
    history: list[EpochMetrics]
    best_epoch: int
    device: str
    val_true: np.ndarray  # label index of every validation row
    val_pred: np.ndarray  # best epoch's prediction of every validation row
    stopped_early: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None  # the temperature fitted on validation (`calibrate`)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise MeliError("device = 'cuda' but torch sees no CUDA GPU (is this a CPU-only torch build?)")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


def label_indices(categories: pa.Array, labels: tuple[str, ...]) -> np.ndarray:
    idx = pc.index_in(categories, value_set=pa.array(labels)).to_numpy(zero_copy_only=False)
    return idx.astype(np.int64)


class _Optimizers:
    """The embedding table's row-wise Adam and the rest's optimizer, stepped together.

    Puts a `RowSparseEmbedding` in place of ``model.embedding`` (same weight, same state-dict key)."""

    def __init__(self, model: nn.Module, config: TrainConfig, total_steps: int):
        model.embedding = RowSparseEmbedding(model.embedding)
        rest = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
        lr = config.lr
        self.opts: list[torch.optim.Optimizer] = [RowAdam(model.embedding, lr=config.embedding_lr or lr)]
        if config.optimizer == "adamw":
            self.opts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=config.weight_decay))
        elif config.optimizer == "adam":
            self.opts.append(torch.optim.Adam(rest, lr=lr, weight_decay=config.weight_decay))
        else:
            self.opts.append(torch.optim.SGD(rest, lr=lr, momentum=0.9, weight_decay=config.weight_decay))
        self.schedules = []
        if config.schedule == "onecycle":
            self.schedules = [
                torch.optim.lr_scheduler.OneCycleLR(o, max_lr=o.param_groups[0]["lr"], total_steps=total_steps, pct_start=0.1)
                for o in self.opts
            ]

    def step(self, loss: torch.Tensor) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in self.opts:
            o.step()
        for s in self.schedules:
            s.step()


def _zero_unseen_rows(weight: torch.Tensor, ids: np.ndarray) -> None:
    """Zero the rows of ids that no training title holds (most are hash buckets).

    They never get a gradient, so they would keep their random start and add noise to any
    title that has such an n-gram; at zero they stay zero, and the export drops them
    (`meli.export.compaction`), halving the ONNX file."""
    unseen = torch.ones(weight.shape[0], dtype=torch.bool)
    unseen[torch.from_numpy(np.unique(ids).astype(np.int64))] = False
    with torch.no_grad():
        weight[unseen] = 0.0


def _batches(n: int, batch_size: int, order: np.ndarray) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _to_tensor(ids: np.ndarray, rows: np.ndarray, lengths: np.ndarray, device: torch.device) -> torch.Tensor:
    width = max(1, int(lengths[rows].max()))
    return torch.from_numpy(ids[rows, :width].astype(np.int64)).to(device, non_blocking=True)


def evaluate(model: nn.Module, ids: np.ndarray, lengths: np.ndarray, y: np.ndarray, device: torch.device, batch_size: int = 1024):
    """(mean loss, predictions) of `model` on pre-encoded rows."""
    model.eval()
    losses, preds = [], []
    with torch.no_grad():
        for rows in _batches(len(y), batch_size, np.arange(len(y))):
            logits = model(_to_tensor(ids, rows, lengths, device))
            target = torch.from_numpy(y[rows]).to(device)
            losses.append(F.cross_entropy(logits, target, reduction="sum").item())
            preds.append(logits.argmax(1).cpu().numpy())
    return sum(losses) / max(1, len(y)), np.concatenate(preds) if preds else np.zeros(0, np.int64)


def train_model(
    config: TrainConfig,
    train: LabelledSplit,
    validation: LabelledSplit,
    *,
    provenance: dict[str, str] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    quiet: bool = False,
    keep: Literal["best", "last"] = "best",
    teacher: Checkpoint | Teacher | None = None,
    teacher_titles: pa.Array | None = None,
) -> TrainResult:
    """One fit. `keep="best"` keeps the epoch with the best validation balanced accuracy and
    stops early; `keep="last"` trains all epochs and keeps the last (for the refit).

    With a `teacher` (an ensemble's checkpoint, or any `meli.train.distill.Teacher`), the fit is
    a distillation (`meli.train.distill`): recombined titles added to the training titles, and
    the teacher's probabilities (a checkpoint reads them with its own tokenizer) in the
    targets; real titles not among `teacher_titles` (what the teacher trained on) also get
    their true label."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    labels = check_labels(train, validation)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    log.info("training a %s on %s (%d train / %d validation titles, %d categories)",
             config.model, device, len(train), len(validation), len(labels))

    tokenizer_config = config.tokenizer
    vocabulary = build_vocabulary(train.titles, tokenizer_config, config.vocabulary)
    if not vocabulary and not tokenizer_config.char_ngrams:
        raise MeliError(f"{train.source}: the titles yield no vocabulary (all empty or stopwords?)")
    tokenizer = Tokenizer(tokenizer_config, vocabulary)
    y_train, y_val = label_indices(train.categories, labels), label_indices(validation.categories, labels)
    enc_val = tokenizer.encode_batch(validation.titles)
    x_val, len_val = enc_val.ids.astype(np.int32), enc_val.lengths
    if teacher is None:
        enc_train, targets = tokenizer.encode_batch(train.titles), y_train  # targets: (N,) label indices
    else:  # (N, n_labels) probabilities: real titles, then recombined ones labelled by the teacher
        transfer = TransferSet(train, y_train, tokenizer, teacher, teacher_titles, config, device)
        enc_train, targets = transfer.epoch(0)
        log.info("distilling from an ensemble of %d on %d titles (%d recombined%s)", teacher.members, len(targets),
                 len(targets) - len(train), ", new ones every epoch" if config.distill.fresh else "")
    # int32 halves the memory of the encoded titles; batches are widened to int64
    x_train, len_train = enc_train.ids.astype(np.int32), enc_train.lengths
    timings["tokenize_s"] = time.perf_counter() - t0
    log.info("vocabulary: %d words, bigrams and head words; id space %d; mean ids per title %.1f",
             len(vocabulary), tokenizer.n_ids, float(len_train.mean()))

    model_config = config.model_config(tokenizer.n_ids, len(labels))
    model = build_model(config.model, model_config)
    vectors = word_vectors(config.embeddings, tokenizer, train.titles.to_pylist(), model_config.embedding_dim, config.seed)
    init_embedding(model.embedding.weight, vectors, tokenizer)
    _zero_unseen_rows(model.embedding.weight, x_train)
    model.to(device)

    steps_per_epoch = math.ceil(len(targets) / config.batch_size)
    optimizers = _Optimizers(model, config, config.epochs * steps_per_epoch)
    history: list[EpochMetrics] = []
    # training titles measured like the validation ones (eval mode, plain cross-entropy on the
    # true label), for curves that compare like with like; drawn apart from the training rng
    probe = np.sort(np.random.default_rng(config.seed + 7919).permutation(len(train))[:5000])
    best_state, best_bacc, best_epoch, best_pred, stale = None, -1.0, -1, None, 0
    stopped_early = False
    t_fit = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t_epoch = time.perf_counter()
        if teacher is not None and config.distill.fresh and epoch > 1:
            enc_train, targets = transfer.epoch(epoch - 1)
            x_train, len_train = enc_train.ids.astype(np.int32), enc_train.lengths
        model.train()
        order = rng.permutation(len(targets))
        total, seen = 0.0, 0
        bar = tqdm(_batches(len(targets), config.batch_size, order), desc=f"epoch {epoch}/{config.epochs}",
                   unit="batch", leave=False, disable=True if quiet else None)  # None: bars only on a terminal
        for rows in bar:
            logits = model(_to_tensor(x_train, rows, len_train, device))
            target = torch.from_numpy(targets[rows]).to(device)
            if target.ndim == 2:  # probabilities: the smoothing is already in them
                loss = F.cross_entropy(logits, target)
            else:
                loss = F.cross_entropy(logits, target, label_smoothing=config.label_smoothing)
            optimizers.step(loss)
            total += loss.item() * len(rows)
            seen += len(rows)
            bar.set_postfix(loss=f"{total / seen:.3f}", refresh=False)
        val_loss, pred = evaluate(model, x_val, len_val, y_val, device)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=total / max(1, seen),
            train_eval_loss=evaluate(model, x_train[probe], len_train[probe], y_train[probe], device)[0],
            val_loss=val_loss,
            val_balanced_accuracy=balanced_accuracy(y_val, pred),
            val_accuracy=float((pred == y_val).mean()),
            seconds=time.perf_counter() - t_epoch,
        )
        history.append(metrics)
        if not quiet:
            tqdm.write(
                f"epoch {epoch:>3}  train loss {metrics.train_loss:.4f}  val loss {val_loss:.4f}  "
                f"val balanced acc {metrics.val_balanced_accuracy:.4f}  ({metrics.seconds:.1f}s)",
                file=sys.stderr,  # logs go to stderr; stdout holds the command's result
            )
        if on_epoch is not None:
            on_epoch(metrics)
        if keep == "last" or metrics.val_balanced_accuracy > best_bacc:
            best_bacc, best_epoch, best_pred, stale = metrics.val_balanced_accuracy, epoch, pred, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience and keep == "best":
                stopped_early = True
                log.info("early stop: no better validation balanced accuracy for %d epochs", stale)
                break
    timings["fit_s"] = time.perf_counter() - t_fit
    best = history[best_epoch - 1]
    checkpoint = Checkpoint(
        spec=ModelSpec(config.model, model_config, tokenizer_config, tuple(vocabulary), tuple(labels)),
        state_dict=copy.deepcopy(best_state),
        metrics={
            "val_balanced_accuracy": best.val_balanced_accuracy,
            "val_accuracy": best.val_accuracy,
            "val_loss": best.val_loss,
            "best_epoch": float(best_epoch),
        },
        provenance=dict(provenance or {}),
    )
    return TrainResult(checkpoint, history, best_epoch, str(device), y_val, best_pred, stopped_early, timings)
