"""Initial word vectors for the embedding table.

- ``random``: the table's own init, N(0, ``embedding_init_std``) (nothing to do here);
- ``word2vec`` / ``fasttext``: trained with gensim on the training titles' words, as the
  course's students did;
- ``pretrained``: a word2vec text file such as SBW (``SBW-vectors-300-min5.txt.bz2``),
  loaded with gensim; its dimension must match ``embedding_dim``.

Only rows of vocabulary *words* are set; bigram and character n-gram rows keep their random
init (they have no pretrained vector).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from meli.errors import InputError, first_line
from meli.tokenizer import N_SPECIAL, Tokenizer
from meli.train.config import EmbeddingConfig

log = logging.getLogger(__name__)


def word_vectors(settings: EmbeddingConfig, tokenizer: Tokenizer, titles, dim: int, seed: int):
    """gensim KeyedVectors for `settings`, or None for random init (`titles`: a list or an
    Arrow string array, read only to train vectors)."""
    if settings.init == "random":
        return None
    if settings.init == "pretrained":
        if not settings.path:
            raise InputError("embeddings.init = 'pretrained' needs embeddings.path (a word2vec text file)")
        return load_pretrained(Path(settings.path))
    from gensim.models import FastText, Word2Vec

    sentences = [tokenizer.words_reference(t) for t in (titles if isinstance(titles, list) else titles.to_pylist())]
    cls = Word2Vec if settings.init == "word2vec" else FastText
    log.info("training %s vectors (dim %d) on %d titles", settings.init, dim, len(sentences))
    model = cls(
        sentences=sentences,
        vector_size=dim,
        window=settings.window,
        min_count=settings.min_count,
        epochs=settings.epochs,
        seed=seed,
        workers=1,  # one worker: gensim is only reproducible single-threaded
    )
    return model.wv


def load_pretrained(path: Path):
    from gensim.models import KeyedVectors

    if not path.is_file():
        raise InputError(f"{path}: no such embeddings file")
    try:
        return KeyedVectors.load_word2vec_format(str(path), binary=False, unicode_errors="ignore")
    except (ValueError, UnicodeDecodeError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a word2vec text file ({first_line(e)})") from e


def init_embedding(weight: torch.Tensor, vectors, tokenizer: Tokenizer) -> int:
    """Copy the vectors of vocabulary words into `weight` (in place); returns how many."""
    if vectors is None:
        return 0
    if vectors.vector_size != weight.shape[1]:
        raise InputError(
            f"word vectors have dimension {vectors.vector_size} but the model's embedding_dim is "
            f"{weight.shape[1]}; set embedding_dim = {vectors.vector_size}"
        )
    rows, vecs = [], []
    for i, token in enumerate(tokenizer.vocabulary):
        if " " not in token and token in vectors.key_to_index:
            rows.append(i + N_SPECIAL)
            vecs.append(vectors[token])
    if rows:
        with torch.no_grad():
            weight[torch.tensor(rows)] = torch.from_numpy(np.stack(vecs).astype(np.float32))
    log.info("initialised %d of %d vocabulary rows from word vectors", len(rows), len(tokenizer.vocabulary))
    return len(rows)
