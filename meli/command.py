"""What the three command-line tools share: logging to stderr, and one-line errors.

Only the stages' ``cli.py`` modules import this (and click); the library raises
`meli.errors.MeliError`, and `reports_errors` turns it into click's one-line ``Error: …``
with exit code 1.
"""

from __future__ import annotations

import functools
import logging
import sys

import click

from meli.errors import MeliError


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("alembic", "mlflow", "urllib3", "gensim", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def reports_errors(func):
    """Turn the library's errors into a one-line click error and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MeliError as e:
            raise click.ClickException(str(e)) from e

    return wrapper
