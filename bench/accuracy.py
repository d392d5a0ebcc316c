"""`make bench-accuracy`: this project's model against classical baselines, judged once.

Every system trains on ``DATA/train.*`` and is judged on ``DATA/validation.*``, which no
choice of any system touches. The project's model (``--config``, default
``train/configs/mlp.toml``) makes its own choices (each teacher's and the student's best
epoch, early stopping) on a split carved out of train (15%, a different one per seed), like
`bench/refit_gain.py`; it runs without the refit. It is judged as users run it: exported to
ONNX as `meli-export` writes it by default (and with float products) and scored through the
same core as ``meli-score``. fastText (word bigrams, dim 100, 25 epochs; and with
character n-grams 3-5) and TF-IDF word 1-2 + char_wb 2-5 with a LinearSVC keep fixed
settings. With ``--seeds N`` every seeded system runs N times (seeds 0..N-1): the table
gives the mean and the spread (lowest-highest). Prints a Markdown table with the date and
the machine; ``--write FILE`` also writes it there.

    python bench/accuracy.py --data ../shared/data/meli-es --seeds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
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
from meli.train.train import resolve_data  # noqa: E402


SELECTION_FRACTION = 0.15  # of train, where the project's model makes its choices


def project_model(config_path: Path, train, validation, seed: int = 0, save: Path | None = None
                  ) -> list[tuple[str, float, float]]:
    """(name, balanced accuracy on `validation`, training seconds) of the model fitted on
    `train` less a selection split (seeded), choices made on that split, exported with float
    products (``--no-quantize``) and as `meli-export` ships it (int8 products, per title)."""
    from meli.dataset import split_holdout
    from meli.export.onnx_export import to_onnx
    from meli.onnx_model import load_onnx_model
    from meli.scorer import Scorer
    from meli.train.recipe import train_and_refit

    fit, selection = split_holdout(train, SELECTION_FRACTION, seed=seed)
    config = dataclasses.replace(load_config(config_path), refit=False, seed=seed)
    t = time.perf_counter()
    result = train_and_refit(config, fit, selection, quiet=True)
    seconds = time.perf_counter() - t
    if save is not None:
        from meli.checkpoint import save_checkpoint

        save_checkpoint(result.checkpoint, save)
    rows = []
    for quantize in (True, False):
        scorer = Scorer(load_onnx_model(to_onnx(result.checkpoint, quantize=quantize).SerializeToString(), provider="cpu"))
        out = scorer.score_batch(pa.record_batch({"title": validation.titles}))
        kind = "the default export: int8 products, a scale per title" if quantize else "float products: --no-quantize"
        rows.append((f"meli-categorizer ({config_path.name}, {kind})", _bacc(validation, out.column("category").to_pylist()),
                     seconds))
    return rows


def fasttext_model(train, validation, seed: int = 0, **params) -> tuple[float, float]:
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
                                          thread=os.cpu_count() or 1, seed=seed, **params)
        seconds = time.perf_counter() - t
    # model.f.predict: the wrapper's model.predict calls np.array(copy=False), which NumPy 2 refuses
    pred = [model.f.predict(line(t) + "\n", 1, 0.0, "strict")[0][1].removeprefix("__label__") for t in validation.titles.to_pylist()]
    return _bacc(validation, pred), seconds


def svm_pipeline():
    """TF-IDF word 1-2 + char_wb 2-5 n-grams, then a LinearSVC (C = 1): the classical baseline."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.svm import LinearSVC

    return make_pipeline(
        make_union(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, strip_accents="unicode"),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, strip_accents="unicode"),
        ),
        LinearSVC(C=1.0),
    )


def svm_model(train, validation) -> tuple[float, float]:
    t = time.perf_counter()
    model = svm_pipeline()
    model.fit(train.titles.to_pylist(), train.categories.to_pylist())
    seconds = time.perf_counter() - t
    return _bacc(validation, model.predict(validation.titles.to_pylist())), seconds


def _bacc(validation, pred) -> float:
    truth = validation.categories.to_pylist()
    labels = {c: i for i, c in enumerate(sorted(set(truth)))}
    return balanced_accuracy(np.array([labels[c] for c in truth]), np.array([labels.get(p, -1) for p in pred]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "meli-es"))
    ap.add_argument("--config", type=Path, default=ROOT / "train" / "configs" / "mlp.toml")
    ap.add_argument("--skip", nargs="*", default=[], help="systems to leave out: project fasttext fasttext-char svm")
    ap.add_argument("--seeds", type=int, default=3, help="runs of each seeded system (seeds 0..N-1)")
    ap.add_argument("--save-checkpoint", type=Path, help="keep the project's seed-0 checkpoint in this file")
    ap.add_argument("--write", type=Path, help="also write the table to this Markdown file (make bench-accuracy: "
                    "docs/results-accuracy.md)")
    args = ap.parse_args()
    source = resolve_data(args.data)
    if source.validation is None:
        sys.exit(f"{args.data}: needs a validation file")
    train, validation = load_labelled(source.train), load_labelled(source.validation)
    systems = {
        "project": lambda seed: project_model(args.config, train, validation, seed,
                                              args.save_checkpoint if seed == 0 else None),
        "fasttext": lambda seed: [("fastText supervised (word bigrams, dim 100, 25 epochs, lr 1.0)",
                                   *fasttext_model(train, validation, seed))],
        "fasttext-char": lambda seed: [("fastText with character n-grams 3-5",
                                        *fasttext_model(train, validation, seed, minn=3, maxn=5))],
        "svm": lambda seed: [("TF-IDF word 1-2 + char_wb 2-5 n-grams, LinearSVC", *svm_model(train, validation))],
    }
    seeded = {"project", "fasttext", "fasttext-char"}
    results: dict[str, list[tuple[float, float]]] = {}
    for key, fit in systems.items():
        if key in args.skip:
            continue
        for seed in range(args.seeds if key in seeded else 1):
            for name, score, seconds in fit(seed):
                results.setdefault(name, []).append((score, seconds))
                print(f"{name}, seed {seed}: {score:.4f} ({seconds:.0f}s)", file=sys.stderr)
    rows = []
    for name, runs in results.items():
        scores = [r[0] for r in runs]
        spread = f" ({min(scores):.4f}-{max(scores):.4f})" if len(scores) > 1 else ""
        rows.append((name, f"{np.mean(scores):.4f}{spread}", len(scores), np.mean([r[1] for r in runs])))
    lines = [f"{dt.date.today()}, {platform.machine()} {os.cpu_count()} cores; train {len(train):,} titles "
             f"({source.train.name}; the project's model chooses its epochs on {SELECTION_FRACTION:.0%} of them), "
             f"judged once on {len(validation):,} ({source.validation.name})", "",
             "| system | balanced accuracy on the judged titles: mean (lowest-highest) | runs (seeds) | training time |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {score} | {n} | {seconds:.0f} s |" for name, score, n, seconds in rows]
    print("\n" + "\n".join(lines))
    if args.write:
        from results import write_results

        write_results(args.write, "Accuracy against classical baselines (`make bench-accuracy`)", lines)


if __name__ == "__main__":
    main()
