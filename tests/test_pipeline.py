"""The three commands as a user runs them: meli-train → meli-export → meli-score, with MLflow.

Each test runs in its own empty folder (see conftest), so the default MLflow store is a
fresh ``mlflow.db`` there, exactly as on a new user's machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import ROOT, write_jsonl
from meli.export.cli import main as export_main
from meli.export.parity import MIN_QUANTIZED_AGREEMENT
from meli.onnx_model import load_onnx_model
from meli.score.cli import main as score_main
from meli.train.cli import main as train_main

SMALL_TOML = """
model = "{model}"
epochs = 3
lr = 0.01
[tokenizer]
char_buckets = 4096
{extra}
[mlp]
embedding_dim = 32
hidden = [64]
[cnn]
embedding_dim = 32
filters = 32
"""


def write_config(folder: Path, model: str = "mlp") -> Path:
    extra = "word_bigrams = false\nchar_ngram_max = 0" if model == "cnn" else ""
    path = folder / f"{model}.toml"
    path.write_text(SMALL_TOML.format(model=model, extra=extra))
    return path


def invoke(command, args: list[str]):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture
def trained_run(tmp_path):
    result = invoke(train_main, ["--config", write_config(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def test_train_logs_everything_to_a_local_mlflow_store(trained_run, tmp_path):
    from mlflow.tracking import MlflowClient

    assert (tmp_path / "mlflow.db").is_file()
    run_id = trained_run.stdout.split()[1]
    assert "validation balanced accuracy" in trained_run.output and "mlflow ui --backend-store-uri sqlite:///" in trained_run.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["model"] == "mlp" and run.data.params["tokenizer.char_buckets"] == "4096"
    assert "mlp.hidden" in run.data.params and not any(k.startswith("cnn.") for k in run.data.params)
    assert run.data.tags["meli.data_fingerprint"] and run.data.tags["meli.device"] == "cpu"
    assert len(client.get_metric_history(run_id, "val_balanced_accuracy")) == 3
    assert len(client.get_metric_history(run_id, "train_eval_loss")) == 3  # the curves compare like with like
    artifacts = {a.path for folder in ("checkpoint", "report") for a in client.list_artifacts(run_id, folder)}
    assert f"checkpoint/{run_id}.pt" in artifacts
    assert {"report/training_curves.png", "report/per_category.csv", "report/confused_pairs.csv",
            "report/worst_categories.png", "report/vocabulary.txt", "report/labels.txt", "report/per_category.json"} <= artifacts
    stored = list(tmp_path.rglob(f"{run_id}.pt"))  # once: in the run's artifacts, nowhere else
    assert len(stored) == 1 and "mlruns" in stored[0].parts and f"checkpoint: {stored[0]}" in trained_run.output


def test_tracking_uri_is_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    result = invoke(train_main, ["--config", write_config(tmp_path), "--quiet", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere.db").is_file() and not (tmp_path / "mlflow.db").exists()


def test_runs_on_other_data_never_share_an_experiment(trained_run, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", [{"title": f"titulo {i}", "category": "AB"[i % 2]} for i in range(40)])
    result = invoke(train_main, ["--config", write_config(tmp_path), "--data", other, "--experiment", "meli-demo", "--quiet"])
    assert result.exit_code == 1
    assert re.fullmatch(r"Error: MLflow experiment 'meli-demo' holds runs on other data \(fingerprint [0-9a-f]{16}, "
                        r"this data is [0-9a-f]{16}\); pass another --experiment so that runs on different data never "
                        r"compete\n", result.output), result.output


def test_export_takes_the_best_run_and_score_uses_it(trained_run, tmp_path):
    # a second, worse run (1 epoch) in the same experiment must not be exported
    worse = invoke(train_main, ["--config", write_config(tmp_path), "--quiet", "--epochs", "1", "--seed", "3"])
    best_id = trained_run.stdout.split()[1]
    assert worse.exit_code == 0
    result = invoke(export_main, ["--quiet"])
    assert result.exit_code == 0, result.output
    assert f"(run {best_id})" in result.output and "registered as models:/meli-categorizer/1" in result.output
    model = tmp_path / "artifacts" / "model.onnx"
    assert model.is_file() and not list(model.parent.glob(".*.tmp"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    report = {a.path for a in client.list_artifacts(best_id, "export")}
    assert {"export/parity_report.json", "export/signature.json"} <= report
    metrics = client.get_run(best_id).data.metrics
    # the default export has int8 matrix products: its categories must agree with the checkpoint's
    assert metrics["parity_checkpoint_top1_agreement"] >= MIN_QUANTIZED_AGREEMENT
    assert load_onnx_model(model, "cpu").card.matmuls == "int8-row"
    exact = invoke(export_main, ["--quiet", "--no-quantize", "--no-register", "--output", tmp_path / "fp.onnx"])
    assert exact.exit_code == 0, exact.output
    assert load_onnx_model(tmp_path / "fp.onnx", "cpu").card.matmuls == "fp32"
    assert float(exact.output.split("max |diff| ")[1].split()[0]) <= 1e-5

    catalog = ROOT / "meli" / "resources" / "demo" / "catalog.jsonl.gz"
    for model_ref in (str(model), "models:/meli-categorizer/1", "models:/meli-categorizer@latest-export"):
        scored = invoke(score_main, [catalog, tmp_path / "scored.parquet", "--model", model_ref, "--quiet"])
        assert scored.exit_code == 0, scored.output
    table = pq.read_table(tmp_path / "scored.parquet")
    assert table.num_rows == 1200 and table["id"].to_pylist() == list(range(1200))
    assert table.schema.metadata[b"meli.mlflow_run_id"].decode() == best_id

    check = invoke(export_main, ["--check", "--quiet"])
    assert check.exit_code == 0 and "int8-row matrix products" in check.output
    agreement = float(check.output.split("top-1 agreement ")[-1].split("%")[0]) / 100
    assert agreement >= MIN_QUANTIZED_AGREEMENT


def test_cnn_through_the_whole_pipeline(tmp_path):
    assert invoke(train_main, ["--config", write_config(tmp_path, "cnn"), "--quiet"]).exit_code == 0
    out = invoke(export_main, ["--quiet", "--no-register", "--output", tmp_path / "cnn.onnx"])
    assert out.exit_code == 0, out.output
    assert "0 mismatches" in out.output
    catalog = ROOT / "meli" / "resources" / "demo" / "catalog.jsonl.gz"
    scored = invoke(score_main, [catalog, tmp_path / "s.jsonl", "--model", tmp_path / "cnn.onnx", "--quiet", "--top-k", "2"])
    assert scored.exit_code == 0, scored.output
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 1200 and len(rows[0]["top_categories"]) == 2


def test_an_ensemble_through_the_whole_pipeline(tmp_path):
    from mlflow.tracking import MlflowClient

    trained = invoke(train_main, ["--config", write_config(tmp_path), "--members", "2", "--quiet"])
    assert trained.exit_code == 0, trained.output
    assert "ensemble of 2 (members " in trained.output
    run_id = trained.stdout.split()[1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["members"] == "2"
    for member in (1, 2):  # each member's curve, under its own name
        assert len(client.get_metric_history(run_id, f"member{member}_val_balanced_accuracy")) == 3
    # float matrix products: the graph must match the trained ensemble exactly
    out = invoke(export_main, ["--quiet", "--no-register", "--no-quantize", "--output", tmp_path / "ensemble.onnx"])
    assert out.exit_code == 0, out.output
    assert "0 mismatches" in out.output
    catalog = ROOT / "meli" / "resources" / "demo" / "catalog.jsonl.gz"
    scored = invoke(score_main, [catalog, tmp_path / "s.parquet", "--model", tmp_path / "ensemble.onnx", "--quiet"])
    assert scored.exit_code == 0, scored.output
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 1200


# ---------------------------------------------------------------- bad input: training


@pytest.mark.parametrize("setup, message", [
    (lambda d: ["--data", d / "missing"], "missing: no such file or directory"),
    (lambda d: ["--data", _touch(d / "data.xlsx")],
     "data.xlsx: unknown format; expected .parquet, .jsonl, .jsonl.gz, .json, .ndjson, .csv or .csv.gz"),
    (lambda d: ["--data", write_jsonl(d / "t.jsonl", [{"title": "a", "label": "B"}])],
     "t.jsonl: missing column(s) category; the file has: title, label"),
    (lambda d: ["--data", _touch(d / "e.jsonl")], "e.jsonl: no rows"),
    (lambda d: ["--train", write_jsonl(d / "t.jsonl", [{"title": "a b", "category": "X"}, {"title": "c", "category": "Y"}]),
                "--validation", write_jsonl(d / "v.jsonl", [{"title": "a", "category": "Z"}])],
     "v.jsonl: 1 category(ies) appear only in validation, never in training (Z); the model could never predict them"),
    (lambda d: ["--data", write_jsonl(d / "one.jsonl", [{"title": "a", "category": "X"}] * 4)],
     "one.jsonl: need at least 2 categories to train, found 1"),
])
def test_train_bad_input_is_one_line_and_writes_no_checkpoint(setup, message, tmp_path):
    result = invoke(train_main, ["--config", write_config(tmp_path), "--quiet", *setup(tmp_path)])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / message}\n"
    assert not list(tmp_path.rglob("*.pt"))


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


# ---------------------------------------------------------------- bad input: export


def test_export_errors(tmp_path, monkeypatch):
    result = invoke(export_main, ["--quiet"])
    assert result.exit_code == 1 and result.output == (
        f"Error: meli-export: no MLflow store here (no mlflow.db in {Path.cwd()}); run from the folder that holds it, "
        "or set MLFLOW_TRACKING_URI\n")
    assert not (tmp_path / "mlflow.db").exists()  # looking for runs creates no store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    result = invoke(export_main, ["--quiet"])
    assert result.exit_code == 1 and result.output == "Error: no MLflow runs found; train a model first (make train)\n"
    corrupt = tmp_path / "c.pt"
    corrupt.write_bytes(b"garbage")
    result = invoke(export_main, ["--checkpoint", corrupt, "--quiet"])
    assert result.exit_code == 1 and result.output == f"Error: {corrupt}: not a readable checkpoint (not a file torch.save wrote)\n"
    result = invoke(export_main, ["--experiment", "nope", "--quiet"])
    assert result.exit_code == 1 and result.output == "Error: no MLflow experiment named 'nope'\n"


@contextlib.contextmanager
def unwritable_folder(path: Path):
    """A folder this process cannot write in: mode 0o500, or, for root (whom modes do not
    stop), a read-only bind mount of it."""
    path.mkdir()
    path.chmod(0o500)
    mounted = False
    try:
        if os.access(path, os.W_OK):  # root
            mounted = subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode == 0
            if not mounted or subprocess.run(["mount", "-o", "remount,bind,ro", path], capture_output=True).returncode:
                pytest.skip("root without the right to mount: no folder it cannot write in")
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", path], check=True)
        path.chmod(0o700)


def test_export_to_a_missing_or_read_only_folder(trained_run, tmp_path):
    result = invoke(export_main, ["--quiet", "--output", tmp_path / "missing" / "model.onnx"])
    assert result.exit_code == 1
    missing = tmp_path / "missing"
    assert result.output == f"Error: {missing / 'model.onnx'}: folder {missing} does not exist\n"
    with unwritable_folder(tmp_path / "locked") as locked:
        result = invoke(export_main, ["--quiet", "--output", locked / "model.onnx"])
        target = locked / "model.onnx"
        assert result.exit_code == 1 and result.output == f"Error: {target}: folder {locked} is not writable\n", result.output


def test_failed_parity_writes_no_model(trained, exported, tmp_path):
    """--check against another model's checkpoint must fail loudly."""
    from meli.checkpoint import save_checkpoint

    ckpt = trained["mlp"].checkpoint
    other = dataclasses.replace(ckpt, state_dict={k: v + 0.01 for k, v in ckpt.state_dict.items()})  # same shapes
    path = save_checkpoint(other, tmp_path / "other.pt")
    result = invoke(export_main, ["--check", "--output", exported["mlp"], "--checkpoint", path, "--quiet"])
    assert result.exit_code == 1 and result.output == (  # never a silent stand-in
        "Error: no titles for the parity check: this checkpoint names no validation file; pass --parity-data FILE\n")
    validation = ROOT / "meli" / "resources" / "demo" / "validation.jsonl.gz"
    result = invoke(export_main, ["--check", "--output", exported["mlp"], "--checkpoint", path, "--parity-data", validation,
                                  "--quiet"])
    assert result.exit_code == 1
    measured, error = result.output.splitlines()  # the parity line (stdout), then the one error line
    assert measured.startswith(f"parity on 600 titles of {validation} ") and "top-1 agreement" in measured
    assert error == f"Error: parity check failed: {measured}; no model.onnx was written"


def test_every_command_has_help_with_an_example():
    for command, name in ((train_main, "meli-train"), (export_main, "meli-export"), (score_main, "meli-score")):
        result = CliRunner().invoke(command, ["--help"])
        assert result.exit_code == 0 and "Example:" in result.output and name in result.output


@pytest.mark.parametrize("command, name", [(train_main, "meli-train"), (export_main, "meli-export"), (score_main, "meli-score")])
def test_every_command_says_its_version(command, name):
    from meli import __version__

    result = CliRunner().invoke(command, ["--version"])
    assert result.exit_code == 0 and result.output == f"{name} {__version__}\n"


def test_the_export_is_an_mlflow_pyfunc_model_and_the_serving_alias_is_gated(trained_run, tmp_path):
    import mlflow
    import pandas as pd

    result = invoke(export_main, ["--quiet"])
    assert result.exit_code == 0, result.output
    assert "@champion set: no version held it" in result.output
    catalog = ROOT / "meli" / "resources" / "demo" / "catalog.jsonl.gz"
    scored = invoke(score_main, [catalog, tmp_path / "scored.parquet", "--quiet"])
    assert scored.exit_code == 0, scored.output
    expected = pq.read_table(tmp_path / "scored.parquet")

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/meli-categorizer@champion")
    titles = [json.loads(line)["title"] for line in gzip.open(catalog, "rt")]
    got = model.predict(pd.DataFrame({"title": titles}))
    assert list(got.columns) == ["category", "probability"]
    assert [c if isinstance(c, str) else None for c in got["category"]] == expected["category"].to_pylist()
    assert np.allclose(got["probability"].fillna(-1).to_numpy(), np.nan_to_num(expected["probability"].to_numpy(
        zero_copy_only=False).astype(float), nan=-1), atol=1e-6)
    assert model.metadata.get_input_schema().input_names() == ["title"]
    # `mlflow models predict` scores a file with it (in this environment: --env-manager local)
    import os
    import subprocess
    import sys

    sample = [(t, c) for t, c in zip(titles, expected["category"].to_pylist()) if t and '"' not in t][:20]
    (tmp_path / "titles.csv").write_text("title\n" + "\n".join(f'"{t}"' for t, _ in sample) + "\n")
    done = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m",
                           "models:/meli-categorizer@champion", "-i", str(tmp_path / "titles.csv"), "-t", "csv",
                           "--env-manager", "local", "-o", str(tmp_path / "predicted.json")],
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    predicted = json.loads((tmp_path / "predicted.json").read_text())["predictions"]
    assert [r["category"] for r in predicted] == [c for _, c in sample]

    # a worse run's export is registered but does not take the serving alias ...
    worse = invoke(train_main, ["--config", write_config(tmp_path), "--quiet", "--epochs", "1", "--seed", "5"])
    worse_id = worse.stdout.split()[1]
    result = invoke(export_main, ["--quiet", "--run-id", worse_id, "--output", tmp_path / "worse.onnx"])
    assert result.exit_code == 0, result.output
    assert "models:/meli-categorizer/2" in result.output and "@champion stays on version 1" in result.output
    assert "balanced accuracy on 600 titles of" in result.output  # both exported files, scored on the same titles
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("meli-categorizer", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("meli-categorizer", "latest-export").version) == "2"
    # ... unless forced
    result = invoke(export_main, ["--quiet", "--run-id", worse_id, "--output", tmp_path / "worse.onnx", "--force"])
    assert "@champion moved from version 1 (--force)" in result.output
    assert str(client.get_model_version_by_alias("meli-categorizer", "champion").version) == "3"


def test_parity_never_falls_back_to_other_titles(tmp_path, monkeypatch):
    """The run records its data files by absolute path and content hash: the export finds them
    from another folder and says which it checked on; once the file changed or is gone it
    stops and names it."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(ROOT / "meli" / "resources" / "demo", data)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    result = invoke(train_main, ["--config", write_config(tmp_path), "--data", "../data", "--quiet", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    (tmp_path / "elsewhere").mkdir()
    shutil.copytree(tmp_path / "work" / "mlruns", tmp_path / "elsewhere" / "mlruns")
    monkeypatch.chdir(tmp_path / "elsewhere")  # ../data means nothing here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    out = invoke(export_main, ["--quiet", "--no-register", "--output", tmp_path / "m.onnx"])
    assert out.exit_code == 0, out.output
    assert f"parity on 600 titles of {(data / 'validation.jsonl.gz').resolve()}" in out.output
    import gzip

    original = (data / "validation.jsonl.gz").read_bytes()
    lines = gzip.decompress(original).splitlines(keepends=True)
    (data / "validation.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[:-1])))  # one title fewer
    changed = invoke(export_main, ["--quiet", "--no-register", "--output", tmp_path / "m2.onnx"])
    assert changed.exit_code == 1 and "validation file has changed since the run read it" in changed.output
    (data / "validation.jsonl.gz").unlink()
    gone = invoke(export_main, ["--quiet", "--no-register", "--output", tmp_path / "m2.onnx"])
    assert gone.exit_code == 1 and gone.output.count("\n") == 1
    assert "validation.jsonl.gz: the run's validation file is not there" in gone.output and "--parity-data" in gone.output
    assert not (tmp_path / "m2.onnx").exists()


def test_a_model_of_other_data_never_takes_the_serving_alias(tmp_path):
    """The demo trained and exported into a store whose champion was trained on other data
    (here: a subset of the demo) is registered, but @champion stays where it is."""
    import mlflow

    from meli.dataset import load_labelled

    data = tmp_path / "other"
    data.mkdir()
    demo = ROOT / "meli" / "resources" / "demo"
    for split in ("train", "validation"):
        rows = load_labelled(demo / f"{split}.jsonl.gz")
        write_jsonl(data / f"{split}.jsonl", [{"title": t, "category": c} for t, c in
                                                 zip(rows.titles.to_pylist()[::2], rows.categories.to_pylist()[::2])])
    first = invoke(train_main, ["--config", write_config(tmp_path), "--data", data, "--quiet"])
    assert first.exit_code == 0, first.output
    exported = invoke(export_main, ["--quiet", "--experiment", "meli-other", "--output", tmp_path / "a.onnx"])
    assert exported.exit_code == 0, exported.output
    demo_run = invoke(train_main, ["--config", write_config(tmp_path), "--quiet"])
    assert demo_run.exit_code == 0, demo_run.output
    result = invoke(export_main, ["--quiet", "--experiment", "meli-demo", "--output", tmp_path / "b.onnx"])
    assert result.exit_code == 0, result.output
    assert "@champion stays on version 1: it was trained on other data" in result.output
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("meli-categorizer", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("meli-categorizer", "latest-export").version) == "2"
