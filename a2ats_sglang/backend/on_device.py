"""On-device strategy: the full KV in SGLang's pool on the model's device.

Extend, layers that must stay dense (sliding window, cross-attention) and decode
batches with nothing to retrieve run on the wrapped dense backend
(:mod:`.dense`); a sparse decode layer retrieves into the batch's selection buffer and
attends it exactly over the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from a2ats_sglang.backend.planner import AttendedShare, DecodeBatch, DecodePlanner, SelectionBuffer
from a2ats_sglang.backend.retriever import Retriever
from a2ats_sglang.core.retrieval import WRoPERotation
from a2ats_sglang.kernels.dispatch import DecodeBuffers


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


class OnDevice:
    name = "on-device"

    def __init__(self, dense, pool, planner: DecodePlanner, retriever: Retriever, stats: AttendedShare,
                 q_heads: int, head_dim: int, v_head_dim: int):
        self.dense, self.pool = dense, pool
        self.planner, self.retriever, self.stats = planner, retriever, stats
        self.q_heads, self.head_dim, self.v_head_dim = q_heads, head_dim, v_head_dim

    def describe(self) -> str:
        return f"on-device, dense backend {type(self.dense).__name__}"

    def init_forward_metadata(self, forward_batch) -> OnDeviceDecodeMetadata | None:
        """None for extend and for decode batches that stay dense."""
        self.dense.init_forward_metadata(forward_batch)
        if not forward_batch.forward_mode.is_decode():
            return None
        batch = self.planner.plan(forward_batch)
        if batch.plan is None:
            return None
        selection = self.planner.selection_buffer(batch, batch.plan.fixed_host)
        buffers = self.retriever.kernels.buffers(
            batch.slots.shape[0], self.q_heads, self.planner.num_kv_heads, self.head_dim, self.v_head_dim,
            selection.slots.shape[-1], batch.slots.device, self.retriever.lut_shape)
        self.stats.batch(batch)
        return OnDeviceDecodeMetadata(batch, self.retriever.rotation(batch.positions), selection, buffers)

    def forward_extend(self, q, k, v, layer, forward_batch, meta, save_kv_cache=True, **kwargs):
        return self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)

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
                              cap, buffers, self.stats.attended)
        self.stats.record(None, batch, layer.tp_k_head_num)
        return buffers.out.view(q3.shape[0], -1).to(q.dtype)

    def support_triton(self):
        return self.dense.support_triton()

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value()
