"""Extend attention of a batch holding chunk-fused requests (:mod:`a2ats_sglang.fusion.served`).

A fused request computes only some of its prompt's tokens (the question, what was not cached,
what was chosen for recomputation); the others' KV was copied into its slots. Each computed
token attends *by position*: to every slot of its row at a position up to its own, whether that
slot holds copied KV or KV written by this very forward. A plain request in the same batch is
the special case of contiguous positions. A scoring pass's question rows also add their
attention probabilities, summed over query heads and rows, to a per-position mass (A³'s
relevance), so they are computed explicitly rather than by SDPA.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

QUERY_BLOCK = 512  # rows per call: bounds the [rows, context] mask and probabilities


def positional_attention(q, k, v, positions, scale: float, mass: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-by-position attention. q [Hq, n, D] at ``positions`` int64 [n]; k [Hkv, L, D],
    v [Hkv, L, Dv] the sequence's positions 0..L-1 -> [Hq, n, Dv]. With ``mass`` float32 [>= L],
    each row's softmax probabilities, summed over heads and rows, are added to it."""
    hq, n = q.shape[0], q.shape[1]
    group = hq // k.shape[0]
    out = q.new_empty(hq, n, v.shape[-1])
    keys = torch.arange(k.shape[1], device=q.device).view(1, -1)
    for i0 in range(0, n, QUERY_BLOCK):
        i1 = min(n, i0 + QUERY_BLOCK)
        end = int(positions[i1 - 1]) + 1  # ascending positions: the block's last row sees the most
        mask = keys[:, :end] <= positions[i0:i1].view(-1, 1)
        if mass is None:
            out[:, i0:i1] = scaled_dot_product_attention(q[:, i0:i1], k[:, :end], v[:, :end], attn_mask=mask,
                                                         scale=scale, enable_gqa=group > 1)
            continue
        kk = k[:, :end].repeat_interleave(group, 0).float()
        vv = v[:, :end].repeat_interleave(group, 0).float()
        logits = (q[:, i0:i1].float() @ kk.transpose(1, 2)) * scale
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        mass[:end] += probs.sum(dim=(0, 1))
        out[:, i0:i1] = (probs @ vv).to(out.dtype)
    return out


def fused_extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, fused,
                           scale: float) -> torch.Tensor:
    """A batch's extend over a token-slot KV pool, every request by position. query [T, Hq, D]
    (each request's computed tokens in turn); k_cache [N, Hkv, D] / v_cache [N, Hkv, Dv];
    ``fused``: the batch's :class:`~a2ats_sglang.fusion.served.FusedExtend`. Writes and returns
    output [T, Hq, Dv]."""
    query = query.movedim(0, 1)
    start = 0
    for i, positions in enumerate(fused.positions):
        n, total = positions.numel(), int(seq_lens[i])
        tokens = req_to_token[req_pool_indices[i], :total]
        k = k_cache[tokens].movedim(0, 1).to(query.dtype)
        v = v_cache[tokens].movedim(0, 1).to(query.dtype)
        rows = query[:, start:start + n]
        question = fused.question[i]
        if question is None:
            out = positional_attention(rows, k, v, positions, scale)
        else:  # a scoring pass: the rows before the question plain, the question's with their mass
            q0, mass = question
            out = torch.cat([positional_attention(rows[:, :q0], k, v, positions[:q0], scale),
                             positional_attention(rows[:, q0:], k, v, positions[q0:], scale, mass)], dim=1)
        output[start:start + n] = out.movedim(0, 1)
        start += n
    return output


def check_servable(attention, offload: bool) -> None:
    """Raise ValueError where chunk fusion cannot serve this model (``attention``: its
    :class:`~a2ats_sglang.backend.layers.ModelAttention`) or mode."""
    if offload:
        raise ValueError("a2ats chunk fusion: not with --a2ats-offload yet (the resident windows of reused chunk "
                         "tokens are not filled)")
    if attention.dense:
        raise ValueError(f"a2ats chunk fusion: {attention.describe()}; a chunk's keys are moved with one rotation "
                         f"and attended by position, which layers that stay dense do not share")
    if attention.logit_caps:
        raise ValueError("a2ats chunk fusion: attention logit soft-capping is not applied by the fused extend")
