"""Training settings as one typed object, read from a committed TOML file.

``configs/mlp.toml`` and ``configs/cnn.toml`` are complete examples; every key is a field
below, and an unknown key is an error (a typo must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from meli.errors import MeliError
from meli.models import CNNConfig, MLPConfig, ModelKind
from meli.tokenizer import STOPWORD_LANGUAGES, TokenizerConfig, load_stopwords
from meli.vocabulary import VocabularyConfig
from train.distill import DistillSettings


@dataclass(frozen=True)
class TokenizerSettings:
    """`TokenizerConfig` as a user writes it: stopwords by language, not as a word list."""

    stopword_languages: tuple[str, ...] = STOPWORD_LANGUAGES
    map_digits: bool = False
    min_token_length: int = 1
    word_bigrams: bool = True
    head_words: int = 0  # the first this many words again as "1^word", "2^word" (meli/tokenizer.py)
    head_repeat: int = 1  # ... written this many times over: their weight in the MLP's mean
    char_ngram_min: int = 3
    char_ngram_max: int = 5
    char_buckets: int = 2**18
    max_length: int = 256

    def resolve(self) -> TokenizerConfig:
        fields = dataclasses.asdict(self)
        languages = fields.pop("stopword_languages")
        return TokenizerConfig(stopwords=load_stopwords(languages), **fields)


@dataclass(frozen=True)
class EmbeddingSettings:
    """How the embedding table starts: random, trained with gensim on the titles, or loaded."""

    init: Literal["random", "word2vec", "fasttext", "pretrained"] = "random"
    path: str | None = None  # word2vec text file (.txt, .txt.bz2, .vec) for init = "pretrained"
    epochs: int = 10  # gensim training epochs for word2vec / fasttext
    window: int = 5
    min_count: int = 1


@dataclass(frozen=True)
class TrainConfig:
    model: ModelKind = "mlp"
    epochs: int = 20
    batch_size: int = 128
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 5e-3
    embedding_lr: float | None = None  # the (sparse) embedding table's rate; default: lr
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    schedule: Literal["onecycle", "constant"] = "onecycle"
    patience: int = 5  # early stopping: epochs without a better validation balanced accuracy
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    validation_fraction: float = 0.15  # only when the data has no validation file
    refit: bool = False  # after early stopping, fit again on train + validation for the best epoch count
    members: int = 1  # > 1: train that many models (seeds seed, seed+1, …); the graph averages their probabilities
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    embeddings: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    mlp: MLPConfig = field(default_factory=lambda: MLPConfig(n_ids=0, n_labels=0))
    cnn: CNNConfig = field(default_factory=lambda: CNNConfig(n_ids=0, n_labels=0))

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError("members must be at least 1")

    def model_config(self, n_ids: int, n_labels: int) -> MLPConfig | CNNConfig:
        section = self.mlp if self.model == "mlp" else self.cnn
        return dataclasses.replace(section, n_ids=n_ids, n_labels=n_labels)

    def flat(self) -> dict[str, object]:
        """Every setting as ``section.key: value``, for MLflow params."""
        out: dict[str, object] = {}

        def walk(prefix: str, obj: object) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if dataclasses.is_dataclass(value):
                    walk(f"{prefix}{f.name}.", value)
                elif f.name not in ("n_ids", "n_labels"):
                    out[prefix + f.name] = value

        walk("", self)
        return out


def _build(cls: type, values: dict, where: str):
    """`cls(**values)`, recursing into the sections (tables) of `TrainConfig`."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise MeliError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, dict):
            section = type(getattr(TrainConfig(), name, None))
            if cls is not TrainConfig or not dataclasses.is_dataclass(section):
                raise MeliError(f"{where}: {name!r} is a setting, not a section")
            kwargs[name] = _build(section, value, f"{where} [{name}]")
        else:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    if cls in (MLPConfig, CNNConfig):  # sizes come from the data, not the config
        kwargs.update(n_ids=0, n_labels=0)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise MeliError(f"{where}: {e}") from e


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Read a TOML config (or the defaults), then apply top-level `overrides` (None = keep)."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MeliError(f"{p}: no such config file")
        try:
            values = tomllib.loads(p.read_text("utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise MeliError(f"{p}: invalid TOML ({e})") from e
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _build(TrainConfig, values, str(path or "config"))
