"""`python -m score` runs meli-score."""

from score.cli import main

main()
