"""The exported model as an MLflow pyfunc model: ``model.onnx`` plus the scoring code.

`meli-export` logs it to the training run and registers it, so a team finds it where it
finds its other models and loads it the MLflow way::

    model = mlflow.pyfunc.load_model("models:/meli-categorizer@champion")
    model.predict(pd.DataFrame({"title": ["Casco Moto Hawk Rebatible"]}))
    #              category  probability
    # 0  MOTORCYCLE_HELMETS        0.98

``mlflow models predict`` and ``mlflow.pyfunc.spark_udf`` work on it too. The logged model
carries ``model.onnx`` as an artifact and the ``meli`` core as code (no torch, no stage's
code), and its requirements are the scoring ones only. Predictions go
through the same function over Arrow record batches as `meli-score` and Spark
(`meli.scorer.Scorer.score_batches`).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

import mlflow.pyfunc
import pandas as pd

ARTIFACT = "model"  # the key of model.onnx among the logged model's artifacts
EXAMPLE_TITLES = ["Bolso Maternal Moderno Con Cambiador Y Correa", "Taladro Percutor Bosch 650w"]


class MeliPyfuncModel(mlflow.pyfunc.PythonModel):
    """pandas frame with a ``title`` column (or a list of titles) → ``category``, ``probability``."""

    def load_context(self, context) -> None:
        from meli.onnx_model import load_onnx_model
        from meli.scorer import ScoreConfig, Scorer

        self.scorer = Scorer(load_onnx_model(context.artifacts[ARTIFACT]), ScoreConfig(keep_columns=()))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # the type hint tells MLflow what the model takes (its logged signature says which columns)
        import pyarrow as pa

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"title": list(model_input)})
        if "title" not in frame.columns:
            raise ValueError(f"expected a 'title' column; got {', '.join(map(str, frame.columns))}")
        titles = pa.array([t if isinstance(t, str) else None for t in frame["title"]], pa.string())
        batch = pa.record_batch({"title": titles})
        out = pa.Table.from_batches(list(self.scorer.score_batches([batch])))
        # object dtype keeps a missing category None (a pandas string column would make it
        # NaN, which Spark's UDF bridge turns into the text "nan")
        return pd.DataFrame({"category": pd.Series(out.column("category").to_pylist(), dtype=object),
                             "probability": out.column("probability").to_numpy(zero_copy_only=False).astype("float32")})


def scoring_requirements() -> list[str]:
    """What loading and predicting needs, pinned to what this export ran with: no torch."""
    import numba
    import numpy
    import onnxruntime
    import pandas
    import pyarrow

    return [f"onnxruntime=={onnxruntime.__version__}", f"pyarrow=={pyarrow.__version__}", f"numpy=={numpy.__version__}",
            f"numba=={numba.__version__}", f"pandas=={pandas.__version__}", f"mlflow=={mlflow.__version__}"]


def _scoring_code(folder: Path) -> Path:
    """A ``meli`` package holding what scoring imports: the core modules (not the stages'
    code: training and export need torch)."""
    import meli

    target = folder / "meli"
    skip = shutil.ignore_patterns("__pycache__", "demo", "train", "export", "score")
    shutil.copytree(Path(meli.__file__).parent, target, ignore=skip)
    return target


@contextlib.contextmanager
def pyfunc_model_args(onnx_path: Path, folder: Path) -> Iterator[dict]:
    """The arguments of ``mlflow.pyfunc.log_model`` for `onnx_path` (`meli.tracking.register_pyfunc`
    makes the call): the model, its artifact and code (staged in `folder`), scoring-only
    requirements, signature and input example."""
    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame({"title": EXAMPLE_TITLES})
    probe = MeliPyfuncModel()  # loaded here only to infer the output schema; a fresh one is logged
    context = mlflow.pyfunc.PythonModelContext(artifacts={ARTIFACT: str(onnx_path)}, model_config={})
    probe.load_context(context)
    yield {
        "name": "model",
        "python_model": MeliPyfuncModel(),
        "artifacts": {ARTIFACT: str(onnx_path)},
        "code_paths": [str(_scoring_code(folder))],
        "pip_requirements": scoring_requirements(),
        "signature": infer_signature(example, probe.predict(context, example)),
        "input_example": example,
    }
