"""The dense backend a2ats wraps for extend (and for layers/batches that stay dense):
SGLang's ``triton`` on CUDA; on CPU, SGLang's ``torch_native`` with an extend that
costs O(new tokens x context) per request instead of O(context^2).

``torch_native`` attends a request's extend by building a query as long as the whole
sequence (the cached prefix included) and running causal SDPA over it, so a short
turn after a long cached prefix (multi-turn chat, radix hits, chunked prefill) costs
as much as prefilling everything again. Here the new queries attend the prefix and
themselves directly, in blocks of rows, with a lower-right causal mask.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from torch.nn.functional import scaled_dot_product_attention

QUERY_BLOCK = 1024  # rows per SDPA call after a prefix: bounds the [rows, context] mask


def causal_extend_attention(q, k, v, prefix: int, scale: float, enable_gqa: bool) -> torch.Tensor:
    """Causal attention of n new queries at positions prefix..prefix+n-1 over the
    sequence's keys 0..prefix+n-1. q [Hq, n, D]; k [Hkv, prefix+n, D]; v [Hkv, prefix+n, Dv]
    -> [Hq, n, Dv]."""
    n = q.shape[1]
    if prefix == 0:  # a whole sequence: SDPA's own causal mask, no mask tensor at all
        return scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    out = q.new_empty(q.shape[0], n, v.shape[-1])
    for i0 in range(0, n, QUERY_BLOCK):
        i1 = min(n, i0 + QUERY_BLOCK)
        end = prefix + i1  # keys visible to the block's last row
        rows = torch.arange(prefix + i0, end, device=q.device).view(-1, 1)
        mask = torch.arange(end, device=q.device).view(1, -1) <= rows
        out[:, i0:i1] = scaled_dot_product_attention(q[:, i0:i1], k[:, :end], v[:, :end], attn_mask=mask, scale=scale,
                                                     enable_gqa=enable_gqa)
    return out


def paged_extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, prefix_lens,
                           extend_lens, scale: float, enable_gqa: bool) -> torch.Tensor:
    """Causal extend of a batch over a token-slot KV pool. query [T, Hq, D] (the new tokens
    of each request in turn); k_cache [N, Hkv, D] / v_cache [N, Hkv, Dv] hold every token
    of each sequence, on any device (the rows a request needs are gathered and moved to
    the query's); writes and returns output [T, Hq, Dv]."""
    query = query.movedim(0, 1)  # [Hq, T, D]
    start = 0
    for i in range(seq_lens.shape[0]):
        n, prefix, total = int(extend_lens[i]), int(prefix_lens[i]), int(seq_lens[i])
        tokens = req_to_token[req_pool_indices[i], :total].to(k_cache.device)
        k = k_cache[tokens].movedim(0, 1).to(query.device, query.dtype)
        v = v_cache[tokens].movedim(0, 1).to(query.device, query.dtype)
        out = causal_extend_attention(query[:, start:start + n], k, v, prefix, scale, enable_gqa)
        output[start:start + n] = out.movedim(0, 1)
        start += n
    return output


class CpuDenseAttnBackend(TorchNativeAttnBackend):
    """``torch_native`` whose plain causal extend skips the cached prefix's queries."""

    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None,
                                 enable_gqa=False, causal=False, is_cross_attn=False, sliding_window_size=None):
        plain = causal and encoder_lens is None and not is_cross_attn and (
            sliding_window_size is None or sliding_window_size < 0)
        if not plain:
            return super()._run_sdpa_forward_extend(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens,
                extend_seq_lens, encoder_lens, scaling, enable_gqa, causal, is_cross_attn, sliding_window_size)
        return paged_extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                      extend_prefix_lens, extend_seq_lens, scaling, enable_gqa)


def dense_backend(model_runner):
    """The dense backend for ``model_runner``'s device (see the module docstring)."""
    if str(model_runner.device).startswith("cuda"):
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

        return ATTENTION_BACKENDS["triton"](model_runner)
    return CpuDenseAttnBackend(model_runner)
