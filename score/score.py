"""`meli-score INPUT OUTPUT`: stream a file through the scoring core into an output file.

Four stages overlap: a reader thread decodes input batch n+2, a tokenizer thread encodes
batch n+1 (compiled, without the GIL), the calling thread runs onnxruntime on batch n, and a
writer thread encodes output batch n-1. The queues between them hold two batches each, so
memory is bounded by the batch size, never by the file size. Output goes to a temporary file
beside the target, renamed at the end: an error or a kill leaves any previous output untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import shutil
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from meli.errors import InputError, MeliError, OutputError, SettingError, first_line
from meli.formats import (AtomicWriter, arrow_file, batch_writer, detect_format, iter_batches, json_lines,
                          parquet_parts)
from meli.onnx_model import load_onnx_model
from meli.scorer import Scorer
from meli.score.changes import PreviousNight
from meli.score.job import STDIO, ScoreJob, ScoreSummary, check_job, check_target, finish_report
from meli.tally import Tally

log = logging.getLogger(__name__)

_DONE = object()


class _Background:
    """Run `work` in a thread; exceptions come back to the caller on `join`."""

    def __init__(self, work: Callable[[], None]):
        self.error: BaseException | None = None

        def run() -> None:
            try:
                work()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def _prefetch(batches: Iterator[pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        finally:
            q.put(_DONE)

    reader = _Background(produce)
    try:
        while (item := q.get()) is not _DONE:
            yield item
    finally:
        stop.set()
        while reader.thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                time.sleep(0.01)
        reader.join()


class _OutputFile:
    """Parquet, or JSON Lines (gzipped when the name ends in .gz) when the output name says
    so, written in a background thread to `path`; errors name `target`, the user's file."""

    def __init__(self, path: Path, schema: pa.Schema, target: Path):
        self.format = "jsonl" if target == STDIO else detect_format(target)
        self.path = path
        self.target = target
        self.schema = schema
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.worker = _Background(self._drain)

    def _drain(self) -> None:
        try:
            if self.target == STDIO:  # JSON Lines on stdout, flushed batch by batch
                while (b := self.queue.get()) is not _DONE:
                    sys.stdout.writelines(json_lines(b))
                    sys.stdout.flush()
                return
            gzipped = self.target.name.lower().endswith(".gz")
            with batch_writer(self.path, self.schema, self.format, gzipped) as write:
                while (b := self.queue.get()) is not _DONE:
                    write(b)
        except (OSError, pa.ArrowException) as e:
            raise OutputError(f"{self.target}: cannot write ({_reason(e)})") from e

    def put(self, batch: pa.RecordBatch) -> None:
        while True:
            if not self.worker.thread.is_alive():
                self.worker.join()  # raises the writer's error
                raise OutputError(f"{self.path}: writer stopped")
            try:
                self.queue.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue

    def _stop(self) -> None:
        if self.worker.thread.is_alive():
            self.queue.put(_DONE)
        self.worker.thread.join()

    def close(self) -> None:
        """Finish writing; raises the writer's error, if it had one."""
        self._stop()
        self.worker.join()

    def abort(self) -> None:
        """Stop the writer after a failure elsewhere; the caller's error is the one that counts."""
        self._stop()


def _reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)


def _count_rows(path: Path) -> int | None:
    if detect_format(path) != "parquet":
        return None
    try:
        return sum(pq.ParquetFile(arrow_file(p.path)).metadata.num_rows for p in parquet_parts(path))
    except (pa.ArrowException, OSError):
        return None  # the reader will report it with the file's name




class _Stdout:
    """The `AtomicWriter` stand-in for OUTPUT "-": a stream has nothing to rename."""

    target = path = STDIO

    def commit(self) -> None:
        sys.stdout.flush()


@contextlib.contextmanager
def _spooled(inp: Path) -> Iterator[Path]:
    """stdin ("-") or a pipe (a FIFO, /dev/stdin) copied to a temporary file: the readers read
    a file more than once (the JSON Lines schema pass, the scan that names a bad line), which
    a pipe cannot be. Errors that name the copy name `inp` instead."""
    name = "stdin.jsonl" if inp == STDIO else inp.name
    shown = "-" if inp == STDIO else str(inp)
    try:
        tmp_dir = tempfile.TemporaryDirectory(prefix="meli-input-")
    except OSError as e:
        raise OutputError(f"{shown}: cannot make a temporary folder to hold the input ({e.strerror or e}); set TMPDIR "
                          "to a folder with room") from e
    with tmp_dir as tmp:
        path = Path(tmp) / name
        try:
            with open(path, "wb") as f:
                if inp == STDIO:
                    shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
                else:
                    with open(inp, "rb") as pipe:
                        shutil.copyfileobj(pipe, f, 1 << 20)
        except OSError as e:  # a full or read-only temporary file system
            raise OutputError(f"{shown}: cannot hold the input in {tempfile.gettempdir()} ({e.strerror or e}); set "
                              "TMPDIR to a folder with room") from e
        try:
            yield path
        except SettingError:
            raise
        except MeliError as e:
            shown = "-" if inp == STDIO else str(inp)
            raise type(e)(*[a.replace(str(path), shown) if isinstance(a, str) else a for a in e.args]) from e


def _is_pipe(inp: Path) -> bool:
    """A path that can be read once only: a FIFO or a character device (/dev/stdin)."""
    try:
        mode = inp.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _check_output(out: Path, inp: Path, what: str = "the output") -> None:
    check_target(out, inp, what)
    if out != STDIO and detect_format(out) == "csv":
        raise OutputError(f"{out}: CSV output is not supported; use .parquet or .jsonl")


def score_file(input_path: str | os.PathLike, output_path: str | os.PathLike, job: ScoreJob = ScoreJob()) -> ScoreSummary:
    """Score INPUT into OUTPUT as `job` says. With ``job.route_low``, the rows under
    ``options.min_probability`` (and those with no category at all) go to that second file
    instead, with the model's category as a suggestion; both files are written atomically,
    in input order. With ``job.report`` (``R.html``), the nightly report is written to R.html
    and R.json once the output is in place (`meli.score.report`); the summary carries its
    figures and drift verdict. With ``job.previous`` (last night's output) the report also
    says what changed since, by ``job.id_column`` (`meli.score.changes`); it is read before
    the run, so tonight may write over it."""
    inp, out = Path(input_path), Path(output_path)
    low = Path(job.route_low) if job.route_low is not None else None
    _check_output(out, inp)
    if inp != STDIO:
        if not inp.exists():
            raise InputError(f"{inp}: no such file or directory")
        detect_format(inp)
    if low is not None:
        if not job.options.min_probability > 0:
            raise SettingError("route_low", "needs min_probability, the probability under which rows are routed")
        _check_output(low, inp, "the low-probability file")
        if low == STDIO or low.resolve() == out.resolve():
            raise SettingError("route_low", f"{low} must be a file other than the output")
    if job.threads:
        pa.set_cpu_count(job.threads)
    model_path = check_job(job, inp, [out] if low is None else [out, low])
    onnx_model = load_onnx_model(model_path, provider=job.provider, threads=job.threads)
    tally = Tally(len(onnx_model.card.labels)) if job.report is not None else None
    with contextlib.ExitStack() as nights:
        last_night = nights.enter_context(PreviousNight(job.previous, job.id_column)) if job.previous is not None else None
        return _score(inp, out, low, onnx_model, job, tally, last_night, input_path, output_path)


def _score(inp, out, low, onnx_model, job: ScoreJob, tally, last_night, input_path, output_path) -> ScoreSummary:
    options = job.options
    # routing: low rows keep the model's category, as a suggestion in the second file
    scorer = Scorer(onnx_model, dataclasses.replace(options, null_low=low is None), tally=tally)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if inp == STDIO or _is_pipe(inp):
            inp = stack.enter_context(_spooled(inp))
        total = _count_rows(inp)
        targets = [_Stdout() if path == STDIO else stack.enter_context(AtomicWriter(path))
                   for path in ([out] if low is None else [out, low])]
        batches = _prefetch(iter_batches(inp, batch_size=job.batch_size, string_columns=(options.title_column,)))
        tokenized = _prefetch(scorer.tokenize(b) for b in batches)
        writers: list[_OutputFile] = []
        # a bar only on a terminal (None): a job's log file gets the summary line, not bar updates
        bar = tqdm(total=total, unit="rows", unit_scale=True, desc="scoring", disable=True if job.quiet else None, smoothing=0.1)
        try:
            for item in tokenized:
                scored = scorer.predict_low(item)
                if not writers:  # one at a time, each listed as soon as its thread runs: an abort stops every one
                    for t in targets:
                        writers.append(_OutputFile(t.path, scored.batch.schema, t.target))
                if low is None:
                    writers[0].put(scored.batch)
                else:
                    is_low = pa.array(scored.low)
                    writers[0].put(scored.batch.filter(pc.invert(is_low)))
                    writers[1].put(scored.batch.filter(is_low))
                bar.update(item.batch.num_rows)
            if not writers:  # no rows: no output at all (an empty file would pass for a scored one)
                raise InputError(f"{input_path}: no rows to score")
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        finally:
            bar.close()
        for t in targets:
            t.commit()
    stats = scorer.stats
    figures, files = None, ()
    if tally is not None:
        changes = last_night.compare(out, onnx_model.sha256) if last_night is not None else None
        figures, files = finish_report(job, tally, onnx_model, input_path, output_path, "local", changes)
    return ScoreSummary(stats.rows, time.perf_counter() - started, str(out),
                        f"provider {onnx_model.provider}; model {onnx_model.source}", unscored=stats.unscored,
                        below=stats.below, min_probability=options.min_probability, routed_to=low, report=figures,
                        report_files=files)
