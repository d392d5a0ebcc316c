"""What a top probability is worth on short titles: the table behind the report's estimate."""

import numpy as np
import pyarrow as pa
import pytest

from meli.reliability import PRIOR_TITLES, WORD_EDGES, Reliability, WordCounter, shortened, title_shapes


def test_shortened_copies_are_the_first_words_and_the_titles_without_their_first_words():
    titles, labels = shortened(pa.array(["a b c d e f g h", "x y", None]), np.array([0, 1, 2]))
    assert titles.to_pylist() == [
        "a b c d e f g h", "x y", None,  # as they are
        "a", "x", "a b", "a b c", "a b c d", "a b c d e f",  # first 1, 2, 3, 4, 6 words
        "b c d e f g h", "y", "c d e f g h",  # without the first 1, 2
    ]
    assert labels.tolist() == [0, 1, 2, 0, 1, 0, 0, 0, 0, 0, 1, 0]


def overconfident_short_titles(n: int = 4000, seed: int = 0):
    """Two-word titles at p = 0.95 right 60% of the time; ten-word ones at p = 0.8 right 95%."""
    rng = np.random.default_rng(seed)
    short = np.arange(n) % 2 == 0
    p = np.where(short, 0.95, 0.8)
    right = rng.random(n) < np.where(short, 0.6, 0.95)
    words = np.where(short, 2, 10)
    return p, right, words, np.ones(n, bool), short


def test_the_table_lowers_what_the_model_is_too_sure_of_and_never_raises():
    p, right, words, first, short = overconfident_short_titles()
    table = Reliability.fit(p, right, words, first)
    q = table.right_chance(p, words, first)
    n_short = short.sum()
    expected = 0.95 + (right[short].sum() - 0.95 * n_short) / (n_short + PRIOR_TITLES)
    assert q[short] == pytest.approx(expected) and abs(q[short][0] - right[short].mean()) < 0.01
    assert np.array_equal(q[~short], p[~short])  # under-confident there: left as the temperature made it
    # a cell it never saw (one word, first word unknown) keeps its probability
    assert table.right_chance(np.array([0.97]), np.array([1]), np.array([False]))[0] == pytest.approx(0.97)


def test_a_cell_with_few_titles_is_shrunk_towards_no_correction():
    p, right = np.full(5, 0.9), np.zeros(5, bool)  # five wrong titles
    table = Reliability.fit(p, right, np.full(5, 3), np.ones(5, bool))
    q = table.right_chance(np.array([0.9]), np.array([3]), np.array([True]))[0]
    assert q == pytest.approx(0.9 - 0.9 * 5 / (5 + PRIOR_TITLES)) and q > 0.7


def test_the_table_keeps_the_shape_of_the_titles_as_they_are():
    """Known-word bins and first word known, of the validation titles themselves (not their copies)."""
    p, right, words, first, short = overconfident_short_titles()
    table = Reliability.fit(p, right, words, first, as_they_are=~short)
    assert table.validation_shapes.tolist() == title_shapes(words[~short], first[~short]).tolist()
    assert table.validation_shapes[1, WORD_EDGES.index(8)] == (~short).sum() and table.validation_shapes.sum() == (~short).sum()
    assert title_shapes(np.array([0, 1, 12, 7]), np.array([False, True, True, False])).tolist() == [
        [1, 0, 0, 0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 1]]


def test_the_table_travels_as_json_and_a_table_of_other_bins_is_ignored():
    p, right, words, first, _ = overconfident_short_titles()
    table = Reliability.fit(p, right, words, first)
    back = Reliability.of({"reliability_by_known_words": table.to_json()})
    assert np.allclose(back.correction, table.correction, atol=1e-6) and np.array_equal(back.rows, table.rows)
    assert np.array_equal(back.validation_shapes, table.validation_shapes)
    assert Reliability.from_json('{"word_edges": [0, 5], "confidence_edges": [0.0], "correction": [], "rows": []}') is None
    assert Reliability.of({}) is None


@pytest.mark.parametrize("compact", [False, True])
def test_known_words_and_a_known_first_word_are_counted_per_title(trained, compact):
    """In either encoding the model reads: known words (not bigrams, head tokens or n-grams),
    and whether the first word is known as a first word."""
    tokenizer = trained["mlp"].checkpoint.tokenizer()
    vocab = set(tokenizer.vocabulary)
    words = [w for w in tokenizer.vocabulary if "^" not in w and " " not in w]
    first = next(w for w in words if f"1^{w}" in vocab)
    other = next(w for w in words if f"1^{w}" not in vocab and w != first)
    titles = pa.array([f"{first} {other}", f"{other} {first}", "zzqx", "", f"{first} zzqx {other} {other}"])
    counter = WordCounter(tokenizer)
    known, first_known = counter.known_per_row(tokenizer.encode_batch(titles, compact=compact))
    assert known.tolist() == [2, 2, 0, 0, 3]
    assert first_known.tolist() == [True, False, False, False, True]
