"""Failure modes: what meli-score, meli-export and meli-train do with bad or unusual input.

Grouped as docs/failure-modes.md is, so the two read side by side. Every case
ends one of two ways: the right output, or exit code 1 with exactly one ``Error: ...`` line
naming the file, row, column or key at fault, no traceback, no output created, an existing
output byte-for-byte unchanged and no temporary file left behind (`expect_error`).
"""

from __future__ import annotations

import datetime as dt
import decimal
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import ROOT, write_jsonl
from meli.errors import ModelFileError
from meli.onnx_model import load_onnx_model
from meli.score.cli import main as score_main
from meli.scorer import Scorer
from test_score import TITLES, direct_predictions

YESTERDAY = b"yesterday's scores"


def score_cli(*args):
    return CliRunner().invoke(score_main, [str(a) for a in args] + ["--quiet"])


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def expect_error(args: list, message: str, output: Path, *, previous: bytes | None = YESTERDAY) -> str:
    """meli-score fails cleanly: one ``Error:`` line ending with `message` (the whole reason,
    after the path it names), exit 1, the output as
    it was before (absent, or `previous` byte for byte) and no temporary file."""
    if previous is not None:
        output.write_bytes(previous)
    elif output.exists():
        output.unlink()
    result = score_cli(*args)
    assert result.exit_code == 1, (message, result.output, result.exception)
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert result.output.rstrip("\n").endswith(message), (message, result.output)
    if previous is None:
        assert not output.exists()
    else:
        assert output.read_bytes() == previous
    assert temporaries(output.parent) == []
    return result.output


def expect_scored(args: list, output: Path) -> pa.Table:
    result = score_cli(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return read_output(output)


def read_output(path: Path) -> pa.Table:
    name = path.name
    if ".jsonl" in name:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return pa.Table.from_pylist([json.loads(line) for line in f])
    with open(path, "rb") as f:  # a name that is not UTF-8 too
        return pq.read_table(f)


@pytest.fixture()
def model(exported) -> Path:
    return exported["mlp"]


# ================================================================ encodings


def test_excel_csv_with_a_byte_order_mark_keeps_its_header(model, tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the header must still be a header."""
    rows = [("7", "Taladro Percutor Bosch 650w"), ("8", "Casco Moto Hawk Rebatible")]
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfid,title\r\n" + b"".join(f"{i},{t}\r\n".encode() for i, t in rows))
    out = tmp_path / "out.parquet"
    table = expect_scored([path, out, "--model", model], out)
    assert table.column_names == ["id", "category", "probability"]
    assert table["id"].to_pylist() == ["7", "8"]
    assert table["category"].to_pylist() == direct_predictions(model, [t for _, t in rows])[0]
    # the same with the title first (the case where the header was scored as a row)
    path.write_bytes(b"\xef\xbb\xbftitle,id\n" + b"".join(f"{t},{i}\n".encode() for i, t in rows))
    table = expect_scored([path, out, "--model", model], out)
    assert table.num_rows == 2 and table.column_names == ["id", "category", "probability"]


def test_headerless_csv_with_a_byte_order_mark(model, tmp_path):
    path = tmp_path / "train-sample.csv"
    path.write_bytes(b"\xef\xbb\xbfTaladro Percutor Bosch,DRILLS\nCasco Moto,HELMETS\n")
    out = tmp_path / "out.parquet"
    table = expect_scored([path, out, "--model", model, "--keep-columns", "category"], out)
    assert table.num_rows == 2 and table["input_category"].to_pylist() == ["DRILLS", "HELMETS"]
    assert table["category"].to_pylist() == direct_predictions(model, ["Taladro Percutor Bosch", "Casco Moto"])[0]


def test_jsonl_with_a_byte_order_mark(model, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"id": 1, "title": "Casco Moto"}\n{"id": 2, "title": "Taladro"}\n')
    out = tmp_path / "out.parquet"
    table = expect_scored([path, out, "--model", model], out)
    assert table.column_names == ["id", "category", "probability"] and table["id"].to_pylist() == [1, 2]


@pytest.mark.parametrize("name, data, message", [
    ("latin1.jsonl", b'{"title": "Casco"}\n{"title": "Ca\xf1a de pescar"}\n', "latin1.jsonl: line 2: invalid UTF-8"),
    ("latin1.csv", b"id,title\n1,Casco\n2,Ca\xf1a de pescar\n", "latin1.csv: line 3: invalid UTF-8"),
])
def test_invalid_utf8_in_a_title_names_the_line(name, data, message, model, tmp_path):
    path = tmp_path / name
    path.write_bytes(data)
    expect_error([path, tmp_path / "out.parquet", "--model", model], message, tmp_path / "out.parquet")


def test_invalid_utf8_in_another_jsonl_field_is_not_copied_through(model, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"title": "Casco", "seller": "ok"}\n{"title": "Casco", "seller": "Pe\xf1a"}\n')
    for out in (tmp_path / "out.parquet", tmp_path / "out.jsonl"):
        expect_error([path, out, "--model", model], "latin1.jsonl: line 2: invalid UTF-8", out, previous=None)


def invalid_utf8_column(values: list[bytes]) -> pa.Array:
    """A string column holding bytes that are not UTF-8 (what a careless writer produces)."""
    data = b"".join(values)
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])


def test_invalid_utf8_in_a_parquet_title_names_the_row(model, tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"title": invalid_utf8_column([b"Casco", b"Taladro", b"Ca\xf1a"])}), path)
    expect_error([path, tmp_path / "out.parquet", "--model", model], "bad.parquet: row 3: column 'title': invalid UTF-8",
                 tmp_path / "out.parquet")


def test_a_corrupt_gzip_is_named(model, tmp_path):
    path = tmp_path / "in.jsonl.gz"
    data = gzip.compress("".join(json.dumps({"title": f"Casco {i}"}) + "\n" for i in range(20_000)).encode())
    path.write_bytes(data[: len(data) // 2])
    expect_error([path, tmp_path / "out.parquet", "--model", model],
                 "in.jsonl.gz: unreadable (Compressed file ended before the end-of-stream marker was reached)",
                 tmp_path / "out.parquet")


# ================================================================ types


def test_dictionary_encoded_titles_score_like_plain_ones(model, tmp_path):
    titles = pa.array(TITLES * 3)
    expected = direct_predictions(model, TITLES * 3)[0]
    path = tmp_path / "dict.parquet"
    out = tmp_path / "out.parquet"
    # as Spark and pandas categoricals write them: the Arrow schema asks for the dictionary back
    pq.write_table(pa.table({"title": titles.dictionary_encode()}), path, store_schema=True)
    assert pq.ParquetFile(path).schema_arrow.field("title").type == pa.dictionary(pa.int32(), pa.string())
    assert expect_scored([path, out, "--model", model], out)["category"].to_pylist() == expected
    pq.write_table(pa.table({"title": titles.dictionary_encode()}), path, store_schema=False)
    assert expect_scored([path, out, "--model", model], out)["category"].to_pylist() == expected


@pytest.mark.parametrize("title_type", [pa.string(), pa.large_string(), pa.string_view(),
                                        pa.dictionary(pa.int8(), pa.string())])
def test_every_arrow_string_type_is_a_title(model, title_type):
    scorer = Scorer(load_onnx_model(model, "cpu"))
    titles = pa.array(TITLES).cast(title_type) if not pa.types.is_dictionary(title_type) else \
        pa.array(TITLES).dictionary_encode().cast(title_type)
    out = scorer.score_batch(pa.record_batch({"id": pa.array(range(len(TITLES))), "title": titles}))
    assert out.column("category").to_pylist() == direct_predictions(model, TITLES)[0]


def test_a_title_column_of_numbers_is_refused(model, tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"title": [1, 2]}), path)
    expect_error([path, tmp_path / "out.parquet", "--model", model], "column 'title' holds int64, not strings",
                 tmp_path / "out.parquet")


def test_timestamps_decimals_dates_and_bytes_are_kept_into_jsonl(model, tmp_path):
    table = pa.table({
        "title": ["Casco Moto", "Taladro"],
        "seen": pa.array([dt.datetime(2026, 11, 26, 13, 5), None], pa.timestamp("ms")),
        "day": pa.array([dt.date(2026, 11, 26), dt.date(2019, 1, 1)]),
        "price": pa.array([decimal.Decimal("1999.90"), decimal.Decimal("0.01")], pa.decimal128(10, 2)),
        "raw": pa.array([b"\x00\xff", b""]),
        "tags": pa.array([["a", "b"], []]),
        "meta": pa.array([{"k": 1}, {"k": 2}]),
        "ratio": pa.array([float("nan"), 0.5]),
    })
    path = tmp_path / "typed.parquet"
    pq.write_table(table, path)
    for out in (tmp_path / "out.jsonl", tmp_path / "out.parquet"):
        got = expect_scored([path, out, "--model", model], out)
        assert got.num_rows == 2 and got.column_names[:7] == ["seen", "day", "price", "raw", "tags", "meta", "ratio"]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["seen"] == "2026-11-26T13:05:00" and rows[1]["seen"] is None
    assert rows[0]["day"] == "2026-11-26" and rows[0]["price"] == "1999.90"
    assert rows[0]["raw"] == "AP8=" and rows[0]["tags"] == ["a", "b"] and rows[0]["meta"] == {"k": 1}
    assert rows[0]["ratio"] is None and rows[1]["ratio"] == 0.5  # JSON has no NaN
    assert pq.read_table(tmp_path / "out.parquet").schema.field("price").type == pa.decimal128(10, 2)


def test_a_jsonl_field_null_for_megabytes_then_a_string(model, tmp_path):
    """Arrow types a column from the first block; a field that is null all through it is
    still a string field (this was refused, and the error named a row of the block)."""
    n = 40_000  # > 2 MB of rows before the first non-null value
    rows = [{"id": i, "title": "Casco Moto Hawk", "note": None} for i in range(n)]
    rows.append({"id": n, "title": "Taladro", "note": "late"})
    path = write_jsonl(tmp_path / "late.jsonl", rows)
    assert path.stat().st_size > 2 << 20
    out = tmp_path / "out.parquet"
    table = expect_scored([path, out, "--model", model], out)
    assert table.num_rows == n + 1 and table["note"].to_pylist()[-1] == "late" and table["id"].to_pylist()[-1] == n


def test_a_jsonl_field_that_changes_type_names_the_line(model, tmp_path):
    rows = [{"title": "Casco", "sku": f"A{i}"} for i in range(30_000)] + [{"title": "Taladro", "sku": 7}]
    path = write_jsonl(tmp_path / "drift.jsonl", rows)
    expect_error([path, tmp_path / "out.parquet", "--model", model],
                 "drift.jsonl: line 30001: column 'sku' holds a number here but a string on line 1", tmp_path / "out.parquet")


def test_a_jsonl_title_that_is_not_a_string_names_the_line(model, tmp_path):
    path = write_jsonl(tmp_path / "num.jsonl", [{"title": "Casco"}] * 5 + [{"title": 12}])
    expect_error([path, tmp_path / "out.parquet", "--model", model], "num.jsonl: line 6: column 'title' must be a string, got 12",
                 tmp_path / "out.parquet")


# ================================================================ schemas


def test_part_files_with_string_and_large_string_titles_score(model, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int32()), "title": pa.array(TITLES[:2], pa.string())}),
                   folder / "part-0.parquet")
    pq.write_table(pa.table({"id": pa.array([3, 4], pa.int64()), "title": pa.array(TITLES[3:5], pa.large_string())}),
                   folder / "part-1.parquet")
    out = tmp_path / "out.parquet"
    table = expect_scored([folder, out, "--model", model], out)
    assert table["id"].to_pylist() == [1, 2, 3, 4]
    assert table["category"].to_pylist() == direct_predictions(model, TITLES[:2] + TITLES[3:5])[0]


def test_part_files_whose_columns_drift_are_named(model, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"id": [1], "title": ["Casco"]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": [2], "title": ["Taladro"], "price": [3.5]}), folder / "part-1.parquet")
    out = tmp_path / "out.parquet"
    expect_error([folder, out, "--model", model], "part-1.parquet: columns differ from part-0.parquet's (extra: price)", out)
    pq.write_table(pa.table({"id": ["two"], "title": ["Taladro"]}), folder / "part-1.parquet")
    expect_error([folder, out, "--model", model], "part-1.parquet: column 'id' is string here, int64 in part-0.parquet", out)


def test_duplicate_input_columns_are_refused(model, tmp_path):
    csv_path = tmp_path / "dup.csv"
    csv_path.write_text("id,title,id\n1,Casco,2\n")
    expect_error([csv_path, tmp_path / "out.parquet", "--model", model], "dup.csv: column 'id' appears twice",
                 tmp_path / "out.parquet")
    pq_path = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["Casco"]), pa.array([1]), pa.array([2])], names=["title", "id", "id"]),
                   pq_path)
    expect_error([pq_path, tmp_path / "out.parquet", "--model", model], "dup.parquet: column 'id' appears twice",
                 tmp_path / "out.parquet")


def test_output_column_names_never_collide(model, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "Casco", "category": "A", "input_category": "B", "probability": 1}])
    out = tmp_path / "out.parquet"
    table = expect_scored([path, out, "--model", model], out)
    assert table.column_names == ["input_input_category", "input_category", "input_probability", "category", "probability"]
    row = table.to_pylist()[0]
    assert row["input_input_category"] == "A" and row["input_category"] == "B" and row["input_probability"] == 1
    expect_error([path, out, "--model", model, "--keep-columns", "category,category"], "--keep-columns: names 'category' twice",
                 out)


# ================================================================ names and paths


def test_a_gz_jsonl_output_is_gzipped(model, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": t} for t in TITLES])
    out = tmp_path / "out.jsonl.gz"
    expect_scored([path, out, "--model", model], out)
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert read_output(out)["category"].to_pylist() == direct_predictions(model, TITLES)[0]


def test_a_gz_parquet_name_is_refused(model, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "Casco"}])
    expect_error([path, tmp_path / "out.parquet.gz", "--model", model], "out.parquet.gz: Parquet is compressed inside, so a gzipped .parquet.gz is not a Parquet file; name it .parquet",
                 tmp_path / "out.parquet.gz")
    gz_in = tmp_path / "in.parquet.gz"
    gz_in.write_bytes(gzip.compress(b"PAR1"))
    expect_error([gz_in, tmp_path / "out.parquet", "--model", model], "in.parquet.gz: Parquet is compressed inside, so a gzipped .parquet.gz is not a Parquet file; name it .parquet",
                 tmp_path / "out.parquet")


def test_an_output_name_at_the_file_system_limit(model, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "Casco"}])
    longest = tmp_path / ("s" * (255 - len(".parquet")) + ".parquet")
    assert len(longest.name) == 255
    expect_scored([path, longest, "--model", model], longest)
    too_long = tmp_path / ("s" * 256 + ".parquet")
    result = score_cli(path, too_long, "--model", model)
    assert result.exit_code == 1 and result.output == f"Error: {too_long}: file name too long (264 bytes; " \
        "this file system allows 255)\n", result.output
    assert temporaries(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", longest.name]


def test_output_paths_that_cannot_be_written(model, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "Casco"}])
    (tmp_path / "adir").mkdir()
    expect_error([path, tmp_path / "adir", "--model", model], "adir: is a directory; name an output file", tmp_path / "nothing.parquet",
                 previous=None)
    expect_error([path, tmp_path / "nowhere" / "out.parquet", "--model", model], "does not exist",
                 tmp_path / "nowhere.parquet", previous=None)
    expect_error([path, path, "--model", model], "would overwrite the input", tmp_path / "nothing.parquet", previous=None)


# ================================================================ disk, signals, logs


def score_process(args: list, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    return subprocess.Popen([sys.executable, "-m", "meli.score", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_full_disk_is_one_line_and_leaves_nothing(model, tmp_path):
    """A file-size limit makes writes fail the way a full disk does (EFBIG instead of ENOSPC)."""
    import resource

    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": np.arange(200_000), "title": TITLES * 25_000}), big)
    out = tmp_path / "out.jsonl"
    out.write_bytes(YESTERDAY)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = score_process([big, out, "--model", model, "--quiet"], preexec_fn=limit)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.startswith("Error: ") and err.count("\n") == 1 and f"{out}: cannot write" in err, err
    assert out.read_bytes() == YESTERDAY and temporaries(tmp_path) == []


def start_and_wait_for_writing(model: Path, tmp_path: Path, copies: int) -> tuple[subprocess.Popen, Path]:
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"title": TITLES * copies}), big, row_group_size=10_000)
    out = tmp_path / "out.parquet"
    out.write_bytes(YESTERDAY)
    proc = score_process([big, out, "--model", model, "--batch-size", "5000", "--quiet"])
    deadline = time.time() + 60
    while time.time() < deadline and not temporaries(tmp_path):
        time.sleep(0.02)
    assert temporaries(tmp_path), "the run never started writing"
    return proc, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_cleanly(sig, model, tmp_path):
    proc, out = start_and_wait_for_writing(model, tmp_path, 100_000)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err == f"Error: interrupted by {signal.Signals(sig).name}; {out} left as it was\n", err
    assert out.read_bytes() == YESTERDAY and temporaries(tmp_path) == []


def test_sigkill_leaves_the_previous_output_intact(model, tmp_path):
    proc, out = start_and_wait_for_writing(model, tmp_path, 50_000)
    proc.kill()
    proc.communicate()
    assert out.read_bytes() == YESTERDAY


def test_progress_bars_only_on_a_terminal(model, tmp_path):
    """A nightly job's log (stderr to a file) gets log lines, not carriage-return updates."""
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"title": TITLES * 20_000}), big, row_group_size=10_000)
    proc = score_process([big, tmp_path / "out.parquet", "--model", model, "--batch-size", "5000"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "\r" not in err and "scored 160,000 rows" in err and len(err.splitlines()) < 10, err


# ================================================================ model files


def tampered(model: Path, tmp_path: Path, name: str, change) -> Path:
    proto = onnx.load(model)
    meta = {p.key: p.value for p in proto.metadata_props}
    change(meta)
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    path = tmp_path / name
    onnx.save(proto, path)
    return path


def test_a_model_whose_labels_do_not_match_its_output_width(model, tmp_path):
    def longer(meta):
        meta["meli.labels"] = json.dumps(["AAA_FIRST"] + json.loads(meta["meli.labels"]))

    def shorter(meta):
        meta["meli.labels"] = json.dumps(json.loads(meta["meli.labels"])[:-1])

    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "Casco"}])
    for name, change, n in (("longer.onnx", longer, 31), ("shorter.onnx", shorter, 29)):
        bad = tampered(model, tmp_path, name, change)
        with pytest.raises(ModelFileError, match=rf"{name}: .* labels but the graph outputs"):
            load_onnx_model(bad, "cpu")
        expect_error([path, tmp_path / "out.parquet", "--model", bad],
                     f"{name}: the model file lists {n} labels but the graph outputs 30 probabilities", tmp_path / "out.parquet")


def test_a_model_whose_vocabulary_outgrows_its_embedding(model, tmp_path):
    def more_words(meta):
        meta["meli.vocabulary"] = json.dumps(json.loads(meta["meli.vocabulary"]) + [f"w{i}" for i in range(5000)])

    bad = tampered(model, tmp_path, "vocab.onnx", more_words)
    with pytest.raises(ModelFileError, match="vocab.onnx: the tokenizer's ids reach .* the graph"):
        load_onnx_model(bad, "cpu")


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("meli.tokenizer"), "model metadata incomplete (missing meli.tokenizer)"),
    (lambda m: m.update({"meli.tokenizer": json.dumps({**json.loads(m["meli.tokenizer"]), "lowercase": False})}),
     "unknown tokenizer setting(s) lowercase"),
    (lambda m: m.update({"meli.tokenizer": "{not json"}), "unreadable model metadata"),
    (lambda m: m.update({"meli.model": json.dumps({**json.loads(m["meli.model"]), "encoding": "bytes"})}),
     "unknown token encoding 'bytes'"),
])
def test_model_metadata_is_checked_at_load(change, message, model, tmp_path):
    bad = tampered(model, tmp_path, "bad.onnx", change)
    with pytest.raises(ModelFileError) as info:
        load_onnx_model(bad, "cpu")
    assert str(info.value).startswith(f"{bad}: ") and message in str(info.value), str(info.value)


def test_a_graph_with_other_inputs_or_an_unknown_opset(model, tmp_path):
    proto = onnx.load(model)
    proto.graph.input[0].name = "ids"
    for node in proto.graph.node:
        node.input[:] = ["ids" if i == "token_ids" else i for i in node.input]
    onnx.save(proto, tmp_path / "renamed.onnx")
    with pytest.raises(ModelFileError, match="renamed.onnx: expected one int64 input named 'token_ids'"):
        load_onnx_model(tmp_path / "renamed.onnx", "cpu")
    proto = onnx.load(model)
    proto.opset_import[0].version = 99
    onnx.save(proto, tmp_path / "future.onnx")
    with pytest.raises(ModelFileError, match="future.onnx: not a loadable ONNX model"):
        load_onnx_model(tmp_path / "future.onnx", "cpu")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated.onnx: not a loadable ONNX model"):
        load_onnx_model(truncated, "cpu")


# ================================================================ registry URIs


def test_a_registry_uri_without_a_store_creates_nothing(model, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "Casco"}])
    expect_error([path, tmp_path / "out.parquet", "--model", "models:/meli-categorizer/1"],
                 f"models:/meli-categorizer/1: no MLflow store here (no mlflow.db in {tmp_path}); run from the folder that "
                 "holds it, or set MLFLOW_TRACKING_URI", tmp_path / "out.parquet")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_registry_uri_on_an_unreachable_server(model, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "Casco"}])
    started = time.time()
    expect_error([path, tmp_path / "out.parquet", "--model", "models:/meli-categorizer/1"],
                 "MLflow tracking server http://127.0.0.1:9: unreachable (Connection refused)", tmp_path / "out.parquet")
    assert time.time() - started < 30


def test_a_registry_uri_that_names_no_model(model, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "Casco"}])
    expect_error([path, tmp_path / "out.parquet", "--model", "models:/no-such-model/1"],
                 "models:/no-such-model/1: cannot resolve in the MLflow registry (Registered Model with name=no-such-model "
                 "not found)", tmp_path / "out.parquet")


# ================================================================ training config and store


@pytest.mark.parametrize("text, message", [
    ('optimizer = "adamw "', ": optimizer = 'adamw ': must be one of 'adamw', 'adam', 'sgd'"),
    ('model = "MLP"', ": model = 'MLP': must be one of 'mlp', 'cnn'"),
    ("epochs = 0", ": epochs = 0: must be at least 1"),
    ("epochs = 2.5", ": epochs = 2.5: must be a whole number"),
    ("batch_size = -8", ": batch_size = -8: must be at least 1"),
    ("max_batch_size = 0", ": max_batch_size = 0: must be at least 1"),
    ("batch_size = 256\nmax_batch_size = 128", ": max_batch_size = 128 is below batch_size = 256"),
    ("steps_per_epoch = 1.5", ": steps_per_epoch = 1.5: must be a whole number"),
    ("bf16_min_batch = 0", ": bf16_min_batch = 0: must be at least 1"),
    ('precision = "bf16-mixed"', ": precision = 'bf16-mixed': must be one of 'auto', 'fp32', 'bf16'"),
    ("lr = 0", ": lr = 0: must be above 0"),
    ("lr = nan", ": lr = nan: must be a number"),
    ('refit = "yes"', ": refit = 'yes': must be true or false"),
    ("label_smoothing = 1.5", ": label_smoothing = 1.5: must be at least 0 and at most 1"),
    ("tokenizer = 3", ": 'tokenizer' is a section ([tokenizer]), not a setting"),
    ("[mlp]\nhidden = [512, 0]", " [mlp]: hidden = [512, 0]: must be at least 1"),
    ('[mlp]\nhidden = "512"', " [mlp]: hidden = '512': must be a list of a whole number"),
    ('[mlp]\npooling = "max"', " [mlp]: pooling = 'max': must be one of 'mean', 'attention'"),
    ('[tokenizer]\nstopword_languages = ["klingon"]', " [tokenizer]: no stopword list for 'klingon'; have ['spanish', 'portuguese']"),
    ("[tokenizer]\nchar_ngram_min = 6", " [tokenizer]: need 1 <= char_ngram_min <= char_ngram_max"),
    ("[distill]\nteacher_weight = 2", " [distill]: teacher_weight = 2: must be at least 0 and at most 1"),
    ("[vocabulary]\nmin_count = 0", " [vocabulary]: min_count = 0: must be at least 1"),
    ('[embeddings]\ninit = "glove"', " [embeddings]: init = 'glove': must be one of 'random', 'word2vec', 'fasttext', 'pretrained'"),
])
def test_every_config_value_is_checked_before_any_work(text, message, tmp_path):
    from meli.train.cli import main as train_main

    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    result = CliRunner().invoke(train_main, ["--config", str(config), "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {config}{message}\n"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("option, message", [
    (["--epochs", "0"], "--epochs: 0: must be at least 1"),
    (["--epochs", "-3"], "--epochs: -3: must be at least 1"),
    (["--seed", "-1"], "--seed: -1: must be at least 0"),
])
def test_command_line_overrides_are_checked_too(option, message, tmp_path):
    from meli.train.cli import main as train_main

    result = CliRunner().invoke(train_main, option + ["--quiet"])
    assert result.exit_code == 1 and result.output == f"Error: {message}\n", result.output


def test_an_unreachable_tracking_server_is_refused_before_training(tmp_path, monkeypatch):
    from meli.train.cli import main as train_main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    started = time.time()
    result = CliRunner().invoke(train_main, ["--epochs", "1", "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.output == "Error: MLflow tracking server http://127.0.0.1:9: unreachable (Connection refused)\n"
    assert time.time() - started < 30 and not (tmp_path / "artifacts").exists()


def test_an_unusable_tracking_store_is_refused_before_training(tmp_path, monkeypatch):
    from meli.train.cli import main as train_main

    store = tmp_path / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    store.mkdir()  # a folder where the SQLite file should be
    result = CliRunner().invoke(train_main, ["--epochs", "1", "--quiet"])
    assert result.exit_code == 1 and result.output == f"Error: MLflow store sqlite:///{store}: {store} is not a file\n", \
        result.output
    store.rmdir()
    store.write_bytes(b"not a database" * 100)  # a file that is no SQLite database
    result = CliRunner().invoke(train_main, ["--epochs", "1", "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: MLflow store sqlite:///{store}: cannot record the run ("), result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "artifacts").exists()


def test_stdin_to_stdout_as_json_lines(model, tmp_path):
    rows = [{"id": i, "title": t} for i, t in enumerate(TITLES)]
    data = "".join(json.dumps(r) + "\n" for r in rows)
    done = subprocess.run([sys.executable, "-m", "meli.score", "-", "-", "--model", str(model), "--quiet"], cwd=ROOT,
                          input=data, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["id"] for r in out] == list(range(len(TITLES)))
    assert [r["category"] for r in out] == direct_predictions(model, TITLES)[0]
    assert done.stderr == "" and temporaries(ROOT) == []  # --quiet: nothing on stderr when it goes well


def test_one_line_errors_survive_exceptions_without_text():
    """Every "… (reason)" in an error message comes from `first_line`: the first line of the
    exception's text, or its type's name when it has none (never an IndexError of its own)."""
    from meli.errors import first_line

    assert first_line(ValueError("bad header\nmore detail")) == "bad header"
    assert first_line(ValueError()) == "ValueError"
    assert first_line(OSError("  \n")) == "OSError"


# ================================================================ bounds on any input


@pytest.mark.parametrize("name, write, message", [
    ("inflating.jsonl.gz",  # one line of 100 MiB that gzips to about 100 KiB
     lambda p: gzip.open(p, "wb").write(b'{"title": "ok"}\n{"title": "' + b"a" * (100 << 20) + b'"}\n'),
     "line 2: longer than 64 MiB, the most one line may hold (is it really one record per line?)"),
    ("inflating.csv.gz",
     lambda p: gzip.open(p, "wb").write(b"title\nok\n" + b"b" * (100 << 20) + b"\n"),
     "line 3: longer than 64 MiB, the most one line may hold (is it really one record per line?)"),
    ("deep.jsonl",  # nesting that crashes a recursive JSON parser
     lambda p: p.write_text('{"title": "a"}\n{"title": "b", "extra": ' + "[" * 200_000 + "]" * 200_000 + "}\n"),
     "line 2: JSON nested more than 32 levels deep (the most a record may be)"),
    ("deep-objects.jsonl",
     lambda p: p.write_text('{"title": "a", "x": ' + '{"k": ' * 40 + "1" + "}" * 40 + "}\n"),
     "line 1: JSON nested more than 32 levels deep (the most a record may be)"),
])
def test_no_line_or_record_makes_a_reader_hold_more_than_its_bound(name, write, message, model, tmp_path):
    """A reader's memory is bounded by the batch size and the longest allowed line, however the
    input is compressed or nested: past the bound, one error naming the line."""
    path = tmp_path / name
    write(path)
    out = tmp_path / "out.parquet"
    expect_error([path, out, "--model", model], f"{path}: {message}", out)


def test_nesting_inside_strings_and_at_the_bound_reads(model, tmp_path):
    """Brackets inside strings are text, and a record nested exactly as deep as allowed reads."""
    path = write_jsonl(tmp_path / "ok.jsonl", [{"title": "Funda [[[[{{{{ Iphone", "x": json.loads("[" * 31 + "]" * 31)}])
    assert expect_scored([path, tmp_path / "out.parquet", "--model", model], tmp_path / "out.parquet").num_rows == 1


@pytest.mark.parametrize("batch_size", ["16777216"])
def test_the_largest_batch_size_reads_json_lines_and_csv(batch_size, model, tmp_path):
    """The largest --batch-size asks no reader for a block past Arrow's 32-bit limit."""
    rows = [{"title": t} for t in [t for t in TITLES if t][:5]]
    for path in (write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "in.csv"):
        if path.suffix == ".csv":
            path.write_text("title\n" + "\n".join(r["title"] for r in rows) + "\n")
        out = tmp_path / f"out-{path.suffix[1:]}.parquet"
        assert expect_scored([path, out, "--model", model, "--batch-size", batch_size], out).num_rows == 5


def test_running_out_of_memory_is_one_line(model, tmp_path):
    """A batch that does not fit the process's memory limit: one Error line with the advice."""
    import resource

    path = write_jsonl(tmp_path / "in.jsonl", [{"title": t} for t in TITLES] * 2000)
    out = tmp_path / "out.parquet"
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
              "sys.argv = ['meli-score', *sys.argv[1:]]; from meli.score.cli import entry; entry()")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(out), "--model", str(model), "--quiet",
                           "--batch-size", "16777216"], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    if done.returncode == 0:  # the machine found the memory after all: then the output is right
        assert pq.read_table(out).num_rows == len(TITLES) * 2000
        return
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("Error: ") and lines[0].endswith("; lower --batch-size (memory follows it)"), lines
    assert not out.exists() and temporaries(tmp_path) == []
    assert resource  # imported for the child's sake: RLIMIT_AS is POSIX


# ================================================================ exit codes


def test_the_installed_commands_exit_with_their_code_and_skip_teardown(model, tmp_path):
    """The console scripts end the process with the command's exit code once everything is
    written (no interpreter teardown, where Arrow's thread pools can abort a finished process):
    0 on success with the output complete, 1 with one Error line, 2 on a usage error."""
    bin_dir = Path(sys.executable).parent
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "title": t} for i, t in enumerate(TITLES)])
    runs = [([str(bin_dir / "meli-score"), str(src), str(tmp_path / "out.parquet"), "--model", str(model), "--quiet"], 0),
            ([str(bin_dir / "meli-score"), str(tmp_path / "missing.jsonl"), str(tmp_path / "o.parquet"), "--model",
              str(model), "--quiet"], 1),
            ([str(bin_dir / "meli-score"), "--no-such-option"], 2),
            ([str(bin_dir / "meli-train"), "--version"], 0),
            ([str(bin_dir / "meli-export"), "--parity-rows", "-3"], 2)]
    for _ in range(3):  # an abort at teardown shows up under load, not every time
        for cmd, code in runs:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
            assert done.returncode == code, (cmd, done.returncode, done.stderr[-2000:])
            assert "terminate called" not in done.stderr and "Traceback" not in done.stderr
    assert pq.read_table(tmp_path / "out.parquet").num_rows == len(TITLES)
    stdout = subprocess.run([str(bin_dir / "meli-score"), str(src), "-", "--model", str(model), "--quiet"],
                            capture_output=True, text=True, timeout=300).stdout
    assert len(stdout.splitlines()) == len(TITLES)  # flushed before the process ends


# ================================================================ export mistakes


def _export(*args):
    from meli.export.cli import main as export_main

    return CliRunner().invoke(export_main, [str(a) for a in args] + ["--quiet", "--no-register"])


def test_export_never_writes_over_its_own_checkpoint(trained, tmp_path):
    from meli.checkpoint import save_checkpoint

    ckpt = save_checkpoint(trained["mlp"].checkpoint, tmp_path / "model.pt")
    before = ckpt.read_bytes()
    result = _export("--checkpoint", ckpt, "--output", ckpt)
    assert result.exit_code == 1
    assert result.output == f"Error: {ckpt}: --output names the checkpoint being exported; write the model to another file\n"
    assert ckpt.read_bytes() == before and temporaries(tmp_path) == []


@pytest.mark.parametrize("rows, message", [
    ([{"title": None}, {"title": ""}, {"title": "!!! ??? ..."}],
     "no usable titles for the parity check (2 non-null, none with a word the model reads); pass --parity-data FILE "
     "with real titles"),
    ([], "no usable titles for the parity check (0 non-null, none with a word the model reads); pass --parity-data "
         "FILE with real titles"),
])
def test_parity_is_never_proven_on_titles_the_model_cannot_read(rows, message, trained, tmp_path):
    from meli.checkpoint import save_checkpoint

    ckpt = save_checkpoint(trained["mlp"].checkpoint, tmp_path / "model.pt")
    data = tmp_path / "parity.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "model.onnx"
    result = _export("--checkpoint", ckpt, "--output", out, "--parity-data", data)
    assert result.exit_code == 1 and result.output == f"Error: {data}: {message}\n", result.output
    assert not out.exists() and temporaries(tmp_path) == []


@pytest.mark.parametrize("value", ["-1", "0", "many"])
def test_parity_rows_must_be_a_positive_count(value, tmp_path):
    result = _export("--parity-rows", value)
    assert result.exit_code == 2 and "Invalid value for '--parity-rows'" in result.output
    assert "Traceback" not in result.output


# ================================================================ training inputs


def test_categories_of_one_title_each_cannot_be_held_out(tmp_path):
    from meli.train.cli import main as train_main

    data = write_jsonl(tmp_path / "singles.jsonl", [{"title": f"producto {i} marca{i}", "category": f"CAT_{i}"}
                                                    for i in range(40)])
    result = CliRunner().invoke(train_main, ["--data", str(data), "--epochs", "1", "--quiet"])
    assert result.exit_code == 1
    assert result.output == (f"Error: {data}: too few titles per category to hold out a validation split (a category "
                             "needs two titles to give one); pass a validation file (--validation)\n")


def test_a_refused_run_does_not_bind_the_experiment_to_its_data(tmp_path):
    """Data refused before training leaves no experiment behind it, and an experiment whose
    only runs failed takes the corrected data; one with a finished run of other data refuses."""
    import mlflow

    from meli.train.cli import main as train_main

    demo = ROOT / "meli" / "resources" / "demo"
    bad = write_jsonl(tmp_path / "validation.jsonl", [{"title": "Taladro", "category": "NEVER_IN_TRAIN"}])
    args = ["--train", str(demo / "train.jsonl.gz"), "--experiment", "exp", "--epochs", "1", "--members", "1", "--quiet"]
    refused = CliRunner().invoke(train_main, args + ["--validation", str(bad)])
    assert refused.exit_code == 1 and refused.output.startswith(f"Error: {bad}: 1 category(ies) appear only in validation")
    client = mlflow.tracking.MlflowClient("sqlite:///mlflow.db")
    assert client.get_experiment_by_name("exp") is None
    good = CliRunner().invoke(train_main, args + ["--validation", str(demo / "validation.jsonl.gz")])
    assert good.exit_code == 0, good.output
    other = write_jsonl(tmp_path / "other.jsonl", [{"title": "Taladro Bosch", "category": "DRILLS"}] * 3)
    again = CliRunner().invoke(train_main, ["--train", str(demo / "train.jsonl.gz"), "--validation", str(other),
                                            "--experiment", "exp", "--epochs", "1", "--quiet"])
    assert again.exit_code == 1 and "holds runs on other data" in again.output


# ================================================================ the environment


def test_file_names_that_are_not_utf8_read_write_and_are_named(model, tmp_path):
    """Names whose bytes are not UTF-8 (legal on Linux) are read and written like any other,
    and an error names them as a shell shows them (\\xNN), on one line."""
    src = Path(os.fsdecode(bytes(tmp_path) + b"/in\xff.jsonl"))
    write_jsonl(src, [{"title": t} for t in TITLES])
    out = Path(os.fsdecode(bytes(tmp_path) + b"/out\xfe.parquet"))
    low = Path(os.fsdecode(bytes(tmp_path) + b"/low\xfd.parquet"))
    report = Path(os.fsdecode(bytes(tmp_path) + b"/r\xfc.html"))
    scored = expect_scored([src, out, "--model", model, "--report", report, "--min-probability", "0.999",
                            "--route-low", low], out)
    assert scored.num_rows + read_output(low).num_rows == len(TITLES) and report.is_file()
    parquet_in = Path(os.fsdecode(bytes(tmp_path) + b"/in\xfb.parquet"))
    with open(parquet_in, "wb") as f:
        pq.write_table(pa.table({"title": TITLES}), f)
    again = expect_scored([parquet_in, tmp_path / "again.jsonl", "--model", model], tmp_path / "again.jsonl")
    assert again.num_rows == len(TITLES)
    missing = Path(os.fsdecode(bytes(tmp_path) + b"/gone\xff.jsonl"))
    shown = f"{tmp_path}/gone\\xff.jsonl"
    expect_error([missing, tmp_path / "o.parquet", "--model", model], f"{shown}: no such file or directory",
                 tmp_path / "o.parquet")


def test_stdin_that_does_not_fit_the_temporary_folder_is_one_line(model, tmp_path):
    """stdin is spooled to a temporary file; when that cannot grow (a full file system; here a
    file-size limit), one Error line says so and where, and asks for TMPDIR."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    data = "".join(json.dumps({"title": t}) + "\n" for t in [t for t in TITLES if t] * 20_000).encode()
    assert len(data) > 2 << 20
    done = subprocess.run([str(Path(sys.executable).parent / "meli-score"), "-", str(tmp_path / "out.parquet"), "--model",
                           str(model), "--quiet"], input=data, capture_output=True, preexec_fn=small_files, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1 and lines == [f"Error: -: cannot hold the input in {tmp_path} (File too large); set "
                                              "TMPDIR to a folder with room"], done.stderr[-2000:]
    assert not (tmp_path / "out.parquet").exists() and not list(tmp_path.glob("meli-input-*"))


@pytest.mark.parametrize("which", ["output", "route-low", "report"])
def test_no_output_of_meli_score_is_its_own_model(which, model, tmp_path):
    """The model file is an input too: naming it (whatever it is called) as the output, the
    low-probability file or the report is one Error line, the model byte for byte as it was."""
    import shutil

    own = tmp_path / {"output": "model.parquet", "route-low": "model.jsonl", "report": "r.json"}[which]
    shutil.copy(model, own)
    before = own.read_bytes()
    src = write_jsonl(tmp_path / "in.jsonl", [{"title": t} for t in TITLES])
    out = tmp_path / "out.parquet"
    args = {"output": [src, own, "--model", own],
            "route-low": [src, out, "--model", own, "--min-probability", "0.5", "--route-low", own],
            "report": [src, out, "--model", own, "--report", tmp_path / "r.html"]}[which]
    result = score_cli(*args)
    what = {"output": "the output", "route-low": "the low-probability file", "report": "the report"}[which]
    assert result.exit_code == 1 and result.output == f"Error: {own}: {what} would overwrite the model file\n", result.output
    assert own.read_bytes() == before and temporaries(tmp_path) == [] and not out.exists()


def test_quiet_training_and_export_leave_stderr_empty(tmp_path):
    """--quiet, as a nightly job runs the commands (processes, stderr to a file): nothing on
    stderr when all goes well, MLflow's own warnings included (the pyfunc model declares its
    input and output types); one Error line when it does not."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    train = subprocess.run([str(bin_dir / "meli-train"), "--members", "1", "--epochs", "1", "--quiet"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0 and train.stderr == "", train.stderr[-3000:]
    export = subprocess.run([str(bin_dir / "meli-export"), "--output", str(tmp_path / "m.onnx"), "--quiet"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0 and export.stderr == "", export.stderr[-3000:]
    bad = subprocess.run([str(bin_dir / "meli-export"), "--output", str(tmp_path / "m2.onnx"), "--parity-data",
                          str(tmp_path / "missing.jsonl"), "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 1 and bad.stderr == f"Error: {tmp_path / 'missing.jsonl'}: no such file for the parity check\n"
