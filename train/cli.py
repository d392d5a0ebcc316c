"""meli-train: the training stage's command."""

from __future__ import annotations

from pathlib import Path

import click

from meli import __version__
from meli.command import console_script, reports_errors, setup_logging
from meli.dataset import DataFilter


@click.command()
@click.version_option(__version__, prog_name="meli-train", message="%(prog)s %(version)s")
@click.option("--config", "config_path", default=None,
              help="TOML settings: a file, or the name of a shipped one (mlp, cnn: train/configs/*.toml). "
                   "Default: mlp, the default model.")
@click.option("--data", default=None, help="Folder with train.* and validation.* files, or one labelled file "
              "(part is held out). Default: the embedded demo dataset.")
@click.option("--train", "train_path", default=None, help="Labelled training file (instead of --data).")
@click.option("--validation", "validation_path", default=None, help="Labelled validation file, with --train.")
@click.option("--model", type=click.Choice(["mlp", "cnn"]), default=None, help="Override the config's model.")
@click.option("--epochs", type=int, default=None, help="Override the config's epochs.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Override the device.")
@click.option("--seed", type=int, default=None, help="Override the random seed.")
@click.option("--members", type=click.IntRange(min=1), default=None,
              help="Override the config's ensemble size (1: a single model).")
@click.option("--language", "languages", multiple=True, help="Keep only rows of this language (repeatable).")
@click.option("--label-quality", "label_qualities", multiple=True, help="Keep only rows of this label_quality (repeatable).")
@click.option("--experiment", default=None, help="MLflow experiment; default: named after the data (meli-demo, meli-<folder>).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the checkpoint into this folder (it is always stored in the MLflow run, which "
                   "meli-export reads).")
@click.option("--resume", "resume", default=None, metavar="RUN_ID",
              help="Carry on an unfinished run (killed, or failed) from its last saved epoch, in the same MLflow run; "
                   "give the same data and settings it was started with.")
@click.option("--quiet", is_flag=True, help="No progress bars or info logs.")
@reports_errors(interrupted=lambda kw: "no checkpoint written; the MLflow run is marked FAILED, and "
                                    "meli-train --resume RUN_ID (the id in the log) carries it on",
                out_of_memory="; lower members, vocabulary.max_size or tokenizer.char_buckets in the config")
def main(config_path, data, train_path, validation_path, model, epochs, device, seed, members, languages, label_qualities,
         experiment, checkpoint_dir, resume, quiet):
    """Train a title classifier and log the run to MLflow.

    \b
    Example:
        meli-train --config mlp --data ../shared/data/meli-es
    """
    setup_logging(quiet)
    from meli.train.config import load_config
    from meli.train.train import resolve_data, run_training

    config = load_config(config_path, model=model, epochs=epochs, device=device, seed=seed, members=members)
    source = resolve_data(data, train_path, validation_path)
    outcome = run_training(config, source, data_filter=DataFilter(tuple(languages), tuple(label_qualities)),
                           experiment=experiment, checkpoint_dir=checkpoint_dir, quiet=quiet, resume=resume)
    best = outcome.result.checkpoint.metrics
    if config.members > 1:
        members = ", ".join(f"{best[f'member{i}_val_balanced_accuracy']:.4f}" for i in range(1, config.members + 1))
        what = f"ensemble of {config.members} (members {members})"
        if "teachers_val_balanced_accuracy" in best:
            what = (f"one student distilled from an ensemble of {config.members} (members {members}; "
                    f"ensemble {best['teachers_val_balanced_accuracy']:.4f}), best epoch {outcome.result.best_epoch}")
    else:
        what = f"best epoch {outcome.result.best_epoch}"
    click.echo(
        f"run {outcome.run_id} (experiment {outcome.experiment}): {what}, "
        f"validation balanced accuracy {best['val_balanced_accuracy']:.4f}, device {outcome.result.device}\n"
        f"checkpoint: {outcome.checkpoint_path}\n"
        f"look at it: mlflow ui --backend-store-uri {_ui_uri()}"
    )


def _ui_uri() -> str:
    from meli.tracking import tracking_uri

    return tracking_uri()


entry = console_script(main)  # the installed `meli-train`
