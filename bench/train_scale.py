"""`make bench-train-scale`: training at the scale users hold, against fastText, in one run.

Builds labelled sets of N titles (default 500,000 and 2,000,000) from the shared training
titles (``../shared/data/meli-es``, else the embedded demo data), each new title the first
half of one title's words + the second half of another's *of the same category* (so its label
holds), written as Parquet for meli-train and as fastText's ``__label__`` text. Then, for each
size, in child processes of their own (peak RSS polled, the whole process tree):

- fastText supervised, 2 threads, one epoch, word bigrams, dim 100 (reading its text file
  included);
- ``meli-train``, one member, one epoch, no refit: start-up, reading, vocabulary, encoding and
  the epoch, as a user runs it (after one untimed warm-up run on 20,000 titles, so that numba's
  compiled kernels come from its cache, as on a user's second run);
- with ``--previous REV``, that version's one member epoch too, in the same rounds (its own
  shipped config, the same changes), so that a change's effect is measured side by side;
- ``meli-train``, the default recipe (``train/configs/mlp.toml``: five members teaching a
  student on recombined titles, then the refit) with one epoch per stage, its peak RSS and
  time stage by stage (stages read from its log).

Validation is the shared validation file (6,371 titles). Accuracy at these sizes means little
(every title is a splice of the same 38,205), time and memory are the point.

    python bench/train_scale.py --sizes 500000,2000000 --write docs/results-train-scale.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import machine, publish  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "meli-es"
DEMO = ROOT / "meli" / "resources" / "demo"
BIN = Path(sys.executable).parent


def sources() -> tuple[Path, Path]:
    base = SHARED if (SHARED / "train.jsonl.gz").is_file() else DEMO
    return base / "train.jsonl.gz", base / "validation.jsonl.gz"


def make_labelled(rows: int, parquet: Path, fasttext_txt: Path, seed: int = 1) -> None:
    """`rows` labelled titles spliced within their category (see the module docstring)."""
    from meli.dataset import load_labelled
    from meli.tokenizer import normalize_title

    split = load_labelled(sources()[0])
    titles = split.titles.to_pylist()
    cats = split.categories.to_numpy(zero_copy_only=False)
    words = [t.split() for t in titles]
    order = np.argsort(cats, kind="stable")
    starts = np.searchsorted(cats[order], cats)
    ends = np.searchsorted(cats[order], cats, side="right")
    rng = np.random.default_rng(seed)
    writer = None
    with open(fasttext_txt, "w", encoding="utf-8") as ft:
        for start in range(0, rows, 250_000):
            n = min(250_000, rows - start)
            first = rng.integers(0, len(titles), n)
            partner = order[starts[first] + (rng.random(n) * (ends[first] - starts[first])).astype(np.int64)]
            out = [" ".join(words[a][: (len(words[a]) + 1) // 2] + words[b][len(words[b]) // 2 :])
                   for a, b in zip(first, partner)]
            batch = pa.table({"title": pa.array(out, pa.string()), "category": pa.array(cats[first], pa.string())})
            writer = writer or pq.ParquetWriter(parquet, batch.schema)
            writer.write_table(batch, row_group_size=100_000)
            ft.writelines(f"__label__{c} {' '.join(normalize_title(t))}\n" for t, c in zip(out, cats[first]))
    writer.close()


@dataclass
class Run:
    seconds: float
    peak_rss: int  # bytes, whole process tree
    returncode: int
    stderr: str
    stages: dict[str, tuple[float, int]] = field(default_factory=dict)  # stage -> (seconds, peak RSS)


STAGE_MARKS = (  # a log line -> the stage that starts there
    (re.compile(r"ensemble member (\d+) of"), lambda m: f"member {m.group(1)}"),
    (re.compile(r"distilling one student"), lambda m: "student"),
    (re.compile(r"refit the student|refit on train \+ validation"), lambda m: "refit"),
)


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> Run:
    """Run `cmd` (in `cwd`), polling the RSS of its process tree every 0.1 s; stages from its stderr."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    stage, marks, lines = "start-up and encoding", [], []
    peaks: dict[str, int] = {}
    lock = threading.Lock()

    def read_stderr():
        nonlocal stage
        for line in proc.stderr:
            lines.append(line)
            for pattern, name in STAGE_MARKS:
                m = pattern.search(line)
                if m:
                    with lock:
                        marks.append((stage, time.perf_counter()))
                        stage = name(m)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
        except psutil.Error:
            rss = 0
        with lock:
            peaks[stage] = max(peaks.get(stage, 0), rss)
        time.sleep(0.1)
    reader.join()
    end = time.perf_counter()
    marks.append((stage, end))
    stages, begin = {}, t0
    for name, at in marks:
        seconds = stages.get(name, (0.0, 0))[0] + at - begin
        stages[name] = (seconds, peaks.get(name, 0))
        begin = at
    return Run(end - t0, max(peaks.values(), default=0), proc.returncode, "".join(lines), stages)


FASTTEXT_CHILD = """
import sys, fasttext
fasttext.train_supervised(input=sys.argv[1], dim=100, epoch=1, lr=1.0, wordNgrams=2, thread=2, verbose=0)
"""


# the epoch line meli-train writes: "<fit> epoch   1  train loss ...  val balanced acc B  (S s, N titles/s)"
EPOCH_LINE = re.compile(r"epoch +1 .*val balanced acc ([0-9.]+) +\(([0-9.]+)s, ([0-9,]+) titles/s\)")


# the fit's line: "<fit>: batches of N titles (learning rates xF), float32|bfloat16 arithmetic"
BATCH_LINE = re.compile(r"batches of (\d+) titles \(learning rates x[0-9.]+\), (\w+) arithmetic")


def batch_and_arithmetic(stderr: str) -> str:
    """"2,048 titles in bfloat16": the batch and arithmetic of the first fit a run logged."""
    m = BATCH_LINE.search(stderr)
    return f"{int(m[1]):,} titles in {m[2]}" if m else "not logged"


def epoch_figures(stderr: str) -> tuple[float, float, float]:
    """(seconds, titles/s, validation balanced accuracy) of the first epoch a run logged."""
    m = EPOCH_LINE.search(stderr)
    if m is None:
        return float("nan"), float("nan"), float("nan")
    return float(m[2]), float(m[3].replace(",", "")), float(m[1])


def config_file(folder: Path, name: str, version: Path = ROOT, **changes) -> Path:
    """train/configs/mlp.toml (of the version laid out in `version`) with top-level keys changed."""
    text = (version / "train" / "configs" / "mlp.toml").read_text()
    for key, value in changes.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if not n:
            text = f"{key} = {value}\n" + text
    tomllib.loads(text)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


# an earlier version's command line (the entry point's name changed over time)
CHILD = "import sys, meli.train.cli as c; sys.argv[0] = 'meli-train'; (getattr(c, 'entry', None) or c.main)()"


def meli_train(config: Path, train: Path, validation: Path, work: Path, version: Path | None = None) -> Run:
    """`meli-train` as installed, or (`version`) the one laid out in that folder, run from `work`
    (`python -c` puts its working folder first on the path, not this repository)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "TMPDIR": str(work)}
    command = [str(BIN / "meli-train")]
    if version is not None:
        env["PYTHONPATH"] = str(version)
        command = [sys.executable, "-c", CHILD]
    return run_measured([*command, "--config", str(config), "--train", str(train), "--validation", str(validation),
                         "--experiment", f"scale-{train.stem}"], env, cwd=work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500000,2000000")
    ap.add_argument("--skip-recipe", action="store_true", help="only fastText and one member's epoch")
    ap.add_argument("--no-refit-sizes", default="", help="sizes at which the recipe runs without its refit stage "
                    "(the refit is the student's stage again on train + validation)")
    ap.add_argument("--repeats", type=int, default=1, help="fastText and one member's epoch this many times at each "
                    "size, alternating (the table gives the median and the range: this machine's times vary by "
                    "tens of percent from one run to the next)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the data and runs (default: a temporary one)")
    ap.add_argument("--previous", default=None, help="a git revision: its one member's epoch runs too, "
                    "alternating with this version's and fastText's")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="meli-train-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    one_epoch = config_file(work, "one-member-epoch", epochs=1, members=1, refit="false")
    recipe = config_file(work, "recipe-one-epoch-per-stage", epochs=1)
    recipe_no_refit = config_file(work, "recipe-one-epoch-per-stage-no-refit", epochs=1, refit="false")
    no_refit = {int(s) for s in args.no_refit_sizes.split(",") if s}
    validation = sources()[1]
    rows, detail = [], []
    gib = 2**30
    # a warm-up run first, untimed: numba's compiled kernels are cached from then on, as on a
    # user's second run (the first run after a kernel changes compiles it, tens of seconds)
    warm = work / "warm-up-20000.parquet"
    if not warm.is_file():
        make_labelled(20_000, warm, work / "warm-up-20000.txt")
    if (run := meli_train(one_epoch, warm, validation, work)).returncode:
        sys.exit(f"the warm-up run failed:\n{run.stderr[-3000:]}")
    previous = previous_epoch = None
    if args.previous:
        from bench.score_speed import checkout

        previous = work / f"previous-{args.previous}"
        if not previous.is_dir():
            checkout(args.previous, previous)
        previous_epoch = config_file(work, "previous-one-member-epoch", previous, epochs=1, members=1, refit="false")
        if (run := meli_train(previous_epoch, warm, validation, work, previous)).returncode:
            sys.exit(f"the warm-up run of {args.previous} failed:\n{run.stderr[-3000:]}")
    for n in sizes:
        parquet, txt = work / f"train-{n}.parquet", work / f"train-{n}.txt"
        if not parquet.is_file():
            print(f"making {n:,} labelled titles", file=sys.stderr)
            make_labelled(n, parquet, txt)
        pairs, earlier = [], []
        for _ in range(args.repeats):  # alternating, so that a slow spell of the machine hits both
            ft = run_measured([sys.executable, "-c", FASTTEXT_CHILD, str(txt)])
            one = meli_train(one_epoch, parquet, validation, work)
            before = meli_train(previous_epoch, parquet, validation, work, previous) if previous else None
            for name, run in (("fastText", ft), ("meli one member epoch", one), (args.previous, before)):
                if run is not None and run.returncode:
                    sys.exit(f"{name} failed at {n:,} titles:\n{run.stderr[-3000:]}")
            pairs.append((ft, one, epoch_figures(one.stderr)))
            if before is not None:
                earlier.append((before, epoch_figures(before.stderr)))
            print(f"{n:,}: fastText {ft.seconds:.1f}s {ft.peak_rss / gib:.2f} GiB; one member epoch {one.seconds:.1f}s "
                  f"{one.peak_rss / gib:.2f} GiB" + (f"; {args.previous}: {before.seconds:.1f}s" if before else ""),
                  file=sys.stderr)
        line = {"titles": n, "fasttext_s": [ft.seconds for ft, _, _ in pairs],
                "fasttext_rss": max(ft.peak_rss for ft, _, _ in pairs), "member_s": [one.seconds for _, one, _ in pairs],
                "member_rss": max(one.peak_rss for _, one, _ in pairs), "epoch_s": [e[0] for _, _, e in pairs],
                "titles_per_s": [e[1] for _, _, e in pairs], "member_bacc": pairs[0][2][2],
                "member_batch": batch_and_arithmetic(pairs[0][1].stderr),
                "ratio": [one.seconds / ft.seconds for ft, one, _ in pairs]}
        if earlier:
            line.update(previous_s=[b.seconds for b, _ in earlier], previous_epoch_s=[e[0] for _, e in earlier],
                        previous_rss=max(b.peak_rss for b, _ in earlier), previous_bacc=earlier[0][1][2],
                        previous_ratio=[b.seconds / ft.seconds for (b, _), (ft, _, _) in zip(earlier, pairs)])
        if not args.skip_recipe:
            full = meli_train(recipe_no_refit if n in no_refit else recipe, parquet, validation, work)
            if full.returncode:
                sys.exit(f"the recipe failed at {n:,} titles:\n{full.stderr[-3000:]}")
            line.update(recipe_s=full.seconds, recipe_rss=full.peak_rss)
            detail += [f"| {n:,} | {stage} | {s:.0f} | {rss / gib:.2f} |" for stage, (s, rss) in full.stages.items()]
            if n in no_refit:
                detail.append(f"| {n:,} | refit | not run | - |")
            print(f"{n:,}: recipe {full.seconds:.0f}s {full.peak_rss / gib:.2f} GiB", file=sys.stderr)
        rows.append(line)
        page(args, rows, detail)


def spread(values: list[float], fmt: str = ".1f") -> str:
    """One run's figure, or the median of several and their range."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.median(values)), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def page(args, rows: list[dict], detail: list[str]) -> None:
    """Print the page (and write it with --write) for the sizes measured so far."""
    gib = 2**30
    table = ["| titles | fastText: s | fastText: peak RSS GiB | meli one member epoch: s | its peak RSS GiB | "
             "meli / fastText time | of which the epoch: s (titles/s) | default recipe, 1 epoch a stage: s | "
             "its peak RSS GiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['titles']:,} | {spread(r['fasttext_s'])} | {r['fasttext_rss'] / gib:.2f} | "
                     f"{spread(r['member_s'])} | {r['member_rss'] / gib:.2f} | {spread(r['ratio'], '.2f')} | "
                     f"{spread(r['epoch_s'])} ({np.median(r['titles_per_s']):,.0f}) | "
                     + (f"{r['recipe_s']:.0f} | {r['recipe_rss'] / gib:.2f} |" if "recipe_s" in r else "- | - |"))
    body = [
        f"{machine()}.",
        "",
        "Labelled titles spliced within their category from the shared training titles; validation: the shared "
        "validation file. Times include start-up, reading and encoding; peak RSS is the whole process tree's. "
        "The one member's run is the shipped MLP with `members = 1`, `epochs = 1`, `refit = false`: batches "
        "grow with the titles (`max_batch_size`) and the layers run in bfloat16 from `bf16_min_batch` titles "
        "where the CPU has it (`precision = \"auto\"`): batches of "
        + ", ".join(f"{r['member_batch']} at {r['titles']:,}" for r in rows) + ". Its epoch (training on every title, then validation) is what it logged; "
        "the rest of its time is start-up, reading, vocabulary, encoding, calibration and MLflow. "
        + (f"fastText and the one member ran {args.repeats} times at each size, alternating: each cell is the "
           "median, the range in brackets; the time ratio is the median of each pair's. " if args.repeats > 1 else "")
        + "Validation balanced accuracy after that one epoch: "
        + ", ".join(f"{r['member_bacc']:.4f} at {r['titles']:,}" for r in rows) + ".",
        "",
        *table,
    ]
    if any("previous_s" in r for r in rows):
        body += ["", f"The same one member's epoch by the version before ({args.previous}), in the same rounds "
                 "(fastText, this version, that one, in turn):", "",
                 f"| titles | this version: s | {args.previous}: s | this version / fastText | {args.previous} / "
                 f"fastText | this version's epoch: s | {args.previous}'s epoch: s | {args.previous}: peak RSS GiB | "
                 f"{args.previous}: validation balanced accuracy |",
                 "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        body += [f"| {r['titles']:,} | {spread(r['member_s'])} | {spread(r['previous_s'])} | {spread(r['ratio'], '.2f')} | "
                 f"{spread(r['previous_ratio'], '.2f')} | {spread(r['epoch_s'])} | {spread(r['previous_epoch_s'])} | "
                 f"{r['previous_rss'] / gib:.2f} | {r['previous_bacc']:.4f} |" for r in rows if "previous_s" in r]
    if detail:
        body += ["", "The default recipe stage by stage (one epoch per stage):", "",
                 "| titles | stage | s | peak RSS GiB |", "|---:|---|---:|---:|", *detail]
    publish(args.write, "One member's epoch against fastText" if args.skip_recipe else "Training at scale", body)


if __name__ == "__main__":
    main()
