"""What changed since last night: tonight's categories against the previous output, by id.

Both outputs are read in batches and their ``(id, category)`` pairs spread over partition
files by a hash of the id (numbers and strings alike), so that each partition of the two
nights fits in memory whatever the catalog's size (one a `PARTITION_BYTES` of last night's file);
each partition is then joined on its own. The counts are exact: ids present both nights whose
category differs (a missing category counts as a value of its own), ids new tonight, ids gone
since. Whether the model changed is read from the outputs' metadata (the model file's SHA-256
that `meli-score` writes into Parquet outputs; JSON Lines carry none, so it is then unknown).
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

import numba as nb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from meli.errors import InputError
from meli.formats import arrow_file, detect_format, iter_batches, parquet_parts, shown

PARTITION_BYTES = 64 << 20  # of last night's output per partition (a few million rows of Parquet)
MOVERS = 10  # categories listed as gaining and losing most
NONE = "\x00"  # a missing category, as a value of its own


class PreviousNight:
    """Last night's output, read into id-hashed partition files before tonight's run starts
    (so that tonight may write over the same path, and a wrong file fails before any work);
    `compare` then reads tonight's output the same way and joins them partition by partition."""

    def __init__(self, path: str | Path, id_column: str):
        self.path, self.id_column = Path(path), id_column
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file or folder (--previous names last night's output)")
        size = sum(f.stat().st_size for f in ([self.path] if self.path.is_file() else self.path.rglob("*")) if f.is_file())
        self.parts = max(1, math.ceil(size / PARTITION_BYTES))
        self._tmp = tempfile.TemporaryDirectory(prefix="meli-changes-")
        self.folder = Path(self._tmp.name)
        self.model_sha256 = _model_sha256(self.path)
        try:
            _spread(self.path, id_column, self.folder / "previous", self.parts)
            for p in range(self.parts):  # a wrong file fails now, before tonight's run
                _unique(_read(self.folder / "previous", p), self.path, id_column)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> "PreviousNight":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def compare(self, tonight: Path, model_sha256: str | None) -> dict:
        """The ``changes`` section of the report (see the module docstring)."""
        _spread(Path(tonight), self.id_column, self.folder / "tonight", self.parts)
        both = changed = new = gone = 0
        gained: Counter = Counter()
        lost: Counter = Counter()
        for p in range(self.parts):
            now, before = _read(self.folder / "tonight", p), _read(self.folder / "previous", p)
            _unique(now, Path(tonight), self.id_column)
            joined = now.join(before, keys="id", join_type="full outer", left_suffix="_now", right_suffix="_before")
            here_now = pc.is_valid(joined["present_now"]).to_numpy(zero_copy_only=False)
            here_before = pc.is_valid(joined["present_before"]).to_numpy(zero_copy_only=False)
            new += int((here_now & ~here_before).sum())
            gone += int((~here_now & here_before).sum())
            kept = here_now & here_before
            both += int(kept.sum())
            a = pc.fill_null(joined["category_now"], NONE).to_numpy(zero_copy_only=False)
            b = pc.fill_null(joined["category_before"], NONE).to_numpy(zero_copy_only=False)
            moved = kept & (a != b)
            changed += int(moved.sum())
            gained.update(c for c in a[moved] if c != NONE)
            lost.update(c for c in b[moved] if c != NONE)
        return {
            "previous": shown(self.path),
            "id_column": self.id_column,
            "ids_both_nights": both,
            "changed": changed,
            "changed_share": changed / both if both else None,
            "new_ids": new,
            "gone_ids": gone,
            "gained": [{"category": c, "count": n} for c, n in gained.most_common(MOVERS)],
            "lost": [{"category": c, "count": n} for c, n in lost.most_common(MOVERS)],
            "model_sha256": model_sha256,
            "previous_model_sha256": self.model_sha256,
            "model_changed": None if self.model_sha256 is None or not model_sha256 else self.model_sha256 != model_sha256,
        }


def _spread(path: Path, id_column: str, folder: Path, parts: int) -> None:
    """``(id, category, present)`` of every row of `path`, into `parts` Arrow files by id hash."""
    folder.mkdir()
    writers: dict[int, ipc.RecordBatchFileWriter] = {}
    schema = None
    try:
        for batch in iter_batches(path, string_columns=("category",)):
            names = batch.schema.names
            missing = [c for c in (id_column, "category") if c not in names]
            if missing:
                raise InputError(f"{path}: no {' or '.join(repr(c) for c in missing)} column to compare by; it has: "
                                 f"{', '.join(names)} (--id-column names the id; both nights must be meli-score outputs)")
            ids = batch.column(id_column)
            if not (pa.types.is_integer(ids.type) or pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
                raise InputError(f"{path}: id column {id_column!r} holds {ids.type}; ids must be whole numbers or text")
            ids = ids.cast(pa.string()) if not pa.types.is_string(ids.type) else ids
            if ids.null_count:
                raise InputError(f"{path}: id column {id_column!r} has empty ids; --previous needs an id on every row")
            table = pa.table({"id": ids, "category": batch.column("category").cast(pa.string()),
                              "present": pa.repeat(pa.scalar(True), batch.num_rows)})
            schema = table.schema
            slot = (_hash(ids) % np.uint64(parts)).astype(np.int64)
            for p in np.unique(slot):
                if p not in writers:
                    writers[p] = ipc.new_file(str(folder / f"{p}.arrow"), table.schema)
                writers[p].write_table(table.filter(pa.array(slot == p)))
    finally:
        for w in writers.values():
            w.close()
    for p in range(parts):  # partitions no id fell into: empty files of the same schema
        if p not in writers and schema is not None:
            with ipc.new_file(str(folder / f"{p}.arrow"), schema):
                pass
    if schema is None:
        raise InputError(f"{path}: no rows to compare")


def _read(folder: Path, p: int) -> pa.Table:
    with pa.memory_map(str(folder / f"{p}.arrow")) as source:
        return ipc.open_file(source).read_all()


def _unique(table: pa.Table, path: Path, id_column: str) -> None:
    counts = pc.value_counts(table["id"])
    twice = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(twice):
        raise InputError(f"{path}: id {twice[0]['values'].as_py()!r} appears {twice[0]['counts'].as_py()} times in "
                         f"column {id_column!r}; --previous compares nights by unique ids")


def _hash(ids: pa.Array) -> np.ndarray:
    """A 64-bit FNV-1a hash of each id's text (the same on every machine and run)."""
    ids = ids.cast(pa.large_string())
    bufs = ids.buffers()
    offsets = np.frombuffer(bufs[1], np.int64, len(ids) + 1, ids.offset * 8)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return _fnv(offsets, data)


@nb.njit(cache=True, nogil=True)
def _fnv(offsets, data):
    out = np.empty(len(offsets) - 1, dtype=np.uint64)
    for i in range(len(offsets) - 1):
        h = np.uint64(0xCBF29CE484222325)
        for j in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[j])) * np.uint64(0x100000001B3)
        out[i] = h
    return out


def _model_sha256(path: Path) -> str | None:
    """The model file's SHA-256 that meli-score wrote into a Parquet output (None for JSON Lines)."""
    try:
        if detect_format(path) != "parquet" and not path.is_dir():
            return None
        first = path if path.is_file() else parquet_parts(path)[0].path
        meta = pq.read_schema(arrow_file(first)).metadata or {}
    except (OSError, IndexError, pa.ArrowException, InputError):
        return None
    value = meta.get(b"meli.model_sha256")
    return value.decode() if value else None
