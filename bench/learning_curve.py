"""`make bench-learning-curve`: what more labelled titles buy, for this model and its peers.

Trains on the first N titles of a seeded shuffle of ``DATA/train.*`` (N = 5,000, 10,000,
20,000 and all), each system on the same titles, and judges every one on ``DATA/validation.*``
(no choice touches it): the default recipe (``train/configs/mlp.toml`` without the refit, its
choices made on 15% of the N titles, as `bench/accuracy.py` runs it, scored as `meli-export`
ships it), fastText (word bigrams, dim 100, 25 epochs, every core) and TF-IDF + LinearSVC.
A category absent from the N titles counts as missed on validation.

    python bench/learning_curve.py --data ../shared/data/meli-es --write docs/results-learning-curve.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.accuracy import fasttext_model, project_model, svm_model  # noqa: E402
from bench.results import machine, publish  # noqa: E402
from meli.dataset import LabelledSplit, load_labelled  # noqa: E402
from meli.train.train import resolve_data  # noqa: E402


def first(split: LabelledSplit, n: int, seed: int) -> LabelledSplit:
    """The first `n` titles of a seeded shuffle of `split` (so each size holds the smaller ones)."""
    pick = pa.array(np.sort(np.random.default_rng(seed).permutation(len(split))[:n]))
    return LabelledSplit(split.titles.take(pick), split.categories.take(pick), f"{split.source} (first {n:,})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "meli-es"))
    ap.add_argument("--sizes", default="5000,10000,20000,all")
    ap.add_argument("--config", type=Path, default=ROOT / "train" / "configs" / "mlp.toml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-model", type=Path, default=None,
                    help="save the checkpoint of the largest size's fit here (bench/report_figures.py --checkpoint)")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    source = resolve_data(args.data)
    if source.validation is None:
        sys.exit(f"{args.data}: needs a validation file to judge on")
    train, validation = load_labelled(source.train), load_labelled(source.validation)
    sizes = [len(train) if s == "all" else min(int(s), len(train)) for s in args.sizes.split(",")]
    rows = ["| training titles | categories present | meli-categorizer (default recipe) | fastText | TF-IDF + LinearSVC |",
            "|---:|---:|---:|---:|---:|"]
    for n in sizes:
        part = first(train, n, args.seed)
        keep = args.keep_model if n == max(sizes) else None
        ours = project_model(args.config, part, validation, seed=args.seed, save=keep)[0]  # the default export
        ft, _ = fasttext_model(part, validation, seed=args.seed)
        svm, _ = svm_model(part, validation)
        present = len(set(part.categories.to_pylist()))
        rows.append(f"| {n:,} | {present} | {ours[1]:.4f} | {ft:.4f} | {svm:.4f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    body = [
        f"{machine()}; "
        f"balanced accuracy on the {len(validation):,} titles of `{Path(source.validation).name}` "
        f"({len(set(validation.categories.to_pylist()))} categories), one seed ({args.seed}).",
        "",
        *rows,
    ]
    publish(args.write, "What more labelled titles buy", body)


if __name__ == "__main__":
    main()
