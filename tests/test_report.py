"""meli-score --report: the nightly report, its drift verdict and its exit code."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import html5lib
import pytest
from click.testing import CliRunner

from meli.onnx_model import load_onnx_model
from meli.score.cli import main as score_main
from meli.score.report import EXIT_DRIFT, js_divergence, psi, training_mix
from meli.tally import Tally

# figures that say where and when, not what the catalog held
CIRCUMSTANCES = ("created_at", "input", "output", "engine")


def run(*args):
    return CliRunner().invoke(score_main, [str(a) for a in args])  # not --quiet: the summary line is checked


def catalog(path, titles) -> str:
    pq.write_table(pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": pa.array(titles, pa.string())}), path)
    return str(path)


def resampled_training_titles(demo_splits, n: int, seed: int = 0, keep=None) -> list:
    """`n` titles drawn with replacement from the demo's training split (the training mix
    itself), or only from the categories `keep` allows."""
    train, _ = demo_splits
    titles, cats = train.titles.to_pylist(), train.categories.to_pylist()
    pool = [i for i, c in enumerate(cats) if keep is None or keep(c)]
    return [titles[i] for i in np.random.default_rng(seed).choice(pool, n)]


def score_with_report(tmp_path, inp, model, *extra) -> tuple[dict, str, object]:
    report = tmp_path / "tonight.html"
    result = run(inp, tmp_path / "out.parquet", "--model", model, "--report", report, *extra)
    data = json.loads((tmp_path / "tonight.json").read_text(encoding="utf-8"))
    return data, report.read_text(encoding="utf-8"), result


def test_the_training_mix_itself_shows_no_drift(demo_splits, exported, tmp_path):
    inp = catalog(tmp_path / "in.parquet", resampled_training_titles(demo_splits, 3000))
    data, _, result = score_with_report(tmp_path, inp, exported["ensemble"])
    assert result.exit_code == 0, result.output
    assert data["drift"] is False, data["drift_reasons"]
    assert data["rows"] == data["scored"] == 3000 and data["unscored"] == 0
    assert 0 <= data["category_psi"] < 0.1 and 0 <= data["category_js"] < 0.05
    assert sum(data["categories"]["counts"].values()) == 3000
    assert "no drift" in result.output


def test_a_catalog_of_twenty_categories_drifts_by_its_category_mix(demo_splits, exported, tmp_path):
    train, _ = demo_splits
    twenty = set(sorted(set(train.categories.to_pylist()))[:20])
    inp = catalog(tmp_path / "in.parquet", resampled_training_titles(demo_splits, 3000, keep=twenty.__contains__))
    data, _, result = score_with_report(tmp_path, inp, exported["ensemble"])
    assert result.exit_code == 0  # drift alone is not a failure without --fail-on-drift
    assert data["drift"] is True
    assert data["category_psi"] > 0.25
    assert [r for r in data["drift_reasons"] if r.startswith("the category mix moved")]
    assert not [r for r in data["drift_reasons"] if "got no category" in r]
    shrank = {m["category"] for m in data["categories"]["shrank"]}
    assert shrank and not shrank & twenty  # the ten missing categories are the ones that shrank
    assert "drift: the category mix moved" in result.output


def test_a_catalog_with_half_its_titles_empty_drifts_by_its_unscored_rows(demo_splits, exported, tmp_path):
    titles = resampled_training_titles(demo_splits, 2000)
    titles = [t if i % 2 else (None if i % 4 else "  ") for i, t in enumerate(titles)]
    data, _, _ = score_with_report(tmp_path, catalog(tmp_path / "in.parquet", titles), exported["ensemble"])
    assert data["drift"] is True
    assert data["empty_titles"] == 1000 and data["unscored_share"] == pytest.approx(0.5)
    assert [r for r in data["drift_reasons"] if "50.0% of rows got no category" in r]
    assert not [r for r in data["drift_reasons"] if r.startswith("the category mix moved")]  # the rest is the usual mix


def test_fail_on_drift_exits_with_its_own_code_and_keeps_the_output(demo_splits, exported, tmp_path):
    titles = [None] * 900 + resampled_training_titles(demo_splits, 100)
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(score_main, [catalog(tmp_path / "in.parquet", titles), str(out), "--model",
                                             str(exported["ensemble"]), "--report", str(tmp_path / "r.html"),
                                             "--fail-on-drift", "--quiet"])
    assert result.exit_code == EXIT_DRIFT == 3
    assert pq.read_table(out).num_rows == 1000  # the output is written all the same
    drift_lines = [line for line in result.output.splitlines() if line.startswith("Drift: ")]
    assert len(drift_lines) == 1 and "got no category" in drift_lines[0]
    # the same catalog without drift rules broken exits 0 with the flag
    calm = catalog(tmp_path / "calm.parquet", resampled_training_titles(demo_splits, 1000))
    assert run(calm, tmp_path / "calm-out.parquet", "--model", exported["ensemble"], "--report", tmp_path / "c.html",
               "--fail-on-drift").exit_code == 0


def test_drift_threshold_sets_the_psi_line(demo_splits, exported, tmp_path):
    inp = catalog(tmp_path / "in.parquet", resampled_training_titles(demo_splits, 3000))
    data, _, _ = score_with_report(tmp_path, inp, exported["ensemble"], "--drift-threshold", "0.000001")
    assert data["drift"] is True and data["drift_rules"]["category_psi"] == 1e-6
    assert run(inp, tmp_path / "o.parquet", "--model", exported["ensemble"], "--fail-on-drift").exit_code == 2  # needs --report


def test_the_html_is_self_contained_and_draws_its_pictures(demo_splits, exported, tmp_path):
    inp = catalog(tmp_path / "in.parquet", resampled_training_titles(demo_splits, 500))
    data, page, _ = score_with_report(tmp_path, inp, exported["ensemble"])
    # nothing fetched from elsewhere: no script, stylesheet, image, font or link to another address
    assert not re.search(r"<script|<link|<img|<iframe|<object|@import|url\(|\b(src|href)\s*=|https?://", page, re.I)
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) == 3  # category movers, confidence, title lengths
    for svg in svgs:  # each picture is well-formed SVG with bars of positive size
        root = ET.fromstring(svg)
        widths = [float(r.get("width")) for r in root.iter("rect")] + [float(r.get("height")) for r in root.iter("rect")]
        assert max(widths) > 10
    assert data["model"]["sha256"] in page and "No drift" in page
    html5lib.HTMLParser(strict=True).parse(page)  # valid HTML5: a browser draws it without guessing


def test_the_report_does_not_depend_on_the_batch_size(demo_splits, exported, tmp_path):
    """With the default kind of model file (int8 products with a scale per title) every
    figure is the same to the last bit: the counts add up, and so do the probabilities."""
    titles = resampled_training_titles(demo_splits, 1500) + [None, "", "qqqq zzzz"]
    inp = catalog(tmp_path / "in.parquet", titles)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, _, _ = score_with_report(tmp_path / "a", inp, exported["mlp"])
    b, _, _ = score_with_report(tmp_path / "b", inp, exported["mlp"], "--batch-size", "97")
    assert {k: v for k, v in a.items() if k not in CIRCUMSTANCES} == {k: v for k, v in b.items() if k not in CIRCUMSTANCES}


def test_the_figures_count_what_the_output_holds(demo_splits, exported, tmp_path):
    titles = resampled_training_titles(demo_splits, 800) + [None, "", "   "]
    inp = catalog(tmp_path / "in.parquet", titles)
    data, _, _ = score_with_report(tmp_path, inp, exported["mlp"], "--min-probability", "0.9")
    out = pq.read_table(tmp_path / "out.parquet")
    probability = out.column("probability").to_numpy(zero_copy_only=False)
    scored = ~np.isnan(probability.astype(float))
    assert data["rows"] == out.num_rows and data["scored"] == int(scored.sum()) and data["empty_titles"] == 3
    assert data["confidence"]["mean_probability"] == pytest.approx(probability[scored].mean(), abs=1e-6)
    assert data["confidence"]["below_min_probability"] == pytest.approx((probability[scored] < 0.9).sum() / out.num_rows)
    row = next(r for r in data["confidence"]["thresholds"] if r["threshold"] == 0.9)
    assert row["share"] == pytest.approx((probability[scored] >= 0.9).mean())
    assert sum(data["confidence"]["histogram"]["counts"]) == data["scored"]
    assert sum(data["title_length"]["counts"]) == data["rows"]


def test_psi_and_js_are_zero_for_the_same_mix_and_grow_with_the_shift():
    q = np.array([0.5, 0.3, 0.2])
    assert psi(q, q) == 0 and js_divergence(q, q) == 0
    small, large = np.array([0.45, 0.33, 0.22]), np.array([0.1, 0.1, 0.8])
    assert 0 < psi(small, q) < psi(large, q) and 0 < js_divergence(small, q) < js_divergence(large, q) <= 1
    assert js_divergence(np.array([1.0, 0, 0]), np.array([0, 0, 1.0])) == pytest.approx(1.0)


def test_tallies_of_parts_merge_into_the_tally_of_the_whole(exported):
    from meli.scorer import ScoreConfig, Scorer

    model = load_onnx_model(exported["mlp"], provider="cpu")
    titles = pa.array(["Bolso Maternal Con Cambiador", None, "", "Casco Moto", "xx yy", "Zapatillas Nike"] * 50)
    whole = Scorer(model, ScoreConfig(), tally=Tally(len(model.card.labels)))
    whole.score_batch(pa.record_batch({"title": titles}))
    parts = []
    for start in (0, 100, 217):
        s = Scorer(model, ScoreConfig(), tally=Tally(len(model.card.labels)))
        s.score_batch(pa.record_batch({"title": titles.slice(start, {0: 100, 100: 117, 217: 200}[start])}))
        parts.append(s.tally)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.to_dict() == whole.tally.to_dict()
    assert Tally.from_dict(json.loads(json.dumps(merged.to_dict()))).to_dict() == merged.to_dict()


def test_a_model_file_without_a_training_mix_reports_without_category_drift(demo_splits, trained, tmp_path):
    import dataclasses

    from meli.dataset import TRAIN_MIX
    from meli.export.onnx_export import to_onnx

    ckpt = trained["mlp"].checkpoint
    old = dataclasses.replace(ckpt, provenance={k: v for k, v in ckpt.provenance.items() if k != TRAIN_MIX})
    path = tmp_path / "old.onnx"
    path.write_bytes(to_onnx(old).SerializeToString())
    assert training_mix(load_onnx_model(path, provider="cpu")) is None
    inp = catalog(tmp_path / "in.parquet", resampled_training_titles(demo_splits, 300))
    data, page, result = score_with_report(tmp_path, inp, path)
    assert result.exit_code == 0
    assert data["category_psi"] is None and data["category_js"] is None
    assert "no training mix" in page and "no training mix" in result.output


def test_report_names_say_which_two_files(tmp_path):
    from meli.score.report import report_paths

    assert report_paths(tmp_path / "r.html") == (tmp_path / "r.html", tmp_path / "r.json")
    assert report_paths(tmp_path / "r.json") == (tmp_path / "r.html", tmp_path / "r.json")
    assert report_paths(tmp_path / "tonight") == (tmp_path / "tonight.html", tmp_path / "tonight.json")


def test_a_tiny_catalog_says_its_psi_is_mostly_chance(exported, tmp_path):
    inp = catalog(tmp_path / "in.parquet", ["Taladro Percutor Bosch 650w"])
    data, _, _ = score_with_report(tmp_path, inp, exported["ensemble"])
    assert data["category_psi_by_chance"] == pytest.approx(29.0)  # 30 categories, one title
    moved = [r for r in data["drift_reasons"] if r.startswith("the category mix moved")]
    assert moved and "with 1 scored titles about 29.00 is expected by chance alone" in moved[0]


def test_the_report_refuses_to_overwrite_an_output(demo_splits, exported, tmp_path):
    inp = catalog(tmp_path / "in.parquet", resampled_training_titles(demo_splits, 10))
    result = run(inp, tmp_path / "out.json", "--model", exported["mlp"], "--report", tmp_path / "out.html")
    assert result.exit_code == 1 and result.output == (f"Error: --report: {tmp_path / 'out.json'} is also an output of "
                                                       "this run; name the report otherwise\n")
    assert not (tmp_path / "out.json").exists()
    dash = run(inp, tmp_path / "o.parquet", "--model", exported["mlp"], "--report", "-")
    assert dash.exit_code == 1 and dash.output.startswith("Error: --report: names the report's file")
    missing = run(inp, tmp_path / "o.parquet", "--model", exported["mlp"], "--report", tmp_path / "no" / "r.html")
    assert missing.exit_code == 1 and "folder" in missing.output and not (tmp_path / "o.parquet").exists()


def test_track_logs_the_run_to_mlflow(demo_splits, exported, tmp_path):
    import mlflow

    inp = catalog(tmp_path / "in.parquet", resampled_training_titles(demo_splits, 400))
    result = run(inp, tmp_path / "out.parquet", "--model", exported["ensemble"], "--report", tmp_path / "r.html", "--track")
    assert result.exit_code == 0, result.output
    run_id = re.search(r"tracked as MLflow run (\w+)", result.output).group(1)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    got = mlflow.get_run(run_id)
    data = json.loads((tmp_path / "r.json").read_text())
    assert mlflow.get_experiment(got.info.experiment_id).name == "meli-scoring"
    assert got.data.metrics["rows"] == 400 and got.data.metrics["category_psi"] == pytest.approx(data["category_psi"])
    assert got.data.tags["meli.model_sha256"] == data["model"]["sha256"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "report")}
    assert artifacts == {"report/r.html", "report/r.json"}


@pytest.mark.spark
def test_spark_reports_the_same_figures_as_the_local_engine(demo_splits, exported, tmp_path):
    pytest.importorskip("pyspark", reason="pip install 'meli-categorizer[spark]'")
    lake = tmp_path / "lake"
    lake.mkdir()
    titles = resampled_training_titles(demo_splits, 2400) + [None, "", "qqqq zzzz"]
    for part in range(4):  # four parts, so four partitions' tallies merge on the driver
        catalog(lake / f"part-{part}.parquet", titles[part::4])
    (tmp_path / "local").mkdir(), (tmp_path / "spark").mkdir()
    local, _, _ = score_with_report(tmp_path / "local", lake, exported["mlp"])
    report = tmp_path / "spark" / "tonight.html"
    result = run(lake, tmp_path / "spark" / "out", "--model", exported["mlp"], "--report", report,
                 "--engine", "spark", "--spark-master", "local[2]", "--batch-size", "300")
    assert result.exit_code == 0, (result.output, result.exception)
    spark = json.loads(report.with_suffix(".json").read_text())
    assert spark["engine"] == "spark" and spark["rows"] == len(titles)
    assert {k: v for k, v in spark.items() if k not in CIRCUMSTANCES} == {k: v for k, v in local.items() if k not in CIRCUMSTANCES}
    assert "no drift" in result.output


def _estimate_against_truth(tmp_path, titles, categories, model):
    """(the report's accuracy section, the real accuracy, the real balanced accuracy) of
    scoring `titles`, whose true `categories` the report never sees."""
    from meli.metrics import balanced_accuracy

    tmp_path.mkdir()
    inp = catalog(tmp_path / "in.parquet", titles)
    data, page, result = score_with_report(tmp_path, inp, model)
    assert result.exit_code == 0, result.output
    predicted = pq.read_table(tmp_path / "out.parquet").column("category").to_pylist()
    labels = {c: i for i, c in enumerate(sorted(set(categories)))}
    truth = np.array([labels[c] for c in categories])
    pred = np.array([labels.get(p, -1) for p in predicted])
    return data["accuracy"], float((truth == pred).mean()), balanced_accuracy(truth, pred), page


@pytest.fixture(scope="module")
def calibrated_on_half(trained, demo_splits, tmp_path_factory):
    """The demo MLP with a temperature fitted on the first half of the validation titles (as
    the recipe fits it on validation), exported; the second half is left to judge it on."""
    import dataclasses


    from meli.dataset import LabelledSplit
    from meli.export.onnx_export import to_onnx
    from meli.train.recipe import calibrated
    from meli.train.trainer import label_indices

    _, validation = demo_splits
    half = len(validation) // 2
    first = LabelledSplit(validation.titles.slice(0, half), validation.categories.slice(0, half), "first half")
    fit = trained["mlp"]
    ckpt = calibrated(dataclasses.replace(fit, val_true=label_indices(first.categories, fit.checkpoint.labels)),
                      first).checkpoint
    path = tmp_path_factory.mktemp("calibrated") / "model.onnx"
    path.write_bytes(to_onnx(ckpt, quantize=True).SerializeToString())
    return path, (validation.titles.slice(half), validation.categories.slice(half))


def test_the_estimated_accuracy_tracks_the_real_one_without_labels(calibrated_on_half, tmp_path):
    """On titles no fit chose anything on, the estimate is near the real accuracy and its
    interval holds it. Cut to their first words, the titles get harder (cut to one, wrong far
    more often): the estimate (corrected by the model's table of accuracy by title length)
    falls with the real accuracy and stays near it. Without their first two words (where titles name the product) the
    estimate falls too, and the report says not to trust it: the titles are shaped unlike the
    validation titles."""
    model, (judged_titles, judged_categories) = calibrated_on_half
    titles, categories = judged_titles.to_pylist(), judged_categories.to_pylist()
    full, real, real_balanced, page = _estimate_against_truth(tmp_path / "full", titles, categories, model)
    # near: within three standard errors of the real accuracy of these few hundred titles
    near = 3 * (real * (1 - real) / len(titles)) ** 0.5  # 0.042 at 300 titles and 0.94
    assert abs(full["estimated_accuracy"] - real) < near, (full, real, near)
    assert full["interval"][0] <= real <= full["interval"][1]
    assert abs(full["estimated_balanced_accuracy"] - real_balanced) < 0.04, (full, real_balanced)
    assert full["trusted"] and full["validation_accuracy"] is not None
    assert "estimated accuracy (no labels)" in page
    assert full["length_correction_weight"] is not None and full["title_shape_psi"] < 0.25  # shaped like validation
    for words in (1, 2):  # cut to their first words: more often wrong, and the estimate says so
        cut = [" ".join(t.split()[:words]) for t in titles]
        est, real_cut, _, _ = _estimate_against_truth(tmp_path / f"first{words}", cut, categories, model)
        assert real_cut < real and est["estimated_accuracy"] < full["estimated_accuracy"]  # harder, and it says so
        if words == 1:  # wrong far more often (the demo fit in float32: 10.0% of these titles against 7.3%)
            assert 1 - real_cut > 1.25 * (1 - real), (real_cut, real)
        assert abs(est["estimated_accuracy"] - real_cut) < 0.05, (words, est, real_cut)
        assert not est["trusted"] and any("shorter than the validation titles" in c for c in est["caveats"]), est
    headless = [" ".join(t.split()[2:]) for t in titles]
    hard, real_hard, _, _ = _estimate_against_truth(tmp_path / "headless", headless, categories, model)
    assert hard["estimated_accuracy"] < full["estimated_accuracy"] - 0.02 and real_hard < real
    assert not hard["trusted"] and any("the validation titles (PSI" in c for c in hard["caveats"]), hard


def test_titles_far_from_training_are_flagged_as_untrusted(calibrated_on_half, exported, tmp_path):
    """Words the model never saw: the estimate is given, and said not to be trusted; so is the
    estimate of a model whose probabilities were never calibrated."""
    titles = [f"zqxv{i} wprk{i} plomb{i}" for i in range(300)]
    inp = catalog(tmp_path / "in.parquet", titles)
    data, page, result = score_with_report(tmp_path, inp, calibrated_on_half[0])
    assert result.exit_code == 0
    assert data["accuracy"]["trusted"] is False and "unknown to the model" in data["accuracy"]["caveats"][0]
    assert "not to be trusted tonight" in page
    uncalibrated, _, _ = score_with_report(tmp_path, inp, exported["mlp"])
    assert any("not calibrated" in c for c in uncalibrated["accuracy"]["caveats"])


def test_a_low_estimated_accuracy_fails_the_run_when_asked(calibrated_on_half, tmp_path):
    model, (titles, _) = calibrated_on_half
    inp = catalog(tmp_path / "in.parquet", titles.to_pylist())
    args = [inp, tmp_path / "out.parquet", "--model", model, "--report", tmp_path / "r.html",
            "--min-estimated-accuracy", "0.999", "--fail-on-drift", "--quiet"]
    result = CliRunner().invoke(score_main, [str(a) for a in args])
    assert result.exit_code == EXIT_DRIFT
    assert re.fullmatch(r"Drift: estimated accuracy \d+\.\d% \(95% interval \d+\.\d%-\d+\.\d%\) < 99\.9%\n", result.output)
    ok = CliRunner().invoke(score_main, [str(a) for a in args[:-3]] + ["0.5", "--fail-on-drift", "--quiet"])
    assert ok.exit_code == 0 and ok.output == ""
    usage = CliRunner().invoke(score_main, [str(inp), str(tmp_path / "o.parquet"), "--model", str(model),
                                            "--min-estimated-accuracy", "0.9"])
    assert usage.exit_code == 2 and "--min-estimated-accuracy needs --report" in usage.output


def _two_nights(demo_splits, tmp_path):
    """Last night's catalog (ids 0-1999) and tonight's: ids 0-99 gone, 2000-2149 new, and the
    titles of ids 100-399 replaced by other titles (edited listings)."""
    titles = resampled_training_titles(demo_splits, 2150, seed=3)
    other = resampled_training_titles(demo_splits, 300, seed=4)
    last = {i: titles[i] for i in range(2000)}
    tonight = {i: (other[i - 100] if 100 <= i < 400 else titles[i]) for i in range(100, 2150)}
    paths = []
    for name, rows in (("last", last), ("tonight", tonight)):
        path = tmp_path / f"{name}.parquet"
        ids = list(rows)
        np.random.default_rng(0).shuffle(ids)  # another row order each night
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "title": [rows[i] for i in ids]}), path)
        paths.append(path)
    return paths


def _truth(last_out, tonight_out) -> tuple[int, int, int, int]:
    a = dict(zip(*[pq.read_table(last_out).column(c).to_pylist() for c in ("id", "category")]))
    b = dict(zip(*[pq.read_table(tonight_out).column(c).to_pylist() for c in ("id", "category")]))
    both = a.keys() & b.keys()
    return len(both), sum(a[i] != b[i] for i in both), len(b.keys() - a.keys()), len(a.keys() - b.keys())


@pytest.mark.parametrize("parts_bytes", [64 << 20, 2_000])
def test_what_changed_since_last_night_is_counted_exactly(parts_bytes, demo_splits, exported, tmp_path, monkeypatch):
    """--previous: ids of both nights whose category differs, new and gone ids, exactly as a
    join of the two outputs gives them, however many partitions the comparison uses."""
    import meli.score.changes as changes

    monkeypatch.setattr(changes, "PARTITION_BYTES", parts_bytes)
    last_in, tonight_in = _two_nights(demo_splits, tmp_path)
    model = exported["mlp"]
    assert run(last_in, tmp_path / "last-out.parquet", "--model", model).exit_code == 0
    data, page, result = score_with_report(tmp_path, tonight_in, model, "--previous", tmp_path / "last-out.parquet")
    assert result.exit_code == 0, result.output
    both, changed, new, gone = _truth(tmp_path / "last-out.parquet", tmp_path / "out.parquet")
    c = data["changes"]
    assert (c["ids_both_nights"], c["changed"], c["new_ids"], c["gone_ids"]) == (both, changed, new, gone) == (
        1900, changed, 150, 100)
    assert 0 < changed <= 300 and c["changed_share"] == changed / both
    assert c["model_changed"] is False and sum(m["count"] for m in c["gained"]) <= changed
    assert "since last night" in page


def test_tonight_may_write_over_last_nights_output_and_a_new_model_is_named(demo_splits, exported, tmp_path):
    last_in, tonight_in = _two_nights(demo_splits, tmp_path)
    out = tmp_path / "out.parquet"
    assert run(last_in, out, "--model", exported["mlp"]).exit_code == 0
    before = pq.read_table(out)
    data, _, result = score_with_report(tmp_path, tonight_in, exported["ensemble"], "--previous", out)
    assert result.exit_code == 0, result.output
    assert data["changes"]["model_changed"] is True and data["changes"]["ids_both_nights"] == 1900
    assert pq.read_table(out).num_rows == 2050 and before.num_rows == 2000


def test_json_lines_outputs_compare_too_and_a_big_change_fails_when_asked(demo_splits, exported, tmp_path):
    last_in, tonight_in = _two_nights(demo_splits, tmp_path)
    last_out = tmp_path / "last.jsonl"
    assert run(last_in, last_out, "--model", exported["mlp"]).exit_code == 0
    result = CliRunner().invoke(score_main, [str(tonight_in), str(tmp_path / "out.jsonl"), "--model", str(exported["mlp"]),
                                             "--report", str(tmp_path / "r.html"), "--previous", str(last_out),
                                             "--max-changed-share", "0.0001", "--fail-on-drift", "--quiet"])
    assert result.exit_code == EXIT_DRIFT
    assert re.fullmatch(r"Drift: \d+\.\d% of the ids of both nights changed category since .*last\.jsonl > 0\.0% "
                        r"\(\d+ of 1,900; the model file unknown for last night\)\n", result.output), result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["changes"]["model_changed"] is None and data["changes"]["new_ids"] == 150


@pytest.mark.parametrize("make, message", [
    (lambda p: pq.write_table(pa.table({"sku": [1, 2], "category": ["A", "B"]}), p),
     "no 'id' column to compare by; it has: sku, category (--id-column names the id; both nights must be meli-score outputs)"),
    (lambda p: pq.write_table(pa.table({"id": [1, 1], "category": ["A", "B"]}), p),
     "id '1' appears 2 times in column 'id'; --previous compares nights by unique ids"),
    (lambda p: None, "no such file or folder (--previous names last night's output)"),
])
def test_a_previous_output_of_another_shape_is_one_error(make, message, demo_splits, exported, tmp_path):
    last_in, tonight_in = _two_nights(demo_splits, tmp_path)
    previous = tmp_path / "previous.parquet"
    make(previous)
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(score_main, [str(tonight_in), str(out), "--model", str(exported["mlp"]), "--report",
                                             str(tmp_path / "r.html"), "--previous", str(previous), "--quiet"])
    assert result.exit_code == 1 and result.output == f"Error: {previous}: {message}\n", result.output
    assert not out.exists() and not (tmp_path / "r.html").exists()  # refused before the run: nothing written
