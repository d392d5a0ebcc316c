"""meli-categorizer core: what the train, export and score stages share."""

__version__ = "0.1.0"
