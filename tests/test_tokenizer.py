"""The tokenizer: the vectorized path must give exactly the reference's ids."""

from __future__ import annotations

import dataclasses
import gzip
import json

import numpy as np
import pyarrow as pa
import pytest

from meli.dataset import load_labelled
from meli.golden import HOSTILE_TITLES, build_golden, load_golden
from meli.demo_catalog import DEMO_DIR
from meli.tokenizer import PAD, UNK, Tokenizer, TokenizerConfig, fnv1a_32, load_stopwords, normalize_title
from meli.vocabulary import VocabularyConfig, build_vocabulary

EDGE_CASES = list(HOSTILE_TITLES)  # the golden vectors' hostile strings (meli/golden.py)


def assert_agree(tok: Tokenizer, titles: list) -> None:
    """The compiled path gives the reference's ids, full and compact, on every title."""
    for compact, reference in ((False, tok.encode_reference), (True, tok.encode_compact_reference)):
        enc = tok.encode_batch(pa.array(titles, type=pa.string()), compact=compact)
        assert enc.ids.dtype == np.int64 and enc.ids.shape[0] == len(titles)
        for i, title in enumerate(titles):
            ref = reference(title)
            n = enc.lengths[i]
            assert list(enc.ids[i, :n]) == ref, (compact, title)
            assert (enc.ids[i, n:] == PAD).all()


@pytest.fixture(scope="module")
def demo_titles() -> list:
    return load_labelled(DEMO_DIR / "train.jsonl.gz").titles.to_pylist()


CONFIGS = {
    "default": TokenizerConfig(stopwords=load_stopwords()),
    "words-only": TokenizerConfig(word_bigrams=False, char_ngram_max=0),
    "head-words": TokenizerConfig(stopwords=load_stopwords(), head_words=2, head_repeat=3),
    "digits-short": TokenizerConfig(map_digits=True, min_token_length=2, char_ngram_min=1, char_ngram_max=3, char_buckets=97, max_length=12),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_vectorized_matches_reference(name, demo_titles):
    config = CONFIGS[name]
    tok = Tokenizer(config, build_vocabulary(pa.array(demo_titles), config))
    assert_agree(tok, demo_titles + EDGE_CASES)


@pytest.mark.parametrize("name", ["default", "head-words"])
def test_vectorized_matches_reference_on_real_titles(name, shared_data):
    titles = [json.loads(line)["title"] for split in ("train", "validation")
              for line in gzip.open(shared_data / "meli-es" / f"{split}.jsonl.gz", "rt")]
    raw = (shared_data / "meli-2019-raw" / "test-sample.csv").read_text("utf-8").splitlines()[1:]
    config = CONFIGS[name]
    tok = Tokenizer(config, build_vocabulary(pa.array(titles[:3000]), config))
    assert_agree(tok, titles + raw + EDGE_CASES)


def test_normalisation_folds_accents_and_splits_punctuation():
    assert normalize_title("Pañal 1/2 12V® 😀") == ["panal", "1", "2", "12v"]
    assert normalize_title("CANCIÓN Ação") == ["cancion", "acao"]
    assert normalize_title("Talle 42", map_digits=True) == ["talle", "00"]
    assert normalize_title("®™") == []


def test_stopwords_ship_with_the_package_normalised():
    words = load_stopwords()
    assert {"de", "para", "con", "mais", "voce", "tambien"} <= set(words)
    assert "mi" not in words  # "Xiaomi Mi" is a product, not a stopword
    with pytest.raises(ValueError, match="no stopword list"):
        load_stopwords(["klingon"])


def test_ids_follow_the_contract():
    config = TokenizerConfig(stopwords=("de",), char_ngram_max=0)
    tok = Tokenizer(config, ("bolso", "maternal", "bolso maternal"))
    # words first (unknown -> UNK), then known bigrams, formed after stopwords are dropped
    assert tok.encode_reference("Bolso de Maternal Rojo") == [2, 3, UNK, 4]
    assert tok.encode_reference("maternal bolso") == [3, 2]
    assert tok.n_ids == 5


def test_head_words_tag_the_first_words_by_position():
    config = TokenizerConfig(stopwords=("de",), char_ngram_max=0, word_bigrams=False, head_words=2)
    tok = Tokenizer(config, ("bolso", "maternal", "1^bolso", "2^maternal", "1^maternal"))
    # after the words, the first two kept words again as "1^word", "2^word" where known
    assert tok.encode_reference("De Bolso de Maternal Rojo") == [2, 3, UNK, 4, 5]
    assert tok.encode_reference("Maternal Bolso") == [3, 2, 6]  # "2^bolso" is unknown: dropped
    assert tok.encode_reference("Rojo Bolso Maternal") == [UNK, 2, 3]  # "1^rojo" unknown
    assert list(tok.encode_batch(["Maternal Bolso"]).ids[0]) == [3, 2, 6]
    tok = Tokenizer(dataclasses.replace(config, head_repeat=2), tok.vocabulary)
    assert tok.encode_reference("Bolso Maternal") == [2, 3, 4, 5, 4, 5]  # the group, twice
    assert list(tok.encode_batch(["Bolso Maternal"]).ids[0]) == [2, 3, 4, 5, 4, 5]


def test_char_ngrams_hash_padded_words():
    config = TokenizerConfig(word_bigrams=False, char_ngram_min=3, char_ngram_max=3, char_buckets=1000)
    tok = Tokenizer(config, ())
    expected = [tok.char_offset + fnv1a_32(g.encode()) % 1000 for g in (" ab", "ab ")]
    assert tok.encode_reference("AB") == [UNK] + expected
    assert fnv1a_32(b"a") == 0xE40C292C  # the published FNV-1a 32-bit test vector


def test_truncation_and_shapes():
    config = TokenizerConfig(max_length=5)
    tok = Tokenizer(config, ())
    enc = tok.encode_batch(["uno dos tres cuatro cinco seis siete", None, ""])
    assert enc.ids.shape == (3, 5)
    assert list(enc.lengths) == [5, 0, 0]
    empty = tok.encode_batch(pa.array([], pa.string()))
    assert empty.ids.shape == (0, 1)


def test_two_encoded_batches_concatenate_to_the_encoding_of_all_their_titles(demo_titles):
    config = CONFIGS["default"]
    tok = Tokenizer(config, build_vocabulary(pa.array(demo_titles), config))
    first, second = demo_titles[:7] + [None, ""], ["", *demo_titles[7:20]]
    both = tok.encode_batch(pa.array(first)).concat(tok.encode_batch(pa.array(second)))
    whole = tok.encode_batch(pa.array(first + second))
    assert np.array_equal(both.offsets, whole.offsets) and np.array_equal(both.values, whole.values)
    assert np.array_equal(both.ids, whole.ids)


def test_config_round_trips_and_rejects_unknown_settings():
    config = CONFIGS["digits-short"]
    assert TokenizerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown tokenizer setting\(s\) "):
        TokenizerConfig.from_dict({**config.to_dict(), "lowercase": True})
    with pytest.raises(ValueError):
        dataclasses.replace(config, max_length=0)


def test_vocabulary_is_built_from_training_titles_only_and_deterministic():
    titles = pa.array(["funda iphone", "Funda iPhone 11", "funda samsung", "cable usb"])
    config = TokenizerConfig(char_ngram_max=0)
    vocab = build_vocabulary(titles, config, VocabularyConfig(min_count=2, bigram_min_count=2))
    assert vocab == ("funda", "funda iphone", "iphone")  # most frequent first, ties alphabetical
    assert build_vocabulary(titles, config, VocabularyConfig(min_count=1, max_size=2)) == ("funda", "funda iphone")
    assert build_vocabulary(pa.array([None, ""]), config) == ()
    heads = dataclasses.replace(config, head_words=1, word_bigrams=False)
    vocab = build_vocabulary(titles, heads, VocabularyConfig(min_count=2))
    assert vocab == ("1^funda", "funda", "iphone")  # "1^funda" starts three titles; "1^cable" one


def test_vocabulary_counted_in_chunks_is_the_one_counted_at_once(demo_titles):
    """Counting streams (chunks summed lazily) and ranks like Python's sorted() on (-count,
    token), accented titles included; pruning (past `max_distinct` distinct
    tokens) drops only tokens seen once so far, so the frequent ones stay."""
    from collections import Counter

    from meli.vocabulary import VocabularyCounter

    titles = pa.array(demo_titles + ["Ñandú ñoño", "ñandu Ñoño", "日本 中文", "日本 中文", "Zapato zapato ß ß"])
    config = TokenizerConfig(char_ngram_max=0, head_words=1)
    vocabulary = VocabularyConfig(min_count=1, bigram_min_count=1, max_size=10**6)
    whole = build_vocabulary(titles, config, vocabulary, chunk_rows=len(titles))
    assert build_vocabulary(titles, config, vocabulary, chunk_rows=37) == whole
    counter = VocabularyCounter(config, vocabulary)
    counter.add(titles)
    counts = {kind: dict(zip(t["token"].to_pylist(), t["count"].to_pylist())) for kind, t in counter.counts.items()}
    merged = Counter({tok: n for table in counts.values() for tok, n in table.items()})
    assert whole == tuple(tok for _, tok in sorted((-n, tok) for tok, n in merged.items()))
    assert {"nandu", "nono", "nandu nono", "1^nandu"} <= set(whole)  # accents folded
    pruned = VocabularyCounter(config, vocabulary, max_distinct=500)
    for start in range(0, len(titles), 100):
        pruned.add(titles.slice(start, 100))
    assert pruned.pruned > 0
    frequent = [tok for tok, n in merged.most_common(20)]
    assert set(frequent) <= set(pruned.vocabulary())
    kept = {tok: n for t in pruned.counts.values() for tok, n in zip(t["token"].to_pylist(), t["count"].to_pylist())}
    assert all(n <= merged[tok] for tok, n in kept.items())  # counts can only be lost, never invented


def test_compact_ids_fuse_words_and_head_words():
    config = TokenizerConfig(stopwords=("de",), char_ngram_min=3, char_ngram_max=3, char_buckets=1000, head_words=1,
                             head_repeat=3)
    tok = Tokenizer(config, ("bolso", "1^bolso", "bolso maternal"))
    fused = tok.fused_offset
    assert fused == tok.n_ids == 2 + 3 + 1000 and tok.n_compact_ids == fused + 3
    grams = tok.char_ngram_ids("maternal")
    # full: words, the head group three times, the bigram, then every word's n-grams
    assert tok.encode_reference("Bolso de Maternal") == [2, UNK, 3, 3, 3, 4, *tok.char_ngram_ids("bolso"), *grams]
    # compact: "bolso" and its n-grams as one id, "1^bolso" x3 as one id, the unknown word spelled out
    assert tok.encode_compact_reference("Bolso de Maternal") == [fused + 0, UNK, *grams, fused + 1, 4]
    assert list(tok.encode_batch(["Bolso de Maternal"], compact=True).ids[0]) == [fused, UNK, *grams, fused + 1, 4]
    # a title the full encoding truncates keeps its full ids
    short = Tokenizer(dataclasses.replace(config, max_length=4), tok.vocabulary)
    assert short.encode_compact_reference("Bolso Maternal") == short.encode_reference("Bolso Maternal") == [2, UNK, 3, 3]


def test_the_shipped_golden_vectors_hold():
    """docs/tokenizer.md's proof: every shipped case, full and compact, by the reference and
    by the compiled path. A change that moves any id changes every trained model's input."""
    golden = load_golden()
    tok = golden.tokenizer
    assert len(golden.cases) >= 300 and any(c.title is None for c in golden.cases)
    titles = pa.array([c.title for c in golden.cases], pa.string())
    for compact in (False, True):
        enc = tok.encode_batch(titles, compact=compact)
        for i, case in enumerate(golden.cases):
            expected = case.compact_ids if compact else case.ids
            assert enc.ids[i, : enc.lengths[i]].tolist() == expected, (compact, case.title)
            reference = tok.encode_compact_reference if compact else tok.encode_reference
            assert reference(case.title) == expected


def test_the_golden_vectors_are_what_the_generator_writes():
    fresh, shipped = build_golden(), load_golden()
    assert fresh.tokenizer.vocabulary == shipped.tokenizer.vocabulary
    assert fresh.tokenizer.config == shipped.tokenizer.config
    assert fresh.cases == shipped.cases


@pytest.mark.parametrize("compact", [False, True])
def test_threads_encoding_at_once_give_one_thread_s_ids(compact):
    """`encode_batch` from several threads at once (training encodes two chunks at a time)
    gives the ids one thread gives: the table of folded characters, filled as new ones
    appear, is never read half-filled."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    letters = [chr(c) for c in range(0xC0, 0x2000) if chr(c).isalpha()]  # thousands of code points to fold
    words = ["".join(rng.choice(letters, 6)) + "ção" for _ in range(3000)]
    chunks = [pa.array([" ".join(rng.choice(words, 8)) for _ in range(400)]) for _ in range(24)]
    vocabulary = tuple(sorted(set(words[:1500])))
    config = TokenizerConfig(stopwords=())
    serial = Tokenizer(config, vocabulary)
    expected = [serial.encode_batch(c, compact=compact) for c in chunks]
    for _ in range(5):
        shared = Tokenizer(config, vocabulary)  # an empty table of folded characters
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda c: shared.encode_batch(c, compact=compact), chunks))
        for a, b in zip(expected, got):
            assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.values, b.values)
    import pickle  # the lock stays behind: a tokenizer still pickles (Spark ships it to its workers)

    again = pickle.loads(pickle.dumps(shared)).encode_batch(chunks[0], compact=compact)
    assert np.array_equal(again.values, expected[0].values)
