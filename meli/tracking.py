"""Everything the stages do with MLflow's tracking and registry, in one place: where runs
live, which experiment a dataset's runs go to, the names the stages hand each other, the
store checks, writing a training run (`RunRecorder`), reading runs back (`best_run_id`,
`run_checkpoint`), and registering an export behind the serving alias's quality gate
(`register_pyfunc`). The stages call these, never mlflow's tracking API; only the pyfunc
model's own class (`meli.pyfunc`) is written against ``mlflow.pyfunc``.

Default store: a SQLite file ``mlflow.db`` in the current folder (the project folder when run
through ``make``), artifacts in ``./mlruns``; ``MLFLOW_TRACKING_URI`` overrides it. See them with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``. mlflow is imported only inside these
functions: it is large and slow to import, and scoring a file does not need it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, urlparse

from meli.errors import MeliError, ModelFileError, first_line

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
# The names the stages pass to each other through MLflow: meli-train writes them, meli-export
# and meli-score read them. One place, so that a rename cannot break the hand-over silently.
FINGERPRINT_TAG = "meli.data_fingerprint"  # runs on different data never share an experiment
MODEL_TAG = "meli.model"  # mlp | cnn
TRAIN_SOURCE_TAG = "meli.train_source"
VALIDATION_SOURCE_TAG = "meli.validation_source"  # meli-export's default parity titles (absolute path)
HELD_OUT = " (held out)"  # VALIDATION_SOURCE_TAG of a run without a validation file: the train file + this
VALIDATION_SHA256_TAG = "meli.validation_sha256"  # that file's bytes as the run read them: checked at export
DEVICE_TAG = "meli.device"
CHECKPOINT_ARTIFACTS = "checkpoint"  # <run_id>.pt: the one copy of the checkpoint
REPORT_ARTIFACTS = "report"  # curves, per-category and coverage tables, calibration plot
EXPORT_ARTIFACTS = "export"  # parity_report.json, signature.json
BEST_PREFIX = "best_"  # the selection fit's metrics at its best epoch, logged once per run
BEST_METRIC = "best_val_balanced_accuracy"  # how meli-export picks a run
REGISTERED_NAME = "meli-categorizer"
LATEST_ALIAS = "latest-export"  # always the newest export
SCORING_EXPERIMENT = "meli-scoring"  # meli-score --track: one run per scoring run, for comparing nights
SERVING_ALIAS = "champion"  # moves only to an export at least as accurate (or --force)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def require_existing_store(what: str) -> None:
    """Reading from the default store needs it to exist: opening a missing SQLite file would
    create an empty ``mlflow.db`` in the current folder (a side effect, and a confusing
    "no runs" later). Stores named by ``MLFLOW_TRACKING_URI`` are the user's to manage."""
    if "MLFLOW_TRACKING_URI" not in os.environ and not (Path.cwd() / DEFAULT_DB).is_file():
        raise MeliError(f"{what}: no MLflow store here (no {DEFAULT_DB} in {Path.cwd()}); run from the folder "
                        "that holds it, or set MLFLOW_TRACKING_URI")


def check_store(timeout_s: float = 5.0) -> None:
    """Refuse a store that cannot work, before any work starts: an http(s) tracking server
    that does not answer (the MLflow client would retry with back-off for minutes), or a
    SQLite path that is a folder or sits in a folder that cannot be written."""
    uri = tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout_s).close()
        except OSError as e:
            raise MeliError(f"MLflow tracking server {uri}: unreachable ({e.strerror or e})") from e
    elif parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and ":memory:" not in uri:
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        folder = next((f for f in [db.parent, *db.parent.parents] if f.exists()), Path("/"))
        if db.exists() and not db.is_file():
            raise MeliError(f"MLflow store {uri}: {db} is not a file")
        if (db.exists() and not os.access(db, os.W_OK)) or not os.access(folder, os.W_OK):
            raise MeliError(f"MLflow store {uri}: not writable")


def mlflow_client():
    import mlflow
    from mlflow.tracking import MlflowClient

    # mlflow sets up its own loggers on import; its database set-up chatter is noise here
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    if not sys.stderr.isatty():  # MLflow's own download bars: only on a terminal, like ours
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def experiment_for(name: str, fingerprint: str) -> str:
    """The id of experiment `name` (created if new), refusing one that holds other data's runs.

    "Best run" must compare like with like: runs on different data never share an experiment.
    """
    client = mlflow_client()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if "MLFLOW_TRACKING_URI" not in os.environ:
            location = (Path.cwd() / DEFAULT_ARTIFACTS).resolve().as_uri()
        return client.create_experiment(name, artifact_location=location, tags={FINGERPRINT_TAG: fingerprint})
    other = exp.tags.get(FINGERPRINT_TAG)
    if other is not None and other != fingerprint and not client.search_runs(
            [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=1):
        # no run of that data ever finished (a refused or failed one): the experiment is not theirs
        client.set_experiment_tag(exp.experiment_id, FINGERPRINT_TAG, fingerprint)
        return exp.experiment_id
    if other is not None and other != fingerprint:
        raise MeliError(
            f"MLflow experiment {name!r} holds runs on other data (fingerprint {other}, this data is "
            f"{fingerprint}); pass another --experiment so that runs on different data never compete"
        )
    return exp.experiment_id


def resolve_model_uri(model: str | os.PathLike) -> Path:
    """A path, or ``models:/<name>/<version>`` / ``models:/<name>@<alias>``, to a local .onnx file."""
    model = os.fspath(model)
    if not model.startswith("models:/"):
        return Path(model)
    import mlflow

    require_existing_store(model)
    check_store()
    mlflow_client()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except Exception as e:  # noqa: BLE001 - mlflow raises many kinds
        raise ModelFileError(f"{model}: cannot resolve in the MLflow registry ({first_line(e)[:200]})") from e
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if not found:
        raise ModelFileError(f"{model}: the registered version holds no .onnx file")
    return found[0]


# ----------------------------------------------------------------------------- writing a run
@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """A failing MLflow store (unreachable, read-only, full) as one clear error."""
    try:
        yield
    except MeliError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow and its stores raise many kinds
        raise MeliError(f"MLflow store {tracking_uri()}: cannot record the run ({first_line(e)[:300]})") from e


class RunRecorder:
    """One MLflow run as meli-train writes it: the stages call this, never mlflow."""

    def __init__(self, run):
        self._run = run
        self.run_id: str = run.info.run_id

    @classmethod
    @contextlib.contextmanager
    def open(cls, experiment_id: str, run_id: str | None = None) -> Iterator["RunRecorder"]:
        """A new run in `experiment_id` (or run `run_id` again, to carry it on), ended
        (FINISHED, or FAILED on an error) on leaving."""
        import mlflow

        mlflow_client()  # sets the tracking URI for the fluent API
        with store_errors():
            run = mlflow.start_run(experiment_id=experiment_id, run_id=run_id)
        with run:
            yield cls(run)

    def tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def params(self, params: dict[str, object]) -> None:
        import mlflow

        mlflow.log_params({k: str(v) for k, v in params.items()})

    def json(self, data: dict, name: str) -> None:
        import mlflow

        mlflow.log_dict(data, name)

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def files(self, paths, folder: str) -> None:
        import mlflow

        for path in paths:
            mlflow.log_artifact(str(path), artifact_path=folder)

    def table(self, columns: dict[str, list], name: str) -> None:
        import mlflow

        mlflow.log_table(columns, artifact_file=name)

    def location(self, path_in_run: str) -> Path | str:
        """Where an artifact of this run is: a local path for a file store, else its URI."""
        import mlflow

        parsed = urlparse(mlflow.get_artifact_uri(path_in_run))
        return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else parsed.geturl()


def log_scoring_run(metrics: dict[str, float], tags: dict[str, str], files, run_name: str) -> str:
    """One run in `SCORING_EXPERIMENT` (made on first use): `metrics`, `tags`, `files` as
    artifacts under ``report/``. Returns the run id."""
    import mlflow

    client = mlflow_client()
    with store_errors(), _quiet():
        # by id, not mlflow.set_experiment: that would leave this experiment active for the process
        found = client.get_experiment_by_name(SCORING_EXPERIMENT)
        experiment_id = found.experiment_id if found else client.create_experiment(SCORING_EXPERIMENT)
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
            mlflow.set_tags(tags)
            mlflow.log_metrics(metrics)
            for path in files:
                mlflow.log_artifact(str(path), artifact_path="report")
        return run.info.run_id


# ----------------------------------------------------------------------------- reading runs
def best_run_id(experiment: str | None = None) -> str:
    """The finished run with the best `BEST_METRIC` in `experiment`; no experiment named: the
    experiment of the most recent run, i.e. what was just trained."""
    require_existing_store("meli-export")
    check_store()
    client = mlflow_client()
    if experiment is None:
        exps = client.search_experiments()
        latest = client.search_runs([e.experiment_id for e in exps], order_by=["attribute.start_time DESC"],
                                    max_results=1) if exps else []
        if not latest:
            raise MeliError("no MLflow runs found; train a model first (make train)")
        exp = client.get_experiment(latest[0].info.experiment_id)
        log.info("no --experiment given: using %r, the experiment of the most recent run", exp.name)
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise MeliError(f"no MLflow experiment named {experiment!r}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=[f"metrics.{BEST_METRIC} DESC"], max_results=50)
    runs = [r for r in runs if BEST_METRIC in r.data.metrics]
    if not runs:
        raise MeliError(f"MLflow experiment {exp.name!r} has no finished training runs")
    return runs[0].info.run_id


def run_checkpoint(run_id: str) -> tuple[Path, dict[str, str]]:
    """A run's checkpoint file, downloaded if the store is remote, and the run's tags."""
    import mlflow

    client = mlflow_client()
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - mlflow raises MlflowException subclasses
        raise MeliError(f"no MLflow run {run_id!r} in {tracking_uri()}") from e
    artifacts = [a.path for a in client.list_artifacts(run_id, CHECKPOINT_ARTIFACTS)]
    if not artifacts:
        raise ModelFileError(f"MLflow run {run_id} has no checkpoint artifact")
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifacts[0])), dict(run.data.tags)


# ----------------------------------------------------------------------------- exports and the registry
@dataclass(frozen=True)
class Registration:
    version: str  # "name/version"
    serving: bool  # whether the serving alias now points at this version
    reason: str  # why it moved or stayed


def has_run(run_id: str) -> bool:
    try:
        mlflow_client().get_run(run_id)
        return True
    except Exception:  # noqa: BLE001
        return False


def add_to_run(run_id: str, files, folder: str, metrics: dict[str, float]) -> None:
    """Files and metrics added to a finished run (meli-export's parity report, signature)."""
    client = mlflow_client()
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=folder)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)


Measure = Callable[[Path], "Measured"]


@dataclass(frozen=True)
class Measured:
    """A model file's balanced accuracy on the candidate's labelled titles."""

    balanced_accuracy: float
    titles: int
    source: str


def register_pyfunc(run_id: str, registered_name: str, description: str, force: bool, *, candidate: Path,
                    measure: Measure | None = None, **log_model_args) -> Registration:
    """Log a pyfunc model (``mlflow.pyfunc.log_model(**log_model_args)``) to the run, register
    it as a new version of `registered_name`, point `LATEST_ALIAS` at it, and move `SERVING_ALIAS`
    to it through the gate (`_serving_decision`): only a model of the same data, measured on the
    same titles as the `candidate` file, and no worse (or with `force`)."""
    import mlflow

    name = registered_name
    client = mlflow_client()
    with mlflow.start_run(run_id=run_id), _quiet():
        info = mlflow.pyfunc.log_model(**log_model_args)
        try:
            client.create_registered_model(name)
        except Exception:  # noqa: BLE001 - already registered
            pass
        version = mlflow.register_model(info.model_uri, name).version
    client.update_model_version(name, version, description=description)
    client.set_registered_model_alias(name, LATEST_ALIAS, version)
    serving, reason = _serving_decision(client, name, client.get_run(run_id), force, candidate, measure)
    if serving:
        client.set_registered_model_alias(name, SERVING_ALIAS, version)
    log.info("registered %s version %s (alias %s); %s", name, version, LATEST_ALIAS, reason)
    return Registration(f"{name}/{version}", serving, reason)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's advice while logging a pyfunc model (cloudpickle, type hints) and its printed
    "Created version" lines: the command reports the outcome itself, in one line."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _serving_decision(client, name: str, run, force: bool, candidate: Path, measure: Measure | None) -> tuple[bool, str]:
    """The quality gate on the serving alias: (move it?, why). A champion of other data, or
    one whose run or file cannot be read, is never replaced without `force`; one of the same
    data is replaced when the candidate file scores at least as well on the candidate's
    labelled titles, both exported files scored the same way."""
    try:
        current = client.get_model_version_by_alias(name, SERVING_ALIAS)
    except Exception:  # noqa: BLE001 - no version holds the alias yet
        return True, f"@{SERVING_ALIAS} set: no version held it"
    if force:
        return True, f"@{SERVING_ALIAS} moved from version {current.version} (--force)"
    stays = f"@{SERVING_ALIAS} stays on version {current.version}"
    try:
        held = client.get_run(current.run_id)
    except Exception as e:  # noqa: BLE001 - deleted run, other store
        return False, f"{stays}: its run cannot be read ({first_line(e)[:120]}); --force moves it"
    mine, theirs = run.data.tags.get(FINGERPRINT_TAG), held.data.tags.get(FINGERPRINT_TAG)
    if not mine or mine != theirs:
        return False, (f"{stays}: it was trained on other data (data fingerprint {theirs or 'unknown'}, this export's "
                       f"{mine or 'unknown'}); register this one under another --register-name, or --force")
    if measure is None:
        return False, f"{stays}: no labelled titles to compare the two on; --force moves it"
    try:
        import mlflow

        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{current.version}"))
        files = sorted(folder.rglob("*.onnx"))
        if not files:
            raise ModelFileError(f"version {current.version} holds no .onnx file")
        champion, challenger = measure(files[0]), measure(candidate)
    except Exception as e:  # noqa: BLE001 - an unreadable artifact or model file
        return False, f"{stays}: its model could not be scored ({first_line(e)[:160]}); --force moves it"
    figures = (f"balanced accuracy on {challenger.titles:,} titles of {challenger.source}: this export "
               f"{_fmt(challenger.balanced_accuracy)}, version {current.version} {_fmt(champion.balanced_accuracy)}")
    if challenger.balanced_accuracy >= champion.balanced_accuracy:
        return True, f"@{SERVING_ALIAS} moved from version {current.version}: {figures}"
    return False, f"{stays}: {figures} (--force moves it anyway)"


def _fmt(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.4f}"
