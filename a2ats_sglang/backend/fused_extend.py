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
    (each request's computed tokens in turn); k_cache [N, Hkv, D] / v_cache [N, Hkv, Dv] on any device
    (the rows a request needs are gathered and moved to the query's);
    ``fused``: the batch's :class:`~a2ats_sglang.fusion.served.FusedExtend`. Writes and returns
    output [T, Hq, Dv]."""
    query = query.movedim(0, 1)
    start = 0
    for i, positions in enumerate(fused.positions):
        n, total = positions.numel(), int(seq_lens[i])
        tokens = req_to_token[req_pool_indices[i], :total].to(k_cache.device)
        k = k_cache[tokens].movedim(0, 1).to(query.device, query.dtype)
        v = v_cache[tokens].movedim(0, 1).to(query.device, query.dtype)
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


def fused_extend_layer(pool, req_to_token, q, k, v, layer, forward_batch, fused, save_kv_cache: bool) -> torch.Tensor:
    """One attention layer of a fused extend batch over SGLang's KV ``pool`` (on the device or
    in host memory): the new K/V written at the batch's slots, then every computed token
    attends by position (:func:`fused_extend_attention`); a CacheBlend scoring pass's probes at
    this layer compare the new K/V first. q [T, Hq * D] -> [T, Hq * Dv]."""
    lid, hq = layer.layer_id, layer.tp_q_head_num
    if k is not None:
        for probe in fused.probes:
            if probe.layer == lid:
                probe.add(k.view(k.shape[0], -1, layer.qk_head_dim), v.view(v.shape[0], -1, layer.v_head_dim))
    if save_kv_cache and k is not None:
        pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
    out = q.new_empty(q.shape[0], hq * layer.v_head_dim)
    fused_extend_attention(q.view(-1, hq, layer.qk_head_dim), out.view(-1, hq, layer.v_head_dim),
                           pool.get_key_buffer(lid), pool.get_value_buffer(lid), req_to_token,
                           forward_batch.req_pool_indices, forward_batch.seq_lens_cpu, fused, layer.scaling)
    return out


def place_kv(pool, retriever, src: torch.Tensor, dst: torch.Tensor, delta: torch.Tensor) -> None:
    """Copy every layer's K/V of ``pool`` (SGLang's layout: [slots, Hkv, D] per layer, on the
    device or in host memory) and the ``retriever``'s codes from slots ``src`` to slots ``dst``
    (int64 [m]), keys rotated by ``delta`` (int64 [m]) positions: a cached chunk's KV placed
    where it sits in a fused prompt. Codes are of pre-RoPE keys: copied as they are."""
    first = pool.get_key_buffer(next(iter(retriever.layers)))
    rope = retriever.rope.to(first.device)
    s, d, shift = src.to(first.device), dst.to(first.device), delta.to(first.device)
    for lid in retriever.layers:
        pool.get_key_buffer(lid)[d], pool.get_value_buffer(lid)[d] = placed_kv(pool, rope, lid, s, shift)
    retriever.copy_codes(src.to(retriever.codes.device), dst.to(retriever.codes.device))


def placed_kv(pool, rope, layer_id: int, src: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer_id``'s K [m, Hkv, D] / V [m, Hkv, Dv] of ``pool``'s slots ``src`` (int64
    [m]) as they are placed ``delta`` (int64 [m]) positions later: keys rotated by ``rope``
    (on the pool's device), values as they are."""
    k, v = pool.get_key_buffer(layer_id), pool.get_value_buffer(layer_id)
    s = src.to(k.device)
    return rope.shift(k[s], delta.to(k.device).view(-1, 1)), v[s]


def check_servable(attention) -> None:
    """Raise ValueError where chunk fusion cannot serve this model (``attention``: its
    :class:`~a2ats_sglang.backend.layers.ModelAttention`)."""
    if attention.dense:
        raise ValueError(f"a2ats chunk fusion: {attention.describe()}; a chunk's keys are moved with one rotation "
                         f"and attended by position, which layers that stay dense do not share")
    if attention.logit_caps:
        raise ValueError("a2ats chunk fusion: attention logit soft-capping is not applied by the fused extend")
