"""Where MLflow runs live, and which experiment a dataset's runs go to.

Default store: a SQLite file ``mlflow.db`` in the current folder (the project folder when run
through ``make``), artifacts in ``./mlruns``; ``MLFLOW_TRACKING_URI`` overrides it. See them with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``. mlflow is imported only inside these
functions: it is large and slow to import, and scoring a file does not need it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from meli.errors import MeliError, ModelFileError

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
FINGERPRINT_TAG = "meli.data_fingerprint"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def mlflow_client():
    import mlflow
    from mlflow.tracking import MlflowClient

    # mlflow sets up its own loggers on import; its database set-up chatter is noise here
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

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

    mlflow_client()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except Exception as e:  # noqa: BLE001 - mlflow raises many kinds
        raise ModelFileError(f"{model}: cannot resolve in the MLflow registry ({str(e).splitlines()[0][:200]})") from e
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if not found:
        raise ModelFileError(f"{model}: the registered version holds no .onnx file")
    return found[0]
