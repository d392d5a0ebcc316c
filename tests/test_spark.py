"""meli-score --engine spark: Spark's mapInArrow over the same scoring core, in local[2]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from meli.score.cli import main as score_main
from test_score import TITLES

pytest.importorskip("pyspark", reason="pip install 'meli-categorizer[spark]'")
pytestmark = pytest.mark.spark


def run(*args):
    return CliRunner().invoke(score_main, [str(a) for a in args] + ["--quiet"])


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """A multi-file Parquet dataset with null and empty titles."""
    folder = tmp_path_factory.mktemp("lake") / "catalog"
    folder.mkdir()
    titles = TITLES * 250
    for part in range(4):
        rows = range(part * 500, (part + 1) * 500)
        pq.write_table(pa.table({"id": pa.array(list(rows), pa.int64()), "title": [titles[i] for i in rows],
                                 "seller": [f"s{i % 7}" for i in rows]}), folder / f"part-{part:05d}.parquet")
    return folder


def test_spark_scores_every_row_as_the_local_engine_does(lake, exported, tmp_path):
    model = exported["ensemble"]
    local, spark = tmp_path / "local.parquet", tmp_path / "spark"
    assert run(lake, local, "--model", model).exit_code == 0
    result = run(lake, spark, "--model", model, "--engine", "spark", "--spark-master", "local[2]", "--batch-size", "300")
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.output == ""  # --quiet: nothing but errors
    expected = pq.read_table(local).sort_by("id")
    got = pq.read_table(spark).sort_by("id")
    assert got.column_names == ["id", "seller", "category", "probability"]
    assert got["id"].to_pylist() == expected["id"].to_pylist() == list(range(2000))
    assert got["seller"].to_pylist() == expected["seller"].to_pylist()
    assert got["category"].to_pylist() == expected["category"].to_pylist()
    assert got["category"].null_count == expected["category"].null_count > 0  # null and empty titles
    a = got["probability"].to_numpy(zero_copy_only=False).astype(float)
    b = expected["probability"].to_numpy(zero_copy_only=False).astype(float)
    assert np.allclose(a, b, atol=1e-6, equal_nan=True)
    # a second run replaces the folder only once it is complete
    assert run(lake, spark, "--model", model, "--engine", "spark", "--spark-master", "local[2]").exit_code == 0
    assert pq.read_table(spark).num_rows == 2000 and not list(tmp_path.glob(".spark.*"))


def test_spark_fails_before_any_task_with_one_line(lake, exported, tmp_path):
    no_title = tmp_path / "nt"
    no_title.mkdir()
    pq.write_table(pa.table({"id": [1], "name": ["Casco"]}), no_title / "part-0.parquet")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    cases = [
        ([no_title, tmp_path / "o1", "--model", exported["mlp"]], "no title column 'title'; the input has: id, name"),
        ([lake, tmp_path / "o2", "--model", junk], "junk.onnx: not a loadable ONNX model"),
        ([lake, tmp_path / "o3", "--model", exported["mlp"], "--keep-columns", "nope"], "--keep-columns: no column(s) nope"),
    ]
    for args, message in cases:
        result = run(*args, "--engine", "spark", "--spark-master", "local[2]")
        assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output, result.output
        assert result.output.count("\n") == 1
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_the_mlflow_model_works_as_a_spark_udf(lake, exported, tmp_path, monkeypatch):
    import mlflow

    from meli.pyfunc import pyfunc_model_args
    from meli.score.spark import spark_session

    model = exported["ensemble"]
    assert run(lake, tmp_path / "local.parquet", "--model", model).exit_code == 0
    expected = pq.read_table(tmp_path / "local.parquet").sort_by("id")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run(), pyfunc_model_args(model, tmp_path / "code") as args:
        info = mlflow.pyfunc.log_model(**args)
    spark = spark_session("local[2]")
    udf = mlflow.pyfunc.spark_udf(spark, info.model_uri, result_type="category string, probability float")
    df = spark.read.parquet(str(lake))
    rows = df.withColumn("p", udf("title")).select("id", "p.category", "p.probability").orderBy("id").collect()
    # MLflow's UDF bridge casts each string field with numpy, so a missing category arrives as
    # the text "None" (its probability stays NaN): meli-score --engine spark keeps real nulls
    got = [None if r["category"] == "None" else r["category"] for r in rows]
    assert got == expected["category"].to_pylist()
    b = expected["probability"].to_numpy(zero_copy_only=False).astype(float)
    assert np.allclose([np.nan if r["probability"] is None else r["probability"] for r in rows], b, atol=1e-6,
                       equal_nan=True)


def test_quiet_spark_is_quiet_in_the_process_too(lake, exported, tmp_path):
    """--quiet with --engine spark, as a nightly job runs it (a process, stderr to a file): an
    empty stderr on success, one Error line quoting the JVM's reason on a bad master URL."""
    import subprocess
    import sys

    meli_score = [str(Path(sys.executable).parent / "meli-score")]
    ok = subprocess.run(meli_score + [str(lake), str(tmp_path / "out"), "--model", str(exported["mlp"]), "--engine", "spark",
                                      "--spark-master", "local[1]", "--quiet"], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr[-3000:]
    bad = subprocess.run(meli_score + [str(lake), str(tmp_path / "out2"), "--model", str(exported["mlp"]), "--engine", "spark",
                                       "--spark-master", "bogus://nowhere", "--quiet"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 1 and bad.stderr == ("Error: --spark-master: bogus://nowhere: Spark did not start (Master must "
                                                  "either be yarn or start with spark, k8s, or local)\n"), bad.stderr[-3000:]


def test_spark_reports_what_changed_since_last_night_as_the_local_engine(lake, exported, tmp_path):
    """--previous with --engine spark: the same counts as the local engine gives, read from the
    output folder Spark wrote; last night may be a local file or a Spark folder."""
    import json

    model = exported["mlp"]
    assert run(lake, tmp_path / "last.parquet", "--model", model).exit_code == 0
    local = run(lake, tmp_path / "local.parquet", "--model", model, "--report", tmp_path / "local.html",
                "--previous", tmp_path / "last.parquet")
    assert local.exit_code == 0, local.output
    spark = run(lake, tmp_path / "spark", "--model", model, "--engine", "spark", "--spark-master", "local[2]",
                "--report", tmp_path / "spark.html", "--previous", tmp_path / "last.parquet")
    assert spark.exit_code == 0, (spark.output, spark.exception)
    a = json.loads((tmp_path / "local.json").read_text())["changes"]
    b = json.loads((tmp_path / "spark.json").read_text())["changes"]
    assert {k: a[k] for k in ("ids_both_nights", "changed", "new_ids", "gone_ids", "model_changed")} == \
           {k: b[k] for k in ("ids_both_nights", "changed", "new_ids", "gone_ids", "model_changed")} == \
           {"ids_both_nights": 2000, "changed": 0, "new_ids": 0, "gone_ids": 0, "model_changed": False}
    again = run(lake, tmp_path / "local2.parquet", "--model", model, "--report", tmp_path / "again.html",
                "--previous", tmp_path / "spark")
    assert again.exit_code == 0 and json.loads((tmp_path / "again.json").read_text())["changes"]["changed"] == 0
