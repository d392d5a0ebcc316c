"""The two model families: a pooled-embedding MLP and a multi-kernel CNN.

Both take ``token_ids`` (B, T) int64 with 0 = padding and return class scores (B, n_labels)
(logits; softmax is applied by whoever needs probabilities). They are plain ``nn.Module``s
rebuilt from their config alone (``build_model(kind, config)``): no files are opened in a
constructor, so a checkpoint or an export needs nothing but the checkpoint.

Export-minded choices (see docs/design.md): ``nn.Embedding(padding_idx=0)`` + masked mean instead of
``nn.EmbeddingBag`` (which exports as a slow ONNX Loop), and the CNN pads its input inside
``forward`` so that titles shorter than the widest kernel still work.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meli.contract import CNNConfig, MLPConfig, ModelConfig, ModelKind, config_from_dict


class Dropout(nn.Dropout):
    """``nn.Dropout``'s arithmetic (zero each value with probability p, scale the rest by
    1 / (1 - p)) from one uniform draw per value: on the CPU about twice as fast as
    ``F.dropout``'s Bernoulli sampling, which was a tenth of a training step. With `rng` set
    (`seed_dropout`) a CPU tensor's draws come from that numpy generator instead, 16 random
    bits a value (p is rounded to a multiple of 1/65,536), and the mask is one float
    tensor: several times cheaper again than torch's generator and a boolean mask, forward
    and backward. Identity in eval mode, so it leaves no trace in an exported graph."""

    rng: np.random.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.rng is not None and x.device.type == "cpu":
            bits = np.frombuffer(self.rng.bytes(2 * x.numel()), np.uint16).reshape(x.shape)
            scale = np.where(bits >= round(self.p * 65536), np.float32(1.0 / (1.0 - self.p)), np.float32(0.0))
            return x * torch.from_numpy(scale).to(x.dtype)
        keep = torch.rand_like(x) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))


def seed_dropout(model: nn.Module, seed: tuple[int, ...]) -> None:
    """Draw the training masks of `model`'s `Dropout` layers on the CPU from numpy generators
    seeded with ``(*seed, layer)``: a fit that seeds them anew each epoch gets the same masks
    whether or not it was stopped and resumed in between."""
    for layer, module in enumerate(m for m in model.modules() if isinstance(m, Dropout)):
        module.rng = np.random.default_rng((*seed, layer))


def _head(in_dim: int, hidden: tuple[int, ...], n_labels: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [Dropout(dropout), nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers += [Dropout(dropout), nn.Linear(in_dim, n_labels)]
    return nn.Sequential(*layers)


def _drop_tokens(token_ids: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Word dropout: during training, replace a fraction p of the ids by padding."""
    if not training or p == 0.0:
        return token_ids
    keep = torch.rand(token_ids.shape, device=token_ids.device) >= p
    return token_ids * keep


def _embedding(n_ids: int, dim: int, std: float) -> nn.Embedding:
    emb = nn.Embedding(n_ids, dim, padding_idx=0)
    with torch.no_grad():
        emb.weight.normal_(0.0, std)
        emb.weight[0].zero_()
    return emb


class MLP(nn.Module):
    """Pooled token embeddings (mean, or attention-weighted) → hidden layers → class scores."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.embedding = _embedding(config.n_ids, config.embedding_dim, config.embedding_init_std)
        if config.pooling == "attention":
            # one learned relevance score per token id, like a learned IDF; starts uniform
            self.token_score = nn.Embedding(config.n_ids, 1, padding_idx=0)
            nn.init.zeros_(self.token_score.weight)
        self.head = _head(config.embedding_dim, config.hidden, config.n_labels, config.dropout)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        token_ids = _drop_tokens(token_ids, self.config.embedding_dropout, self.training)
        mask = (token_ids != 0).unsqueeze(-1).to(torch.float32)  # (B, T, 1)
        emb = self.embedding(token_ids)  # (B, T, E); padding rows are zero
        if self.config.pooling == "attention":
            score = self.token_score(token_ids) - (1.0 - mask) * 1e4  # (B, T, 1); padding → -1e4
            weight = torch.softmax(score, dim=1)  # an empty title: uniform over zero rows → zeros
            pooled = (weight * emb).sum(1)  # (B, E)
        else:
            # clamp: an all-padding row (empty title) pools to zeros, never NaN
            pooled = emb.sum(1) / mask.sum(1).clamp(min=1.0)  # (B, E)
        return self.head(pooled)


class CNN(nn.Module):
    """Parallel Conv1d kernels over the token sequence, max-over-time pooled."""

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        self.embedding = _embedding(config.n_ids, config.embedding_dim, config.embedding_init_std)
        self.convs = nn.ModuleList(nn.Conv1d(config.embedding_dim, config.filters, k) for k in config.kernel_sizes)
        self.head = _head(config.filters * len(config.kernel_sizes), config.hidden, config.n_labels, config.dropout)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        token_ids = _drop_tokens(token_ids, self.config.embedding_dropout, self.training)
        # pad by (widest kernel - 1) so every title, even of length 1, has a valid window
        token_ids = F.pad(token_ids, (0, max(self.config.kernel_sizes) - 1))  # (B, T')
        mask = (token_ids != 0).unsqueeze(1)  # (B, 1, T')
        x = self.embedding(token_ids).transpose(1, 2)  # (B, E, T')
        pooled = []
        for conv, k in zip(self.convs, self.config.kernel_sizes):
            h = F.relu(conv(x))  # (B, F, T' - k + 1), >= 0
            # windows that start on padding hold no token: zero them (ReLU output is >= 0,
            # so a zero never beats a real window, and an empty title pools to zeros)
            h = h * mask[:, :, : h.shape[-1]]
            pooled.append(h.amax(dim=-1))  # (B, F)
        return self.head(torch.cat(pooled, dim=1))


class Ensemble(nn.Module):
    """Members of one family over the same token ids; their softmax probabilities averaged.

    ``forward`` returns the log of the mean probability, so that ``softmax(forward(x))`` is the
    mean probability itself (what the exported graph outputs) and ``argmax`` is the
    ensemble's prediction, like any member's logits.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(token_ids), dim=-1) for m in self.members]).mean(0)
        return torch.log(probs.clamp(min=1e-30))


class Calibrated(nn.Module):
    """Probabilities from a model's scores: ``softmax(model(x) / temperature)``. One positive
    divisor keeps each title's ranking of the categories (`meli.calibration`)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model = model
        self.temperature = float(temperature)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        scores = self.model(token_ids)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        return torch.softmax(scores, dim=-1)  # (B, n_labels)


def build_model(kind: ModelKind, config: ModelConfig | dict, members: int = 1) -> nn.Module:
    """One model, or with ``members > 1`` an `Ensemble` of that many of the same shape."""
    if isinstance(config, dict):
        config = config_from_dict(kind, config)
    if members > 1:
        return Ensemble([build_model(kind, config) for _ in range(members)])
    return MLP(config) if kind == "mlp" else CNN(config)
