"""A fused request's marks: what the client sends, how its chunks are found in the prompt,
and the layout the scheduler receives. Both travel in SGLang's ``sampling_params.custom_params``
(JSON scalars and lists), so ``/generate``, ``/v1/completions`` and ``/v1/chat/completions``
all carry them unchanged.

Client side (:class:`ChunkMarks`)::

    "custom_params": {"a2ats_chunks": ["<document 1>", "<document 2>"],   # required
                      "a2ats_recompute_ratio": 0.15,                      # optional, [0, 1]
                      "a2ats_fusion_method": "a3"}                        # optional: a3 | naive | cacheblend

Every chunk must appear in the prompt, in this order and without overlap, as its own tokens:
the chunk tokenized alone, without special tokens, is a run of the prompt's tokens, up to
:data:`EDGE_TOKENS` at either end (byte-level BPE merges a chunk's closing punctuation with the
newlines after it, SentencePiece marks a word that starts a text; those edge tokens are computed
with the text between chunks). Separate chunks from the text around them by a newline. The
prompt's tokens before the first chunk are the shared prefix each chunk's KV is computed after;
those after the last chunk are the question.

Scheduler side (:class:`FusedLayout`): the chunks' token spans, the ratio and method, and which
pass the request is (the scoring pass that measures what the method ranks the chunk tokens by,
or the final one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from a2ats_sglang.fusion.selection import A3, CacheBlend, Naive

KEY_PREFIX = "a2ats_"  # every custom_params key of chunk fusion, the client's and the scheduler's
CHUNKS_KEY = "a2ats_chunks"
RATIO_KEY = "a2ats_recompute_ratio"
METHOD_KEY = "a2ats_fusion_method"
CLIENT_KEYS = (CHUNKS_KEY, RATIO_KEY, METHOD_KEY)
LAYOUT_KEY = "a2ats_fusion_layout"  # to the scheduler: [score_pass, ratio_ppm, method index, s0, e0, s1, e1, ...]
ID_KEY = "a2ats_fusion_id"  # to the scheduler: pairs a scoring pass with its final request
SERVED_METHODS = (A3.name, Naive.name, CacheBlend.name)  # their order is the layout's method index
SCORED_METHODS = (A3.name, CacheBlend.name)  # a ratio strictly between 0 and 1 needs a scoring pass first
EDGE_TOKENS = 2  # a chunk's tokens at either end that may tokenize differently inside the prompt
EXTRA_KEY_TAG = "\x1fa2ats-fusion"  # radix namespace of fused KV: approximate, never served to a plain request


def names_fusion(custom_params) -> bool:
    """Whether ``custom_params`` holds any key of chunk fusion (well-formed or not)."""
    return isinstance(custom_params, dict) and any(k.startswith(KEY_PREFIX) for k in custom_params)


class FusionMarkError(ValueError):
    """A request's chunk marks are malformed or do not fit the prompt (HTTP 400)."""


@dataclass(frozen=True)
class ChunkMarks:
    """The client's marks: chunk texts (non-empty, in prompt order), recompute ratio, method."""

    chunks: tuple[str, ...]
    ratio: float
    method: str

    @classmethod
    def of(cls, custom_params, default_ratio: float) -> "ChunkMarks | None":
        """The marks in a request's ``custom_params`` (None when it has none); raises
        :class:`FusionMarkError` naming the bad field."""
        if not isinstance(custom_params, dict):
            return None
        reserved = [k for k in custom_params if k.startswith(KEY_PREFIX) and k not in CLIENT_KEYS]
        if reserved:
            raise FusionMarkError(f"custom_params.{reserved[0]} is not a chunk mark (the marks: {', '.join(CLIENT_KEYS)})")
        if not any(k in custom_params for k in CLIENT_KEYS):
            return None
        chunks = custom_params.get(CHUNKS_KEY)
        if not isinstance(chunks, list) or not chunks or not all(isinstance(c, str) for c in chunks):
            raise FusionMarkError(f"custom_params.{CHUNKS_KEY} must be a non-empty list of chunk texts")
        empty = [i for i, c in enumerate(chunks) if not c.strip()]
        if empty:
            raise FusionMarkError(f"custom_params.{CHUNKS_KEY}[{empty[0]}] is empty")
        ratio = custom_params.get(RATIO_KEY, default_ratio)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise FusionMarkError(f"custom_params.{RATIO_KEY} must be a number in [0, 1], got {ratio!r}")
        method = custom_params.get(METHOD_KEY, A3.name)
        if method not in SERVED_METHODS:
            raise FusionMarkError(f"custom_params.{METHOD_KEY} must be one of {SERVED_METHODS}, got {method!r}")
        return cls(tuple(chunks), float(ratio), method)

    @property
    def needs_scoring(self) -> bool:
        """Whether a scoring pass must measure the chunk tokens first (A³'s question attention,
        CacheBlend's K/V deviation) to choose some but not all of them."""
        return self.method in SCORED_METHODS and 0.0 < self.ratio < 1.0


def locate_chunks(prompt: Sequence[int], chunks: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """[start, end) of each chunk's tokens in ``prompt``, searched in order, each after the
    previous one: the whole chunk where it is there, else the longest run of it without up to
    :data:`EDGE_TOKENS` at each end (chunks of more than 4 x that many tokens; among equally
    long runs, the one kept whole at the start first); raises :class:`FusionMarkError` for a
    chunk not found, or with no question after the last."""
    spans, at = [], 0
    for i, ids in enumerate(chunks):
        n = len(ids)
        if n == 0:
            raise FusionMarkError(f"custom_params.{CHUNKS_KEY}[{i}] has no tokens")
        edge = EDGE_TOKENS if n > 4 * EDGE_TOKENS else 0
        trims = sorted(((a, b) for a in range(edge + 1) for b in range(edge + 1)), key=sum)
        found = next((span for a, b in trims if (span := _find(prompt, list(ids[a:n - b]), at)) is not None), None)
        if found is None:
            raise FusionMarkError(
                f"custom_params.{CHUNKS_KEY}[{i}] is not in the prompt as its own tokens after the previous chunk "
                f"(chunks must appear in order, each tokenizing as it does alone: separate them by newlines)")
        spans.append(found)
        at = found[1]
    if at >= len(prompt):
        raise FusionMarkError("the prompt has no question after its last chunk")
    return spans


def _find(prompt: Sequence[int], run: list[int], at: int) -> tuple[int, int] | None:
    """[start, end) of the first occurrence of ``run`` in ``prompt`` from ``at``, else None."""
    n = len(run)
    for s in range(at, len(prompt) - n + 1):
        if prompt[s] == run[0] and list(prompt[s:s + n]) == run:
            return s, s + n
    return None


@dataclass(frozen=True)
class FusedLayout:
    """What the scheduler learns of a fused request. spans: [start, end) of each chunk in the
    prompt (ascending, disjoint, the first after the shared prefix); score_pass: this request
    only measures the chunk tokens (:mod:`~a2ats_sglang.fusion.served`) for the final request
    with the same ``fusion_id``."""

    spans: tuple[tuple[int, int], ...]
    ratio: float
    method: str
    score_pass: bool
    fusion_id: str

    @property
    def prefix_len(self) -> int:
        return self.spans[0][0]

    @property
    def question_start(self) -> int:
        return self.spans[-1][1]

    def to_params(self) -> dict:
        flat = [int(self.score_pass), round(self.ratio * 1_000_000), SERVED_METHODS.index(self.method)]
        flat += [x for s in self.spans for x in s]
        return {LAYOUT_KEY: flat, ID_KEY: self.fusion_id}

    @classmethod
    def of(cls, custom_params) -> "FusedLayout | None":
        """The layout in a scheduler request's ``custom_params`` (None for a plain request)."""
        flat = custom_params.get(LAYOUT_KEY) if isinstance(custom_params, dict) else None
        if flat is None:
            return None
        score, ppm, method, *bounds = flat
        spans = tuple(zip(bounds[0::2], bounds[1::2]))
        return cls(spans, ppm / 1_000_000, SERVED_METHODS[method], bool(score), str(custom_params[ID_KEY]))
