"""The vocabulary: words, word bigrams and position-tagged head words seen in the training titles.

Index 0 is padding and 1 is unknown (`meli.tokenizer.PAD`, `UNK`); token ``i`` of the
vocabulary has id ``i + 2``. Built from training titles only, most frequent first.
"""

from __future__ import annotations

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
    titles: pa.Array | pa.ChunkedArray, tokenizer: TokenizerConfig, config: VocabularyConfig = VocabularyConfig()
) -> tuple[str, ...]:
    """Count words (and bigrams and head words, when the tokenizer uses them) and keep the frequent ones.

    Ties are broken alphabetically so that the same titles always give the same ids.
    """
    if isinstance(titles, pa.ChunkedArray):
        titles = titles.combine_chunks()
    words, rows = Tokenizer(tokenizer, ()).words_batch(titles)
    candidates = [_frequent(words, config.min_count)]
    if tokenizer.word_bigrams:
        bigrams, _ = word_bigrams(words, rows)
        candidates.append(_frequent(bigrams, config.bigram_min_count))
    if tokenizer.head_words:
        heads, _ = head_words(words, rows, tokenizer.head_words)
        candidates.append(_frequent(heads, config.min_count))
    ranked = sorted((pair for c in candidates for pair in c), key=lambda tc: (-tc[1], tc[0]))
    return tuple(tok for tok, _ in ranked[: config.max_size])


def _frequent(tokens: pa.Array, min_count: int) -> list[tuple[str, int]]:
    if len(tokens) == 0:
        return []
    counts = pc.value_counts(tokens)
    values = counts.field("values").to_pylist()
    freq = counts.field("counts").to_numpy()
    return [(v, int(c)) for v, c in zip(values, freq) if c >= min_count]
