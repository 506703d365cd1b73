"""Log-sum-exp merge of partial attention results (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    o_ptr, lse_ptr, out_ptr, out_lse_ptr,
    stride_o_t, stride_o_n, stride_l_t, stride_out_t,
    N, DV,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0)  # one (token, head) row
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_DV)
    lse = tl.load(lse_ptr + t * stride_l_t + n, mask=n < N, other=float("-inf"))
    m = tl.max(lse, 0)
    finite = m > float("-inf")
    w = tl.where(lse > float("-inf"), tl.exp(lse - tl.where(finite, m, 0.0)), 0.0)
    s = tl.sum(w, 0)
    o = tl.load(o_ptr + t * stride_o_t + n[:, None] * stride_o_n + d[None, :], mask=(n[:, None] < N) & (d[None, :] < DV), other=0.0)
    acc = tl.sum(o.to(tl.float32) * w[:, None], 0)
    acc = tl.where(finite, acc / tl.where(finite, s, 1.0), 0.0)
    tl.store(out_ptr + t * stride_out_t + d, acc, mask=d < DV)
    tl.store(out_lse_ptr + t, tl.where(finite, m + tl.log(tl.where(finite, s, 1.0)), float("-inf")))


def merge_partials_triton(o: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor) -> None:
    """o f32 [R, N, Dv], lse f32 [R, N] partial results over disjoint sets (contiguous) ->
    writes out [R, Dv] (any float dtype, last dim contiguous) and out_lse f32 [R]."""
    rows, n, dv = o.shape
    if rows:
        _merge_kernel[(rows,)](
            o, lse, out, out_lse, o.stride(0), o.stride(1), lse.stride(0), out.stride(0), n, dv,
            BLOCK_N=triton.next_power_of_2(n), BLOCK_DV=triton.next_power_of_2(dv),
        )


def merge_states_triton(o1, lse1, o2, lse2):
    """Two partial results o [..., H, Dv], lse [..., H] -> merged (out in o1.dtype, lse)."""
    lead, dv = o1.shape[:-1], o1.shape[-1]
    parts = torch.stack((o1.float(), o2.float()), -2).reshape(-1, 2, dv)
    out = torch.empty(parts.shape[0], dv, dtype=torch.float32, device=o1.device)
    out_lse = torch.empty(parts.shape[0], dtype=torch.float32, device=o1.device)
    merge_partials_triton(parts, torch.stack((lse1, lse2), -1).float().reshape(-1, 2), out, out_lse)
    return out.view(*lead, dv).to(o1.dtype), out_lse.view(lead)
