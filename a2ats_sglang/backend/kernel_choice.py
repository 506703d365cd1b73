"""Device dispatch for the decode hot path: the torch references of
``retrieval``/``attention`` everywhere, the Triton kernels of
``a2ats_sglang.kernels`` when asked for (CUDA, or CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

from a2ats_sglang.core import attention, retrieval
from a2ats_sglang.core.retrieval import SelectionPlan
from a2ats_sglang.core.rope import RopeSpec


def retrieve(
    q: torch.Tensor, positions: torch.Tensor, rope: RopeSpec, distances, bounds: torch.Tensor, centroids: torch.Tensor,
    codes_buf: torch.Tensor, slots: torch.Tensor, plan: SelectionPlan, scale: float, use_triton: bool,
    use_cpu_kernel: bool = False,
) -> torch.Tensor:
    """One layer's retrieval for a decode batch: WRoPE queries, lookup table, approximate
    scores, per-head top-K, GQA union. q [B, Hq, D] after RoPE at ``positions`` [B];
    centroids [Hkv, C, D]; codes_buf int16 [N, Hkv]; slots int64 [B, L] physical slot of
    each position; ``plan`` built once per batch -> retrieved physical slots int64
    [B, Hkv, S], ascending by position, -1 padded (:meth:`SelectionPlan.retrieved`; the
    Triton path pads to a host-known width). Triton kernels (CUDA), the C++ kernel (CPU), or torch."""
    q_rot = retrieval.rotated_queries(q, positions, rope, distances)
    lut = retrieval.lookup_table(q_rot, centroids, scale)
    if use_triton:
        from a2ats_sglang.kernels.score import retrieve_triton

        return retrieve_triton(lut, codes_buf, slots, plan, bounds)
    if use_cpu_kernel:
        from a2ats_sglang.kernels.cpu import retrieve_cpu

        out = retrieve_cpu(lut, codes_buf, slots, plan, bounds)
        if out is not None:
            return out
    codes = codes_buf[slots].permute(0, 2, 1)  # [B, Hkv, L]
    scores = retrieval.approx_scores(lut, codes, plan.seq_lens, bounds, plan.sinks, plan.window)
    return selected_slots(plan.retrieved(scores, centroids.shape[0]), slots)


def positions_to_slots(positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """positions int64 [B, Hkv, S] (-1 pad) + slots [B, L] -> physical slots [B, Hkv, S] (-1 pad)."""
    b, hkv, s = positions.shape
    phys = slots.gather(1, positions.clamp_min(0).reshape(b, hkv * s)).view(b, hkv, s)
    return torch.where(positions >= 0, phys, torch.full_like(phys, -1))


def selected_slots(mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """bool [B, Hkv, L] selection + slots [B, L] -> physical slots [B, Hkv, S] ascending by position (-1 pad)."""
    return positions_to_slots(retrieval.mask_to_positions(mask), slots)


def sparse_attention(q, k_buf, v_buf, slots, scale: float, logit_cap: float, use_triton: bool, use_cpu_kernel: bool = False):
    """See :func:`a2ats_sglang.core.attention.sparse_attention`. Triton kernel, C++ CPU kernel, or the torch reference."""
    if use_triton:
        from a2ats_sglang.kernels.sparse_decode import sparse_decode_triton

        return sparse_decode_triton(q, k_buf, v_buf, slots, scale, logit_cap)
    if use_cpu_kernel:
        from a2ats_sglang.kernels.cpu import sparse_attention_cpu

        return sparse_attention_cpu(q, k_buf, v_buf, slots, scale, logit_cap)
    return attention.sparse_attention(q, k_buf, v_buf, slots, scale, logit_cap)
