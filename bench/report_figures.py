"""How close the nightly report's label-free accuracy estimate comes to the real accuracy.

The default recipe without the refit, its choices and its calibration made on 15% of
``DATA/train.*`` (as `bench/accuracy.py` runs it; or ``--checkpoint`` of such a fit, e.g. the
one `bench/learning_curve.py --keep-model` saved), exported as `meli-export` ships it, scores
``DATA/validation.*`` through `meli-score --report` three ways: the titles as they are, cut to
their first two words, and without their first two words. For each: the real accuracy and
balanced accuracy (from the labels the report never sees) beside the report's estimates.

    python bench/report_figures.py --data ../shared/data/meli-es --write docs/results-report.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import machine, publish  # noqa: E402
from meli.dataset import load_labelled  # noqa: E402
from meli.metrics import balanced_accuracy  # noqa: E402
from meli.train.train import resolve_data  # noqa: E402

def _every_other_word(title: str) -> str:
    """Words 1, 3, 5, ...: a shortening no table was fitted on (the fit cuts prefixes and heads)."""
    return " ".join(title.split()[::2])


VARIANTS = {
    "as they are": lambda t: t,
    "first word only": lambda t: " ".join(t.split()[:1]),
    "first two words only": lambda t: " ".join(t.split()[:2]),
    "first three words only": lambda t: " ".join(t.split()[:3]),
    "every other word": _every_other_word,
    "without their first two words": lambda t: " ".join(t.split()[2:]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "meli-es"))
    ap.add_argument("--checkpoint", type=Path, default=None, help="a fit whose choices were made on a split of train")
    ap.add_argument("--config", type=Path, default=ROOT / "train" / "configs" / "mlp.toml")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    from bench.accuracy import project_model
    from meli.checkpoint import load_checkpoint
    from meli.export.onnx_export import to_onnx
    from meli.score.score import score_file
    from meli.score.job import ScoreJob

    source = resolve_data(args.data)
    train, validation = load_labelled(source.train), load_labelled(source.validation)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = tmp / "fit.pt"
            project_model(args.config, train, validation, seed=0, save=checkpoint)
        model = tmp / "model.onnx"
        model.write_bytes(to_onnx(load_checkpoint(checkpoint), quantize=True).SerializeToString())
        truth = validation.categories.to_pylist()
        labels = {c: i for i, c in enumerate(sorted(set(truth)))}
        y = np.array([labels[c] for c in truth])
        rows = ["| titles | rows | real accuracy | estimated accuracy (95% interval) | difference | real balanced accuracy | "
                "estimated balanced accuracy | trusted |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, change in VARIANTS.items():
            titles = [change(t) for t in validation.titles.to_pylist()]
            inp, out, report = tmp / "in.parquet", tmp / "out.parquet", tmp / "r.html"
            pq.write_table(pa.table({"title": titles}), inp)
            score_file(inp, out, ScoreJob(model=str(model), report=report, quiet=True))
            acc = json.loads((tmp / "r.json").read_text())["accuracy"]
            predicted = pq.read_table(out).column("category").to_pylist()
            pred = np.array([labels.get(p, -1) if p is not None else -1 for p in predicted])
            real, real_balanced = float((pred == y).mean()), balanced_accuracy(y, pred)
            low, high = acc["interval"]
            rows.append(f"| {name} | {len(titles):,} | {real:.4f} | {acc['estimated_accuracy']:.4f} ({low:.4f}-{high:.4f}) | "
                        f"{acc['estimated_accuracy'] - real:+.4f} | {real_balanced:.4f} | "
                        f"{acc['estimated_balanced_accuracy']:.4f} | {'yes' if acc['trusted'] else 'no: ' + '; '.join(acc['caveats'])} |")
            print(rows[-1], file=sys.stderr, flush=True)
    body = [
        f"{machine()}: the "
        f"default recipe without the refit (choices and temperature on 15% of `{Path(source.train).name}`), exported "
        f"as meli-export ships it, scoring the {len(validation):,} titles of `{Path(source.validation).name}` with "
        "`--report`. Real figures from the labels, which the report never sees. Rows without a category (no word "
        "the model reads) count as wrong in the real accuracy and are left out of the estimate.",
        "",
        *rows,
    ]
    publish(args.write, "The report's accuracy estimate against the real accuracy", body)


if __name__ == "__main__":
    main()
