"""Exact attention over selected tokens, and log-sum-exp merging of partial results
(torch references; the Triton kernels in ``a2ats_sglang.kernels`` must agree).

A partial result is ``(out, lse)``: out [..., Hq, Dv] normalized over its token set,
lse float32 [..., Hq] natural-log sum of exp(scaled logits); an empty set has
lse = -inf and contributes nothing to a merge.
"""

from __future__ import annotations

import torch


def sparse_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    slots: torch.Tensor,
    scale: float,
    logit_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of each query over its KV head's selected slots.

    q: [B, Hq, D]; k_buf: [N, Hkv, D]; v_buf: [N, Hkv, Dv]; slots: int [B, Hkv, S]
    physical slot ids, -1 = padding. -> (out [B, Hq, Dv] in q.dtype, lse f32 [B, Hq])."""
    b, hq, d = q.shape
    hkv = slots.shape[1]
    g = hq // hkv
    valid = slots >= 0
    sl = slots.clamp_min(0).long()
    heads = torch.arange(hkv, device=q.device).view(1, hkv, 1)
    k = k_buf[sl, heads].float()  # [B, Hkv, S, D]
    v = v_buf[sl, heads].float()  # [B, Hkv, S, Dv]
    logits = torch.einsum("bkgd,bksd->bkgs", q.float().view(b, hkv, g, d), k) * scale
    if logit_cap > 0:
        logits = logit_cap * torch.tanh(logits / logit_cap)
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, g]
    p = torch.exp(logits - lse.unsqueeze(-1).clamp_min(-1e30))
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.einsum("bkgs,bksd->bkgd", p, v)
    return out.reshape(b, hq, -1).to(q.dtype), lse.reshape(b, hq)


def merge_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results over disjoint token sets: o [..., H, Dv], lse [..., H]."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - safe).unsqueeze(-1)
    w2 = torch.exp(lse2 - safe).unsqueeze(-1)
    out = o1.float() * w1 + o2.float() * w2
    return out.to(o1.dtype), lse
