"""`make bench-determinism`: does a title's answer depend on anything but the title and the model file?

Scores the same catalog of recombined real titles (never seen in training) with each model
file many ways, each in a process of its own as a user would run it, and counts the titles
whose category differs from the plain ``meli-score`` run, with the largest change of a
probability: other batch sizes, one thread, the first 2,000 titles alone, ``--engine spark``
in ``local[2]`` over 4 part files (when pyspark is installed), and the MLflow pyfunc model.

    python bench/determinism.py --model "default=artifacts/model.onnx" --model "float=model-float.onnx"
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from score_speed import make_catalog  # noqa: E402


def meli_score(inp: Path, out: Path, model: str, *extra: str) -> pa.Table:
    proc = subprocess.run([sys.executable, "-m", "meli.score", str(inp), str(out), "--model", model, "--quiet", *extra],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"meli-score {' '.join(extra)} failed:\n{proc.stderr}")
    return pq.read_table(out)


def differences(got: pa.Table, reference: pa.Table) -> tuple[int, float]:
    """(titles whose category differs, largest |change| of a probability), matched by id."""
    ref = reference.filter(pc.is_in(reference["id"], got["id"])).sort_by("id")
    got = got.sort_by("id")
    categories = sum(a != b for a, b in zip(got["category"].to_pylist(), ref["category"].to_pylist()))
    a, b = (t["probability"].to_numpy(zero_copy_only=False).astype(np.float64) for t in (got, ref))
    return categories, float(np.nanmax(np.abs(a - b), initial=0.0))


def pyfunc_scores(model: str, catalog: pa.Table, folder: Path) -> pa.Table:
    import mlflow
    import pandas as pd

    from meli.pyfunc import pyfunc_model_args

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = mlflow.create_experiment("meli-determinism", artifact_location=(folder / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=experiment), pyfunc_model_args(Path(model), folder / "code") as args:
        info = mlflow.pyfunc.log_model(**args)
    predicted = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"title": catalog["title"].to_pylist()}))
    return pa.table({"id": catalog["id"], "category": pa.array(predicted["category"].tolist(), pa.string()),
                     "probability": pa.array(predicted["probability"].to_numpy(), pa.float32())})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME=FILE", help="a model file (repeatable)")
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--write", type=Path, help="also write the table to this Markdown file")
    args = ap.parse_args()
    models = dict(m.partition("=")[::2] for m in args.model)
    try:
        import pyspark  # noqa: F401
        spark = True
    except ImportError:
        spark = False
    results: dict[str, dict[str, tuple[int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        catalog = t / "catalog.parquet"
        source = make_catalog(catalog, args.rows, seed=12345)
        table = pq.read_table(catalog)
        head = t / "head.parquet"
        pq.write_table(table.slice(0, 2000), head)
        lake = t / "lake"
        lake.mkdir()
        quarter = -(-table.num_rows // 4)
        for i in range(4):
            pq.write_table(table.slice(i * quarter, quarter), lake / f"part-{i}.parquet")
        for name, model in models.items():
            reference = meli_score(catalog, t / "ref.parquet", model)
            rows = {f"--batch-size {n:,}": differences(meli_score(catalog, t / "o.parquet", model, "--batch-size", str(n)), reference)
                    for n in (1000, 4096, 65536)}
            rows["--threads 1"] = differences(meli_score(catalog, t / "o.parquet", model, "--threads", "1"), reference)
            rows["the first 2,000 titles alone"] = differences(meli_score(head, t / "o.parquet", model), reference)
            if spark:
                rows["--engine spark --spark-master local[2] (4 part files)"] = differences(
                    meli_score(lake, t / "spark", model, "--engine", "spark", "--spark-master", "local[2]"), reference)
            rows["the MLflow pyfunc model, one frame"] = differences(pyfunc_scores(model, table, t / name.replace(" ", "_")),
                                                                     reference)
            results[name] = rows
            print(f"{name}: {rows}", file=sys.stderr)
    lines = [f"{dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores; {args.rows:,} recombined titles from {source}",
             "", "Titles whose category differs from the plain `meli-score` run (largest \\|Δprobability\\|):", "",
             "| same titles, same model file, scored … | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for what in next(iter(results.values())):
        lines.append(f"| {what} | " + " | ".join(f"{results[n][what][0]} ({results[n][what][1]:.1e})" for n in models) + " |")
    print("\n".join(lines))
    if args.write:
        from results import write_results

        write_results(args.write, "Same title, same answer (`make bench-determinism`)", lines)


if __name__ == "__main__":
    main()
