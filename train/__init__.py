"""The training stage: fit an MLP or a CNN on labelled titles, tracked in MLflow."""
