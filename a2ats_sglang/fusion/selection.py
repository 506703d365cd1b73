"""Which chunk tokens a fused prompt recomputes: one small class per method, each turning
what it measured into a score per chunk token; the top ``ratio`` of the chunk tokens by
score are recomputed (ties to the earlier position).

- :class:`A3`: attention the question pays each chunk token over the fused KV, summed over
  query heads, question tokens and layers (A³, arXiv 2511.17560: recompute what the
  question needs).
- :class:`CacheBlend`: how far each token's fused K/V are from its K/V recomputed in the
  full prompt at an early layer (CacheBlend, arXiv 2405.16444).
- :class:`Naive`: nothing recomputed (plain concatenation of the chunks' KV).

Scores are plain tensors so the same rules serve the reference engine
(:mod:`a2ats_sglang.fusion.reference`) and any engine that measures the same quantities.
"""

from __future__ import annotations

from typing import Protocol

import torch


def top_ratio(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (int64, ascending) of the ``round(ratio * n)`` highest of ``scores`` float
    [n]; equal scores go to the earlier index."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"recompute ratio must be in [0, 1], got {ratio}")
    n = scores.numel()
    k = round(ratio * n)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    # stable descending sort: among equal scores the earlier index comes first
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
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


def kv_deviation_scores(fused_k: torch.Tensor, fused_v: torch.Tensor, fresh_k: torch.Tensor,
                        fresh_v: torch.Tensor) -> torch.Tensor:
    """CacheBlend's deviation of each token: squared L2 distance of its fused K and V from
    the ones computed in the full prompt, summed over KV heads. All [Hkv, n, D] -> float32 [n]."""
    return ((fused_k.float() - fresh_k.float()) ** 2).sum(dim=(0, 2)) + (
        (fused_v.float() - fresh_v.float()) ** 2).sum(dim=(0, 2))


class FusionContext(Protocol):
    """What a method may measure on one fused prompt (the engine computes each on demand).
    chunk_positions: int64 [n], the positions of the chunk tokens in the prompt."""

    chunk_positions: torch.Tensor

    def question_attention(self) -> list[torch.Tensor]:
        """Per layer float [1, Hq, Tq, Tkv]: the question's attention over the fused KV."""

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
        return ctx.chunk_positions[top_ratio(scores, ratio)]


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
        return ctx.chunk_positions[top_ratio(scores, ratio)]


METHODS = {m.name: m for m in (Naive, A3, CacheBlend)}
