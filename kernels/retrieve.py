"""One decode layer's retrieval on the device (Triton): four launches, no host sync.

Shapes: B requests, Hq query heads, Hkv KV heads (G = Hq / Hkv query heads per KV head), D
head dim, NB WRoPE distances, C codes, NC = NB * C lookup-table cells, L positions.

A token's approximate score is one cell of its query head's lookup table (LUT): distance
bucket x C + code. So each head's selection is decided over a histogram of the cells, as
in the C++ ``retrieve_hist_cpu`` (kernels/cpu_select.cpp):

1. ``_lut_kernel`` (B * Hkv, row blocks, code blocks): each query rotated to every WRoPE
   distance, dotted with its KV head's centroids: the LUT.
2. ``_count_kernel`` (B, Hkv, position blocks): the scorable tokens (positions in
   [sinks, n - window)) of each cell, counted with atomics into the histogram.
3. ``_threshold_kernel`` (B, Hq): how many tokens the head takes
   (``SelectionPlan.head_tokens``; an adaptive budget's mass is summed per cell, whose
   tokens share one weight), then the threshold over the cells' order-preserving 32-bit
   keys of their float32 scores: the largest key t with at least that many tokens at or
   above it, and ``need``, how many of the tokens at t it still takes. Each such key is
   found by a 16-way search over the key range: 8 scans of the head's cells, and one more
   for what lies above the key.
4. ``_emit_kernel`` (B, Hkv): one pass in position order. A token is taken if for any head
   of the group its key is above the head's threshold, or equal to it and among the
   head's first ``need`` such tokens (ties go to the earlier position); the taken slots are
   compacted into the output row, the rest of the row is set to -1, and the histogram
   cells it counted are reset to zero.

The result equals the torch reference (``SelectionPlan.retrieved`` on ``approx_scores`` of
the LUT written by launch 1); an adaptive budget's counts up to the rounding of the float64
mass sums (the reference sums token by token, here cell by cell). Nothing is allocated and no torch op runs between the
launches, so a call can be captured in a CUDA graph; the histogram is zero before and
after each call.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

NO_THRESHOLD = tl.constexpr(2**31 - 1)  # threshold of a head that takes nothing: no key is above it, and its need is 0
SEARCH_BITS = 4  # key bits resolved per pass of the threshold search: 2**4 keys tested, 32 / 4 = 8 passes


@triton.jit
def _order(v):
    """float32 -> int32 with the same order (``retrieval.scores_with_position_tiebreak``)."""
    bits = v.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _scorable(seq_lens_ptr, k_ptr, b, L, sinks, window, min_tokens, TOP_P: tl.constexpr):
    """Request b's length n and the positions [sinks, hi) whose tokens are scored; empty
    (hi = sinks) when its least count + sinks + window cover it (its fixed part is all)."""
    n = tl.load(seq_lens_ptr + b)
    if TOP_P:
        least = min_tokens
    else:
        least = tl.load(k_ptr + b)
    hi = tl.maximum(tl.minimum(n - window, L), sinks)
    return n, tl.where(least + sinks + window >= n, sinks, hi)


@triton.jit
def _cells(codes_ptr, slots_ptr, bounds_ptr, b, kvh, n, offs, mask, L, C, stride_codes_n, stride_codes_h,
           NB: tl.constexpr):
    """Physical slot and LUT cell (distance bucket x C + code) of positions ``offs``; the
    bucket counts the bounds <= the distance n - 1 - pos (``retrieval.bucket_of``)."""
    slot = tl.load(slots_ptr + b * L + offs, mask=mask, other=0)
    code = tl.load(codes_ptr + slot * stride_codes_n + kvh * stride_codes_h, mask=mask, other=0).to(tl.int32)
    dist = (n - 1 - offs).to(tl.float32)
    bucket = tl.zeros_like(code)
    for i in tl.static_range(NB - 1):
        bucket += (dist >= tl.load(bounds_ptr + i)).to(tl.int32)
    return slot, bucket * C + code


@triton.jit
def _lut_kernel(
    q_ptr, cos_ptr, sin_ptr, cent_ptr, lut_ptr,
    stride_q_b, stride_q_h, stride_cs_b, stride_cs_n,
    Hkv, C, D, HALF, scale,
    G: tl.constexpr, NB: tl.constexpr, NEOX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64) // Hkv
    kvh = tl.program_id(0).to(tl.int64) % Hkv
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows (g, n) of the group's LUT, g * NB + n
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = r < G * NB
    q_row = q_ptr + b * stride_q_b + (kvh * G + r // NB)[:, None] * stride_q_h
    cs_row = b * stride_cs_b + (r % NB)[:, None] * stride_cs_n
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_K):
        dd = d0 + tl.arange(0, BLOCK_K)
        # RopeSpec.apply: out_i = x_i cos - x_j sin, out_j = x_j cos + x_i sin for each pair (i, j)
        if NEOX:
            first = dd < HALF
            partner = tl.where(first, dd + HALF, dd - HALF)
            freq = tl.where(first, dd, dd - HALF)
        else:
            first = dd % 2 == 0
            partner = dd ^ 1
            freq = dd // 2
        rot = rmask[:, None] & (dd < 2 * HALF)[None, :]
        x = tl.load(q_row + dd[None, :], mask=rmask[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        xp = tl.load(q_row + partner[None, :], mask=rot, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + cs_row + freq[None, :], mask=rot, other=1.0)  # dims past the rotary dim pass through
        sin = tl.load(sin_ptr + cs_row + freq[None, :], mask=rot, other=0.0)
        q_rot = x * cos + tl.where(first, -1.0, 1.0)[None, :] * xp * sin
        cent = tl.load(cent_ptr + (kvh * C + cc[:, None]) * D + dd[None, :],
                       mask=(cc < C)[:, None] & (dd < D)[None, :], other=0.0)
        acc += tl.dot(q_rot, tl.trans(cent), input_precision="ieee")
    tl.store(lut_ptr + ((b * Hkv + kvh) * G * NB + r[:, None]) * C + cc[None, :], acc * scale,
             mask=rmask[:, None] & (cc < C)[None, :])


@triton.jit
def _count_kernel(
    codes_ptr, slots_ptr, bounds_ptr, seq_lens_ptr, k_ptr, hist_ptr,
    stride_codes_n, stride_codes_h,
    L, C, NC, sinks, window, min_tokens,
    NB: tl.constexpr, TOP_P: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    n, hi = _scorable(seq_lens_ptr, k_ptr, b, L, sinks, window, min_tokens, TOP_P)
    mask = (offs >= sinks) & (offs < hi)
    _, cell = _cells(codes_ptr, slots_ptr, bounds_ptr, b, kvh, n, offs, mask, L, C, stride_codes_n, stride_codes_h, NB)
    tl.atomic_add(hist_ptr + (b * tl.num_programs(1) + kvh) * NC + cell, tl.full([BLOCK_L], 1, tl.int32), mask=mask,
                  sem="relaxed")


@triton.jit
def _cell_block(lut_row, hist_row, start, NC, vmax, MASS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Cells [start, start + BLOCK_C) of one head: order keys (int64), token counts, and the
    weight the searches sum: the counts, or (MASS) count * exp(value - vmax) in float64."""
    cells = start + tl.arange(0, BLOCK_C)
    c = tl.load(hist_row + cells, mask=cells < NC, other=0)
    v = tl.load(lut_row + cells, mask=cells < NC, other=0.0)
    key = _order(v).to(tl.int64)
    if MASS:
        weight = c.to(tl.float64) * tl.exp(v.to(tl.float64) - vmax)
    else:
        weight = c
    return key, c, tl.where(c > 0, weight, 0)  # empty cells' exp may overflow


@triton.jit
def _search(lut_row, hist_row, NC, target, top_p, vmax, MASS: tl.constexpr, BITS: tl.constexpr,
            BLOCK_C: tl.constexpr):
    """The largest key t whose cells with key >= t weigh ``target`` or more (MASS: ``top_p``
    of the total mass), by a 2**BITS-way search over the 32-bit key range, a scan of the
    cells per BITS bits. Returns t and the target."""
    WAYS: tl.constexpr = 1 << BITS
    ways = tl.arange(0, WAYS)
    lo = tl.full([], -(2**31), tl.int64)
    step = tl.full([], 2**32, tl.int64)
    for p in tl.static_range(32 // BITS):
        step = step // WAYS
        mids = lo + ways.to(tl.int64) * step
        if MASS:
            above = tl.zeros([WAYS], tl.float64)
        else:
            above = tl.zeros([WAYS], tl.int32)
        for start in range(0, NC, BLOCK_C):
            key, _, weight = _cell_block(lut_row, hist_row, start, NC, vmax, MASS, BLOCK_C)
            above += tl.sum(tl.where(key[:, None] >= mids[None, :], weight[:, None], 0), 0)
        if MASS:
            if p == 0:  # mids[0] is below every key: the total, summed as every pass sums
                target = top_p * tl.sum(tl.where(ways == 0, above, 0.0), 0)
        j = tl.maximum(tl.sum((above >= target).to(tl.int32), 0) - 1, 0)  # it holds for a prefix of the ways
        lo = lo + j.to(tl.int64) * step
    return lo, target


@triton.jit
def _threshold_kernel(
    lut_ptr, hist_ptr, seq_lens_ptr, k_ptr, thr_ptr, need_ptr,
    L, NC, sinks, window, min_tokens, top_p_bits,
    G: tl.constexpr, TOP_P: tl.constexpr, BITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    hq = tl.num_programs(1)
    hi = _scorable(seq_lens_ptr, k_ptr, b, L, sinks, window, min_tokens, TOP_P)[1]
    lut_row = lut_ptr + (b * hq + h) * NC
    hist_row = hist_ptr + (b * (hq // G) + h // G) * NC
    want = tl.minimum(tl.load(k_ptr + b), hi - sinks)
    if TOP_P:
        if want > 0:
            vmax = tl.full([], float("-inf"), tl.float32)
            for start in range(0, NC, BLOCK_C):
                cells = start + tl.arange(0, BLOCK_C)
                c = tl.load(hist_row + cells, mask=cells < NC, other=0)
                v = tl.load(lut_row + cells, mask=cells < NC, other=0.0)
                vmax = tl.maximum(vmax, tl.max(tl.where(c > 0, v, float("-inf")), 0))
            vmax = vmax.to(tl.float64)
            # top_p as its float64 bits: a float argument would be rounded to float32
            t, target = _search(lut_row, hist_row, NC, 0.0, top_p_bits.to(tl.float64, bitcast=True), vmax, True,
                                BITS, BLOCK_C)
            count_gt = tl.zeros([], tl.int32)
            count_eq = tl.zeros([], tl.int32)
            mass_gt = tl.zeros([], tl.float64)
            for start in range(0, NC, BLOCK_C):
                key, c, weight = _cell_block(lut_row, hist_row, start, NC, vmax, True, BLOCK_C)
                count_gt += tl.sum(tl.where(key > t, c, 0), 0)
                count_eq += tl.sum(tl.where(key == t, c, 0), 0)
                mass_gt += tl.sum(tl.where(key > t, weight, 0.0), 0)
            value = tl.where(t >= 0, t, t ^ 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
            # the reference's cumulative sum crosses the target inside key t, one weight per token
            inside = tl.ceil((target - mass_gt) / tl.exp(value.to(tl.float64) - vmax))
            inside = tl.minimum(tl.maximum(inside, 1.0), count_eq.to(tl.float64))
            want = tl.minimum(tl.maximum(count_gt + inside.to(tl.int64), min_tokens), want)
    thr = tl.full([], NO_THRESHOLD, tl.int32)
    need = tl.zeros([], tl.int32)
    if want > 0:
        t = _search(lut_row, hist_row, NC, want, 0.0, 0.0, False, BITS, BLOCK_C)[0]
        count_gt = tl.zeros([], tl.int32)
        for start in range(0, NC, BLOCK_C):
            key, c, _ = _cell_block(lut_row, hist_row, start, NC, 0.0, False, BLOCK_C)
            count_gt += tl.sum(tl.where(key > t, c, 0), 0)
        thr = t.to(tl.int32)
        need = (want - count_gt).to(tl.int32)
    tl.store(thr_ptr + b * hq + h, thr)
    tl.store(need_ptr + b * hq + h, need)


@triton.jit
def _emit_kernel(
    lut_ptr, codes_ptr, slots_ptr, bounds_ptr, seq_lens_ptr, k_ptr, hist_ptr, thr_ptr, need_ptr, out_ptr,
    stride_codes_n, stride_codes_h, stride_out_b, stride_out_h,
    L, C, NC, R, sinks, window, min_tokens,
    G: tl.constexpr, NB: tl.constexpr, TOP_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    hkv = tl.num_programs(1)
    gi = tl.arange(0, BLOCK_G)
    heads = kvh * G + gi
    hmask = gi < G
    thr = tl.load(thr_ptr + b * hkv * G + heads, mask=hmask, other=NO_THRESHOLD)
    need = tl.load(need_ptr + b * hkv * G + heads, mask=hmask, other=0)
    n, hi = _scorable(seq_lens_ptr, k_ptr, b, L, sinks, window, min_tokens, TOP_P)
    hist_row = hist_ptr + (b * hkv + kvh) * NC
    out_row = out_ptr + b * stride_out_b + kvh * stride_out_h
    seen = tl.zeros([BLOCK_G], tl.int32)  # tokens at each head's threshold so far, in position order
    base = tl.zeros([], tl.int32)
    for start in range(sinks, hi, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        mask = offs < hi
        slot, cell = _cells(codes_ptr, slots_ptr, bounds_ptr, b, kvh, n, offs, mask, L, C, stride_codes_n,
                            stride_codes_h, NB)
        both = hmask[:, None] & mask[None, :]
        key = _order(tl.load(lut_ptr + (b * hkv * G + heads[:, None]) * NC + cell[None, :], mask=both, other=0.0))
        tie = both & (key == thr[:, None])
        rank = seen[:, None] + tl.cumsum(tie.to(tl.int32), 1)
        take = both & ((key > thr[:, None]) | (tie & (rank <= need[:, None])))
        take = tl.max(take.to(tl.int32), 0)
        dest = base + tl.cumsum(take, 0) - 1
        tl.store(out_row + dest, slot, mask=(take > 0) & (dest < R))
        tl.store(hist_row + cell, tl.zeros_like(cell), mask=mask)
        seen += tl.sum(tie.to(tl.int32), 1)
        base += tl.sum(take, 0)
    for start in range(base, R, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        tl.store(out_row + offs, tl.full([BLOCK_L], -1, tl.int64), mask=offs < R)


@dataclass
class RetrieveBuffers:
    """Workspace of :func:`retrieve_triton` for one decode batch, shared by its layers.

    lut: float32 [B, Hq, NB, C], the layer's lookup table, written by every call (read by
    tests and by callers). hist: int32 [B, Hkv, NB * C], the scorable tokens of each cell;
    zero at allocation and left zero by every call. thr: int32 [B, Hq], each query head's
    threshold key; need: int32 [B, Hq], how many of the tokens at its threshold it takes."""

    lut: torch.Tensor
    hist: torch.Tensor
    thr: torch.Tensor
    need: torch.Tensor

    @classmethod
    def allocate(cls, b: int, hq: int, hkv: int, nb: int, c: int, device) -> "RetrieveBuffers":
        return cls(torch.empty(b, hq, nb, c, dtype=torch.float32, device=device),
                   torch.zeros(b, hkv, nb * c, dtype=torch.int32, device=device),
                   torch.empty(b, hq, dtype=torch.int32, device=device),
                   torch.empty(b, hq, dtype=torch.int32, device=device))


def retrieve_triton(q, cos, sin, neox: bool, centroids, scale: float, codes_buf, slots, plan, bounds, out,
                    buffers: RetrieveBuffers) -> None:
    """One layer's retrieved physical slots into ``out``, and its LUT into ``buffers.lut``.

    q: [B, Hq, D] float32/bf16/f16 post-RoPE decode queries (last dim contiguous).
    cos, sin: float32 [B, NB, RD/2], the batch's WRoPE rotation (``retrieval.WRoPERotation``,
    last dim contiguous); dims >= RD pass through; ``neox``: pairs (i, i + RD/2), else (2i, 2i+1).
    centroids: float32 [Hkv, C, D] contiguous; query head h uses KV head h // G.
    scale: the LUT's factor (softmax scale). codes_buf: int16 [N, Hkv], the code of each
    physical slot. slots: int64 [B, L] contiguous, the physical slot of each position.
    plan: the batch's :class:`~a2ats_sglang.core.retrieval.SelectionPlan` (seq_lens, k on
    the device). bounds: float32 [NB-1] WRoPE bucket bounds (empty for one distance).
    out: int64 [B, Hkv, R] (last dim contiguous, any row stride): the retrieved slots of each
    (request, KV head) in ascending position order, -1 padded; R >= the largest GQA union
    (a larger union is cut at R); nothing outside [..., :R] is written."""
    b, hq, d = q.shape
    hkv, c = centroids.shape[:2]
    nb, half = cos.shape[1], cos.shape[2]
    g = hq // hkv
    length, nc = slots.shape[1], nb * c
    if b == 0:
        return
    top_p = plan.top_p > 0
    top_p_bits = struct.unpack("<q", struct.pack("<d", plan.top_p))[0]
    bounds = bounds if nb > 1 else cos  # never read with one distance
    block_m = min(32, max(16, triton.next_power_of_2(g * nb)))
    block_c = min(64, max(16, triton.next_power_of_2(c)))
    _lut_kernel[(b * hkv, triton.cdiv(g * nb, block_m), triton.cdiv(c, block_c))](
        q, cos, sin, centroids, buffers.lut,
        q.stride(0), q.stride(1), cos.stride(0), cos.stride(1),
        hkv, c, d, half, scale,
        G=g, NB=nb, NEOX=neox, BLOCK_M=block_m, BLOCK_K=32, BLOCK_C=block_c,
    )
    limits = (plan.sinks, plan.window, plan.min_tokens)
    block_l = 256
    _count_kernel[(b, hkv, triton.cdiv(length, block_l))](
        codes_buf, slots, bounds, plan.seq_lens, plan.k, buffers.hist,
        codes_buf.stride(0), codes_buf.stride(1),
        length, c, nc, *limits,
        NB=nb, TOP_P=top_p, BLOCK_L=block_l,
    )
    _threshold_kernel[(b, hq)](
        buffers.lut, buffers.hist, plan.seq_lens, plan.k, buffers.thr, buffers.need,
        length, nc, *limits, top_p_bits,
        G=g, TOP_P=top_p, BITS=SEARCH_BITS, BLOCK_C=min(256, triton.next_power_of_2(nc)),
    )
    block_g = triton.next_power_of_2(g)  # tiles of [block_g, positions] at most 2048: registers
    _emit_kernel[(b, hkv)](
        buffers.lut, codes_buf, slots, bounds, plan.seq_lens, plan.k, buffers.hist, buffers.thr, buffers.need, out,
        codes_buf.stride(0), codes_buf.stride(1), out.stride(0), out.stride(1),
        length, c, nc, out.shape[2], *limits,
        G=g, NB=nb, TOP_P=top_p, BLOCK_G=block_g, BLOCK_L=min(256, max(32, 2048 // block_g)),
    )
