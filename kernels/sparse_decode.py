"""Split-K decode attention over per-KV-head lists of physical slots (Triton).

Each program takes one (request, KV head, split): it loads the g query heads of
the group once and streams its share of the selected slots with an online
softmax; the partial results are reduced by :mod:`merge`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .merge import merge_partials_triton


@triton.jit
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, o_ptr, lse_ptr,
    stride_q_b, stride_q_h,
    stride_k_n, stride_k_h,
    stride_v_n, stride_v_h,
    stride_s_b, stride_s_h,
    stride_o_b, stride_o_h, stride_o_s,
    stride_l_b, stride_l_h,
    S, split_len, scale, logit_cap,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, CAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    gi = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    heads = kvh * G + gi
    hmask = gi < G
    q = tl.load(q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + dd[None, :],
                mask=hmask[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
    m = tl.full([BLOCK_G], -1e30, dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, S)
    for s0 in range(start, end, BLOCK_N):
        offs = s0 + tl.arange(0, BLOCK_N)
        slot = tl.load(slots_ptr + b * stride_s_b + kvh * stride_s_h + offs, mask=offs < end, other=-1)
        valid = slot >= 0
        slot = tl.where(valid, slot, 0).to(tl.int64)
        k = tl.load(k_ptr + slot[:, None] * stride_k_n + kvh * stride_k_h + dd[None, :],
                    mask=valid[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N]
        if CAP:
            qk = logit_cap * (2.0 * tl.sigmoid(2.0 * qk / logit_cap) - 1.0)
        qk = tl.where(valid[None, :], qk, -1e30)
        m_new = tl.maximum(m, tl.max(qk, 1))
        alpha = tl.exp(m - m_new)
        p = tl.where(valid[None, :], tl.exp(qk - m_new[:, None]), 0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_v_n + kvh * stride_v_h + dv[None, :],
                    mask=valid[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    nonempty = l > 0
    out = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l, 1.0)), float("-inf"))
    tl.store(o_ptr + b * stride_o_b + heads[:, None] * stride_o_h + split * stride_o_s + dv[None, :], out,
             mask=hmask[:, None] & (dv[None, :] < DV))
    tl.store(lse_ptr + b * stride_l_b + heads * stride_l_h + split, lse, mask=hmask)


def num_splits(batch: int, kv_heads: int, s: int, block_n: int, target_programs: int = 256) -> int:
    """Enough splits to fill the device, none shorter than two blocks."""
    return max(1, min(triton.cdiv(s, 2 * block_n), triton.cdiv(target_programs, max(1, batch * kv_heads))))


@dataclass
class AttendBuffers:
    """Output and split-K workspace of :func:`sparse_decode_triton` for one decode batch,
    shared by its layers: out f32 [B, Hq, Dv], lse f32 [B, Hq], part_out f32 [B, Hq, splits, Dv],
    part_lse f32 [B, Hq, splits] (splits from :func:`num_splits` for the batch's width S)."""

    out: torch.Tensor
    lse: torch.Tensor
    part_out: torch.Tensor
    part_lse: torch.Tensor

    @classmethod
    def allocate(cls, b: int, hq: int, hkv: int, dv: int, s: int, device, block_n: int = 32) -> "AttendBuffers":
        splits = num_splits(b, hkv, s, block_n)
        return cls(torch.empty(b, hq, dv, dtype=torch.float32, device=device),
                   torch.empty(b, hq, dtype=torch.float32, device=device),
                   torch.empty(b, hq, splits, dv, dtype=torch.float32, device=device),
                   torch.empty(b, hq, splits, dtype=torch.float32, device=device))


def sparse_decode_triton(q, k_buf, v_buf, slots, scale: float, logit_cap: float, buffers: AttendBuffers,
                         block_n: int = 32) -> None:
    """q [B, Hq, D]; k_buf [N, Hkv, D]; v_buf [N, Hkv, Dv]; slots int64 [B, Hkv, S] (-1 pad,
    any row stride) -> writes buffers.out f32 [B, Hq, Dv] and buffers.lse f32 [B, Hq]."""
    b, hq, d = q.shape
    hkv, s = slots.shape[1], slots.shape[2]
    dv = v_buf.shape[-1]
    g = hq // hkv
    o, lse = buffers.part_out, buffers.part_lse
    splits = o.shape[2]
    split_len = triton.cdiv(max(s, 1), splits)
    _sparse_decode_kernel[(b, hkv, splits)](
        q, k_buf, v_buf, slots, o, lse,
        q.stride(0), q.stride(1),
        k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1),
        slots.stride(0), slots.stride(1),
        o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1),
        s, split_len, scale, logit_cap if logit_cap > 0 else 1.0,
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        DV=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_N=block_n, CAP=logit_cap > 0,
        # float32 KV is attended in full precision; 16-bit KV loses nothing to TF32 products
        PRECISION="ieee" if k_buf.dtype == torch.float32 else "tf32",
    )
    merge_partials_triton(o.view(b * hq, splits, dv), lse.view(b * hq, splits), buffers.out.view(b * hq, dv),
                          buffers.lse.view(b * hq))
