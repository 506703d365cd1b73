"""Retrieval-augmented prompts over real text, for chunk fusion's example, benchmark and
tests: a pool of Wikipedia paragraphs (the calibration text package), prompts made of an
instruction, some of those paragraphs in any order (the chunks) and a question, with a fact
planted in one chunk (or split over two) so answers can be checked, and the marks a server
with ``--a2ats-chunk-fusion`` takes for them (:mod:`a2ats_sglang.fusion.marks`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from a2ats_sglang.calibration.texts import wiki_split

INSTRUCTION = "Answer the question from the documents below.\n\n"
NAMES = ["Zorblat", "Quenmir", "Havelin", "Brostak", "Yselda", "Tormund", "Wexley", "Ombrina"]
TOWNS = ["Karvello", "Duneth", "Prasko", "Ilmarren", "Svetograd", "Ottavel"]


def paragraphs(tokenizer, n: int, lo: int = 256, hi: int = 512, part: str = "eval") -> list[str]:
    """``n`` passages of ``lo``-``hi`` tokens: whole sentences of consecutive Wikipedia
    paragraphs of ``part``, so each is plain text that tokenizes the same inside a prompt."""
    out, sentences = [], []
    count = lambda s: len(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    for para in wiki_split(part):
        for sentence in re.split(r"(?<=[.!?])\s+", para.strip()):
            candidate = " ".join(sentences + [sentence])
            if sentences and count(candidate) > hi:
                text = " ".join(sentences)
                if count(text) >= lo:
                    out.append(text)
                    if len(out) == n:
                        return out
                sentences = [sentence]
            else:
                sentences.append(sentence)
    raise RuntimeError(f"only {len(out)} passages of {lo}-{hi} tokens in the {part} split")


@dataclass(frozen=True)
class RagPrompt:
    """An instruction, chunks (documents) and a question; ``answer``: the planted code."""

    chunks: tuple[str, ...]
    question: str
    answer: str
    prefix: str = INSTRUCTION

    @property
    def text(self) -> str:
        return self.prefix + "".join(c + "\n\n" for c in self.chunks) + self.question

    def marks(self, ratio: float | None = None, method: str | None = None) -> dict:
        """The ``custom_params`` that ask a fusing server to reuse the chunks."""
        out = {"a2ats_chunks": list(self.chunks)}
        if ratio is not None:
            out["a2ats_recompute_ratio"] = ratio
        if method is not None:
            out["a2ats_fusion_method"] = method
        return out


def plant(chunk: str, sentence: str, rng: random.Random) -> str:
    """``chunk`` with ``sentence`` inserted between two of its sentences."""
    parts = re.split(r"(?<=[.!?]) ", chunk)
    cut = rng.randrange(1, max(2, len(parts)))
    return " ".join(parts[:cut] + [sentence] + parts[cut:])


GENERIC_QUESTION = "Question: What are the documents above about?\nAnswer:"


def rag_prompt(pool: list[str], k: int, seed: int, two_hop: bool | None = None, plant_fact: bool = True) -> RagPrompt:
    """``k`` chunks drawn from ``pool`` in a random order, a secret code planted in one
    (or, ``two_hop``, a person's town in one and the town's code in another; default: every
    other seed), and the question for it. Without ``plant_fact`` the chunks are the pool's
    as they are (each reused as is by every prompt drawing it) and the question generic."""
    rng = random.Random(seed)
    chunks = rng.sample(pool, k)
    if not plant_fact:
        return RagPrompt(tuple(chunks), GENERIC_QUESTION, "")
    name, code = rng.choice(NAMES), str(rng.randrange(1000, 10000))
    if not (seed % 2 == 1 if two_hop is None else two_hop):
        j = rng.randrange(k)
        chunks[j] = plant(chunks[j], f"The secret code of {name} is {code}.", rng)
        question = f"Question: What is the secret code of {name}?\nAnswer: The secret code of {name} is"
    else:
        town = rng.choice(TOWNS)
        a, b = rng.sample(range(k), 2)
        chunks[a] = plant(chunks[a], f"{name} lives in the town of {town}.", rng)
        chunks[b] = plant(chunks[b], f"The secret code of the town of {town} is {code}.", rng)
        question = (f"Question: What is the secret code of the town where {name} lives?\n"
                    f"Answer: The secret code of that town is")
    return RagPrompt(tuple(chunks), question, code)


def answered_share(rows: list[dict], two_hop: bool) -> float:
    """Share of ``rows`` (each with ``answered`` and ``two_chunk``) whose planted fact was
    answered, among the one-chunk (or, ``two_hop``, the two-chunk) prompts."""
    picked = [r["answered"] for r in rows if r["two_chunk"] == two_hop]
    return sum(picked) / len(picked)


def facts_answered(rows: list[dict]) -> str:
    """"planted facts answered X (one chunk), Y (two chunks)" for ``rows`` (see :func:`answered_share`)."""
    return (f"planted facts answered {answered_share(rows, False):.2f} (one chunk), "
            f"{answered_share(rows, True):.2f} (two chunks)")
