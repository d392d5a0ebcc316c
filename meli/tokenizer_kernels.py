"""The tokenizer's compiled kernels (numba): raw UTF-8 bytes of an Arrow string array → ids.

`meli.tokenizer` holds the specification and its reference implementation; this module is the
fast path that training and scoring run, and the tests hold it to the reference id for id.
It works on the Arrow buffers directly (offsets + bytes, no Python string per title) and
releases the GIL, so a scorer can tokenize one batch while onnxruntime runs another.

Normalisation is a per-code-point table: each code point's folded form (lowercase → NFKD →
no combining accents → anything outside ``[a-z0-9]`` a space) is what the reference gives for
that character alone. That equals the reference on whole titles because NFKD decomposes
character by character and its only context effect (reordering combining marks) permutes
characters that are all dropped or all become spaces. The table is filled lazily from
Python's own `unicodedata` for the code points a batch actually holds (`CharFolding`), so
it is exact for every character the reference knows, in every Python version.

Token lookups (words, stopwords, ``"k^word"`` head tokens, ``"a b"`` bigrams) use an
open-addressing hash table over the tokens' UTF-8 bytes (`TokenTable`), built once per
tokenizer.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass, field

import numba as nb
import numpy as np

FNV32_OFFSET = 2166136261
FNV32_PRIME = 16777619
FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3

_ACCENTS = re.compile("[\u0300-\u036f]")
_NON_ALNUM = re.compile("[^a-z0-9]+")
_MAX_FOLD = 32  # the longest fold of any code point is 18 ASCII characters (U+FDFA)
N_CODEPOINTS = 0x110000
SPACE = 32


def fold_char(cp: int) -> bytes:
    """The reference normalisation of one code point, spaces kept (``"Ñ"`` → ``b"n"``)."""
    s = unicodedata.normalize("NFKD", chr(cp).lower())
    s = _ACCENTS.sub("", s)
    return _NON_ALNUM.sub(" ", s).encode("ascii")


@dataclass
class CharFolding:
    """Code point → folded ASCII bytes, filled on demand (`ensure`) for the code points seen.

    Safe for threads that encode at once (training encodes two chunks at a time): `ensure`
    holds a lock while it looks for code points and adds them, so no thread finds a code
    point marked known before its bytes are in `data`. An entry, once made, never changes and
    `data` only grows (a new array each time), so whatever a thread reads after its `ensure`
    holds every code point of its titles."""

    known: np.ndarray = field(default_factory=lambda: np.zeros(N_CODEPOINTS, dtype=np.bool_))
    start: np.ndarray = field(default_factory=lambda: np.zeros(N_CODEPOINTS, dtype=np.int32))
    length: np.ndarray = field(default_factory=lambda: np.zeros(N_CODEPOINTS, dtype=np.uint8))
    data: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.add(range(128))

    def __getstate__(self) -> dict:  # a lock does not pickle (Spark ships tokenizers to its workers)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def add(self, codepoints) -> None:
        chunks, pos = [], len(self.data)
        for cp in codepoints:
            folded = fold_char(int(cp))
            if len(folded) > _MAX_FOLD:  # never happens in Unicode 15; keep the kernel's bound honest
                folded = folded[:_MAX_FOLD]
            self.start[cp], self.length[cp], self.known[cp] = pos, len(folded), True
            chunks.append(folded)
            pos += len(folded)
        if chunks:
            self.data = np.concatenate([self.data, np.frombuffer(b"".join(chunks), dtype=np.uint8)])

    def ensure(self, offsets: np.ndarray, data: np.ndarray) -> None:
        """Fold every code point of the titles in `data` that is not in the table yet."""
        if len(data) and data.max() >= 0x80:
            with self._lock:
                missing = _unknown_codepoints(offsets, data, self.known)
                if len(missing):
                    self.add(np.unique(missing))


@dataclass(frozen=True)
class TokenTable:
    """Tokens (UTF-8) → values, as open addressing over FNV-1a 64 hashes; -1 = absent."""

    keys: np.ndarray  # uint8, every token's bytes back to back
    key_start: np.ndarray  # int64 (n + 1,)
    values: np.ndarray  # int64 (n,)
    slots: np.ndarray  # int64 (capacity,), index into keys or -1

    @classmethod
    def build(cls, tokens, values) -> "TokenTable":
        encoded = [t.encode("utf-8") for t in tokens]
        key_start = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=key_start[1:])
        keys = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        capacity = 1 << max(4, int(2 * max(1, len(encoded)) - 1).bit_length())  # load factor <= 1/2
        slots = _build_slots(keys, key_start, capacity)
        return cls(keys, key_start, np.asarray(values, dtype=np.int64), slots)


# ----------------------------------------------------------------------------- kernels
@nb.njit(cache=True, nogil=True)
def _fnv64(buf, start, end):
    h = np.uint64(FNV64_OFFSET)
    for i in range(start, end):
        h = (h ^ np.uint64(buf[i])) * np.uint64(FNV64_PRIME)
    return h


@nb.njit(cache=True, nogil=True)
def _build_slots(keys, key_start, capacity):
    slots = np.full(capacity, -1, dtype=np.int64)
    mask = capacity - 1
    for k in range(len(key_start) - 1):
        s = np.int64(_fnv64(keys, key_start[k], key_start[k + 1]) & np.uint64(mask))
        while slots[s] != -1:
            s = (s + 1) & mask
        slots[s] = k
    return slots


@nb.njit(cache=True, nogil=True)
def _lookup(keys, key_start, values, slots, buf, start, end):
    """The value of token ``buf[start:end]``, or -1."""
    mask = len(slots) - 1
    s = np.int64(_fnv64(buf, start, end) & np.uint64(mask))
    n = end - start
    while True:
        k = slots[s]
        if k == -1:
            return -1
        ks = key_start[k]
        if key_start[k + 1] - ks == n:
            same = True
            for i in range(n):
                if keys[ks + i] != buf[start + i]:
                    same = False
                    break
            if same:
                return values[k]
        s = (s + 1) & mask


@nb.njit(cache=True, nogil=True)
def _decode(data, i, end):
    """(code point, next index) of the UTF-8 sequence at ``data[i]``; U+FFFD for bad bytes."""
    b = np.int64(data[i])
    if b < 0x80:
        return b, i + 1
    if b >= 0xF0:
        n, cp = 3, b & 0x07
    elif b >= 0xE0:
        n, cp = 2, b & 0x0F
    elif b >= 0xC0:
        n, cp = 1, b & 0x1F
    else:
        return 0xFFFD, i + 1
    if i + n >= end:  # the sequence runs past the title
        return 0xFFFD, end
    for j in range(1, n + 1):
        c = np.int64(data[i + j])
        if c & 0xC0 != 0x80:
            return 0xFFFD, i + j
        cp = (cp << 6) | (c & 0x3F)
    if cp >= 0x110000:
        return 0xFFFD, i + n + 1
    return cp, i + n + 1


@nb.njit(cache=True, nogil=True)
def _unknown_codepoints(offsets, data, known):
    out = np.empty(64, dtype=np.int64)
    n = 0
    seen = known.copy()
    for t in range(len(offsets) - 1):
        i, end = offsets[t], offsets[t + 1]
        while i < end:
            if data[i] < 0x80:
                i += 1
                continue
            cp, i = _decode(data, i, end)
            if not seen[cp]:
                seen[cp] = True
                if n == len(out):
                    out = np.concatenate((out, np.empty(n, dtype=np.int64)))
                out[n] = cp
                n += 1
    return out[:n]


@nb.njit(cache=True, nogil=True)
def _words(data, start, end, fold_start, fold_len, fold_data, map_digits, text, word_start, word_len):
    """Normalise one title into `text`; its words' starts and lengths; returns the word count."""
    n_text = 0
    n_words = 0
    in_word = False
    i = start
    while i < end:
        cp, i = _decode(data, i, end)
        fs = fold_start[cp]
        for j in range(fold_len[cp]):
            c = fold_data[fs + j]
            if c == SPACE:
                in_word = False
                continue
            if map_digits and c >= 48 and c <= 57:
                c = 48
            if not in_word:
                word_start[n_words] = n_text
                word_len[n_words] = 0
                n_words += 1
                in_word = True
            text[n_text] = c
            word_len[n_words - 1] += 1
            n_text += 1
    return n_words


@nb.njit(cache=True, nogil=True)
def _put(dst, at, src, start, n):
    """Copy ``src[start:start+n]`` to ``dst[at:]``; the index after it."""
    for j in range(n):
        dst[at + j] = src[start + j]
    return at + n


@nb.njit(cache=True, nogil=True)
def _put_int(dst, at, value):
    """Write positive `value` in decimal ASCII at ``dst[at:]``; the index after it."""
    digits, k = 0, value
    while k > 0:
        digits += 1
        k //= 10
    for d in range(digits - 1, -1, -1):
        dst[at + d] = 48 + value % 10
        value //= 10
    return at + digits


@nb.njit(cache=True, nogil=True)
def _ngram_count(length, n_min, n_max):
    """Character n-grams (n_min..n_max) of one word padded with a space on each side."""
    total = 0
    for n in range(n_min, n_max + 1):
        if length + 2 >= n:
            total += length + 3 - n
    return total


@nb.njit(cache=True, nogil=True)
def _emit_ngrams(text, ws, wl, n, pad, char_offset, buckets, out, pos, limit):
    """Append the hashed n-grams of word ``text[ws:ws+wl]`` (padded) to ``out[pos:limit]``."""
    padded_len = wl + 2
    for p in range(padded_len - n + 1):
        if pos >= limit:
            return pos
        h = np.uint64(FNV32_OFFSET)  # 32-bit FNV-1a in 64-bit arithmetic, wrapped by the mask
        for q in range(p, p + n):
            c = pad if (q == 0 or q == padded_len - 1) else text[ws + q - 1]
            h = ((h ^ np.uint64(c)) * np.uint64(FNV32_PRIME)) & np.uint64(0xFFFFFFFF)
        out[pos] = char_offset + np.int64(h % np.uint64(buckets))
        pos += 1
    return pos


@nb.njit(cache=True, nogil=True)
def encode_titles(
    offsets, data,  # the Arrow string array: int64 offsets (n + 1,), uint8 bytes
    fold_start, fold_len, fold_data,  # CharFolding
    vk, vs, vv, vslots,  # vocabulary TokenTable
    sk, ss, sv, sslots,  # stopword TokenTable
    map_digits, min_token_length, word_bigrams, head_words, head_repeat,
    n_min, n_max, char_offset, buckets, max_length,
    compact, fused_offset,
):
    """Every title's ids, flat: ``(values, offsets)``, title ``t`` being ``values[offsets[t]:offsets[t+1]]``.

    Full ids follow the spec in `meli.tokenizer`. With ``compact``, a title whose full ids fit
    in ``max_length`` is written as: a known word's *fused* id (``fused_offset + vocab index``:
    the word and all its character n-grams, one row of the exported table), an unknown word as
    UNK plus its n-grams, each known head token once as its fused id (the group written
    ``head_repeat`` times), then the known bigrams; a title that would be truncated keeps its
    full ids, so the exported graph's sum and count equal the trained model's on every title.
    """
    n_titles = len(offsets) - 1
    offsets_out = np.zeros(n_titles + 1, dtype=np.int64)
    values = np.empty(max(1024, n_titles * (32 if compact else 128)), dtype=np.int64)
    row = np.empty(max_length, dtype=np.int64)
    longest = 0
    for t in range(n_titles):
        longest = max(longest, offsets[t + 1] - offsets[t])
    cap = longest * 18 + 8
    text = np.empty(cap, dtype=np.uint8)
    raw_start = np.empty(cap, dtype=np.int64)
    raw_len = np.empty(cap, dtype=np.int64)
    word_start = np.empty(cap, dtype=np.int64)
    word_len = np.empty(cap, dtype=np.int64)
    word_id = np.empty(cap, dtype=np.int64)
    head_ids = np.empty(max(1, head_words), dtype=np.int64)
    bigram_ids = np.empty(cap, dtype=np.int64)
    scratch = np.empty(2 * cap + 24, dtype=np.uint8)
    for t in range(n_titles):
        n_raw = _words(data, offsets[t], offsets[t + 1], fold_start, fold_len, fold_data, map_digits,
                       text, raw_start, raw_len)
        # keep words long enough and not stopwords
        n = 0
        for w in range(n_raw):
            ws, wl = raw_start[w], raw_len[w]
            if wl < min_token_length:
                continue
            if len(sslots) and _lookup(sk, ss, sv, sslots, text, ws, ws + wl) != -1:
                continue
            word_start[n], word_len[n] = ws, wl
            v = _lookup(vk, vs, vv, vslots, text, ws, ws + wl)
            word_id[n] = v if v >= 0 else 1
            n += 1
        # head words: "k^word" for the first head_words words, where known
        n_heads = 0
        for w in range(min(n, head_words)):
            end = _put_int(scratch, 0, w + 1)
            scratch[end] = 94  # '^'
            end = _put(scratch, end + 1, text, word_start[w], word_len[w])
            v = _lookup(vk, vs, vv, vslots, scratch, 0, end)
            if v >= 0:
                head_ids[n_heads] = v
                n_heads += 1
        # word bigrams "a b", where known
        n_bigrams = 0
        if word_bigrams:
            for w in range(n - 1):
                end = _put(scratch, 0, text, word_start[w], word_len[w])
                scratch[end] = SPACE
                end = _put(scratch, end + 1, text, word_start[w + 1], word_len[w + 1])
                v = _lookup(vk, vs, vv, vslots, scratch, 0, end)
                if v >= 0:
                    bigram_ids[n_bigrams] = v
                    n_bigrams += 1
        full = n + n_heads * head_repeat + n_bigrams
        if n_max > 0:
            for w in range(n):
                full += _ngram_count(word_len[w], n_min, n_max)
        pos = 0
        if compact and full <= max_length:
            for w in range(n):
                if word_id[w] >= 2:
                    row[pos] = fused_offset + word_id[w] - 2
                    pos += 1
                else:
                    row[pos] = 1
                    pos += 1
                    if n_max > 0:
                        for g in range(n_min, n_max + 1):
                            pos = _emit_ngrams(text, word_start[w], word_len[w], g, SPACE, char_offset, buckets,
                                               row, pos, max_length)
            for h in range(n_heads):
                row[pos] = fused_offset + head_ids[h] - 2
                pos += 1
            for b in range(n_bigrams):
                row[pos] = bigram_ids[b]
                pos += 1
        else:
            for w in range(n):
                if pos < max_length:
                    row[pos] = word_id[w]
                    pos += 1
            for r in range(head_repeat):
                for h in range(n_heads):
                    if pos < max_length:
                        row[pos] = head_ids[h]
                        pos += 1
            for b in range(n_bigrams):
                if pos < max_length:
                    row[pos] = bigram_ids[b]
                    pos += 1
            if n_max > 0:
                for g in range(n_min, n_max + 1):
                    for w in range(n):
                        pos = _emit_ngrams(text, word_start[w], word_len[w], g, SPACE, char_offset, buckets,
                                           row, pos, max_length)
        start = offsets_out[t]
        if start + pos > len(values):  # grow the flat output
            values = np.concatenate((values, np.empty(max(len(values), pos), dtype=np.int64)))
        values[start : start + pos] = row[:pos]
        offsets_out[t + 1] = start + pos
    return values[: offsets_out[n_titles]], offsets_out


@nb.njit(cache=True, nogil=True)
def pad_rows(values, offsets, rows, width):
    """Rows `rows` of a flat (values, offsets) encoding as a right-padded ``(len(rows), width)`` array."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i in range(len(rows)):
        r = rows[i]
        n = min(width, offsets[r + 1] - offsets[r])
        out[i, :n] = values[offsets[r] : offsets[r] + n]
    return out


@nb.njit(cache=True, nogil=True)
def _expanded_lengths(values, offsets, rows, fused_offset, group_ptr):
    """How many full ids each of titles `rows` of a compact encoding stands for."""
    lengths = np.zeros(len(rows), dtype=np.int64)
    for i in range(len(rows)):
        r = rows[i]
        n = 0
        for j in range(offsets[r], offsets[r + 1]):
            v = values[j]
            n += 1 if v < fused_offset else group_ptr[v - fused_offset + 1] - group_ptr[v - fused_offset]
        lengths[i] = n
    return lengths


@nb.njit(cache=True, nogil=True)
def expanded_rows(values, offsets, rows, fused_offset, group_ptr, group_ids, width):
    """Rows `rows` of a compact encoding with every fused id replaced by the full ids it stands
    for (``group_ids[group_ptr[g]:group_ptr[g + 1]]`` for fused id ``fused_offset + g``), right-padded
    to `width` (0: the longest row): ``(len(rows), width)`` int64. Same multiset of ids per title
    as the full encoding, grouped by word instead of by n-gram size."""
    lengths = _expanded_lengths(values, offsets, rows, fused_offset, group_ptr)
    if width == 0:
        width = max(1, lengths.max()) if len(rows) else 1
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i in range(len(rows)):
        r = rows[i]
        k = 0
        for j in range(offsets[r], offsets[r + 1]):
            v = values[j]
            if v < fused_offset:
                if k < width:
                    out[i, k] = v
                k += 1
            else:
                g = v - fused_offset
                for q in range(group_ptr[g], group_ptr[g + 1]):
                    if k < width:
                        out[i, k] = group_ids[q]
                    k += 1
    return out


@nb.njit(cache=True, nogil=True)
def expanded_flat(values, offsets, rows, fused_offset, group_ptr, group_ids):
    """`expanded_rows` without the padding: the full ids of titles `rows`, flat, and their offsets."""
    out_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    out_offsets[1:] = np.cumsum(_expanded_lengths(values, offsets, rows, fused_offset, group_ptr))
    out = np.empty(out_offsets[-1], dtype=np.int64)
    for i in range(len(rows)):
        r = rows[i]
        k = out_offsets[i]
        for j in range(offsets[r], offsets[r + 1]):
            v = values[j]
            if v < fused_offset:
                out[k] = v
                k += 1
            else:
                g = v - fused_offset
                for q in range(group_ptr[g], group_ptr[g + 1]):
                    out[k] = group_ids[q]
                    k += 1
    return out, out_offsets
