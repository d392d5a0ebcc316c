"""Labelled titles for training: read, check, filter, fingerprint.

A labelled dataset is a train file and a validation file (or one file split in two), each
with at least a ``title`` and a ``category`` column; ``language`` and ``label_quality``
columns, where present, can filter it. The readers are `meli.formats`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meli.errors import InputError
from meli.formats import read_table

REQUIRED = ("title", "category")


@dataclass(frozen=True)
class DataFilter:
    languages: tuple[str, ...] = ()  # e.g. ("spanish",); empty keeps all
    label_qualities: tuple[str, ...] = ()  # e.g. ("reliable",); empty keeps all


# provenance key (checkpoint, then model card): the training split's titles per category, as
# JSON; the nightly report compares a catalog's predicted categories with it
TRAIN_MIX = "train_category_counts"


@dataclass(frozen=True)
class LabelledSplit:
    """Titles and their category names, as Arrow string arrays of equal length."""

    titles: pa.Array
    categories: pa.Array
    source: str

    def __len__(self) -> int:
        return len(self.titles)

    def category_counts(self) -> dict[str, int]:
        """Titles per category, in the categories' sorted order: the split's category mix."""
        counts = self.categories.value_counts()
        return dict(sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))


def load_labelled(path: str | Path, data_filter: DataFilter = DataFilter()) -> LabelledSplit:
    """Read one labelled file, keep the rows `data_filter` selects, drop unlabelled rows."""
    table = read_table(path, string_columns=("title", "category", "language", "label_quality"))
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; the file has: {', '.join(table.column_names)}"
        )
    for column, allowed in (("language", data_filter.languages), ("label_quality", data_filter.label_qualities)):
        if not allowed:
            continue
        if column not in table.column_names:
            raise InputError(f"{path}: cannot filter by {column}: the file has no {column!r} column")
        table = table.filter(pc.is_in(table[column], value_set=pa.array(allowed)))
    table = table.filter(pc.and_(pc.is_valid(table["title"]), pc.is_valid(table["category"])))
    if table.num_rows == 0:
        raise InputError(f"{path}: no labelled rows left (after filters {_describe(data_filter)})")
    return LabelledSplit(
        titles=table["title"].combine_chunks().cast(pa.string()),
        categories=table["category"].combine_chunks().cast(pa.string()),
        source=str(path),
    )


def split_holdout(data: LabelledSplit, fraction: float = 0.15, seed: int = 0) -> tuple[LabelledSplit, LabelledSplit]:
    """Stratified split of one file into train and validation, for data without a validation file."""
    rng = np.random.default_rng(seed)
    cats = data.categories.to_numpy(zero_copy_only=False)
    val_idx = []
    for cat in np.unique(cats):
        idx = np.flatnonzero(cats == cat)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        val_idx.extend(idx[:n_val])
    is_val = np.zeros(len(cats), dtype=bool)
    is_val[val_idx] = True
    pick = lambda mask: LabelledSplit(  # noqa: E731
        data.titles.filter(pa.array(mask)), data.categories.filter(pa.array(mask)), data.source
    )
    return pick(~is_val), pick(is_val)


def check_labels(train: LabelledSplit, validation: LabelledSplit) -> tuple[str, ...]:
    """The label set (sorted) — and an error if validation has categories train never saw."""
    labels = tuple(sorted(pc.unique(train.categories).to_pylist()))
    unseen = sorted(set(pc.unique(validation.categories).to_pylist()) - set(labels))
    if unseen:
        shown = ", ".join(unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        raise InputError(
            f"{validation.source}: {len(unseen)} category(ies) appear only in validation, never in "
            f"training ({shown}); the model could never predict them"
        )
    if len(labels) < 2:
        raise InputError(f"{train.source}: need at least 2 categories to train, found {len(labels)}")
    return labels


def fingerprint(*splits: LabelledSplit) -> str:
    """A short content hash of titles and categories: which data a model was trained on."""
    h = hashlib.sha256()
    for split in splits:
        for start in range(0, len(split), 65_536):  # a chunk at a time: no Python string per title held
            titles = split.titles.slice(start, 65_536).to_pylist()
            categories = split.categories.slice(start, 65_536).to_pylist()
            h.update("".join(f"{t}\x1f{c}\x1e" for t, c in zip(titles, categories)).encode("utf-8"))
        h.update(b"\x1d")
    return h.hexdigest()[:16]


def _describe(f: DataFilter) -> str:
    parts = []
    if f.languages:
        parts.append(f"language in {list(f.languages)}")
    if f.label_qualities:
        parts.append(f"label_quality in {list(f.label_qualities)}")
    return "; ".join(parts) or "none"
