"""A BiGRU over a title's words: a teacher of another kind for `make bench-candidates`.

Not part of the product (it never ships: a recurrent network scores far below the MLP's
speed); the bench measures whether it helps as a teacher, the first lever of issue 23. The
MeLi 2019 winner ensembled recurrent networks over its own word vectors; this is the small
version of them: each word is its vector plus the mean of its hashed character 3-5-gram
vectors (fastText's subwords, so an unseen word still has one), read in order by a
bidirectional GRU; the max and the mean over the words go through one hidden layer to the
category scores. Trained with label smoothing and word dropout like the MLP, the epoch kept
by balanced accuracy on the choice split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from meli.dataset import LabelledSplit
from meli.metrics import balanced_accuracy
from meli.tokenizer import fnv1a_32, normalize_title
from meli.train.trainer import label_indices


@dataclass(frozen=True)
class BiGRUConfig:
    dim: int = 200  # word and subword vectors
    hidden: int = 192  # per direction
    head: int = 512
    dropout: float = 0.3
    word_dropout: float = 0.2  # a training title's words dropped (removed from the sequence)
    buckets: int = 1 << 18  # hashed character n-grams
    max_ngrams: int = 48  # per word
    max_words: int = 40
    epochs: int = 15
    batch_size: int = 128
    lr: float = 3e-3
    label_smoothing: float = 0.2
    seed: int = 0


@dataclass
class Words:
    """A title → its normalised words → (word ids, n-gram ids) for one batch."""

    config: BiGRUConfig
    vocabulary: dict[str, int]  # the training titles' words; 0 = padding and unknown
    _ngrams: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, titles: pa.Array, config: BiGRUConfig) -> "Words":
        vocabulary: dict[str, int] = {}
        for title in titles.to_pylist():
            for word in normalize_title(title or ""):
                vocabulary.setdefault(word, len(vocabulary) + 1)
        return cls(config, vocabulary)

    def split(self, titles: pa.Array) -> list[list[str]]:
        return [normalize_title(t or "")[: self.config.max_words] for t in titles.to_pylist()]

    def ngrams(self, word: str) -> list[int]:
        if word not in self._ngrams:
            padded = f" {word} ".encode()
            grams = [fnv1a_32(padded[p : p + n]) % self.config.buckets for n in (3, 4, 5) for p in range(len(padded) - n + 1)]
            self._ngrams[word] = (grams or [0])[: self.config.max_ngrams]
        return self._ngrams[word]

    def batch(self, titles: list[list[str]]) -> tuple[torch.Tensor, ...]:
        """(word ids (U,), n-gram ids (U, max_ngrams), positions (B, T) into the U distinct
        words of the batch, lengths (B,)); position 0 is padding."""
        titles = [t or [""] for t in titles]
        distinct: dict[str, int] = {}
        for title in titles:
            for word in title:
                distinct.setdefault(word, len(distinct) + 1)
        words = list(distinct)
        word_ids = torch.tensor([0] + [self.vocabulary.get(w, 0) for w in words])
        grams = torch.full((len(words) + 1, self.config.max_ngrams), self.config.buckets, dtype=torch.long)
        for i, w in enumerate(words, 1):
            g = self.ngrams(w) if w else []
            grams[i, : len(g)] = torch.tensor(g, dtype=torch.long)
        lengths = torch.tensor([len(t) for t in titles])
        positions = torch.zeros(len(titles), int(lengths.max()), dtype=torch.long)
        for i, title in enumerate(titles):
            positions[i, : len(title)] = torch.tensor([distinct[w] for w in title])
        return word_ids, grams, positions, lengths


class BiGRU(nn.Module):
    def __init__(self, n_words: int, n_labels: int, config: BiGRUConfig):
        super().__init__()
        self.word = nn.Embedding(n_words + 1, config.dim, padding_idx=0, sparse=True)
        self.subword = nn.EmbeddingBag(config.buckets + 1, config.dim, mode="mean", padding_idx=config.buckets, sparse=True)
        for table in (self.word, self.subword):
            nn.init.normal_(table.weight, 0.0, 0.1)
        with torch.no_grad():
            self.word.weight[0].zero_()
            self.subword.weight[config.buckets].zero_()
        self.gru = nn.GRU(config.dim, config.hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Sequential(nn.Linear(4 * config.hidden, config.head), nn.ReLU(), nn.Dropout(config.dropout),
                                  nn.Linear(config.head, n_labels))

    def forward(self, word_ids, grams, positions, lengths) -> torch.Tensor:
        # row 0 (padding), an unknown word's word vector and an all-padding bag are all zeros
        vectors = self.word(word_ids) + self.subword(grams)
        # (B, T, dim); a lookup, not vectors[positions]: that indexing's backward sums the
        # gradients of repeated words in a thread-dependent order, so a fit was not reproducible
        x = self.dropout(nn.functional.embedding(positions, vectors))
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=positions.shape[1])
        mask = (torch.arange(positions.shape[1]) < lengths.unsqueeze(1)).unsqueeze(2)  # (B, T, 1)
        top = out.masked_fill(~mask, -1e4).amax(1)
        mean = (out * mask).sum(1) / lengths.unsqueeze(1)
        return self.head(torch.cat([top, mean], 1))


@dataclass
class BiGRUTeacher:
    """A trained BiGRU as a `meli.train.distill.Teacher` (labels in the order it was trained on)."""

    net: BiGRU
    words: Words
    members: int = 1

    def scores(self, titles: pa.Array, batch_size: int = 1024) -> np.ndarray:
        self.net.eval()
        split = self.words.split(titles)
        with torch.no_grad():
            out = [self.net(*self.words.batch(split[s : s + batch_size])) for s in range(0, len(split), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    def probabilities(self, titles: pa.Array, device: torch.device | None = None) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.scores(titles)), -1).numpy()


def fit_bigru(train: LabelledSplit, choose: LabelledSplit, labels: tuple[str, ...], config: BiGRUConfig = BiGRUConfig(),
              keep_last: bool = False) -> tuple[BiGRUTeacher, int]:
    """Train on `train`; keep the epoch with the best balanced accuracy on `choose` (or the
    last, for a refit of a chosen epoch count). Returns the teacher and its epoch."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    words = Words.build(train.titles, config)
    teacher = BiGRUTeacher(BiGRU(len(words.vocabulary), len(labels), config), words)
    net, split, y = teacher.net, words.split(train.titles), torch.from_numpy(label_indices(train.categories, labels))
    y_choose = label_indices(choose.categories, labels)
    tables = [net.word.weight, net.subword.weight]
    optimizers = [torch.optim.AdamW([p for p in net.parameters() if all(p is not t for t in tables)], lr=config.lr),
                  torch.optim.SparseAdam(tables, lr=config.lr)]
    steps = config.epochs * math.ceil(len(split) / config.batch_size)
    schedules = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=config.lr, total_steps=steps) for o in optimizers]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    best, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, config.epochs + 1):
        net.train()
        order = rng.permutation(len(split))
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            batch = [[w for w in split[r] if rng.random() >= config.word_dropout] or split[r][:1] for r in rows]
            loss = loss_fn(net(*words.batch(batch)), y[rows])
            for o in optimizers:
                o.zero_grad()
            loss.backward()
            for o in optimizers:
                o.step()
            for s in schedules:
                s.step()
        score = balanced_accuracy(y_choose, teacher.scores(choose.titles).argmax(1))
        if keep_last or score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    net.eval()
    return teacher, best_epoch
