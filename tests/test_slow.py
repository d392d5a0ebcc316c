"""A catalog-sized run: rows, order and memory hold at scale.

`make test` runs it at ``MELI_SLOW_ROWS`` rows (1,000,000 by default, a size CI has time
for); `make test-slow` runs it at 10,000,000, the size of a nightly catalog's partition.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from meli.dataset import load_labelled
from meli.demo_catalog import DEMO_DIR

ROWS = int(os.environ.get("MELI_SLOW_ROWS", "1000000"))
MAX_RSS_BYTES = 1 << 30  # the bound at default settings


@pytest.mark.slow
def test_a_catalog_scores_in_bounded_memory_with_every_row_in_order(exported, tmp_path):
    pool = load_labelled(DEMO_DIR / "train.jsonl.gz").titles
    rng = np.random.default_rng(0)
    big = tmp_path / "catalog.parquet"
    chunk = 1_000_000
    with pq.ParquetWriter(big, pa.schema([("id", pa.int64()), ("title", pa.string())])) as w:
        for start in range(0, ROWS, chunk):
            n = min(chunk, ROWS - start)
            titles = pool.take(pa.array(rng.integers(0, len(pool), n)))
            w.write_table(pa.table({"id": np.arange(start, start + n), "title": titles}), row_group_size=100_000)
    out = tmp_path / "scored.parquet"
    # a wrapper process whose only child is meli-score: its children's peak RSS is the run's
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    done = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "meli.score", str(big), str(out),
                           "--model", str(exported["mlp"]), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --quiet
    peak = int(done.stdout.split()[-1]) * 1024  # Linux reports KiB
    assert peak < MAX_RSS_BYTES, f"peak RSS {peak / 2**20:.0f} MiB"
    f = pq.ParquetFile(out)
    assert f.metadata.num_rows == ROWS
    expected = 0
    for batch in f.iter_batches(columns=["id", "category"], batch_size=1_000_000):
        ids = batch.column("id").to_numpy()
        assert np.array_equal(ids, np.arange(expected, expected + len(ids)))
        assert batch.column("category").null_count == 0
        expected += len(ids)
    assert expected == ROWS
