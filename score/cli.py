"""meli-score: the nightly batch scorer's command."""

from __future__ import annotations

import click

from meli import __version__
from meli.command import console_script, one_line, reports_errors, setup_logging
from meli.scorer import ScoreConfig
from meli.score.job import ScoreJob
from meli.score.report import EXIT_DRIFT, DriftRules

MAX_BATCH = 1 << 24  # rows: far beyond what memory allows for titles, well inside Arrow's and onnxruntime's limits
MAX_THREADS = 1024


@click.command()
@click.version_option(__version__, prog_name="meli-score", message="%(prog)s %(version)s")
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.argument("output_path", metavar="OUTPUT", type=click.Path())
@click.option("--model", default=ScoreJob.model, show_default=True,
              help="model.onnx path, or an MLflow registry URI: models:/meli-categorizer/3, models:/meli-categorizer@latest-export.")
@click.option("--title-column", default=ScoreConfig.title_column, show_default=True, help="Column holding the titles.")
@click.option("--keep-columns", default=None, help="Comma-separated input columns to pass through (default: all but the title).")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also write the K best categories and their probabilities as lists.")
@click.option("--min-probability", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Below this probability, write a null category (the probability is kept): the rows a team "
                   "reviews. Pick it from the coverage table meli-export prints.")
@click.option("--route-low", type=click.Path(dir_okay=False), default=None,
              help="Write the rows below --min-probability (and those without a category) to this second file "
                   "instead, with the model's category as a suggestion.")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=ScoreJob.batch_size, show_default=True,
              help="Rows read, tokenized and written at a time; peak memory grows with it.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default=ScoreJob.provider, show_default=True,
              help="onnxruntime provider; auto takes CUDA when it really works, else the CPU.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help="CPU threads for onnxruntime and Arrow (default: all cores).")
@click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True,
              help="local: this machine's cores. spark: Spark's mapInArrow over a Parquet dataset or table:NAME (pip "
                   "install 'meli-categorizer[spark]'); OUTPUT is then a folder of Parquet part files, or table:NAME.")
@click.option("--spark-master", default=None, help="With --engine spark: the master URL (default: spark-submit's, "
              "else local[*]).")
@click.option("--spark-remote", envvar="SPARK_REMOTE", default=None, metavar="sc://HOST:PORT",
              help="With --engine spark: run through this Spark Connect server instead (default: $SPARK_REMOTE).")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write the nightly report to this .html (self-contained) and its figures to the .json beside it: "
                   "unscored rows, unknown words, title lengths, the category mix against the training data (PSI, "
                   "Jensen-Shannon), confidence against validation, and a drift verdict.")
@click.option("--drift-threshold", type=click.FloatRange(min=0, min_open=True), default=DriftRules.category_psi,
              show_default=True, help="With --report: the category PSI above which the run counts as drifted.")
@click.option("--min-estimated-accuracy", type=click.FloatRange(0, 1), default=None,
              help="With --report: the run also counts as drifted when its estimated accuracy (from the calibrated "
                   "probabilities, no labels) is below this.")
@click.option("--previous", "previous", type=click.Path(), default=None, metavar="LAST_OUTPUT",
              help="With --report: last night's output (file or folder); the report says how many ids changed category "
                   "since, which are new or gone, and whether the model file changed.")
@click.option("--id-column", default="id", show_default=True, help="With --previous: the column that identifies a row.")
@click.option("--max-changed-share", type=click.FloatRange(0, 1), default=None,
              help="With --previous: the run also counts as drifted when more than this share of ids changed category.")
@click.option("--fail-on-drift", is_flag=True,
              help=f"With --report: exit with code {EXIT_DRIFT} when the run drifted (the output is still written).")
@click.option("--track", is_flag=True,
              help="With --report: log the run to MLflow (experiment meli-scoring): the report's figures as metrics, "
                   "the report as an artifact, the model version as a tag.")
@click.option("--quiet", is_flag=True, help="Nothing on stderr unless it fails (one Error: line) or drifts with "
              "--fail-on-drift (one Drift: line): no progress bar, logs or summary line.")
@reports_errors(interrupted=lambda kw: f"{kw['output_path']} left as it was"
                + (f", {kw['route_low']} too" if kw.get("route_low") else ""),
                out_of_memory="; lower --batch-size (memory follows it)")
def main(input_path, output_path, model, title_column, keep_columns, top_k, min_probability, route_low, batch_size,
         provider, threads, engine, spark_master, spark_remote, report, drift_threshold, min_estimated_accuracy, previous,
         id_column, max_changed_share, fail_on_drift, track, quiet):
    """Predict the category of every title in INPUT and write OUTPUT.

    INPUT is Parquet (a file or a folder of parts), JSON Lines (.jsonl, .jsonl.gz) or CSV
    (with a header naming a title column, like the challenge's id,title,language).
    OUTPUT is Parquet, or JSON Lines when its name ends in .jsonl (.jsonl.gz: gzipped): one
    row per input row, in input order, with the input's other columns, category and
    probability. "-" as INPUT reads JSON Lines from stdin; as OUTPUT writes them to stdout.

    \b
    Example:
        meli-score catalog.parquet scored.parquet --model artifacts/model.onnx --keep-columns id --top-k 3
    """
    setup_logging(quiet)
    from meli.score.score import score_file

    needs_report = [flag for flag, given in (("fail-on-drift", fail_on_drift), ("track", track),
                                             ("min-estimated-accuracy", min_estimated_accuracy is not None),
                                             ("previous", previous is not None)) if given]
    if needs_report and report is None:
        raise click.UsageError(f"--{needs_report[0]} needs --report")
    if max_changed_share is not None and previous is None:
        raise click.UsageError("--max-changed-share needs --previous")
    keep = tuple(c.strip() for c in keep_columns.split(",") if c.strip()) if keep_columns is not None else None
    options = ScoreConfig(title_column=title_column, keep_columns=keep, top_k=top_k, min_probability=min_probability)
    rules = DriftRules(category_psi=drift_threshold, min_estimated_accuracy=min_estimated_accuracy,
                       max_changed_share=max_changed_share)
    if track:  # a store that cannot take the run fails now, before the catalog is scored
        from meli.tracking import check_store

        check_store()
    if engine == "local":
        ctx = click.get_current_context()
        if ctx.get_parameter_source("spark_remote") == click.core.ParameterSource.COMMANDLINE or spark_master:
            raise click.UsageError("--spark-master and --spark-remote need --engine spark")
        tables = [p for p in (input_path, output_path) if p.startswith("table:")]
        if tables:
            raise click.UsageError(f"{tables[0]}: tables of a Spark catalog need --engine spark")
    job = ScoreJob(model=model, options=options, batch_size=batch_size, provider=provider, threads=threads,
                   route_low=route_low, report=report, drift_rules=rules, previous=previous, id_column=id_column,
                   quiet=quiet)
    if engine == "spark":
        if route_low is not None:
            raise click.UsageError("--route-low is not available with --engine spark (filter the output on probability)")
        from meli.score.spark import score_with_spark

        summary = score_with_spark(input_path, output_path, job, master=spark_master, remote=spark_remote)
    else:
        summary = score_file(input_path, output_path, job)
    if not quiet:
        click.echo(one_line(summary.line()), err=True)
    if track:
        from meli.score.report import track_report

        tracked = track_report(summary.report, summary.report_files)
        if not quiet:
            click.echo(f"tracked as MLflow run {tracked}", err=True)
    if fail_on_drift and summary.report["drift"]:
        click.echo("Drift: " + "; ".join(summary.report["drift_reasons"]), err=True)
        raise click.exceptions.Exit(EXIT_DRIFT)


entry = console_script(main)  # the installed `meli-score`
