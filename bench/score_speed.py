"""`make bench`: meli-score throughput and peak memory on a generated catalog.

Builds a Parquet catalog of N rows (titles resampled from the real validation titles when
``../shared/data`` exists, else from the embedded demo catalog), then runs ``meli-score`` on it
in a child process — the way a nightly job runs it — and reports rows/s end to end (read,
tokenize, infer, write) and the child's peak RSS. Tokenizer and model throughput alone are
reported too, each fed as meli-score feeds it: the tokenizer batches of ``--batch-size``
titles, the model length-sorted batches of 1,024 pre-encoded titles.

    python bench/score_speed.py --model artifacts/model.onnx --rows 1000000 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meli.formats import read_table  # noqa: E402
from meli.onnx_model import load_onnx_model  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "meli-es" / "validation.jsonl.gz"
DEMO = ROOT / "meli" / "resources" / "demo" / "catalog.jsonl.gz"


def make_catalog(path: Path, rows: int, seed: int = 0) -> str:
    source = REAL if REAL.is_file() else DEMO
    titles = read_table(source)["title"].combine_chunks()
    titles = titles.filter(titles.is_valid())
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, 500_000):
        n = min(500_000, rows - start)
        batch = pa.table({"id": pa.array(np.arange(start, start + n)), "title": titles.take(pa.array(rng.integers(0, len(titles), n)))})
        writer = writer or pq.ParquetWriter(path, batch.schema)
        writer.write_table(batch, row_group_size=100_000)
    writer.close()
    return str(source)


def run_measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd`, polling its own peak RSS (VmHWM).

    Not getrusage(RUSAGE_CHILDREN): a forked child's ru_maxrss starts from the parent's
    high-water mark, so it would count this script's memory, not meli-score's.
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_kib = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak_kib / 1024


def model_alone(model, enc, rows: int = 50_000, batch: int = 1024) -> float:
    order = np.argsort(enc.lengths[:rows], kind="stable")
    t = time.perf_counter()
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        model.predict(np.ascontiguousarray(enc.ids[chunk, : max(1, int(enc.lengths[chunk].max()))]))
    return len(order) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="artifacts/model.onnx")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16_384)
    ap.add_argument("--provider", default="auto")
    args = ap.parse_args()

    model = load_onnx_model(args.model, provider="cpu", threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog.parquet"
        source = make_catalog(catalog, args.rows)
        titles = pq.read_table(catalog, columns=["title"])["title"].combine_chunks().slice(0, 200_000)
        tok = model.card.tokenizer()
        tok.encode_batch(titles.slice(0, 1_000))  # warm-up: kernels, regexes
        t = time.perf_counter()  # in batches of meli-score's size, as meli-score tokenizes
        for start in range(0, len(titles), args.batch_size):
            tok.encode_batch(titles.slice(start, args.batch_size))
        tok_rate = len(titles) / (time.perf_counter() - t)
        enc = tok.encode_batch(titles.slice(0, 50_000))  # what model_alone feeds the model
        model_rate = model_alone(model, enc)

        out = Path(tmp) / "scored.parquet"
        cmd = [sys.executable, "-m", "score", str(catalog), str(out), "--model", args.model, "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), "--provider", args.provider, "--quiet"]
        t = time.perf_counter()
        proc, peak_mib = run_measured(cmd)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(proc.stderr)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; threads {args.threads}")
    members = f", ensemble of {model.card.members}" if model.card.members > 1 else ""
    print(f"model: {args.model} ({model.card.model_kind}{members}, {len(model.card.labels)} categories); titles from {source}")
    print(f"tokenizer alone: {tok_rate:,.0f} titles/s (mean {enc.lengths.mean():.0f} ids/title)")
    print(f"model alone (onnxruntime CPU, {args.threads} threads): {model_rate:,.0f} titles/s")
    print(f"meli-score end to end: {args.rows:,} rows in {seconds:.1f}s = {args.rows / seconds:,.0f} rows/s "
          f"(process start and model load included); peak RSS of meli-score {peak_mib:,.0f} MiB")
    print(proc.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
