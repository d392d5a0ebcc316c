"""What a scoring run saw, as counts that add up: the raw material of the nightly report.

A `Tally` is filled batch by batch by the scoring core (`Scorer`, when given one) and holds
only sums and fixed-bin histograms, so tallies of parts of the input (Spark partitions,
batches) merge into the tally of the whole by adding them (`Tally.merge`): the local
engine and Spark give the same numbers on the same input, whatever the batch size or the
partitioning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meli.calibration import THRESHOLDS
from meli.reliability import WORD_EDGES, WordCounter, title_shapes
from meli.tokenizer import Encoded

# title length in characters: [0, 1) is the empty title, the last bin is open
LENGTH_EDGES = (0, 1, 10, 20, 30, 40, 50, 60, 80, 100, 150, 200)
CONFIDENCE_BINS = 20  # equal-width bins of the top probability over [0, 1]
Q24 = float(1 << 24)  # probabilities are float32: at most 24 significant bits


@dataclass
class Tally:
    """Counts over the rows a scoring run read. Arrays are indexed by the model's labels
    (`categories`), `LENGTH_EDGES` bins (`lengths`), `CONFIDENCE_BINS` bins (`confidence`) and
    `meli.calibration.THRESHOLDS` (`at_threshold`: scored rows whose top probability is at
    least each threshold)."""

    n_labels: int
    rows: int = 0
    empty: int = 0  # null titles, and titles that are empty or only blanks
    no_known_token: int = 0  # non-empty titles the model has nothing to go on for
    words: int = 0  # words after normalisation and stopwords, of every title
    unknown_words: int = 0  # of those, words not in the vocabulary
    probability_q24: int = 0  # sum of the scored rows' top probability, in units of 2**-24 (whole numbers add exactly)
    # each scored row's chance q that its category is right: its top probability, corrected for
    # its length where the model holds a `meli.reliability.Reliability` table (else q = p)
    right_chance_q24: int = 0  # sum of q, in units of 2**-24
    uncertainty_q24: int = 0  # sum of q (1 - q), in units of 2**-24
    probability_uncertainty_q24: int = 0  # sum of p (1 - p), in units of 2**-24
    below: int = 0  # scored rows under --min-probability
    categories: np.ndarray = field(default=None)  # type: ignore[assignment]
    # by label, in units of 2**-24: q of the rows predicted as it (their expected correct answers),
    # and every scored row's chance of being it (its expected number of titles: q for the
    # predicted label, the other probabilities scaled to share 1 - q)
    category_right_q24: np.ndarray = field(default=None)  # type: ignore[assignment]
    expected_support_q24: np.ndarray = field(default=None)  # type: ignore[assignment]
    # the same two by label from the uncorrected probabilities (q = p)
    category_probability_q24: np.ndarray = field(default=None)  # type: ignore[assignment]
    probability_support_q24: np.ndarray = field(default=None)  # type: ignore[assignment]
    lengths: np.ndarray = field(default=None)  # type: ignore[assignment]
    # scored rows by [first word known, known-word bin] (`meli.reliability.title_shapes`), flattened
    shapes: np.ndarray = field(default=None)  # type: ignore[assignment]
    confidence: np.ndarray = field(default=None)  # type: ignore[assignment]
    at_threshold: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        zeros = {"categories": self.n_labels, "lengths": len(LENGTH_EDGES), "shapes": 2 * len(WORD_EDGES), "confidence": CONFIDENCE_BINS,
                 "at_threshold": len(THRESHOLDS), "category_right_q24": self.n_labels,
                 "expected_support_q24": self.n_labels, "category_probability_q24": self.n_labels,
                 "probability_support_q24": self.n_labels}
        for name, size in zeros.items():
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(size, np.int64))

    @property
    def scored(self) -> int:
        return self.rows - self.empty - self.no_known_token

    @property
    def mean_probability(self) -> float | None:
        return self.probability_q24 / Q24 / self.scored if self.scored else None

    def merge(self, other: "Tally") -> "Tally":
        """The tally of both inputs together."""
        if other.n_labels != self.n_labels:
            raise ValueError(f"tallies of models with {self.n_labels} and {other.n_labels} categories do not merge")
        out = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = a if f.name == "n_labels" else a + b
        return Tally(**out)

    def to_dict(self) -> dict:
        """Plain values (lists for arrays): what travels from Spark's workers to the driver."""
        return {f.name: (v.tolist() if isinstance(v := getattr(self, f.name), np.ndarray) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Tally":
        """`to_dict`'s inverse: its lists are the arrays."""
        return cls(**{k: (np.asarray(v, np.int64) if isinstance(v, list) else v) for k, v in d.items()})


def q24(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities as whole units of 2**-24 (int64): sums of them are exact in any order."""
    return np.rint(np.asarray(probabilities, np.float64) * Q24).astype(np.int64)


def tally_batch(tally: Tally, words: WordCounter, titles: pa.Array, encoded: Encoded, scorable: np.ndarray,
                top_index: np.ndarray, top_probability: np.ndarray, below: np.ndarray,
                right_chance: np.ndarray | None = None, support_q24: np.ndarray | None = None,
                known: tuple[np.ndarray, np.ndarray] | None = None,
                probability_support_q24: np.ndarray | None = None) -> None:
    """Add one scored batch to `tally`: its plain-string `titles`, their `encoded` ids, which
    rows were scorable, their top category and probability, which fell under the threshold,
    each scorable row's chance of being right (default: its top probability), the sum of
    their chances of being each category (`q24`; see `Tally`), the plain sum of their
    probability vectors (default: `support_q24`) and every row's known words and
    known first word (`WordCounter.known_per_row`; counted here when not given)."""
    n = len(titles)
    chars = pc.utf8_length(titles).fill_null(0).to_numpy(zero_copy_only=False).copy()
    empty = chars == 0
    blank = np.flatnonzero(~scorable & ~empty)  # a title of blanks has characters but nothing in it
    if len(blank):
        trimmed = pc.utf8_length(pc.utf8_trim_whitespace(titles.take(pa.array(blank)))).to_numpy(zero_copy_only=False)
        chars[blank[trimmed == 0]] = 0
        empty = chars == 0
    tally.rows += n
    tally.empty += int(empty.sum())
    tally.no_known_token += int((~scorable & ~empty).sum())
    known_words, first_known = known if known is not None else words.known_per_row(encoded)
    tally.shapes += title_shapes(known_words[scorable], first_known[scorable]).ravel()
    w, u = words.count(encoded.values)
    tally.words += w
    tally.unknown_words += u
    tally.lengths += np.bincount(np.searchsorted(LENGTH_EDGES, chars, side="right") - 1, minlength=len(LENGTH_EDGES))
    p = top_probability[scorable].astype(np.float64)
    q = p if right_chance is None else np.asarray(right_chance, np.float64)
    tally.categories += np.bincount(top_index[scorable], minlength=tally.n_labels)
    tally.confidence += np.bincount(np.minimum((p * CONFIDENCE_BINS).astype(np.int64), CONFIDENCE_BINS - 1),
                                    minlength=CONFIDENCE_BINS)
    tally.at_threshold += np.array([np.count_nonzero(p >= t) for t in THRESHOLDS], np.int64)
    top_q24 = q24(p)
    tally.probability_q24 += int(top_q24.sum())
    tally.probability_uncertainty_q24 += int(q24(p * (1.0 - p)).sum())
    tally.category_probability_q24 += np.bincount(top_index[scorable], weights=top_q24, minlength=tally.n_labels
                                                  ).astype(np.int64)
    right_q24 = q24(q)
    tally.right_chance_q24 += int(right_q24.sum())
    tally.uncertainty_q24 += int(q24(q * (1.0 - q)).sum())
    tally.category_right_q24 += np.bincount(top_index[scorable], weights=right_q24, minlength=tally.n_labels
                                            ).astype(np.int64)
    if support_q24 is not None:
        tally.expected_support_q24 += support_q24
        tally.probability_support_q24 += support_q24 if probability_support_q24 is None else probability_support_q24
    tally.below += int(below.sum())
