"""Probabilities a team can act on: the temperature, its place in the graph, routing by it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from conftest import write_jsonl
from meli.export.onnx_export import scoring_module, to_onnx
from meli.calibration import (
    calibrate,
    coverage,
    coverage_at_accuracy,
    coverage_table,
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from meli.onnx_model import load_onnx_model
from meli.score.cli import main as score_main
from meli.scorer import ScoreConfig, Scorer
from test_score import TITLES


def synthetic(n: int = 20_000, k: int = 50, temperature: float = 2.5, seed: int = 0):
    """Scores whose labels are drawn from softmax(scores / temperature): the right T is known."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 4, (n, k))
    p = softmax(scores, temperature)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return scores, y


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    scores, y = synthetic(temperature=2.5)
    assert fit_temperature(scores, y) == pytest.approx(2.5, rel=0.06)
    scores, y = synthetic(temperature=0.6, seed=1)
    assert fit_temperature(scores, y) == pytest.approx(0.6, rel=0.06)


def test_calibration_lowers_the_error_and_keeps_every_ranking():
    scores, y = synthetic(temperature=2.5)
    c = calibrate(scores, y)
    assert c.ece_before > 0.1 and c.ece_after < 0.02
    assert np.array_equal(softmax(scores).argmax(1), softmax(scores, c.temperature).argmax(1))
    assert c.metrics()["calibration_temperature"] == c.temperature


def test_the_reported_figures_are_measured_out_of_sample():
    """Each title's calibrated probability comes from a temperature fitted on the other fold:
    the reported ECE is the cross-fitted one, not the in-sample one the shipped T gives."""
    scores, y = synthetic(temperature=2.5, seed=3)
    c = calibrate(scores, y)
    assert c.folds == 2 and c.metrics()["calibration_folds"] == 2
    fold = np.random.default_rng(0).permutation(len(y)) % 2
    crossed = np.empty((len(y), scores.shape[1]))
    for k in (0, 1):
        crossed[fold == k] = softmax(scores[fold == k], fit_temperature(scores[fold != k], y[fold != k]))
    assert c.ece_after == pytest.approx(expected_calibration_error(crossed, y))
    assert c.ece_after != pytest.approx(expected_calibration_error(softmax(scores, c.temperature), y), abs=1e-9)
    assert c.temperature == fit_temperature(scores, y)  # what ships: fitted on every title
    few = calibrate(scores[:30], y[:30])
    assert few.folds == 1  # too few titles to cut: said so (the export prints "in sample")


def test_ece_coverage_and_coverage_at_accuracy_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 1, 1, 1])
    # bins of width 1/15: 0.9 -> right, 0.8 -> wrong, 0.7 -> right, 0.55 -> right
    assert expected_calibration_error(probs, y) == pytest.approx((0.1 + 0.8 + 0.3 + 0.45) / 4)
    rows = {r.threshold: r for r in coverage(probs, y, (0.5, 0.75, 0.9, 0.99))}
    assert rows[0.5].share == 1.0 and rows[0.5].accuracy == 0.75
    assert rows[0.75].share == 0.5 and rows[0.75].accuracy == 0.5
    assert rows[0.9].share == 0.25 and rows[0.9].accuracy == 1.0
    assert rows[0.99].share == 0.0 and np.isnan(rows[0.99].accuracy)
    assert coverage_at_accuracy(probs, y, 0.99) == 0.25  # only the most confident title is sure
    assert coverage_at_accuracy(probs, y, 0.75) == 1.0


def test_training_fits_the_temperature_on_the_validation_scores(trained, demo_splits):
    """The two-member ensemble fixture went through the recipe without a refit: its
    temperature is the one that fits its own scores on the validation titles."""
    from meli.calibration import fit_temperature
    from meli.train.distill import model_scores

    ckpt = trained["ensemble"].checkpoint
    scores = model_scores(ckpt.build_model(), ckpt.tokenizer().encode_batch(demo_splits[1].titles), torch.device("cpu"))
    assert ckpt.temperature == fit_temperature(scores, trained["ensemble"].val_true) != 1.0
    m = ckpt.metrics
    assert m["calibration_temperature"] == ckpt.temperature
    assert m["calibration_ece_after"] < m["calibration_ece_before"]
    assert "| 0.9 |" in coverage_table(m)


def test_the_refit_model_takes_the_selection_fits_temperature(demo_splits):
    """The same recipe with and without the refit (deterministic on the CPU): the refit model
    is another model (trained on train + validation) with the selection fit's temperature."""
    from conftest import small_config
    from meli.train.recipe import train_and_refit

    train, validation = demo_splits
    selection = train_and_refit(small_config("mlp", refit=False, epochs=2), train, validation, quiet=True)
    refit = train_and_refit(small_config("mlp", refit=True, epochs=2), train, validation, quiet=True)
    assert refit.checkpoint.provenance["refit"] == "train+validation"
    assert len(refit.checkpoint.vocabulary) > len(selection.checkpoint.vocabulary)  # it read the validation titles too
    assert refit.checkpoint.temperature == selection.checkpoint.temperature == refit.calibration.temperature != 1.0
    # and its table of accuracy by title length, measured on titles the selection fit never saw
    key = "reliability_by_known_words"
    assert refit.checkpoint.provenance[key] == selection.checkpoint.provenance[key]


@pytest.mark.parametrize("quantize", [False, True])
def test_the_graph_computes_calibrated_probabilities(trained, demo_splits, quantize, tmp_path):
    ckpt = trained["ensemble"].checkpoint
    path = tmp_path / "model.onnx"
    path.write_bytes(to_onnx(ckpt, quantize=quantize).SerializeToString())
    m = load_onnx_model(path, "cpu")
    assert m.card.temperature == ckpt.temperature
    titles = demo_splits[1].titles.slice(0, 300)
    tok = ckpt.tokenizer()
    full, compact = tok.encode_batch(titles), tok.encode_batch(titles, compact=True)
    with torch.no_grad():
        scores = ckpt.build_model()(torch.from_numpy(full.ids)).numpy()
        module, _, _ = scoring_module(ckpt)
        expected_graph = module(torch.from_numpy(compact.ids)).numpy()
    got = m.predict(compact.ids)
    calibrated = softmax(scores, ckpt.temperature)
    if not quantize:
        assert np.abs(got - expected_graph).max() < 1e-5
        assert np.abs(got - calibrated).max() < 1e-3  # the fp16 table's rounding
    assert (got.argmax(1) == softmax(scores).argmax(1)).mean() >= 0.99  # the temperature moves no category
    assert not np.allclose(got.max(1), softmax(scores).max(1), atol=1e-3)  # ...but it moves the probabilities


# ---------------------------------------------------------------- routing in the scorer


def test_min_probability_leaves_the_category_null_and_keeps_the_probability(exported):
    m = load_onnx_model(exported["ensemble"], "cpu")
    batch = pa.record_batch({"title": pa.array(TITLES * 5)})
    plain = Scorer(m).score_batch(batch)
    threshold = float(np.nanmedian(plain.column("probability").to_numpy(zero_copy_only=False)))
    scorer = Scorer(m, ScoreConfig(min_probability=threshold))
    routed = scorer.score_batch(batch)
    p = plain.column("probability").to_pylist()
    assert routed.column("probability").to_pylist() == p
    for cat, prob, before in zip(routed.column("category").to_pylist(), p, plain.column("category").to_pylist()):
        assert cat == (before if prob is not None and prob >= threshold else None)
    assert scorer.stats.below == sum(1 for x in p if x is not None and x < threshold) > 0


def test_route_low_splits_the_rows_between_two_files_in_order(exported, tmp_path):
    rows = [{"id": i, "title": t} for i, t in enumerate(TITLES * 30)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    model = exported["ensemble"]
    result = CliRunner().invoke(score_main, [str(path), str(tmp_path / "all.parquet"), "--model", str(model), "--quiet"])
    everything = pq.read_table(tmp_path / "all.parquet").to_pylist()
    threshold = float(np.nanmedian([r["probability"] for r in everything if r["probability"] is not None]))
    result = CliRunner().invoke(score_main, [str(path), str(tmp_path / "sure.parquet"), "--model", str(model),
                                             "--min-probability", str(threshold), "--route-low",
                                             str(tmp_path / "review.jsonl")])  # not --quiet: the summary is checked
    assert result.exit_code == 0, result.output
    sure = pq.read_table(tmp_path / "sure.parquet").to_pylist()
    review = [json.loads(line) for line in (tmp_path / "review.jsonl").read_text().splitlines()]
    assert all(r["probability"] >= threshold for r in sure)
    assert all(r["probability"] is None or r["probability"] < threshold for r in review)
    assert sorted([r["id"] for r in sure] + [r["id"] for r in review]) == list(range(len(rows)))
    assert [r["id"] for r in sure] == sorted(r["id"] for r in sure) and [r["id"] for r in review] == sorted(r["id"] for r in review)
    by_id = {r["id"]: r for r in everything}
    assert all(r["category"] == by_id[r["id"]]["category"] for r in review)  # the suggestion is kept
    unscored = sum(r["category"] is None for r in everything)
    assert f"{len(review) - unscored:,} below probability {threshold:g} (routed to {tmp_path / 'review.jsonl'}" in result.output


def test_route_low_needs_a_threshold(exported, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "Casco"}])
    result = CliRunner().invoke(score_main, [str(path), str(tmp_path / "o.parquet"), "--model", str(exported["mlp"]),
                                             "--route-low", str(tmp_path / "low.parquet"), "--quiet"])
    assert result.exit_code == 1 and result.output == "Error: --route-low: needs min_probability, the probability under " \
        "which rows are routed\n", result.output
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "low.parquet").exists()


def test_the_usual_nll_fit_is_offered_beside_the_top_label_fit():
    """`loss=nll` fits the temperature the usual way (all probabilities); on under-confident
    scores both sharpen (T < 1), and each minimises its own loss."""
    from meli.calibration import fit_temperature, nll, top_label_log_loss

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 2000)
    scores = rng.normal(0, 1, (2000, 5))
    scores[np.arange(2000), y] += 3.0
    scores /= 4.0  # under-confident
    for loss in (nll, top_label_log_loss):
        t = fit_temperature(scores, y, loss=loss)
        assert t < 1.0
        assert loss(scores, y, t) <= min(loss(scores, y, t * 0.9), loss(scores, y, t * 1.1))
