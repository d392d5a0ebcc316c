"""Data-lake inputs: folders read the way Spark, Hive and Arrow write them.

docs/failure-modes.md names the rule: in an input folder, names starting with
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
                 f"part-1.parquet: its partition folders (none) differ from those of {lake / 'dt=2024-01-01' / 'part-0.parquet'} (dt)",
                 tmp_path / "out.parquet")


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
                 f"notes.txt: not a Parquet file in the input folder {lake}; move it out, or start its name with _ or . to "
                 "mark it as not data", tmp_path / "out.parquet")


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
    folder = marker.split("/")[0]
    expect_error([lake, tmp_path / "out.parquet", "--model", exported["mlp"]],
                 f"table: is {what} ({folder} is there): its folder also holds files of other versions, so its rows "
                 "cannot be read as plain Parquet; score an export of the table's current version, or register it in a "
                 "Spark catalog and score table:NAME with --engine spark", tmp_path / "out.parquet")


def test_output_inside_the_input_folder_is_refused(exported, tmp_path):
    lake = tmp_path / "lake"
    part(lake / "part-0.parquet", 0, 10)
    expect_error([lake, lake / "scored.parquet", "--model", exported["mlp"]],
                 f"scored.parquet: the output would be inside the input folder {lake}, and the next run would read it as "
                 "input; write it elsewhere", lake / "scored.parquet", previous=None)
    # a name that the folder rules mark as not data is fine
    expect_scored([lake, lake / "_scored.parquet", "--model", exported["mlp"]], lake / "_scored.parquet")
    assert expect_scored([lake, tmp_path / "again.parquet", "--model", exported["mlp"]], tmp_path / "again.parquet").num_rows == 10


def test_pass_through_columns_keep_type_nullability_and_metadata(exported, tmp_path):
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False, metadata={"comment": "catalog key"}),
                        pa.field("title", pa.dictionary(pa.int32(), pa.string())),
                        pa.field("brand", pa.dictionary(pa.int32(), pa.string())),
                        pa.field("price", pa.decimal128(10, 2), metadata={"unit": "ARS"}),
                        pa.field("seen", pa.timestamp("ms", tz="UTC"))])
    import decimal

    table = pa.table([pa.array(range(4), pa.int64()), pa.array(TITLES[:4]).dictionary_encode(),
                      pa.array(["Bosch", "Bosch", "Hawk", None]).dictionary_encode(),
                      pa.array([decimal.Decimal("10.50")] * 4, pa.decimal128(10, 2)),
                      pa.array(np.arange(4), pa.timestamp("ms", tz="UTC"))], schema=schema)
    pq.write_table(table, tmp_path / "in.parquet")
    out = expect_scored([tmp_path / "in.parquet", tmp_path / "out.parquet", "--model", exported["mlp"]], tmp_path / "out.parquet")
    assert out["brand"].to_pylist() == ["Bosch", "Bosch", "Hawk", None]
    for name in ("id", "brand", "price", "seen"):
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


# ----------------------------------------------------------------------------- JSON Lines as exporters write it
def jsonl(path, records: list[dict], extra_lines: list[str] = ()) -> None:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "".join(l + "\n" for l in extra_lines),
                    encoding="utf-8")


def catalog_records(n: int) -> list[dict]:
    return [{"id": i, "title": TITLES[i % len(TITLES)] or "Casco Moto"} for i in range(n)]


@pytest.fixture
def small_chunks(monkeypatch):
    """The schema pass in chunks of 4 KB, so that 'late' means several chunks later."""
    import meli.formats

    monkeypatch.setattr(meli.formats, "JSONL_CHUNK", 4096)


def test_jsonl_fields_first_seen_late_are_read(exported, tmp_path, small_chunks):
    records = catalog_records(3000)
    records[2500]["brand"] = "Bosch"  # an optional field, first seen far down the file
    records[2900]["specs"] = {"watts": 650}
    jsonl(tmp_path / "in.jsonl", records)
    out = expect_scored([tmp_path / "in.jsonl", tmp_path / "out.parquet", "--model", exported["mlp"]], tmp_path / "out.parquet")
    assert out.column_names[:4] == ["id", "brand", "specs", "category"]
    assert out["brand"].null_count == 2999 and out["brand"][2500].as_py() == "Bosch"
    assert out["specs"][2900].as_py() == {"watts": 650}


def test_jsonl_integers_that_later_hold_a_fraction_become_floats(exported, tmp_path, small_chunks):
    records = catalog_records(3000)
    for r in records:
        r["price"] = 10
    records[2999]["price"] = 10.5
    jsonl(tmp_path / "in.jsonl", records)
    out = expect_scored([tmp_path / "in.jsonl", tmp_path / "out.parquet", "--model", exported["mlp"]], tmp_path / "out.parquet")
    assert out.schema.field("price").type == pa.float64() and out["price"][2999].as_py() == 10.5
    assert out["price"][0].as_py() == 10.0


def test_jsonl_objects_that_gain_keys_gain_fields(exported, tmp_path, small_chunks):
    records = catalog_records(3000)
    for r in records:
        r["seller"] = {"id": 1}
    records[2999]["seller"] = {"id": 2, "name": "Tienda"}
    jsonl(tmp_path / "in.jsonl", records)
    out = expect_scored([tmp_path / "in.jsonl", tmp_path / "out.parquet", "--model", exported["mlp"]], tmp_path / "out.parquet")
    assert out["seller"][0].as_py() == {"id": 1, "name": None}
    assert out["seller"][2999].as_py() == {"id": 2, "name": "Tienda"}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_title_of_several_megabytes_is_read(suffix, exported, tmp_path):
    huge = "Casco Moto Hawk " * 400_000  # 6.4 MB on one line
    if suffix == ".jsonl":
        jsonl(tmp_path / f"in{suffix}", catalog_records(50) + [{"id": 50, "title": huge}])
    else:
        rows = "".join(f"{r['id']},{r['title']}\n" for r in catalog_records(50))
        (tmp_path / f"in{suffix}").write_text(f"id,title\n{rows}50,{huge}\n", encoding="utf-8")
    out = expect_scored([tmp_path / f"in{suffix}", tmp_path / "out.parquet", "--model", exported["mlp"]], tmp_path / "out.parquet")
    assert out.num_rows == 51 and out["category"][50].as_py() is not None


def test_jsonl_integers_beyond_int64_are_refused_never_made_floats(exported, tmp_path, small_chunks):
    jsonl(tmp_path / "in.jsonl", catalog_records(500), ['{"id": 18446744073709551617, "title": "Casco"}'])
    expect_error([tmp_path / "in.jsonl", tmp_path / "out.parquet", "--model", exported["mlp"]],
                 "in.jsonl: line 501: column 'id' holds the integer 18446744073709551617, beyond 64-bit integers (read "
                 "as a float it would change); write it as a string",
                 tmp_path / "out.parquet")
    jsonl(tmp_path / "ok.jsonl", catalog_records(5), ['{"id": 9223372036854775807, "title": "Casco"}'])  # int64's largest
    out = expect_scored([tmp_path / "ok.jsonl", tmp_path / "ok.parquet", "--model", exported["mlp"]], tmp_path / "ok.parquet")
    assert out.schema.field("id").type == pa.int64() and out["id"][5].as_py() == 2**63 - 1


def test_a_duplicate_json_key_is_named_by_its_line(exported, tmp_path, small_chunks):
    jsonl(tmp_path / "in.jsonl", catalog_records(700), ['{"id": 1, "id": 2, "title": "Casco"}'])
    expect_error([tmp_path / "in.jsonl", tmp_path / "out.parquet", "--model", exported["mlp"]],
                 "in.jsonl: line 701: key 'id' appears twice in one record", tmp_path / "out.parquet")


def test_a_csv_title_column_of_another_name(exported, tmp_path):
    (tmp_path / "in.csv").write_text("sku,nombre,precio\n1,Casco Moto Hawk,10\n2,Taladro Percutor,20\n", encoding="utf-8")
    out = expect_scored([tmp_path / "in.csv", tmp_path / "out.parquet", "--model", exported["mlp"], "--title-column", "nombre"],
                        tmp_path / "out.parquet")
    assert out["sku"].to_pylist() == ["1", "2"] and out["category"].null_count == 0
    expect_error([tmp_path / "in.csv", tmp_path / "out2.parquet", "--model", exported["mlp"]],
                 "in.csv: CSV without a 'title' column in its header; a header-less CSV must have exactly the columns "
                 "title,category (found 3 columns)", tmp_path / "out2.parquet")


# ----------------------------------------------------------------------------- options, streams, names
@pytest.mark.parametrize("flag, value", [("--batch-size", str(2**40)), ("--threads", str(2**40)), ("--batch-size", "0"),
                                         ("--threads", "-1")])
def test_option_values_beyond_what_the_libraries_take_are_one_line(flag, value, exported, tmp_path):
    jsonl(tmp_path / "in.jsonl", catalog_records(5))
    result = score_cli(tmp_path / "in.jsonl", tmp_path / "out.parquet", "--model", exported["mlp"], flag, value)
    assert result.exit_code == 2 and f"'{flag}'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.parquet").exists()


def test_a_fifo_is_read_not_hung_on(exported, tmp_path):
    import os
    import subprocess
    import sys
    import threading

    jsonl(tmp_path / "src.jsonl", catalog_records(300))
    fifo = tmp_path / "catalog.jsonl"
    os.mkfifo(fifo)
    feeder = threading.Thread(target=lambda: fifo.write_bytes((tmp_path / "src.jsonl").read_bytes()))
    feeder.start()
    proc = subprocess.run([sys.executable, "-m", "meli.score", str(fifo), str(tmp_path / "out.parquet"), "--model",
                           str(exported["mlp"]), "--quiet"], capture_output=True, text=True, timeout=120)
    feeder.join(timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(tmp_path / "out.parquet")["id"].to_pylist() == list(range(300))


def test_errors_on_stdin_name_stdin_not_a_temporary_file(exported, tmp_path):
    from click.testing import CliRunner

    from meli.score.cli import main

    result = CliRunner().invoke(main, ["-", str(tmp_path / "out.parquet"), "--model", str(exported["mlp"]), "--quiet"],
                                input='{"id": 1, "title": "Casco"}\n{"id": 2, "title": 7}\n')
    assert result.exit_code == 1 and result.output.startswith("Error: -: line 2: column 'title' must be a string")
    assert "meli-input-" not in result.output and result.output.count("\n") == 1


def test_a_file_name_with_a_newline_keeps_the_error_on_one_line(exported, tmp_path):
    bad = tmp_path / "cat\nalog.jsonl"
    bad.write_text('{"id": 1, "title": 7}\n', encoding="utf-8")
    message = expect_error([bad, tmp_path / "out.parquet", "--model", exported["mlp"]],
                           "cat\\nalog.jsonl: line 1: column 'title' must be a string, got 7",
                           tmp_path / "out.parquet")
    assert message.count("\n") == 1


def test_a_graph_with_a_three_axis_output_is_refused_at_load(exported_float, tmp_path):
    import onnx
    from onnx import helper

    from meli.errors import ModelFileError
    from meli.onnx_model import load_onnx_model

    proto = onnx.load(str(exported_float["mlp"]))
    graph = proto.graph
    old = graph.output[0].name
    for node in graph.node:  # rename the softmax's output, then unsqueeze it into [batch, n, 1]
        node.output[:] = [o + "_2d" if o == old else o for o in node.output]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([2], np.int64), "axis2"))
    graph.node.append(helper.make_node("Unsqueeze", [old + "_2d", "axis2"], [old]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(old, onnx.TensorProto.FLOAT, ["batch", "n", 1]))
    path = tmp_path / "three.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelFileError, match=r"output has shape .*expected \[batch, categories\]"):
        load_onnx_model(path, "cpu")


# ----------------------------------------------------------------------------- the Spark engine's errors
@pytest.mark.spark
def test_spark_gives_the_local_engines_one_line_errors(exported, tmp_path):
    pytest.importorskip("pyspark")

    def spark_error(lake, message, *extra):
        for engine in (["--engine", "spark", "--spark-master", "local[2]", *extra], []):
            out = tmp_path / f"out-{len(engine)}" if engine else tmp_path / "out.parquet"
            result = score_cli(lake, out, "--model", exported["mlp"], *engine)
            assert result.exit_code == 1 and result.output.startswith("Error: "), (engine, result.output)
            assert result.output.count("\n") == 1 and message in result.output, (engine, result.output)
            assert not out.exists()

    drift = tmp_path / "drift"
    part(drift / "part-0.parquet", 0, 10)
    part(drift / "part-1.parquet", 10, 20, price=[1.5] * 10)
    spark_error(drift, "part-1.parquet: columns differ from part-0.parquet's (extra: price)")

    numbers = tmp_path / "numbers"
    numbers.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "title": [3, 4]}), numbers / "part-0.parquet")
    spark_error(numbers, "title column 'title' holds int64, not strings")

    corrupt = tmp_path / "corrupt"
    part(corrupt / "part-0.parquet", 0, 10)
    (corrupt / "part-1.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    spark_error(corrupt, "part-1.parquet: not a readable Parquet file")

    import subprocess
    import sys

    # a fresh process: this one's Spark session is already running (and would be reused)
    proc = subprocess.run([sys.executable, "-m", "meli.score", str(drift.parent / "numbers"), str(tmp_path / "o"), "--model",
                           str(exported["mlp"]), "--engine", "spark", "--spark-master", "nowhere://x", "--quiet"],
                          capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines[-1].startswith("Error: --spark-master: nowhere://x: Spark did not start"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.spark
def test_spark_refuses_invalid_utf8_titles_in_one_line(exported, tmp_path):
    pytest.importorskip("pyspark")
    lake = tmp_path / "lake"
    lake.mkdir()
    bad = pa.array([b"Casco Moto", b"Taladro \xff\xfe"], pa.binary()).view(pa.string())  # bytes Parquet stores as they are
    pq.write_table(pa.table({"id": [1, 2], "title": bad}), lake / "part-0.parquet")
    result = score_cli(lake, tmp_path / "out", "--model", exported["mlp"], "--engine", "spark", "--spark-master", "local[2]")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "invalid UTF-8" in result.output and not (tmp_path / "out").exists()


def test_sigterm_stops_a_run_blocked_on_a_fifo_within_two_seconds(exported, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    fifo = tmp_path / "nobody-writes.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "out.parquet").write_bytes(b"yesterday")
    proc = subprocess.Popen([sys.executable, "-m", "meli.score", str(fifo), str(tmp_path / "out.parquet"), "--model",
                             str(exported["mlp"]), "--quiet"], stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # imports done, blocked opening the FIFO
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - sent < 2.0
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err, err
    assert (tmp_path / "out.parquet").read_bytes() == b"yesterday"
