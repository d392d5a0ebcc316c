"""Titles → token ids: the one tokenizer that training and scoring share.

One specification, two implementations:

- `Tokenizer.encode_reference(title)` is a plain per-title Python loop: the readable spec.
- `Tokenizer.encode_batch(titles)` is vectorized over a pyarrow string array (Arrow string
  kernels + numpy), the path training and scoring use. Tests prove they agree id for id.

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
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAD = 0
UNK = 1
N_SPECIAL = 2

FNV_OFFSET = 2166136261
FNV_PRIME = 16777619

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
            raise ValueError(f"unknown tokenizer settings: {sorted(unknown)}")
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
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFF
    return h


@dataclass(frozen=True)
class Encoded:
    """A batch of encoded titles: right-padded ids and the true length of each row."""

    ids: np.ndarray  # (B, T) int64, T = min(max_length, longest row), at least 1
    lengths: np.ndarray  # (B,) int64, ids before padding (after truncation)


@dataclass
class Tokenizer:
    """A `TokenizerConfig` plus the vocabulary (words and bigrams) it maps to ids."""

    config: TokenizerConfig
    vocabulary: Sequence[str]
    _index: dict[str, int] = field(init=False, repr=False)
    _value_set: pa.Array = field(init=False, repr=False)
    _stopword_set: pa.Array = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.vocabulary = tuple(self.vocabulary)
        self._index = {tok: i + N_SPECIAL for i, tok in enumerate(self.vocabulary)}
        if len(self._index) != len(self.vocabulary):
            raise ValueError("vocabulary has duplicate tokens")
        self._value_set = pa.array(self.vocabulary, type=pa.string())
        self._stopword_set = pa.array(self.config.stopwords, type=pa.string())

    @property
    def char_offset(self) -> int:
        return N_SPECIAL + len(self.vocabulary)

    @property
    def n_ids(self) -> int:
        """Size of the id space: the embedding table needs this many rows."""
        buckets = self.config.char_buckets if self.config.char_ngrams else 0
        return self.char_offset + buckets

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

    def encode_reference(self, title: str | None) -> list[int]:
        """The whole spec for one title, as a plain loop. Slow; the truth for tests."""
        cfg = self.config
        words = self.words_reference(title)
        ids = [self._index.get(w, UNK) for w in words]
        heads = [self._index.get(head_token(i + 1, w)) for i, w in enumerate(words[: cfg.head_words])]
        ids.extend([h for h in heads if h is not None] * cfg.head_repeat)
        if cfg.word_bigrams:
            for a, b in zip(words, words[1:]):
                if (i := self._index.get(f"{a} {b}")) is not None:
                    ids.append(i)
        if cfg.char_ngrams:
            for n in range(cfg.char_ngram_min, cfg.char_ngram_max + 1):
                for w in words:
                    padded = f" {w} ".encode("ascii")
                    for p in range(len(padded) - n + 1):
                        h = fnv1a_32(padded[p : p + n])
                        ids.append(self.char_offset + h % cfg.char_buckets)
        return ids[: cfg.max_length]

    # ---------------------------------------------------------------- vectorized
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
        if len(self._stopword_set):
            keep = pc.and_(keep, pc.invert(pc.is_in(words, value_set=self._stopword_set)))
        keep_np = keep.to_numpy(zero_copy_only=False)
        return words.filter(keep), rows[keep_np]

    def _lookup(self, tokens: pa.Array) -> np.ndarray:
        """Vocabulary ids of `tokens`, -1 where unknown."""
        if len(tokens) == 0 or len(self._value_set) == 0:
            return np.full(len(tokens), -1, dtype=np.int64)
        pos = pc.index_in(tokens, value_set=self._value_set)
        pos = pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.where(pos >= 0, pos + N_SPECIAL, -1)

    def _char_ngrams(self, words: pa.Array, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Hashed n-grams of every padded word, one (rows, ids) pair per n."""
        cfg = self.config
        padded = pc.binary_join_element_wise(" ", words, " ", "")
        padded = padded.combine_chunks() if isinstance(padded, pa.ChunkedArray) else padded
        off = np.frombuffer(padded.buffers()[1], dtype=np.int32, count=len(padded) + 1, offset=padded.offset * 4)
        off = off.astype(np.int64)
        data = np.frombuffer(padded.buffers()[2], dtype=np.uint8)[off[0] : off[-1]]
        off -= off[0]
        lengths = np.diff(off)
        word_end = np.repeat(off[1:], lengths)  # (bytes,) end of the word each byte is in
        word_row = np.repeat(rows, lengths)
        h = np.full(len(data), FNV_OFFSET, dtype=np.uint32)
        out = []
        positions = np.arange(len(data), dtype=np.int64)
        for n in range(1, cfg.char_ngram_max + 1):
            # h[p] becomes the hash of data[p : p + n]; where p + n runs past the buffer
            # the window is invalid anyway, so any byte will do.
            nxt = data[np.minimum(positions + n - 1, len(data) - 1)].astype(np.uint32)
            h = (h ^ nxt) * np.uint32(FNV_PRIME)
            if n >= cfg.char_ngram_min:
                valid = positions + n <= word_end
                ids = self.char_offset + (h[valid] % np.uint32(cfg.char_buckets)).astype(np.int64)
                out.append((word_row[valid], ids))
        return out

    def encode_batch(self, titles: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> Encoded:
        """The whole spec for a batch of titles (nulls become all-padding rows)."""
        if not isinstance(titles, (pa.Array, pa.ChunkedArray)):
            titles = pa.array(titles, type=pa.string())
        if isinstance(titles, pa.ChunkedArray):
            titles = titles.combine_chunks()
        if pa.types.is_large_string(titles.type) or pa.types.is_string_view(titles.type):
            titles = titles.cast(pa.string())
        n_rows = len(titles)
        cfg = self.config
        words, rows = self.words_batch(titles)

        ids = self._lookup(words)
        groups = [(rows, np.where(ids >= 0, ids, UNK))]
        if cfg.head_words:
            heads, head_rows = head_words(words, rows, cfg.head_words)
            hi = self._lookup(heads)
            known = hi >= 0
            groups.extend([(head_rows[known], hi[known])] * cfg.head_repeat)
        if cfg.word_bigrams:
            bigrams, bigram_rows = word_bigrams(words, rows)
            bi = self._lookup(bigrams)
            known = bi >= 0
            groups.append((bigram_rows[known], bi[known]))
        if cfg.char_ngrams and len(words):
            groups.extend(self._char_ngrams(words, rows))
        return _pack(groups, n_rows, cfg.max_length)


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


def _pack(groups: list[tuple[np.ndarray, np.ndarray]], n_rows: int, max_length: int) -> Encoded:
    """Lay out feature groups row by row, group after group, without sorting.

    Within each group the entries are already ordered by row, so an entry's position is the
    row's count in earlier groups plus its rank among the row's entries in this group.
    """
    base = np.zeros(n_rows, dtype=np.int64)
    placed_rows, placed_pos, placed_ids = [], [], []
    for rows, ids in groups:
        counts = np.bincount(rows, minlength=n_rows)
        pos = base[rows] + _rank_in_row(rows, counts)
        keep = pos < max_length
        placed_rows.append(rows[keep])
        placed_pos.append(pos[keep])
        placed_ids.append(ids[keep])
        base += counts
    lengths = np.minimum(base, max_length)
    width = max(1, int(lengths.max(initial=0)))
    out = np.zeros((n_rows, width), dtype=np.int64)
    out[np.concatenate(placed_rows), np.concatenate(placed_pos)] = np.concatenate(placed_ids)
    return Encoded(ids=out, lengths=lengths)
