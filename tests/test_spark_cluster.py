"""--engine spark beyond local mode: Spark Connect, tables of the catalog, GPU executors.

The Connect server is started from the installed pyspark on a free loopback port and always
stopped (`spark_cluster.connect_server`); meli-score runs against it in a process of its own,
as a scheduler runs it (a Connect client turns the whole process into Connect mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from meli.score.cli import main as score_main
from test_spark import lake  # noqa: F401 - the same four-part dataset with null and empty titles

pytest.importorskip("pyspark", reason="pip install 'meli-categorizer[spark]'")
pytest.importorskip("grpc", reason="Spark Connect's client: pip install 'meli-categorizer[spark]'")
pytestmark = pytest.mark.spark

CIRCUMSTANCES = ("created_at", "input", "output", "engine")


def run(*args):
    return CliRunner().invoke(score_main, [str(a) for a in args] + ["--quiet"])


def meli_score(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meli.score", *map(str, args), "--quiet"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from spark_cluster import connect_server

    with connect_server(tmp_path_factory.mktemp("connect")) as url:
        yield url


def assert_same_answers(got: pa.Table, expected: pa.Table) -> None:
    got, expected = got.sort_by("id"), expected.sort_by("id")
    assert got["id"].to_pylist() == expected["id"].to_pylist()
    assert got["category"].to_pylist() == expected["category"].to_pylist()
    a = got["probability"].to_numpy(zero_copy_only=False).astype(float)
    b = expected["probability"].to_numpy(zero_copy_only=False).astype(float)
    assert np.array_equal(a, b, equal_nan=True)


def test_spark_connect_scores_and_reports_as_meli_score(server, lake, exported, tmp_path):
    model = exported["mlp"]  # int8 products with a scale per title: the same answer bit for bit
    assert run(lake, tmp_path / "local.parquet", "--model", model, "--report", tmp_path / "local.html").exit_code == 0
    proc = meli_score(lake, tmp_path / "out", "--model", model, "--engine", "spark", "--spark-remote", server,
                      "--report", tmp_path / "connect.html")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]  # --quiet: nothing on stderr
    assert_same_answers(pq.read_table(tmp_path / "out"), pq.read_table(tmp_path / "local.parquet"))
    local = json.loads((tmp_path / "local.json").read_text())
    connect = json.loads((tmp_path / "connect.json").read_text())
    assert connect["engine"] == "spark-connect" and connect["rows"] == 2000
    assert {k: v for k, v in connect.items() if k not in CIRCUMSTANCES} == {k: v for k, v in local.items() if k not in CIRCUMSTANCES}


def test_spark_remote_comes_from_the_environment_and_checks_before_any_task(server, lake, exported, tmp_path):
    numbers = tmp_path / "numbers"
    numbers.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "title": [3, 4]}), numbers / "part-0.parquet")
    proc = meli_score(numbers, tmp_path / "out", "--model", exported["mlp"], "--engine", "spark",
                      env={"SPARK_REMOTE": server})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines == ["Error: title column 'title' holds int64, not strings"], proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_spark_connect_url_nothing_answers_fails_in_seconds(exported, lake, tmp_path):
    from spark_cluster import free_port

    started = time.monotonic()
    result = run(lake, tmp_path / "out", "--model", exported["mlp"], "--engine", "spark",
                 "--spark-remote", f"sc://127.0.0.1:{free_port()}")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("Error: --spark-remote: sc://127.0.0.1:") and "no Spark Connect server answers" in result.output
    assert time.monotonic() - started < 30
    bad = run(lake, tmp_path / "out", "--model", exported["mlp"], "--engine", "spark", "--spark-remote", "http://x:1")
    assert bad.exit_code == 1 and "not a Spark Connect URL" in bad.output
    both = run(lake, tmp_path / "out", "--model", exported["mlp"], "--spark-remote", "sc://x:1")
    assert both.exit_code == 2 and "need --engine spark" in both.output


def test_tables_in_and_out_of_the_catalog(lake, exported, tmp_path):
    from meli.score.spark import spark_session

    model = exported["mlp"]
    spark = spark_session("local[2]")
    spark.read.parquet(str(lake)).write.mode("overwrite").saveAsTable("catalog_tonight")
    assert run(lake, tmp_path / "local.parquet", "--model", model).exit_code == 0
    result = run("table:catalog_tonight", "table:scored_tonight", "--model", model, "--engine", "spark")
    assert result.exit_code == 0, (result.output, result.exception)
    scored = pa.Table.from_pandas(spark.read.table("scored_tonight").toPandas(), preserve_index=False)
    assert_same_answers(scored, pq.read_table(tmp_path / "local.parquet"))
    # a job that fails in its tasks leaves the previous table as it was
    bad = pa.array([b"Casco Moto", b"Taladro \xff\xfe"], pa.binary()).view(pa.string())
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "title": bad}), tmp_path / "bad" / "part-0.parquet")
    spark.read.parquet(str(tmp_path / "bad")).write.mode("overwrite").saveAsTable("bad_titles")
    failed = run("table:bad_titles", "table:scored_tonight", "--model", model, "--engine", "spark")
    assert failed.exit_code == 1 and "invalid UTF-8" in failed.output and failed.output.count("\n") == 1
    assert spark.read.table("scored_tonight").count() == 2000
    assert not [t.name for t in spark.catalog.listTables() if "__meli_" in t.name]  # no staging table left
    missing = run("table:no_such_table", tmp_path / "o", "--model", model, "--engine", "spark")
    assert missing.exit_code == 1 and missing.output.startswith("Error: table:no_such_table: no such table")
    local = run("table:catalog_tonight", tmp_path / "o.parquet", "--model", model)
    assert local.exit_code == 2 and "need --engine spark" in local.output


def test_cuda_scoring_asks_spark_for_one_gpu_per_task():
    from meli.score.spark import gpu_profile

    profile = gpu_profile()
    requests = profile.taskResources
    assert set(requests) == {"gpu"} and requests["gpu"].amount == 1.0
