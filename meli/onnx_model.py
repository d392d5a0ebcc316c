"""The exported model file: what it carries, and onnxruntime sessions over it.

A ``model.onnx`` is self-sufficient (docs/design.md, "The model file"): besides the graph
(``token_ids`` int64 ``[batch, sequence]`` → ``probabilities`` float32 ``[batch, n_labels]``)
its ``metadata_props`` hold the tokenizer config, vocabulary, labels, model config and
provenance as JSON, so scoring needs nothing but the file. This module needs onnxruntime
only: no torch, no onnx, no mlflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from meli.errors import MeliError, ModelFileError, SettingError, first_line
from meli.contract import ModelSpec, SpecFields

log = logging.getLogger(__name__)

FORMAT = "meli-onnx/1"
INPUT_NAME = "token_ids"
OUTPUT_NAME = "probabilities"
Provider = Literal["auto", "cuda", "cpu"]
DEFAULT_MODEL = "artifacts/model.onnx"  # where meli-export writes and meli-score reads the model by default
DEFAULT_PROVIDER: Provider = "auto"  # CUDA when onnxruntime really gets it, else the CPU

_KEYS = ("meli.format", "meli.tokenizer", "meli.vocabulary", "meli.labels", "meli.model", "meli.provenance")


@dataclass(frozen=True)
class ModelCard(SpecFields):
    """Everything ``model.onnx`` says about itself: the `ModelSpec` every stage shares, how the
    graph reads its ids, and provenance."""

    spec: ModelSpec
    provenance: dict = field(default_factory=dict)  # run id, fingerprint, metrics, versions, export time
    encoding: str = "full"  # which token ids the graph reads: "full" or "compact" (meli.tokenizer)
    precision: str = "fp32"  # how the graph stores its embedding table: "fp32" or "fp16"
    # "int8-row": int8 products with a scale per title (meli.export.quantize); "int8": files from
    # before it, onnxruntime's dynamic quantization, whose scale depends on the whole batch
    matmuls: str = "fp32"

    def __post_init__(self) -> None:
        if self.encoding not in ("full", "compact"):
            raise ValueError(f"unknown token encoding {self.encoding!r}")

    @property
    def compact(self) -> bool:
        return self.encoding == "compact"

    def to_metadata(self) -> dict[str, str]:
        spec = self.spec.to_dict()
        return {
            "meli.format": FORMAT,
            "meli.tokenizer": json.dumps(spec["tokenizer_config"]),
            "meli.vocabulary": json.dumps(spec["vocabulary"], ensure_ascii=False),
            "meli.labels": json.dumps(spec["labels"], ensure_ascii=False),
            "meli.model": json.dumps({"kind": spec["model_kind"], "config": spec["model_config"], "members": spec["members"],
                                      "encoding": self.encoding, "precision": self.precision,
                                      "matmuls": self.matmuls, "temperature": spec["temperature"]}),
            "meli.provenance": json.dumps(self.provenance, ensure_ascii=False),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> "ModelCard":
        if meta.get("meli.format") != FORMAT:
            raise ModelFileError(f"{source}: not a meli-categorizer model (no '{FORMAT}' metadata)")
        missing = [k for k in _KEYS if k not in meta]
        if missing:
            raise ModelFileError(f"{source}: model metadata incomplete (missing {', '.join(missing)})")
        try:
            model = json.loads(meta["meli.model"])
            spec = ModelSpec.from_dict({
                "model_kind": model["kind"], "model_config": model["config"],
                "tokenizer_config": json.loads(meta["meli.tokenizer"]), "vocabulary": json.loads(meta["meli.vocabulary"]),
                "labels": json.loads(meta["meli.labels"]), "members": model.get("members", 1),
                "temperature": model.get("temperature", 1.0),
            })
            return cls(spec=spec, provenance=json.loads(meta["meli.provenance"]), encoding=model.get("encoding", "full"),
                       precision=model.get("precision", "fp32"), matmuls=model.get("matmuls", "fp32"))
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFileError(f"{source}: unreadable model metadata ({first_line(e)[:200]})") from e


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # the runtime is an extra: [cpu] or [gpu]
        raise MeliError("onnxruntime is not installed: pip install 'meli-categorizer[cpu]' (or [gpu] on a CUDA machine)") from e
    return onnxruntime


@dataclass
class OnnxModel:
    """An onnxruntime session over a meli model, with its card and the provider it really got."""

    session: object
    card: ModelCard
    provider: str  # "CUDAExecutionProvider" or "CPUExecutionProvider"
    source: str
    sha256: str | None = None

    def predict(self, token_ids):
        """``(B, T)`` int64 ids → ``(B, n_labels)`` float32 probabilities."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(token_ids, dtype=np.int64)})[0]


def load_onnx_model(model: str | os.PathLike | bytes, provider: Provider = DEFAULT_PROVIDER, threads: int | None = None) -> OnnxModel:
    """Open `model` (a path, or the file's bytes) on the requested provider.

    ``auto`` takes CUDA when onnxruntime offers it *and* the session really gets it, else
    the CPU. ``cuda`` is an error where CUDA is not usable: onnxruntime-gpu would otherwise
    log an error and silently run on the CPU, so the session's first provider is checked.
    """
    ort = _ort()
    source = "<bytes>" if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes):
        p = Path(model)
        if not p.is_file():
            raise ModelFileError(f"{p}: no such model file")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # onnxruntime's own warnings are noise for users
    # idle intra-op threads sleep instead of spinning: meli-score tokenizes, reads and writes
    # in other threads on the same cores while onnxruntime runs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise SettingError("provider", f"cuda, but this onnxruntime has no CUDA provider (has {', '.join(available)}); "
                        "install meli-categorizer[gpu] on a CUDA machine")
    wants_cuda = provider == "cuda" or (provider == "auto" and "CUDAExecutionProvider" in available)
    providers: list = ["CPUExecutionProvider"]
    if wants_cuda:
        # CNNs re-tune cuDNN per shape by default; the heuristic is stable across shapes
        providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception as e:  # noqa: BLE001 - a missing CUDA library shows up below
                log.debug("onnxruntime.preload_dlls failed: %s", e)
    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise ModelFileError(f"{source}: not a loadable ONNX model ({first_line(e)[:200]})") from e
    used = session.get_providers()[0]
    if provider == "cuda" and used != "CUDAExecutionProvider":
        raise SettingError("provider", f"cuda, but onnxruntime could not start CUDA (fell back to {used}); "
                        "check the CUDA/cuDNN libraries (pip install 'onnxruntime-gpu[cuda,cudnn]')")
    card = ModelCard.from_metadata(dict(session.get_modelmeta().custom_metadata_map), source)
    loaded = OnnxModel(session=session, card=card, provider=used, source=source)
    check_model(loaded)
    loaded.sha256 = file_sha256(model) if not isinstance(model, bytes) else hashlib.sha256(model).hexdigest()
    log.info("model %s on %s", source, used)
    if used == "CUDAExecutionProvider" and card.matmuls == "int8-row":
        log.warning("%s: its int8 products run on onnxruntime's CPU kernels; for GPU scoring export with "
                    "meli-export --no-quantize", source)
    if card.matmuls == "int8":
        log.warning("%s: exported with dynamic int8 quantization, whose probabilities depend on the rows scored "
                    "beside each title; export it again (meli-export) for answers that depend on the title alone", source)
    return loaded


def check_model(m: OnnxModel) -> None:
    """The graph and its card agree, checked once at load: one int64 ``[batch, sequence]``
    input and a ``probabilities`` output; as many labels as the graph has outputs (a label
    list one longer would shift every category silently); every id the card's tokenizer can
    produce is a row the graph holds (a probe run on the largest one)."""
    source = m.source
    inputs, outputs = m.session.get_inputs(), m.session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(int64)" or len(inputs[0].shape) != 2:
        raise ModelFileError(f"{source}: expected one int64 input named {INPUT_NAME!r} shaped [batch, sequence]")
    if OUTPUT_NAME not in [o.name for o in outputs]:
        raise ModelFileError(f"{source}: the graph has no output named {OUTPUT_NAME!r}")
    try:
        tokenizer = m.card.tokenizer()
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{source}: unusable tokenizer settings ({e})") from e
    n_ids = tokenizer.n_compact_ids if m.card.compact else tokenizer.n_ids
    try:
        probe = m.predict(np.array([[n_ids - 1]], dtype=np.int64))
    except Exception as e:  # noqa: BLE001 - onnxruntime's own error types
        raise ModelFileError(f"{source}: the tokenizer's ids reach {n_ids - 1:,} but the graph cannot read them "
                             f"(its vocabulary and graph do not belong together: {first_line(e)[:160]})") from e
    if probe.ndim != 2:
        raise ModelFileError(f"{source}: its {OUTPUT_NAME!r} output has shape {list(probe.shape)} for one title; "
                             "expected [batch, categories]")
    width = probe.shape[1]
    if width != len(m.card.labels):
        raise ModelFileError(f"{source}: the model file lists {len(m.card.labels):,} labels but the graph outputs "
                             f"{width:,} probabilities")
