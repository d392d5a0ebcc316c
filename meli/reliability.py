"""What a top probability is worth, by how many words of a title the model knows.

The temperature (`meli.calibration`) makes the top probability mean what it says on titles
like the validation ones. On titles much shorter than those (cut to their first words, say),
or that lost the words that name the product (titles name it first), the model stays nearly
as sure of itself while it is right far less often: the temperature sees neither. The nightly report's accuracy estimate (the sum of each row's chance of
being right, as confidence-based performance estimation does it) would then read the
over-confidence as accuracy.

`Reliability` corrects for that: a table, by the number of known words in a title, whether
the model knows its first word as a first word (the head-word token ``1^word``) and its top
probability, of how far the real accuracy lies below the probability. It is fitted at
training time, with the shipped temperature, on the validation titles and on shortened copies
of them (their first 1, 2, 3, 4 and 6 words; all but their first 1 and 2), which no fit has
seen; cells with few titles shrink towards no correction. At scoring time a row's chance of being right is its top
probability plus its cell's correction. The shipped probabilities themselves are unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meli.tokenizer import N_SPECIAL, UNK, Encoded, Tokenizer

# known words in a title: 0, 1, 2, 3, 4, 5, 6-7, 8-10, 11 or more
WORD_EDGES = (0, 1, 2, 3, 4, 5, 6, 8, 11)
# the top probability: most titles are above 0.9, so the bins are finer there
CONFIDENCE_EDGES = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
PRIOR_TITLES = 25.0  # a cell's correction counts as this many titles with none
PREFIX_WORDS = (1, 2, 3, 4, 6)  # the shortened copies of each validation title: its first this many words
DROPPED_WORDS = (1, 2)  # ... and all but its first this many
PROVENANCE_KEY = "reliability_by_known_words"  # where a checkpoint (and a model file's card) keeps the table


class WordCounter:
    """Counts words and unknown words from token ids, in either encoding: an unknown word is
    one `UNK` id; a known word is its vocabulary id (full ids, and titles the compact
    encoding leaves in full) or its fused id (compact). Head tokens and bigrams share the
    vocabulary's id range, so a table over every id says which ids are words."""

    OTHER, WORD, UNKNOWN, FIRST = 0, 1, 2, 3  # FIRST: a known head token of the first word

    def __init__(self, tokenizer: Tokenizer):
        vocab = tokenizer.vocabulary
        is_word = np.fromiter((("^" not in t) and (" " not in t) for t in vocab), bool, len(vocab))
        kind = np.zeros(tokenizer.n_compact_ids, np.uint8)
        kind[UNK] = self.UNKNOWN
        kind[N_SPECIAL:N_SPECIAL + len(vocab)][is_word] = self.WORD
        kind[tokenizer.fused_offset:tokenizer.fused_offset + len(vocab)][is_word] = self.WORD
        first = np.fromiter((t.startswith("1^") for t in vocab), bool, len(vocab))
        kind[N_SPECIAL:N_SPECIAL + len(vocab)][first] = self.FIRST
        kind[tokenizer.fused_offset:tokenizer.fused_offset + len(vocab)][first] = self.FIRST
        self.kind = kind

    def count(self, values: np.ndarray) -> tuple[int, int]:
        """(words, unknown words) among `values`, a batch's flat token ids."""
        counts = np.bincount(self.kind[values], minlength=3)
        return int(counts[self.WORD] + counts[self.UNKNOWN]), int(counts[self.UNKNOWN])

    def known_per_row(self, encoded: Encoded) -> tuple[np.ndarray, np.ndarray]:
        """For each row of `encoded`: how many known words it holds, and whether its first word
        is known as a first word (bool)."""
        lengths = np.diff(encoded.offsets)
        row = np.repeat(np.arange(len(lengths)), lengths)
        kind = self.kind[encoded.values]
        words = np.bincount(row[kind == self.WORD], minlength=len(lengths)).astype(np.int64)
        first = np.bincount(row[kind == self.FIRST], minlength=len(lengths)) > 0
        return words, first


@dataclass(frozen=True)
class Reliability:
    """Real accuracy minus top probability where it is negative (0 elsewhere), indexed by
    [first word known as a first word (0/1), known-word bin, probability bin], shrunk towards 0
    where few titles fell; `rows` counts the titles behind each cell."""

    correction: np.ndarray  # (2, len(WORD_EDGES), len(CONFIDENCE_EDGES)) float64
    rows: np.ndarray  # same shape, int64
    # the validation titles as they are, by [first word known, known-word bin]: the shape of
    # the titles the temperature was fitted on, which tonight's are compared with
    validation_shapes: np.ndarray = field(default_factory=lambda: np.zeros((2, len(WORD_EDGES)), np.int64))

    SHAPE = (2, len(WORD_EDGES), len(CONFIDENCE_EDGES))

    @classmethod
    def fit(cls, top_probability: np.ndarray, right: np.ndarray, known_words: np.ndarray,
            first_known: np.ndarray, as_they_are: np.ndarray | None = None) -> "Reliability":
        """`as_they_are`: which rows are the validation titles themselves (default: all)."""
        original = np.ones(len(right), bool) if as_they_are is None else as_they_are
        shapes = title_shapes(known_words[original], first_known[original])
        cell = _cells(top_probability, known_words, first_known)
        size = int(np.prod(cls.SHAPE))
        n = np.bincount(cell, minlength=size).reshape(cls.SHAPE)
        gap = np.bincount(cell, weights=right.astype(np.float64) - top_probability.astype(np.float64),
                          minlength=size).reshape(cls.SHAPE)
        # only ever lowers: the temperature already makes p honest on titles like the validation
        # ones; the table is there for the titles on which the model is surer than it is right
        return cls(correction=np.minimum(0.0, gap / (n + PRIOR_TITLES)), rows=n.astype(np.int64),
                   validation_shapes=shapes)

    def right_chance(self, top_probability: np.ndarray, known_words: np.ndarray, first_known: np.ndarray) -> np.ndarray:
        """Each row's chance that its top category is right (float64, in [0, 1])."""
        cell = _cells(top_probability, known_words, first_known)
        return np.clip(top_probability.astype(np.float64) + self.correction.ravel()[cell], 0.0, 1.0)

    def to_json(self) -> str:
        return json.dumps({"word_edges": WORD_EDGES, "confidence_edges": CONFIDENCE_EDGES,
                           "correction": np.round(self.correction, 6).tolist(), "rows": self.rows.tolist(),
                           "validation_shapes": self.validation_shapes.tolist()})

    @classmethod
    def from_json(cls, text: str) -> "Reliability | None":
        """The table a checkpoint or model card holds; None when it was made with other bins."""
        d = json.loads(text)
        if tuple(d.get("word_edges", ())) != WORD_EDGES or tuple(d.get("confidence_edges", ())) != CONFIDENCE_EDGES:
            return None
        correction = np.asarray(d["correction"], np.float64)
        if correction.shape != cls.SHAPE:
            return None
        return cls(correction=correction, rows=np.asarray(d["rows"], np.int64),
                   validation_shapes=np.asarray(d.get("validation_shapes", np.zeros((2, len(WORD_EDGES)))), np.int64))

    @classmethod
    def of(cls, provenance: dict) -> "Reliability | None":
        """The table in a checkpoint's or model card's provenance, if any."""
        text = provenance.get(PROVENANCE_KEY)
        return cls.from_json(text) if text else None


def title_shapes(known_words: np.ndarray, first_known: np.ndarray) -> np.ndarray:
    """How many titles fall in each [first word known (0/1), known-word bin]: (2, len(WORD_EDGES)) int64."""
    w = np.clip(np.searchsorted(WORD_EDGES, known_words, side="right") - 1, 0, len(WORD_EDGES) - 1)
    flat = np.asarray(first_known, np.int64) * len(WORD_EDGES) + w
    return np.bincount(flat, minlength=2 * len(WORD_EDGES)).reshape(2, len(WORD_EDGES)).astype(np.int64)


def _cells(top_probability: np.ndarray, known_words: np.ndarray, first_known: np.ndarray) -> np.ndarray:
    """Each row's flat index into a `Reliability` table."""
    w = np.clip(np.searchsorted(WORD_EDGES, known_words, side="right") - 1, 0, len(WORD_EDGES) - 1)
    c = np.clip(np.searchsorted(CONFIDENCE_EDGES, top_probability, side="right") - 1, 0, len(CONFIDENCE_EDGES) - 1)
    return (np.asarray(first_known, np.int64) * len(WORD_EDGES) + w) * len(CONFIDENCE_EDGES) + c


def shortened(titles: pa.Array, categories: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """`titles` as they are, then each cut to its first 1, 2, 3, 4 and 6 words and without
    its first 1 and 2 words (where it is longer than that), with their label indices: what
    `Reliability.fit` learns from."""
    words = pc.utf8_split_whitespace(titles.fill_null(""))
    n_words = pc.list_value_length(words).to_numpy(zero_copy_only=False)
    parts, labels = [titles.cast(pa.string())], [categories]
    cuts = [(0, k) for k in PREFIX_WORDS] + [(k, None) for k in DROPPED_WORDS]
    for start, stop in cuts:
        longer = np.flatnonzero(n_words > (stop or start))
        if not len(longer):
            continue
        cut = pc.list_slice(words.take(pa.array(longer)), start, stop)
        parts.append(pc.binary_join(cut, " ").cast(pa.string()))
        labels.append(categories[longer])
    return pa.concat_arrays(parts), np.concatenate(labels)
