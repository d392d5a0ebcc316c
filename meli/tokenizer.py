"""Titles → token ids: the one tokenizer that training and scoring share.

One specification, two implementations:

- `Tokenizer.encode_reference(title)` is a plain per-title Python loop: the readable spec.
- `Tokenizer.encode_batch(titles)` is compiled (numba, `meli.tokenizer_kernels`) over the raw
  bytes of a pyarrow string array: the path training and scoring use. Tests prove they agree
  id for id, in both encodings (full and compact, see `Tokenizer`).

The specification, per title:

1. normalise: lowercase → Unicode NFKD → drop combining accents (U+0300–U+036F) →
   optionally map every digit to ``0`` → every run of characters outside ``[a-z0-9]``
   becomes a space → split on spaces: ``"Pañal 1/2 12V®"`` → ``["panal", "1", "2", "12v"]``
   (NFKD splits ``ñ`` into ``n`` and a combining tilde, which is dropped).
2. drop stopwords and tokens shorter than ``min_token_length``.
3. features, always in this order:
   - words: their vocabulary id, or ``UNK`` (1) when not in the vocabulary;
   - head words: the first ``head_words`` words again, tagged with their position
     (``"1^funda"``, ``"2^iphone"``), where that tagged token is in the vocabulary (unknown
     ones are dropped). Spanish and Portuguese titles name the product first (``Funda Iphone
     7`` is a case, ``Iphone 7 Funda De Regalo`` a phone), which a bag of features cannot see.
     The group is written ``head_repeat`` times over, so a mean-pooling model weighs it more;
   - word bigrams (``"funda iphone"``) that are in the vocabulary (unknown ones are dropped);
   - hashed character n-grams of every word padded with spaces (``" funda "``), for n from
     ``char_ngram_min`` to ``char_ngram_max``, n by n, word by word, left to right:
     ``id = char_offset + fnv1a_32(ngram) % char_buckets`` (fastText-style subwords, so
     misspellings and unseen model numbers still share features with training titles).
4. truncate to ``max_length`` ids; rows are right-padded with ``PAD`` (0).

The compact encoding (what the exported model reads) is defined on top of these ids in
`Tokenizer`; ``docs/tokenizer.md`` is the same specification for other implementations.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field
from functools import cached_property
from importlib import resources
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meli.tokenizer_kernels import FNV32_OFFSET, FNV32_PRIME, CharFolding, TokenTable, encode_titles, pad_rows

PAD = 0
UNK = 1
N_SPECIAL = 2


STOPWORD_LANGUAGES = ("spanish", "portuguese")

_ACCENTS = "[\u0300-\u036f]"
_ACCENTS_RE2 = "[\\x{0300}-\\x{036f}]"
_NON_ALNUM = "[^a-z0-9]+"


@dataclass(frozen=True)
class TokenizerConfig:
    """Every setting that changes token ids. Saved with each checkpoint and ONNX file."""

    map_digits: bool = False  # "12v" → "00v": sizes and voltages share features
    stopwords: tuple[str, ...] = ()  # already normalised; see `load_stopwords`
    min_token_length: int = 1
    word_bigrams: bool = True
    head_words: int = 0  # the first this many words also as position-tagged tokens
    head_repeat: int = 1  # ... written this many times over (their weight in a mean)
    char_ngram_min: int = 3
    char_ngram_max: int = 5  # 0 turns character n-grams off
    char_buckets: int = 2**18
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError("max_length must be at least 1")
        if self.min_token_length < 1:
            raise ValueError("min_token_length must be at least 1")
        if self.head_words < 0:
            raise ValueError("head_words must be 0 or more")
        if self.head_repeat < 1:
            raise ValueError("head_repeat must be at least 1")
        if self.char_ngrams:
            if not 1 <= self.char_ngram_min <= self.char_ngram_max:
                raise ValueError("need 1 <= char_ngram_min <= char_ngram_max")
            if self.char_buckets < 1:
                raise ValueError("char_buckets must be at least 1")

    @property
    def char_ngrams(self) -> bool:
        return self.char_ngram_max > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stopwords"] = list(self.stopwords)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown tokenizer setting(s) {', '.join(sorted(unknown))}")
        d = dict(d)
        if "stopwords" in d:
            d["stopwords"] = tuple(d["stopwords"])
        return cls(**d)


def normalize_title(title: str, map_digits: bool = False) -> list[str]:
    """Reference normalisation of one title into words (step 1 of the spec)."""
    s = unicodedata.normalize("NFKD", title.lower())
    s = re.sub(_ACCENTS, "", s)
    if map_digits:
        s = re.sub("[0-9]", "0", s)
    return re.sub(_NON_ALNUM, " ", s).split()


def load_stopwords(languages: Iterable[str] = STOPWORD_LANGUAGES) -> tuple[str, ...]:
    """The shipped stopword lists of `languages`, normalised and sorted."""
    words: set[str] = set()
    for lang in languages:
        if lang not in STOPWORD_LANGUAGES:
            raise ValueError(f"no stopword list for {lang!r}; have {list(STOPWORD_LANGUAGES)}")
        text = resources.files("meli.resources").joinpath(f"stopwords-{lang}.txt").read_text("utf-8")
        for line in text.splitlines():
            if line.strip() and not line.startswith("#"):
                words.update(normalize_title(line))
    return tuple(sorted(words))


def fnv1a_32(data: bytes) -> int:
    h = FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV32_PRIME) & 0xFFFFFFFF
    return h


@dataclass(frozen=True)
class Encoded:
    """A batch of encoded titles, stored flat: title ``t`` is ``values[offsets[t]:offsets[t + 1]]``."""

    values: np.ndarray  # (total,) int64
    offsets: np.ndarray  # (B + 1,) int64

    @property
    def lengths(self) -> np.ndarray:
        """(B,) ids per title (after truncation)."""
        return np.diff(self.offsets)

    @property
    def scorable(self) -> np.ndarray:
        """(B,) bool: the titles with at least one known token (PAD and UNK are not): the rows a
        model has something to go on for."""
        known = np.concatenate([[0], np.cumsum(self.values >= N_SPECIAL)])
        return known[self.offsets[1:]] > known[self.offsets[:-1]]

    def rows(self, rows: np.ndarray, width: int | None = None) -> np.ndarray:
        """Titles `rows`, right-padded with PAD to `width` (default: their longest, at least 1): (len(rows), width)."""
        rows = np.asarray(rows, dtype=np.int64)
        if width is None:
            width = max(1, int(self.lengths[rows].max(initial=0)))
        return pad_rows(self.values, self.offsets, rows, width)

    @cached_property
    def ids(self) -> np.ndarray:
        """(B, T) int64, right-padded; T = the longest title's length, at least 1."""
        return self.rows(np.arange(len(self.offsets) - 1))

    def concat(self, other: Encoded) -> Encoded:
        """This batch's titles, then `other`'s."""
        return Encoded(np.concatenate([self.values, other.values]),
                       np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]]))


@dataclass
class Tokenizer:
    """A `TokenizerConfig` plus the vocabulary (words, head words and bigrams) it maps to ids.

    Two encodings of the same spec:

    - *full* ids (`encode_batch`, `encode_reference`): what the model is trained on;
    - *compact* ids (``encode_batch(..., compact=True)``, `encode_compact_reference`): what the
      exported scoring graph reads. A known word becomes one *fused* id ``fused_offset + i``
      (``i`` its vocabulary index) that stands for the word and all its character n-grams,
      and each known head token one fused id that stands for its ``head_repeat`` copies; the
      export stores each fused row as the sum of the rows it stands for, with their count,
      so a mean-pooled model computes the same thing from a few ids as from all of them.
      Titles whose full ids would be truncated keep their full ids.
    """

    config: TokenizerConfig
    vocabulary: Sequence[str]
    _index: dict[str, int] = field(init=False, repr=False)
    _vocab_table: TokenTable = field(init=False, repr=False)
    _stop_table: TokenTable = field(init=False, repr=False)
    _folding: CharFolding = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.vocabulary = tuple(self.vocabulary)
        self._index = {tok: i + N_SPECIAL for i, tok in enumerate(self.vocabulary)}
        if len(self._index) != len(self.vocabulary):
            raise ValueError("vocabulary has duplicate tokens")
        self._vocab_table = TokenTable.build(self.vocabulary, range(N_SPECIAL, N_SPECIAL + len(self.vocabulary)))
        self._stop_table = TokenTable.build(self.config.stopwords, np.zeros(len(self.config.stopwords), np.int64))
        self._folding = CharFolding()

    @property
    def char_offset(self) -> int:
        return N_SPECIAL + len(self.vocabulary)

    @property
    def n_ids(self) -> int:
        """Size of the full id space: the trained embedding table has this many rows."""
        buckets = self.config.char_buckets if self.config.char_ngrams else 0
        return self.char_offset + buckets

    @property
    def fused_offset(self) -> int:
        """Compact ids from here on are fused: ``fused_offset + i`` for vocabulary token ``i``."""
        return self.n_ids

    @property
    def n_compact_ids(self) -> int:
        """Size of the compact id space (full ids, then one fused id per vocabulary token)."""
        return self.n_ids + len(self.vocabulary)

    def fused_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """What each compact fused id stands for, as CSR arrays ``(ptr, ids)``: fused id
        ``fused_offset + i`` (vocabulary token ``i``) stands for the full ids
        ``ids[ptr[i]:ptr[i + 1]]``: a word for itself and its character n-grams, a head token for
        its ``head_repeat`` copies; a bigram has no fused id (an empty group)."""
        groups: list[list[int]] = []
        for i, token in enumerate(self.vocabulary):
            vid = i + N_SPECIAL
            if " " in token:  # bigrams stay plain ids
                groups.append([])
            elif "^" in token:  # a head token: its head_repeat copies
                groups.append([vid] * self.config.head_repeat)
            else:  # a word: itself and its character n-grams
                groups.append([vid, *self.char_ngram_ids(token)])
        ptr = np.zeros(len(groups) + 1, dtype=np.int64)
        ptr[1:] = np.cumsum([len(g) for g in groups])
        ids = np.fromiter((i for g in groups for i in g), dtype=np.int64, count=int(ptr[-1]))
        return ptr, ids

    # ---------------------------------------------------------------- reference
    def words_reference(self, title: str | None) -> list[str]:
        """Steps 1–2 for one title."""
        if title is None:
            return []
        cfg = self.config
        stop = set(cfg.stopwords)
        return [
            w
            for w in normalize_title(title, cfg.map_digits)
            if len(w) >= cfg.min_token_length and w not in stop
        ]

    def char_ngram_ids(self, word: str, n: int | None = None) -> list[int]:
        """The hashed character n-gram ids of one normalised word padded with spaces: of
        length `n`, or of every length (min to max, n by n)."""
        cfg = self.config
        if not cfg.char_ngrams:
            return []
        padded = f" {word} ".encode("ascii")
        sizes = range(cfg.char_ngram_min, cfg.char_ngram_max + 1) if n is None else (n,)
        return [self.char_offset + fnv1a_32(padded[p : p + k]) % cfg.char_buckets
                for k in sizes for p in range(len(padded) - k + 1)]

    def _features_reference(self, title: str | None) -> tuple[list[str], list[int], list[int], list[int]]:
        """(words, word ids, known head-token ids, known bigram ids) of one title."""
        cfg = self.config
        words = self.words_reference(title)
        ids = [self._index.get(w, UNK) for w in words]
        heads = [self._index.get(head_token(i + 1, w)) for i, w in enumerate(words[: cfg.head_words])]
        bigrams = [self._index.get(f"{a} {b}") for a, b in zip(words, words[1:])] if cfg.word_bigrams else []
        return words, ids, [h for h in heads if h is not None], [b for b in bigrams if b is not None]

    def encode_reference(self, title: str | None) -> list[int]:
        """The whole spec for one title, as a plain loop. Slow; the truth for tests."""
        cfg = self.config
        words, ids, heads, bigrams = self._features_reference(title)
        ids = ids + heads * cfg.head_repeat + bigrams
        if cfg.char_ngrams:
            for n in range(cfg.char_ngram_min, cfg.char_ngram_max + 1):  # n by n, word by word
                for w in words:
                    ids.extend(self.char_ngram_ids(w, n))
        return ids[: cfg.max_length]

    def encode_compact_reference(self, title: str | None) -> list[int]:
        """The compact ids of one title (see the class docstring), as a plain loop."""
        cfg = self.config
        words, ids, heads, bigrams = self._features_reference(title)
        grams = [self.char_ngram_ids(w) for w in words]
        if len(ids) + len(heads) * cfg.head_repeat + len(bigrams) + sum(map(len, grams)) > cfg.max_length:
            return self.encode_reference(title)  # truncated: the full ids
        out: list[int] = []
        for i, g in zip(ids, grams):
            out.extend([self.fused_offset + i - N_SPECIAL] if i != UNK else [UNK, *g])
        return out + [self.fused_offset + h - N_SPECIAL for h in heads] + bigrams

    # ---------------------------------------------------------------- compiled
    def encode_batch(self, titles: pa.Array | pa.ChunkedArray | Sequence[str | None], compact: bool = False) -> Encoded:
        """The whole spec for a batch of titles (nulls become all-padding rows), compiled.

        ``compact=True`` gives the compact ids the exported graph reads.
        """
        offsets, data = _string_buffers(titles)
        self._folding.ensure(offsets, data)
        cfg, f, v, s = self.config, self._folding, self._vocab_table, self._stop_table
        values, offsets = encode_titles(
            offsets, data, f.start, f.length, f.data,
            v.keys, v.key_start, v.values, v.slots, s.keys, s.key_start, s.values, s.slots,
            cfg.map_digits, cfg.min_token_length, cfg.word_bigrams, cfg.head_words, cfg.head_repeat,
            cfg.char_ngram_min, cfg.char_ngram_max if cfg.char_ngrams else 0, self.char_offset,
            max(1, cfg.char_buckets), cfg.max_length, compact, self.fused_offset,
        )
        return Encoded(values, offsets)

    # ---------------------------------------------------------------- vectorized words (vocabulary)
    def words_batch(self, titles: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Steps 1–2 for a batch: the kept words, flat, and the row each belongs to."""
        cfg = self.config
        s = pc.utf8_lower(titles)
        s = pc.utf8_normalize(s, form="NFKD")
        s = pc.replace_substring_regex(s, _ACCENTS_RE2, "")
        if cfg.map_digits:
            s = pc.replace_substring_regex(s, "[0-9]", "0")
        s = pc.replace_substring_regex(s, _NON_ALNUM, " ")
        lists = pc.ascii_split_whitespace(pc.utf8_trim_whitespace(s))
        words = pc.list_flatten(lists).cast(pa.string())
        rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        keep = pc.greater_equal(pc.utf8_length(words), cfg.min_token_length)
        if cfg.stopwords:
            keep = pc.and_(keep, pc.invert(pc.is_in(words, value_set=pa.array(cfg.stopwords, pa.string()))))
        keep_np = keep.to_numpy(zero_copy_only=False)
        return words.filter(keep), rows[keep_np]


def _string_buffers(titles) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, uint8 bytes) of a string array, nulls as empty strings."""
    if not isinstance(titles, (pa.Array, pa.ChunkedArray)):
        titles = pa.array(titles, type=pa.string())
    if isinstance(titles, pa.ChunkedArray):
        titles = titles.combine_chunks()
    if pa.types.is_dictionary(titles.type):
        titles = titles.dictionary_decode()
    if not pa.types.is_large_string(titles.type):
        titles = titles.cast(pa.large_string())
    if titles.null_count:
        titles = pc.fill_null(titles, "")
    bufs = titles.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64, count=len(titles) + 1, offset=titles.offset * 8)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, data


def head_token(position: int, word: str) -> str:
    """The head-word token of `word` at 1-based `position` (no word holds ``^``)."""
    return f"{position}^{word}"


def head_words(words: pa.Array, rows: np.ndarray, k: int) -> tuple[pa.Array, np.ndarray]:
    """`head_token` of each row's first `k` words (`words` grouped by row, in order)."""
    rank = _rank_in_row(rows, np.bincount(rows))
    take = np.flatnonzero(rank < k)
    positions = pa.array(rank[take] + 1).cast(pa.string())
    return pc.binary_join_element_wise(positions, words.take(pa.array(take)), "^"), rows[take]


def word_bigrams(words: pa.Array, rows: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """``"a b"`` for every two neighbouring words of a row, and the row of each."""
    pair = np.flatnonzero(rows[:-1] == rows[1:]) if len(rows) > 1 else np.zeros(0, np.int64)
    left, right = words.take(pa.array(pair)), words.take(pa.array(pair + 1))
    return pc.binary_join_element_wise(left, right, " "), rows[pair]


def _rank_in_row(rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each entry's rank among its row's entries (`rows` sorted, `counts` = bincount of rows)."""
    starts = np.cumsum(counts) - counts  # index of each row's first entry
    return np.arange(len(rows), dtype=np.int64) - starts[rows]
