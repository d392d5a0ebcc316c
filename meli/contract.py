"""The contract between the stages: what a trained model *is*, whatever file holds it.

`ModelSpec` is the one typed description of a model that the checkpoint (`meli.checkpoint`),
the model card inside ``model.onnx`` (`meli.onnx_model`) and the export share: architecture
and its settings, tokenizer settings, vocabulary, labels, ensemble size and calibration.
A checkpoint adds the weights, metrics and provenance; a card adds how the graph reads its
ids (encoding, precision, matmuls) and provenance. No torch here: scoring imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Union

from meli.tokenizer import Tokenizer, TokenizerConfig

ModelKind = Literal["mlp", "cnn"]


@dataclass(frozen=True)
class MLPConfig:
    n_ids: int  # rows of the embedding table: the tokenizer's id space
    n_labels: int
    embedding_dim: int = 128
    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.3
    embedding_dropout: float = 0.0  # drops whole tokens during training (word dropout)
    embedding_init_std: float = 0.1  # start of the rows training uses (the trainer zeroes the rest)
    pooling: Literal["mean", "attention"] = "mean"  # attention: a learned weight per token id

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CNNConfig:
    n_ids: int
    n_labels: int
    embedding_dim: int = 128
    filters: int = 256  # per kernel size
    kernel_sizes: tuple[int, ...] = (1, 2, 3)
    hidden: tuple[int, ...] = ()
    dropout: float = 0.3
    embedding_dropout: float = 0.0
    embedding_init_std: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


ModelConfig = Union[MLPConfig, CNNConfig]


def config_from_dict(kind: ModelKind, d: dict) -> ModelConfig:
    cls = {"mlp": MLPConfig, "cnn": CNNConfig}.get(kind)
    if cls is None:
        raise ValueError(f"unknown model kind {kind!r}; expected 'mlp' or 'cnn'")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown {kind} settings: {sorted(unknown)}")
    return cls(**d)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's behaviour, except its weights."""

    model_kind: ModelKind
    model_config: ModelConfig
    tokenizer_config: TokenizerConfig
    vocabulary: tuple[str, ...]
    labels: tuple[str, ...]
    members: int = 1  # > 1: an ensemble of that many models of this kind and config (`meli.models.Ensemble`)
    temperature: float = 1.0  # probabilities = softmax(scores / temperature) (`meli.calibration`)

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError(f"members must be at least 1, got {self.members}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.tokenizer_config, self.vocabulary)

    def to_dict(self) -> dict:
        """Plain JSON-ready values (the checkpoint's payload holds them as they are)."""
        return {
            "model_kind": self.model_kind,
            "model_config": self.model_config.to_dict(),
            "tokenizer_config": self.tokenizer_config.to_dict(),
            "vocabulary": list(self.vocabulary),
            "labels": list(self.labels),
            "members": int(self.members),
            "temperature": float(self.temperature),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """The inverse of `to_dict`; raises KeyError/ValueError/TypeError on a bad dict."""
        return cls(
            model_kind=d["model_kind"],
            model_config=config_from_dict(d["model_kind"], d["model_config"]),
            tokenizer_config=TokenizerConfig.from_dict(d["tokenizer_config"]),
            vocabulary=tuple(d["vocabulary"]),
            labels=tuple(d["labels"]),
            members=int(d.get("members", 1)),
            temperature=float(d.get("temperature", 1.0)),
        )


class SpecFields:
    """The `ModelSpec` fields read through ``self.spec``, for the classes that hold one (the
    checkpoint, the model card): one definition, not one copy per file format."""

    spec: ModelSpec

    model_kind = property(lambda self: self.spec.model_kind)
    model_config = property(lambda self: self.spec.model_config)
    tokenizer_config = property(lambda self: self.spec.tokenizer_config)
    vocabulary = property(lambda self: self.spec.vocabulary)
    labels = property(lambda self: self.spec.labels)
    members = property(lambda self: self.spec.members)
    temperature = property(lambda self: self.spec.temperature)

    def tokenizer(self) -> Tokenizer:
        return self.spec.tokenizer()
