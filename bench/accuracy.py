"""`make bench-accuracy`: this project's model against classical baselines, same split.

Trains on ``DATA/train.*`` and measures balanced accuracy on ``DATA/validation.*`` (every
system trains on the same titles and is judged on titles none of them saw, so the project's
model runs without its refit on train + validation) for:
the project's model (``--config``, default ``train/configs/mlp.toml``, exported to ONNX and scored
through the same path ``meli-score`` uses), fastText supervised (word bigrams, dim 100,
25 epochs), fastText with character n-grams 3–5, and TF-IDF word 1–2 + char_wb 2–5 n-grams
with a LinearSVC. Prints a Markdown table with the date and the machine.

    python bench/accuracy.py --data ../shared/data/meli-es
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meli.dataset import load_labelled  # noqa: E402
from meli.metrics import balanced_accuracy  # noqa: E402
from meli.train.config import load_config  # noqa: E402
from meli.train.run import resolve_data  # noqa: E402


def project_model(config_path: Path, train, validation, save: Path | None = None) -> list[tuple[str, float, float]]:
    """(name, balanced accuracy, training seconds) of the checkpoint exported with float matrix
    products (``meli-export --no-quantize``) and as `meli-export` ships it (int8 products with
    a scale per title); with `save`, the checkpoint is kept there."""
    from meli.export.onnx_export import to_onnx
    from meli.onnx_model import load_onnx_model
    from meli.score.core import Scorer
    from meli.train.trainer import train_and_refit

    t = time.perf_counter()
    # refit off: the refit would train on the validation titles this benchmark judges on
    # (an ensemble's members are all trained; a distilled student is what is judged)
    result = train_and_refit(dataclasses.replace(load_config(config_path), refit=False), train, validation, quiet=True)
    seconds = time.perf_counter() - t
    if save is not None:
        from meli.checkpoint import save_checkpoint

        save_checkpoint(result.checkpoint, save)
    truth = np.array(validation.categories.to_pylist(), dtype=object)
    rows = []
    for quantize in (False, True):
        # measured on what users run: the exported ONNX file through the scoring core
        scorer = Scorer(load_onnx_model(to_onnx(result.checkpoint, quantize=quantize).SerializeToString(), provider="cpu"))
        out = scorer.score_batch(pa.record_batch({"title": validation.titles}))
        pred = np.array(out.column("category").to_pylist(), dtype=object)
        labels = {c: i for i, c in enumerate(sorted(set(truth) | set(p for p in pred if p is not None)))}
        score = balanced_accuracy(np.array([labels[c] for c in truth]), np.array([labels.get(p, -1) for p in pred]))
        kind = "int8 products with a scale per title: the default export" if quantize else "float products: --no-quantize"
        name = f"meli-categorizer ({config_path.name}, exported ONNX, {kind})"
        rows.append((name, score, seconds))
    return rows


def fasttext_model(train, validation, **params) -> tuple[float, float]:
    import fasttext

    from meli.tokenizer import normalize_title

    def line(title: str) -> str:
        return " ".join(normalize_title(title))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.txt"
        path.write_text("".join(f"__label__{c} {line(t)}\n" for t, c in zip(train.titles.to_pylist(), train.categories.to_pylist())))
        t = time.perf_counter()
        # lr 1.0: the fastText tutorial's recipe for "-epoch 25 -wordNgrams 2" (the library default, 0.1, underfits)
        model = fasttext.train_supervised(str(path), dim=100, epoch=25, lr=1.0, wordNgrams=2, verbose=0,
                                          thread=os.cpu_count() or 1, seed=0, **params)
        seconds = time.perf_counter() - t
    # model.f.predict: the wrapper's model.predict calls np.array(copy=False), which NumPy 2 refuses
    pred = [model.f.predict(line(t) + "\n", 1, 0.0, "strict")[0][1].removeprefix("__label__") for t in validation.titles.to_pylist()]
    return _bacc(validation, pred), seconds


def svm_model(train, validation) -> tuple[float, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.svm import LinearSVC

    t = time.perf_counter()
    model = make_pipeline(
        make_union(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, strip_accents="unicode"),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, strip_accents="unicode"),
        ),
        LinearSVC(C=1.0),
    )
    model.fit(train.titles.to_pylist(), train.categories.to_pylist())
    seconds = time.perf_counter() - t
    return _bacc(validation, model.predict(validation.titles.to_pylist())), seconds


def _bacc(validation, pred) -> float:
    truth = validation.categories.to_pylist()
    labels = {c: i for i, c in enumerate(sorted(set(truth) | set(pred)))}
    return balanced_accuracy(np.array([labels[c] for c in truth]), np.array([labels[p] for p in pred]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "meli-es"))
    ap.add_argument("--config", type=Path, default=ROOT / "train" / "configs" / "mlp.toml")
    ap.add_argument("--skip", nargs="*", default=[], help="systems to leave out: project fasttext fasttext-char svm")
    ap.add_argument("--save-checkpoint", type=Path, help="keep the project's train-only checkpoint in this file")
    ap.add_argument("--write", type=Path, help="also write the table to this Markdown file (make bench-accuracy: "
                    "docs/results-accuracy.md)")
    args = ap.parse_args()
    source = resolve_data(args.data)
    if source.validation is None:
        sys.exit(f"{args.data}: needs a validation file")
    train, validation = load_labelled(source.train), load_labelled(source.validation)
    def one(name, fit):
        return lambda: [(name, *fit())]

    systems = {
        "project": lambda: project_model(args.config, train, validation, args.save_checkpoint),
        "fasttext": one("fastText supervised (word bigrams, dim 100, 25 epochs, lr 1.0)", lambda: fasttext_model(train, validation)),
        "fasttext-char": one("fastText with character n-grams 3-5", lambda: fasttext_model(train, validation, minn=3, maxn=5)),
        "svm": one("TF-IDF word 1-2 + char_wb 2-5 n-grams, LinearSVC", lambda: svm_model(train, validation)),
    }
    rows = []
    for key, fit in systems.items():
        if key in args.skip:
            continue
        for name, score, seconds in fit():
            rows.append((name, score, seconds))
            print(f"{name}: {score:.4f} ({seconds:.0f}s)", file=sys.stderr)
    lines = [f"{dt.date.today()}, {platform.machine()} {os.cpu_count()} cores; train {len(train):,} titles "
             f"({source.train.name}), judged on {len(validation):,} ({source.validation.name})", "",
             "| system | validation balanced accuracy | training time |", "|---|---|---|"]
    lines += [f"| {name} | {score:.4f} | {seconds:.0f} s |" for name, score, seconds in rows]
    print("\n" + "\n".join(lines))
    if args.write:
        from results import write_results

        write_results(args.write, "Accuracy against classical baselines (`make bench-accuracy`)",
                      "python bench/accuracy.py " + shlex.join(sys.argv[1:]), lines)


if __name__ == "__main__":
    main()
