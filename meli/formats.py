"""Reading and writing the file formats, as streams of Arrow record batches.

Inputs: Parquet (a file or a directory of part files), JSON Lines (``.jsonl``, ``.ndjson``,
``.json``, optionally ``.gz``), CSV (``.csv``, optionally ``.gz``) including the MeLi 2019
challenge's layouts: with a header (``title,label_quality,language,category`` or
``id,title,language``) or header-less ``title,category``. CSV has no types, so every CSV
column is read as a string.

Every reader yields batches in file order with bounded memory, so a file of any size can be
streamed; `read_table` is the same stream gathered up for data that fits in memory.
Outputs are written to a temporary file beside the target and renamed at the end
(`AtomicWriter`), so a failed or killed run never leaves a half-written file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from meli.errors import InputError, OutputError

Format = Literal["parquet", "jsonl", "csv"]

_SUFFIXES: dict[str, Format] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
}
HEADERLESS_CSV_COLUMNS = ("title", "category")  # the challenge's train sample layout


def detect_format(path: str | os.PathLike) -> Format:
    """The format a path's name (or, for a folder, its part files) says it has."""
    p = Path(path)
    if p.is_dir():
        return "parquet"
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    fmt = _SUFFIXES.get(Path(name).suffix)
    if fmt is None:
        raise InputError(
            f"{path}: unknown format; expected .parquet, .jsonl, .jsonl.gz, .json, .ndjson, .csv or .csv.gz"
        )
    return fmt


def _compression(path: Path) -> str | None:
    return "gzip" if path.name.lower().endswith(".gz") else None


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable (permission denied)")


def parquet_parts(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    parts = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".parquet", ".pq"))
    if not parts:
        raise InputError(f"{path}: directory holds no .parquet part files")
    return parts


def iter_batches(
    path: str | os.PathLike, batch_size: int = 65_536, string_columns: tuple[str, ...] = ("title",)
) -> Iterator[pa.RecordBatch]:
    """Stream a data file as record batches of at most about `batch_size` rows.

    `string_columns` that exist are read as strings, whatever the file's type inference
    would make of them (a title of ``"1234"`` stays a string).
    """
    p = Path(path)
    _check_readable(p)
    fmt = detect_format(p)
    if fmt == "parquet":
        yield from _parquet_batches(p, batch_size)
    elif fmt == "jsonl":
        yield from _jsonl_batches(p, batch_size, string_columns)
    else:
        yield from _csv_batches(p, batch_size)


def read_table(path: str | os.PathLike, string_columns: tuple[str, ...] = ("title",)) -> pa.Table:
    """A whole (labelled or not) data file in memory."""
    batches = list(iter_batches(path, string_columns=string_columns))
    if not batches:
        raise InputError(f"{path}: no rows")
    return pa.Table.from_batches(batches)


def _parquet_batches(path: Path, batch_size: int) -> Iterator[pa.RecordBatch]:
    for part in parquet_parts(path):
        try:
            f = pq.ParquetFile(part)
            for batch in f.iter_batches(batch_size=batch_size):
                yield batch
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{part}: not a readable Parquet file ({_first_line(e)})") from e


def _jsonl_batches(path: Path, batch_size: int, string_columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    # Arrow's reader is fast but its errors do not say where; on any error, find the
    # offending line with a plain scan so the message can name it.
    present = _first_record_keys(path)
    if present is None:
        return  # an empty file: no batches
    schema = pa.schema([(c, pa.string()) for c in string_columns if c in present])
    parse = pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
    read = pjson.ReadOptions(block_size=max(1 << 20, batch_size * 256))
    try:
        with pa.input_stream(str(path), compression=_compression(path)) as stream:
            reader = pjson.open_json(stream, read_options=read, parse_options=parse)
            for batch in reader:
                yield from _split(batch, batch_size)
    except (pa.ArrowException, OSError, EOFError) as e:
        raise InputError(_explain_jsonl(path, string_columns) or f"{path}: unreadable JSON Lines ({_first_line(e)})") from e


def _first_record_keys(path: Path) -> set[str] | None:
    """Keys of the first record (None for a file with no records): only columns a file has
    may be typed explicitly (Arrow would otherwise add the absent ones as all-null columns)."""
    try:
        with open_text(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return set(record) if isinstance(record, dict) else set()
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError):
        return set()  # the reader reports it, with the line
    return None


def _explain_jsonl(path: Path, string_columns: tuple[str, ...]) -> str | None:
    try:
        with open_text(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}: line {number}: malformed JSON ({e.msg}, column {e.colno})"
                if not isinstance(record, dict):
                    return f"{path}: line {number}: expected a JSON object, got {type(record).__name__}"
                for c in string_columns:
                    if c in record and record[c] is not None and not isinstance(record[c], str):
                        return f"{path}: line {number}: column {c!r} must be a string, got {record[c]!r}"
    except (OSError, EOFError, UnicodeDecodeError) as e:
        return f"{path}: unreadable ({_first_line(e)})"
    return None


def _csv_batches(path: Path, batch_size: int) -> Iterator[pa.RecordBatch]:
    header = _csv_header(path)
    if header is None:
        raise InputError(f"{path}: empty CSV file")
    has_header = "title" in header
    if has_header:
        names = header
    elif len(header) == len(HEADERLESS_CSV_COLUMNS):
        names = list(HEADERLESS_CSV_COLUMNS)
    else:
        raise InputError(
            f"{path}: CSV without a 'title' column in its header; a header-less CSV must have "
            f"exactly the columns {','.join(HEADERLESS_CSV_COLUMNS)} (found {len(header)} columns)"
        )
    read = pcsv.ReadOptions(
        column_names=names, skip_rows=1 if has_header else 0, block_size=max(1 << 20, batch_size * 128)
    )
    convert = pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
    parse = pcsv.ParseOptions(newlines_in_values=True)
    try:
        with pa.input_stream(str(path), compression=_compression(path)) as stream:
            reader = pcsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
            for batch in reader:
                yield from _split(batch, batch_size)
    except (pa.ArrowException, OSError, EOFError) as e:
        raise InputError(f"{path}: malformed CSV ({_first_line(e)})") from e


def _csv_header(path: Path) -> list[str] | None:
    try:
        with open_text(path, newline="") as f:
            return next(csv.reader(f), None)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: unreadable CSV ({_first_line(e)})") from e


def _split(batch: pa.RecordBatch, batch_size: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, batch_size):
        yield batch.slice(start, batch_size)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class AtomicWriter:
    """Write to a temporary file beside `target`; `commit()` renames it into place.

    Used as a context manager: leaving the block without `commit()` (an error, Ctrl-C)
    removes the temporary file and leaves any previous `target` untouched.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        folder = self.target.parent
        if not folder.is_dir():
            raise OutputError(f"{self.target}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise OutputError(f"{self.target}: folder {folder} is not writable")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        self.path = Path(tmp)
        self.committed = False

    def commit(self) -> None:
        # mkstemp makes the file private (0600); give it the mode any new file would get
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o666 & ~umask)
        os.replace(self.path, self.target)
        self.committed = True

    def discard(self) -> None:
        if not self.committed:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with AtomicWriter(target) as w:
        w.path.write_bytes(data)
        w.commit()


def open_text(path: Path, newline: str | None = None) -> io.TextIOBase:
    """A text file, transparently gunzipped."""
    if _compression(path):
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    return open(path, encoding="utf-8", newline=newline)
