"""meli-score and the export graph: formats, order, nulls, bad input, interruptions, parity."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, write_jsonl
from meli.export.onnx_export import scoring_module, signature
from meli.export.parity import MAX_ROUNDED_DIFF, MIN_QUANTIZED_AGREEMENT, MIN_ROUNDED_AGREEMENT, ParityError, check_parity, require_parity
from meli.errors import InputError, ModelFileError, SettingError
from meli.onnx_model import load_onnx_model
from meli.score.cli import main as score_main
from meli.scorer import ScoreConfig, Scorer, score_arrow_batches
from meli.score.job import ScoreJob
from meli.score.score import score_file

TITLES = ["Taladro Percutor Bosch 650w", "", None, "Casco Moto Hawk Rebatible", "®®®", "Funda iPhone 11 silicona",
          "Pañales Pampers Talle G", "zzqx"]


def direct_predictions(model_path: Path, titles: list) -> tuple[list, np.ndarray]:
    """The model run by hand, title by title: the truth the scorer is checked against."""
    m = load_onnx_model(model_path, provider="cpu")
    tok = m.card.tokenizer()
    encode = tok.encode_compact_reference if m.card.compact else tok.encode_reference
    cats, probs = [], []
    for t in titles:
        ids = encode(t)
        if not any(i >= 2 for i in ids):
            cats.append(None)
            probs.append(np.nan)
            continue
        p = m.predict(np.array([ids], dtype=np.int64))[0]
        cats.append(m.card.labels[int(p.argmax())])
        probs.append(p.max())
    return cats, np.array(probs, dtype=np.float32)


# ---------------------------------------------------------------- the exported graph


@pytest.mark.parametrize("kind", ["mlp", "cnn", "ensemble"])
def test_onnx_graph_contract(kind, exported, trained):
    proto = onnx.load(exported[kind])
    onnx.checker.check_model(proto, full_check=True)
    sig = signature(proto)
    assert sig["inputs"] == [{"name": "token_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    assert sig["outputs"][0]["shape"] == ["batch", len(trained[kind].checkpoint.labels)]
    m = load_onnx_model(exported[kind], provider="cpu")
    ckpt = trained[kind].checkpoint
    module, encoding, _ = scoring_module(ckpt, m.card.precision, m.card.matmuls)  # what the graph computes
    assert m.card.encoding == encoding == ("full" if kind == "cnn" else "compact")
    tok = ckpt.tokenizer()
    n_ids = tok.n_compact_ids if m.card.compact else tok.n_ids
    rng = np.random.default_rng(0)
    # batch 1 and large; length 1, shorter than the widest kernel, longer than any title seen;
    # every id of the id space the graph reads (fused ids included)
    for shape in [(1, 1), (1, 2), (2048, 3), (5, 1000)]:
        ids = rng.integers(0, n_ids, shape).astype(np.int64)
        ids[0, :] = 0  # an all-padding row too
        with torch.no_grad():
            expected = module(torch.from_numpy(ids)).numpy()
        got = m.predict(ids)
        assert got.shape == (shape[0], len(m.card.labels))
        assert np.abs(got - expected).max() <= 1e-5 and np.allclose(got.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "ensemble"])
def test_compact_ids_compute_what_the_trained_model_computes(kind, trained, demo_splits):
    """A float32 scoring table on compact ids = the trained model on full ids, title by title;
    the float16 table rounds, and stays within the parity check's bounds."""
    ckpt = trained[kind].checkpoint
    tok = ckpt.tokenizer()
    titles = demo_splits[1].titles
    full, compact = tok.encode_batch(titles), tok.encode_batch(titles, compact=True)
    assert compact.lengths.mean() < full.lengths.mean() / 2
    with torch.no_grad():
        expected = ckpt.probability_model()(torch.from_numpy(np.ascontiguousarray(full.ids))).numpy()  # calibrated too
        for precision, atol in (("fp32", 1e-5), ("fp16", 1e-3)):
            module, _, _ = scoring_module(ckpt, precision)
            got = module(torch.from_numpy(np.ascontiguousarray(compact.ids))).numpy()
            assert np.abs(got - expected).max() <= atol, precision
            assert (got.argmax(1) == expected.argmax(1)).mean() >= MIN_ROUNDED_AGREEMENT


@pytest.mark.parametrize("kind", ["mlp", "cnn", "ensemble"])
def test_parity_on_mixed_length_titles(kind, exported, trained, demo_splits):
    _, validation = demo_splits
    report = check_parity(trained[kind].checkpoint, load_onnx_model(exported[kind], "cpu"), validation.titles, batch_size=64)
    assert report.passed and report.rows == len(validation) and report.top1_agreement == 1.0
    assert report.max_abs_diff <= 1e-5  # every kind, int8 products too (against their twin)
    assert report.checkpoint_top1_agreement >= report.min_checkpoint_agreement >= MIN_QUANTIZED_AGREEMENT
    assert report.min_length < report.max_length
    assert json.loads(report.to_json())["providers"] == ["CPUExecutionProvider"]


def test_int8_products_are_held_to_their_twin_and_cost_little_against_the_checkpoint(trained, demo_splits):
    """The default export's int8 arithmetic is redone in torch (the twin), so parity holds the
    graph to 1e-5; against the float checkpoint it reports (and bounds) what rounding costs."""
    from meli.export.onnx_export import to_onnx

    ckpt = trained["mlp"].checkpoint
    proto = to_onnx(ckpt, quantize=True)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "MatMulIntegerToFloat"} <= ops and "Gemm" not in ops
    model = load_onnx_model(proto.SerializeToString(), "cpu")
    assert model.card.matmuls == "int8-row" and model.card.compact
    report = check_parity(ckpt, model, demo_splits[1].titles)
    assert report.passed and report.max_abs_diff <= 1e-5 and report.top1_mismatches == 0
    assert report.checkpoint_top1_agreement >= MIN_QUANTIZED_AGREEMENT
    assert 1e-5 < report.checkpoint_max_abs_diff <= MAX_ROUNDED_DIFF["int8-row"]  # rounded, not the float graph
    assert "int8-row matrix products" in report.summary()


@pytest.mark.parametrize("quantize", [True, False])
def test_a_graph_that_lost_its_temperature_fails_parity(quantize, trained, demo_splits):
    """The checkpoint says T = 0.5; the graph was exported without it: both comparisons see it."""
    import dataclasses

    from meli.export.onnx_export import to_onnx

    ckpt = trained["mlp"].checkpoint
    calibrated = dataclasses.replace(ckpt, spec=dataclasses.replace(ckpt.spec, temperature=0.5))
    graph = load_onnx_model(to_onnx(ckpt, quantize=quantize).SerializeToString(), "cpu")
    report = check_parity(calibrated, graph, demo_splits[1].titles)
    assert not report.passed
    # halving the temperature moves probabilities by tenths: far beyond int8 rounding (held to
    # MAX_ROUNDED_DIFF, 0.05), so the test sees the temperature, not the rounding
    assert report.max_abs_diff > 0.2 and report.checkpoint_max_abs_diff > 0.2
    # and with it, the same file passes
    good = load_onnx_model(to_onnx(calibrated, quantize=quantize).SerializeToString(), "cpu")
    assert check_parity(calibrated, good, demo_splits[1].titles).passed


def test_the_float16_table_sums_exactly_in_any_order(trained):
    """Every value of the default table is a whole multiple of the grid, so float32 sums of a
    title's rows do not depend on the order of addition (onnxruntime's changes with the
    batch's shape): the premise of int8 products that depend on the title alone."""
    from meli.export.compaction import GRID

    module, _, _ = scoring_module(trained["mlp"].checkpoint, "fp16")
    table = module.pooled.table
    assert table.dtype == torch.float16
    steps = table.to(torch.float64) / GRID
    assert torch.equal(steps, steps.round())
    rng = np.random.default_rng(0)
    rows = table[torch.from_numpy(rng.integers(0, len(table), (500, 40)))].to(torch.float32)  # (500, 40, width + 1)
    forward = rows.sum(1)
    backward = rows.flip(1).cumsum(1)[:, -1]
    pairwise = rows[:, 0::2].sum(1) + rows[:, 1::2].sum(1)
    assert torch.equal(forward, backward) and torch.equal(forward, pairwise)


def test_int8_products_are_for_the_mlp_with_a_float16_table_only(trained):
    """A CNN's convolutions and a float32 table's sums round differently with the batch's
    shape, so those exports keep float products even when quantizing is asked for."""
    from meli.export.onnx_export import to_onnx

    for proto in (to_onnx(trained["cnn"].checkpoint, quantize=True),
                  to_onnx(trained["mlp"].checkpoint, precision="fp32", quantize=True)):
        assert not {"MatMulIntegerToFloat", "QuantizeLinear"} & {n.op_type for n in proto.graph.node}
        assert load_onnx_model(proto.SerializeToString(), "cpu").card.matmuls == "fp32"


def test_a_file_with_dynamic_int8_quantization_loads_with_a_warning(exported_float, tmp_path, caplog):
    """Files written before per-title scales still score, and say why they should be exported again."""
    proto = onnx.load(str(exported_float["mlp"]))
    for entry in proto.metadata_props:
        if entry.key == "meli.model":
            entry.value = json.dumps({**json.loads(entry.value), "matmuls": "int8"})
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    with caplog.at_level("WARNING"):
        model = load_onnx_model(old, "cpu")
    assert model.card.matmuls == "int8"
    assert "depend on the rows scored beside each title" in caplog.text


def test_parity_fails_on_a_graph_that_computes_something_else(exported, trained, demo_splits):
    """The check can fail: the MLP's file checked against the ensemble's checkpoint."""
    _, validation = demo_splits
    report = check_parity(trained["ensemble"].checkpoint, load_onnx_model(exported["mlp"], "cpu"), validation.titles)
    assert not report.passed and report.max_abs_diff > 1e-3
    with pytest.raises(ParityError, match="parity check failed"):
        require_parity(report)


def test_model_card_travels_inside_the_file(exported, trained):
    card = load_onnx_model(exported["mlp"], "cpu").card
    ckpt = trained["mlp"].checkpoint
    assert card.labels == ckpt.labels and card.vocabulary == ckpt.vocabulary
    assert card.tokenizer_config == ckpt.tokenizer_config
    assert card.provenance["metrics"]["val_balanced_accuracy"] == pytest.approx(ckpt.metrics["val_balanced_accuracy"])
    assert {"torch", "onnx", "onnxruntime"} <= set(card.provenance["export_versions"])


def test_export_stores_only_the_rows_a_title_can_reach(exported, trained):
    """One float16 table: padding, the shared zero row, the trained rows in use, one fused
    row per word and head word; the ensemble's members side by side in it, then each row's
    id count."""
    for kind in ("mlp", "ensemble"):
        ckpt = trained[kind].checkpoint
        tables = [t for t in onnx.load(exported[kind]).graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
        assert len(tables) == 1, kind
        table = tables[0]
        assert table.dims[1] == ckpt.model_config.embedding_dim * ckpt.members + 1
        state = ckpt.build_model().state_dict()
        in_use = int(sum(v.ne(0).any(1) for k, v in state.items() if k.endswith("embedding.weight")).ne(0).sum())
        fused = sum(1 for t in ckpt.vocabulary if " " not in t)  # words and head words
        assert table.dims[0] == 2 + in_use + fused, kind
        assert in_use < ckpt.model_config.n_ids - 1  # rows training never touched are gone


def test_onnx_file_runs_in_a_python_without_torch(exported):
    """Scoring needs model.onnx and onnxruntime only: torch and mlflow are blocked here."""
    code = f"""
import sys
sys.modules['torch'] = None; sys.modules['mlflow'] = None
from meli.onnx_model import load_onnx_model
m = load_onnx_model({str(exported['cnn'])!r}, provider='cpu')
import numpy as np
ids = np.zeros((64, 64), dtype=np.int64)
for n in range(1, 65):
    ids[n - 1, :n] = np.arange(2, n + 2)
p = m.predict(ids)
assert p.shape == (64, len(m.card.labels)) and np.allclose(p.sum(1), 1, atol=1e-5)
print('ok', m.provider)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok CPUExecutionProvider"


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("fmt", ["parquet", "parquet-dir", "jsonl", "jsonl.gz", "csv"])
def test_scores_every_format_in_order_row_by_row(fmt, exported, tmp_path):
    rows = [{"id": i, "title": t, "language": "spanish"} for i, t in enumerate(TITLES * 40)]
    table = pa.Table.from_pylist(rows)
    path = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=37)
    elif fmt == "parquet-dir":
        path.mkdir()
        for i in range(3):
            pq.write_table(table.slice(i * 107, 107), path / f"part-{i:03d}.parquet")
    elif fmt.startswith("jsonl"):
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(data) if fmt.endswith("gz") else data)
    else:
        import csv

        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "title", "language"])
            w.writerows([r["id"], r["title"] or "", r["language"]] for r in rows)
    out = tmp_path / "out.parquet"
    summary = score_file(path, out, ScoreJob(model=str(exported["mlp"]), batch_size=50, quiet=True))
    result = pq.read_table(out)
    assert result.num_rows == len(rows) == summary.rows
    ids = result["id"].to_pylist()
    assert [int(i) for i in ids] == list(range(len(rows)))  # CSV ids are strings
    assert result.column_names == ["id", "language", "category", "probability"]
    assert result.schema.field("probability").type == pa.float32()
    cats, probs = direct_predictions(exported["mlp"], [r["title"] for r in rows])
    assert result["category"].to_pylist() == cats
    got = result["probability"].to_numpy(zero_copy_only=False).astype(np.float32)
    assert np.allclose(got, probs, atol=1e-5, equal_nan=True)
    assert summary.unscored == sum(c is None for c in cats) > 0
    assert result.schema.metadata[b"meli.model_sha256"]


def test_challenge_test_sample_as_parquet_and_jsonl(exported, shared_data, tmp_path):
    sample = shared_data / "meli-2019-raw" / "test-sample.csv"
    for out in (tmp_path / "out.parquet", tmp_path / "out.jsonl"):
        result = CliRunner().invoke(score_main, [str(sample), str(out), "--model", str(exported["mlp"]), "--quiet"])
        assert result.exit_code == 0, result.output
        assert result.output == ""  # --quiet
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(1000)]
    assert pq.read_table(tmp_path / "out.parquet")["category"].to_pylist() == [r["category"] for r in rows]


def test_keep_columns_top_k_and_renamed_clashes(exported, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"sku": "a1", "title": t, "category": "TRUTH", "extra": 1} for t in TITLES])
    out = tmp_path / "out.parquet"
    score_file(path, out, ScoreJob(model=str(exported["mlp"]), options=ScoreConfig(keep_columns=("sku",), top_k=3), quiet=True))
    t = pq.read_table(out)
    assert t.column_names == ["sku", "category", "probability", "top_categories", "top_probabilities"]
    first = t.slice(0, 1).to_pylist()[0]
    assert first["top_categories"][0] == first["category"] and first["top_probabilities"][0] == pytest.approx(first["probability"])
    assert first["top_probabilities"] == sorted(first["top_probabilities"], reverse=True)
    assert t["top_categories"].to_pylist()[1] is None  # the empty title
    score_file(path, out, ScoreJob(model=str(exported["mlp"]), quiet=True))
    assert pq.read_table(out).column_names == ["sku", "input_category", "extra", "category", "probability"]


def test_scoring_core_is_a_function_over_record_batches(exported):
    """What Spark's mapInArrow would call, partition by partition."""
    batches = [pa.record_batch({"title": pa.array(TITLES[:4])}), pa.record_batch({"title": pa.array(TITLES[4:])})]
    out = list(score_arrow_batches(iter(batches), str(exported["mlp"]), provider="cpu"))
    assert [b.num_rows for b in out] == [4, 4]
    cats, _ = direct_predictions(exported["mlp"], TITLES)
    assert [c for b in out for c in b.column("category").to_pylist()] == cats


# ---------------------------------------------------------------- bad input and interruptions


def cli(args):
    return CliRunner().invoke(score_main, [str(a) for a in args] + ["--quiet"])


def test_bad_inputs_are_one_line_errors(exported, tmp_path):
    model = exported["mlp"]
    good = write_jsonl(tmp_path / "good.jsonl", [{"title": "taladro"}])
    no_title = write_jsonl(tmp_path / "nt.jsonl", [{"name": "taladro", "sku": 1}])
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"title": "a"}\n{"title": "b"\n')
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1garbage")
    not_ours = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["token_ids"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("token_ids", onnx.TensorProto.INT64, [None, None])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [None, None])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), not_ours)
    cases = [
        ([tmp_path / "missing.parquet", tmp_path / "o.parquet", "--model", model], "missing.parquet: no such file"),
        ([no_title, tmp_path / "o.parquet", "--model", model], "no title column 'title'; the input has: name, sku"),
        ([bad_line, tmp_path / "o.parquet", "--model", model], "bad.jsonl: line 2: malformed JSON"),
        ([corrupt, tmp_path / "o.parquet", "--model", model], "corrupt.parquet: not a readable Parquet file"),
        ([good, tmp_path / "nowhere" / "o.parquet", "--model", model], "does not exist"),
        ([good, good, "--model", model], "would overwrite the input"),
        ([good, tmp_path / "o.parquet", "--model", not_ours], "other.onnx: not a meli-categorizer model"),
        ([good, tmp_path / "o.parquet", "--model", tmp_path / "nope.onnx"], "nope.onnx: no such model file"),
        ([good, tmp_path / "o.csv", "--model", model], "CSV output is not supported"),
        ([good, tmp_path / "o.parquet", "--model", model, "--keep-columns", "sku"], "--keep-columns: no column(s) sku"),
    ]
    for args, message in cases:
        result = cli(args)
        assert result.exit_code == 1, (message, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
        assert message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corrupt.parquet", "good.jsonl", "nt.jsonl", "other.onnx"]


def test_cuda_provider_without_cuda_is_an_error(exported, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(SettingError, match="^provider: cuda, but this onnxruntime has no CUDA provider"):
        load_onnx_model(exported["mlp"], provider="cuda")  # the library names the setting ...
    assert load_onnx_model(exported["mlp"], provider="auto").provider == "CPUExecutionProvider"
    good = write_jsonl(tmp_path / "in.jsonl", [{"title": "taladro"}])
    result = cli([good, tmp_path / "o.parquet", "--model", exported["mlp"], "--provider", "cuda"])
    assert result.output.startswith("Error: --provider: cuda, but this onnxruntime")  # ... the command its flag


def test_a_failure_mid_file_leaves_the_previous_output_untouched(exported, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"title": TITLES * 100}), folder / "part-0.parquet")
    (folder / "part-1.parquet").write_bytes(b"PAR1 truncated by a crash")
    out = tmp_path / "out.parquet"
    out.write_bytes(b"yesterday's scores")
    with pytest.raises(InputError, match="part-1.parquet"):
        score_file(folder, out, ScoreJob(model=str(exported["mlp"]), batch_size=100, quiet=True))
    assert out.read_bytes() == b"yesterday's scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "parts"]


def test_bad_model_file_is_named(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not onnx")
    with pytest.raises(ModelFileError, match="junk.onnx: not a loadable ONNX model"):
        load_onnx_model(junk)


def test_scorer_rejects_a_top_k_beyond_the_labels(exported):
    m = load_onnx_model(exported["mlp"], "cpu")
    with pytest.raises(SettingError, match="top_k: must be between 0 and"):
        Scorer(m, ScoreConfig(top_k=len(m.card.labels) + 1))
