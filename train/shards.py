"""Encoded training titles on disk: written once, read in shuffled windows by every fit.

A fit never holds its encoded titles, or its distillation targets, in memory. They are
written once, chunk by chunk, into a folder of flat little-endian files:

- ``ids.i32``: every title's ids, one after another (int32);
- ``offsets.i64``: where each title starts in ``ids.i32`` (N + 1 values);
- ``labels.i32``: each title's label index;
- ``targets.idx`` / ``targets.val.f16`` (N x K) and ``targets.base.f32`` (N): a distilled
  fit's soft targets, kept sparse (`meli.train.distill.SparseTargets`): category indices as
  uint16 (int32 past 65,536 categories, as ``meta.json`` says), probabilities as float16 (a
  relative error of 1/2048, far below what a target's smoothing moves), so K = 129 slots
  take 4 bytes each instead of 8;
- ``meta.json``: the format version, row count, encoding and K.

A mean-pooling MLP's titles are stored in the *compact* encoding (`meli.tokenizer.Tokenizer`:
a known word and all its character n-grams as one fused id, about 20 ids a title instead of
110) and widened back to full ids batch by batch (`meli.tokenizer_kernels.expanded_rows`): the
same ids per title, in another order, which a mean does not see. Other models store full ids.

Titles are written in a random order (`scattered_chunks`: each chunk a random sample of
the input, drawn from the fit's seed), not in the order of the input file: a file grouped by
category would otherwise put a handful of categories in each block below.

Reading is by *windows*: the rows are cut into blocks of ``block_rows``, the blocks are
shuffled, and each window of ``window_rows`` (2^18, a set of random blocks) is read with plain
file reads and shuffled row by row. Memory follows the window, not the data; at or below
``window_rows`` titles one window holds them all and the order is a full shuffle. Since every
block is already a random sample of the titles, so is every window, however the input was
sorted. Nothing is memory-mapped except for the few rows `take` reads.
"""

from __future__ import annotations

import json
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from meli.errors import MeliError
from meli.tokenizer import Encoded, Tokenizer
from meli.tokenizer_kernels import expanded_flat, expanded_rows, pad_rows

FORMAT = 2
FILES = ("ids.i32", "offsets.i64", "labels.i32")
TARGET_FILES = ("targets.idx", "targets.val.f16", "targets.base.f32")
T = TypeVar("T")


@dataclass(frozen=True)
class Window:
    """Rows read together: their encoding, labels and (for a distilled fit) sparse targets."""

    encoded: Encoded  # values int32
    labels: np.ndarray  # (n,) int32
    target_idx: np.ndarray | None = None  # (n, K) uint16 (int32 past 65,536 categories)
    target_val: np.ndarray | None = None  # (n, K) float16
    target_base: np.ndarray | None = None  # (n,) float32

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Expander:
    """Compact ids → full ids (see the module docstring); `None` in `Shards` for full-id shards."""

    fused_offset: int
    group_ptr: np.ndarray
    group_ids: np.ndarray

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "Expander":
        ptr, ids = tokenizer.fused_groups()
        return cls(tokenizer.fused_offset, ptr, ids)

    def rows(self, encoded: Encoded, rows: np.ndarray) -> np.ndarray:
        """Titles `rows` as right-padded full ids: ``(len(rows), longest)`` int64."""
        return expanded_rows(encoded.values, encoded.offsets, np.asarray(rows, np.int64), self.fused_offset,
                             self.group_ptr, self.group_ids, 0)

    def flat(self, encoded: Encoded, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Titles `rows` as flat full ids and their offsets."""
        return expanded_flat(encoded.values, encoded.offsets, np.asarray(rows, np.int64), self.fused_offset,
                             self.group_ptr, self.group_ids)

    def seen(self, values: np.ndarray, n_ids: int) -> np.ndarray:
        """Which of the ``n_ids`` full ids the compact `values` reach: ``(n_ids,)`` bool."""
        seen = np.zeros(n_ids, dtype=bool)
        plain = values[values < self.fused_offset]
        seen[plain] = True
        groups = np.unique(values[values >= self.fused_offset]) - self.fused_offset
        if len(groups):
            picked = np.zeros(len(self.group_ptr) - 1, dtype=bool)
            picked[groups] = True
            seen[self.group_ids[np.repeat(picked, np.diff(self.group_ptr))]] = True
        return seen


def scattered_chunks(n: int, chunk_rows: int, seed: int | tuple[int, ...]) -> Iterator[np.ndarray]:
    """Row numbers ``0..n-1`` in chunks of `chunk_rows`: a permutation drawn from `seed`, cut
    into chunks. Shards written chunk by chunk in this order hold the titles shuffled, whatever
    the input's order: any run of rows in them is a random sample (a chunk sorted back into
    input order would not be, within itself). 4 bytes a row while it is written."""
    order = np.random.default_rng(seed).permutation(n).astype(np.int32 if n < 2**31 else np.int64)
    for start in range(0, n, chunk_rows):
        yield order[start : start + chunk_rows]


def encoded_in_order(tokenizer: Tokenizer, chunks: Iterable[T], titles_of: Callable[[T], object], compact: bool,
                     threads: int = 2) -> Iterator[tuple[T, Encoded]]:
    """``(chunk, its encoded titles)`` for each chunk, in order, `threads` chunks encoded at once
    (the compiled tokenizer releases the GIL); at most ``threads + 1`` chunks in flight."""
    with ThreadPoolExecutor(threads, thread_name_prefix="meli-encode") as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(tokenizer.encode_batch, titles_of(chunk), compact)))
            if len(pending) > threads:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


class ShardWriter:
    """Appends encoded titles (and their labels) to a shard folder; `close` seals it."""

    def __init__(self, folder: Path, compact: bool):
        self.folder = Path(folder)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self.compact, self.rows, self.total = compact, 0, 0
        self._files = {name: open(self.folder / name, "wb") for name in FILES}
        np.zeros(1, np.int64).tofile(self._files["offsets.i64"])

    def append(self, encoded: Encoded, labels: np.ndarray) -> None:
        if len(labels) != len(encoded.offsets) - 1:
            raise ValueError("one label per encoded title")
        encoded.values.astype("<i4").tofile(self._files["ids.i32"])
        (encoded.offsets[1:] - encoded.offsets[0] + self.total).astype("<i8").tofile(self._files["offsets.i64"])
        np.asarray(labels).astype("<i4").tofile(self._files["labels.i32"])
        self.rows += len(labels)
        self.total += int(encoded.offsets[-1] - encoded.offsets[0])

    def close(self) -> "Shards":
        for f in self._files.values():
            f.close()
        (self.folder / "meta.json").write_text(json.dumps(
            {"format": FORMAT, "rows": self.rows, "ids": self.total, "compact": self.compact}))
        return Shards.open(self.folder)

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def target_index_dtype(n_labels: int) -> str:
    """The file type of target category indices: uint16 while the categories fit it."""
    return "<u2" if n_labels <= 1 << 16 else "<i4"


class TargetWriter:
    """Appends sparse soft targets, row for row with a `Shards` folder's titles."""

    def __init__(self, folder: Path, k: int, n_labels: int):
        self.folder, self.k, self.rows = Path(folder), k, 0
        self.idx_dtype = target_index_dtype(n_labels)
        self._files = {name: open(self.folder / name, "wb") for name in TARGET_FILES}

    def append(self, idx: np.ndarray, val: np.ndarray, base: np.ndarray) -> None:
        if idx.shape != val.shape or idx.shape[1] != self.k or len(base) != len(idx):
            raise ValueError(f"targets must be (n, {self.k}) indices and values and (n,) bases")
        idx.astype(self.idx_dtype).tofile(self._files["targets.idx"])
        val.astype("<f2").tofile(self._files["targets.val.f16"])
        base.astype("<f4").tofile(self._files["targets.base.f32"])
        self.rows += len(base)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        meta = json.loads((self.folder / "meta.json").read_text())
        if self.rows != meta["rows"]:
            raise MeliError(f"{self.folder}: {self.rows} target rows for {meta['rows']} titles")
        (self.folder / "meta.json").write_text(json.dumps({**meta, "target_k": self.k, "target_idx_dtype": self.idx_dtype}))


@dataclass(frozen=True)
class Shards:
    """One sealed shard folder (see the module docstring)."""

    folder: Path
    rows: int
    ids: int
    compact: bool
    target_k: int = 0  # 0: no soft targets
    target_idx_dtype: str = "<u2"

    @classmethod
    def open(cls, folder: Path) -> "Shards":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise MeliError(f"{folder}: not a shard folder ({e})") from e
        if meta.get("format") != FORMAT:
            raise MeliError(f"{folder}: shard format {meta.get('format')}, this version reads {FORMAT}")
        return cls(folder, int(meta["rows"]), int(meta["ids"]), bool(meta["compact"]), int(meta.get("target_k", 0)),
                   str(meta.get("target_idx_dtype", "<u2")))

    def __len__(self) -> int:
        return self.rows

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.folder.iterdir())

    def _read(self, name: str, dtype: str, start: int, count: int, width: int = 1) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        with open(self.folder / name, "rb") as f:
            f.seek(start * itemsize * width)
            out = np.fromfile(f, dtype=dtype, count=count * width)
        if len(out) != count * width:
            raise MeliError(f"{self.folder / name}: truncated (the shard folder was changed while in use?)")
        return out.reshape(count, width) if width > 1 else out

    def read(self, start: int, end: int) -> Window:
        """Rows ``[start, end)``."""
        offsets = self._read("offsets.i64", "<i8", start, end - start + 1).astype(np.int64)
        # ids, labels and targets stay as stored (a half or a quarter of the bytes); batches widen them
        values = self._read("ids.i32", "<i4", int(offsets[0]), int(offsets[-1] - offsets[0])).astype(np.int32)
        labels = self._read("labels.i32", "<i4", start, end - start).astype(np.int32)
        window = Window(Encoded(values, offsets - offsets[0]), labels)
        if not self.target_k:
            return window
        k = self.target_k
        return Window(window.encoded, labels,
                      self._read("targets.idx", self.target_idx_dtype, start, end - start, k),
                      self._read("targets.val.f16", "<f2", start, end - start, k),
                      self._read("targets.base.f32", "<f4", start, end - start))

    def chunks(self, rows: int = 65_536) -> Iterator[Window]:
        """Every row, in order, `rows` at a time."""
        for start in range(0, self.rows, rows):
            yield self.read(start, min(self.rows, start + rows))


@dataclass(frozen=True)
class Corpus:
    """A fit's training rows: one or more shard folders read as one (a distilled fit's real
    titles, then its recombined ones), with their expander (compact shards) or none."""

    shards: tuple[Shards, ...]
    expander: Expander | None = None

    def __len__(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def soft(self) -> bool:
        return all(s.target_k for s in self.shards)

    def steps(self, batch_size: int, window_rows: int = 1 << 18, block_rows: int = 8192) -> int:
        """The most batches of `batch_size` an epoch of `windows` can take (each window ends
        with a batch of its own): exact when one window holds every row."""
        blocks = sum(-(-s.rows // block_rows) for s in self.shards)
        windows = -(-blocks // max(1, window_rows // block_rows))
        return -(-len(self) // batch_size) + max(0, windows - 1)

    def windows(self, rng: np.random.Generator, window_rows: int = 1 << 18, block_rows: int = 8192) -> Iterator[Window]:
        """Every row once, in shuffled windows (see the module docstring); the rows of each
        window are in random order too."""
        blocks = [(s, start, min(s.rows, start + block_rows)) for s in self.shards for start in range(0, s.rows, block_rows)]
        order = rng.permutation(len(blocks))
        per_window = max(1, window_rows // block_rows)
        for w in range(0, len(order), per_window):
            parts = [blocks[i][0].read(blocks[i][1], blocks[i][2]) for i in order[w : w + per_window]]
            window = concat_windows(parts)
            yield take(window, rng.permutation(len(window)))

    def ids(self, window: Window, rows: np.ndarray) -> np.ndarray:
        """Full ids of `rows` of `window`, right-padded: what the model reads."""
        if self.expander is not None:
            return self.expander.rows(window.encoded, rows)
        lengths = window.encoded.lengths[rows]
        return pad_rows(window.encoded.values, window.encoded.offsets, np.asarray(rows, np.int64),
                        max(1, int(lengths.max(initial=0))))

    def flat(self, window: Window, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full ids of `rows` of `window`, flat, and their offsets."""
        if self.expander is not None:
            return self.expander.flat(window.encoded, rows)
        part = take(window, np.asarray(rows, np.int64)).encoded
        return part.values, part.offsets

    def seen_ids(self, n_ids: int) -> np.ndarray:
        """Which full ids any training title holds: ``(n_ids,)`` bool, read chunk by chunk."""
        seen = np.zeros(n_ids, dtype=bool)
        for shard in self.shards:
            for chunk in shard.chunks():
                if self.expander is not None:
                    seen |= self.expander.seen(chunk.encoded.values, n_ids)
                else:
                    seen[chunk.encoded.values] = True
        return seen

    def sample(self, rows: np.ndarray) -> Window:
        """Rows `rows` (sorted, over the corpus's row numbers) as one window, read one by one."""
        parts, base = [], 0
        for shard in self.shards:
            mine = rows[(rows >= base) & (rows < base + shard.rows)] - base
            parts.extend(shard.read(int(r), int(r) + 1) for r in mine)
            base += shard.rows
        return concat_windows(parts)


def concat_windows(parts: list[Window]) -> Window:
    if not parts:
        return Window(Encoded(np.zeros(0, np.int32), np.zeros(1, np.int64)), np.zeros(0, np.int32))
    values = np.concatenate([p.encoded.values for p in parts])
    lengths = np.concatenate([p.encoded.lengths for p in parts])
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    labels = np.concatenate([p.labels for p in parts])
    if parts[0].target_idx is None:
        return Window(Encoded(values, offsets), labels)
    return Window(Encoded(values, offsets), labels, np.concatenate([p.target_idx for p in parts]),
                  np.concatenate([p.target_val for p in parts]), np.concatenate([p.target_base for p in parts]))


def take(window: Window, rows: np.ndarray) -> Window:
    """`window`'s rows `rows`, in that order, as a new window."""
    enc = window.encoded
    lengths = enc.lengths[rows]
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    starts = enc.offsets[rows]
    values = enc.values[np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])]
    if window.target_idx is None:
        return Window(Encoded(values, offsets), window.labels[rows])
    return Window(Encoded(values, offsets), window.labels[rows], window.target_idx[rows], window.target_val[rows],
                  window.target_base[rows])
