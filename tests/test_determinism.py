"""Same title, same answer: a title's category and probabilities depend on nothing but the
title and the model file: not the batch size, the threads, the input format, the row order,
the titles beside it or the engine that scores it.

Every kind of model file `meli-export` writes is checked, the shipped default first (float16
table, int8 products with a scale per title). The titles are the real validation titles of
``../shared/data`` where it exists, else the demo catalog's, plus the hostile ones (null,
empty, blank, unknown words only, very long).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from meli.demo_catalog import DEMO_DIR
from meli.formats import read_table
from meli.onnx_model import load_onnx_model
from meli.scorer import ScoreConfig, Scorer
from meli.score.job import ScoreJob
from meli.score.score import score_file

OPTIONS = ScoreConfig(top_k=3)
ATOL = 1e-6  # "probabilities within 1e-6"


@pytest.fixture(scope="module")
def titles() -> list[str | None]:
    real = SHARED_DATA / "meli-es" / "validation.jsonl.gz"
    found = read_table(real if real.is_file() else DEMO_DIR / "catalog.jsonl.gz").column("title").to_pylist()
    longest = max((t for t in found if t), key=len)
    hostile = [None, "", "   ", "qqqzzx wwvvkk", " ".join([longest] * 40), "ÁÉÍÓÚ ñandú ção", "12345 6789"]
    return hostile + found


@pytest.fixture(scope="module")
def catalog(titles, tmp_path_factory):
    """The titles as a Parquet file with an id, in several row groups."""
    path = tmp_path_factory.mktemp("det") / "catalog.parquet"
    pq.write_table(pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": pa.array(titles, pa.string())}),
                   path, row_group_size=997)
    return path


@pytest.fixture(scope="module")
def models(exported, exported_float, trained, tmp_path_factory):
    """Every kind of file meli-export writes: by default (the MLP and an ensemble), with a
    float32 table (which keeps float products), with float products, and a CNN."""
    from meli.export.onnx_export import to_onnx

    folder = tmp_path_factory.mktemp("kinds")
    fp32_table = folder / "fp32-table.onnx"
    fp32_table.write_bytes(to_onnx(trained["mlp"].checkpoint, precision="fp32", quantize=True).SerializeToString())
    return {"default": exported["mlp"], "ensemble": exported["ensemble"], "fp32-table": fp32_table,
            "float-products": exported_float["mlp"], "cnn": exported["cnn"]}


def scored(catalog, model, tmp_path, name="out.parquet", **kwargs) -> pa.Table:
    out = tmp_path / name
    score_file(catalog, out, ScoreJob(model=str(model), options=OPTIONS, quiet=True, **kwargs))
    return pq.read_table(out)


def assert_same_answers(got: pa.Table, expected: pa.Table) -> None:
    """Row for row by id: identical categories (and top-k names), probabilities within ATOL."""
    if got["id"].type != pa.int64():  # the CSV reader keeps every column as text
        got = got.set_column(got.column_names.index("id"), "id", got["id"].cast(pa.int64()))
    got, expected = got.sort_by("id"), expected.sort_by("id")
    assert got["id"].to_pylist() == expected["id"].to_pylist()
    assert got["category"].to_pylist() == expected["category"].to_pylist()
    assert got["top_categories"].to_pylist() == expected["top_categories"].to_pylist()
    for column in ("probability", "top_probabilities"):
        a, b = (np.array([np.nan if v is None else v for v in _flat(t[column])], dtype=np.float64) for t in (got, expected))
        assert np.array_equal(np.isnan(a), np.isnan(b))
        assert np.nanmax(np.abs(a - b), initial=0.0) <= ATOL, column


def _flat(column: pa.ChunkedArray) -> list:
    values = column.to_pylist()
    return [x for v in values for x in (v if isinstance(v, list) else [v])] if pa.types.is_list(column.type) else values


KINDS = ["default", "ensemble", "fp32-table", "float-products", "cnn"]


@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_and_threads_change_nothing(kind, models, catalog, tmp_path):
    reference = scored(catalog, models[kind], tmp_path, "ref.parquet")
    assert reference.num_rows > 600 and reference["category"].null_count >= 3  # null, empty and blank titles
    for batch_size, threads in [(7, 1), (1000, 2), (65_536, 1), (65_536, 2)]:
        assert_same_answers(scored(catalog, models[kind], tmp_path, batch_size=batch_size, threads=threads), reference)
    head = tmp_path / "head.parquet"  # batch size 1 on the first 400 rows (each title alone)
    pq.write_table(pq.read_table(catalog).slice(0, 400), head)
    assert_same_answers(scored(head, models[kind], tmp_path, batch_size=1), reference.slice(0, 400))


@pytest.mark.parametrize("kind", KINDS)
def test_row_order_and_neighbours_change_nothing(kind, models, catalog, tmp_path):
    reference = scored(catalog, models[kind], tmp_path, "ref.parquet")
    table = pq.read_table(catalog)
    rng = np.random.default_rng(7)
    variants = {
        "reversed": table.take(pa.array(np.arange(table.num_rows)[::-1])),
        "shuffled": table.take(pa.array(rng.permutation(table.num_rows))),
        "first 300 alone": table.slice(0, 300),
        "every third": table.take(pa.array(np.arange(0, table.num_rows, 3))),
        # each title beside the longest titles of the file (neighbours that set the padding)
        "beside long titles": pa.concat_tables([table, table.slice(0, 7).set_column(
            0, "id", pa.array(range(-7, 0), pa.int64())).set_column(1, "title", pa.array(
                [" ".join([t or "x"] * 30) for t in table.column("title").to_pylist()[7:14]], pa.string()))]),
    }
    for name, variant in variants.items():
        path = tmp_path / "variant.parquet"
        pq.write_table(variant, path)
        got = scored(path, models[kind], tmp_path).filter(pa.compute.greater_equal(pa.compute.field("id"), 0))
        ids = set(got["id"].to_pylist())
        expected = reference.filter(pa.compute.is_in(reference["id"], pa.array(sorted(ids), pa.int64())))
        assert_same_answers(got, expected)


def test_input_format_changes_nothing(models, catalog, tmp_path):
    table = pq.read_table(catalog)
    reference = scored(catalog, models["default"], tmp_path, "ref.parquet")
    jsonl = tmp_path / "catalog.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table.to_pylist()), encoding="utf-8")
    csv = tmp_path / "catalog.csv"
    pcsv.write_csv(table, csv)
    for path in (jsonl, csv):
        got = scored(path, models["default"], tmp_path)
        # CSV reads an empty field as an empty title and JSON a null one: both are unscored
        assert_same_answers(got, reference)


def test_the_graph_answers_each_row_alone(models, trained):
    """At the graph itself: a title's output is bit for bit the same alone, padded to any
    length, and beside any other titles, for the int8 kinds (floats: within ATOL)."""
    rng = np.random.default_rng(0)
    for kind in KINDS:
        model = load_onnx_model(models[kind], provider="cpu")
        tok = model.card.tokenizer()
        n_ids = tok.n_compact_ids if model.card.compact else tok.n_ids
        ids = rng.integers(0, n_ids, (300, 24))
        ids[:, 12:] *= rng.random((300, 12)) < 0.5  # titles of mixed lengths (padding is 0)
        together = model.predict(ids)
        alone = np.concatenate([model.predict(ids[i:i + 1]) for i in range(0, 300, 37)])
        padded = model.predict(np.pad(ids, ((0, 0), (0, 100))))
        beside = model.predict(np.concatenate([ids[::-1], rng.integers(0, n_ids, (500, 24))]))[:300][::-1]
        exact = model.card.matmuls == "int8-row"
        for name, other in (("alone", alone), ("padded", padded[::37]), ("beside", beside[::37])):
            if exact:
                assert np.array_equal(other, together[::37]), (kind, name, np.abs(other - together[::37]).max())
            else:
                assert np.abs(other - together[::37]).max() <= ATOL, kind


def test_the_mlflow_model_answers_as_meli_score(models, catalog, tmp_path):
    """The pyfunc model (what `meli-export` registers) on the same titles, one at a time, in
    small frames and all at once: the answers of meli-score."""
    import mlflow
    import pandas as pd

    from meli.pyfunc import pyfunc_model_args

    reference = scored(catalog, models["default"], tmp_path, "ref.parquet")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run(), pyfunc_model_args(models["default"], tmp_path / "code") as args:
        info = mlflow.pyfunc.log_model(**args)
    model = mlflow.pyfunc.load_model(info.model_uri)
    titles = pq.read_table(catalog).column("title").to_pylist()
    expected = reference.sort_by("id")  # the catalog's ids are its row numbers
    for size, count in ((1, 200), (113, len(titles)), (len(titles), len(titles))):
        frames = [model.predict(pd.DataFrame({"title": titles[i:i + size]})) for i in range(0, count, size)]
        got = pd.concat(frames, ignore_index=True)
        assert got["category"].tolist() == expected["category"].to_pylist()[:count]
        p = expected["probability"].to_numpy(zero_copy_only=False)[:count].astype(np.float64)
        q = got["probability"].to_numpy().astype(np.float64)
        assert np.array_equal(np.isnan(p), np.isnan(q)) and np.nanmax(np.abs(p - q)) <= ATOL


def test_scorer_batches_give_the_answers_of_one_batch(models, titles):
    """The core function every engine calls (`Scorer.score_batches`), cut anywhere."""
    scorer = Scorer(load_onnx_model(models["default"], provider="cpu"), OPTIONS)
    batch = pa.record_batch({"id": pa.array(range(len(titles)), pa.int64()), "title": pa.array(titles, pa.string())})
    whole = pa.Table.from_batches([scorer.score_batch(batch)])
    cuts = [batch.slice(i, 129) for i in range(0, batch.num_rows, 129)]
    pieces = pa.Table.from_batches(list(scorer.score_batches(cuts)))
    assert_same_answers(pieces, whole)


@pytest.mark.spark
def test_spark_and_its_udf_answer_as_meli_score(models, catalog, tmp_path):
    pytest.importorskip("pyspark", reason="pip install 'meli-categorizer[spark]'")
    import mlflow
    from click.testing import CliRunner

    from meli.score.cli import main as score_main
    from meli.pyfunc import pyfunc_model_args
    from meli.score.spark import spark_session

    reference = scored(catalog, models["default"], tmp_path, "ref.parquet", report=tmp_path / "ref.html")
    lake = tmp_path / "lake"
    lake.mkdir()
    table = pq.read_table(catalog)
    for part, start in enumerate(range(0, table.num_rows, 1500)):  # parts of other sizes than any batch
        pq.write_table(table.slice(start, 1500), lake / f"part-{part:05d}.parquet")
    out = tmp_path / "spark"
    result = CliRunner().invoke(score_main, [str(lake), str(out), "--model", str(models["default"]), "--engine", "spark",
                                             "--spark-master", "local[2]", "--batch-size", "333", "--top-k", "3",
                                             "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert_same_answers(pq.read_table(out), reference)

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run(), pyfunc_model_args(models["default"], tmp_path / "code") as args:
        info = mlflow.pyfunc.log_model(**args)
    udf = mlflow.pyfunc.spark_udf(spark_session("local[2]"), info.model_uri, result_type="category string, probability float")
    df = spark_session("local[2]").read.parquet(str(lake))
    rows = df.withColumn("p", udf("title")).select("id", "p.category", "p.probability").orderBy("id").collect()
    expected = reference.sort_by("id")
    # the UDF bridge turns a missing category into the text "None" (see test_spark)
    assert [None if r["category"] == "None" else r["category"] for r in rows] == expected["category"].to_pylist()
    got = np.array([np.nan if r["probability"] is None else r["probability"] for r in rows], dtype=np.float64)
    want = expected["probability"].to_numpy(zero_copy_only=False).astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.nanmax(np.abs(got - want)) <= ATOL


@pytest.mark.spark
def test_a_standalone_spark_cluster_answers_as_meli_score(models, catalog, tmp_path):
    """Master and worker on loopback, from the installed pyspark; meli-score --engine spark in
    a process of its own (a fresh driver), every row, the same answers."""
    pytest.importorskip("pyspark", reason="pip install 'meli-categorizer[spark]'")
    import subprocess
    import sys

    from spark_cluster import standalone_cluster

    reference = scored(catalog, models["default"], tmp_path, "ref.parquet", report=tmp_path / "ref.html")
    lake = tmp_path / "lake"
    lake.mkdir()
    table = pq.read_table(catalog)
    for part, start in enumerate(range(0, table.num_rows, 2000)):
        pq.write_table(table.slice(start, 2000), lake / f"part-{part:05d}.parquet")
    (tmp_path / "cluster").mkdir()
    with standalone_cluster(tmp_path / "cluster") as master:
        proc = subprocess.run([sys.executable, "-m", "meli.score", str(lake), str(tmp_path / "out"), "--model",
                               str(models["default"]), "--engine", "spark", "--spark-master", master, "--top-k", "3",
                               "--report", str(tmp_path / "cluster.html"), "--quiet"], capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]  # --quiet: nothing, the JVM's output too
    assert_same_answers(pq.read_table(tmp_path / "out"), reference)
    # the nightly report: per-partition tallies merged on the driver give the local engine's figures
    import json

    where = ("created_at", "input", "output", "engine")
    local, cluster = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ref", "cluster"))
    assert {k: v for k, v in cluster.items() if k not in where} == {k: v for k, v in local.items() if k not in where}
