"""One training run end to end: find the data, train, save the checkpoint, log it all to MLflow."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch

from meli import __version__
from meli.checkpoint import save_checkpoint
from meli.dataset import TRAIN_MIX, DataFilter, LabelledSplit, check_labels, fingerprint, load_labelled, split_holdout
from meli.demo_catalog import DEMO_DIR
from meli.errors import InputError, OutputError, SettingError
from meli.formats import detect_format
from meli.onnx_model import file_sha256
from meli.tracking import (HELD_OUT, BEST_PREFIX, CHECKPOINT_ARTIFACTS, DEVICE_TAG, FINGERPRINT_TAG, MODEL_TAG, REPORT_ARTIFACTS,
                           TRAIN_SOURCE_TAG, VALIDATION_SHA256_TAG, VALIDATION_SOURCE_TAG, RunRecorder, check_store, experiment_for, store_errors,
                           tracking_uri)
from meli.train.config import TrainConfig
from meli.metrics import confused_pairs
from meli.train.report import (category_report, coverage_rows, plot_calibration, plot_curves, plot_worst_categories,
                          write_category_csv, write_confusions_csv)
from meli.train.recipe import train_and_refit
from meli.train.trainer import EpochMetrics, TrainResult

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet", ".csv", ".csv.gz", ".json", ".ndjson")


@dataclass(frozen=True)
class DataSource:
    train: Path
    validation: Path | None  # None: hold out part of train
    name: str  # default experiment name


def resolve_data(data: str | Path | None = None, train: str | Path | None = None, validation: str | Path | None = None) -> DataSource:
    """`--train/--validation` files, or a folder holding ``train.*`` (and ``validation.*``),
    or a single labelled file; nothing at all means the embedded demo dataset."""
    if train is not None:
        t = Path(train)
        return DataSource(t, Path(validation) if validation else None, _stem(t))
    if validation is not None:
        raise SettingError("validation", "needs a training file too (train)")
    if data is None:
        return DataSource(DEMO_DIR / "train.jsonl.gz", DEMO_DIR / "validation.jsonl.gz", "meli-demo")
    p = Path(data)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_file():
        detect_format(p)
        return DataSource(p, None, _stem(p))

    def find(stem: str) -> Path | None:
        for suffix in DATA_SUFFIXES:
            if (p / f"{stem}{suffix}").is_file():
                return p / f"{stem}{suffix}"
        return None

    t = find("train")
    if t is None:
        raise InputError(f"{p}: no train file in this folder (expected train.jsonl.gz, train.parquet, train.csv…)")
    return DataSource(t, find("validation"), f"meli-{p.resolve().name}")


def _stem(p: Path) -> str:
    name = p.name
    for suffix in DATA_SUFFIXES:
        name = name.removesuffix(suffix)
    return f"meli-{name}"


def load_splits(source: DataSource, config: TrainConfig, data_filter: DataFilter) -> tuple[LabelledSplit, LabelledSplit]:
    """The train and validation splits, checked (`check_labels`) before any run is made of them."""
    train = load_labelled(source.train, data_filter)
    if source.validation is None:
        log.info("no validation file: holding out %.0f%% of %s", 100 * config.validation_fraction, source.train)
        train, validation = split_holdout(train, config.validation_fraction, config.seed)
        if len(validation) == 0:
            raise InputError(f"{source.train}: too few titles per category to hold out a validation split (a category "
                             "needs two titles to give one); pass a validation file (--validation)")
    else:
        validation = load_labelled(source.validation, data_filter)
    check_labels(train, validation)
    return train, validation


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    experiment: str
    checkpoint_path: Path | str  # in the run's artifacts (a path for a local store), or the --checkpoint-dir copy
    result: TrainResult


def run_training(
    config: TrainConfig,
    source: DataSource,
    *,
    data_filter: DataFilter = DataFilter(),
    experiment: str | None = None,
    checkpoint_dir: Path | None = None,
    quiet: bool = False,
    resume: str | None = None,
    work_root: Path | None = None,
) -> RunOutcome:
    """Train and log one MLflow run. Its unfinished work is kept under ``work_root/<run id>``
    (`work_folder`) until the run ends well; `resume` (a run id) carries on such a run, with
    the same data and settings, in the same MLflow run."""
    check_store()  # before reading the data: an unreachable server fails in seconds
    train, validation = load_splits(source, config, data_filter)
    fp = fingerprint(train, validation)
    experiment = experiment or source.name
    with store_errors():
        experiment_id = experiment_for(experiment, fp)
        if resume is not None:
            check_resumable(resume, experiment_id, fp, config, work_folder(resume, work_root))
    if checkpoint_dir is not None:
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)  # fail before training, not after
        except OSError as e:
            raise OutputError(f"{checkpoint_dir}: cannot create the checkpoint folder ({e.strerror or e})") from e
    with RunRecorder.open(experiment_id, resume) as run:
        run_id = run.run_id
        work = work_folder(run_id, work_root)
        check_room(work, train, config)
        if resume is None:  # the store and its artifact location take writes, or nothing is trained
            with store_errors():
                run.tags({
                    FINGERPRINT_TAG: fp,
                    MODEL_TAG: config.model,
                    # absolute: meli-export finds them from any folder
                    TRAIN_SOURCE_TAG: str(source.train.resolve()),
                    VALIDATION_SOURCE_TAG: str(source.validation.resolve() if source.validation else f"{source.train.resolve()}{HELD_OUT}"),
                    VALIDATION_SHA256_TAG: file_sha256(source.validation or source.train),
                })
                run.params(config.flat())
                run.params({"data.train_rows": len(train), "data.validation_rows": len(validation),
                            "data.languages": ",".join(data_filter.languages) or "all",
                            "data.label_qualities": ",".join(data_filter.label_qualities) or "all"})
                run.json(config.to_dict(), "config.json")

        def prefix(m: EpochMetrics) -> str:  # an ensemble's members each get their own curves
            return f"{m.model_name}_" if config.members > 1 else ""

        def log_epoch(m: EpochMetrics) -> None:
            metrics = {"train_loss": m.train_loss, "train_eval_loss": m.train_eval_loss, "val_loss": m.val_loss,
                       "val_balanced_accuracy": m.val_balanced_accuracy,
                       "val_accuracy": m.val_accuracy, "epoch_seconds": m.seconds}
            run.metrics({prefix(m) + k: v for k, v in metrics.items()}, step=m.epoch)

        def log_refit_epoch(m: EpochMetrics) -> None:
            run.metrics({f"{prefix(m)}refit_train_loss": m.train_loss, f"{prefix(m)}refit_epoch_seconds": m.seconds},
                        step=m.epoch)

        provenance = {
            "mlflow_run_id": run_id,
            "mlflow_experiment": experiment,
            "data_fingerprint": fp,
            "meli_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            TRAIN_MIX: json.dumps(train.category_counts(), ensure_ascii=False),
        }
        log.info("unfinished work of this run goes to %s (meli-train --resume %s carries it on)", work, run_id)
        result = train_and_refit(config, train, validation, provenance=provenance, on_epoch=log_epoch,
                                 on_refit_epoch=log_refit_epoch, quiet=quiet, work=work, save_every_s=config.save_every_s)
        run.tags({DEVICE_TAG: result.device})
        run.metrics({f"{BEST_PREFIX}{k}": v for k, v in result.checkpoint.metrics.items()})
        run.metrics(result.timings)
        # stored once, in the run (what meli-export reads); a folder copy only when asked for
        with tempfile.TemporaryDirectory() as tmp:
            run.files([save_checkpoint(result.checkpoint, Path(tmp) / f"{run_id}.pt")], CHECKPOINT_ARTIFACTS)
        checkpoint_path = run.location(f"{CHECKPOINT_ARTIFACTS}/{run_id}.pt")
        if checkpoint_dir is not None:
            checkpoint_path = save_checkpoint(result.checkpoint, checkpoint_dir / f"{run_id}.pt")
        rows = category_report(result)
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            (t / "vocabulary.txt").write_text("\n".join(result.checkpoint.vocabulary) + "\n", encoding="utf-8")
            (t / "labels.txt").write_text("\n".join(result.checkpoint.labels) + "\n", encoding="utf-8")
            run.files([
                t / "vocabulary.txt",
                t / "labels.txt",
                plot_curves(result, t / "training_curves.png"),
                write_category_csv(rows, t / "per_category.csv"),
                write_confusions_csv(result, t / "confused_pairs.csv"),
                plot_worst_categories(rows, t / "worst_categories.png"),
                *([plot_calibration(result.calibration, t / "calibration.png")] if result.calibration else []),
            ], REPORT_ARTIFACTS)
        if result.calibration is not None:
            run.table(coverage_rows(result.calibration), f"{REPORT_ARTIFACTS}/coverage.json")
            run.params({"calibration.temperature": f"{result.calibration.temperature:.4f}"})
        pairs = confused_pairs(result.val_true, result.val_pred, result.checkpoint.labels, top=50)
        run.table({"true_category": [p[0] for p in pairs], "predicted_category": [p[1] for p in pairs],
                   "count": [p[2] for p in pairs]}, f"{REPORT_ARTIFACTS}/confused_pairs.json")
        run.table({"category": [r.category for r in rows], "precision": [r.precision for r in rows],
                   "recall": [r.recall for r in rows], "f1": [r.f1 for r in rows], "support": [r.support for r in rows]},
                  f"{REPORT_ARTIFACTS}/per_category.json")
    shutil.rmtree(work, ignore_errors=True)  # the run ended well: nothing to resume
    log.info("MLflow run %s in experiment %r (%s)", run_id, experiment, tracking_uri())
    return RunOutcome(run_id, experiment, checkpoint_path, result)


def work_folder(run_id: str, root: Path | None = None) -> Path:
    """Where run `run_id` keeps its shards and saved states: ``root`` (default: ``$MELI_WORK_DIR``,
    else ``meli-train`` in the system's temporary folder) / the run id."""
    root = root or Path(os.environ.get("MELI_WORK_DIR") or Path(tempfile.gettempdir()) / "meli-train")
    return Path(root) / run_id


def check_resumable(run_id: str, experiment_id: str, fp: str, config: TrainConfig, work: Path) -> None:
    """An error unless run `run_id` is an unfinished run of this experiment, on this data, with
    these settings, whose saved work is still there."""
    from mlflow.exceptions import MlflowException

    from meli.tracking import mlflow_client

    try:
        run = mlflow_client().get_run(run_id)
    except MlflowException as e:
        raise SettingError("resume", f"no MLflow run {run_id} in {tracking_uri()}") from e
    if run.info.experiment_id != experiment_id:
        raise SettingError("resume", f"run {run_id} belongs to another experiment (pass the --experiment and data it was started with)")
    if run.data.tags.get(FINGERPRINT_TAG) != fp:
        raise SettingError("resume", f"run {run_id} was trained on other data (fingerprint "
                           f"{run.data.tags.get(FINGERPRINT_TAG)}, this data is {fp})")
    if run.info.status == "FINISHED":
        raise SettingError("resume", f"run {run_id} has finished; there is nothing to resume")
    changed = sorted(k for k, v in config.flat().items()
                     if k in run.data.params and run.data.params[k] != str(v) and k != "save_every_s")
    if changed:
        shown = ", ".join(f"{k} = {run.data.params[k]} (now {config.flat()[k]})" for k in changed[:3])
        raise SettingError("resume", f"run {run_id} was started with other settings: {shown}; resume it with the "
                           "settings it was started with")
    if not work.is_dir():
        raise SettingError("resume", f"run {run_id} left no saved work in {work} (was it started on another machine, "
                           "or with another MELI_WORK_DIR?)")


def check_room(work: Path, train: LabelledSplit, config: TrainConfig) -> None:
    """Fail before training when the work folder's disk, or the memory, cannot hold the run.

    Disk: the encoded titles (about 100 bytes a title, compact), a student's targets
    (recombined titles too, 4 bytes per kept probability) and its teachers' weights. Memory:
    the embedding table with its optimizer moments and kept copies (8 per model), times the
    members kept for the student."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(work).free
    except OSError as e:
        raise OutputError(f"{work}: cannot use it for the run's work files ({e.strerror or e}); set MELI_WORK_DIR") from e
    distilled = config.distill.enabled and config.members > 1
    rows = round(len(train) * (1 + (config.distill.recombined if distilled else 0)))
    k = config.distill.k_for(rows, len(pc.unique(train.categories))) if distilled else 0
    per_row = 100 + (4 * (k + 1) + 4 if distilled else 0)
    dim = config.mlp.embedding_dim if config.model == "mlp" else config.cnn.embedding_dim
    ids = config.vocabulary.max_size + (config.tokenizer.char_buckets if config.tokenizer.char_ngrams else 0)
    need_disk = int((rows * per_row + (ids * dim * 4 * config.members if distilled else 0)) * 1.2)
    if need_disk > free:
        raise OutputError(f"{work}: the run needs about {need_disk / 2**30:.1f} GiB of disk for its encoded titles, "
                          f"targets and teachers, {free / 2**30:.1f} GiB are free; set MELI_WORK_DIR to a folder with room")
    need_memory = ids * dim * 4 * (config.members + 4) + len(train) * 200
    available = available_memory()
    if available is not None and need_memory > available:
        raise OutputError(f"the run needs about {need_memory / 2**30:.1f} GiB of memory (an embedding table of {ids:,} x "
                          f"{dim} for {config.members} member(s), and the titles), {available / 2**30:.1f} GiB are "
                          "available; lower members, vocabulary.max_size or tokenizer.char_buckets")


def available_memory() -> int | None:
    """Bytes this process may still use: the smaller of MemAvailable and the cgroup's room."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None
