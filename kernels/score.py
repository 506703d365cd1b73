"""One layer's retrieval on the device (Triton): approximate scores as top-K keys, then
the GQA union of every query head's top-K compacted into slot lists. With
``torch.topk`` between them that is four launches and no host sync, against the ~40
small ops of the torch path; the result equals it (``SelectionPlan.retrieved``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NOT_SCORABLE = -(2**63)  # key of sinks, window and positions past the sequence: below every score's key


@triton.jit
def _score_keys_kernel(
    lut_ptr, codes_ptr, slots_ptr, seq_lens_ptr, bounds_ptr, out_ptr,
    stride_lut_b, stride_lut_h, stride_lut_n,
    stride_codes_n,
    stride_slots_b,
    stride_out_b, stride_out_h,
    L, sinks, window, none,
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
    rank = (L - 1 - offs).to(tl.int64)  # ties go to the earlier position
    for gi in tl.static_range(G):
        h = kvh * G + gi
        val = tl.load(lut_ptr + b * stride_lut_b + h * stride_lut_h + bucket * stride_lut_n + code, mask=inb, other=0.0)
        bits = val.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # float order as integers
        key = tl.where(scorable, (ordered << 32) | rank, none)
        tl.store(out_ptr + b * stride_out_b + h * stride_out_h + offs, key, mask=inb)


@triton.jit
def _mark_kernel(
    idx_ptr, val_ptr, k_ptr, seq_lens_ptr, hit_ptr,
    stride_idx_b, stride_idx_h, stride_hit_b, stride_hit_h,
    KMAX, sinks, window, none, G: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    top = tl.load(k_ptr + b)
    scored = top + sinks + window < tl.load(seq_lens_ptr + b)  # else its fixed part is everything
    inb = r < KMAX
    pos = tl.load(idx_ptr + b * stride_idx_b + h * stride_idx_h + r, mask=inb, other=0)
    key = tl.load(val_ptr + b * stride_idx_b + h * stride_idx_h + r, mask=inb, other=none)
    keep = inb & (r < top) & (key != none) & scored
    tl.store(hit_ptr + b * stride_hit_b + (h // G) * stride_hit_h + pos, tl.full([BLOCK], 1, tl.int8), mask=keep)


@triton.jit
def _compact_kernel(
    hit_ptr, slots_ptr, out_ptr,
    stride_hit_b, stride_hit_h, stride_slots_b, stride_out_b, stride_out_h,
    L, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    base = 0
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < L
        hit = tl.load(hit_ptr + b * stride_hit_b + kvh * stride_hit_h + offs, mask=inb, other=0).to(tl.int32)
        slot = tl.load(slots_ptr + b * stride_slots_b + offs, mask=inb & (hit > 0), other=0)
        dest = base + tl.cumsum(hit, 0) - 1
        tl.store(out_ptr + b * stride_out_b + kvh * stride_out_h + dest, slot, mask=inb & (hit > 0))
        base += tl.sum(hit, 0)


def score_keys_triton(lut, codes_buf, slots, seq_lens, bounds, sinks: int, window: int, block: int = 256) -> torch.Tensor:
    """Top-K keys of the approximate scores: lut f32 [B, Hq, NB, C]; codes_buf int16 [N, Hkv];
    slots int [B, L]; seq_lens int [B]; bounds f32 [NB-1] -> int64 [B, Hq, L] ordered like
    (score, earlier position) (``retrieval.scores_with_position_tiebreak``), NOT_SCORABLE for
    sinks, window and positions past the sequence."""
    b, hq, nb, c = lut.shape
    hkv = codes_buf.shape[1]
    length = slots.shape[1]
    lut = lut.float().contiguous()
    slots = slots.contiguous()
    out = torch.empty(b, hq, length, dtype=torch.int64, device=lut.device)
    bounds = bounds.to(device=lut.device, dtype=torch.float32)
    if bounds.numel() == 0:
        bounds = torch.zeros(1, dtype=torch.float32, device=lut.device)
    _score_keys_kernel[(b, hkv, triton.cdiv(length, block))](
        lut, codes_buf, slots, seq_lens.contiguous(), bounds, out,
        lut.stride(0), lut.stride(1), lut.stride(2),
        codes_buf.stride(0),
        slots.stride(0),
        out.stride(0), out.stride(1),
        length, sinks, window, NOT_SCORABLE,
        NB=nb, G=hq // hkv, BLOCK=block,
    )
    return out


def retrieve_triton(lut, codes_buf, slots, plan, bounds, block: int = 256) -> torch.Tensor:
    """One layer's retrieved slots int64 [B, Hkv, g*kmax] (ascending position, -1 padded;
    the width is a host-known bound, so nothing waits for the device) from lut f32
    [B, Hq, NB, C], codes_buf int16 [N, Hkv], slots int64 [B, L] and the batch's
    :class:`~a2ats_sglang.core.retrieval.SelectionPlan`."""
    b, hq = lut.shape[:2]
    hkv, length = codes_buf.shape[1], slots.shape[1]
    g = hq // hkv
    out = torch.full((b, hkv, g * plan.kmax), -1, dtype=torch.int64, device=lut.device)
    if plan.kmax == 0 or b == 0:
        return out
    keys = score_keys_triton(lut, codes_buf, slots, plan.seq_lens, bounds, plan.sinks, plan.window, block)
    top = keys.topk(plan.kmax, dim=-1)  # [B, Hq, kmax]
    hit = torch.zeros(b, hkv, length, dtype=torch.int8, device=lut.device)
    idx, val = top.indices.contiguous(), top.values.contiguous()
    _mark_kernel[(b, hq, triton.cdiv(plan.kmax, block))](
        idx, val, plan.k, plan.seq_lens, hit, idx.stride(0), idx.stride(1), hit.stride(0), hit.stride(1),
        plan.kmax, plan.sinks, plan.window, NOT_SCORABLE, G=g, BLOCK=block,
    )
    _compact_kernel[(b, hkv)](
        hit, slots, out, hit.stride(0), hit.stride(1), slots.stride(0), out.stride(0), out.stride(1),
        length, BLOCK=1024,
    )
    return out
