"""On-device strategy: the full KV in SGLang's pool on the model's device.

Extend, layers that must stay dense (sliding window, cross-attention) and decode
batches with nothing to retrieve run on the wrapped dense backend
(:mod:`.dense`); a sparse decode layer retrieves into the batch's selection buffer and
attends it exactly over the pool. Under a graph runner (:meth:`OnDevice.init_graph_state`)
a batch of a captured size is planned into static buffers and always takes the sparse
path, whose decode layer is one opaque op (:mod:`a2ats_sglang.kernels.cpu`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a2ats_sglang.backend.fused_extend import fused_extend_layer
from a2ats_sglang.backend.planner import AttendedShare, DecodeBatch, DecodePlanner, SelectionBuffer
from a2ats_sglang.backend.retriever import Retriever
from a2ats_sglang.core.retrieval import WRoPERotation
from a2ats_sglang.kernels.dispatch import DecodeBuffers, Impl


@dataclass
class OnDeviceDecodeMetadata:
    """A sparse decode batch. batch: the planner's :class:`DecodeBatch`; rotation: its
    queries' WRoPE rotation; selection: per KV head sinks + window (everything, for a
    request its budget covers), then each layer's retrieved slots; buffers: the kernels'
    LUT, output and workspaces."""

    batch: DecodeBatch
    rotation: WRoPERotation
    selection: SelectionBuffer
    buffers: DecodeBuffers
    attended: torch.Tensor
    """int64 [2]: the counters the layers add their attended slots and context to (the share's,
    or scratch ones for a captured batch with nothing retrieved, which the share does not count)."""


class OnDevice:
    name = "on-device"

    def __init__(self, dense, pool, planner: DecodePlanner, retriever: Retriever, stats: AttendedShare,
                 q_heads: int, head_dim: int, v_head_dim: int):
        self.dense, self.pool = dense, pool
        self.planner, self.retriever, self.stats = planner, retriever, stats
        self.q_heads, self.head_dim, self.v_head_dim = q_heads, head_dim, v_head_dim
        self.graph_buffers: dict[int, DecodeBuffers] = {}  # captured batch size -> its kernels' buffers
        self.uncounted = torch.zeros(2, dtype=torch.int64, device=planner.device)

    def init_graph_state(self, context: int) -> None:
        """Under a graph runner: sequences up to ``context`` tokens (raises where the step
        cannot be captured: the torch and Triton kernels' selection has data-dependent shapes)."""
        if self.retriever.kernels.impl is not Impl.CPP:
            raise ValueError(f"a2ats: CPU graphs need the C++ kernels (--a2ats-kernel "
                             f"{self.retriever.kernels.impl.value} selects with data-dependent shapes)")
        self.planner.init_graph_state(context)
        self.graph_buffers = {}

    def add_graph_batch_size(self, bs: int) -> None:
        cap = self.planner.add_graph_batch_size(bs).selection.shape[-1]
        self.graph_buffers[bs] = self.retriever.kernels.buffers(
            bs, self.q_heads, self.planner.num_kv_heads, self.head_dim, self.v_head_dim, cap, self.planner.device,
            self.retriever.lut_shape)

    def describe(self) -> str:
        return f"on-device, dense backend {type(self.dense).__name__}"

    def init_forward_metadata(self, forward_batch, fused=None) -> OnDeviceDecodeMetadata | None:
        """None for extend (``fused``: a chunk-fused extend's plan, which needs nothing more
        here) and for decode batches that stay dense."""
        self.dense.init_forward_metadata(forward_batch)
        if not forward_batch.forward_mode.is_decode():
            return None
        batch = self.planner.plan(forward_batch)
        if batch.plan is None:
            return None
        selection = self.planner.selection_buffer(batch, batch.plan.fixed_host)
        if batch.graph is not None:
            buffers = self.graph_buffers[forward_batch.batch_size]
        else:
            buffers = self.retriever.kernels.buffers(
                batch.slots.shape[0], self.q_heads, self.planner.num_kv_heads, self.head_dim, self.v_head_dim,
                selection.slots.shape[-1], batch.slots.device, self.retriever.lut_shape)
        if batch.dense:
            attended = self.uncounted
        else:
            self.stats.batch(batch)
            attended = self.stats.counts
        return OnDeviceDecodeMetadata(batch, self.retriever.rotation(batch.positions), selection, buffers, attended)

    def forward_extend(self, q, k, v, layer, forward_batch, meta, save_kv_cache=True, **kwargs):
        return self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)

    def forward_fused_extend(self, q, k, v, layer, forward_batch, fused, meta, save_kv_cache=True):
        """An extend batch with chunk-fused requests (:func:`~.fused_extend.fused_extend_layer`)."""
        return fused_extend_layer(self.pool, self.planner.req_to_token, q, k, v, layer, forward_batch, fused,
                                  save_kv_cache)

    def forward_dense_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, meta: OnDeviceDecodeMetadata | None, save_kv_cache=True,
                       **kwargs):
        """q [B, Hq * D] -> [B, Hq * Dv]."""
        if meta is None:
            return self.forward_dense_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if save_kv_cache and k is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        batch, buffers, lid = meta.batch, meta.buffers, layer.layer_id
        q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        cap = float(getattr(layer, "logit_cap", 0.0) or 0.0)
        self.retriever.decode(lid, q3, meta.rotation, layer.scaling, batch.slots, batch.plan, meta.selection.slots,
                              meta.selection.fixed_width, self.pool.get_key_buffer(lid), self.pool.get_value_buffer(lid),
                              cap, buffers, meta.attended)
        return buffers.out.view(q3.shape[0], -1).to(q.dtype)

    def support_triton(self):
        return self.dense.support_triton()

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value()
