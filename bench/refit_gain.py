"""Does the refit on train + validation pay? A simulation that never touches the judged titles.

Splits DATA/train 85/15 into train' and val' (early stopping picks the epoch count on val'),
then compares the model kept without refit against the refit on train' + val', both judged
on DATA/validation, which neither saw.

    python bench/refit_gain.py --data ../shared/data/meli-es
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meli.dataset import load_labelled, split_holdout  # noqa: E402
from meli.metrics import balanced_accuracy  # noqa: E402
from meli.train.config import load_config  # noqa: E402
from meli.train.train import resolve_data  # noqa: E402
from meli.train.recipe import train_and_refit  # noqa: E402
from meli.train.trainer import label_indices  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "meli-es"))
    ap.add_argument("--config", type=Path, default=ROOT / "train" / "configs" / "mlp.toml")
    ap.add_argument("--split-seed", type=int, default=0, help="which 15%% of train becomes val'")
    args = ap.parse_args()
    source = resolve_data(args.data)
    config = load_config(args.config)
    judged = load_labelled(source.validation)
    train, val = split_holdout(load_labelled(source.train), 0.15, seed=args.split_seed)
    for refit in (False, True):
        result = train_and_refit(dataclasses.replace(config, refit=refit), train, val, quiet=True)
        ckpt = result.checkpoint
        model, tok = ckpt.build_model(), ckpt.tokenizer()
        with torch.no_grad():
            pred = torch.cat([model(torch.from_numpy(tok.encode_batch(judged.titles.slice(i, 2048)).ids)).argmax(1)
                              for i in range(0, len(judged), 2048)]).numpy()
        score = balanced_accuracy(label_indices(judged.categories, ckpt.labels), pred)
        print(f"refit={refit}: best epoch {result.best_epoch}, val' {ckpt.metrics['val_balanced_accuracy']:.4f}, "
              f"held-out {score:.4f}")


if __name__ == "__main__":
    main()
