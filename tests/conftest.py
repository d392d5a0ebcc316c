"""Shared fixtures: small configs, the demo data, models trained once per session.

Tests that need the real MeLi titles in ``../shared/data`` use the `shared_data` fixture,
which skips them cleanly on a fresh clone where that folder does not exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from meli.dataset import TRAIN_MIX, load_labelled
from meli.demo_catalog import DEMO_DIR
from meli.train.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test gets its own working folder and MLflow store (no MLFLOW_TRACKING_URI leak)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "meli-es" / "train.jsonl.gz").is_file():
        pytest.skip("../shared/data (real MeLi titles) is not present")
    return SHARED_DATA


def small_config(model: str = "mlp", **overrides) -> TrainConfig:
    """The committed config, shrunk so that a test trains in seconds."""
    config = load_config(model)  # the shipped train/configs/<model>.toml
    tokenizer = dataclasses.replace(config.tokenizer, char_buckets=4096) if model == "mlp" else config.tokenizer
    config = dataclasses.replace(
        config,
        epochs=4,
        lr=0.01,
        members=1,  # the ensemble has tests of its own
        distill=dataclasses.replace(config.distill, enabled=False),  # so has distillation
        tokenizer=tokenizer,
        mlp=dataclasses.replace(config.mlp, embedding_dim=32, hidden=(64,)),
        cnn=dataclasses.replace(config.cnn, embedding_dim=32, filters=32),
    )
    return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="session")
def demo_splits():
    return load_labelled(DEMO_DIR / "train.jsonl.gz"), load_labelled(DEMO_DIR / "validation.jsonl.gz")


@pytest.fixture(scope="session")
def trained(demo_splits):
    """A small MLP, CNN and two-MLP ensemble trained on the demo data, once for the whole session."""
    from meli.train.recipe import train_and_refit
    from meli.train.trainer import train_model

    train, validation = demo_splits
    # what meli-train records: the run, and the training mix the nightly report compares with
    provenance = {"mlflow_run_id": "none", TRAIN_MIX: json.dumps(train.category_counts())}
    models = {
        kind: train_model(small_config(kind), train, validation, provenance=provenance, quiet=True)
        for kind in ("mlp", "cnn")
    }
    models["ensemble"] = train_and_refit(small_config("mlp", members=2, refit=False), train, validation,
                                         provenance=provenance, quiet=True)
    return models


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """Each trained model exported to model.onnx as `meli-export` ships it by default (float16
    table, int8 matrix products with per-title scales); no MLflow involved."""
    return _export_all(trained, tmp_path_factory.mktemp("onnx"), quantize=True)


@pytest.fixture(scope="session")
def exported_float(trained, tmp_path_factory):
    """The same models exported with float matrix products (``meli-export --no-quantize``)."""
    return _export_all(trained, tmp_path_factory.mktemp("onnx-float"), quantize=False)


def _export_all(trained, folder: Path, quantize: bool) -> dict[str, Path]:
    from meli.export.onnx_export import to_onnx

    paths = {}
    for kind, result in trained.items():
        path = folder / f"{kind}.onnx"
        path.write_bytes(to_onnx(result.checkpoint, quantize=quantize).SerializeToString())
        paths[kind] = path
    return paths


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


os.environ.setdefault("TQDM_DISABLE", "1")
