"""The checkpoint: one file holding everything needed to rebuild a trained model.

Weights, model kind and config, tokenizer config, vocabulary, labels, metrics and
provenance, as plain Python values and tensors, so that it loads with
``torch.load(path, weights_only=True)`` (no pickled classes). Like nanoGPT, the model is
rebuilt from the stored config: ``build_model(ckpt.model_kind, ckpt.model_config)``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from meli.errors import ModelFileError, first_line
from meli.formats import atomic_write_bytes
from meli.contract import ModelSpec, SpecFields
from meli.models import Calibrated, build_model

FORMAT = "meli-checkpoint"
VERSION = 1


@dataclass
class Checkpoint(SpecFields):
    """A `ModelSpec` (the contract every stage shares) with its weights, metrics and provenance."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)  # validation metrics of the best epoch
    provenance: dict[str, str] = field(default_factory=dict)  # run id, data fingerprint, versions…

    def build_model(self, shared: bool = False) -> nn.Module:
        """The model in eval mode, weights loaded, on the CPU: it returns scores (logits; an
        ensemble's log mean probability), not calibrated. ``shared``: its weights *are* the
        checkpoint's tensors (no copy, for read-only use such as a teacher's)."""
        if not shared:
            model = build_model(self.model_kind, self.model_config, self.members)
            model.load_state_dict(self.state_dict)
            return model.eval()
        with torch.device("meta"):
            model = build_model(self.model_kind, self.model_config, self.members)
        model.load_state_dict(self.state_dict, assign=True)
        return model.eval()

    def probability_model(self) -> nn.Module:
        """`build_model` with the calibrated softmax on top: what the exported graph computes."""
        return Calibrated(self.build_model(), self.temperature).eval()

    def to_payload(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            **self.spec.to_dict(),
            # plain types only: weights_only=True refuses anything else (a TorchVersion, say)
            "metrics": {str(k): float(v) for k, v in self.metrics.items()},
            "provenance": {str(k): str(v) for k, v in self.provenance.items()},
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()},
        }


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """Write atomically: a crash mid-write never leaves a half-written checkpoint."""
    buffer = io.BytesIO()
    torch.save(ckpt.to_payload(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: no such checkpoint file")
    with p.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise ModelFileError(f"{p}: not a readable checkpoint (not a file torch.save wrote)")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a corrupt or foreign file
        raise ModelFileError(f"{p}: not a readable checkpoint ({first_line(e)[:200]})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{p}: not a meli-categorizer checkpoint (no '{FORMAT}' format marker)")
    if payload.get("version") != VERSION:
        raise ModelFileError(f"{p}: checkpoint version {payload.get('version')}, this tool reads {VERSION}")
    try:
        return Checkpoint(
            spec=ModelSpec.from_dict(payload),
            state_dict=payload["state_dict"],
            metrics=dict(payload.get("metrics", {})),
            provenance=dict(payload.get("provenance", {})),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{p}: incomplete checkpoint ({e})") from e
