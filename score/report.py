"""The nightly report: what tonight's catalog looked like, and whether it drifted.

`build_report` turns a run's `Tally` (counts that add up, `meli.tally`) and the model's
card into plain figures: rows, unscored rows, the share of unknown words, the title-length
distribution; the population stability index (PSI) and Jensen–Shannon divergence of tonight's
predicted categories against the training data's category mix (stored in the model file);
the confidence tonight beside what the validation titles had; and a drift verdict with its
reasons. `write_report` writes it as ``R.json`` and a self-contained ``R.html`` (inline SVG,
no external reference).

Drift is declared when any rule of `DriftRules` is broken: the category mix moved (PSI above
``category_psi``, 0.25 by default: the usual "major shift" line), too many rows could not be
scored (``unscored_share``), or the share of confident rows fell below the validation titles'
share by more than ``confidence_drop``.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from meli.calibration import THRESHOLDS, coverage_shares
from meli.dataset import TRAIN_MIX
from meli.formats import atomic_write_bytes, shown
from meli.onnx_model import OnnxModel
from meli.reliability import Reliability
from meli.tally import CONFIDENCE_BINS, LENGTH_EDGES, Q24, Tally

EXIT_DRIFT = 3  # meli-score --fail-on-drift: the run drifted (the output is written)
PSI_FLOOR = 1e-4  # a share of 0 counts as this much in the PSI (its logarithm must exist)
CONFIDENT = 0.9  # the coverage threshold whose share the confidence rule watches
MOVERS = 10  # categories listed as grown and as shrunk


@dataclass(frozen=True)
class DriftRules:
    category_psi: float = 0.25  # PSI of the predicted categories against the training mix
    unscored_share: float = 0.10  # rows without a category (null/empty titles, no known token)
    confidence_drop: float = 0.10  # fall of the share of rows at probability >= CONFIDENT, against validation
    min_estimated_accuracy: float | None = None  # drift when the estimated accuracy falls below it (off by default)
    max_changed_share: float | None = None  # drift when more ids than this changed category since last night (off)


@dataclass(frozen=True)
class ModelIdentity:
    file: str
    sha256: str
    mlflow_run_id: str | None
    registered: str | None  # "name/version" when scored from the registry
    data_fingerprint: str | None

    @classmethod
    def of(cls, model: OnnxModel, registered: str | None = None) -> "ModelIdentity":
        prov = model.card.provenance
        return cls(model.source, model.sha256 or "", prov.get("mlflow_run_id"), registered, prov.get("data_fingerprint"))


def registered_version(model: str) -> str | None:
    """``name/version`` (or ``name@alias``) when the model was named by a registry URI."""
    return str(model).removeprefix("models:/") if str(model).startswith("models:/") else None


def psi(tonight: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of two distributions (shares), zeros floored at `PSI_FLOOR`."""
    p, q = np.maximum(tonight, PSI_FLOOR), np.maximum(reference, PSI_FLOOR)
    return float(np.sum((p - q) * np.log(p / q)))


def js_divergence(tonight: np.ndarray, reference: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits (0: the same, 1: nothing in common)."""
    m = (tonight + reference) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(tonight) + 0.5 * kl(reference))


def _shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else np.zeros(len(counts))


def training_mix(model: OnnxModel) -> np.ndarray | None:
    """The training split's share of each of the model's labels, from the card (None if absent)."""
    raw = model.card.provenance.get(TRAIN_MIX)
    if not raw:
        return None
    counts = json.loads(raw) if isinstance(raw, str) else raw
    return _shares(np.array([counts.get(label, 0) for label in model.card.labels], np.float64))


def validation_coverage(model: OnnxModel) -> dict[float, float]:
    """The share of validation titles at or above each coverage threshold (what meli-export printed)."""
    return coverage_shares(model.card.provenance.get("metrics") or {})


MIN_EXPECTED_TITLES = 5.0  # a category enters the estimated balanced accuracy with at least this many expected titles
UNTRUSTED_UNKNOWN_WORDS = 0.25  # an unknown-word share above this: titles far from training, estimate untrusted
UNTRUSTED_SHAPE_PSI = 0.25  # titles shaped unlike the validation titles (known words, known first word): untrusted
SAME_SHAPE_PSI = 0.05  # up to this, tonight's titles are shaped like the validation titles: no length correction


def estimate_accuracy(tally: Tally, model: OnnxModel, category_psi: float | None, rules: DriftRules) -> dict:
    """The accuracy of tonight's scored rows, estimated without labels from the calibrated
    probabilities (confidence-based performance estimation, as NannyML's CBPE does it).

    A calibrated model's top probability p is the chance its category is right on titles
    like the validation ones; on shorter titles it is too high, so each row's chance q is p
    corrected by the model's table of accuracy by known words and probability
    (`meli.reliability`; q = p for a model without one). The expected accuracy is the mean of
    q; the count of right answers varies around it with variance sum q (1 - q) (independent
    rows), and the calibration itself is only good to its expected calibration error on the
    validation titles, added to the 95% interval. The balanced accuracy is estimated the same
    way, category by category: expected recall = (sum of q over rows predicted as it) / (the
    rows' summed chance of being it), for categories with at least MIN_EXPECTED_TITLES
    expected titles. Both assume that tonight's titles relate to their categories as the
    training titles did; `trusted` says when that is in doubt (many unknown words, a moved
    category mix)."""
    metrics = model.card.provenance.get("metrics") or {}
    ece = float(metrics.get("calibration_ece_after") or 0.0)
    out = {"estimated_accuracy": None, "interval": None, "estimated_balanced_accuracy": None,
           "categories_in_balanced": 0, "calibration_error": ece,
           "validation_accuracy": metrics.get("val_accuracy"),
           "validation_balanced_accuracy": metrics.get("val_balanced_accuracy"), "trusted": True, "caveats": []}
    n = tally.scored
    if not n:
        return out
    reliability = Reliability.of(model.card.provenance)
    shape_psi = (psi(_shares(tally.shapes.astype(np.float64)), _shares(reliability.validation_shapes.ravel().astype(np.float64)))
                 if reliability is not None and reliability.validation_shapes.sum() else None)
    # the length correction weighs in as tonight's titles move away from the validation titles' shape
    w = 0.0 if shape_psi is None else min(1.0, max(0.0, (shape_psi - SAME_SHAPE_PSI) / (UNTRUSTED_SHAPE_PSI - SAME_SHAPE_PSI)))
    accuracy = ((1 - w) * tally.probability_q24 + w * tally.right_chance_q24) / Q24 / n
    half = 1.96 * math.sqrt(((1 - w) * tally.probability_uncertainty_q24 + w * tally.uncertainty_q24) / Q24) / n + ece
    support = ((1 - w) * tally.probability_support_q24 + w * tally.expected_support_q24) / Q24
    correct = ((1 - w) * tally.category_probability_q24 + w * tally.category_right_q24) / Q24
    enough = support >= MIN_EXPECTED_TITLES
    out.update(estimated_accuracy=accuracy, interval=[max(0.0, accuracy - half), min(1.0, accuracy + half)],
               estimated_balanced_accuracy=float(np.mean(np.minimum(1.0, correct[enough] / support[enough])))
               if enough.any() and support.sum() > 0 else None,
               categories_in_balanced=int(enough.sum()))
    out["length_correction_weight"] = w if reliability is not None else None
    out["title_shape_psi"] = shape_psi
    if "calibration_ece_after" not in metrics:
        out["caveats"].append("the model's probabilities were not calibrated at export (no temperature fitted on "
                              "validation): the estimate assumes they are")
    unknown = tally.unknown_words / tally.words if tally.words else 0.0
    if unknown > UNTRUSTED_UNKNOWN_WORDS:
        out["caveats"].append(f"{unknown:.0%} of words are unknown to the model (titles far from training)")
    if shape_psi is not None and shape_psi > UNTRUSTED_SHAPE_PSI:
        short = _mean_word_bin(tally.shapes) < _mean_word_bin(reliability.validation_shapes)
        out["caveats"].append(f"tonight's titles are {'shorter than' if short else 'shaped unlike'} the validation titles "
                              f"(PSI {shape_psi:.2f} of their known words and first word): the estimate corrects for "
                              "length, but is measured on few titles like these")
    if category_psi is not None and category_psi > rules.category_psi:
        out["caveats"].append(f"the category mix moved (PSI {category_psi:.3f}): titles may relate to categories "
                              "otherwise than in training")
    out["trusted"] = not out["caveats"]
    return out


def _mean_word_bin(shapes: np.ndarray) -> float:
    """The mean known-word bin of titles counted by [first word known, known-word bin]."""
    by_bin = np.asarray(shapes).reshape(2, -1).sum(0)
    return float((by_bin * np.arange(len(by_bin))).sum() / max(1, by_bin.sum()))


def build_report(tally: Tally, model: OnnxModel, input_path: str, output_path: str, *,
                 rules: DriftRules = DriftRules(), min_probability: float = 0.0, registered: str | None = None,
                 engine: str = "local", changes: dict | None = None) -> dict:
    """The report's figures as plain JSON values."""
    labels = model.card.labels
    unscored = tally.rows - tally.scored
    tonight = _shares(tally.categories.astype(np.float64))
    reference = training_mix(model)
    categories: dict = {"counts": {labels[i]: int(c) for i, c in enumerate(tally.categories) if c}}
    category_psi = category_js = by_chance = None
    if reference is not None and tally.scored:
        category_psi, category_js = psi(tonight, reference), js_divergence(tonight, reference)
        # the PSI a catalog of this size drawn from the training mix shows by chance: about (K - 1) / N
        by_chance = (int(np.count_nonzero(reference)) - 1) / tally.scored
        change = tonight - reference
        order = np.argsort(change, kind="stable")

        def mover(i: int) -> dict:
            return {"category": labels[i], "share": float(tonight[i]), "training_share": float(reference[i]),
                    "change": float(change[i])}

        categories["grew"] = [mover(i) for i in order[::-1][:MOVERS] if change[i] > 0]
        categories["shrank"] = [mover(i) for i in order[:MOVERS] if change[i] < 0]
    validation = validation_coverage(model)
    confidence = {
        "mean_probability": tally.mean_probability,
        "thresholds": [{"threshold": t, "share": (int(n) / tally.scored if tally.scored else None),
                        "validation_share": validation.get(t)} for t, n in zip(THRESHOLDS, tally.at_threshold)],
        "histogram": {"edges": [i / CONFIDENCE_BINS for i in range(CONFIDENCE_BINS + 1)],
                      "counts": tally.confidence.tolist()},
        "min_probability": min_probability or None,
        "below_min_probability": (tally.below / tally.rows if min_probability and tally.rows else None),
    }
    report = {
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input": shown(input_path),
        "output": shown(output_path),
        "engine": engine,
        "model": asdict(ModelIdentity.of(model, registered)),
        "rows": tally.rows,
        "scored": tally.scored,
        "unscored": unscored,
        "unscored_share": unscored / tally.rows if tally.rows else 0.0,
        "empty_titles": tally.empty,
        "no_known_token": tally.no_known_token,
        "words": tally.words,
        "unknown_word_share": tally.unknown_words / tally.words if tally.words else None,
        "title_length": {"edges": list(LENGTH_EDGES), "counts": tally.lengths.tolist(), "unit": "characters"},
        "category_psi": category_psi,
        "category_js": category_js,
        "category_psi_by_chance": by_chance,
        "categories": categories,
        "confidence": confidence,
        "accuracy": estimate_accuracy(tally, model, category_psi, rules),
        "changes": changes,
        "drift_rules": asdict(rules),
    }
    reasons = drift_reasons(report, rules)
    report["drift"] = bool(reasons)
    report["drift_reasons"] = reasons
    return report


def drift_reasons(report: dict, rules: DriftRules) -> list[str]:
    """Why `report` counts as drifted, one sentence a rule (empty: no drift)."""
    reasons = []
    value = report["category_psi"]
    if value is not None and value > rules.category_psi:
        grew = ", ".join(f"{m['category']} {m['change']:+.1%}" for m in report["categories"]["grew"][:3])
        shrank = ", ".join(f"{m['category']} {m['change']:+.1%}" for m in report["categories"]["shrank"][:3])
        chance = report["category_psi_by_chance"]
        small = (f"; with {report['scored']:,} scored titles about {chance:.2f} is expected by chance alone"
                 if chance is not None and chance > rules.category_psi / 2 else "")
        reasons.append(f"the category mix moved: PSI {value:.3f} > {rules.category_psi:g} against the training mix "
                       f"(grew: {grew or '-'}; shrank: {shrank or '-'}{small})")
    if report["rows"] and report["unscored_share"] > rules.unscored_share:
        reasons.append(f"{report['unscored_share']:.1%} of rows got no category > {rules.unscored_share:.0%} "
                       f"({report['empty_titles']:,} null or empty titles, {report['no_known_token']:,} with no known word)")
    estimated = report["accuracy"]["estimated_accuracy"]
    if rules.min_estimated_accuracy is not None and estimated is not None and estimated < rules.min_estimated_accuracy:
        low, high = report["accuracy"]["interval"]
        reasons.append(f"estimated accuracy {estimated:.1%} (95% interval {low:.1%}-{high:.1%}) < "
                       f"{rules.min_estimated_accuracy:.1%}")
    changes = report.get("changes")
    if rules.max_changed_share is not None and changes and changes["changed_share"] is not None \
            and changes["changed_share"] > rules.max_changed_share:
        why = "a new model file" if changes["model_changed"] else "the same model file" if changes["model_changed"] is False \
            else "the model file unknown for last night"
        reasons.append(f"{changes['changed_share']:.1%} of the ids of both nights changed category since "
                       f"{changes['previous']} > {rules.max_changed_share:.1%} ({changes['changed']:,} of "
                       f"{changes['ids_both_nights']:,}; {why})")
    row = next(r for r in report["confidence"]["thresholds"] if r["threshold"] == CONFIDENT)
    if row["share"] is not None and row["validation_share"] is not None \
            and row["validation_share"] - row["share"] > rules.confidence_drop:
        reasons.append(f"fewer confident rows: {row['share']:.1%} at probability >= {CONFIDENT:g} against "
                       f"{row['validation_share']:.1%} on the validation titles (a fall of more than {rules.confidence_drop:.0%})")
    return reasons


def report_paths(path: str | Path) -> tuple[Path, Path]:
    """(HTML, JSON): `--report R.html` writes R.html and R.json beside it; `--report R.json`
    the same two files; any other name R writes R.html and R.json."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        return path, path.with_suffix(".json")
    if suffix == ".json":
        return path.with_suffix(".html"), path
    return path.with_name(path.name + ".html"), path.with_name(path.name + ".json")


def write_report(report: dict, path: str | Path) -> tuple[Path, Path]:
    """Write the report's HTML and JSON, each atomically."""
    html_path, json_path = report_paths(path)
    atomic_write_bytes(json_path, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    atomic_write_bytes(html_path, render_html(report).encode("utf-8"))
    return html_path, json_path


# ------------------------------------------------------------------ HTML

def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}%}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _bars(title: str, labels: list[str], series: list[tuple[str, list[float], str]], unit: str = "%") -> str:
    """A grouped horizontal bar chart as inline SVG: one row per label, one bar per series."""
    row_h, bar_h, left, width = 8 + 9 * len(series), 9, 210, 360
    top = 22 + 16
    height = top + row_h * len(labels) + 8
    peak = max([v for _, values, _ in series for v in values] + [1e-12])
    parts = [f'<svg width="{left + width + 70}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}"><text x="0" y="14" font-weight="bold">{html.escape(title)}</text>']
    x = left
    for name, _, color in series:  # legend
        parts.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{color}"/>'
                     f'<text x="{x + 14}" y="33" font-size="11">{html.escape(name)}</text>')
        x += 24 + 7 * len(name)
    for i, label in enumerate(labels):
        y = top + i * row_h
        parts.append(f'<text x="{left - 6}" y="{y + row_h / 2 + 4:.1f}" font-size="11" text-anchor="end">'
                     f'{html.escape(label[:32])}</text>')
        for j, (_, values, color) in enumerate(series):
            w = width * values[i] / peak
            by = y + 4 + j * bar_h
            value = f"{values[i]:.1%}" if unit == "%" else f"{values[i]:,.0f}"
            parts.append(f'<rect x="{left}" y="{by}" width="{w:.1f}" height="{bar_h - 1}" fill="{color}">'
                         f'<title>{html.escape(label)}: {value}</title></rect>'
                         f'<text x="{left + w + 4:.1f}" y="{by + bar_h - 1}" font-size="9">{value}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _histogram(title: str, edges: list[float], series: list[tuple[str, list[float], str]], fmt) -> str:
    """Side-by-side vertical bars per bin, as inline SVG (values are shares)."""
    n = len(series[0][1])
    left, bottom, height, bin_w = 40, 30, 150, max(18, 8 * len(series) + 6, 48 if n <= 12 else 0)
    width = n * bin_w
    peak = max([v for _, values, _ in series for v in values] + [1e-12])
    total_h = height + bottom + 40
    parts = [f'<svg width="{max(left + width + 20, 9 * len(title))}" height="{total_h}" role="img" '
             f'aria-label="{html.escape(title)}"><text x="0" y="14" font-weight="bold">{html.escape(title)}</text>']
    x = left
    for name, _, color in series:
        parts.append(f'<rect x="{x}" y="22" width="10" height="10" fill="{color}"/>'
                     f'<text x="{x + 14}" y="31" font-size="11">{html.escape(name)}</text>')
        x += 24 + 7 * len(name)
    base = 40 + height
    parts.append(f'<line x1="{left}" y1="{base}" x2="{left + width}" y2="{base}" stroke="#444"/>')
    for i in range(n):
        for j, (_, values, color) in enumerate(series):
            h = height * values[i] / peak
            bx = left + i * bin_w + 2 + j * ((bin_w - 4) / len(series))
            parts.append(f'<rect x="{bx:.1f}" y="{base - h:.1f}" width="{(bin_w - 4) / len(series):.1f}" height="{h:.1f}" '
                         f'fill="{color}"><title>{fmt(edges, i)}: {values[i]:.1%}</title></rect>')
        if n <= 12 or i % max(1, n // 10) == 0:
            parts.append(f'<text x="{left + i * bin_w}" y="{base + 14}" font-size="9">{fmt(edges, i)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _length_bin(edges: list[float], i: int) -> str:
    return "empty" if i == 0 else (f"{edges[i]}+" if i == len(edges) - 1 else f"{edges[i]}-{edges[i + 1] - 1}")


def _confidence_bin(edges: list[float], i: int) -> str:
    return f"{edges[i]:g}-{edges[i + 1]:g}"


def render_html(report: dict) -> str:
    """One self-contained page: no script, no stylesheet, no picture from elsewhere."""
    e = html.escape
    drift = report["drift"]
    verdict = ("<p class='bad'><b>Drift.</b> " + "<br>".join(e(r) for r in report["drift_reasons"]) + "</p>") if drift \
        else "<p class='ok'><b>No drift</b> by the rules below.</p>"
    model = report["model"]
    rows = [("rows", f"{report['rows']:,}"), ("scored", f"{report['scored']:,}"),
            ("unscored (null/empty titles, no known word)",
             f"{report['unscored']:,} ({_pct(report['unscored_share'])}): {report['empty_titles']:,} null or empty, "
             f"{report['no_known_token']:,} with no known word"),
            ("unknown words", _pct(report["unknown_word_share"])),
            ("category PSI vs training mix", f"{_num(report['category_psi'])} (drift above {report['drift_rules']['category_psi']:g}; "
             f"a catalog this size drawn from the training mix shows about {_num(report['category_psi_by_chance'])} by chance)"),
            ("category Jensen–Shannon divergence", f"{_num(report['category_js'], '.4f')} bits"),
            ("mean top probability", _num(report["confidence"]["mean_probability"]))]
    acc = report["accuracy"]
    if acc["estimated_accuracy"] is not None:
        low, high = acc["interval"]
        note = "" if acc["trusted"] else " (not to be trusted tonight: " + "; ".join(acc["caveats"]) + ")"
        rows.append(("estimated accuracy (no labels)", f"{acc['estimated_accuracy']:.1%} (95% interval {low:.1%}-{high:.1%}); "
                     f"validation titles at export: {_pct(acc['validation_accuracy'])}{note}"))
        rows.append(("estimated balanced accuracy", f"{_pct(acc['estimated_balanced_accuracy'])} over "
                     f"{acc['categories_in_balanced']} categories; validation titles at export: "
                     f"{_pct(acc['validation_balanced_accuracy'])}"))
    if report["confidence"]["min_probability"]:
        rows.append((f"below --min-probability {report['confidence']['min_probability']:g}",
                     _pct(report["confidence"]["below_min_probability"])))
    changes = report.get("changes")
    if changes:
        model_note = {True: "a new model file since", False: "the same model file as", None: "model file of"}[changes["model_changed"]]
        rows.append(("since last night", f"{_pct(changes['changed_share'])} of {changes['ids_both_nights']:,} ids changed "
                     f"category ({changes['changed']:,}); {changes['new_ids']:,} new ids, {changes['gone_ids']:,} gone; "
                     f"{model_note} {changes['previous']}" + (" unknown" if changes["model_changed"] is None else "")))
        for key, label in (("gained", "gained most since last night"), ("lost", "lost most since last night")):
            if changes[key]:
                rows.append((label, ", ".join(f"{m['category']} {m['count']:,}" for m in changes[key][:5])))
    summary = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    thresholds = "".join(
        f"<tr><td>{r['threshold']:g}</td><td>{_pct(r['share'])}</td><td>{_pct(r['validation_share'])}</td></tr>"
        for r in report["confidence"]["thresholds"])
    cats = report["categories"]
    pictures = []
    if "grew" in cats:
        movers = cats["grew"] + cats["shrank"]
        pictures.append(_bars("Categories that moved most: share tonight vs training",
                              [m["category"] for m in movers],
                              [("tonight", [m["share"] for m in movers], "#d9534f"),
                               ("training", [m["training_share"] for m in movers], "#5b7fb5")]))
    else:
        top = sorted(cats["counts"].items(), key=lambda kv: -kv[1])[:MOVERS]
        total = max(1, report["scored"])
        pictures.append(_bars("Most predicted categories tonight (no training mix in this model file)",
                              [k for k, _ in top], [("tonight", [v / total for _, v in top], "#d9534f")]))
    rows_at = report["confidence"]["thresholds"]
    edges = [0.0] + [r["threshold"] for r in rows_at] + [1.0]
    series = [("tonight", [r["share"] for r in rows_at], "#d9534f")]
    if all(r["validation_share"] is not None for r in rows_at):
        series.append(("validation (at export)", [r["validation_share"] for r in rows_at], "#5b7fb5"))
    if all(r["share"] is not None for r in rows_at):
        # shares between consecutive coverage thresholds, from the shares at or above each
        interval = [[1.0 - at[0]] + [a - b for a, b in zip(at, at[1:])] + [at[-1]] for _, at, _ in series]
        pictures.append(_histogram("Top probability: share of scored rows, tonight vs validation", edges,
                                   [(name, shares, color) for (name, _, color), shares in zip(series, interval)],
                                   _confidence_bin))
    lengths = report["title_length"]
    pictures.append(_histogram("Title length (characters)", lengths["edges"],
                               [("tonight", _shares(np.array(lengths["counts"], np.float64)).tolist(), "#5b7fb5")], _length_bin))
    identity = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in
                       [("input", report["input"]), ("output", report["output"]), ("engine", report["engine"]),
                        ("model file", model["file"]), ("SHA-256", model["sha256"]),
                        ("MLflow run", model["mlflow_run_id"] or "-"), ("registered version", model["registered"] or "-"),
                        ("data fingerprint", model["data_fingerprint"] or "-"), ("written", report["created_at"])])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>meli-score report: {e(report['input'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:14px}}.bad{{color:#a94442}}.ok{{color:#3c763d}}
svg{{display:block;margin:1.5em 0;font-family:sans-serif}}</style></head>
<body><h1>meli-score report</h1>
{verdict}
<table>{summary}</table>
<h2>Confidence</h2>
<table><tr><th>probability at least</th><th>share of scored rows tonight</th><th>share of validation titles (at export)</th></tr>{thresholds}</table>
{''.join(pictures)}
<h2>Model and input</h2>
<table>{identity}</table>
</body></html>
"""


def summary_words(report: dict | None, files: tuple[Path, ...]) -> str:
    """What either engine's summary line adds: where the report went and the drift verdict
    (nothing without a report)."""
    if report is None:
        return ""
    if report["drift"]:
        verdict = "drift: " + "; ".join(report["drift_reasons"])
    else:
        psi_text = f"category PSI {report['category_psi']:.3f}" if report["category_psi"] is not None else "no training mix"
        verdict = f"no drift ({psi_text})"
    return f"; report {files[0]}; {verdict}"



def report_metrics(report: dict) -> dict[str, float]:
    """The report's figures as flat MLflow metrics (missing figures left out)."""
    flat = {k: report[k] for k in ("rows", "scored", "unscored", "unscored_share", "unknown_word_share", "category_psi",
                                   "category_js")}
    flat["drift"] = float(report["drift"])
    flat["estimated_accuracy"] = report["accuracy"]["estimated_accuracy"]
    if report.get("changes"):
        for key in ("changed_share", "changed", "new_ids", "gone_ids"):
            flat[key] = report["changes"][key]
    flat["estimated_balanced_accuracy"] = report["accuracy"]["estimated_balanced_accuracy"]
    flat["title_shape_psi"] = report["accuracy"].get("title_shape_psi")
    flat["mean_probability"] = report["confidence"]["mean_probability"]
    flat["below_min_probability"] = report["confidence"]["below_min_probability"]
    for row in report["confidence"]["thresholds"]:
        flat[f"share_at_{row['threshold']:g}"] = row["share"]
    return {k: float(v) for k, v in flat.items() if v is not None}


def track_report(report: dict, files) -> str:
    """`meli-score --track`: the run in MLflow's ``meli-scoring`` experiment; returns its id."""
    from meli.tracking import log_scoring_run

    model = report["model"]
    tags = {"meli.input": report["input"], "meli.output": report["output"], "meli.engine": report["engine"],
            "meli.model_sha256": model["sha256"], "meli.model_run_id": model["mlflow_run_id"] or "",
            "meli.model_version": model["registered"] or "", "meli.drift": str(report["drift"]).lower()}
    if report["drift"]:
        tags["meli.drift_reasons"] = "; ".join(report["drift_reasons"])[:5000]
    return log_scoring_run(report_metrics(report), tags, files, run_name=Path(report["input"]).name or "stdin")
