"""meli-export: the export stage's command."""

from __future__ import annotations

from pathlib import Path

import click

from meli import __version__
from meli.command import console_script, one_line, reports_errors, setup_logging
from meli.onnx_model import DEFAULT_MODEL
from meli.tracking import REGISTERED_NAME


@click.command()
@click.version_option(__version__, prog_name="meli-export", message="%(prog)s %(version)s")
@click.option("--experiment", default=None, help="MLflow experiment to take the best run from; default: that of the most recent run.")
@click.option("--run-id", default=None, help="Export this MLflow run's checkpoint instead of the best one.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="Export this checkpoint file instead.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path(DEFAULT_MODEL),
              show_default=True, help="Where model.onnx is written (atomically).")
@click.option("--parity-data", type=click.Path(dir_okay=False), default=None,
              help="Titles for the parity check; default: the run's validation file, else the demo's.")
@click.option("--parity-rows", type=click.IntRange(min=1), default=None, help="Check only the first N titles (default: all).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="onnxruntime provider for the parity check.")
@click.option("--register-name", default=REGISTERED_NAME, show_default=True, help="MLflow registered model name.")
@click.option("--no-register", is_flag=True, help="Do not log the export to MLflow or register it.")
@click.option("--table-precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="An MLP's scoring table: fp16 (half the file, sums exact in any order; the parity check reports "
                   "how far its probabilities move from the checkpoint's) or fp32 (within 1e-5 of the checkpoint, twice "
                   "the bytes, float products).")
@click.option("--quantize/--no-quantize", default=True, show_default=True,
              help="int8 matrix products with a scale per title (mean-pooling MLPs, float16 table): faster on CPUs, and a title's "
                   "answer still depends on the title alone; the parity check reports how far its probabilities "
                   "and categories move from the checkpoint's. --no-quantize: float matrix products (the "
                   "table keeps its --table-precision).")
@click.option("--force", is_flag=True, help="Move the serving alias @champion to this export whatever the gate says "
              "(the gate moves it only from a model of the same data that scores no better on this export's "
              "validation titles).")
@click.option("--check", is_flag=True, help="Only check parity of an existing --output against its checkpoint.")
@click.option("--quiet", is_flag=True, help="Only errors and the final line.")
@reports_errors(interrupted=lambda kw: f"{kw['output']} left as it was")
def main(experiment, run_id, checkpoint, output, parity_data, parity_rows, provider, register_name, no_register,
         table_precision, quantize, force, check, quiet):
    """Export the best checkpoint to one ONNX file and prove torch/onnxruntime parity.

    \b
    Example:
        meli-export --experiment meli-meli-es --output artifacts/model.onnx
        meli-export --check --output artifacts/model.onnx     # parity only
        meli-export --no-quantize --output artifacts/model-fp32.onnx   # float matrix products
    """
    setup_logging(quiet)
    from meli.export.export import calibration_summary, choose_checkpoint, export_model, recheck
    from meli.export.parity import require_parity

    if check:
        report = recheck(output, checkpoint=checkpoint, parity_data=parity_data, parity_rows=parity_rows, provider=provider)
        click.echo(report.summary())
        require_parity(report)
        return
    if output == Path(DEFAULT_MODEL):  # the project's own artifacts/ folder may not exist yet; a named folder must
        output.parent.mkdir(parents=True, exist_ok=True)
    chosen = choose_checkpoint(experiment, run_id, checkpoint)
    outcome = export_model(chosen, output, parity_data=parity_data, parity_rows=parity_rows, provider=provider,
                           register_as=None if no_register else register_name, precision=table_precision,
                           quantize=quantize, force=force)
    click.echo(f"wrote {one_line(str(outcome.output))} (run {outcome.run_id or '-'}); {outcome.report.summary()}")
    click.echo(calibration_summary(chosen.checkpoint))
    if outcome.registered:
        click.echo(f"registered as models:/{outcome.registered.version} (an MLflow pyfunc model); "
                   f"{outcome.registered.reason}")


entry = console_script(main)  # the installed `meli-export`
