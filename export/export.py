"""The export stage end to end: which checkpoint, export, parity, write, log, register."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from meli.checkpoint import Checkpoint, load_checkpoint
from meli.dataset import TRAIN_MIX, fingerprint, load_labelled
from meli.demo_catalog import DEMO_DIR
from meli.errors import MeliError, OutputError
from meli.formats import AtomicWriter, iter_batches
from meli.onnx_model import DEFAULT_MODEL, file_sha256, load_onnx_model
from meli.calibration import coverage_table
from meli.metrics import balanced_accuracy
from meli.tracking import (EXPORT_ARTIFACTS, HELD_OUT, REGISTERED_NAME, TRAIN_SOURCE_TAG, VALIDATION_SHA256_TAG, VALIDATION_SOURCE_TAG, Measure, Measured, Registration,
                           add_to_run, best_run_id,
                           has_run, register_pyfunc, run_checkpoint)
from meli.export.compaction import Precision
from meli.export.onnx_export import signature, to_onnx
from meli.export.parity import ParityReport, check_parity, require_parity

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path(DEFAULT_MODEL)


@dataclass(frozen=True)
class ChosenCheckpoint:
    checkpoint: Checkpoint
    path: Path
    run_id: str | None  # None: a checkpoint file outside MLflow
    validation_source: str | None
    validation_sha256: str | None = None  # the file's bytes when the run read it
    train_source: str | None = None

    def provenance(self) -> dict[str, str]:
        """What the export adds to the card's provenance: the checkpoint's file name, and the
        training mix when the checkpoint predates it and the run's training file is still there."""
        extra = {"checkpoint": self.path.name}
        if TRAIN_MIX not in self.checkpoint.provenance and self.train_source:
            source = Path(self.train_source.removesuffix(HELD_OUT))
            try:
                extra[TRAIN_MIX] = json.dumps(load_labelled(source).category_counts(), ensure_ascii=False)
            except MeliError as e:
                log.warning("no training category mix in the model file (the nightly report's drift needs it): %s", e)
        return extra


def checkpoint_of_run(run_id: str) -> ChosenCheckpoint:
    local, tags = run_checkpoint(run_id)
    return ChosenCheckpoint(load_checkpoint(local), local, run_id, tags.get(VALIDATION_SOURCE_TAG),
                            tags.get(VALIDATION_SHA256_TAG), tags.get(TRAIN_SOURCE_TAG))


def choose_checkpoint(experiment: str | None = None, run_id: str | None = None, checkpoint: str | Path | None = None) -> ChosenCheckpoint:
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        return ChosenCheckpoint(ckpt, Path(checkpoint), ckpt.provenance.get("mlflow_run_id"), None)
    return checkpoint_of_run(run_id or best_run_id(experiment))


@dataclass(frozen=True)
class ParityTitles:
    titles: pa.Array
    source: Path


def parity_titles(path: str | Path | None, validation_source: str | None, max_rows: int | None,
                  checkpoint: Checkpoint | None = None, validation_sha256: str | None = None) -> ParityTitles:
    """Titles for the parity check: `path` (``--parity-data``), else the run's validation file
    (for a split held out of the training file, that file's titles). Never a silent stand-in:
    a run whose file is gone is an error that names it; the demo's titles serve the demo's
    models only (recognised by their data fingerprint)."""
    if path is not None:
        source = Path(path)
        if not source.is_file():
            raise MeliError(f"{source}: no such file for the parity check")
    elif validation_source:
        source = Path(validation_source.removesuffix(HELD_OUT))
        if not source.is_file():
            raise MeliError(f"{source}: the run's validation file is not there (moved, or the run was trained from "
                            "another folder); pass --parity-data FILE with titles to check parity on")
        if validation_sha256 and file_sha256(source) != validation_sha256:
            raise MeliError(f"{source}: the run's validation file has changed since the run read it (SHA-256 differs); "
                            "pass --parity-data FILE with titles to check parity on")
    elif checkpoint is not None and checkpoint.provenance.get("data_fingerprint") == _demo_fingerprint():
        source = DEMO_DIR / "validation.jsonl.gz"
    else:
        raise MeliError("no titles for the parity check: this checkpoint names no validation file; "
                        "pass --parity-data FILE")
    chunks, n = [], 0
    for batch in iter_batches(source):
        if "title" not in batch.schema.names:
            raise MeliError(f"{source}: no 'title' column for the parity check")
        chunks.append(batch.column("title"))
        n += batch.num_rows
        if max_rows and n >= max_rows:
            break
    titles = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
    titles = titles.filter(titles.is_valid())
    titles = titles.slice(0, max_rows) if max_rows else titles
    usable = len(titles) if checkpoint is None else int((checkpoint.tokenizer().encode_batch(titles).lengths > 0).sum())
    if usable == 0:
        raise MeliError(f"{source}: no usable titles for the parity check ({len(titles)} non-null, none with a word the "
                        "model reads); pass --parity-data FILE with real titles")
    return ParityTitles(titles, source)


def _demo_fingerprint() -> str:
    return fingerprint(load_labelled(DEMO_DIR / "train.jsonl.gz"), load_labelled(DEMO_DIR / "validation.jsonl.gz"))


@dataclass(frozen=True)
class ExportOutcome:
    output: Path
    report: ParityReport
    run_id: str | None
    registered: Registration | None


def export_model(
    chosen: ChosenCheckpoint,
    output: Path = DEFAULT_OUTPUT,
    *,
    parity_data: str | Path | None = None,
    parity_rows: int | None = None,
    provider: str = "cpu",
    register_as: str | None = REGISTERED_NAME,
    precision: Precision = "fp16",
    quantize: bool = True,
    force: bool = False,
) -> ExportOutcome:
    output = Path(output)
    for source, what in ((chosen.path, "the checkpoint being exported"), (parity_data, "the parity titles")):
        if source is not None and output.exists() and Path(source).exists() and output.resolve() == Path(source).resolve():
            raise OutputError(f"{output}: --output names {what}; write the model to another file")
    writer = AtomicWriter(output)  # fails now, before any work, on a missing or read-only folder
    with writer:
        proto = to_onnx(chosen.checkpoint, chosen.provenance(), precision=precision, quantize=quantize)
        data = proto.SerializeToString()
        onnx_model = load_onnx_model(data, provider=provider)
        titles = parity_titles(parity_data, chosen.validation_source, parity_rows, chosen.checkpoint, chosen.validation_sha256)
        report = check_parity(chosen.checkpoint, onnx_model, titles.titles, source=titles.source)
        log.info(report.summary())
        require_parity(report)
        writer.path.write_bytes(data)
        writer.commit()
    registered = None
    if chosen.run_id is not None and register_as:
        registered = log_export(chosen.run_id, output, report, signature(proto), register_as, chosen.checkpoint.temperature,
                                force, labelled_measure(titles.source))
    return ExportOutcome(output, report, chosen.run_id, registered)


def calibration_summary(ckpt: Checkpoint) -> str:
    """What `meli-export` prints about the baked-in temperature and the coverage it gives."""
    m = ckpt.metrics
    table = coverage_table(m)
    if not table:
        return f"temperature {ckpt.temperature:.3f} (no calibration report in this checkpoint)"
    folds = int(m.get("calibration_folds", 1))
    how = (f"out of sample ({folds}-fold cross-fit: each title calibrated by a temperature fitted on the other "
           f"fold{'s' if folds > 2 else ''})" if folds > 1 else "in sample (the titles the temperature was fitted on)")
    return (f"calibration: temperature {ckpt.temperature:.3f} in the graph, fitted on validation by the train-only fit; "
            f"measured {how}: expected calibration error {m['calibration_ece_before']:.4f} -> "
            f"{m['calibration_ece_after']:.4f}; {m['calibration_coverage_at_99_after']:.1%} of validation titles at 99% "
            f"accuracy\ncoverage on validation (train-only fit), calibrated, {how.split(' (')[0]}:\n{table}")


def recheck(model_path: Path, *, checkpoint: str | Path | None = None, parity_data=None, parity_rows=None, provider="cpu") -> ParityReport:
    """`meli-export --check`: parity of an existing model.onnx against its own checkpoint."""
    onnx_model = load_onnx_model(model_path, provider=provider)
    run_id = onnx_model.card.provenance.get("mlflow_run_id")
    if checkpoint is None and not run_id:
        raise MeliError(f"{model_path}: carries no MLflow run id; pass --checkpoint")
    chosen = choose_checkpoint(run_id=run_id, checkpoint=checkpoint)
    titles = parity_titles(parity_data, chosen.validation_source, parity_rows, chosen.checkpoint, chosen.validation_sha256)
    report = check_parity(chosen.checkpoint, onnx_model, titles.titles, source=titles.source)
    log.info(report.summary())
    return report


def labelled_measure(source: Path) -> Measure | None:
    """How the serving gate scores an exported file: its balanced accuracy on the labelled
    titles of `source` (the candidate's validation file), scored as meli-score scores them
    (`meli.scorer.Scorer`: a title with no known token gets no category). None when the
    file has no categories."""
    try:
        split = load_labelled(source)
    except MeliError:
        return None
    truth = split.categories.to_pylist()
    labels = {c: i for i, c in enumerate(sorted(set(truth)))}
    y_true = np.array([labels[c] for c in truth])

    def measure(model_file: Path) -> Measured:
        from meli.scorer import BATCH_ROWS, ScoreConfig, Scorer

        scorer = Scorer(load_onnx_model(model_file, provider="cpu"), ScoreConfig(keep_columns=()))
        predicted = pa.Table.from_batches(scorer.score_batches(
            pa.record_batch({"title": split.titles.slice(start, BATCH_ROWS)}) for start in range(0, len(split), BATCH_ROWS)))
        y_pred = np.array([labels.get(c, -1) for c in predicted.column("category").to_pylist()])
        return Measured(balanced_accuracy(y_true, y_pred), len(split), str(source))

    return measure


def log_export(run_id: str, output: Path, report: ParityReport, sig: dict, name: str, temperature: float = 1.0,
               force: bool = False, measure: Measure | None = None) -> Registration | None:
    """Log the export to the checkpoint's run (parity report, signature, and the model as an
    MLflow pyfunc model: `meli.pyfunc`) and register it (`meli.tracking.register_pyfunc`:
    ``@latest-export`` always, ``@champion`` through its quality gate)."""
    from meli.pyfunc import pyfunc_model_args

    if not has_run(run_id):
        log.warning("run %s is not in this MLflow store: the export is not logged or registered", run_id)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "parity_report.json").write_text(report.to_json(), encoding="utf-8")
        (t / "signature.json").write_text(json.dumps(sig, indent=2), encoding="utf-8")
        add_to_run(run_id, [t / "parity_report.json", t / "signature.json"], EXPORT_ARTIFACTS, {
            "parity_max_abs_diff": report.max_abs_diff, "parity_top1_agreement": report.top1_agreement,
            "parity_checkpoint_top1_agreement": report.checkpoint_top1_agreement, "export_temperature": temperature})
        with pyfunc_model_args(output, t / "code") as args:
            return register_pyfunc(run_id, name, report.summary(), force, candidate=output, measure=measure, **args)
