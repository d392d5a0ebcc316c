"""The on-disk shards every fit reads (meli.train.shards): what goes in comes back, each row
once an epoch, in windows of bounded size, with compact sparse targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import small_config
from meli.errors import MeliError
from meli.train.distill import SparseTargets, soft_cross_entropy
from meli.train.shards import Corpus, Expander, ShardWriter, Shards, TargetWriter, concat_windows, scattered_chunks
from meli.train.trainer import fit_tokenizer


@pytest.fixture(scope="module")
def tokenizer(demo_splits):
    return fit_tokenizer(small_config("mlp"), demo_splits[0])


def write(folder, tokenizer, titles, labels, compact: bool, chunk: int = 700) -> Shards:
    writer = ShardWriter(folder, compact)
    for start in range(0, len(titles), chunk):
        writer.append(tokenizer.encode_batch(titles.slice(start, chunk), compact=compact), labels[start : start + chunk])
    return writer.close()


@pytest.mark.parametrize("compact", [True, False])
def test_titles_written_in_chunks_read_back_as_encoded(tokenizer, demo_splits, tmp_path, compact):
    titles = demo_splits[0].titles
    labels = np.arange(len(titles)) % 37
    shards = write(tmp_path / "s", tokenizer, titles, labels, compact)
    assert len(shards) == len(titles) and shards.compact == compact and not shards.target_k
    back = concat_windows(list(shards.chunks(999)))
    whole = tokenizer.encode_batch(titles, compact=compact)
    assert np.array_equal(back.encoded.offsets, whole.offsets) and np.array_equal(back.encoded.values, whole.values)
    assert np.array_equal(back.labels, labels)
    # what the model reads: the full ids of each title (compact ones widened, in another order)
    corpus = Corpus((shards,), Expander.of(tokenizer) if compact else None)
    rows = np.array([0, 5, 17, len(titles) - 1])
    full = tokenizer.encode_batch(titles.take(rows))
    for got, want in zip(corpus.ids(back, rows), full.ids):
        assert sorted(got[got != 0]) == sorted(want[want != 0])
    values, offsets = corpus.flat(back, rows)
    assert [sorted(values[a:b]) for a, b in zip(offsets[:-1], offsets[1:])] == \
        [sorted(full.values[a:b]) for a, b in zip(full.offsets[:-1], full.offsets[1:])]


def test_an_epoch_reads_every_row_once_in_bounded_shuffled_windows(tokenizer, demo_splits, tmp_path):
    titles = demo_splits[0].titles
    n = len(titles)
    labels = np.arange(n)  # a row's label is its number: which rows a window holds
    first = write(tmp_path / "a", tokenizer, titles, labels, True)
    second = write(tmp_path / "b", tokenizer, titles.slice(0, 1000), n + np.arange(1000), True)
    corpus = Corpus((first, second), Expander.of(tokenizer))
    windows = list(corpus.windows(np.random.default_rng(0), window_rows=1024, block_rows=256))
    assert max(len(w) for w in windows) <= 1024 and len(windows) >= (n + 1000) // 1024
    seen = np.concatenate([w.labels for w in windows])
    assert np.array_equal(np.sort(seen), np.arange(n + 1000))  # each row once
    assert not np.array_equal(seen, np.sort(seen))  # shuffled
    again = np.concatenate([w.labels for w in corpus.windows(np.random.default_rng(0), 1024, 256)])
    assert np.array_equal(seen, again)  # the same seed, the same order
    batches = sum(-(-len(w) // 128) for w in windows)
    assert batches <= corpus.steps(128, window_rows=1024, block_rows=256)
    # a window's titles are its rows' titles
    w = windows[-1]
    whole = tokenizer.encode_batch(titles, compact=True)
    for i in range(0, len(w), 97):
        row = int(w.labels[i])
        want = whole.values[whole.offsets[row] : whole.offsets[row + 1]] if row < n else None
        if want is not None:
            assert np.array_equal(w.encoded.values[w.encoded.offsets[i] : w.encoded.offsets[i + 1]], want)


@pytest.mark.parametrize("n_labels, idx_type", [(632, np.uint16), (70_000, np.int32)])
def test_targets_are_stored_compact_and_stand_for_the_dense_ones(tokenizer, demo_splits, tmp_path, n_labels, idx_type):
    """Category indices as uint16 (int32 past 65,536 categories), probabilities as float16: a
    quarter or half of the bytes, with the loss within float16's rounding of the exact one."""
    titles = demo_splits[0].titles.slice(0, 3000)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, n_labels, len(titles))
    probs = rng.dirichlet(np.full(n_labels, 0.05), len(titles)).astype(np.float32) if n_labels < 1000 else None
    folder = tmp_path / "t"
    shards = write(folder, tokenizer, titles, labels, True)
    writer, k = TargetWriter(folder, 17, n_labels), 16
    exact = []
    for start in range(0, len(titles), 1000):
        rows = slice(start, start + 1000)
        if probs is None:  # many categories: a few probable ones per title
            p = np.zeros((1000, n_labels), np.float32)
            top = rng.integers(0, n_labels, (1000, 3))
            p[np.arange(1000)[:, None], top] = 1 / 3
        else:
            p = probs[rows]
        t = SparseTargets.of(p, labels[rows], rng.random(1000) < 0.3, 0.5, 0.2, k)
        writer.append(t.idx, t.val, t.base)
        exact.append(t)
    writer.close()
    shards = Shards.open(folder)
    assert shards.target_k == 17
    assert (folder / "targets.idx").stat().st_size == len(titles) * 17 * np.dtype(idx_type).itemsize
    assert (folder / "targets.val.f16").stat().st_size == len(titles) * 17 * 2
    back = concat_windows(list(shards.chunks(700)))
    assert back.target_idx.dtype == idx_type and back.target_val.dtype == np.float16
    want_idx = np.concatenate([t.idx for t in exact])
    want_val = np.concatenate([t.val for t in exact])
    assert np.array_equal(back.target_idx, want_idx)
    assert np.allclose(back.target_val, want_val, rtol=1e-3, atol=1e-7)
    if probs is not None:
        logits = torch.from_numpy(rng.normal(size=(len(titles), n_labels)).astype(np.float32))
        stored = soft_cross_entropy(logits, torch.from_numpy(back.target_idx.astype(np.int64)),
                                    torch.from_numpy(back.target_val.astype(np.float32)), torch.from_numpy(back.target_base))
        full = soft_cross_entropy(logits, torch.from_numpy(want_idx), torch.from_numpy(want_val),
                                  torch.from_numpy(np.concatenate([t.base for t in exact])))
        assert abs(float(stored) - float(full)) < 1e-3 * float(full)


def test_damaged_shards_are_named(tokenizer, demo_splits, tmp_path):
    titles = demo_splits[0].titles.slice(0, 500)
    shards = write(tmp_path / "s", tokenizer, titles, np.zeros(500, np.int64), True)
    with pytest.raises(ValueError, match="one label per encoded title"):
        ShardWriter(tmp_path / "x", True).append(tokenizer.encode_batch(titles, compact=True), np.zeros(3))
    targets = TargetWriter(shards.folder, 5, 10)
    with pytest.raises(ValueError, match=r"targets must be \(n, 5\)"):
        targets.append(np.zeros((4, 3), np.int64), np.zeros((4, 3), np.float32), np.zeros(4, np.float32))
    targets.append(np.zeros((10, 5), np.int64), np.zeros((10, 5), np.float32), np.zeros(10, np.float32))
    with pytest.raises(MeliError, match="10 target rows for 500 titles"):
        targets.close()
    with open(shards.folder / "ids.i32", "r+b") as f:
        f.truncate(100)
    with pytest.raises(MeliError, match=r"ids\.i32: truncated"):
        list(shards.chunks())
    meta = json.loads((shards.folder / "meta.json").read_text())
    (shards.folder / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(MeliError, match="shard format 1, this version reads 2"):
        Shards.open(shards.folder)
    with pytest.raises(MeliError, match="not a shard folder"):
        Shards.open(tmp_path / "nothing")


def test_row_numbers_are_scattered_over_chunks_each_a_random_sample():
    n, chunk = 10_000, 700
    chunks = list(scattered_chunks(n, chunk, 3))
    assert [len(c) for c in chunks] == [chunk] * (n // chunk) + [n % chunk]
    assert np.array_equal(np.sort(np.concatenate(chunks)), np.arange(n))  # every row once
    assert all(not (np.diff(c) > 0).all() for c in chunks)  # shuffled within a chunk too
    assert all(np.ptp(c) > 0.9 * n for c in chunks[:-1])  # samples of the whole input, not ranges of it
    assert np.array_equal(np.concatenate(chunks), np.concatenate(list(scattered_chunks(n, chunk, 3))))
    assert not np.array_equal(np.concatenate(chunks), np.concatenate(list(scattered_chunks(n, chunk, 4))))


def test_a_fit_s_titles_are_shuffled_on_disk_whatever_the_input_s_order(demo_splits, tmp_path):
    """A labelled file grouped by category would put a few categories in each block a window
    reads (training at scale reads random blocks, not random rows): `prepare` writes the titles
    in a random order, so the first twentieth of the shards holds nearly every category."""
    import pyarrow as pa

    from meli.dataset import LabelledSplit
    from meli.train.trainer import prepare

    train = demo_splits[0]
    by_category = np.argsort(np.asarray(train.categories.to_pylist(), dtype=object), kind="stable")
    grouped = LabelledSplit(train.titles.take(pa.array(by_category)), train.categories.take(pa.array(by_category)),
                            train.source)
    labels = tuple(sorted(set(train.categories.to_pylist())))
    config = small_config("mlp")
    shards = prepare(config, grouped, labels, tmp_path / "a", chunk_rows=500).corpus.shards[0]
    rows = concat_windows(list(shards.chunks()))
    part = len(rows) // 20  # a run of rows within a chunk
    input_part = np.unique(np.searchsorted(labels, grouped.categories.slice(0, part).to_pylist()))
    assert len(np.unique(rows.labels[:part])) > 0.9 * len(labels) > 3 * len(input_part)
    assert np.array_equal(np.sort(rows.labels), np.sort(np.searchsorted(labels, grouped.categories.to_pylist())))
    whole = fit_tokenizer(config, grouped).encode_batch(grouped.titles, compact=True)
    assert len(rows.encoded.values) == len(whole.values)  # the same titles, moved
    again = concat_windows(list(prepare(config, grouped, labels, tmp_path / "b", chunk_rows=500).corpus.shards[0].chunks()))
    assert np.array_equal(rows.labels, again.labels) and np.array_equal(rows.encoded.values, again.encoded.values)
