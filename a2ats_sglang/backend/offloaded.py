"""Offload strategy (``--a2ats-offload``): the full KV in shared host memory.

The KV pool is :class:`~a2ats_sglang.offload.host_pool.HostKVPool`; the device keeps the
codes and each request's sinks + window (:class:`~a2ats_sglang.offload.resident.ResidentWindow`).
Extend attends exactly over the sequences' K/V gathered from the host and fills the
resident windows; decode attends the window on the device while this rank's CPU worker
attends the rest of the selection on the host, and the two merge by log-sum-exp. A
worker that fails twice in a row is replaced and that layer attended in the scheduler.

Under SGLang's CPU graph runner offload decodes eagerly: its layer's worker round trip
(submit, wait on a socket, perhaps restart the process) cannot be inside a compiled step,
and compiling the step piecewise around it measured 0.77x eager (BENCHMARKS.md §12), so
:meth:`Offload.init_graph_state` refuses and the runner serves eagerly (logged).
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass

import torch

from a2ats_sglang.backend.dense import paged_extend_attention
from a2ats_sglang.backend.fused_extend import fused_extend_layer
from a2ats_sglang.backend.layers import ModelAttention
from a2ats_sglang.backend.planner import AttendedShare, DecodeBatch, DecodePlanner, SelectionBuffer
from a2ats_sglang.backend.retriever import Retriever
from a2ats_sglang.core.attention import merge_states
from a2ats_sglang.core.retrieval import WRoPERotation
from a2ats_sglang.kernels.dispatch import DecodeBuffers, KernelChoice
from a2ats_sglang.offload.client import CPUAttentionWorker
from a2ats_sglang.offload.cpus import rank_cpus
from a2ats_sglang.offload.host_pool import HostKVPool
from a2ats_sglang.offload.protocol import WorkerFailure
from a2ats_sglang.offload.resident import ResidentWindow

logger = logging.getLogger(__name__)


@dataclass
class OffloadDecodeMetadata:
    """A decode batch in offload mode. batch: the planner's :class:`DecodeBatch`;
    selection: per KV head the host part attended in every layer (what a request attends
    exactly, less its resident window), then each layer's retrieved slots; rotation: the
    queries' WRoPE rotation (None when nothing is retrieved); window_rows int64 [B, Hkv,
    S + W]: the resident rows attended on the device (-1 pad); new_rows int64 [B]: the
    decode token's row; buffers: the window attention's output and the LUT."""

    batch: DecodeBatch
    selection: SelectionBuffer
    rotation: WRoPERotation | None
    window_rows: torch.Tensor
    new_rows: torch.Tensor
    buffers: DecodeBuffers


@dataclass
class OffloadExtendMetadata:
    """What an extend batch writes into the resident window: new_index int64 [N], the new
    tokens (of the batch's T) that are sinks or in the window, at rows new_rows [N];
    prefix_slots int64 [P] (host): cached-prefix tokens the window needs (a request's rows
    may hold another request's tokens), at rows prefix_rows [P]."""

    new_index: torch.Tensor
    new_rows: torch.Tensor
    prefix_slots: torch.Tensor
    prefix_rows: torch.Tensor


def rank_share_of_cpus() -> list[int] | None:
    """This rank's share of the machine's CPUs (SGLang's bind string, else an even split
    between the server's ranks), where its CPU worker runs; None (all of this process's)
    where no device id was published, as outside a server."""
    from sglang.srt.runtime_context import get_device, get_parallel

    gpu_id = get_device().gpu_id
    if gpu_id is None:
        return None
    p = get_parallel()
    return rank_cpus(gpu_id, p.dp_size * p.tp_size * p.pp_size)


def check_offload_model(model) -> None:
    """Offload attends plain causal layers only: refuse a model with any other, or with a
    logit soft-cap (its host attention has none)."""
    attention = ModelAttention.of(model)
    if attention.dense:
        raise ValueError(f"a2ats offload: plain causal attention layers only; this model's {attention.describe()}")
    if attention.logit_caps:
        raise ValueError(f"a2ats offload: attention logit soft-capping (layers {sorted(attention.logit_caps)}) is not "
                         f"supported")


class Offload:
    name = "offload"

    def __init__(self, model_runner, planner: DecodePlanner, retriever: Retriever, stats: AttendedShare, sinks: int,
                 window: int, worker_timeout: float):
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, HostKVPool):
            raise ValueError(f"a2ats offload needs the host KV pool, got {type(pool).__name__} (is the a2ats plugin "
                             f"loaded in the scheduler process?)")
        check_offload_model(model_runner.model)
        self.pool, self.req_to_token = pool, model_runner.req_to_token_pool.req_to_token
        self.planner, self.retriever, self.stats = planner, retriever, stats
        self.kernels = retriever.kernels
        self.host_kernels = KernelChoice.select("auto", "cpu")  # the scheduler's fallback for a failed worker
        hkv, num_layers = planner.num_kv_heads, len(retriever.layers)
        requests, longest = self.req_to_token.shape  # request rows (padding row included), longest context
        self.resident = ResidentWindow(num_layers, requests, sinks, window, hkv, pool.head_dim, pool.v_head_dim,
                                       pool.dtype, planner.device)
        self.q_heads = hkv * planner.group
        per_head = int(planner.budget.tokens(torch.tensor([longest]))[0])
        self.worker: CPUAttentionWorker | None = CPUAttentionWorker(
            pool.shared_region, pool.kv_layout, self.q_heads, batch=requests, slots=planner.group * per_head,
            timeout=worker_timeout, cpus=rank_share_of_cpus())
        atexit.register(self.close)
        codes = retriever.codes.numel() * retriever.codes.element_size()
        logger.info("a2ats offload: on the device %.1f MiB of codes (%d tokens) + %.1f MiB of resident windows "
                    "(%d requests); on the host %.2f GiB of K/V", codes / 2**20, pool.size,
                    self.resident.nbytes / 2**20, requests, pool.kv_layout.nbytes / 2**30)

    def describe(self) -> str:
        return f"offload, CPU worker pid {self.worker.pid}"

    def init_graph_state(self, context: int) -> None:
        raise ValueError("a2ats offload decodes eagerly: compiled piecewise around each layer's CPU worker round "
                         "trip it ran at 0.77x eager (BENCHMARKS.md section 12)")

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    # -- metadata -------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch, fused=None):
        if forward_batch.forward_mode.is_decode():
            return self._decode_metadata(forward_batch)
        return self._extend_metadata(forward_batch, fused)

    def _decode_metadata(self, forward_batch) -> OffloadDecodeMetadata:
        batch = self.planner.plan(forward_batch)
        pos = torch.arange(batch.slots.shape[1])
        exact = batch.inside_host if batch.plan is None else batch.plan.fixed_host
        on_host = exact & ~self.resident.kept(pos, batch.seq_lens_cpu.view(-1, 1))
        selection = self.planner.selection_buffer(batch, on_host)
        req = forward_batch.req_pool_indices
        window = self.resident.decode_rows(req, batch.seq_lens).unsqueeze(1).expand(-1, self.planner.num_kv_heads, -1)
        buffers = self.kernels.buffers(
            batch.slots.shape[0], self.q_heads, self.planner.num_kv_heads, self.pool.head_dim, self.pool.v_head_dim,
            window.shape[-1], batch.slots.device, self.retriever.lut_shape)
        rotation = None if batch.plan is None else self.retriever.rotation(batch.positions)
        self.stats.batch(batch)
        return OffloadDecodeMetadata(batch, selection, rotation, window, self.resident.rows(req, batch.positions),
                                     buffers)

    def _extend_metadata(self, forward_batch, fused=None) -> OffloadExtendMetadata:
        """Plain extend: the new tokens' window rows from their K/V, the cached prefix's from the
        pool. With ``fused`` (chunk-fused requests: KV copied into some slots, written into others
        by this forward) every kept position of each request is read from the pool after the
        layer's writes."""
        req, lens, ext = forward_batch.req_pool_indices, forward_batch.seq_lens, forward_batch.extend_seq_lens
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        if fused is None:
            tok_req = torch.repeat_interleave(req, ext)
            tok_len = torch.repeat_interleave(lens, ext)
            new_index = self.resident.kept(forward_batch.positions, tok_len).nonzero().squeeze(1)
            new_rows = self.resident.rows(tok_req[new_index], forward_batch.positions[new_index])
            from_pool = forward_batch.extend_prefix_lens_cpu
        else:
            new_index = new_rows = torch.zeros(0, dtype=torch.int64, device=req.device)
            from_pool = seq_lens
        reqs, positions = [], []
        for i, (p, n) in enumerate(zip(from_pool, seq_lens)):
            if p > 0:
                pos = self.resident.prefix_positions(p, n)
                reqs.append(torch.full_like(pos, i))
                positions.append(pos)
        if not positions:
            empty = torch.zeros(0, dtype=torch.int64, device=req.device)
            return OffloadExtendMetadata(new_index, new_rows, empty.cpu(), empty)
        which = req[torch.cat(reqs).to(req.device)]
        pos = torch.cat(positions).to(req.device)
        prefix_slots = self.req_to_token[which, pos].to("cpu", torch.int64)
        return OffloadExtendMetadata(new_index, new_rows, prefix_slots, self.resident.rows(which, pos))

    # -- layers -------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, meta: OffloadExtendMetadata, save_kv_cache=True,
                       **kwargs):
        """Exact causal extend over the host pool; fills the layer's resident windows."""
        lid, hq, hkv = layer.layer_id, layer.tp_q_head_num, layer.tp_k_head_num
        if save_kv_cache and k is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        kbuf, vbuf = self.pool.get_key_buffer(lid), self.pool.get_value_buffer(lid)
        out = q.new_empty(q.shape[0], hq * layer.v_head_dim)
        paged_extend_attention(
            q.view(-1, hq, layer.qk_head_dim), out.view(-1, hq, layer.v_head_dim), kbuf, vbuf, self.req_to_token,
            forward_batch.req_pool_indices, forward_batch.seq_lens_cpu, forward_batch.extend_prefix_lens_cpu,
            forward_batch.extend_seq_lens_cpu, layer.scaling, hq != hkv,
        )
        if k is not None:
            new = meta.new_index
            self.resident.store(lid, meta.new_rows, k.view(-1, hkv, layer.qk_head_dim)[new],
                                v.view(-1, hkv, layer.v_head_dim)[new])
        if meta.prefix_slots.numel():
            self.resident.store(lid, meta.prefix_rows, kbuf[meta.prefix_slots], vbuf[meta.prefix_slots])
        return out

    def forward_fused_extend(self, q, k, v, layer, forward_batch, fused, meta: OffloadExtendMetadata,
                             save_kv_cache=True):
        """An extend batch with chunk-fused requests over the host pool
        (:func:`~.fused_extend.fused_extend_layer`), then the layer's resident windows from the
        host copy. q [T, Hq * D] -> [T, Hq * Dv]."""
        out = fused_extend_layer(self.pool, self.req_to_token, q, k, v, layer, forward_batch, fused, save_kv_cache)
        lid = layer.layer_id
        self.resident.store(lid, meta.prefix_rows, self.pool.get_key_buffer(lid)[meta.prefix_slots],
                            self.pool.get_value_buffer(lid)[meta.prefix_slots])
        return out

    def forward_dense_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        raise RuntimeError(f"a2ats offload: layer {layer.layer_id} is not a plain causal layer (refused at start)")

    def forward_decode(self, q, k, v, layer, forward_batch, meta: OffloadDecodeMetadata, save_kv_cache=True,
                       **kwargs):
        """q [B, Hq * D] -> [B, Hq * Dv]: resident window here, the host part on the worker."""
        lid, hkv, scale = layer.layer_id, layer.tp_k_head_num, layer.scaling
        batch, buffers = meta.batch, meta.buffers
        if save_kv_cache and k is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
            self.resident.store(lid, meta.new_rows, k.view(-1, hkv, layer.qk_head_dim),
                                v.view(-1, hkv, layer.v_head_dim))
        q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if batch.plan is not None:
            self.retriever.retrieve(lid, q3, meta.rotation, scale, batch.slots, batch.plan, meta.selection.retrieved,
                                    buffers)
        host = meta.selection.slots
        remote = host.shape[-1] > 0
        cap = float(getattr(layer, "logit_cap", 0.0) or 0.0)
        if remote and self.worker is not None:
            self.worker.submit(lid, q3.float(), host, scale, cap)
        self.kernels.attend(q3, self.resident.k[lid], self.resident.v[lid], meta.window_rows, scale, cap, buffers)
        self.stats.counts += torch.stack(((host >= 0).sum() + (meta.window_rows >= 0).sum(),
                                          batch.seq_lens.sum() * hkv))
        out = buffers.out
        if remote:
            o_host, lse_host = self._host_part(q3, lid, host, scale, cap)
            out, _ = merge_states(out, buffers.lse, o_host.to(out.device), lse_host.to(out.device))
        return out.view(q3.shape[0], -1).to(q.dtype)

    def _host_part(self, q3, lid: int, slots, scale: float, cap: float):
        """The worker's answer, or (worker failed twice, or none could be started) the same
        attention in this process -> (out f32 [B, Hq, Dv], lse f32 [B, Hq]) on the CPU."""
        if self.worker is not None:
            try:
                return self.worker.wait()
            except WorkerFailure as e:
                logger.error("a2ats: CPU worker failed again (%s); attending this layer in the scheduler", e)
                self._replace_worker()
        b, s = slots.shape[0], slots.shape[-1]
        buffers = self.host_kernels.buffers(b, self.q_heads, slots.shape[1], self.pool.head_dim, self.pool.v_head_dim, s,
                                            "cpu")
        self.host_kernels.attend(q3.float().cpu(), self.pool.get_key_buffer(lid), self.pool.get_value_buffer(lid),
                                 slots.cpu(), scale, cap, buffers)
        return buffers.out, buffers.lse

    def _replace_worker(self) -> None:
        try:
            self.worker.restart(reason="repeated failure")
        except Exception as e:  # cannot start one: serve without offload workers from now on
            logger.error("a2ats: cannot restart the CPU worker (%s); retrieved tokens are attended in the scheduler", e)
            self.worker.close()
            self.worker = None

    def support_triton(self):
        return False

    def get_cuda_graph_seq_len_fill_value(self):
        return 1
