"""`python -m meli.score` runs meli-score."""

from meli.score.cli import entry

entry()
