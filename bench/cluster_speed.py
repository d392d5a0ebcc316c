"""`make bench-cluster`: meli-score's engines on one dataset, side by side.

Writes a Parquet dataset of N recombined real titles in four part files (as
`bench/score_speed.py` builds its catalog) and scores it, each run a ``meli-score`` process
of its own, start-up included: the local engine; ``--engine spark`` in ``local[2]``; on a
standalone cluster (a master and one worker on loopback, started from the installed pyspark);
and through a Spark Connect server (started the same way, running ``local[2]``). The clusters'
own start-up is not timed; the client's session start is. Every run must give every row.

    python bench/cluster_speed.py --model artifacts/model.onnx --rows 1000000 --write docs/results-cluster.md
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

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the loopback clusters the tests start

from score_speed import make_catalog  # noqa: E402
from spark_cluster import connect_server, standalone_cluster  # noqa: E402


def timed(args: list[str], rows: int, output: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "meli.score", *args, "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"meli-score {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    got = sum(pq.ParquetFile(p).metadata.num_rows for p in ([output] if output.is_file() else output.glob("*.parquet")))
    if got != rows:
        sys.exit(f"meli-score {' '.join(args)} wrote {got:,} rows of {rows:,}")
    return rows / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="artifacts/model.onnx")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--write", type=Path, help="also write the table to this Markdown file")
    args = ap.parse_args()
    model = str(Path(args.model).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        lake = t / "lake"
        lake.mkdir()
        source = make_catalog(t / "all.parquet", args.rows)
        table = pq.read_table(t / "all.parquet")
        for part, start in enumerate(range(0, args.rows, -(-args.rows // 4))):
            pq.write_table(table.slice(start, -(-args.rows // 4)), lake / f"part-{part:05d}.parquet")
        del table

        def run(what: str, out: str, *extra: str) -> None:
            rate = timed([str(lake), str(t / out), "--model", model, *extra], args.rows, t / out)
            rows.append((what, rate))
            print(f"{what}: {rate:,.0f} titles/s", file=sys.stderr)

        run("local engine (`meli-score`)", "local.parquet")
        run("`--engine spark --spark-master local[2]`", "spark-local", "--engine", "spark", "--spark-master", "local[2]")
        (t / "standalone").mkdir()
        with standalone_cluster(t / "standalone") as master:
            run("standalone cluster: a master and one 2-core worker on loopback", "spark-standalone",
                "--engine", "spark", "--spark-master", master)
        (t / "connect").mkdir()
        with connect_server(t / "connect") as remote:
            run("Spark Connect server (`local[2]`), `--spark-remote`", "spark-connect",
                "--engine", "spark", "--spark-remote", remote)
    lines = [f"{dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores; {args.rows:,} recombined titles "
             f"from {source} in four Parquet parts; model {os.path.relpath(model)}; each run a meli-score process, "
             "its start-up included (a cluster's own start-up not)", "",
             "| engine | titles/s |", "|---|---|"]
    lines += [f"| {what} | {rate:,.0f} |" for what, rate in rows]
    print("\n".join(lines))
    if args.write:
        from results import write_results

        write_results(args.write, "meli-score's engines on one machine (`make bench-cluster`)", lines)


if __name__ == "__main__":
    main()
