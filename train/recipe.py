"""The training recipe: teachers → student → calibrate → refit.

`train_and_refit` is the whole recipe in one screen; each step is a function that returns a
new result and changes none it is given. `meli.train.trainer.train_model` is the one fit
every step runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from meli.calibration import calibrate, softmax
from meli.checkpoint import Checkpoint
from meli.dataset import LabelledSplit
from meli.errors import MeliError
from meli.metrics import balanced_accuracy
from meli.reliability import PROVENANCE_KEY, Reliability, WordCounter, shortened
from meli.train.config import TrainConfig
from meli.train.distill import model_scores
from meli.train.trainer import (STUDENT, EpochMetrics, TrainResult, evaluate, load_saved, prepare, save_atomically,
                                train_model)

log = logging.getLogger(__name__)

Fit = Callable[..., TrainResult]  # train_model with the run's provenance and verbosity bound


def train_and_refit(
    config: TrainConfig,
    train: LabelledSplit,
    validation: LabelledSplit,
    *,
    provenance: dict[str, str] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_refit_epoch: Callable[[EpochMetrics], None] | None = None,
    quiet: bool = False,
    work: Path | None = None,
    save_every_s: float | None = None,
) -> TrainResult:
    """Fit ``members`` models with early stopping on validation (one, or an ensemble); with
    ``distill.enabled`` they teach one student, the model kept; calibrate its probabilities
    on validation; with ``refit``, fit the kept model again on train + validation for the
    chosen number of epochs.

    The returned metrics, history, validation predictions and temperature are the selection
    fit's: the refit model has seen the validation titles, so nothing measured on them
    afterwards would be honest.

    Encoded titles and targets go to shard folders under `work` (a temporary folder when none
    is given), removed as each step is done with them. With `save_every_s` the recipe can be
    resumed: each finished fit's result stays in ``work/<fit>/result.pt`` (a rerun over the same
    `work` takes it instead of fitting again) and an unfinished fit's state in
    ``work/<fit>/state.pt`` (`train_model`)."""
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meli-train-")))
        return _recipe(config, train, validation, provenance, on_epoch, on_refit_epoch, quiet, Path(work), save_every_s)


def _recipe(config: TrainConfig, train: LabelledSplit, validation: LabelledSplit, provenance, on_epoch, on_refit_epoch,
            quiet: bool, work: Path, save_every_s: float | None) -> TrainResult:
    def fit(cfg: TrainConfig, data: LabelledSplit, *, name: str, prepared=None, **kwargs) -> TrainResult:
        folder = work / name.replace(" ", "-")
        done = folder / "result.pt"
        if save_every_s is not None and done.is_file():
            log.info("%s: already fitted (%s)", name, done)
            return load_saved(done)
        try:
            result = train_model(cfg, data, validation, provenance=provenance, quiet=quiet, work=folder, name=name,
                                 prepared=prepared() if callable(prepared) else prepared, save_every_s=save_every_s,
                                 **kwargs)
        finally:  # the shards go; a saved state stays for a rerun
            for shards in ("titles", "student"):
                shutil.rmtree(folder / shards, ignore_errors=True)
        if save_every_s is not None:
            save_atomically(done, result)
            (folder / "state.pt").unlink(missing_ok=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        return result

    members = fit_members(config, train, fit, on_epoch, work / "titles", quiet)
    member_epochs = [m.best_epoch for m in members]
    selection = members[0] if config.members == 1 else ensemble_result(members, validation)
    del members  # their weights live on in the selection's checkpoint alone
    teachers = None
    if distills(config):
        selection, teachers = weights_to_disk(selection, work / "teachers.pt")
        selection = distil_student(config, teachers, selection, train, fit, on_epoch)
    selection = calibrated(selection, validation)
    if not config.refit:
        return selection
    return refit(config, selection, member_epochs, teachers, train, validation, fit, on_refit_epoch)


def distills(config: TrainConfig) -> bool:
    return config.distill.enabled and config.members > 1


def student_config(config: TrainConfig) -> TrainConfig:
    return dataclasses.replace(config, members=1, epochs=config.distill.epochs or config.epochs,
                               precision=config.distill.precision)


def fit_members(config: TrainConfig, train: LabelledSplit, fit: Fit,
                on_epoch: Callable[[EpochMetrics], None] | None, folder: Path | None = None,
                quiet: bool = True) -> list[TrainResult]:
    """Step 1: the members' selection fits, seeds ``seed``, ``seed + 1``, …, all reading the
    titles encoded once (into `folder`, removed afterwards; none: each fit encodes its own)."""
    prepared = None
    if folder is not None and config.members > 1:  # encoded on first use (a resumed run may need none)
        prepared = functools.cache(lambda: prepare(config, train, tuple(sorted(pc.unique(train.categories).to_pylist())),
                                                   folder, quiet))
    results = []
    try:
        for member in range(config.members):
            member_config = dataclasses.replace(config, seed=config.seed + member, members=1)
            if config.members > 1:
                log.info("ensemble member %d of %d (seed %d)", member + 1, config.members, member_config.seed)
            results.append(fit(member_config, train, on_epoch=_tagged(on_epoch, member), prepared=prepared,
                               name=f"member {member + 1}" if config.members > 1 else "model"))
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if prepared is not None and prepared.cache_info().currsize:
        for r in results:
            r.timings["tokenize_s"] = r.timings.get("tokenize_s", 0.0) + prepared().seconds / len(results)
    return results


def weights_to_disk(result: TrainResult, path: Path) -> tuple[TrainResult, Path]:
    """`result` without its weights, and the file its checkpoint is now written to. The
    members' weights (an embedding table each) are needed only while a student's targets are
    written: kept on disk, they take no memory while the student trains, and a `TransferSet`
    reads them back for its targets and drops them when done."""
    save_atomically(path, result.checkpoint.to_payload())
    return dataclasses.replace(result, checkpoint=dataclasses.replace(result.checkpoint, state_dict={})), path


def distil_student(config: TrainConfig, teachers: Checkpoint | Path, ensemble: TrainResult, train: LabelledSplit,
                   fit: Fit, on_epoch: Callable[[EpochMetrics], None] | None) -> TrainResult:
    """Step 2: one student of the members' shape, taught by their averaged probabilities
    (`meli.train.distill`; `teachers`: their checkpoint, or the file it is in); its result
    keeps the teachers' metrics, curves and timings."""
    log.info("distilling one student from the ensemble of %d", config.members)
    student = fit(student_config(config), train, on_epoch=_tagged(on_epoch, STUDENT), teacher=teachers,
                  teacher_saw=len(train), name="student")
    metrics = {
        **student.checkpoint.metrics,
        **{k: v for k, v in ensemble.checkpoint.metrics.items() if k.startswith("member")},
        "teachers_val_balanced_accuracy": ensemble.checkpoint.metrics["val_balanced_accuracy"],
    }
    log.info("student: validation balanced accuracy %.4f (the ensemble it learnt from: %.4f)",
             metrics["val_balanced_accuracy"], metrics["teachers_val_balanced_accuracy"])
    history = ensemble.history + [dataclasses.replace(m, member=STUDENT) for m in student.history]
    return dataclasses.replace(student, checkpoint=dataclasses.replace(student.checkpoint, metrics=metrics),
                               history=history, timings=_summed(ensemble.timings, student.timings, "student_"))


def calibrated(result: TrainResult, validation: LabelledSplit) -> TrainResult:
    """Step 3: `result` with a temperature fitted on its validation scores (`meli.calibration`)
    in its checkpoint, with the calibration's metrics (ECE before/after, coverage table)."""
    checkpoint = result.checkpoint
    tokenizer = checkpoint.tokenizer()
    titles, y = shortened(validation.titles, result.val_true)  # the validation titles first, then shortened copies
    encoded = tokenizer.encode_batch(titles)
    all_scores = model_scores(checkpoint.build_model(shared=True), encoded, torch.device("cpu"))
    scores = all_scores[:len(validation)]
    calibration = calibrate(scores, result.val_true)
    reliability = reliability_table(all_scores, y, encoded, tokenizer, calibration.temperature, len(validation))
    log.info("calibration: temperature %.3f; expected calibration error %.4f -> %.4f on validation (after: %d-fold "
             "cross-fitted); share of titles at 99%% accuracy %.1f%% -> %.1f%%", calibration.temperature,
             calibration.ece_before, calibration.ece_after, calibration.folds,
             100 * calibration.coverage_at_99_before, 100 * calibration.coverage_at_99_after)
    checkpoint = dataclasses.replace(checkpoint, spec=dataclasses.replace(checkpoint.spec, temperature=calibration.temperature),
                                     metrics={**checkpoint.metrics, **calibration.metrics()},
                                     provenance={**checkpoint.provenance, PROVENANCE_KEY: reliability.to_json()})
    return dataclasses.replace(result, checkpoint=checkpoint, calibration=calibration)


def reliability_table(scores, y, encoded, tokenizer, temperature: float, n_validation: int) -> Reliability:
    """`meli.reliability.Reliability` fitted on the calibrated scores of `encoded` (the
    `n_validation` validation titles, then their shortened copies; rows with no known token
    are never scored and stay out)."""
    probs = softmax(scores, temperature)
    words = WordCounter(tokenizer)
    scorable = encoded.scorable
    top, right = probs.max(axis=1), probs.argmax(axis=1) == y
    known, first = words.known_per_row(encoded)
    as_they_are = np.arange(len(y)) < n_validation
    return Reliability.fit(top[scorable], right[scorable], known[scorable], first[scorable], as_they_are[scorable])


def refit(config: TrainConfig, selection: TrainResult, member_epochs: list[int], teachers: Checkpoint | Path | None,
          train: LabelledSplit, validation: LabelledSplit, fit: Fit,
          on_epoch: Callable[[EpochMetrics], None] | None) -> TrainResult:
    """Step 4: the kept model fitted again on train + validation for the selection's epoch
    count. With a student, the student alone, still taught by the members' selection fits
    (the validation titles' targets mix their probabilities with the true label); else each
    member. The refit takes the selection fit's temperature: fitted on titles the refit has
    seen, one would be too low (over-confident)."""
    combined = LabelledSplit(pa.concat_arrays([train.titles, validation.titles]),
                             pa.concat_arrays([train.categories, validation.categories]),
                             f"{train.source} + {validation.source}")
    timings = dict(selection.timings)
    refit_ensemble = None
    if teachers is None or config.distill.refit_teachers:
        refits, refit_timings = refit_members(config, member_epochs, combined, fit, on_epoch)
        timings = _summed(timings, refit_timings, "refit_")
        refit_ensemble = refits[0] if len(refits) == 1 else ensemble_checkpoint(refits)
    if teachers is None:
        checkpoint, epochs = refit_ensemble, member_epochs
    else:
        teacher_saw = len(train)  # the train titles, first in `combined`
        if refit_ensemble is not None:  # distill.refit_teachers: the refit members teach; they have seen every real title
            teachers, teacher_saw = refit_ensemble, len(combined)
        log.info("refit the student on train + validation (%d titles) for %d epochs", len(combined), selection.best_epoch)
        final = fit(dataclasses.replace(student_config(config), epochs=selection.best_epoch), combined, keep="last",
                    on_epoch=_tagged(on_epoch, STUDENT), teacher=teachers, teacher_saw=teacher_saw,
                    name="refit student")
        timings = _summed(timings, final.timings, "refit_student_")
        checkpoint, epochs = final.checkpoint, [selection.best_epoch]
    checkpoint = dataclasses.replace(
        checkpoint,
        spec=dataclasses.replace(checkpoint.spec, temperature=selection.checkpoint.temperature),
        metrics={**selection.checkpoint.metrics, "refit_epochs": float(sum(epochs) / len(epochs))},
        # like the temperature, the accuracy table of the selection fit (measured on titles it never saw)
        provenance={**checkpoint.provenance, "refit": "train+validation",
                    **{k: v for k, v in selection.checkpoint.provenance.items() if k == PROVENANCE_KEY}},
    )
    return dataclasses.replace(selection, checkpoint=checkpoint, timings=timings)


def refit_members(config: TrainConfig, member_epochs: list[int], combined: LabelledSplit, fit: Fit,
                  on_epoch: Callable[[EpochMetrics], None] | None) -> tuple[list[Checkpoint], dict[str, float]]:
    """Each member fitted again on `combined` for its selection fit's epoch count (same seed)."""
    refits, timings = [], {}
    for member, epochs in enumerate(member_epochs):
        log.info("refit on train + validation (%d titles) for %d epochs", len(combined), epochs)
        final = fit(dataclasses.replace(config, seed=config.seed + member, members=1, epochs=epochs),
                    combined, keep="last", on_epoch=_tagged(on_epoch, member), name=f"refit member {member + 1}")
        refits.append(final.checkpoint)
        timings = _summed(timings, final.timings)
    return refits, timings


def ensemble_checkpoint(members: list[Checkpoint]) -> Checkpoint:
    """One checkpoint of an `Ensemble` whose member i holds the weights of ``members[i]``."""
    first = members[0]
    for other in members[1:]:  # same data, same settings: the tokenizer must be the same
        if other.vocabulary != first.vocabulary or other.model_config != first.model_config:
            raise MeliError("ensemble members disagree on vocabulary or model shape")
    state = {f"members.{i}.{k}": v for i, m in enumerate(members) for k, v in m.state_dict.items()}
    return dataclasses.replace(first, spec=dataclasses.replace(first.spec, members=len(members)), state_dict=state,
                               provenance=dict(first.provenance))


def ensemble_result(fits: list[TrainResult], validation: LabelledSplit) -> TrainResult:
    """The members' selection fits as one result, measured on validation as the ensemble."""
    checkpoint = ensemble_checkpoint([f.checkpoint for f in fits])
    enc = checkpoint.tokenizer().encode_batch(validation.titles)
    y_val = fits[0].val_true
    val_loss, pred = evaluate(checkpoint.build_model(shared=True), enc, y_val, torch.device("cpu"))
    bacc = balanced_accuracy(y_val, pred)
    metrics = {
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
        timings = _summed(timings, f.timings)
    history = [dataclasses.replace(m, member=i) for i, f in enumerate(fits) for m in f.history]
    return dataclasses.replace(fits[0], checkpoint=dataclasses.replace(checkpoint, metrics=metrics), history=history,
                               val_pred=pred, timings=timings, stopped_early=any(f.stopped_early for f in fits))


def _summed(total: dict[str, float], timings: dict[str, float], prefix: str = "") -> dict[str, float]:
    """`total` plus `timings`, key by key (fits run one after another)."""
    out = dict(total)
    for k, v in timings.items():
        out[prefix + k] = out.get(prefix + k, 0.0) + v
    return out


def _tagged(callback: Callable[[EpochMetrics], None] | None, member: int) -> Callable[[EpochMetrics], None] | None:
    if callback is None:
        return None
    return lambda m: callback(dataclasses.replace(m, member=member))
