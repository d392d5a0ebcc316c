"""Training settings as one typed object, read from a committed TOML file.

The shipped ``train/configs/mlp.toml`` (the default model: what ``meli-train`` trains without
``--config``) and ``train/configs/cnn.toml`` are complete examples and travel inside the
package; every key is a field below (a key a file leaves out takes the default written
here), and an unknown key is an error (a typo must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from meli.errors import MeliError, SettingError
from meli.contract import CNNConfig, MLPConfig, ModelKind
from meli.tokenizer import STOPWORD_LANGUAGES, TokenizerConfig, load_stopwords
from meli.vocabulary import VocabularyConfig
from meli.train.distill import DistillConfig


@dataclass(frozen=True)
class EmbeddingConfig:
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
    # with many titles the batch grows: it doubles while an epoch would take more than
    # `steps_per_epoch` steps, up to `max_batch_size` titles (None: it never grows), and both
    # learning rates grow with the square root of the batch (Adam's rule of thumb); a larger
    # batch spreads each step's fixed costs over more titles
    max_batch_size: int | None = None
    steps_per_epoch: int = 1536
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 5e-3
    embedding_lr: float | None = None  # the (sparse) embedding table's rate; default: lr
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    schedule: Literal["onecycle", "constant"] = "onecycle"
    patience: int = 5  # early stopping: epochs without a better validation balanced accuracy
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the hidden and output layers' arithmetic while training: "bf16" runs them in bfloat16
    # (weights, optimizer and embedding table stay float32; what ships is float32), "auto" does
    # so where the device has bfloat16 instructions (a CUDA GPU that supports it; a CPU with
    # AVX512-BF16 or AMX) and the batch has at least `bf16_min_batch` titles, "fp32" never
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    # "auto" keeps float32 below this batch: the batch grows with the data (`batch_for`), so a
    # small fit, where bfloat16 saves seconds and single fits lost a little accuracy to its
    # rounding, stays float32, and a fit over hundreds of thousands of titles, where it saves a
    # quarter of each epoch or more, goes bfloat16
    bf16_min_batch: int = 512
    validation_fraction: float = 0.15  # only when the data has no validation file
    refit: bool = False  # after early stopping, fit again on train + validation for the best epoch count
    members: int = 1  # > 1: train that many models (seeds seed, seed+1, …); the graph averages their probabilities
    # a run's state is saved after an epoch once this many seconds have passed since the last
    # save (0: every epoch), for meli-train --resume
    save_every_s: float = 60.0
    # the tokenizer's own settings (`meli.tokenizer.TokenizerConfig`, what a model file carries);
    # a config names the stopword lists by language (`stopword_languages`), resolved on reading
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(stopwords=load_stopwords()))
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    mlp: MLPConfig = field(default_factory=lambda: MLPConfig(n_ids=0, n_labels=0))
    cnn: CNNConfig = field(default_factory=lambda: CNNConfig(n_ids=0, n_labels=0))

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError("members must be at least 1")
        if self.max_batch_size is not None and self.max_batch_size < self.batch_size:
            raise ValueError(f"max_batch_size = {self.max_batch_size} is below batch_size = {self.batch_size}")

    def batch_for(self, rows: int) -> tuple[int, float]:
        """The batch size of an epoch over `rows` titles, and the factor on the learning rates."""
        batch = self.batch_size
        while self.max_batch_size is not None and 2 * batch <= self.max_batch_size and -(-rows // batch) > self.steps_per_epoch:
            batch *= 2
        return batch, math.sqrt(batch / self.batch_size)

    def precision_for(self, batch: int) -> str:
        """The precision setting of a fit whose batches have `batch` titles: "auto" is "fp32"
        below `bf16_min_batch`."""
        return "fp32" if self.precision == "auto" and batch < self.bf16_min_batch else self.precision

    def model_config(self, n_ids: int, n_labels: int) -> MLPConfig | CNNConfig:
        section = self.mlp if self.model == "mlp" else self.cnn
        return dataclasses.replace(section, n_ids=n_ids, n_labels=n_labels)

    def to_dict(self) -> dict:
        """Every setting, sections as tables: what ``config.json`` in each MLflow run holds."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, object]:
        """Every setting as ``section.key: value``, for MLflow params."""
        out: dict[str, object] = {}

        other = "cnn" if self.model == "mlp" else "mlp"  # the other architecture's settings say nothing of this run

        def walk(prefix: str, obj: object) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if not prefix and f.name == other:
                    continue
                if prefix == "tokenizer." and f.name == "stopwords":
                    out["tokenizer.stopwords"] = f"{len(value)} words"  # the list itself is in config.json
                    continue
                if dataclasses.is_dataclass(value):
                    walk(f"{prefix}{f.name}.", value)
                elif f.name not in ("n_ids", "n_labels"):
                    out[prefix + f.name] = value

        walk("", self)
        return out


# The range of every number a config may set, by (section, key); section "" is the top level.
# (low, high, low_open): high None = no upper bound; low_open: the value must be > low.
_RANGES: dict[tuple[str, str], tuple[float, float | None, bool]] = {
    ("", "epochs"): (1, None, False),
    ("", "batch_size"): (1, None, False),
    ("", "max_batch_size"): (1, None, False),
    ("", "steps_per_epoch"): (1, None, False),
    ("", "bf16_min_batch"): (1, None, False),
    ("", "lr"): (0, None, True),
    ("", "embedding_lr"): (0, None, True),
    ("", "weight_decay"): (0, None, False),
    ("", "label_smoothing"): (0, 1, False),
    ("", "patience"): (1, None, False),
    ("", "seed"): (0, None, False),
    ("", "validation_fraction"): (0, 1, True),
    ("", "members"): (1, None, False),
    ("", "save_every_s"): (0, None, False),
    ("tokenizer", "min_token_length"): (1, None, False),
    ("tokenizer", "head_words"): (0, None, False),
    ("tokenizer", "head_repeat"): (1, None, False),
    ("tokenizer", "char_ngram_min"): (1, None, False),
    ("tokenizer", "char_ngram_max"): (0, None, False),
    ("tokenizer", "char_buckets"): (1, None, False),
    ("tokenizer", "max_length"): (1, None, False),
    ("vocabulary", "min_count"): (1, None, False),
    ("vocabulary", "max_size"): (0, None, False),
    ("vocabulary", "bigram_min_count"): (1, None, False),
    ("embeddings", "epochs"): (1, None, False),
    ("embeddings", "window"): (1, None, False),
    ("embeddings", "min_count"): (1, None, False),
    ("distill", "recombined"): (0, None, False),
    ("distill", "teacher_weight"): (0, 1, False),
    ("distill", "epochs"): (0, None, False),
    ("distill", "top_k"): (1, None, False),
    ("distill", "target_gib"): (0, None, False),
    ("mlp", "embedding_dim"): (1, None, False),
    ("mlp", "hidden"): (1, None, False),
    ("mlp", "dropout"): (0, 1, False),
    ("mlp", "embedding_dropout"): (0, 1, False),
    ("mlp", "embedding_init_std"): (0, None, False),
    ("cnn", "embedding_dim"): (1, None, False),
    ("cnn", "filters"): (1, None, False),
    ("cnn", "kernel_sizes"): (1, None, False),
    ("cnn", "hidden"): (1, None, False),
    ("cnn", "dropout"): (0, 1, False),
    ("cnn", "embedding_dropout"): (0, 1, False),
    ("cnn", "embedding_init_std"): (0, None, False),
}


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("nothing" if a is type(None) else _type_name(a) for a in args)
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _problem(section: str, name: str, value, hint) -> str | None:
    """What is wrong with a setting's value: its type (the field's annotation, with the allowed
    values) or its range (`_RANGES`); None when nothing is."""
    if not _fits(value, hint):
        return f"must be {_type_name(hint)}"
    bounds = _RANGES.get((section, name))
    if bounds is None or value is None:
        return None
    low, high, low_open = bounds
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if (v <= low if low_open else v < low) or (high is not None and v > high):
            return f"must be {'above' if low_open else 'at least'} {low:g}" + (f" and at most {high:g}" if high is not None else "")
    return None


def _check(section: str, name: str, value, hint, where: str) -> None:
    problem = _problem(section, name, value, hint)
    if problem is not None:
        raise MeliError(f"{where}: {name} = {value!r}: {problem}")


def _stopwords_by_language(values: dict, where: str) -> dict:
    """``stopword_languages = [...]`` (default: every shipped list) → the ``stopwords`` they hold."""
    values = dict(values)
    languages = values.pop("stopword_languages", None)
    if languages is not None and "stopwords" in values:
        raise MeliError(f"{where}: set stopword_languages or stopwords, not both")
    if "stopwords" in values:
        return values
    if languages is not None:
        _check("tokenizer", "stopword_languages", languages, tuple[str, ...], where)
    try:
        values["stopwords"] = list(load_stopwords(STOPWORD_LANGUAGES if languages is None else languages))
    except ValueError as e:
        raise MeliError(f"{where}: {e}") from e
    return values


def _build(cls: type, values: dict, where: str, section: str = ""):
    """`cls(**values)`, recursing into the sections (tables) of `TrainConfig`; every value
    type- and range-checked first."""
    known = [f.name for f in dataclasses.fields(cls)]
    if cls is TokenizerConfig:  # a config names the stopword lists by language
        values = _stopwords_by_language(values, where)
        known = ["stopword_languages", *known]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise MeliError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, dict):
            section_cls = type(getattr(TrainConfig(), name, None))
            if cls is not TrainConfig or not dataclasses.is_dataclass(section_cls):
                raise MeliError(f"{where}: {name!r} is a setting, not a section")
            kwargs[name] = _build(section_cls, value, f"{where} [{name}]", name)
        else:
            if cls is TrainConfig and dataclasses.is_dataclass(type(getattr(TrainConfig(), name, None))):
                raise MeliError(f"{where}: {name!r} is a section ([{name}]), not a setting")
            _check(section, name, value, hints[name], where)
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    if cls in (MLPConfig, CNNConfig):  # sizes come from the data, not the config
        kwargs.update(n_ids=0, n_labels=0)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise MeliError(f"{where}: {e}") from e


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "mlp"


def config_path(name_or_path: str | Path | None) -> Path:
    """A config file: a path, or the name of a shipped one (``mlp``, ``cnn``); None: the default model's."""
    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG
    shipped = SHIPPED_CONFIGS / f"{name_or_path}.toml"
    if isinstance(name_or_path, str) and "/" not in name_or_path and not name_or_path.endswith(".toml") and shipped.is_file():
        return shipped
    return Path(name_or_path)


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Read a TOML config (a path or a shipped name; None: the default model's ``mlp``), then
    apply top-level `overrides` (None = keep)."""
    p = config_path(path)
    if not p.is_file():
        shipped = ", ".join(sorted(f.stem for f in SHIPPED_CONFIGS.glob("*.toml")))
        raise MeliError(f"{p}: no such config file (shipped ones, by name: {shipped})")
    try:
        values = tomllib.loads(p.read_text("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise MeliError(f"{p}: invalid TOML ({e})") from e
    given = {k: v for k, v in overrides.items() if v is not None}
    hints = typing.get_type_hints(TrainConfig)
    for name, value in given.items():  # overrides (a command's flags): the command names them
        problem = _problem("", name, value, hints[name])
        if problem is not None:
            raise SettingError(name, f"{value!r}: {problem}")
    return _build(TrainConfig, {**values, **given}, str(p))
