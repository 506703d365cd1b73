"""The dense backend a2ats wraps for extend (and for layers/batches that stay dense):
SGLang's ``triton`` on CUDA; on CPU, SGLang's ``torch_native`` with an extend that
costs O(new tokens x context) per request instead of O(context^2), and a decode that
runs this project's C++ attention kernel over every slot of each sequence (the best
dense decode this project can build on CPU: ``torch_native`` runs one SDPA call per
request, far below the machine's memory bandwidth). Registered on its own as
``--attention-backend a2ats_dense``, the dense baseline of every CPU comparison.

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

from a2ats_sglang.kernels.dispatch import DecodeBuffers, Impl, KernelChoice

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
    """``torch_native`` whose plain causal extend skips the cached prefix's queries and
    whose plain decode is the C++ kernel over every slot (where it builds; else
    ``torch_native``'s)."""

    def __init__(self, model_runner):
        super().__init__(model_runner)
        self.kernels = KernelChoice.select("auto", model_runner.device)
        self.decode_state: tuple[int, torch.Tensor, DecodeBuffers] | None = None  # per batch: (Hkv, slots, buffers)

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self.decode_state = None  # built by the batch's first plain decode layer, shared by the others

    def _decode_slots(self, req_to_token, req_pool_indices, seq_lens, hkv: int, hq: int, d: int, dv: int):
        """int64 [B, Hkv, L] every slot of each sequence (-1 past its end), and the output buffers."""
        if self.decode_state is None or self.decode_state[0] != hkv:
            longest = int(seq_lens.max())
            rows = req_to_token[req_pool_indices, :longest].to(torch.int64)
            inside = torch.arange(longest, device=rows.device) < seq_lens.view(-1, 1)
            slots = torch.where(inside, rows, torch.full_like(rows, -1)).unsqueeze(1).expand(-1, hkv, -1).contiguous()
            self.decode_state = (hkv, slots, self.kernels.buffers(slots.shape[0], hq, hkv, d, dv, longest, rows.device))
        return self.decode_state[1], self.decode_state[2]

    def _run_sdpa_forward_decode(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 encoder_lens=None, scaling=None, enable_gqa=False, causal=False, is_cross_attn=False,
                                 sliding_window_size=None):
        plain = encoder_lens is None and not is_cross_attn and (sliding_window_size is None or sliding_window_size < 0)
        if not plain or self.kernels.impl is not Impl.CPP:
            return super()._run_sdpa_forward_decode(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, encoder_lens, scaling,
                enable_gqa, causal, is_cross_attn, sliding_window_size)
        slots, buffers = self._decode_slots(req_to_token, req_pool_indices, seq_lens, k_cache.shape[1], query.shape[1],
                                            query.shape[-1], v_cache.shape[-1])
        self.kernels.attend(query, k_cache, v_cache, slots, scaling, 0.0, buffers)
        output.copy_(buffers.out)
        return output

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
