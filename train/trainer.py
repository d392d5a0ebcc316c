"""The training loop: tokenize, build the vocabulary, fit, keep the best epoch.

The training titles are encoded once into shard folders on disk (`meli.train.shards`) and
read back in shuffled windows, so memory follows the window, not the data. Mini-batches are
padded to their own longest title. The embedding table is large (words,
bigrams and hashed n-gram buckets) and each batch touches few rows of it, so only those
rows are updated, with SparseAdam's arithmetic (`meli.train.row_adam`); the rest of the network
gets the configured optimizer, so a step costs what the batch touches, not what the table
holds.
Validation runs after every epoch; the epoch with the best balanced accuracy is kept, and
training stops after `patience` epochs without improvement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, TypeVar

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
from meli.errors import MeliError, OutputError, first_line
from meli.metrics import balanced_accuracy
from meli.models import build_model, seed_dropout
from meli.tokenizer import Encoded, Tokenizer
from meli.vocabulary import build_vocabulary
from meli.train.config import TrainConfig
from meli.train.row_adam import PooledRows, RowAdam, RowSparseEmbedding
from meli.train.distill import Teacher, TransferSet, soft_cross_entropy
from meli.train.embeddings import init_embedding, word_vectors
from meli.train.shards import Corpus, Expander, ShardWriter, encoded_in_order, scattered_chunks

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 when `precision` asks for it (``"auto"``: when `device` computes it natively), else None."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    try:  # oneDNN's own test for AVX512-BF16 / AMX; not in every build
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else None


def label_indices(categories: pa.Array, labels: tuple[str, ...]) -> np.ndarray:
    idx = pc.index_in(categories, value_set=pa.array(labels)).to_numpy(zero_copy_only=False)
    return idx.astype(np.int64)


class _Optimizers:
    """The embedding table's row-wise Adam and the rest's optimizer, stepped together.

    With `pooled`, the table is read through `PooledRows` (``self.pooled``: the compiled mean
    pooling of a mean-pooling MLP on the CPU); else a `RowSparseEmbedding` takes the place of
    ``model.embedding`` (same weight, same state-dict key)."""

    def __init__(self, model: nn.Module, config: TrainConfig, total_steps: int, pooled: bool = False,
                 lr_scale: float = 1.0):
        self.pooled = PooledRows(model.embedding.weight) if pooled else None
        if self.pooled is None:
            model.embedding = RowSparseEmbedding(model.embedding)
        table = self.pooled or model.embedding
        rest = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
        lr = config.lr * lr_scale
        fused = {"fused": True} if _fused_ok(rest) else {}  # one kernel for every tensor: the same update, faster
        self.opts: list[torch.optim.Optimizer] = [RowAdam(table, lr=(config.embedding_lr or config.lr) * lr_scale)]
        if config.optimizer == "adamw":
            self.opts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=config.weight_decay, **fused))
        elif config.optimizer == "adam":
            self.opts.append(torch.optim.Adam(rest, lr=lr, weight_decay=config.weight_decay, **fused))
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


def _fused_ok(params: list[torch.Tensor]) -> bool:
    return bool(params) and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)


def _zero_unseen_rows(weight: torch.Tensor, seen: np.ndarray) -> None:
    """Zero the rows of ids that no training title holds (most are hash buckets).

    They never get a gradient, so they would keep their random start and add noise to any
    title that has such an n-gram; at zero they stay zero, and the export drops them
    (`meli.export.compaction`), halving the ONNX file."""
    with torch.no_grad():
        weight[torch.from_numpy(~seen)] = 0.0


def compact_training(config: TrainConfig) -> bool:
    """Whether a fit's titles are stored in the compact encoding: a mean-pooling MLP reads the
    same thing from them (`meli.train.shards`); a CNN or attention pooling needs full ids."""
    return config.model == "mlp" and config.mlp.pooling == "mean"


@dataclass(frozen=True)
class Prepared:
    """What the fits of one set of training titles share: the vocabulary's tokenizer and the
    titles encoded once into a shard folder (every member, every epoch reads it)."""

    tokenizer: Tokenizer
    corpus: Corpus
    seconds: float = 0.0


def fit_tokenizer(config: TrainConfig, train: LabelledSplit) -> Tokenizer:
    """The tokenizer of `config` with the vocabulary counted over `train`."""
    vocabulary = build_vocabulary(train.titles, config.tokenizer, config.vocabulary)
    if not vocabulary and not config.tokenizer.char_ngrams:
        raise MeliError(f"{train.source}: the titles yield no vocabulary (all empty or stopwords?)")
    return Tokenizer(config.tokenizer, vocabulary)


def prepare(config: TrainConfig, train: LabelledSplit, labels: tuple[str, ...], folder: Path, quiet: bool = True,
            chunk_rows: int = 65_536) -> Prepared:
    """Count the vocabulary over `train` and encode its titles into ``folder``, chunk by chunk,
    in a random order drawn from the config's seed (`scattered_chunks`)."""
    t0 = time.perf_counter()
    tokenizer = fit_tokenizer(config, train)
    compact = compact_training(config)
    writer = ShardWriter(folder, compact)
    try:
        with tqdm(total=len(train), desc="encoding titles", unit="title", unit_scale=True, leave=False,
                  disable=True if quiet else None) as bar:
            chunks = scattered_chunks(len(train), chunk_rows, config.seed)
            for rows, encoded in encoded_in_order(tokenizer, chunks, lambda rows: train.titles.take(rows), compact):
                writer.append(encoded, label_indices(train.categories.take(rows), labels))
                bar.update(len(rows))
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    return Prepared(tokenizer, Corpus((shards,), Expander.of(tokenizer) if compact else None), time.perf_counter() - t0)


def _batches(n: int, batch_size: int, order: np.ndarray) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def evaluate(model: nn.Module, encoded: Encoded, y: np.ndarray, device: torch.device, batch_size: int = 1024,
             expander: Expander | None = None):
    """(mean loss, predictions) of `model` on encoded titles (full ids, or compact ones with
    their `expander`), padded batch by batch."""
    model.eval()
    losses, preds = [], []
    with torch.no_grad():
        for rows in _batches(len(y), batch_size, np.arange(len(y))):
            ids = expander.rows(encoded, rows) if expander is not None else encoded.rows(rows)
            logits = model(torch.from_numpy(ids).to(device))
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
    teacher: Checkpoint | Teacher | Path | None = None,
    teacher_saw: int | None = None,
    prepared: Prepared | None = None,
    work: Path | None = None,
    name: str = "fit",
    save_every_s: float | None = None,
) -> TrainResult:
    """One fit. `keep="best"` keeps the epoch with the best validation balanced accuracy and
    stops early; `keep="last"` trains all epochs and keeps the last (for the refit).

    With a `teacher` (an ensemble's checkpoint, the file it is written to, or any
    `meli.train.distill.Teacher`), the fit is a distillation (`meli.train.distill`): recombined
    titles added to the training titles, and the teacher's probabilities (a checkpoint reads
    them with its own tokenizer) in the targets; real titles past the first `teacher_saw` (those the teacher trained on; None: all
    of them) also get their true label.

    The encoded titles and targets live in shard folders under `work` (a temporary folder
    when none is given); `prepared` (`prepare`) reuses a vocabulary and encoded titles of the
    same `train`. `name` labels the progress bars.

    With `save_every_s`, the fit's whole state (weights, optimizer moments, schedules, random
    generators, curves, best epoch so far) is written to ``work/state.pt`` after an epoch once
    that many seconds have passed since the last save (0: after every epoch), and a fit that
    finds that file carries on from the epoch after it, exactly as if it had never stopped
    (every epoch's shuffle and word dropout are drawn from the seed and the epoch number)."""
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meli-fit-")))
        return _fit(config, train, validation, provenance=provenance, on_epoch=on_epoch, quiet=quiet, keep=keep,
                    teacher=teacher, teacher_saw=teacher_saw, prepared=prepared, work=Path(work), name=name,
                    save_every_s=save_every_s)


def _fit(config: TrainConfig, train: LabelledSplit, validation: LabelledSplit, *, provenance, on_epoch, quiet, keep,
         teacher, teacher_saw, prepared: Prepared | None, work: Path, name: str,
         save_every_s: float | None) -> TrainResult:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    labels = check_labels(train, validation)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    log.info("training a %s on %s (%d train / %d validation titles, %d categories)",
             config.model, device, len(train), len(validation), len(labels))
    if teacher is None:
        if prepared is None:
            prepared = prepare(config, train, labels, work / "titles", quiet)
        tokenizer = prepared.tokenizer
        corpus_of: Callable[[int], Corpus] = lambda epoch: prepared.corpus  # noqa: E731
    else:  # real titles, then recombined ones labelled by the teacher, with sparse soft targets
        tokenizer = prepared.tokenizer if prepared is not None else fit_tokenizer(config, train)
        transfer = TransferSet(work / "student", train, label_indices(train.categories, labels), len(labels), tokenizer,
                               teacher, teacher_saw, config, device, compact_training(config), quiet=quiet)
        corpus_of = transfer.corpus if config.distill.fresh else (lambda epoch: transfer.corpus(0))
        log.info("distilling from an ensemble of %d on %d titles (%d recombined%s), each keeping the teachers' %d "
                 "most probable categories of %d", transfer.teacher.members, len(corpus_of(0)), transfer.n,
                 ", new ones every epoch" if config.distill.fresh else "", transfer.k, transfer.n_labels)
        if not config.distill.fresh:
            transfer.teacher = None  # every target is written: the teacher's weights can go
    vocabulary = tokenizer.vocabulary
    y_val = label_indices(validation.categories, labels)
    enc_val = tokenizer.encode_batch(validation.titles)
    corpus = corpus_of(0)
    timings["tokenize_s"] = time.perf_counter() - t0
    log.info("vocabulary: %d words, bigrams and head words; id space %d; %d training rows in %s (%.0f MB on disk)",
             len(vocabulary), tokenizer.n_ids, len(corpus), work, sum(s.nbytes() for s in corpus.shards) / 1e6)

    model_config = config.model_config(tokenizer.n_ids, len(labels))
    model = build_model(config.model, model_config)
    vectors = word_vectors(config.embeddings, tokenizer, train.titles, model_config.embedding_dim, config.seed)
    init_embedding(model.embedding.weight, vectors, tokenizer)
    _zero_unseen_rows(model.embedding.weight, corpus.seen_ids(tokenizer.n_ids))
    model.to(device)

    batch_size, lr_scale = config.batch_for(len(corpus))
    steps_per_epoch = corpus.steps(batch_size)
    # a mean-pooling MLP on the CPU pools its rows in one compiled loop (`PooledRows`)
    pooled = corpus.expander is not None and device.type == "cpu"
    optimizers = _Optimizers(model, config, config.epochs * steps_per_epoch, pooled=pooled, lr_scale=lr_scale)
    word_dropout = config.mlp.embedding_dropout if config.model == "mlp" else 0.0
    low = autocast_dtype(config.precision_for(batch_size), device)
    log.info("%s: batches of %d titles (learning rates x%.2f), %s arithmetic", name, batch_size, lr_scale,
             "bfloat16" if low else "float32")
    history: list[EpochMetrics] = []
    # training titles measured like the validation ones (eval mode, plain cross-entropy on the
    # true label), for curves that compare like with like; drawn apart from the training rng
    probe = corpus.sample(np.sort(np.random.default_rng(config.seed + 7919).permutation(len(train))[:5000]))
    best_state, best_bacc, best_epoch, best_pred, stale = None, -1.0, -1, None, 0
    stopped_early = False
    state_path, first_epoch, last_save = work / "state.pt", 1, time.perf_counter()
    if save_every_s is not None and state_path.is_file():
        state = load_saved(state_path)
        model.load_state_dict(state["model"])
        for opt, saved in zip(optimizers.opts, state["optimizers"]):
            opt.load_state_dict(saved)
        for schedule, saved in zip(optimizers.schedules, state["schedules"]):
            schedule.load_state_dict(saved)
        torch.set_rng_state(state["torch_rng"])
        history, stale = state["history"], state["stale"]
        best_state, best_bacc, best_epoch, best_pred = state["best"]
        first_epoch = len(history) + 1
        log.info("%s: resuming after epoch %d (state saved in %s)", name, len(history), state_path)
    t_fit = time.perf_counter()
    for epoch in range(first_epoch, config.epochs + 1):
        t_epoch = time.perf_counter()
        corpus = corpus_of(epoch - 1)
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(total=len(corpus), desc=f"{name} epoch {epoch}/{config.epochs}", unit="title", unit_scale=True,
                   leave=False, disable=True if quiet else None)  # None: bars only on a terminal; titles/s and ETA
        dropout_rng = np.random.default_rng((config.seed, epoch, 1))
        if device.type == "cpu":  # the layers' dropout masks from numpy, drawn anew each epoch
            seed_dropout(model, (config.seed, epoch, 2))
        for window in prefetched(corpus.windows(np.random.default_rng((config.seed, epoch)))):
            for rows in _batches(len(window), batch_size, np.arange(len(window))):
                with torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=low is not None):
                    if optimizers.pooled is not None:
                        values, offsets = corpus.flat(window, rows)
                        kept = dropout_rng.random(len(values)) >= word_dropout
                        logits = model.head(optimizers.pooled.pool(values, offsets, kept))
                    else:
                        logits = model(torch.from_numpy(corpus.ids(window, rows)).to(device, non_blocking=True))
                logits = logits.float()
                if window.target_idx is not None:  # soft targets: the smoothing is already in them
                    loss = soft_cross_entropy(logits, torch.from_numpy(window.target_idx[rows].astype(np.int64)).to(device),
                                              torch.from_numpy(window.target_val[rows].astype(np.float32)).to(device),
                                              torch.from_numpy(window.target_base[rows]).to(device))
                else:
                    target = torch.from_numpy(window.labels[rows].astype(np.int64)).to(device)
                    loss = F.cross_entropy(logits, target, label_smoothing=config.label_smoothing)
                optimizers.step(loss)
                total += loss.item() * len(rows)
                seen += len(rows)
                bar.update(len(rows))
            bar.set_postfix(loss=f"{total / max(1, seen):.3f}")
        bar.close()
        val_loss, pred = evaluate(model, enc_val, y_val, device)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=total / max(1, seen),
            train_eval_loss=evaluate(model, probe.encoded, probe.labels.astype(np.int64), device, expander=corpus.expander)[0],
            val_loss=val_loss,
            val_balanced_accuracy=balanced_accuracy(y_val, pred),
            val_accuracy=float((pred == y_val).mean()),
            seconds=time.perf_counter() - t_epoch,
        )
        history.append(metrics)
        if not quiet:
            tqdm.write(
                f"{name} epoch {epoch:>3}  train loss {metrics.train_loss:.4f}  val loss {val_loss:.4f}  "
                f"val balanced acc {metrics.val_balanced_accuracy:.4f}  ({metrics.seconds:.1f}s, "
                f"{seen / max(metrics.seconds, 1e-9):,.0f} titles/s)",
                file=sys.stderr,  # logs go to stderr; stdout holds the command's result
            )
        if on_epoch is not None:
            on_epoch(metrics)
        if keep == "last" or metrics.val_balanced_accuracy > best_bacc:
            best_bacc, best_epoch, best_pred, stale = metrics.val_balanced_accuracy, epoch, pred, 0
            if keep == "best":  # a copy of the best epoch; "last" takes the weights as they end (no copy)
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience and keep == "best":
                stopped_early = True
                log.info("early stop: no better validation balanced accuracy for %d epochs", stale)
                break
        if save_every_s is not None and epoch < config.epochs and time.perf_counter() - last_save >= save_every_s:
            save_atomically(state_path, {
                "model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers.opts],
                "schedules": [s.state_dict() for s in optimizers.schedules], "torch_rng": torch.get_rng_state(),
                "history": history, "stale": stale, "best": (best_state, best_bacc, best_epoch, best_pred)})
            last_save = time.perf_counter()
    timings["fit_s"] = time.perf_counter() - t_fit
    if keep == "last":
        best_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    best = history[best_epoch - 1]
    checkpoint = Checkpoint(
        spec=ModelSpec(config.model, model_config, config.tokenizer, tuple(vocabulary), tuple(labels)),
        state_dict=best_state,
        metrics={
            "val_balanced_accuracy": best.val_balanced_accuracy,
            "val_accuracy": best.val_accuracy,
            "val_loss": best.val_loss,
            "best_epoch": float(best_epoch),
        },
        provenance=dict(provenance or {}),
    )
    return TrainResult(checkpoint, history, best_epoch, str(device), y_val, best_pred, stopped_early, timings)


def save_atomically(path: Path, state: object) -> None:
    """Write a fit's state (or result) whole or not at all (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot save the training state ({e.strerror or e})") from e


def load_saved(path: Path):
    """What `save_atomically` wrote."""
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # a state cut short by a full disk reads as any of several errors
        raise MeliError(f"{path}: cannot read the saved training state ({first_line(e)}); remove it to start "
                        "this fit again") from e


def prefetched(items: Iterator[T]) -> Iterator[T]:
    """`items`, the next one read in a background thread while the caller works on this one
    (file reads and the compiled kernels release the GIL), so a GPU is not kept waiting."""
    with ThreadPoolExecutor(1, thread_name_prefix="meli-prefetch") as pool:
        pending = pool.submit(next, items, None)
        while (item := pending.result()) is not None:
            pending = pool.submit(next, items, None)
            yield item
