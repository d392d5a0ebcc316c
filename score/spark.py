"""`meli-score --engine spark`: the scoring core inside Spark, for catalogs beyond one machine.

The same function over Arrow record batches as `meli-score` (`meli.scorer.Scorer`) runs in
``DataFrame.mapInArrow``, on a classic session (local, standalone, YARN, Kubernetes) or through
Spark Connect (``--spark-remote``). ``model.onnx`` is shipped to the executors once
(``SparkContext.addFile``, or ``addArtifacts`` through Connect), each Python worker opens one
onnxruntime session and keeps it for every batch and task it runs, the input's other columns
pass through, and the output is a folder of Parquet part files or a table (``table:NAME``).
What can be checked before a task runs is: the model loads and agrees with itself, the title
column exists and holds strings, the output can be written; those fail with one line, like
the local engine. See docs/cluster.md.

On a cluster (the extras ``meli-categorizer[cpu]`` or ``[gpu]`` installed on the executors)::

    spark-submit --files model.onnx "$(python -c 'import meli.score.spark as s; print(s.__file__)')" \\
        s3://lake/catalog/ s3://lake/scored/ --model model.onnx
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from meli.errors import InputError, MeliError, OutputError, SettingError, first_line
from meli.formats import checked_parts, is_text
from meli.onnx_model import load_onnx_model
from meli.scorer import Scorer, ScoreConfig
from meli.score.changes import PreviousNight
from meli.score.job import ScoreJob, ScoreSummary, check_job, finish_report
from meli.tally import Tally

try:
    from pyspark.accumulators import AccumulatorParam
except ImportError:  # pyspark is the [spark] extra; the engine says so when asked for
    AccumulatorParam = None

log = logging.getLogger(__name__)


class TallyParam(AccumulatorParam if AccumulatorParam is not None else object):
    """A Spark accumulator of per-partition tallies, keyed by partition: a task that runs
    again (a retry, a speculative copy) replaces its partition's tally instead of adding to it."""

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, a: dict, b: dict) -> dict:
        a.update(b)
        return a


@functools.lru_cache(maxsize=4)
def _worker_scorer(model_path: str, options: ScoreConfig, provider: str) -> Scorer:
    """One scorer (one onnxruntime session) per Python worker and model, kept for every
    batch and every task the worker runs."""
    return Scorer(load_onnx_model(model_path, provider=provider), options)


def _partition_scorer(model_name: str, options: ScoreConfig, provider: str, counting: bool) -> Scorer:
    """The worker's scorer for this task; `counting`: with a fresh tally of its own (a worker
    runs one task at a time)."""
    from pyspark import SparkFiles

    scorer = _worker_scorer(SparkFiles.get(model_name), options, provider)
    scorer.tally = Tally(len(scorer.labels)) if counting else None
    return scorer


def _score_partition(batches: Iterator[pa.RecordBatch], model_name: str, options: ScoreConfig, provider: str,
                     schema: pa.Schema, tallies=None) -> Iterator[pa.RecordBatch]:
    from pyspark import TaskContext

    scorer = _partition_scorer(model_name, options, provider, counting=tallies is not None)
    for batch in batches:
        out = scorer.score_batch(batch)
        yield pa.RecordBatch.from_arrays(out.columns, schema=schema)
    if tallies is not None:
        tallies.add({TaskContext.get().partitionId(): scorer.tally.to_dict()})


_OUR_ERROR = re.compile(rf"(?:{'|'.join(c.__name__ for c in MeliError.__subclasses__())}): (.+)")


def spark_reason(e: BaseException) -> str:
    """The one line that says why Spark failed: a worker's own meli error if there is one, else
    the Java exception's message, else the exception's first line."""
    text = str(e)
    ours = _OUR_ERROR.findall(text)
    if ours:
        return ours[-1].strip()[:300]
    java = getattr(e, "java_exception", None)
    if java is not None:
        try:
            cause = java
            while cause.getCause() is not None:  # the root cause says what went wrong
                cause = cause.getCause()
            return first_line(Exception(str(cause.getMessage() or cause.toString())))[:300]
        except Exception:  # noqa: BLE001 - a dead gateway
            pass
    return first_line(e)[:300]


def spark_session(master: str | None = None, remote: str | None = None, quiet: bool = False):
    """A Spark Connect session to `remote` (``sc://host:port``); else the active session
    (spark-submit's), or a classic one on `master` (default: spark-submit's, else local[*]).
    With `quiet`, the JVM this starts writes its stderr (start-up warnings, log4j, Java stack
    traces) to a temporary file instead of ours; a start-up failure quotes its reason from it."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as e:
        raise SettingError("engine", "spark needs pyspark: pip install 'meli-categorizer[spark]'") from e
    if remote is not None:
        return _connect(remote)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # local mode: the workers must run this Python, which has onnxruntime and this package
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("meli-score")
    from pyspark import SparkConf

    if master is not None or not SparkConf().contains("spark.master"):
        builder = builder.master(master or "local[*]")
    with _jvm_stderr(quiet) as jvm_log:
        try:
            session = builder.config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false").getOrCreate()
        except Exception as e:  # noqa: BLE001 - Java's errors: a bad master URL, no Java
            reason = _jvm_reason(jvm_log) or spark_reason(e)
            raise SettingError("spark_master", f"{master or 'local[*]'}: Spark did not start ({reason})") from e
    session.sparkContext.setLogLevel("ERROR")
    return session


@contextlib.contextmanager
def _jvm_stderr(quiet: bool):
    """With `quiet`: our stderr (file descriptor 2, which the JVM inherits) sent to a temporary
    file while the JVM starts, then given back; the JVM keeps writing to that file. Yields it."""
    if not quiet:
        yield None
        return
    log = tempfile.TemporaryFile()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        yield log
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _jvm_reason(log) -> str | None:
    """The message of the exception that stopped the JVM, from its captured stderr."""
    if log is None:
        return None
    log.seek(0)
    text = log.read().decode("utf-8", "replace")
    found = re.findall(r"Exception in thread \"main\" [\w.$]+: (.+)", text) or re.findall(r"\n[\w.$]+Exception: (.+)", text)
    return found[-1].strip()[:300] if found else None


def _connect(remote: str):
    """A Spark Connect session, refused in seconds when nothing answers (the client itself
    retries with back-off for minutes)."""
    from urllib.parse import urlparse

    from pyspark.sql import SparkSession

    parsed = urlparse(remote)
    if parsed.scheme != "sc" or not parsed.hostname:
        raise SettingError("spark_remote", f"{remote}: not a Spark Connect URL (sc://HOST:PORT)")
    try:
        socket.create_connection((parsed.hostname, parsed.port or 15002), timeout=5).close()
    except OSError as e:
        raise SettingError("spark_remote", f"{remote}: no Spark Connect server answers ({e.strerror or e})") from e
    try:
        session = SparkSession.builder.remote(remote).getOrCreate()
        session.version  # the first call over the wire
    except Exception as e:  # noqa: BLE001 - gRPC's errors
        raise SettingError("spark_remote", f"{remote}: Spark Connect failed ({spark_reason(e)})") from e
    return session


def is_connect(spark) -> bool:
    """A Spark Connect session (no SparkContext: no addFile, no accumulators)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def gpu_profile():
    """Stage-level scheduling for ``--provider cuda``: every scoring task asks for one GPU
    (Spark >= 4.0; the executors must offer ``gpu`` resources, see docs/cluster.md)."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    return ResourceProfileBuilder().require(TaskResourceRequests().resource("gpu", 1.0)).build


TABLE = "table:"  # INPUT or OUTPUT "table:NAME": a table of the session's catalog


def _table_name(spec: str) -> str:
    name = spec[len(TABLE):].strip()
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*){0,2}", name):
        raise SettingError("engine", f"{spec}: not a table name (table:NAME or table:DB.NAME)")
    return name


def _quoted(name: str) -> str:
    return ".".join(f"`{part}`" for part in name.split("."))


def _ship_model(spark, model_path: Path) -> str:
    """Make the model file readable on the executors (`SparkFiles.get(name)`); returns its
    name there. Shipped under a name made of its hash, so two models of the same file name
    never collide in one session, and shipping the same model again is a no-op."""
    from meli.onnx_model import file_sha256

    shipped = _shipping_folder() / f"meli-{file_sha256(model_path)[:16]}.onnx"
    if not shipped.exists():
        shutil.copyfile(model_path, shipped)
    if is_connect(spark):
        try:
            spark.addArtifacts(str(shipped), file=True)
        except Exception as e:  # noqa: BLE001 - already added to this session: the same bytes, by its name
            if "exist" not in str(e).lower():
                raise
    else:
        spark.sparkContext.addFile(str(shipped))
    return shipped.name


@functools.lru_cache(maxsize=1)
def _shipping_folder() -> Path:
    """One folder per process for the files shipped to executors: they must stay readable
    while the session lives (new executors fetch them), and go when the process ends."""
    import atexit
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="meli-spark-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def score_with_spark(input_path: str, output_path: str, job: ScoreJob = ScoreJob(), *, master: str | None = None,
                     remote: str | None = None) -> ScoreSummary:
    """Score a Parquet dataset (a file or a folder of part files, local or on a lake's file
    system) or a table (``table:NAME``) into a folder of Parquet part files or a table at
    `output_path`, replacing any previous one only once the new one is complete. Runs on a
    classic session (`master`) or through Spark Connect (`remote`). With ``job.report``, the
    nightly report is computed from per-partition tallies merged on the driver (no data
    collected) and written as the local engine writes it."""
    started = time.perf_counter()
    if job.route_low is not None:
        raise SettingError("route_low", "is not available with the Spark engine (filter the output on probability)")
    if master is not None and remote is not None:
        raise SettingError("spark_remote", "give a master URL or a Spark Connect URL, not both")
    table_out = _table_name(output_path) if str(output_path).startswith(TABLE) else None
    if table_out is None:
        _check_output_folder(str(output_path))
    outputs = [] if table_out else [Path(str(output_path).removeprefix("file://"))]
    model_path = check_job(job, Path(input_path), outputs)
    local_model = load_onnx_model(model_path, provider="cpu")
    scorer = Scorer(local_model, job.options)  # fails here, before any task
    with contextlib.ExitStack() as nights:  # last night is read before tonight may write over it
        last_night = nights.enter_context(PreviousNight(job.previous, job.id_column)) if job.previous is not None else None
        return _score_with_spark(input_path, output_path, model_path, local_model, scorer, job, master, remote,
                                 table_out, last_night, started)


def _score_with_spark(input_path, output_path, model_path, local_model, scorer, job: ScoreJob, master, remote,
                      table_out, last_night, started) -> ScoreSummary:
    spark = spark_session(master, remote, job.quiet)
    connect = is_connect(spark)
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    options, provider = job.options, job.provider
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(job.batch_size))
    # Hive partition columns as strings, as the local engine reads them (meli.formats.partition_schema)
    spark.conf.set("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
    df = _read_input(spark, str(input_path))
    in_schema = to_arrow_schema(df.schema)
    title = options.title_column
    if title not in in_schema.names:
        raise SettingError("title_column", f"no title column {title!r}; the input has: {', '.join(in_schema.names)}")
    if not is_text(in_schema.field(title).type):
        raise InputError(f"title column {title!r} holds {in_schema.field(title).type}, not strings")
    out_schema = scorer.output_schema(in_schema).remove_metadata()  # checks --keep-columns and names too
    name, opts = _ship_model(spark, model_path), options
    profile = {"profile": gpu_profile()} if provider == "cuda" else {}
    tallies = spark.sparkContext.accumulator({}, TallyParam()) if job.report is not None and not connect else None
    scored = df.mapInArrow(lambda it: _score_partition(it, name, opts, provider, out_schema, tallies),
                           from_arrow_schema(out_schema), **profile)
    try:
        rows = _write_table(scored, table_out) if table_out else _write_replacing(scored, str(output_path))
        if job.report is not None and connect:
            # Spark Connect has no accumulators: a second job over the input sends back one tally a partition
            tallies_by_part = _collect_tallies(df, name, opts, provider, profile)
    except MeliError:
        raise
    except Exception as e:  # noqa: BLE001 - a task failed: Py4J/Java/gRPC errors, or a worker's Python error
        raise InputError(f"{input_path}: the Spark job failed ({spark_reason(e)})") from e
    figures, files = None, ()
    unscored = below = None
    if job.report is not None:
        parts = tallies_by_part if connect else tallies.value
        tally = functools.reduce(Tally.merge, (Tally.from_dict(t) for t in parts.values()),
                                 Tally(len(local_model.card.labels)))
        changes = (last_night.compare(Path(str(output_path).removeprefix("file://")), local_model.sha256)
                   if last_night is not None else None)
        figures, files = finish_report(job, tally, local_model, input_path, output_path,
                                       "spark-connect" if connect else "spark", changes)
        unscored, below = tally.rows - tally.scored, tally.below
    where = remote if connect else spark.sparkContext.master
    return ScoreSummary(rows, time.perf_counter() - started, str(output_path), f"Spark {where}", unscored=unscored,
                        below=below or 0, min_probability=options.min_probability, report=figures, report_files=files)


def _read_input(spark, input_path: str):
    if input_path.startswith(TABLE):
        table = _table_name(input_path)
        try:
            return spark.read.table(_quoted(table))
        except Exception as e:  # noqa: BLE001 - AnalysisException: no such table
            raise InputError(f"{input_path}: no such table in the Spark catalog ({spark_reason(e)})") from e
    if Path(input_path).exists():  # a local input: the local engine's checks (table formats, stray files, drift)
        checked_parts(Path(input_path))
    try:
        df = spark.read.parquet(input_path)
        df.schema  # Spark Connect resolves lazily: ask now, so a bad input fails here
        return df
    except Exception as e:  # noqa: BLE001 - Spark's AnalysisException and Java errors
        raise InputError(f"{input_path}: not a readable Parquet dataset ({first_line(e)[:200]})") from e


def _tally_partition(batches: Iterator[pa.RecordBatch], model_name: str, options: ScoreConfig,
                     provider: str) -> Iterator[pa.RecordBatch]:
    import json

    from pyspark import TaskContext

    scorer = _partition_scorer(model_name, options, provider, counting=True)
    for batch in batches:
        scorer.score_batch(batch)
    yield pa.record_batch({"partition": pa.array([TaskContext.get().partitionId()], pa.int32()),
                           "tally": pa.array([json.dumps(scorer.tally.to_dict())], pa.string())})


def _collect_tallies(df, model_name: str, options: ScoreConfig, provider: str, profile: dict) -> dict:
    import json

    rows = df.mapInArrow(lambda it: _tally_partition(it, model_name, options, provider),
                         "partition int, tally string", **profile).collect()
    return {r["partition"]: json.loads(r["tally"]) for r in rows}


def _check_output_folder(output: str) -> None:
    local = "://" not in output or output.startswith("file://")
    if not local:
        return
    target = Path(output.removeprefix("file://"))
    if not target.parent.is_dir():
        raise OutputError(f"{target}: folder {target.parent} does not exist")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is a file; --engine spark writes a folder of Parquet parts")


def _write_table(df, table: str) -> int:
    """Write a table of the catalog as one job into a new table, then put it in the old one's
    place: a failed job leaves the previous table as it was."""
    spark = df.sparkSession
    staging = f"{table}__meli_{uuid.uuid4().hex[:8]}"
    try:
        df.write.format("parquet").saveAsTable(_quoted(staging))
        spark.sql(f"DROP TABLE IF EXISTS {_quoted(table)}")
        spark.sql(f"ALTER TABLE {_quoted(staging)} RENAME TO {_quoted(table)}")
    finally:
        spark.sql(f"DROP TABLE IF EXISTS {_quoted(staging)}")
    return spark.read.table(_quoted(table)).count()


def _write_replacing(df, output: str) -> int:
    """Write to a sibling folder, then swap it in: a failed job leaves the previous output.
    (Local paths; on object stores Spark's own committer is what makes a job's output whole.)"""
    local = "://" not in output or output.startswith("file://")
    if not local:
        df.write.mode("overwrite").parquet(output)
        return df.sparkSession.read.parquet(output).count()
    target = Path(output.removeprefix("file://"))
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        df.write.parquet(str(staging))
        rows = sum(_parquet_rows(p) for p in sorted(staging.glob("*.parquet")))
        if target.exists():
            old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
        return rows
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows
