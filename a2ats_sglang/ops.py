"""Device dispatch for the decode hot path: the torch references of
``retrieval``/``attention`` everywhere, the Triton kernels of
``a2ats_sglang.kernels`` when asked for (CUDA, or CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

from a2ats_sglang import attention, retrieval


def approx_scores(lut, codes_buf, slots, seq_lens, bounds, sinks: int, window: int, use_triton: bool) -> torch.Tensor:
    """lut [B, Hq, NB, C]; codes_buf int16 [N, Hkv] per physical slot; slots int64 [B, L]
    -> scores float32 [B, Hq, L] (-inf where not scorable)."""
    if use_triton:
        from a2ats_sglang.kernels.score import approx_scores_triton

        return approx_scores_triton(lut, codes_buf, slots, seq_lens, bounds, sinks, window)
    codes = codes_buf[slots].permute(0, 2, 1)  # [B, Hkv, L]
    return retrieval.approx_scores(lut, codes, seq_lens, bounds, sinks, window)


def positions_to_slots(positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """positions int64 [B, Hkv, S] (-1 pad) + slots [B, L] -> physical slots [B, Hkv, S] (-1 pad)."""
    b, hkv, s = positions.shape
    phys = slots.gather(1, positions.clamp_min(0).reshape(b, hkv * s)).view(b, hkv, s)
    return torch.where(positions >= 0, phys, torch.full_like(phys, -1))


def sparse_attention(q, k_buf, v_buf, slots, scale: float, logit_cap: float, use_triton: bool, use_cpu_kernel: bool = False):
    """See :func:`a2ats_sglang.attention.sparse_attention`. Triton kernel, C++ CPU kernel, or the torch reference."""
    if use_triton:
        from a2ats_sglang.kernels.sparse_decode import sparse_decode_triton

        return sparse_decode_triton(q, k_buf, v_buf, slots, scale, logit_cap)
    if use_cpu_kernel:
        from a2ats_sglang.kernels.cpu import sparse_attention_cpu

        return sparse_attention_cpu(q, k_buf, v_buf, slots, scale, logit_cap)
    return attention.sparse_attention(q, k_buf, v_buf, slots, scale, logit_cap)
