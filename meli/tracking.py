"""Where MLflow runs live, and which experiment a dataset's runs go to.

Default store: a SQLite file ``mlflow.db`` in the current folder (the project folder when run
through ``make``), artifacts in ``./mlruns``; ``MLFLOW_TRACKING_URI`` overrides it. See them with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``. mlflow is imported only inside these
functions: it is large and slow to import, and scoring a file does not need it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from meli.errors import MeliError, ModelFileError

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
# The names the stages pass to each other through MLflow: meli-train writes them, meli-export
# and meli-score read them. One place, so that a rename cannot break the hand-over silently.
FINGERPRINT_TAG = "meli.data_fingerprint"  # runs on different data never share an experiment
MODEL_TAG = "meli.model"  # mlp | cnn
TRAIN_SOURCE_TAG = "meli.train_source"
VALIDATION_SOURCE_TAG = "meli.validation_source"  # meli-export's default parity titles
DEVICE_TAG = "meli.device"
CHECKPOINT_ARTIFACTS = "checkpoint"  # <run_id>.pt: the one copy of the checkpoint
REPORT_ARTIFACTS = "report"  # curves, per-category and coverage tables, calibration plot
EXPORT_ARTIFACTS = "export"  # parity_report.json, signature.json
BEST_PREFIX = "best_"  # the selection fit's metrics at its best epoch, logged once per run
BEST_METRIC = "best_val_balanced_accuracy"  # how meli-export picks a run and gates @champion
REGISTERED_NAME = "meli-categorizer"
LATEST_ALIAS = "latest-export"  # always the newest export
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
    if other is not None and other != fingerprint:
        raise MeliError(
            f"MLflow experiment {name!r} holds runs on other data (fingerprint {other}, this data is "
            f"{fingerprint}); pass another --experiment so that runs on different data never compete"
        )
    return exp.experiment_id


def resolve_model_uri(model: str) -> Path:
    """A path, or ``models:/<name>/<version>`` / ``models:/<name>@<alias>``, to a local .onnx file."""
    if not model.startswith("models:/"):
        return Path(model)
    import mlflow

    require_existing_store(model)
    check_store()
    mlflow_client()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except Exception as e:  # noqa: BLE001 - mlflow raises many kinds
        raise ModelFileError(f"{model}: cannot resolve in the MLflow registry ({str(e).splitlines()[0][:200]})") from e
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if not found:
        raise ModelFileError(f"{model}: the registered version holds no .onnx file")
    return found[0]
