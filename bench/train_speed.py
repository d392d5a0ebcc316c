"""`make bench-train`: `make train` by an earlier version and by this one, back to back.

Each version runs ``meli-train`` with its shipped default recipe (``train/configs/mlp.toml``,
what ``make train DATA=...`` runs) on the same data, in a child process of its own with its
own MLflow store and work folder. The table gives wall time, peak RSS (the whole process
tree, polled) and the validation balanced accuracy each run reports: the shipped student's
and the ensemble's that taught it. Before the timed runs each version trains once with two
members for one epoch, so both find their compiled kernels cached, as a user's second run does.

    python bench/train_speed.py --previous b130249 --seeds 0,5,10 --write docs/results-train-speed.md

A run with seed s trains its members with seeds s..s+4, so seeds 5 apart (0, 5, 10) give
runs with no member in common: independent samples of what a version's recipe reaches.
Seeds 0, 1, 2 would share most of their members, and their figures would move together.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import machine, publish  # noqa: E402
from bench.score_speed import checkout  # noqa: E402
from bench.train_scale import Run, run_measured  # noqa: E402

# the version's own command line (the entry point's name changed over time), run from its folder
CHILD = "import sys, meli.train.cli as c; sys.argv[0] = 'meli-train'; (getattr(c, 'entry', None) or c.main)()"
STUDENT = re.compile(r"student: validation balanced accuracy ([0-9.]+) \(the ensemble it learnt from: ([0-9.]+)\)")


def meli_train(folder: Path, data: Path, work: Path, *extra: str) -> Run:
    """`meli-train --data DATA` of the version laid out in `folder` (`ROOT`: this one, as installed),
    run in `work`: `python -c` puts its working folder first on the path, so not this repository's."""
    work.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "MELI_WORK_DIR": str(work / "work"),
           "TMPDIR": str(work)}
    if folder != ROOT:  # the earlier version's modules before the installed ones
        env["PYTHONPATH"] = str(folder)
    return run_measured([sys.executable, "-c", CHILD, "--config", str(folder / "train" / "configs" / "mlp.toml"),
                         "--data", str(data), *extra], env, cwd=work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--previous", required=True, help="a git revision of this repository: the version to compare with")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "meli-es")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, each trained by both versions")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    data = args.data.resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="meli-train-speed-") as tmp:
        versions = ((f"previous ({args.previous})", checkout(args.previous, Path(tmp) / "previous")), ("this version", ROOT))
        for name, folder in versions:
            warm = meli_train(folder, data, Path(tmp) / f"warm-{folder.name}", "--epochs", "1", "--members", "2")
            if warm.returncode:
                sys.exit(f"{name}: meli-train failed:\n{warm.stderr[-3000:]}")
        for seed in seeds:
            for name, folder in versions:
                run = meli_train(folder, data, Path(tmp) / f"{folder.name}-{seed}", "--seed", str(seed))
                found = STUDENT.search(run.stderr)
                if run.returncode or not found:
                    sys.exit(f"{name}, seed {seed}: meli-train failed:\n{run.stderr[-3000:]}")
                rows.append(f"| {name} | {seed} | {run.seconds:.0f} | {run.peak_rss / 2**30:.2f} | {found.group(1)} | "
                            f"{found.group(2)} |")
                figures.setdefault(name, []).append((run.seconds, run.peak_rss / 2**30, float(found.group(1)),
                                                     float(found.group(2))))
                print(rows[-1], file=sys.stderr)
    if len(seeds) > 1:  # each version's mean over its seeds
        for name, runs in figures.items():
            mean = [sum(column) / len(column) for column in zip(*runs)]
            rows.append(f"| **{name}: mean** | {len(runs)} seeds | {mean[0]:.0f} | {mean[1]:.2f} | {mean[2]:.4f} | "
                        f"{mean[3]:.4f} |")
    publish(args.write, "`make train`: this version against an earlier one", [
        f"{machine()}; data: {args.data.name} (train and validation files); the shipped default recipe "
        "(train/configs/mlp.toml: five members, a distilled student, the refit), as `make train` runs it. "
        "Seed s trains members s..s+4: seeds 5 apart share no member.",
        "",
        "| version | seed | wall time s | peak RSS GiB | student: validation balanced accuracy | "
        "the ensemble it learnt from |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ])


if __name__ == "__main__":
    main()
