"""Which chunk tokens a fused prompt recomputes: one small class per method, each turning
what it measured into a score per chunk token. The budget is ``round(ratio * n)`` of the n
chunk tokens, spent on the highest-scoring tokens whose fused KV can differ from the full
prefill's (ties to the earlier position): the first chunk, right after the shared prefix, is
at the place it was prefilled at, so its fused KV is already exact and recomputing it would
change nothing (:attr:`FusionContext.exact`).

- :class:`A3`: attention the question pays each chunk token over the fused KV, summed over
  query heads, question tokens and layers (A³, arXiv 2511.17560: recompute what the
  question needs).
- :class:`A3Lut`: the same sum with each chunk token's attention logit read from the a2ats
  lookup table (the question's WRoPE queries . centroids, at the token's code and distance
  bucket) instead of computed from its key: what a server holding the chunks' codes can
  score without reading the chunks' keys.
- :class:`CacheBlend`: how far each token's fused K/V are from its K/V recomputed in the
  full prompt at an early layer (CacheBlend, arXiv 2405.16444).
- :class:`Naive`: nothing recomputed (plain concatenation of the chunks' KV).

Scores are plain tensors so the same rules serve the reference engine
(:mod:`a2ats_sglang.fusion.reference`) and any engine that measures the same quantities.
"""

from __future__ import annotations

from typing import Protocol

import torch

from a2ats_sglang.core.codebook import Codebooks, LayerCodebook
from a2ats_sglang.core.retrieval import WRoPERotation, approx_scores, distance_bounds, lookup_table
from a2ats_sglang.core.rope import RopeSpec


def top_ratio(scores: torch.Tensor, ratio: float, exact: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (int64, ascending) of the ``round(ratio * n)`` highest of ``scores`` float
    [n] (equal scores to the earlier index), none of them where ``exact`` (bool [n]) is set:
    the budget counts every token, and is spent on the others (all of them if it exceeds them)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"recompute ratio must be in [0, 1], got {ratio}")
    n = scores.numel()
    k = round(ratio * n)
    scores = scores.float()
    if exact is not None:
        k = min(k, n - int(exact.sum()))
        scores = scores.masked_fill(exact.to(scores.device), float("-inf"))
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    # stable descending sort: among equal scores the earlier index comes first
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order.sort().values


def question_attention_scores(attentions, chunk_positions: torch.Tensor) -> torch.Tensor:
    """A³'s relevance of each chunk token: the attention probability the question's tokens
    give it, summed over layers, query heads and question tokens. ``attentions``: per
    layer float [B=1, Hq, Tq, Tkv] (softmax rows of the question's queries over the fused KV
    and the question); chunk_positions int64 [n] (key indices) -> float32 [n]."""
    total = None
    for a in attentions:
        s = a[0, :, :, chunk_positions].float().sum(dim=(0, 1))
        total = s if total is None else total + s
    return total


def lut_attention_scores(q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, chunk_positions: torch.Tensor,
                         book: LayerCodebook, rope: RopeSpec, distances, scale: float) -> torch.Tensor:
    """One layer's A³ relevance with chunk logits from the lookup table: the attention
    probability the question's queries give each chunk token, summed over query heads and
    question tokens, where a query's logit for a chunk token is ``scale * RoPE(q_pre,
    d) . centroid[code]`` (d: the WRoPE distance of the token's bucket, code: its pre-RoPE
    key's, :meth:`~a2ats_sglang.core.codebook.LayerCodebook.encode`) and for every other key
    before the question (the exact prefix) the exact ``scale * q . k``; the question's own
    keys are left out of the softmax.

    q float [Hq, Tq, D] post-RoPE at q_pos int64 [Tq]; keys float [Hkv, L, D] post-RoPE, every
    position before the question in prompt order (L = the question's first position);
    chunk_positions int64 [n] (< L) -> float32 [n]."""
    hq, tq = q.shape[0], q.shape[1]
    length = keys.shape[1]
    g = hq // keys.shape[0]
    pre = rope.unrotate(keys.transpose(0, 1).float(), torch.arange(length).view(-1, 1).float())  # [L, Hkv, D]
    codes = book.encode(pre).t().unsqueeze(0).expand(tq, -1, -1)  # [Tq, Hkv, L]: every question token sees them all
    lut = lookup_table(WRoPERotation.build(rope, q_pos, distances).apply(q.transpose(0, 1)), book.centroids, scale)
    approx = approx_scores(lut, codes, q_pos + 1, distance_bounds(distances), 0, 0)[..., chunk_positions]  # [Tq, Hq, n]
    others = torch.ones(length, dtype=torch.bool)
    others[chunk_positions] = False
    exact = scale * q.float() @ keys[:, others].float().repeat_interleave(g, 0).transpose(1, 2)  # [Hq, Tq, P]
    probs = torch.cat([exact, approx.transpose(0, 1)], dim=-1).softmax(-1)[..., exact.shape[-1]:]
    return probs.sum(dim=(0, 1))


def kv_deviation_scores(fused_k: torch.Tensor, fused_v: torch.Tensor, fresh_k: torch.Tensor,
                        fresh_v: torch.Tensor) -> torch.Tensor:
    """CacheBlend's deviation of each token: squared L2 distance of its fused K and V from
    the ones computed in the full prompt, summed over KV heads. All [Hkv, n, D] -> float32 [n]."""
    return ((fused_k.float() - fresh_k.float()) ** 2).sum(dim=(0, 2)) + (
        (fused_v.float() - fresh_v.float()) ** 2).sum(dim=(0, 2))


class FusionContext(Protocol):
    """What a method may measure on one fused prompt (the engine computes each on demand).
    chunk_positions: int64 [n], the positions of the chunk tokens in the prompt; exact: bool
    [n], those whose fused KV is already the full prefill's (the first chunk's), never chosen."""

    chunk_positions: torch.Tensor
    exact: torch.Tensor

    def question_attention(self) -> list[torch.Tensor]:
        """Per layer float [1, Hq, Tq, Tkv]: the question's attention over the fused KV."""

    def question_queries(self) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        """(per layer float [Hq, Tq, D] the question's post-RoPE queries over the fused KV,
        their positions int64 [Tq], the attention's softmax scale)."""

    def keys(self, layer: int) -> torch.Tensor:
        """K [Hkv, L, D] post-RoPE of every position before the question at ``layer`` as fused."""

    def fused_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [Hkv, n, D] of the chunk tokens at ``layer`` as fused (re-positioned)."""

    def fresh_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [Hkv, n, D] of the chunk tokens at ``layer`` computed in the full prompt."""


class Naive:
    """Plain concatenation: no chunk token recomputed."""

    name = "naive"

    def choose(self, ctx: FusionContext, ratio: float) -> torch.Tensor:
        return ctx.chunk_positions[:0]


class A3:
    """Recompute the chunk tokens the question attends to most over the fused KV."""

    name = "a3"

    def choose(self, ctx: FusionContext, ratio: float) -> torch.Tensor:
        scores = question_attention_scores(ctx.question_attention(), ctx.chunk_positions)
        return ctx.chunk_positions[top_ratio(scores, ratio, ctx.exact)]


class A3Lut:
    """A³ scored through the a2ats lookup table (:func:`lut_attention_scores`) with the model's
    codebooks ``books`` (:class:`~a2ats_sglang.core.codebook.Codebooks`, checked against the
    model by whoever loads them): the question pass needs no attention probabilities, and the
    chunk tokens' keys are read only as their codes."""

    name = "a3-lut"

    def __init__(self, books: Codebooks):
        self.books = books
        self.layers = [LayerCodebook.build(books.centroids[i], books.whiten[i], "cpu")
                       for i in range(books.shape.num_layers)]

    def choose(self, ctx: FusionContext, ratio: float) -> torch.Tensor:
        queries, q_pos, scale = ctx.question_queries()
        if len(queries) != len(self.layers):
            raise ValueError(f"a3-lut: codebooks for {len(self.layers)} layers, the model has {len(queries)}")
        scores = sum(lut_attention_scores(q, q_pos, ctx.keys(i), ctx.chunk_positions, self.layers[i], self.books.rope,
                                          self.books.distances, scale) for i, q in enumerate(queries))
        return ctx.chunk_positions[top_ratio(scores, ratio, ctx.exact)]


class CacheBlend:
    """Recompute the chunk tokens whose fused K/V deviate most at layer ``layer`` (1: the
    first layer whose input already mixes the chunks; its K/V need layers 0-1 of the full
    prompt computed)."""

    name = "cacheblend"

    def __init__(self, layer: int = 1):
        if layer < 1:
            raise ValueError(f"CacheBlend compares K/V from layer 1 on (layer 0's are exact), got {layer}")
        self.layer = layer

    def choose(self, ctx: FusionContext, ratio: float) -> torch.Tensor:
        scores = kv_deviation_scores(*ctx.fused_kv(self.layer), *ctx.fresh_kv(self.layer))
        return ctx.chunk_positions[top_ratio(scores, ratio, ctx.exact)]

