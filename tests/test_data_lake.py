"""Data-lake inputs: folders read the way Spark, Hive and Arrow write them.

The README's "Failure modes" section names the rule: in an input folder, names starting with
``_`` or ``.`` are not data; ``key=value`` folders are Hive partitions (string columns, in
both engines); a file is a part by its suffix in any case or by Parquet's magic bytes; parts
are read in natural path order; table formats (Delta, Hudi, Iceberg) are refused.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_failure_modes import expect_error, expect_scored, score_cli
from test_score import TITLES


def part(path, start: int, stop: int, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = list(range(start, stop))
    columns = {"id": pa.array(ids, pa.int64()), "title": [TITLES[i % len(TITLES)] or "Casco Moto" for i in ids], **extra}
    pq.write_table(pa.table(columns), path)


def test_what_a_failed_spark_job_leaves_is_not_data(exported, tmp_path):
    lake = tmp_path / "lake"
    part(lake / "part-00000.parquet", 0, 50)
    part(lake / "part-00001.parquet", 50, 100)
    # a running or failed job's attempt files, markers, checksums, hidden folders
    part(lake / "_temporary" / "0" / "_temporary" / "attempt_202401010000_0001_m_000000_0" / "part-00000.parquet", 0, 50)
    part(lake / ".spark-staging" / "part-00000.parquet", 0, 50)
    (lake / "_SUCCESS").write_text("")
    (lake / ".part-00000.parquet.crc").write_bytes(b"crc")
    (lake / "_committed_123").write_text("{}")
    out = expect_scored([lake, tmp_path / "out.parquet", "--model", exported["mlp"]], tmp_path / "out.parquet")
    assert out["id"].to_pylist() == list(range(100))  # each row once


def test_hive_partition_folders_become_string_columns(exported, tmp_path):
    lake = tmp_path / "lake"
    part(lake / "dt=2024-01-01" / "country=AR" / "part-0.parquet", 0, 10)
    part(lake / "dt=2024-01-01" / "country=BR" / "part-0.parquet", 10, 20)
    part(lake / "dt=2024-01-02" / "country=__HIVE_DEFAULT_PARTITION__" / "part-0.parquet", 20, 30)
    part(lake / "dt=2024-01-02" / "country=S%C3%A3o%20Paulo" / "part-0.parquet", 30, 40)  # Hive escapes names
    out = expect_scored([lake, tmp_path / "out.parquet", "--model", exported["mlp"]], tmp_path / "out.parquet")
    assert out.column_names == ["id", "dt", "country", "category", "probability"]
    assert out.schema.field("dt").type == pa.string() and out.schema.field("country").type == pa.string()
    assert out["dt"].to_pylist() == ["2024-01-01"] * 20 + ["2024-01-02"] * 20
    # natural path order: "S%C3%A3o..." sorts before "__HIVE..."
    assert out["country"].to_pylist() == ["AR"] * 10 + ["BR"] * 10 + ["São Paulo"] * 10 + [None] * 10


def test_partition_folders_must_agree_between_parts(exported, tmp_path):
    lake = tmp_path / "lake"
    part(lake / "dt=2024-01-01" / "part-0.parquet", 0, 10)
    part(lake / "part-1.parquet", 10, 20)
    expect_error([lake, tmp_path / "out.parquet", "--model", exported["mlp"]],
                 "part-1.parquet: its partition folders (none) differ from those of", tmp_path / "out.parquet")


def test_a_partition_column_also_in_the_files_is_refused(exported, tmp_path):
    lake = tmp_path / "lake"
    part(lake / "dt=2024-01-01" / "part-0.parquet", 0, 10, dt=["x"] * 10)
    expect_error([lake, tmp_path / "out.parquet", "--model", exported["mlp"]], "column 'dt' appears twice",
                 tmp_path / "out.parquet")


def test_suffix_case_does_not_decide_what_is_data(exported, tmp_path):
    lake = tmp_path / "lake"
    part(lake / "part-0.parquet", 0, 10)
    part(lake / "part-1.PARQUET", 10, 20)
    part(lake / "part-2.Pq", 20, 30)
    part(lake / "000000_0", 30, 40)  # Hive writes parts without a suffix: Parquet's magic bytes tell
    out = expect_scored([lake, tmp_path / "out.parquet", "--model", exported["mlp"]], tmp_path / "out.parquet")
    assert sorted(out["id"].to_pylist()) == list(range(40))


def test_a_file_in_the_folder_that_is_not_parquet_is_named(exported, tmp_path):
    lake = tmp_path / "lake"
    part(lake / "part-0.parquet", 0, 10)
    (lake / "notes.txt").write_text("not data")
    expect_error([lake, tmp_path / "out.parquet", "--model", exported["mlp"]],
                 "notes.txt: not a Parquet file in the input folder", tmp_path / "out.parquet")


def test_parts_are_read_in_natural_path_order(exported, tmp_path):
    lake = tmp_path / "lake"
    for k in (10, 2, 1, 0, 11):
        part(lake / f"part-{k}.parquet", k * 10, k * 10 + 10)
    part(lake / "sub" / "part-3.parquet", 1000, 1010)  # a plain folder (no key=value) is walked too
    out = expect_scored([lake, tmp_path / "out.parquet", "--model", exported["mlp"]], tmp_path / "out.parquet")
    order = [i // 10 for i in out["id"].to_pylist()[::10]]
    assert order == [0, 1, 2, 10, 11, 100]


@pytest.mark.parametrize("marker, what", [("_delta_log/00000000000000000000.json", "a Delta Lake table"),
                                          (".hoodie/hoodie.properties", "an Apache Hudi table"),
                                          ("metadata/v1.metadata.json", "an Apache Iceberg table")])
def test_table_format_folders_are_refused_with_what_they_are(marker, what, exported, tmp_path):
    lake = tmp_path / "table"
    part(lake / "part-0.parquet", 0, 10)
    (lake / marker).parent.mkdir(parents=True, exist_ok=True)
    (lake / marker).write_text("{}")
    message = expect_error([lake, tmp_path / "out.parquet", "--model", exported["mlp"]], f"is {what}",
                           tmp_path / "out.parquet")
    assert "score an export of the table's current version" in message


def test_output_inside_the_input_folder_is_refused(exported, tmp_path):
    lake = tmp_path / "lake"
    part(lake / "part-0.parquet", 0, 10)
    expect_error([lake, lake / "scored.parquet", "--model", exported["mlp"]], "would be inside the input folder",
                 lake / "scored.parquet", previous=None)
    # a name that the folder rules mark as not data is fine
    expect_scored([lake, lake / "_scored.parquet", "--model", exported["mlp"]], lake / "_scored.parquet")
    assert expect_scored([lake, tmp_path / "again.parquet", "--model", exported["mlp"]], tmp_path / "again.parquet").num_rows == 10


def test_pass_through_columns_keep_type_nullability_and_metadata(exported, tmp_path):
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False, metadata={"comment": "catalog key"}),
                        pa.field("title", pa.string()),
                        pa.field("price", pa.decimal128(10, 2), metadata={"unit": "ARS"}),
                        pa.field("seen", pa.timestamp("ms", tz="UTC"))])
    import decimal

    table = pa.table([pa.array(range(4), pa.int64()), pa.array(TITLES[:4]),
                      pa.array([decimal.Decimal("10.50")] * 4, pa.decimal128(10, 2)),
                      pa.array(np.arange(4), pa.timestamp("ms", tz="UTC"))], schema=schema)
    pq.write_table(table, tmp_path / "in.parquet")
    out = expect_scored([tmp_path / "in.parquet", tmp_path / "out.parquet", "--model", exported["mlp"]], tmp_path / "out.parquet")
    for name in ("id", "price", "seen"):
        assert out.schema.field(name) == schema.field(name) and out.schema.field(name).metadata == schema.field(name).metadata


@pytest.mark.spark
def test_spark_reads_the_folder_as_the_local_engine_does(exported, tmp_path):
    pytest.importorskip("pyspark")
    lake = tmp_path / "lake"
    part(lake / "dt=2024-01-01" / "part-0.parquet", 0, 30)
    part(lake / "dt=2024-01-02" / "part-1.PARQUET", 30, 60)
    part(lake / "_temporary" / "0" / "dt=2024-01-01" / "part-0.parquet", 0, 30)
    (lake / "_SUCCESS").write_text("")
    local = expect_scored([lake, tmp_path / "local.parquet", "--model", exported["mlp"]], tmp_path / "local.parquet")
    result = score_cli(lake, tmp_path / "spark", "--model", exported["mlp"], "--engine", "spark", "--spark-master", "local[2]")
    assert result.exit_code == 0, result.output
    spark = pq.read_table(tmp_path / "spark").sort_by("id")
    assert spark.column_names == local.column_names and spark.schema.field("dt").type == pa.string()
    assert spark.to_pylist() == local.sort_by("id").to_pylist()
    (lake / "_delta_log").mkdir()
    result = score_cli(lake, tmp_path / "spark2", "--model", exported["mlp"], "--engine", "spark", "--spark-master", "local[2]")
    assert result.exit_code == 1 and "is a Delta Lake table" in result.output and result.output.count("\n") == 1
