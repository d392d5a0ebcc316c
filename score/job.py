"""One meli-score run, whichever engine runs it: its settings (each default defined here
once), the checks made before any row is read, the report made from its tally, and the line
that sums it up. The local engine (`meli.score.score`) and Spark (`meli.score.spark`) differ
only in how they read, score and write rows between those."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from meli.errors import OutputError, SettingError
from meli.formats import NOT_DATA, check_name_length
from meli.onnx_model import DEFAULT_MODEL, DEFAULT_PROVIDER, OnnxModel, Provider
from meli.scorer import BATCH_ROWS, ScoreConfig
from meli.score.report import DriftRules, build_report, registered_version, report_paths, summary_words, write_report
from meli.tally import Tally
from meli.tracking import resolve_model_uri

STDIO = Path("-")  # INPUT or OUTPUT "-": JSON Lines on stdin / stdout


@dataclass(frozen=True)
class ScoreJob:
    """What one run is asked to do, beyond its input and output."""

    model: str = DEFAULT_MODEL  # a model.onnx path, or models:/NAME/VERSION, models:/NAME@ALIAS
    options: ScoreConfig = field(default_factory=ScoreConfig)
    batch_size: int = BATCH_ROWS  # rows read, tokenized and scored together: memory follows it
    provider: Provider = DEFAULT_PROVIDER
    threads: int | None = None  # onnxruntime's and Arrow's threads; None: every core
    route_low: str | os.PathLike | None = None  # rows under options.min_probability go to this file (local engine)
    report: str | os.PathLike | None = None  # R.html (R.json beside it): the nightly report
    drift_rules: DriftRules = field(default_factory=DriftRules)
    previous: str | os.PathLike | None = None  # last night's output, compared by id_column in the report
    id_column: str = "id"
    quiet: bool = False  # no progress bar


def check_job(job: ScoreJob, inp: Path, outputs: list[Path]) -> Path:
    """The checks both engines make before reading a row: the report can be written at the
    end and names no output, a comparison with last night has a report and a file to go in,
    and no output or report would overwrite the model file. Returns the model file's path
    (a registry URI resolved to its local copy)."""
    if job.report is not None:
        if Path(job.report) == STDIO:
            raise SettingError("report", "names the report's file (R.html; R.json is written beside it), not -")
        for path in report_paths(job.report):
            check_target(path, inp, "the report")
            if not path.parent.is_dir():
                raise OutputError(f"{path}: folder {path.parent} does not exist")
            if any(path.resolve() == out.resolve() for out in outputs if out != STDIO):
                raise SettingError("report", f"{path} is also an output of this run; name the report otherwise")
    if job.previous is not None and (job.report is None or not outputs or STDIO in outputs[:1]):
        raise SettingError("previous", "needs --report and an OUTPUT file or folder: the comparison goes into the report")
    model_path = resolve_model_uri(job.model)
    if model_path.exists():
        named = [(out, "the output") for out in outputs[:1]] + [(out, "the low-probability file") for out in outputs[1:]]
        named += [(p, "the report") for p in (report_paths(job.report) if job.report is not None else [])]
        for path, what in named:
            if path != STDIO and path.exists() and path.resolve() == model_path.resolve():
                raise OutputError(f"{path}: {what} would overwrite the model file")
    return model_path


def check_target(out: Path, inp: Path, what: str) -> None:
    """What any file this run writes must not be: too long a name, the input itself, inside
    the input folder (the next run would read it), or a folder."""
    if out == STDIO:
        return
    check_name_length(out)
    if out.exists() and inp.exists() and inp.resolve() == out.resolve():
        raise OutputError(f"{out}: {what} would overwrite the input")
    if inp != STDIO and inp.is_dir() and out.resolve().is_relative_to(inp.resolve()) \
            and not any(n.startswith(NOT_DATA) for n in out.resolve().relative_to(inp.resolve()).parts):
        raise OutputError(f"{out}: {what} would be inside the input folder {inp}, and the next run would read it "
                          "as input; write it elsewhere")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; name an output file")


def finish_report(job: ScoreJob, tally: Tally, model: OnnxModel, input_path, output_path, engine: str,
                  changes: dict | None) -> tuple[dict, tuple[Path, ...]]:
    """The report's figures from the run's merged tally, written to ``job.report``."""
    figures = build_report(tally, model, str(input_path), str(output_path), rules=job.drift_rules,
                           min_probability=job.options.min_probability, registered=registered_version(job.model),
                           engine=engine, changes=changes)
    return figures, write_report(figures, job.report)


@dataclass(frozen=True)
class ScoreSummary:
    """What a run did, for its one summary line (both engines)."""

    rows: int
    seconds: float
    output: str
    where: str  # "provider CPUExecutionProvider; model m.onnx" or "Spark local[2]"
    unscored: int | None = None  # rows without a category; None where the engine did not count them
    below: int = 0  # scored rows under min_probability
    min_probability: float = 0.0
    routed_to: Path | None = None
    report: dict | None = None  # the nightly report's figures (`meli.score.report`), when asked for
    report_files: tuple[Path, ...] = ()

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        unscored = ("" if self.unscored is None else
                    f"{self.unscored:,} without a category (null/empty title or no known token); ")
        low = ""
        if self.min_probability > 0 and self.unscored is not None:
            where = f"routed to {self.routed_to} with the rows without a category" if self.routed_to else "category left null"
            low = f"{self.below:,} below probability {self.min_probability:g} ({where}); "
        return (f"scored {self.rows:,} rows in {self.seconds:.1f}s ({self.rows_per_second:,.0f} rows/s); {unscored}{low}"
                f"{self.where}; wrote {self.output}" + summary_words(self.report, self.report_files))
