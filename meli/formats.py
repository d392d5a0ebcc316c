"""Reading and writing the file formats, as streams of Arrow record batches.

Inputs: Parquet (a file or a directory of part files), JSON Lines (``.jsonl``, ``.ndjson``,
``.json``, optionally ``.gz``), CSV (``.csv``, optionally ``.gz``) including the MeLi 2019
challenge's layouts: with a header (``title,label_quality,language,category`` or
``id,title,language``) or header-less ``title,category``. CSV has no types, so every CSV
column is read as a string.

Every reader yields batches in file order with bounded memory, so a file of any size can be
streamed; `read_table` is the same stream gathered up for data that fits in memory.

Outputs: Parquet (zstd) or JSON Lines (`batch_writer`, `json_lines`), written batch by batch;
the commands write to a temporary file beside the target and rename it at the end
(`AtomicWriter`), so a failed or killed run never leaves a half-written file.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as dt
import decimal
import gzip
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal
from urllib.parse import unquote

import numba as nb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from meli.errors import InputError, OutputError, first_line

log = logging.getLogger(__name__)

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
        if _SUFFIXES.get(Path(name).suffix) == "parquet":
            raise InputError(f"{path}: Parquet is compressed inside, so a gzipped .parquet.gz is not a Parquet file; "
                             "name it .parquet")
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


NOT_DATA = ("_", ".")  # Spark, Hive, Hadoop and pyarrow.dataset: _SUCCESS, _temporary/, .crc, ... are not data
PARQUET_MAGIC = b"PAR1"
TABLE_FORMATS = (  # (marker, what it is): folders whose Parquet files are not the table's rows as they stand
    ("_delta_log", "a Delta Lake table"),
    (".hoodie", "an Apache Hudi table"),
    ("metadata/*.metadata.json", "an Apache Iceberg table"),
)
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


@dataclass(frozen=True)
class Part:
    """One Parquet file of an input, with the Hive partition values of the folders above it."""

    path: Path
    partition: tuple[tuple[str, str | None], ...] = ()  # (key, value) outermost first; None: Hive's null


def parquet_parts(path: Path) -> list[Part]:
    """The Parquet files of `path` (a file, or a folder as Spark and Hive write them), in the
    order they are read.

    In a folder, every file or folder whose name starts with ``_`` or ``.`` is not data
    (``_SUCCESS``, ``_temporary/`` attempts of a failed job, ``.crc`` checksums); a file is a
    part when its name ends in ``.parquet`` or ``.pq`` in any case, or when it starts with
    Parquet's magic bytes (Hive's ``000000_0``); ``key=value`` folders are Hive partitions,
    which every part must have alike. Parts are read in the order of their paths compared
    folder by folder, with runs of digits compared as numbers (``part-2`` before ``part-10``).
    """
    if not path.is_dir():
        return [Part(path)]
    for marker, what in TABLE_FORMATS:
        if any(path.glob(marker)):
            raise InputError(f"{path}: is {what} ({marker.split('/')[0]} is there): its folder also holds files of "
                             "other versions, so its rows cannot be read as plain Parquet; score an export of the "
                             "table's current version, or register it in a Spark catalog and score table:NAME with --engine spark")
    parts: list[Part] = []
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = [d for d in subfolders if not d.startswith(NOT_DATA)]
        here = Path(folder)
        for name in files:
            if name.startswith(NOT_DATA):
                continue
            file = here / name
            if Path(name).suffix.lower() not in (".parquet", ".pq") and not _starts_with_magic(file):
                raise InputError(f"{file}: not a Parquet file in the input folder {path}; move it out, or start its "
                                 "name with _ or . to mark it as not data")
            parts.append(Part(file, _hive_partition(file.parent.relative_to(path))))
    if not parts:
        raise InputError(f"{path}: directory holds no Parquet part files")
    parts.sort(key=lambda part: _natural(part.path.relative_to(path)))
    keys = [k for k, _ in parts[0].partition]
    for part in parts[1:]:
        if [k for k, _ in part.partition] != keys:
            raise InputError(f"{part.path}: its partition folders ({_describe(part)}) differ from those of "
                             f"{parts[0].path} ({_describe(parts[0])})")
    return parts


def _starts_with_magic(file: Path) -> bool:
    try:
        with open(file, "rb") as f:
            return f.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def _hive_partition(folders: Path) -> tuple[tuple[str, str | None], ...]:
    found = []
    for name in folders.parts:
        key, eq, value = name.partition("=")
        if eq and key:
            value = unquote(value)
            found.append((key, None if value == HIVE_NULL else value))
    return tuple(found)


def _describe(part: Part) -> str:
    return ", ".join(k for k, _ in part.partition) or "none"


def _natural(relative: Path) -> list[tuple]:
    return [tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)
            for name in relative.parts]


def partition_schema(parts: list[Part]) -> pa.Schema:
    """The columns the partition folders add, after the files' own: strings, as Spark reads
    them with partition type inference off (``meli-score --engine spark`` does the same)."""
    return pa.schema([pa.field(k, pa.string()) for k, _ in parts[0].partition])


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
        yield from _valid_text(p, _jsonl_batches(p, batch_size, string_columns))
    else:
        yield from _valid_text(p, _csv_batches(p, batch_size, string_columns))


def read_table(path: str | os.PathLike, string_columns: tuple[str, ...] = ("title",)) -> pa.Table:
    """A whole (labelled or not) data file in memory."""
    batches = list(iter_batches(path, string_columns=string_columns))
    if not batches:
        raise InputError(f"{path}: no rows")
    return pa.Table.from_batches(batches)


def checked_parts(path: Path) -> tuple[list[Part], pa.Schema]:
    """`parquet_parts`, each part's footer read and its columns checked against the first
    part's (text may be stored as string, large_string or dictionary-encoded, integers and
    floats in any width); the schema every part is read into: the first part's, types,
    nullability and field metadata as they are. Both engines run these checks before reading
    a row."""
    parts = parquet_parts(path)
    partitions = partition_schema(parts)
    first: tuple[Path, pa.Schema] | None = None
    for part in parts:
        try:
            schema = pq.read_schema(arrow_file(part.path))
        except MemoryError:  # Arrow's failed allocations too: the command says how to use less
            raise
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{part.path}: not a readable Parquet file ({first_line(e)})") from e
        _check_unique(part.path, schema.names + partitions.names)
        if first is None:
            first = (part.path, schema)
        else:
            _check_same_columns(part.path, _plain_schema(schema), first[0], _plain_schema(first[1]))
    return parts, first[1]


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([fld.with_type(_plain(fld.type)) for fld in schema])


def _parquet_batches(path: Path, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Every part's batches, in one schema: the first part's (`checked_parts`), then the Hive
    partition columns."""
    parts, schema = checked_parts(path)
    partitions = partition_schema(parts)
    with_partitions = pa.schema(list(schema) + list(partitions), metadata=schema.metadata)
    for part in parts:
        try:
            f = pq.ParquetFile(arrow_file(part.path))
        except MemoryError:  # Arrow's failed allocations too: the command says how to use less
            raise
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{part.path}: not a readable Parquet file ({first_line(e)})") from e
        values = [pa.scalar(v, pa.string()) for _, v in part.partition]  # one per partition column
        rows = 0
        try:
            for batch in f.iter_batches(batch_size=batch_size):
                batch = _conform(batch, schema)
                _check_utf8(batch, lambda i: f"{part.path}: row {rows + i + 1}" if i is not None else str(part.path))
                rows += batch.num_rows
                if values:
                    batch = pa.RecordBatch.from_arrays(batch.columns + [pa.repeat(v, batch.num_rows) for v in values],
                                                       schema=with_partitions)
                yield batch
        except MemoryError:  # Arrow's failed allocations too: the command says how to use less
            raise
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{part.path}: not a readable Parquet file ({first_line(e)})") from e


def is_text(t: pa.DataType) -> bool:
    """Any Arrow type that holds strings: string, large_string, string_view, dictionary of those."""
    if pa.types.is_dictionary(t):
        return is_text(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def as_plain_strings(column: pa.Array) -> pa.Array:
    """A text column as plain ``string``; other columns as they are."""
    if not is_text(column.type) or column.type == pa.string():
        return column
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column.cast(pa.string())


def _plain(t: pa.DataType) -> pa.DataType:
    return pa.string() if is_text(t) else t


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A later part's batch in the first part's schema (the fields' nullability and metadata kept)."""
    columns = []
    for f in schema:
        c = batch.column(f.name)
        if c.type != f.type and is_text(c.type) and is_text(f.type):
            c = as_plain_strings(c)  # one text kind to another goes through plain strings
        columns.append(c if c.type == f.type else c.cast(f.type, safe=True))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


_FAMILIES = (pa.types.is_integer, pa.types.is_floating)  # widths may differ between parts; values must fit


def _check_same_columns(part: Path, schema: pa.Schema, first: Path, first_schema: pa.Schema) -> None:
    extra = [n for n in schema.names if n not in first_schema.names]
    missing = [n for n in first_schema.names if n not in schema.names]
    if extra or missing:
        what = "; ".join(x for x in (f"extra: {', '.join(extra)}" if extra else "",
                                     f"missing: {', '.join(missing)}" if missing else "") if x)
        raise InputError(f"{part}: columns differ from {first.name}'s ({what})")
    for fld in first_schema:
        t = schema.field(fld.name).type
        if t != fld.type and not any(same(t) and same(fld.type) for same in _FAMILIES):
            raise InputError(f"{part}: column {fld.name!r} is {t} here, {fld.type} in {first.name}")


def first_repeat(names) -> str | None:
    """The first name that appears a second time, or None."""
    seen: set[str] = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None


def _check_unique(path: Path, names: list[str]) -> None:
    twice = first_repeat(names)
    if twice is not None:
        raise InputError(f"{path}: column {twice!r} appears twice")


def _check_utf8(batch: pa.RecordBatch, where: Callable[[int | None], str]) -> None:
    """Text columns must hold valid UTF-8 (Arrow's JSON and Parquet readers do not check):
    a bad byte must not reach the tokenizer or be copied into the output. `where(row)` names
    the place of a row of the batch (None: row unknown) for the error."""
    for name, column in zip(batch.schema.names, batch.columns):
        if not _holds_text(column.type):
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid as e:
            m = re.search(r"at string index (\d+)", str(e))
            row = int(m.group(1)) if m and is_text(column.type) else None
            raise InputError(f"{where(row)}: column {name!r}: invalid UTF-8") from e


def _holds_text(t: pa.DataType) -> bool:
    if is_text(t):
        return True
    if pa.types.is_struct(t):
        return any(_holds_text(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _holds_text(t.value_type)
    if pa.types.is_map(t):
        return _holds_text(t.key_type) or _holds_text(t.item_type)
    return False


def _valid_text(path: Path, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """JSON Lines and CSV batches with their text checked; a bad byte is named by its line."""
    for batch in batches:
        try:
            _check_utf8(batch, lambda i: str(path))  # no line: the scan below finds it
        except InputError as e:
            line = _first_undecodable_line(path)
            raise InputError(f"{path}: line {line}: invalid UTF-8" if line else str(e)) from e
        yield batch


def _first_undecodable_line(path: Path) -> int | None:
    opener = gzip.open if _compression(path) else open
    try:
        with opener(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return number
    except (OSError, EOFError):
        return None
    return None


JSONL_CHUNK = 16 << 20  # bytes of whole lines the schema pass parses at a time
MAX_LINE = 64 << 20  # bytes: the longest line (one JSON record, one CSV row) any reader takes
MAX_DEPTH = 32  # how deeply a JSON record may nest objects and arrays (Arrow reads back about twice that)
MAX_BLOCK = 1 << 30  # bytes: Arrow's reader blocks (a 32-bit setting) never ask for more


def _block_size(batch_size: int, bytes_per_row: int, longest: int) -> int:
    """Arrow's block size for a batch of rows: room for `batch_size` rows, and for two of the
    longest lines (at most MAX_LINE each, so always below MAX_BLOCK)."""
    return max(min(MAX_BLOCK, max(1 << 20, batch_size * bytes_per_row)), 2 * longest + 2)


@nb.njit(cache=True, nogil=True)
def _deepest(data, limit):
    """(deepest nesting of JSON objects and arrays outside strings, index of the byte where it
    first passes `limit`, or -1)."""
    depth, deepest, in_string, escaped = 0, 0, False, False
    for i in range(len(data)):
        c = data[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 92:  # backslash
                escaped = True
            elif c == 34:  # quote
                in_string = False
        elif c == 34:
            in_string = True
        elif c == 123 or c == 91:  # { [
            depth += 1
            if depth > deepest:
                deepest = depth
                if depth > limit:
                    return deepest, i
        elif c == 125 or c == 93:  # } ]
            depth -= 1
        elif c == 10:  # a new record: a broken one must not carry its depth on
            depth, in_string = 0, False
    return deepest, -1


def _check_depth(path: Path, first: int, chunk: bytes) -> None:
    """One clear error, instead of a crash inside the JSON parser, for a record nested deeper
    than MAX_DEPTH."""
    _, at = _deepest(np.frombuffer(chunk, dtype=np.uint8), MAX_DEPTH)
    if at >= 0:
        line = first + chunk.count(b"\n", 0, at)
        raise InputError(f"{path}: line {line}: JSON nested more than {MAX_DEPTH} levels deep (the most a record may be)")
INT64_MAX = 2**63 - 1


def _jsonl_batches(path: Path, batch_size: int, string_columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    """JSON Lines as real exporters write them, in two passes. The first reads every line for
    the schema (fields first seen late come after the others, integers that later hold a
    fraction become float64, objects that gain keys gain fields) and the longest line; the
    second streams the records in that schema. Arrow's errors do not say where: on any error,
    a plain scan (`_explain_jsonl`) names the line."""
    try:
        schema, longest = _jsonl_schema(path, string_columns)
        if schema is None:
            return  # no records
        read = pjson.ReadOptions(block_size=_block_size(batch_size, 256, longest))
        parse = pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
        with pa.input_stream(arrow_file(path), compression=_compression(path)) as stream:
            for batch in pjson.open_json(stream, read_options=read, parse_options=parse):
                yield from _split(batch, batch_size)
    except MemoryError:  # Arrow's failed allocations too: the command says how to use less
        raise
    except (pa.ArrowException, OSError, EOFError) as e:
        raise InputError(_explain_jsonl(path, string_columns) or f"{path}: unreadable JSON Lines ({first_line(e)})") from e


def _line_chunks(path: Path) -> Iterator[tuple[int, bytes]]:
    """(number of its first line, bytes) of runs of whole lines, about JSONL_CHUNK at a time
    (JSON Lines and CSV alike)."""
    opener = gzip.open if _compression(path) else open
    line = 1
    with opener(path, "rb") as f:
        while chunk := f.read(JSONL_CHUNK):
            if not chunk.endswith(b"\n"):  # the rest of the last line, read no further than MAX_LINE
                head = len(chunk) - 1 - chunk.rfind(b"\n")
                rest = f.readline(max(0, MAX_LINE - head) + 1)
                if head + len(rest) > MAX_LINE and not rest.endswith(b"\n"):
                    number = line + chunk.count(b"\n")
                    raise InputError(f"{path}: line {number}: longer than {MAX_LINE >> 20} MiB, the most one line may hold "
                                     "(is it really one record per line?)")
                chunk += rest
            yield line, chunk.removeprefix(b"\xef\xbb\xbf") if line == 1 else chunk
            line += chunk.count(b"\n")


def _longest_line(chunk: bytes) -> int:
    ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
    return int(np.diff(ends, prepend=-1).max()) if len(ends) else len(chunk)


def _jsonl_schema(path: Path, string_columns: tuple[str, ...]) -> tuple[pa.Schema | None, int]:
    """The schema of every record of the file, unified as Arrow promotes types (null to any,
    int64 to float64, structs merged), with `string_columns` as strings; and the longest line."""
    schemas, longest = [], 0
    for first, chunk in _line_chunks(path):
        longest = max(longest, _longest_line(chunk))
        if not chunk.strip():
            continue
        _check_depth(path, first, chunk)
        table = pjson.read_json(io.BytesIO(chunk), read_options=pjson.ReadOptions(block_size=max(1 << 20, 2 * longest + 2)))
        _refuse_big_integers(path, first, chunk, table.schema)
        schemas.append(table.schema)
    if not schemas:
        return None, longest
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    for name in string_columns:
        if name in schema.names:
            t = schema.field(name).type
            if not (pa.types.is_string(t) or pa.types.is_null(t)):
                raise pa.ArrowInvalid(f"column {name!r} is {t}")  # _explain_jsonl names the line
            schema = schema.set(schema.get_field_index(name), pa.field(name, pa.string()))
    return schema, longest


def _refuse_big_integers(path: Path, first: int, chunk: bytes, schema: pa.Schema) -> None:
    """Arrow reads an integer beyond int64 as a float, which changes it (2**64 + 1 comes back
    as 18446744073709551616.0): refuse it, naming its line, rather than write another number."""
    for field in schema:
        if not pa.types.is_floating(field.type):
            continue
        key = re.escape(json.dumps(field.name)[1:-1].encode())
        for m in re.finditer(rb'"' + key + rb'"\s*:\s*(-?\d{19,})\s*[,}]', chunk):
            if abs(int(m.group(1))) > INT64_MAX:
                line = first + chunk.count(b"\n", 0, m.start())
                raise InputError(f"{path}: line {line}: column {field.name!r} holds the integer {m.group(1).decode()[:40]}, "
                                 "beyond 64-bit integers (read as a float it would change); write it as a string")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    record: dict = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


_JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "true/false", dict: "an object", list: "an array"}


def _explain_jsonl(path: Path, string_columns: tuple[str, ...]) -> str | None:
    """The first line at fault, by a plain scan: bad bytes, bad JSON, a non-object, a title
    that is not a string, or a column whose kind of value changes from an earlier line."""
    kinds: dict[str, tuple[str, int]] = {}
    opener = gzip.open if _compression(path) else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    return f"{path}: line {number}: invalid UTF-8"
                if not line.strip():
                    continue
                try:
                    record = json.loads(line, object_pairs_hook=_unique_keys)
                except json.JSONDecodeError as e:
                    return f"{path}: line {number}: malformed JSON ({e.msg}, column {e.colno})"
                except _DuplicateKey as e:
                    return f"{path}: line {number}: key {e.args[0]!r} appears twice in one record"
                if not isinstance(record, dict):
                    return f"{path}: line {number}: expected a JSON object, got {type(record).__name__}"
                for c in string_columns:
                    if c in record and record[c] is not None and not isinstance(record[c], str):
                        return f"{path}: line {number}: column {c!r} must be a string, got {record[c]!r}"
                for key, value in record.items():
                    if value is None:
                        continue
                    kind = _JSON_KINDS.get(type(value), "a value")
                    seen = kinds.setdefault(key, (kind, number))
                    if seen[0] != kind:
                        return f"{path}: line {number}: column {key!r} holds {kind} here but {seen[0]} on line {seen[1]}"
    except (OSError, EOFError) as e:
        return f"{path}: unreadable ({first_line(e)})"
    return None


def _csv_batches(path: Path, batch_size: int, string_columns: tuple[str, ...] = ("title",)) -> Iterator[pa.RecordBatch]:
    header = _csv_header(path)
    if header is None:
        raise InputError(f"{path}: empty CSV file")
    has_header = "title" in header or any(c in header for c in string_columns)
    if has_header:
        _check_unique(path, header)
        names = header
    elif len(header) == len(HEADERLESS_CSV_COLUMNS):
        names = list(HEADERLESS_CSV_COLUMNS)
    else:
        raise InputError(
            f"{path}: CSV without a {(string_columns or ('title',))[0]!r} column in its header; a header-less CSV must have "
            f"exactly the columns {','.join(HEADERLESS_CSV_COLUMNS)} (found {len(header)} columns)"
        )
    longest = max((_longest_line(chunk) for _, chunk in _line_chunks(path)), default=0)  # a row must fit a block
    read = pcsv.ReadOptions(
        column_names=names, skip_rows=1 if has_header else 0, block_size=_block_size(batch_size, 128, longest)
    )
    convert = pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
    parse = pcsv.ParseOptions(newlines_in_values=True)
    try:
        with pa.input_stream(arrow_file(path), compression=_compression(path)) as stream:
            reader = pcsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
            for batch in reader:
                yield from _split(batch, batch_size)
    except MemoryError:  # Arrow's failed allocations too: the command says how to use less
        raise
    except (pa.ArrowException, OSError, EOFError) as e:
        if "invalid UTF8" in str(e) and (line := _first_undecodable_line(path)):
            raise InputError(f"{path}: line {line}: invalid UTF-8") from e
        raise InputError(f"{path}: malformed CSV ({first_line(e)})") from e


def _csv_header(path: Path) -> list[str] | None:
    """The first row, without the byte-order mark Excel writes ("CSV UTF-8")."""
    try:
        with open_text(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), None)
    except UnicodeDecodeError as e:  # the text reader decodes ahead: find the line
        raise InputError(f"{path}: line {_first_undecodable_line(path) or 1}: invalid UTF-8") from e
    except (OSError, EOFError, csv.Error) as e:
        raise InputError(f"{path}: unreadable CSV ({first_line(e)})") from e


def shown(text: str | os.PathLike) -> str:
    """A path as a shell shows it: the bytes of a name that are not UTF-8 (which Python holds as
    lone surrogates) written as ``\\xNN``, so that it can be printed and stored as UTF-8."""
    return re.sub("[\udc80-\udcff]", lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", os.fspath(text))


def arrow_file(path: str | os.PathLike, mode: str = "rb"):
    """`path` as Arrow's readers and writers take it: the path itself, or, for a name whose
    bytes are not UTF-8 (which Arrow cannot encode), the file opened by Python."""
    try:
        os.fsdecode(path).encode("utf-8")
        return str(path)
    except UnicodeEncodeError:
        return open(path, mode)


def _split(batch: pa.RecordBatch, batch_size: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, batch_size):
        yield batch.slice(start, batch_size)


@contextlib.contextmanager
def batch_writer(path: Path, schema: pa.Schema, fmt: Format, gzipped: bool = False) -> Iterator[Callable[[pa.RecordBatch], None]]:
    """Write record batches of `schema` to `path` as Parquet (zstd) or JSON Lines (gzipped
    when `gzipped`): ``with batch_writer(...) as write: write(batch)``."""
    if fmt == "parquet":
        with pq.ParquetWriter(arrow_file(path, "wb"), schema, compression="zstd") as w:
            yield w.write_batch
    elif fmt == "jsonl":
        opener = gzip.open if gzipped else open
        with opener(path, "wt", encoding="utf-8") as f:
            yield lambda batch: f.writelines(json_lines(batch))
    else:
        raise OutputError(f"{path}: {fmt} is not an output format (Parquet or JSON Lines)")


def json_lines(batch: pa.RecordBatch) -> Iterator[str]:
    """One JSON object per row. Values JSON has no type for are written as text: timestamps,
    dates and times in ISO 8601, decimals exactly as their digits, bytes in base64; NaN and
    infinities (not JSON) as null."""
    columns = []
    for column in batch.columns:
        if pa.types.is_floating(column.type):
            column = pc.if_else(pc.is_finite(column), column, pa.scalar(None, column.type))
        columns.append(column)
    rows = pa.RecordBatch.from_arrays(columns, schema=batch.schema).to_pylist()
    return (json.dumps(row, ensure_ascii=False, default=_json_value) + "\n" for row in rows)


def _json_value(value: object) -> object:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"a {type(value).__name__} value has no JSON form")



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
        limit = check_name_length(self.target)
        # the temporary name adds 14 characters (".", ".", 8 random, ".tmp"): shorten its stem
        stem = os.fsdecode(os.fsencode(self.target.name)[: max(1, limit - 14)])
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=folder)
        except OSError as e:
            raise OutputError(f"{self.target}: cannot create a file beside it ({e.strerror or e})") from e
        os.close(fd)
        self.path = Path(tmp)
        self.committed = False

    def commit(self) -> None:
        # mkstemp makes the file private (0600); give it the mode any new file would get
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.chmod(self.path, 0o666 & ~umask)
            os.replace(self.path, self.target)
        except OSError as e:
            raise OutputError(f"{self.target}: cannot write ({e.strerror or e})") from e
        self.committed = True

    def discard(self) -> None:
        if not self.committed:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def check_name_length(path: Path) -> int:
    """Refuse a file name longer than its folder's file system allows; returns that limit."""
    try:
        limit = os.pathconf(path.parent if path.parent.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(path.name))  # the bytes the file system stores, undecodable ones too
    if size > limit:
        raise OutputError(f"{path}: file name too long ({size} bytes; this file system allows {limit})")
    return limit


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with AtomicWriter(target) as w:
        try:
            w.path.write_bytes(data)
        except OSError as e:
            raise OutputError(f"{w.target}: cannot write ({e.strerror or e})") from e
        w.commit()


def open_text(path: Path, newline: str | None = None, encoding: str = "utf-8") -> io.TextIOBase:
    """A text file, transparently gunzipped."""
    if _compression(path):
        return gzip.open(path, "rt", encoding=encoding, newline=newline)
    return open(path, encoding=encoding, newline=newline)
