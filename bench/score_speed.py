"""`make bench`: scoring throughput and peak memory, stage by stage, against fastText.

Builds a Parquet catalog of N rows (``id``, ``title``) of real titles recombined into new
ones (the first half of one title's words + the second half of another's, as
`meli.train.distill.recombine_titles` does) from ``../shared/data/meli-es`` when it is there, else
from the embedded demo data. Then runs each stage in a child process of its own, as a
nightly job would run it, polling the child's peak RSS, and prints one Markdown table:

- read only: the Parquet file in meli-score's batches (the floor under everything);
- tokenize only: read + the compiled tokenizer, in the encoding the model reads;
- model only: onnxruntime on pre-encoded titles in meli-score's length-sorted
  runs (encoding not timed);
- ``meli-score`` end to end: read, tokenize, infer, write Parquet; start-up and model load included;
- the fastText pipeline on every core, as a user with this machine would run it: a fastText
  model trained on the same labelled titles (word bigrams, dim 100, 25 epochs, lr 1.0), one
  process per core (``--threads``), each reading its share of the row groups and writing its
  own Parquet part: read, normalise, predict (``f.multilinePredict``, which runs on one
  core; ``predict()`` fails under NumPy 2), write. Its time is the last process's; its
  memory the sum of the processes' peaks;

and the ratio of meli-score to that pipeline. ``--compare NAME=FILE`` (repeatable) scores the
same catalog end to end with other model files (another export of the same run, say) through
this meli-score; ``--previous REV --previous-model FILE`` with the ``meli-score`` of an earlier version
of this repository (a git revision, unpacked with ``git archive``) and its model, in the same run.

    python bench/score_speed.py --model artifacts/model.onnx --rows 2000000 --threads 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data" / "meli-es"
DEMO = ROOT / "meli" / "resources" / "demo"
BATCH = 16_384


def labelled_sources() -> list[Path]:
    if (SHARED / "train.jsonl.gz").is_file():
        return [SHARED / "train.jsonl.gz", SHARED / "validation.jsonl.gz"]
    return [DEMO / "train.jsonl.gz", DEMO / "validation.jsonl.gz"]


def make_catalog(path: Path, rows: int, seed: int = 0) -> str:
    from meli.dataset import load_labelled
    from meli.train.distill import recombine_titles

    splits = [load_labelled(p) for p in labelled_sources()]
    titles = pa.concat_arrays([s.titles for s in splits])
    labels = pc.dictionary_encode(pa.concat_arrays([s.categories for s in splits])).indices.to_numpy()
    writer = None
    for start in range(0, rows, 500_000):
        n = min(500_000, rows - start)
        batch = pa.table({"id": pa.array(np.arange(start, start + n)),
                          "title": recombine_titles(titles, labels, n, seed + start)})
        writer = writer or pq.ParquetWriter(path, batch.schema)
        writer.write_table(batch, row_group_size=100_000)
    writer.close()
    return ", ".join(os.path.relpath(p, ROOT) for p in labelled_sources())


# ----------------------------------------------------------------------------- stages (child processes)
def _read(catalog: str):
    from meli.formats import iter_batches

    return iter_batches(Path(catalog), batch_size=BATCH, string_columns=("title",))


def _read_share(catalog: str, share: int, shares: int):
    """The row groups share, share + shares, ... of the catalog (one process's part)."""
    parquet = pq.ParquetFile(catalog)
    groups = list(range(share, parquet.num_row_groups, shares))
    return parquet.iter_batches(batch_size=BATCH, row_groups=groups) if groups else iter(())


def stage_read(args) -> int:
    return sum(b.num_rows for b in _read(args.catalog))


def stage_tokenize(args) -> int:
    from meli.onnx_model import load_onnx_model

    card = load_onnx_model(args.model, provider="cpu").card
    tokenizer = card.tokenizer()
    n = 0
    for b in _read(args.catalog):
        tokenizer.encode_batch(b.column("title"), compact=card.compact)
        n += b.num_rows
    return n


def stage_model(args) -> int:
    """onnxruntime alone: the first `model_rows` titles encoded and cut into the length-sorted
    runs meli-score feeds it (untimed), then scored."""
    from meli.onnx_model import load_onnx_model
    from meli.scorer import ScoreConfig, length_runs

    model = load_onnx_model(args.model, provider=args.provider, threads=args.threads)
    tokenizer = model.card.tokenizer()
    encoded: list[np.ndarray] = []
    n = 0
    for b in _read(args.catalog):
        enc = tokenizer.encode_batch(b.column("title"), compact=model.card.compact)
        order = np.argsort(enc.lengths, kind="stable")
        encoded.extend(enc.rows(run) for run in length_runs(order, enc.lengths[order], ScoreConfig().inference_ids))
        n += b.num_rows
        if n >= args.model_rows:
            break
    model.predict(encoded[0][:64])  # warm-up
    t = time.perf_counter()
    for ids in encoded:
        model.predict(ids)
    print(f"seconds {time.perf_counter() - t}", file=sys.stderr)
    return n


def stage_fasttext(args) -> int:
    """A fastText user's pipeline: read, normalise (vectorised), predict, write Parquet."""
    import fasttext

    model = fasttext.load_model(args.fasttext_model)
    writer = None
    n = 0
    for b in _read_share(args.catalog, args.share, args.shares):
        s = pc.utf8_normalize(pc.utf8_lower(pc.fill_null(b.column("title"), "")), form="NFKD")
        s = pc.replace_substring_regex(pc.replace_substring_regex(s, "[\\x{0300}-\\x{036f}]", ""), "[^a-z0-9]+", " ")
        labels, probs = model.f.multilinePredict(s.to_pylist(), 1, 0.0, "strict")
        out = pa.record_batch({
            "id": b.column("id"),
            "category": pa.array([lab[0].removeprefix("__label__") if lab else None for lab in labels], pa.string()),
            "probability": pa.array([p[0] if len(p) else None for p in probs], pa.float32()),
        })
        writer = writer or pq.ParquetWriter(args.output, out.schema, compression="zstd")
        writer.write_batch(out)
        n += b.num_rows
    if writer is not None:
        writer.close()
    return n


STAGES = {"read": stage_read, "tokenize": stage_tokenize, "model": stage_model, "fasttext": stage_fasttext}


def run_stage(args) -> None:
    t = time.perf_counter()
    n = STAGES[args.stage](args)
    print(f"rows {n} seconds {time.perf_counter() - t}")


# ----------------------------------------------------------------------------- the parent

def checkout(revision: str, folder: Path) -> Path:
    """This repository's files at `revision`, unpacked into `folder` and laid out as installed
    (``pyproject.toml``'s package-dir: ``meli.score`` is the top-level ``score/``), so that
    ``python -m meli.score`` runs that version with this interpreter's packages."""
    import tomllib

    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        sys.exit(f"--previous {revision}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    dirs = tomllib.loads((folder / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    for package, source in dirs.items():
        target = folder / package.replace(".", "/")
        if not target.exists():
            target.symlink_to(folder / source, target_is_directory=True)
    return folder


def run_measured(cmd: list[str]) -> tuple[str, float, float]:
    """Run `cmd`; (its stdout, wall seconds, peak RSS in MiB polled from /proc VmHWM).

    Not getrusage(RUSAGE_CHILDREN): a forked child's ru_maxrss starts from the parent's
    high-water mark, so it would count this script's memory, not the child's.
    """
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = _poll_peak(proc)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    return out + err, seconds, peak


def run_measured_together(cmds: list[list[str]]) -> tuple[list[str], float, float]:
    """Run `cmds` at once; (their outputs, wall seconds until the last ends, the sum of their
    peak RSS in MiB)."""
    t = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    peaks = {p.pid: 0 for p in procs}
    while any(p.poll() is None for p in procs):
        for p in procs:
            peaks[p.pid] = max(peaks[p.pid], _vm_hwm_kib(p.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - t
    outputs = []
    for p, c in zip(procs, cmds):
        out, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"{' '.join(c)} failed:\n{err}")
        outputs.append(out + err)
    return outputs, seconds, sum(peaks.values()) / 1024


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _poll_peak(proc: subprocess.Popen) -> float:
    """Wait for `proc`, polling its peak RSS (VmHWM) in MiB."""
    peak_kib = 0
    while proc.poll() is None:
        peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
        time.sleep(0.02)
    return peak_kib / 1024


def train_fasttext(path: Path, labelled: Path | None = None) -> float:
    import fasttext

    from meli.dataset import load_labelled
    from meli.tokenizer import normalize_title

    train = load_labelled(labelled or labelled_sources()[0])
    text = path.with_suffix(".txt")
    text.write_text("".join(f"__label__{c} {' '.join(normalize_title(t))}\n"
                            for t, c in zip(train.titles.to_pylist(), train.categories.to_pylist())))
    t = time.perf_counter()
    model = fasttext.train_supervised(str(text), dim=100, epoch=25, lr=1.0, wordNgrams=2, verbose=0,
                                      thread=os.cpu_count() or 1, seed=0)
    seconds = time.perf_counter() - t
    model.save_model(str(path))
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="artifacts/model.onnx")
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--provider", default="cpu", help="onnxruntime provider for the model and meli-score rows")
    ap.add_argument("--model-rows", type=int, default=500_000, help="titles the model-only row scores")
    ap.add_argument("--skip", nargs="*", default=[], choices=["fasttext"], help="leave the fastText row out")
    ap.add_argument("--write", type=Path, help="also write the table to this Markdown file (make bench: docs/results-speed.md)")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=FILE",
                    help="also score the catalog end to end with this model file (repeatable)")
    ap.add_argument("--previous", help="a git revision of this repository (a commit, a tag): its meli-score joins the table")
    ap.add_argument("--previous-model", type=Path, help="the model file for --previous")
    ap.add_argument("--fasttext-train", type=Path, default=None,
                    help="the labelled titles fastText trains on (default: the shared training titles); "
                         "the model's own training file when it has other categories")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # a child's work
    ap.add_argument("--catalog", help=argparse.SUPPRESS)
    ap.add_argument("--fasttext-model", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--share", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--shares", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        return run_stage(args)

    from meli.onnx_model import load_onnx_model

    card = load_onnx_model(args.model, provider="cpu").card
    me = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--threads", str(args.threads),
          "--provider", args.provider]
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog.parquet"
        source = make_catalog(catalog, args.rows)
        size_mb = Path(args.model).stat().st_size / 1e6

        def child(stage: str, what: str, note: str, *extra: str) -> None:
            out, seconds, peak = run_measured([*me, "--stage", stage, "--catalog", str(catalog), *extra])
            fields = dict(zip(out.split()[::2], out.split()[1::2]))
            n, timed = int(fields["rows"]), float(fields.get("seconds", seconds))
            rows.append((what, n / timed, peak, note))
            print(f"{what}: {n / timed:,.0f} titles/s, peak RSS {peak:,.0f} MiB", file=sys.stderr)

        child("read", "read only (Parquet, batches of 16,384)", "the floor under everything")
        child("tokenize", f"tokenize only ({card.encoding} ids, one thread)", "read included")
        child("model", f"model only (onnxruntime {args.provider}, {args.threads} threads)",
              f"{min(args.rows, args.model_rows):,} pre-encoded titles in meli-score's length-sorted runs",
              "--model-rows", str(args.model_rows))
        def meli_score(what: str, model: str, note: str, *extra: str) -> float:
            scored = Path(tmp) / "scored.parquet"
            out, seconds, peak = run_measured([sys.executable, "-m", "meli.score", str(catalog), str(scored), "--model", model,
                                               "--threads", str(args.threads), "--provider", args.provider, "--quiet", *extra])
            rate = args.rows / seconds
            rows.append((what, rate, peak, note))
            print(f"{what}: {rate:,.0f} titles/s, peak RSS {peak:,.0f} MiB", file=sys.stderr)
            return rate

        ours = meli_score("**meli-score end to end**", args.model,
                          f"{card.matmuls} products, model file {size_mb:.1f} MB; start-up and model load included")
        report = meli_score("meli-score --report (the nightly report)", args.model,
                            "the same run, also writing the HTML and JSON report", "--report", str(Path(tmp) / "report.html"))
        for entry in args.compare:
            name, _, path = entry.partition("=")
            other = load_onnx_model(path, provider="cpu").card
            meli_score(f"meli-score, {name}", path,
                       f"{other.matmuls} products, model file {Path(path).stat().st_size / 1e6:.1f} MB")
        if args.previous:
            prev_out = Path(tmp) / "previous.parquet"
            prev_root = checkout(args.previous, Path(tmp) / "previous")
            cmd = [sys.executable, "-m", "meli.score", str(catalog), str(prev_out), "--model", str(args.previous_model.resolve()),
                   "--threads", str(args.threads), "--provider", args.provider, "--quiet"]
            env = {**os.environ, "PYTHONPATH": str(prev_root)}
            # a first run on a few rows compiles its tokenizer kernels into its own cache, as ours already are
            warm = Path(tmp) / "warm.parquet"
            pq.write_table(pq.ParquetFile(catalog).read_row_group(0).slice(0, 100), warm)
            subprocess.run([*cmd[:3], str(warm), str(Path(tmp) / "warm-out.parquet"), *cmd[5:]], cwd=prev_root, env=env,
                           capture_output=True, check=False)
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=prev_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            peak = _poll_peak(proc)
            if proc.returncode != 0:
                sys.exit(f"previous meli-score failed:\n{proc.stderr.read()}")
            rate = args.rows / (time.perf_counter() - t)
            rows.append((f"previous meli-score (version {args.previous})", rate, peak,
                         f"model file {args.previous_model.stat().st_size / 1e6:.0f} MB"))
            print(f"previous meli-score: {rate:,.0f} titles/s, peak RSS {peak:,.0f} MiB", file=sys.stderr)
        ratio = ""
        if "fasttext" not in args.skip:
            ft = Path(tmp) / "fasttext.bin"
            train_s = train_fasttext(ft, args.fasttext_train)
            ft_mb = ft.stat().st_size / 1e6
            cmds = [[*me, "--stage", "fasttext", "--catalog", str(catalog), "--fasttext-model", str(ft),
                     "--output", str(Path(tmp) / f"fasttext-{i}.parquet"), "--share", str(i), "--shares", str(args.threads)]
                    for i in range(args.threads)]
            outs, seconds, peak = run_measured_together(cmds)
            n = sum(int(dict(zip(o.split()[::2], o.split()[1::2]))["rows"]) for o in outs)
            rate = n / seconds
            rows.append((f"fastText pipeline, {args.threads} processes (one per core)", rate, peak,
                         f"model file {ft_mb:.0f} MB, trained in {train_s:.0f} s; memory: the processes' sum"))
            print(f"fastText x{args.threads}: {rate:,.0f} titles/s, peak RSS {peak:,.0f} MiB", file=sys.stderr)
            ratio = f"{ours / rate:.1f}x"
    lines = [f"{dt.date.today()}, {platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} cores; "
             f"{args.rows:,} recombined titles from {source}; model {os.path.relpath(args.model, ROOT)} ({card.model_kind}, "
             f"{card.encoding} ids, {card.precision} table, {card.matmuls} products, {len(card.labels)} categories)",
             "", "| stage | titles/s | peak RSS | note |", "|---|---|---|---|"]
    lines += [f"| {what} | {rate:,.0f} | {peak:,.0f} MiB | {note} |" for what, rate, peak, note in rows]
    if ratio:
        lines += ["", f"meli-score / fastText pipeline on {args.threads} cores: **{ratio}**"]
    lines += ["", f"`--report` costs {1 - report / ours:.1%} of meli-score's end-to-end rate (time per title "
              f"{ours / report - 1:+.1%})"]
    print("\n" + "\n".join(lines))
    if args.write:
        from results import write_results

        write_results(args.write, "Scoring speed and memory (`make bench`)", lines)


if __name__ == "__main__":
    main()
