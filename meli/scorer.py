"""The scorer: a function from Arrow record batches to Arrow record batches.

`Scorer.score_batch` takes a batch of input rows and returns one output row per input row,
in order: the kept input columns, ``category`` (string) and ``probability`` (float32), and
with ``top_k`` the lists ``top_categories`` / ``top_probabilities``. It has no I/O of its own,
so the same code runs in ``meli-score`` and inside Spark's ``mapInArrow`` (`meli.score.spark`;
`score_arrow_batches` wraps it for a pipeline of your own).

Rows whose title is null, empty, or yields no known token (nothing for the model to go on)
get a null ``category`` and ``probability``: marked, counted, never a crash. With
``min_probability``, rows scored below it keep their ``probability`` and get a null
``category`` (left for people or a rule to decide), also counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meli.errors import InputError, SettingError
from meli.formats import as_plain_strings, first_repeat, is_text
from meli.onnx_model import DEFAULT_PROVIDER, OnnxModel, Provider, load_onnx_model
from meli.tokenizer import Encoded
from meli.reliability import Reliability, WordCounter
from meli.tally import Tally, q24, tally_batch

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("category", "probability", "top_categories", "top_probabilities")
RENAMED_PREFIX = "input_"  # an input column named like an output column is kept under this prefix


BATCH_ROWS = 16_384  # rows read, tokenized and scored together by default: memory follows it


@dataclass(frozen=True)
class ScoreConfig:
    title_column: str = "title"
    keep_columns: tuple[str, ...] | None = None  # None: every input column except the title
    top_k: int = 0
    min_probability: float = 0.0  # below it a row is *low*: left for review
    null_low: bool = True  # a low row's ``category`` is null (its ``probability`` kept); False: kept as a suggestion
    inference_ids: int = 32_768  # ids (rows x padded length) per onnxruntime call: bounds its memory (and runs fastest here)


@dataclass
class ScoreStats:
    rows: int = 0
    unscored: int = 0  # null/empty titles and titles with no known token
    below: int = 0  # scored rows whose probability is under ``min_probability``

    def add(self, other: "ScoreStats") -> None:
        self.rows += other.rows
        self.unscored += other.unscored
        self.below += other.below


@dataclass(frozen=True)
class Scored:
    """A scored batch, and which of its rows are *low*: no category at all (null or empty
    title, no known token) or a probability under ``min_probability``."""

    batch: pa.RecordBatch
    low: np.ndarray  # (rows,) bool


@dataclass(frozen=True)
class Tokenized:
    """A batch between `Scorer.tokenize` and `Scorer.predict`."""

    batch: pa.RecordBatch
    kept: list[tuple[str, str]]
    encoded: Encoded
    titles: pa.Array  # the title column as plain strings


@dataclass
class Scorer:
    """Scores batches of rows with one model. With a `tally` (`meli.tally.Tally`), every
    batch it scores is also counted there, for the nightly report."""

    model: OnnxModel
    options: ScoreConfig = field(default_factory=ScoreConfig)
    tally: Tally | None = None

    def __post_init__(self) -> None:
        self.tokenizer = self.model.card.tokenizer()
        self.labels = pa.array(self.model.card.labels, type=pa.string())
        n = len(self.labels)
        if not 0 <= self.options.top_k <= n:
            raise SettingError("top_k", f"must be between 0 and the number of categories ({n})")
        if not 0.0 <= self.options.min_probability <= 1.0:
            raise SettingError("min_probability", f"must be between 0 and 1, got {self.options.min_probability}")
        self.stats = ScoreStats()
        self._words: WordCounter | None = None  # built on the first batch a tally counts
        # the model's accuracy by title length (`meli.reliability`), for the tally's chances of being right
        self._reliability = Reliability.of(self.model.card.provenance)

    # ---------------------------------------------------------------- schema
    def _kept(self, schema: pa.Schema) -> list[tuple[str, str]]:
        """(input name, output name) of the columns passed through."""
        title = self.options.title_column
        twice = first_repeat(schema.names)
        if twice is not None:
            raise InputError(f"the input's column {twice!r} appears twice")
        if title not in schema.names:
            raise SettingError("title_column", f"no title column {title!r}; the input has: {', '.join(schema.names)}")
        if self.options.keep_columns is None:
            names = [n for n in schema.names if n != title]
        else:
            twice = first_repeat(self.options.keep_columns)
            if twice is not None:
                raise SettingError("keep_columns", f"names {twice!r} twice")
            missing = [c for c in self.options.keep_columns if c not in schema.names]
            if missing:
                raise SettingError("keep_columns", f"no column(s) {', '.join(missing)}; the input has: {', '.join(schema.names)}")
            names = list(self.options.keep_columns)
        # an input column named like an output column gets the prefix, as often as it takes to
        # be unique (an input may already have an "input_category")
        taken = set(OUTPUT_COLUMNS) | {n for n in names if n not in OUTPUT_COLUMNS}
        kept = []
        for n in names:
            out = n
            if n in OUTPUT_COLUMNS:
                out = RENAMED_PREFIX + n
                while out in taken:
                    out = RENAMED_PREFIX + out
                taken.add(out)
            kept.append((n, out))
        return kept

    def output_schema(self, schema: pa.Schema, kept: list[tuple[str, str]] | None = None) -> pa.Schema:
        kept = self._kept(schema) if kept is None else kept
        fields = [schema.field(name).with_name(out) for name, out in kept]  # type, nullability, metadata kept
        fields += [pa.field("category", pa.string()), pa.field("probability", pa.float32())]
        if self.options.top_k:
            fields += [pa.field("top_categories", pa.list_(pa.string())), pa.field("top_probabilities", pa.list_(pa.float32()))]
        return pa.schema(fields, metadata=self.provenance())

    def provenance(self) -> dict[str, str]:
        prov = self.model.card.provenance
        return {
            "meli.model_sha256": self.model.sha256 or "",
            "meli.model_source": self.model.source,
            "meli.mlflow_run_id": str(prov.get("mlflow_run_id", "")),
            "meli.data_fingerprint": str(prov.get("data_fingerprint", "")),
            "meli.provider": self.model.provider,
        }

    # ---------------------------------------------------------------- scoring
    def tokenize(self, batch: pa.RecordBatch) -> Tokenized:
        """The first half of `score_batch`: check the batch, encode its titles (releases the
        GIL, so it can run in another thread while onnxruntime scores the batch before)."""
        kept = self._kept(batch.schema)
        name = self.options.title_column
        titles = batch.column(name)
        if not (is_text(titles.type) or pa.types.is_null(titles.type)):
            raise InputError(f"title column {name!r} holds {titles.type}, not strings")
        titles = as_plain_strings(titles)
        try:  # the readers check this already; a batch from elsewhere (Spark) may not be
            titles.validate(full=True)
        except pa.ArrowInvalid as e:
            raise InputError(f"title column {name!r}: invalid UTF-8 ({e})") from e
        return Tokenized(batch, kept, self.tokenizer.encode_batch(titles, compact=self.model.card.compact), titles)

    def predict(self, tokenized: Tokenized) -> pa.RecordBatch:
        """The second half of `score_batch`: run the model, build the output rows."""
        return self.predict_low(tokenized).batch

    def predict_low(self, tokenized: Tokenized) -> Scored:
        """`predict`, with the mask of the rows that are low (see `Scored`)."""
        batch, kept, enc = tokenized.batch, tokenized.kept, tokenized.encoded
        schema = self.output_schema(batch.schema, kept)
        n = batch.num_rows
        scorable = enc.scorable
        k = max(1, self.options.top_k)
        top_idx = np.zeros((n, k), dtype=np.int64)
        top_p = np.zeros((n, k), dtype=np.float32)
        rows = np.flatnonzero(scorable)
        # group rows of similar length so each onnxruntime call pads little
        lengths = enc.lengths
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        support = np.zeros(len(self.labels), np.int64) if self.tally is not None else None
        plain_support = None if self._reliability is None or support is None else np.zeros(len(self.labels), np.int64)
        if self.tally is not None:
            self._words = self._words or WordCounter(self.tokenizer)
            chance = np.zeros(n, np.float64)
            known_words = self._words.known_per_row(enc)
        for chunk in length_runs(rows, lengths[rows], self.options.inference_ids):
            probs = self.model.predict(enc.rows(chunk, max(1, int(lengths[chunk[-1]]))))  # sorted: the last is the longest
            if k == 1:
                best = probs.argmax(axis=1)[:, None]
            else:
                part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
                order = np.argsort(-np.take_along_axis(probs, part, axis=1), axis=1, kind="stable")
                best = np.take_along_axis(part, order, axis=1)
            top_idx[chunk] = best
            top_p[chunk] = np.take_along_axis(probs, best, axis=1)
            if support is not None:  # each row's chance of every category: the expected mix
                support += self._expected_mix(probs, best[:, 0], top_p[chunk, 0], known_words, chance, chunk)
                if plain_support is not None:
                    plain_support += q24(probs).sum(0)
        missing = pa.array(~scorable)
        below = scorable & (top_p[:, 0] < self.options.min_probability)
        no_category = pa.array(~scorable | (below if self.options.null_low else False))
        category = pc.if_else(no_category, pa.scalar(None, pa.string()), self.labels.take(pa.array(top_idx[:, 0])))
        probability = pc.if_else(missing, pa.scalar(None, pa.float32()), pa.array(top_p[:, 0]))
        columns = [batch.column(name) for name, _ in kept] + [category, probability]
        if self.options.top_k:
            offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
            names = pa.ListArray.from_arrays(offsets, self.labels.take(pa.array(top_idx.ravel())), mask=missing)
            values = pa.ListArray.from_arrays(offsets, pa.array(top_p.ravel()), mask=missing)
            columns += [names, values]
        self.stats.add(ScoreStats(rows=n, unscored=int((~scorable).sum()), below=int(below.sum())))
        if self.tally is not None:
            tally_batch(self.tally, self._words, tokenized.titles, enc, scorable, top_idx[:, 0], top_p[:, 0], below,
                        chance[scorable], support, known_words, plain_support)
        return Scored(pa.RecordBatch.from_arrays(columns, schema=schema), ~scorable | below)

    def _expected_mix(self, probs: np.ndarray, top: np.ndarray, p: np.ndarray, known_words: tuple[np.ndarray, np.ndarray],
                      chance: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """The chunk's summed chances of being each category (`q24`), its rows' chance of being
        right written into ``chance[chunk]``. Without a reliability table that chance is the top
        probability and the mix is the probabilities' sum; with one, the top category takes the
        corrected chance q and the others share 1 - q in proportion to their probabilities."""
        if self._reliability is None:
            chance[chunk] = p
            return q24(probs).sum(0)
        p = p.astype(np.float64)
        q = self._reliability.right_chance(p, known_words[0][chunk], known_words[1][chunk])
        chance[chunk] = q
        at = np.arange(len(chunk))
        rest = probs.sum(axis=1, dtype=np.float64) - p  # the other categories' probability
        scale = np.divide(1.0 - q, rest, out=np.zeros_like(q), where=rest > 0)
        mixed = probs * scale[:, None]
        mixed[at, top] = q
        return q24(mixed).sum(0)

    def score_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return self.predict(self.tokenize(batch))

    def score_batches(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield self.score_batch(batch)


def length_runs(rows: np.ndarray, lengths: np.ndarray, budget: int) -> Iterator[np.ndarray]:
    """`rows` (sorted by their `lengths`) in runs whose padded size, rows x the run's longest,
    stays within `budget` ids; every run holds at least one row."""
    start = 0
    while start < len(rows):
        # the run [start, end) pads to lengths[end - 1]; rows x that length grows with end
        # (lengths are sorted), so the rows that fit are a prefix: count them
        fits = (np.arange(1, len(rows) - start + 1) * np.maximum(lengths[start:], 1)) <= budget
        end = start + max(1, int(fits.sum()))
        yield rows[start:end]
        start = end


def score_arrow_batches(
    batches: Iterable[pa.RecordBatch], model_path: str, options: ScoreConfig = ScoreConfig(), provider: Provider = DEFAULT_PROVIDER,
    threads: int | None = None
) -> Iterator[pa.RecordBatch]:
    """For your own ``mapInArrow``: ``df.mapInArrow(lambda it: score_arrow_batches(it, "model.onnx"), schema)``.

    Opens the model once per call (once per partition in Spark) and streams the batches.
    """
    scorer = Scorer(load_onnx_model(model_path, provider=provider, threads=threads), options)
    yield from scorer.score_batches(batches)
