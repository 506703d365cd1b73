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

Under SGLang's CPU graph runner a batch of a captured size keeps its slot table in a
static buffer as wide as the longest sequence the server admits (the kernel reads each
request's first seq_len columns only), filled by :meth:`CpuDenseAttnBackend.init_forward_metadata`
outside the compiled step; the decode layer is then one opaque op. Layers that are not
plain causal decode (sliding window, cross-attention) keep ``torch_native``'s per-request
loop, left out of the compiled step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from torch.nn.functional import scaled_dot_product_attention

from a2ats_sglang.backend.layers import ModelAttention
from a2ats_sglang.backend.planner import CaptureBatch, slot_table
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


@dataclass
class DenseDecodeState:
    """A decode batch's plain layers: slots int64 [B, W] the physical slot of each position
    (W: the longest sequence, or the graph capacity for a captured batch size; columns past a
    request's length are never read), seq_lens int64 [B], and the kernel's buffers."""

    slots: torch.Tensor
    seq_lens: torch.Tensor
    buffers: DecodeBuffers


class CpuDenseAttnBackend(TorchNativeAttnBackend):
    """``torch_native`` whose plain causal extend skips the cached prefix's queries and
    whose plain decode is the C++ kernel over every slot (where it builds; else
    ``torch_native``'s)."""

    def __init__(self, model_runner):
        caps = ModelAttention.of(model_runner.model).logit_caps
        if caps:
            layer, cap = next(iter(caps.items()))
            raise ValueError(f"a2ats on CPU: attention logit soft-capping (layer {layer}: cap {cap:g}; "
                             f"{len(caps)} layers) is not applied by SGLang's CPU attention (torch_native), on which "
                             f"prefill and dense layers run here: refused rather than drifting from the model")
        super().__init__(model_runner)
        self.kernels = KernelChoice.select("auto", model_runner.device)
        self.num_attention_heads = model_runner.model_config.num_attention_heads  # all ranks' (a capture sizes by it)
        self.decode_state: DenseDecodeState | None = None  # per batch, built by plan or by the first plain layer
        self.graph: dict[int, DenseDecodeState] = {}  # captured batch size -> its static state

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self.decode_state = None
        state = self.graph.get(forward_batch.batch_size)
        if state is not None and forward_batch.forward_mode.is_decode():
            lens = forward_batch.seq_lens.to(torch.int64)
            longest = int(lens.max())  # the CPU device: a read, not a sync
            slot_table(self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, lens, longest,
                       out=state.slots[:, :longest])
            state.seq_lens.copy_(lens)
            self.decode_state = state

    # -- SGLang's CPU graph runner ------------------------------------------------
    def init_cpu_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        if self.kernels.impl is not Impl.CPP:
            raise ValueError(f"a2ats_dense: CPU graphs need the C++ kernels ({self.kernels.reason})")
        self.graph = {}

    def get_cpu_graph_seq_len_fill_value(self) -> int:
        return 1  # a padded request: one token, in the reserved request row 0 and KV slot 0

    def init_forward_metadata_capture_cpu_graph(self, bs: int, num_tokens: int, req_pool_indices, seq_lens,
                                                out_cache_loc, encoder_lens, forward_mode, spec_info) -> None:
        from sglang.srt.runtime_context import get_parallel

        k, v = self.token_to_kv_pool.get_key_buffer(0), self.token_to_kv_pool.get_value_buffer(0)
        hq, hkv, d, dv = self.num_attention_heads // get_parallel().attn_tp_size, k.shape[1], k.shape[2], v.shape[2]
        context = self.req_to_token_pool.req_to_token.shape[1]
        self.graph[bs] = DenseDecodeState(torch.zeros(bs, context, dtype=torch.int64, device=self.device),
                                          torch.zeros(bs, dtype=torch.int64, device=self.device),
                                          self.kernels.buffers(bs, hq, hkv, d, dv, context, self.device))
        self.init_forward_metadata(CaptureBatch(bs, seq_lens, req_pool_indices, out_cache_loc, forward_mode))

    def _eager_state(self, query, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens) -> DenseDecodeState:
        """The batch's state, built by its first plain layer (the others share it)."""
        if self.decode_state is None:
            longest = int(seq_lens.max())
            slots = slot_table(req_to_token, req_pool_indices, seq_lens, longest)
            buffers = self.kernels.buffers(slots.shape[0], query.shape[1], k_cache.shape[1], query.shape[2],
                                           v_cache.shape[2], longest, slots.device)
            self.decode_state = DenseDecodeState(slots, seq_lens.to(torch.int64), buffers)
        return self.decode_state

    def _run_sdpa_forward_decode(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 encoder_lens=None, scaling=None, enable_gqa=False, causal=False, is_cross_attn=False,
                                 sliding_window_size=None):
        plain = encoder_lens is None and not is_cross_attn and (sliding_window_size is None or sliding_window_size < 0)
        if not plain or self.kernels.impl is not Impl.CPP:
            return _torch_native_decode(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                        encoder_lens, scaling, enable_gqa, causal, is_cross_attn, sliding_window_size)
        state = self.decode_state if self.decode_state is not None else self._eager_state(
            query, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens)
        self.kernels.attend_paged(query, k_cache, v_cache, state.slots, state.seq_lens, scaling, 0.0, state.buffers)
        output.copy_(state.buffers.out)
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


@torch.compiler.disable
def _torch_native_decode(backend, *args):
    """``torch_native``'s decode: one SDPA call per request (host lengths, data-dependent
    shapes), so outside any compiled step."""
    return TorchNativeAttnBackend._run_sdpa_forward_decode(backend, *args)


def dense_backend(model_runner):
    """The dense backend for ``model_runner``'s device (see the module docstring)."""
    if str(model_runner.device).startswith("cuda"):
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

        return ATTENTION_BACKENDS["triton"](model_runner)
    return CpuDenseAttnBackend(model_runner)
