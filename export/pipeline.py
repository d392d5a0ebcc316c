"""The export stage end to end: which checkpoint, export, parity, write, log, register."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from meli.checkpoint import Checkpoint, load_checkpoint
from meli.demo_catalog import DEMO_DIR
from meli.errors import MeliError, ModelFileError
from meli.formats import AtomicWriter, iter_batches
from meli.onnx_model import load_onnx_model
from meli.calibration import coverage_table
from meli.tracking import (BEST_METRIC, CHECKPOINT_ARTIFACTS, EXPORT_ARTIFACTS, LATEST_ALIAS, REGISTERED_NAME, SERVING_ALIAS,
                           VALIDATION_SOURCE_TAG, check_store, mlflow_client, require_existing_store)
from meli.export.compaction import Precision
from meli.export.onnx_export import signature, to_onnx
from meli.export.parity import ParityReport, check_parity, require_parity

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path("artifacts/model.onnx")
DEFAULT_REGISTERED_NAME = REGISTERED_NAME


@dataclass(frozen=True)
class ChosenCheckpoint:
    checkpoint: Checkpoint
    path: Path
    run_id: str | None  # None: a checkpoint file outside MLflow
    validation_source: str | None


def best_run_id(experiment: str | None = None) -> str:
    """The finished run with the best validation balanced accuracy in `experiment`.

    No experiment named: the experiment of the most recent run, i.e. what was just trained.
    """
    require_existing_store("meli-export")
    check_store()
    client = mlflow_client()
    if experiment is None:
        exps = client.search_experiments()
        latest = client.search_runs([e.experiment_id for e in exps], order_by=["attribute.start_time DESC"], max_results=1) if exps else []
        if not latest:
            raise MeliError("no MLflow runs found; train a model first (make train)")
        exp = client.get_experiment(latest[0].info.experiment_id)
        log.info("no --experiment given: using %r, the experiment of the most recent run", exp.name)
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise MeliError(f"no MLflow experiment named {experiment!r}")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=[f"metrics.{BEST_METRIC} DESC"],
        max_results=50,
    )
    runs = [r for r in runs if BEST_METRIC in r.data.metrics]
    if not runs:
        raise MeliError(f"MLflow experiment {exp.name!r} has no finished training runs")
    return runs[0].info.run_id


def checkpoint_of_run(run_id: str) -> ChosenCheckpoint:
    import mlflow

    client = mlflow_client()
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - mlflow raises MlflowException subclasses
        raise MeliError(f"no MLflow run {run_id!r} in {mlflow.get_tracking_uri()}") from e
    artifacts = [a.path for a in client.list_artifacts(run_id, CHECKPOINT_ARTIFACTS)]
    if not artifacts:
        raise ModelFileError(f"MLflow run {run_id} has no checkpoint artifact")
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifacts[0]))
    return ChosenCheckpoint(load_checkpoint(local), local, run_id, run.data.tags.get(VALIDATION_SOURCE_TAG))


def choose_checkpoint(experiment: str | None = None, run_id: str | None = None, checkpoint: str | Path | None = None) -> ChosenCheckpoint:
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        return ChosenCheckpoint(ckpt, Path(checkpoint), ckpt.provenance.get("mlflow_run_id"), None)
    return checkpoint_of_run(run_id or best_run_id(experiment))


def parity_titles(path: str | Path | None, validation_source: str | None, max_rows: int | None) -> pa.Array:
    """Titles for the parity check: the given file, else the run's validation file, else the demo's."""
    if path is not None:
        source = Path(path)
        if not source.is_file():
            raise MeliError(f"{source}: no such file for the parity check")
    elif validation_source and Path(validation_source).is_file():
        source = Path(validation_source)
    else:
        source = DEMO_DIR / "validation.jsonl.gz"
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
    log.info("parity titles: %s", source)
    return titles.slice(0, max_rows) if max_rows else titles


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
    register_as: str | None = DEFAULT_REGISTERED_NAME,
    precision: Precision = "fp16",
    quantize: bool = True,
    force: bool = False,
) -> ExportOutcome:
    output = Path(output)
    writer = AtomicWriter(output)  # fails now, before any work, on a missing or read-only folder
    with writer:
        proto = to_onnx(chosen.checkpoint, {"checkpoint": chosen.path.name}, precision=precision, quantize=quantize)
        data = proto.SerializeToString()
        onnx_model = load_onnx_model(data, provider=provider)
        titles = parity_titles(parity_data, chosen.validation_source, parity_rows)
        report = check_parity(chosen.checkpoint, onnx_model, titles)
        log.info(report.summary())
        require_parity(report)
        writer.path.write_bytes(data)
        writer.commit()
    registered = None
    if chosen.run_id is not None and register_as:
        registered = log_export(chosen.run_id, output, report, signature(proto), register_as, chosen.checkpoint.temperature,
                                force)
    return ExportOutcome(output, report, chosen.run_id, registered)


def calibration_summary(ckpt: Checkpoint) -> str:
    """What `meli-export` prints about the baked-in temperature and the coverage it gives."""
    m = ckpt.metrics
    table = coverage_table(m)
    if not table:
        return f"temperature {ckpt.temperature:.3f} (no calibration report in this checkpoint)"
    return (f"calibration: temperature {ckpt.temperature:.3f} in the graph, fitted on validation by the train-only fit; "
            f"expected calibration error {m['calibration_ece_before']:.4f} -> {m['calibration_ece_after']:.4f}; "
            f"{m['calibration_coverage_at_99_after']:.1%} of validation titles at 99% accuracy\n"
            f"coverage on validation (train-only fit), calibrated:\n{table}")


def recheck(model_path: Path, *, checkpoint: str | Path | None = None, parity_data=None, parity_rows=None, provider="cpu") -> ParityReport:
    """`meli-export --check`: parity of an existing model.onnx against its own checkpoint."""
    onnx_model = load_onnx_model(model_path, provider=provider)
    run_id = onnx_model.card.provenance.get("mlflow_run_id")
    if checkpoint is None and not run_id:
        raise MeliError(f"{model_path}: carries no MLflow run id; pass --checkpoint")
    chosen = choose_checkpoint(run_id=run_id, checkpoint=checkpoint)
    report = check_parity(chosen.checkpoint, onnx_model, parity_titles(parity_data, chosen.validation_source, parity_rows))
    log.info(report.summary())
    return report


@dataclass(frozen=True)
class Registration:
    version: str  # "name/version"
    serving: bool  # whether the serving alias now points at this version
    reason: str  # why it moved or stayed


def log_export(run_id: str, output: Path, report: ParityReport, sig: dict, name: str, temperature: float = 1.0,
               force: bool = False) -> Registration | None:
    """Log the export to the checkpoint's run (parity report, signature, and the model as an
    MLflow pyfunc model: `meli.score.mlflow_model`), register that model as a new version of
    `name`, point ``@latest-export`` at it, and move the serving alias ``@champion`` to it
    only if its validation balanced accuracy is not below the current champion's (or `force`)."""
    import mlflow

    from meli.score.mlflow_model import log_pyfunc_model

    client = mlflow_client()
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001
        log.warning("run %s is not in this MLflow store: the export is not logged or registered", run_id)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "parity_report.json").write_text(report.to_json(), encoding="utf-8")
        (t / "signature.json").write_text(json.dumps(sig, indent=2), encoding="utf-8")
        for f in ("parity_report.json", "signature.json"):
            client.log_artifact(run_id, str(t / f), artifact_path=EXPORT_ARTIFACTS)
    for key, value in (("parity_max_abs_diff", report.max_abs_diff), ("parity_top1_agreement", report.top1_agreement),
                       ("parity_checkpoint_top1_agreement", report.checkpoint_top1_agreement),
                       ("export_temperature", temperature)):
        client.log_metric(run_id, key, value)
    with mlflow.start_run(run_id=run_id), _mlflow_quiet():
        info = log_pyfunc_model(output)
        _ensure_registered(client, name)
        version = mlflow.register_model(info.model_uri, name).version
    client.update_model_version(name, version, description=report.summary())
    client.set_registered_model_alias(name, LATEST_ALIAS, version)
    serving, reason = _serving_decision(client, name, run, force)
    if serving:
        client.set_registered_model_alias(name, SERVING_ALIAS, version)
    log.info("registered %s version %s (alias %s); %s", name, version, LATEST_ALIAS, reason)
    return Registration(f"{name}/{version}", serving, reason)


@contextlib.contextmanager
def _mlflow_quiet():
    """MLflow's advice while logging a pyfunc model (cloudpickle, type hints) and its printed
    "Created version" lines: this command reports the outcome itself, in one line."""
    level = logging.getLogger("mlflow").level
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("mlflow").setLevel(level)


def _serving_decision(client, name: str, run, force: bool) -> tuple[bool, str]:
    """The quality gate on the serving alias: (move it?, why)."""
    new = run.data.metrics.get(BEST_METRIC)
    try:
        current = client.get_model_version_by_alias(name, SERVING_ALIAS)
    except Exception:  # noqa: BLE001 - no version holds the alias yet
        return True, f"@{SERVING_ALIAS} set: no version held it"
    held = client.get_run(current.run_id).data.metrics.get(BEST_METRIC) if current.run_id else None
    if force:
        return True, f"@{SERVING_ALIAS} moved from version {current.version} (--force)"
    if held is None or (new is not None and new >= held):
        return True, (f"@{SERVING_ALIAS} moved from version {current.version}: validation balanced accuracy "
                      f"{_fmt(new)} >= {_fmt(held)}")
    return False, (f"@{SERVING_ALIAS} stays on version {current.version}: its validation balanced accuracy {_fmt(held)} "
                   f"is above this export's {_fmt(new)} (--force moves it anyway)")


def _fmt(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.4f}"


def _ensure_registered(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already registered
    return name
