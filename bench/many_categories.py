"""`make bench-categories`: scoring speed and memory at 1,588 categories, against fastText.

The challenge's full data has 1,588 categories (two languages); the shared titles have 632.
This splits every shared category into parts (by a hash of the title: the larger categories
into more parts) until there are 1,588, trains one MLP of the default shape on the split
labels (one member, a few epochs, no refit: accuracy at made-up categories means nothing,
the model's size is the point), exports it as ``meli-export`` ships it, and runs
``bench/score_speed.py`` on that model with a fastText trained on the same split labels, in
one run.

    python bench/many_categories.py --rows 2000000 --write docs/results-categories.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import publish  # noqa: E402
from bench.train_scale import config_file, sources  # noqa: E402

BIN = Path(sys.executable).parent


def split_categories(categories: list[str], target: int) -> dict[str, int]:
    """How many parts each category is cut into so that there are `target` in all: one each,
    then one more at a time to the category with the most titles per part."""
    sizes: dict[str, int] = {}
    for c in categories:
        sizes[c] = sizes.get(c, 0) + 1
    parts = dict.fromkeys(sizes, 1)
    for _ in range(target - len(sizes)):
        c = max(sizes, key=lambda k: sizes[k] / parts[k])
        parts[c] += 1
    return parts


def relabelled(source: Path, parts: dict[str, int], out: Path) -> None:
    """`source`'s titles with each category cut into its parts by a stable hash of the title."""
    from meli.dataset import load_labelled

    split = load_labelled(source)
    titles, cats = split.titles.to_pylist(), split.categories.to_pylist()
    labels = [f"{c}_{zlib.crc32(t.encode()) % parts[c]}" if parts.get(c, 1) > 1 else c for t, c in zip(titles, cats)]
    pq.write_table(pa.table({"title": titles, "category": labels}), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", type=int, default=1588)
    ap.add_argument("--rows", type=int, default=2_000_000, help="titles in the scored catalog")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=Path, default=None, help="folder for the data, runs and model (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="score with --work's model.onnx when it is there (no training)")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="meli-categories-"))
    work.mkdir(parents=True, exist_ok=True)
    train_src, validation_src = sources()
    from meli.dataset import load_labelled

    train = load_labelled(train_src)
    parts = split_categories(train.categories.to_pylist(), args.categories)
    train_file, validation_file = work / "train.parquet", work / "validation.parquet"
    relabelled(train_src, parts, train_file)
    relabelled(validation_src, parts, validation_file)
    n_labels = len(set(pq.read_table(train_file).column("category").to_pylist()))
    print(f"{n_labels:,} categories", file=sys.stderr)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "MELI_WORK_DIR": str(work / "runs")}
    model = work / "model.onnx"
    if not (args.reuse and model.is_file()):
        config = config_file(work, "one-member", members=1, refit="false", epochs=args.epochs)
        subprocess.run([str(BIN / "meli-train"), "--config", str(config), "--train", str(train_file), "--validation",
                        str(validation_file), "--experiment", "categories", "--quiet"], env=env, check=True)
        subprocess.run([str(BIN / "meli-export"), "--experiment", "categories", "--output", str(model), "--no-register",
                        "--quiet"], env=env, check=True, stdout=subprocess.DEVNULL)
    cmd = [sys.executable, str(ROOT / "bench" / "score_speed.py"), "--model", str(model), "--rows", str(args.rows),
           "--threads", str(args.threads), "--fasttext-train", str(train_file)]
    table = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()
    body = [f"One MLP of the default shape (one member, {args.epochs} epochs, no refit) trained on the shared training "
            f"titles with their {len(parts)} categories cut into {n_labels:,} (by a hash of the title), exported as "
            "meli-export ships it; fastText trained on the same labels. `bench/score_speed.py` on that model:", "",
            *table]
    publish(args.write, f"Scoring at {n_labels:,} categories", body)


if __name__ == "__main__":
    main()
