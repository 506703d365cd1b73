"""One layer's retrieval on the device (Triton): approximate scores as top-K keys, then
the GQA union of every query head's top-K compacted into slot lists. With
``torch.topk`` between them that is four launches and no host sync, against the ~40
small ops of the torch path; the result equals it (``SelectionPlan.retrieved``)."""

from __future__ import annotations

from dataclasses import dataclass

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


def score_keys_triton(lut, codes_buf, slots, seq_lens, bounds, sinks: int, window: int, out, block: int = 256) -> None:
    """Top-K keys of the approximate scores into ``out`` int64 [B, Hq, L]: lut f32 [B, Hq, NB, C]
    contiguous; codes_buf int16 [N, Hkv]; slots int64 [B, L] contiguous; seq_lens int64 [B];
    bounds f32 [max(1, NB-1)]. Keys are ordered like (score, earlier position)
    (``retrieval.scores_with_position_tiebreak``); NOT_SCORABLE for sinks, window and
    positions past the sequence."""
    b, hq, nb, _ = lut.shape
    hkv, length = codes_buf.shape[1], slots.shape[1]
    _score_keys_kernel[(b, hkv, triton.cdiv(length, block))](
        lut, codes_buf, slots, seq_lens, bounds, out,
        lut.stride(0), lut.stride(1), lut.stride(2),
        codes_buf.stride(0),
        slots.stride(0),
        out.stride(0), out.stride(1),
        length, sinks, window, NOT_SCORABLE,
        NB=nb, G=hq // hkv, BLOCK=block,
    )


@dataclass
class RetrieveBuffers:
    """Workspace of :func:`retrieve_triton` for one decode batch, shared by its layers.

    keys int64 [B, Hq, L]; top_keys / top_index int64 [B, Hq, kmax]; hit int8 [B, Hkv, L]."""

    keys: torch.Tensor
    top_keys: torch.Tensor
    top_index: torch.Tensor
    hit: torch.Tensor

    @classmethod
    def allocate(cls, b: int, hq: int, hkv: int, length: int, kmax: int, device) -> "RetrieveBuffers":
        top = torch.empty(b, hq, kmax, dtype=torch.int64, device=device)
        return cls(torch.empty(b, hq, length, dtype=torch.int64, device=device), top, torch.empty_like(top),
                   torch.empty(b, hkv, length, dtype=torch.int8, device=device))


def retrieve_triton(lut, codes_buf, slots, plan, bounds, out, buffers: RetrieveBuffers, block: int = 256) -> None:
    """One layer's retrieved slots into ``out`` int64 [B, Hkv, R] (ascending position, -1
    padded, last dim contiguous, any row stride; R >= the largest GQA union, e.g. g * kmax)
    from lut f32 [B, Hq, NB, C] contiguous, codes_buf int16 [N, Hkv], slots int64 [B, L]
    contiguous, the batch's :class:`~a2ats_sglang.core.retrieval.SelectionPlan` and bounds
    f32 [NB-1] (at least one element). Four launches plus fills, no host sync, no allocation."""
    b, hq = lut.shape[:2]
    hkv, length = codes_buf.shape[1], slots.shape[1]
    out.fill_(-1)
    if plan.kmax == 0 or b == 0:
        return
    score_keys_triton(lut, codes_buf, slots, plan.seq_lens, bounds, plan.sinks, plan.window, buffers.keys, block)
    torch.topk(buffers.keys, plan.kmax, dim=-1, out=(buffers.top_keys, buffers.top_index))
    hit, idx, val = buffers.hit, buffers.top_index, buffers.top_keys
    hit.zero_()
    _mark_kernel[(b, hq, triton.cdiv(plan.kmax, block))](
        idx, val, plan.k, plan.seq_lens, hit, idx.stride(0), idx.stride(1), hit.stride(0), hit.stride(1),
        plan.kmax, plan.sinks, plan.window, NOT_SCORABLE, G=hq // hkv, BLOCK=block,
    )
    _compact_kernel[(b, hkv)](
        hit, slots, out, hit.stride(0), hit.stride(1), slots.stride(0), out.stride(0), out.stride(1),
        length, BLOCK=1024,
    )
