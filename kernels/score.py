"""Approximate scores from the lookup table (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _score_kernel(
    lut_ptr, codes_ptr, slots_ptr, seq_lens_ptr, bounds_ptr, out_ptr,
    stride_lut_b, stride_lut_h, stride_lut_n,
    stride_codes_n,
    stride_slots_b,
    stride_out_b, stride_out_h,
    L, sinks, window,
    NB: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < L
    n = tl.load(seq_lens_ptr + b)
    slot = tl.load(slots_ptr + b * stride_slots_b + offs, mask=inb, other=0)
    code = tl.load(codes_ptr + slot * stride_codes_n + kvh, mask=inb, other=0).to(tl.int32)
    dist = (n - 1 - offs).to(tl.float32)
    bucket = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(NB - 1):
        bucket += (dist >= tl.load(bounds_ptr + i)).to(tl.int32)
    scorable = (offs >= sinks) & (offs < n - window) & inb
    for gi in tl.static_range(G):
        h = kvh * G + gi
        val = tl.load(lut_ptr + b * stride_lut_b + h * stride_lut_h + bucket * stride_lut_n + code, mask=inb, other=0.0)
        val = tl.where(scorable, val, float("-inf"))
        tl.store(out_ptr + b * stride_out_b + h * stride_out_h + offs, val, mask=inb)


def approx_scores_triton(lut, codes_buf, slots, seq_lens, bounds, sinks: int, window: int, block: int = 256) -> torch.Tensor:
    """lut f32 [B, Hq, NB, C] (C contiguous); codes_buf int16 [N, Hkv]; slots int [B, L];
    seq_lens int [B]; bounds f32 [NB-1] -> float32 [B, Hq, L], -inf where not scorable."""
    b, hq, nb, c = lut.shape
    hkv = codes_buf.shape[1]
    length = slots.shape[1]
    lut = lut.float().contiguous()
    slots = slots.contiguous()
    out = torch.empty(b, hq, length, dtype=torch.float32, device=lut.device)
    bounds = bounds.to(device=lut.device, dtype=torch.float32)
    if bounds.numel() == 0:
        bounds = torch.zeros(1, dtype=torch.float32, device=lut.device)
    grid = (b, hkv, triton.cdiv(length, block))
    _score_kernel[grid](
        lut, codes_buf, slots, seq_lens.contiguous(), bounds, out,
        lut.stride(0), lut.stride(1), lut.stride(2),
        codes_buf.stride(0),
        slots.stride(0),
        out.stride(0), out.stride(1),
        length, sinks, window,
        NB=nb, G=hq // hkv, BLOCK=block,
    )
    return out
