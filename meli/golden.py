"""Golden vectors for the tokenizer: titles with the ids they must get, shipped with the package.

`docs/tokenizer.md` is the tokenizer's specification; ``meli/resources/tokenizer-golden.json.gz``
holds its proof: one tokenizer (the default model's settings, a vocabulary built from the
embedded demo titles) and a few hundred titles, hostile ones included, each with its full and
compact ids. An implementation in another language that reproduces every case implements
the same tokenizer; the tests hold this one to them. Regenerate (only when the specification
changes, which changes every model's ids) with ``python -m meli.golden``.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from meli.tokenizer import Tokenizer, TokenizerConfig, load_stopwords

GOLDEN_FILE = "tokenizer-golden.json.gz"
FORMAT = "meli-tokenizer-golden/1"

HOSTILE_TITLES: tuple[str | None, ...] = (
    "", None, "   ", "®", "😀🔥", "Pañal 1/2 12V® 😀", "Bolso Maternal Moderno Con Cambiador Y Correa",
    "ÁÉÍÓÚ áéíóú ÑñÇç ü", "Kit 2x1 - 100% Original!!!", "İstanbul ẞ straße ﬁ ½ ²", "a", "de la para con",
    "Xc3s400-4pqg208c Xilinx Ic Chips. Qfp208. . 1piezas", "tab\tnew\nline", "x" * 400,
    # code points whose folding is not one ASCII letter: combining marks alone and after a
    # letter, fullwidth and mathematical letters, a ligature of 18 letters (U+FDFA), letters
    # that NFKD turns into capitals (which the spec then drops: it lowercases first)
    "cafe\u0301 \u0301abc", "ＡＢＣ１２３ ｶﾀｶﾅ", "𝐀𝐁𝐂 𝟏𝟐", "\ufdfa", "ℂℍ ℌ Ǆ ǅungla", "Σίσυφος Привет 한국어",
    "a\u200db\u00a0c\x00d", "👍🏽 ok", "Ⅻ ⑳ ㎏ ℡",
    # long titles: truncated full ids, so the compact encoding keeps them as they are
    " ".join(["funda iphone cargador"] * 30), "Bolso " * 60,
)


@dataclass(frozen=True)
class GoldenCase:
    title: str | None
    ids: list[int]
    compact_ids: list[int]


@dataclass(frozen=True)
class Golden:
    tokenizer: Tokenizer
    cases: list[GoldenCase]


def golden_tokenizer() -> Tokenizer:
    """The default model's tokenizer settings over a vocabulary of the embedded demo titles."""
    from meli.dataset import load_labelled
    from meli.demo_catalog import DEMO_DIR
    from meli.vocabulary import build_vocabulary

    config = TokenizerConfig(stopwords=load_stopwords(), head_words=2, head_repeat=3)
    return Tokenizer(config, build_vocabulary(load_labelled(DEMO_DIR / "train.jsonl.gz").titles, config))


def build_golden(n_titles: int = 300) -> Golden:
    from meli.dataset import load_labelled
    from meli.demo_catalog import DEMO_DIR

    tok = golden_tokenizer()
    catalog = load_labelled(DEMO_DIR / "validation.jsonl.gz").titles.to_pylist()[:n_titles]
    titles = list(HOSTILE_TITLES) + catalog
    return Golden(tok, [GoldenCase(t, tok.encode_reference(t), tok.encode_compact_reference(t)) for t in titles])


def write_golden(golden: Golden, path: Path) -> None:
    payload = {
        "format": FORMAT,
        "specification": "docs/tokenizer.md",
        "tokenizer": golden.tokenizer.config.to_dict(),
        "vocabulary": list(golden.tokenizer.vocabulary),
        "cases": [{"title": c.title, "ids": c.ids, "compact_ids": c.compact_ids} for c in golden.cases],
    }
    path.write_bytes(gzip.compress(json.dumps(payload, ensure_ascii=False).encode("utf-8"), mtime=0))


def load_golden() -> Golden:
    """The shipped golden vectors."""
    raw = resources.files("meli.resources").joinpath(GOLDEN_FILE).read_bytes()
    payload = json.loads(gzip.decompress(raw))
    if payload.get("format") != FORMAT:
        raise ValueError(f"{GOLDEN_FILE}: not {FORMAT}")
    tok = Tokenizer(TokenizerConfig.from_dict(payload["tokenizer"]), tuple(payload["vocabulary"]))
    return Golden(tok, [GoldenCase(c["title"], c["ids"], c["compact_ids"]) for c in payload["cases"]])


if __name__ == "__main__":
    target = Path(__file__).resolve().parent / "resources" / GOLDEN_FILE
    golden = build_golden()
    write_golden(golden, target)
    print(f"wrote {len(golden.cases)} cases to {target}")
