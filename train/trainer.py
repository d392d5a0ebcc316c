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
import dataclasses
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

from meli.calibration import Calibration, calibrate
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
from meli.train.distill import model_scores, recombine_titles, soft_targets, teacher_probabilities
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
    teacher: Checkpoint | None = None,
    teacher_titles: pa.Array | None = None,
) -> TrainResult:
    """One fit. `keep="best"` keeps the epoch with the best validation balanced accuracy and
    stops early; `keep="last"` trains all epochs and keeps the last (for the refit).

    With a `teacher` (an ensemble's checkpoint), the fit is a distillation (`meli.train.distill`):
    recombined titles added to the training titles, and the teacher's probabilities (the
    teacher reading them with its own tokenizer) in the targets; real titles not among
    `teacher_titles` (what the teacher trained on) also get their true label."""
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
    titles = train.titles
    if teacher is not None:
        extra = recombine_titles(train.titles, y_train, round(config.distill.recombined * len(train)), config.seed)
        titles = pa.concat_arrays([train.titles, extra])
    # int32 halves the memory of the encoded titles; batches are widened to int64
    enc_train = tokenizer.encode_batch(titles)
    enc_val = tokenizer.encode_batch(validation.titles)
    x_train, len_train = enc_train.ids.astype(np.int32), enc_train.lengths
    x_val, len_val = enc_val.ids.astype(np.int32), enc_val.lengths
    targets = y_train  # (N,) label indices, or (N, n_labels) probabilities when distilling
    if teacher is not None:  # the teacher reads the titles with its own tokenizer
        probs = teacher_probabilities(teacher.build_model(), teacher.tokenizer().encode_batch(titles), device)
        unseen = (np.zeros(len(train), dtype=bool) if teacher_titles is None
                  else ~pc.is_in(train.titles, value_set=teacher_titles).to_numpy(zero_copy_only=False))
        targets = soft_targets(probs, y_train, unseen, config.distill.teacher_weight, config.label_smoothing)
        log.info("distilling from an ensemble of %d on %d titles (%d recombined)", teacher.members, len(titles),
                 len(titles) - len(train))
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


def train_and_refit(
    config: TrainConfig,
    train: LabelledSplit,
    validation: LabelledSplit,
    *,
    provenance: dict[str, str] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_refit_epoch: Callable[[EpochMetrics], None] | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Fit with early stopping on validation; then, with ``refit = true``, fit again on
    train + validation for the best epoch count and keep that model. With ``members > 1``,
    do that for each member (seeds ``seed``, ``seed + 1``, …) and keep their `Ensemble`.

    The returned metrics, history and validation predictions are the selection fit's (for an
    ensemble: the averaged probabilities of the members' selection fits): the refit model
    has seen the validation titles, so nothing measured on them afterwards would be honest.
    The tokenizer's vocabulary of the refit comes from all the titles it trains on.

    With ``distill.enabled`` (and ``members > 1``) the members are teachers: one student of
    their shape is distilled from their averaged probabilities (`meli.train.distill`) and is the
    model kept; its metrics are the ones reported (the ensemble's beside them), and only the
    student is refit, taught by the members' selection fits.
    """
    selections: list[TrainResult] = []
    for member in range(config.members):
        member_config = dataclasses.replace(config, seed=config.seed + member, members=1)
        if config.members > 1:
            log.info("ensemble member %d of %d (seed %d)", member + 1, config.members, member_config.seed)
        selections.append(
            train_model(member_config, train, validation, provenance=provenance, quiet=quiet,
                        on_epoch=_tagged(on_epoch, member))
        )
    selection = selections[0] if config.members == 1 else _ensemble_result(selections, validation)
    distilling = config.distill.enabled and config.members > 1
    if distilling:
        student_config = dataclasses.replace(config, members=1, epochs=config.distill.epochs or config.epochs)
        log.info("distilling one student from the ensemble of %d", config.members)
        teachers = selection.checkpoint
        student = train_model(student_config, train, validation, provenance=provenance, quiet=quiet,
                              on_epoch=_tagged(on_epoch, STUDENT), teacher=teachers, teacher_titles=train.titles)
        selection = _student_result(student, selection)
    selection = calibrated(selection, validation)
    if not config.refit:
        return selection
    combined = LabelledSplit(
        pa.concat_arrays([train.titles, validation.titles]),
        pa.concat_arrays([train.categories, validation.categories]),
        f"{train.source} + {validation.source}",
    )
    timings = dict(selection.timings)
    if distilling:
        # The student alone is refit, still taught by the members' selection fits: the real
        # titles' targets mix their probabilities with the true label, so the validation
        # titles' labels reach it, and the members are not refit: each would cost a full fit.
        log.info("refit the student on train + validation (%d titles) for %d epochs", len(combined), selection.best_epoch)
        final = train_model(dataclasses.replace(student_config, epochs=selection.best_epoch), combined, validation,
                            provenance=provenance, quiet=quiet, keep="last", on_epoch=_tagged(on_refit_epoch, STUDENT),
                            teacher=teachers, teacher_titles=train.titles)
        _add_timings(timings, final.timings, prefix="refit_student_")
        checkpoint, epochs = final.checkpoint, [selection.best_epoch]
    else:
        refits: list[Checkpoint] = []
        for member, fit in enumerate(selections):
            log.info("refit on train + validation (%d titles) for %d epochs", len(combined), fit.best_epoch)
            refit_config = dataclasses.replace(config, seed=config.seed + member, members=1, epochs=fit.best_epoch)
            final = train_model(refit_config, combined, validation, provenance=provenance, quiet=quiet, keep="last",
                                on_epoch=_tagged(on_refit_epoch, member))
            refits.append(final.checkpoint)
            _add_timings(timings, final.timings, prefix="refit_")
        checkpoint = refits[0] if config.members == 1 else _ensemble_checkpoint(refits)
        epochs = [f.best_epoch for f in selections]
    checkpoint.metrics = {**selection.checkpoint.metrics, "refit_epochs": float(sum(epochs) / len(epochs))}
    checkpoint.provenance["refit"] = "train+validation"
    # The refit model has seen the validation titles: a temperature fitted on them would be
    # too low (over-confident). It repeats the selection fit's recipe on a few more titles, so
    # it takes the selection fit's temperature, fitted on titles that fit never saw.
    checkpoint.spec = dataclasses.replace(checkpoint.spec, temperature=selection.checkpoint.temperature)
    return dataclasses.replace(selection, checkpoint=checkpoint, timings=timings)


def calibrated(result: TrainResult, validation: LabelledSplit) -> TrainResult:
    """`result` with a temperature fitted on its validation scores (`meli.calibration`): set
    in its checkpoint, with the calibration metrics (ECE before/after, coverage table)."""
    checkpoint = result.checkpoint
    encoded = checkpoint.tokenizer().encode_batch(validation.titles)
    scores = model_scores(checkpoint.build_model(), encoded, torch.device("cpu"))
    calibration = calibrate(scores, result.val_true)
    checkpoint.spec = dataclasses.replace(checkpoint.spec, temperature=calibration.temperature)
    checkpoint.metrics = {**checkpoint.metrics, **calibration.metrics()}
    log.info("calibration: temperature %.3f; expected calibration error %.4f -> %.4f on validation (after: %d-fold "
             "cross-fitted); share of titles at 99%% accuracy %.1f%% -> %.1f%%", calibration.temperature,
             calibration.ece_before, calibration.ece_after, calibration.folds,
             100 * calibration.coverage_at_99_before, 100 * calibration.coverage_at_99_after)
    return dataclasses.replace(result, calibration=calibration)


def _student_result(student: TrainResult, teachers: TrainResult) -> TrainResult:
    """The student's fit, with the teachers' metrics, curves and timings kept beside its own."""
    checkpoint = student.checkpoint
    checkpoint.metrics = {
        **checkpoint.metrics,
        **{k: v for k, v in teachers.checkpoint.metrics.items() if k.startswith("member")},
        "teachers_val_balanced_accuracy": teachers.checkpoint.metrics["val_balanced_accuracy"],
    }
    log.info("student: validation balanced accuracy %.4f (the ensemble it learnt from: %.4f)",
             checkpoint.metrics["val_balanced_accuracy"], checkpoint.metrics["teachers_val_balanced_accuracy"])
    timings = dict(teachers.timings)
    _add_timings(timings, student.timings, prefix="student_")
    history = teachers.history + [dataclasses.replace(m, member=STUDENT) for m in student.history]
    return dataclasses.replace(student, history=history, timings=timings,
                               stopped_early=student.stopped_early)


def _add_timings(total: dict[str, float], timings: dict[str, float], prefix: str = "") -> None:
    """Add `timings` into `total` key by key (members' fits run one after another)."""
    for k, v in timings.items():
        total[prefix + k] = total.get(prefix + k, 0.0) + v


def _tagged(callback: Callable[[EpochMetrics], None] | None, member: int) -> Callable[[EpochMetrics], None] | None:
    if callback is None:
        return None
    return lambda m: callback(dataclasses.replace(m, member=member))


def _ensemble_checkpoint(members: list[Checkpoint]) -> Checkpoint:
    """One checkpoint of an `Ensemble` whose member i holds the weights of ``members[i]``."""
    first = members[0]
    for other in members[1:]:  # same data, same settings: the tokenizer must be the same
        if other.vocabulary != first.vocabulary or other.model_config != first.model_config:
            raise MeliError("ensemble members disagree on vocabulary or model shape")
    state = {f"members.{i}.{k}": v for i, m in enumerate(members) for k, v in m.state_dict.items()}
    # the callers set the ensemble's own metrics; provenance is copied because the refit tags it
    return dataclasses.replace(first, spec=dataclasses.replace(first.spec, members=len(members)), state_dict=state,
                               provenance=dict(first.provenance))


def _ensemble_result(fits: list[TrainResult], validation: LabelledSplit) -> TrainResult:
    """The members' selection fits as one result, measured on validation as the ensemble."""
    checkpoint = _ensemble_checkpoint([f.checkpoint for f in fits])
    model = checkpoint.build_model()
    tokenizer = checkpoint.tokenizer()
    enc = tokenizer.encode_batch(validation.titles)
    y_val = fits[0].val_true
    val_loss, pred = evaluate(model, enc.ids, enc.lengths, y_val, torch.device("cpu"))
    bacc = balanced_accuracy(y_val, pred)
    checkpoint.metrics = {
        "val_balanced_accuracy": bacc,
        "val_accuracy": float((pred == y_val).mean()),
        "val_loss": val_loss,
        "best_epoch": float(sum(f.best_epoch for f in fits) / len(fits)),
        **{f"member{i + 1}_val_balanced_accuracy": f.checkpoint.metrics["val_balanced_accuracy"] for i, f in enumerate(fits)},
    }
    log.info("ensemble of %d: validation balanced accuracy %.4f (members %s)", len(fits), bacc,
             ", ".join(f"{f.checkpoint.metrics['val_balanced_accuracy']:.4f}" for f in fits))
    timings: dict[str, float] = {}
    for f in fits:
        _add_timings(timings, f.timings)
    history = [dataclasses.replace(m, member=i) for i, f in enumerate(fits) for m in f.history]
    return dataclasses.replace(fits[0], checkpoint=checkpoint, history=history, val_pred=pred, timings=timings,
                               stopped_early=any(f.stopped_early for f in fits))
