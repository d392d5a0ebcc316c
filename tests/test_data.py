"""Reading data: every format, the challenge's layouts, and clear errors on bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from meli.dataset import DataFilter, LabelledSplit, check_labels, fingerprint, load_labelled, split_holdout
from meli.demo_catalog import DEMO_DIR, generate, write_demo
from meli.errors import InputError, OutputError
from meli.formats import AtomicWriter, detect_format, iter_batches, read_table
from meli.metrics import balanced_accuracy, confused_pairs, per_category

ROWS = [
    {"title": "Funda iPhone 11 Silicona", "category": "CELLPHONE_CASES", "language": "spanish", "label_quality": "reliable"},
    {"title": "Capa Celular Samsung", "category": "CELLPHONE_CASES", "language": "portuguese", "label_quality": "unreliable"},
    {"title": "Taladro Bosch 650w", "category": "DRILLS", "language": "spanish", "label_quality": "unreliable"},
]


def test_challenge_csv_layouts(tmp_path):
    full = tmp_path / "train.csv"
    full.write_text('title,label_quality,language,category\n"Taladro, Bosch",reliable,spanish,DRILLS\n', encoding="utf-8")
    assert read_table(full).to_pylist() == [{"title": "Taladro, Bosch", "label_quality": "reliable", "language": "spanish", "category": "DRILLS"}]
    headerless = tmp_path / "train-sample.csv"
    headerless.write_text("Placa De Sonido - Behringer Umc22,SOUND_CARDS\n1234,DRILLS\n", encoding="utf-8")
    table = read_table(headerless)
    assert table.column_names == ["title", "category"]
    assert table["title"].to_pylist() == ["Placa De Sonido - Behringer Umc22", "1234"]  # a number stays a string
    test = tmp_path / "test.csv.gz"
    test.write_bytes(gzip.compress(b"id,title,language\n0,Kit Maternidade,portuguese\n"))
    assert read_table(test).to_pylist() == [{"id": "0", "title": "Kit Maternidade", "language": "portuguese"}]


def test_shared_raw_samples_read_as_is(shared_data):
    train = load_labelled(shared_data / "meli-2019-raw" / "train-sample.csv")
    assert len(train) == 1260
    test = read_table(shared_data / "meli-2019-raw" / "test-sample.csv")
    assert test.column_names == ["id", "title", "language"] and test.num_rows == 1000


def test_jsonl_parquet_and_parquet_folder_agree(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    table = read_table(jsonl)
    pq.write_table(table, tmp_path / "d.parquet")
    (tmp_path / "parts").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "parts" / "part-0.parquet")
    pq.write_table(table.slice(2), tmp_path / "parts" / "part-1.parquet")
    for path in (tmp_path / "d.parquet", tmp_path / "parts"):
        assert read_table(path).to_pylist() == ROWS
    batches = list(iter_batches(jsonl, batch_size=2))
    assert [b.num_rows for b in batches] == [2, 1]


def test_unknown_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="unknown format"):
        detect_format(tmp_path / "data.xlsx")
    with pytest.raises(InputError, match="no such file"):
        list(iter_batches(tmp_path / "missing.parquet"))


def test_malformed_jsonl_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"title": "ok"}\n{"title": "ok"}\n{"title": broken}\n'))
    with pytest.raises(InputError, match=r"bad\.jsonl\.gz: line 3: malformed JSON"):
        read_table(bad)
    typed = write_jsonl(tmp_path / "typed.jsonl", [{"title": "ok"}, {"title": 5}])
    with pytest.raises(InputError, match=r"line 2: column 'title' must be a string"):
        read_table(typed)


def test_corrupt_parquet_is_named(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"bad\.parquet: not a readable Parquet file"):
        read_table(bad)


def test_labelled_data_checks(tmp_path):
    no_category = write_jsonl(tmp_path / "x.jsonl", [{"title": "a", "cat": "B"}])
    with pytest.raises(InputError, match=r"missing column\(s\) category; the file has: title, cat"):
        load_labelled(no_category)
    only_pt = load_labelled(write_jsonl(tmp_path / "d.jsonl", ROWS), DataFilter(languages=("portuguese",)))
    assert only_pt.titles.to_pylist() == ["Capa Celular Samsung"]
    with pytest.raises(InputError, match="no labelled rows left"):
        load_labelled(tmp_path / "d.jsonl", DataFilter(languages=("english",)))
    reliable = load_labelled(tmp_path / "d.jsonl", DataFilter(label_qualities=("reliable",)))
    assert len(reliable) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="no rows"):
        load_labelled(empty)


def test_category_seen_only_in_validation_is_an_error():
    train = LabelledSplit(pa.array(["a", "b"]), pa.array(["X", "Y"]), "train.jsonl")
    validation = LabelledSplit(pa.array(["c"]), pa.array(["Z"]), "validation.jsonl")
    with pytest.raises(InputError, match=r"validation\.jsonl: 1 category\(ies\) appear only in validation.*Z"):
        check_labels(train, validation)
    assert check_labels(train, train) == ("X", "Y")


def test_holdout_is_stratified_and_fingerprint_tracks_content():
    data = load_labelled(DEMO_DIR / "train.jsonl.gz")
    train, validation = split_holdout(data, 0.2, seed=1)
    assert len(train) + len(validation) == len(data)
    assert set(validation.categories.to_pylist()) <= set(train.categories.to_pylist())
    assert fingerprint(train, validation) == fingerprint(*split_holdout(data, 0.2, seed=1))
    assert fingerprint(train, validation) != fingerprint(*split_holdout(data, 0.2, seed=2))


def test_atomic_writer_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with AtomicWriter(target) as w:
            w.path.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [target]
    with pytest.raises(OutputError, match="does not exist"):
        AtomicWriter(tmp_path / "missing" / "out.bin")


def test_demo_data_is_generated_deterministically(tmp_path):
    write_demo(tmp_path)
    for name in ("train.jsonl.gz", "validation.jsonl.gz", "catalog.jsonl.gz"):
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name
    cats = {r["category"] for r in generate(5, seed=0)}
    assert len(cats) == 30


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 7, 500), rng.integers(0, 8, 500)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    labels = tuple(f"C{i}" for i in range(8))
    rows = {r.category: r for r in per_category(y_true, y_pred, labels)}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(8), zero_division=0)
    for i in range(8):
        assert rows[f"C{i}"].f1 == pytest.approx(f[i]) and rows[f"C{i}"].support == s[i]
    top = confused_pairs(y_true, y_pred, labels, top=1)[0]
    assert top[2] == max(((y_true == a) & (y_pred == b)).sum() for a in range(8) for b in range(8) if a != b)
