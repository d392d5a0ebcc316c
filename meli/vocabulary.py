"""The vocabulary: words, word bigrams and position-tagged head words seen in the training titles.

Index 0 is padding and 1 is unknown (`meli.tokenizer.PAD`, `UNK`); token ``i`` of the
vocabulary has id ``i + 2``. Built from training titles only, most frequent first.

Counting streams: `VocabularyCounter` takes the titles chunk by chunk and keeps Arrow tables
of (token, count) per kind, summed whenever they pass ``max_distinct`` rows, so its memory
follows the number of distinct tokens, not of titles. When the distinct tokens pass ``max_distinct`` it drops the
ones seen once so far (fastText's pruning, with the same caveat: a token seen once in each of
many far-apart chunks can be lost); below that bound the counts, and so the vocabulary, are
exact.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from meli.tokenizer import Tokenizer, TokenizerConfig, head_words, word_bigrams


@dataclass(frozen=True)
class VocabularyConfig:
    """How the vocabulary is filtered; recorded with the model."""

    min_count: int = 2  # a word or bigram seen fewer times is left to the char n-grams
    max_size: int = 200_000
    bigram_min_count: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def build_vocabulary(
    titles: pa.Array | pa.ChunkedArray, tokenizer: TokenizerConfig, config: VocabularyConfig = VocabularyConfig(),
    chunk_rows: int = 200_000,
) -> tuple[str, ...]:
    """Count words (and bigrams and head words, when the tokenizer uses them) and keep the frequent ones.

    Ties are broken alphabetically so that the same titles always give the same ids.
    """
    counter = VocabularyCounter(tokenizer, config)
    if isinstance(titles, pa.ChunkedArray):
        titles = titles.combine_chunks()
    # two chunks counted at once (Arrow's kernels release the GIL), merged in order
    with ThreadPoolExecutor(2, thread_name_prefix="meli-vocabulary") as pool:
        pending: deque = deque()
        for start in range(0, len(titles), chunk_rows):
            pending.append(pool.submit(counter.count, titles.slice(start, chunk_rows)))
            if len(pending) > 2:
                counter.merge(pending.popleft().result())
        while pending:
            counter.merge(pending.popleft().result())
    return counter.vocabulary()


class VocabularyCounter:
    """Token counts over titles given chunk by chunk (see the module docstring)."""

    KINDS = ("word", "bigram", "head")

    def __init__(self, tokenizer: TokenizerConfig, config: VocabularyConfig = VocabularyConfig(),
                 max_distinct: int = 20_000_000):
        self.tokenizer, self.config, self.max_distinct = tokenizer, config, max_distinct
        self._words = Tokenizer(tokenizer, ())
        self._tables: dict[str, list[pa.Table]] = {}  # per kind: (token, count) tables, not yet summed
        self.pruned = 0  # distinct tokens dropped by pruning

    def add(self, titles: pa.Array) -> None:
        self.merge(self.count(titles))

    def count(self, titles: pa.Array) -> dict[str, pa.Table]:
        """The (token, count) tables of one chunk, by kind (reads nothing of this counter's state)."""
        words, rows = self._words.words_batch(titles)
        out = {"word": _counts(words)}
        if self.tokenizer.word_bigrams:
            out["bigram"] = _counts(word_bigrams(words, rows)[0])
        if self.tokenizer.head_words:
            out["head"] = _counts(head_words(words, rows, self.tokenizer.head_words)[0])
        return out

    def merge(self, chunk: dict[str, pa.Table]) -> None:
        """Add one chunk's counts (`count`). They are summed with the others lazily, once the
        tables held pass ``max_distinct`` rows or the vocabulary is asked for: one grouping
        over many chunks instead of one per chunk over everything counted so far."""
        for kind, table in chunk.items():
            if table.num_rows:
                self._tables.setdefault(kind, []).append(table)
        if sum(t.num_rows for tables in self._tables.values() for t in tables) > self.max_distinct:
            self._sum()
            if sum(t.num_rows for t in self.counts.values()) > self.max_distinct:
                self._prune()

    @property
    def counts(self) -> dict[str, pa.Table]:
        """(token, count) per kind, summed over every chunk so far."""
        self._sum()
        return {kind: tables[0] for kind, tables in self._tables.items()}

    def _sum(self) -> None:
        for kind, tables in self._tables.items():
            if len(tables) > 1:
                both = pa.concat_tables(tables)
                self._tables[kind] = [both.group_by("token").aggregate([("count", "sum")]).rename_columns(["token", "count"])]

    def _prune(self) -> None:
        for kind, table in self.counts.items():
            keep = pc.greater(table["count"], 1)
            self.pruned += table.num_rows - pc.sum(keep).as_py()
            self._tables[kind] = [table.filter(keep)]

    def vocabulary(self) -> tuple[str, ...]:
        """The kept tokens, most frequent first (ties alphabetically)."""
        minimum = {"word": self.config.min_count, "bigram": self.config.bigram_min_count, "head": self.config.min_count}
        kept = [table.filter(pc.greater_equal(table["count"], minimum[kind])) for kind, table in self.counts.items()]
        if not kept:
            return ()
        table = pa.concat_tables(kept)
        # Arrow orders strings by their UTF-8 bytes: by code point, as Python's sorted() does
        order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("token", "ascending")])
        return tuple(table["token"].take(order[: self.config.max_size]).to_pylist())


def _counts(tokens: pa.Array) -> pa.Table:
    counts = pc.value_counts(tokens)
    return pa.table({"token": counts.field("values").cast(pa.string()), "count": counts.field("counts").cast(pa.int64())})
