"""The ``a2ats`` SGLang attention backend.

Extend (prefill, chunked prefill, mixed batches) is exact dense attention by the
wrapped dense backend; it also encodes the new keys. Codes are stored per
physical KV slot ([layers, slots, Hkv] int16), so radix-shared prefixes share
their codes and nothing needs invalidating: a reused slot is re-encoded when it
is written. Decode scores every past token through the lookup table, selects
sinks + window + top-K (GQA union) and attends that set exactly.

Dense backend (:mod:`a2ats_sglang.backend.dense`): triton on CUDA, torch_native with a prefix-aware
extend on CPU. Layers with a sliding window stay dense.

Offload mode (``--a2ats-offload``): the KV pool is :class:`~a2ats_sglang.offload.host_pool.HostKVPool`
(full K/V in shared host memory) and the device keeps the codes and each request's
sinks + window (:class:`~a2ats_sglang.offload.resident.ResidentWindow`). Extend gathers the
sequences' K/V from the host; decode attends the resident window on the device while
the CPU worker attends the retrieved tokens on the host; the two merge by log-sum-exp.
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from a2ats_sglang.backend import kernel_choice as ops
from a2ats_sglang.core.attention import merge_states
from a2ats_sglang.core.codebook import Codebooks, LayerCodebook, ModelShape, default_codebook_path
from a2ats_sglang.config import A2ATSConfig
from a2ats_sglang.backend.dense import dense_backend as default_dense_backend
from a2ats_sglang.backend.dense import paged_extend_attention
from a2ats_sglang.core.retrieval import SelectionPlan, distance_bounds
from a2ats_sglang.core.rope import RopeSpec
from a2ats_sglang.offload.worker import WorkerFailure

logger = logging.getLogger(__name__)


@dataclass
class DecodeMetadata:
    """Per decode batch: seq_lens int64 [B]; slots int64 [B, L] physical slot of each
    position (0 past the end); plan: the layer-independent part of the selection (None:
    no retrieval); fixed_slots int64 [B, Hkv, F]: slots of the part attended in every
    layer read from the pool (sinks, window, covered requests; in offload mode the part
    of it outside the resident window); window_rows int64 [B, Hkv, S + W] (offload): the
    resident window's rows; new_rows int64 [B] (offload): where the new token goes in it.
    Only seq_lens for a dense decode batch (not offloaded)."""

    seq_lens: torch.Tensor
    slots: torch.Tensor | None = None
    plan: SelectionPlan | None = None
    fixed_slots: torch.Tensor | None = None
    window_rows: torch.Tensor | None = None
    new_rows: torch.Tensor | None = None

    @property
    def sparse(self) -> bool:
        return self.plan is not None


@dataclass
class ExtendMetadata:
    """Offload mode, per extend batch: what to write into the resident window. new_index
    int64 [N]: the new tokens (of the batch's T) that are sinks or in the window, at rows
    new_rows [N]; prefix_slots int64 [P] (host): cached-prefix tokens the window needs
    (a request's slot in it may hold another request's tokens), at rows prefix_rows [P]."""

    new_index: torch.Tensor
    new_rows: torch.Tensor
    prefix_slots: torch.Tensor
    prefix_rows: torch.Tensor


def _find_rotary(model, layer_id: int):
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or layer_id >= len(layers):
        return None
    attn = getattr(layers[layer_id], "self_attn", None)
    return getattr(attn, "rotary_emb", None)


def _cpu_kernel_available() -> bool:
    """Build (or load the cached) C++ CPU kernel now, not during the first request."""
    from a2ats_sglang.kernels.cpu import available

    return available()


def _tensor_parallel() -> tuple[int, int]:
    try:
        from sglang.srt.runtime_context import get_parallel

        p = get_parallel()
        return int(p.tp_rank), int(p.tp_size)
    except Exception:  # outside a server (unit tests)
        return 0, 1


def local_kv_heads(num_kv_heads: int, tp_rank: int, tp_size: int) -> slice:
    """The KV heads a tensor-parallel rank holds, as SGLang splits them: a contiguous
    share when there are at least as many heads as ranks, else one replicated head."""
    if num_kv_heads >= tp_size:
        n = num_kv_heads // tp_size
        return slice(tp_rank * n, (tp_rank + 1) * n)
    head = tp_rank * num_kv_heads // tp_size
    return slice(head, head + 1)


def _decode_log_interval() -> int:
    """SGLang's ``--decode-log-interval`` (the attended share is logged with the same cadence)."""
    try:
        from sglang.srt.runtime_context import get_server_args

        return max(1, int(get_server_args().decode_log_interval))
    except Exception:  # no server (unit tests): log every batch
        return 1


class A2ATSAttnBackend(AttentionBackend):
    def __init__(self, model_runner, config: A2ATSConfig | None = None, dense_backend: AttentionBackend | None = None):
        super().__init__()
        self.config = config or A2ATSConfig.from_env()
        self.device = torch.device(model_runner.device)
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.forward_metadata: DecodeMetadata | ExtendMetadata | None = None

        mc = model_runner.model_config
        if not self.config.codebook and not getattr(mc, "model_path", None):
            raise ValueError("a2ats: no codebooks file given (--a2ats-codebook or SGLANG_A2ATS_CODEBOOK)")
        path = self.config.codebook or str(default_codebook_path(mc.model_path))
        books = Codebooks.load(path)
        hf = getattr(mc, "hf_text_config", None) or mc.hf_config
        shape = ModelShape.from_hf_config(hf, num_layers=getattr(self.token_to_kv_pool, "layer_num", None))
        rotary = _find_rotary(model_runner.model, 0)
        rope = RopeSpec.from_sglang(rotary) if rotary is not None else None
        books.validate(shape, rope, source=f"codebooks {path}")
        self.rope = (rope or books.rope).to(self.device)
        self.distances = torch.tensor(books.distances, dtype=torch.float32, device=self.device)
        self.bounds = distance_bounds(books.distances).to(self.device)
        self.budget = self.config.budget_policy

        tp_rank, tp_size = _tensor_parallel()
        heads = local_kv_heads(shape.num_kv_heads, tp_rank, tp_size)
        hkv_local = heads.stop - heads.start
        self.layers = {
            li: LayerCodebook.build(books.centroids[li, heads], books.whiten[li, heads], self.device)
            for li in range(shape.num_layers)
        }
        slots = self.token_to_kv_pool.get_key_buffer(0).shape[0]
        self.codes = torch.zeros(shape.num_layers, slots, hkv_local, dtype=torch.int16, device=self.device)
        self.use_triton = self.config.kernel == "triton" or (self.config.kernel == "auto" and self.device.type == "cuda")
        self.use_cpu_kernel = self.config.kernel == "auto" and self.device.type == "cpu" and _cpu_kernel_available()
        self._stats = [0, 0, 0]  # decode batches, attended token-heads, context token-heads
        if self.config.offload:
            self.dense = None
            self.resident = self._resident_window(model_runner, shape.num_layers, hkv_local)
            self.worker = self._start_worker(model_runner, shape.num_q_heads // tp_size, hkv_local)
        else:
            self.dense = dense_backend or default_dense_backend(model_runner)
            self.resident = self.worker = None
        self.log_interval = _decode_log_interval()
        logger.info(
            "a2ats: %s, %d codes, WRoPE distances %s, budget %.3g [%d, %d] + %d sinks + %d window, kernel %s, dense %s",
            path, books.num_codes, list(books.distances), self.budget.ratio, self.budget.min_tokens,
            self.budget.max_tokens, self.config.sinks, self.config.window,
            "triton" if self.use_triton else "c++" if self.use_cpu_kernel else "torch",
            type(self.dense).__name__ if self.dense else "none (offload)",
        )

    def _resident_window(self, model_runner, num_layers: int, hkv_local: int):
        """Offload mode: check the pool and the model, allocate the device-side window."""
        from sglang.srt.layers.radix_attention import RadixAttention

        from a2ats_sglang.offload.host_pool import HostKVPool
        from a2ats_sglang.offload.resident import ResidentWindow

        pool = self.token_to_kv_pool
        if not isinstance(pool, HostKVPool):
            raise ValueError(f"a2ats offload needs the host KV pool, got {type(pool).__name__} (is the a2ats plugin loaded "
                             f"in the scheduler process?)")
        for m in getattr(model_runner, "model", torch.nn.Module()).modules():
            if isinstance(m, RadixAttention) and (
                    (m.sliding_window_size is not None and m.sliding_window_size > -1) or m.is_cross_attention
                    or float(getattr(m, "logit_cap", 0.0) or 0.0) > 0):
                raise ValueError(f"a2ats offload: layer {m.layer_id} has a sliding window, cross-attention or a logit "
                                 f"cap; offload supports plain causal attention layers only")
        requests = self.req_to_token_pool.req_to_token.shape[0]  # rows, padding row included
        resident = ResidentWindow(num_layers, requests, self.config.sinks, self.config.window,
                                  hkv_local, pool.head_dim, pool.v_head_dim, pool.dtype, self.device)
        codes = self.codes.numel() * self.codes.element_size()
        logger.info("a2ats offload: on the device %.1f MiB of codes (%d tokens) + %.1f MiB of resident windows "
                    "(%d requests); on the host %.2f GiB of K/V", codes / 2**20, pool.size, resident.nbytes / 2**20,
                    requests, pool.kv_layout.nbytes / 2**30)
        return resident

    def _start_worker(self, model_runner, hq_local: int, hkv_local: int):
        """Offload mode: start this rank's CPU worker on the shared host pool."""
        from a2ats_sglang.offload.worker import CPUAttentionWorker

        context = int(getattr(model_runner.model_config, "context_len", 0) or 8192)
        per_head = int(self.budget.tokens(torch.tensor([context]))[0])
        worker = CPUAttentionWorker(
            self.token_to_kv_pool.shared_region, self.token_to_kv_pool.kv_layout, hq_local,
            batch=max(1, min(int(getattr(model_runner, "max_running_requests", 0) or 64), 256)),
            slots=(hq_local // hkv_local) * per_head, timeout=self.config.worker_timeout,
        )
        atexit.register(worker.close)
        return worker

    def _replace_worker(self) -> None:
        try:
            self.worker.restart(reason="repeated failure")
        except Exception as e:  # cannot start one: serve without offload workers from now on
            logger.error("a2ats: cannot restart the CPU worker (%s); retrieved tokens are attended in the scheduler", e)
            self.worker.close()
            self.worker = None

    # -- metadata -----------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        if self.dense is not None:
            self.dense.init_forward_metadata(forward_batch)
        mode = forward_batch.forward_mode
        if mode.is_idle() or not forward_batch.batch_size:
            self.forward_metadata = None
        elif not mode.is_decode():
            self.forward_metadata = self._extend_metadata(forward_batch) if self.resident else None
        else:
            self.forward_metadata = self._decode_metadata(forward_batch)

    def _decode_metadata(self, forward_batch) -> DecodeMetadata:
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        longest = int(forward_batch.seq_lens_cpu.max())
        plan = SelectionPlan.build(forward_batch.seq_lens_cpu, self.budget, self.config.sinks, self.config.window, self.device)
        dense = plan.covered or longest < self.config.dense_below
        if dense and self.resident is None:
            return DecodeMetadata(seq_lens)
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices, :longest].to(torch.int64)
        pos = torch.arange(longest, device=rows.device)
        inside = pos < seq_lens.view(-1, 1)
        slots = torch.where(inside, rows, torch.zeros_like(rows))
        hkv = self.codes.shape[2]
        if self.resident is None:
            fixed = ops.selected_slots(plan.fixed.unsqueeze(1).expand(-1, hkv, -1), slots)
            return DecodeMetadata(seq_lens, slots, plan, fixed)
        exact = inside if dense else plan.fixed  # attended in full; the resident window holds part of it
        on_host = exact & ~self.resident.kept(pos, seq_lens.view(-1, 1))
        fixed = ops.selected_slots(on_host.unsqueeze(1).expand(-1, hkv, -1), slots)
        req = forward_batch.req_pool_indices
        window = self.resident.decode_rows(req, seq_lens).unsqueeze(1).expand(-1, hkv, -1)
        return DecodeMetadata(seq_lens, slots, None if dense else plan, fixed, window, self.resident.rows(req, seq_lens - 1))

    def _extend_metadata(self, forward_batch) -> ExtendMetadata:
        """Offload mode: which tokens of an extend batch go into the resident window."""
        req, lens, ext = forward_batch.req_pool_indices, forward_batch.seq_lens, forward_batch.extend_seq_lens
        tok_req = torch.repeat_interleave(req, ext)
        tok_len = torch.repeat_interleave(lens, ext)
        new_index = self.resident.kept(forward_batch.positions, tok_len).nonzero().squeeze(1)
        new_rows = self.resident.rows(tok_req[new_index], forward_batch.positions[new_index])
        reqs, positions = [], []
        for i, (p, n) in enumerate(zip(forward_batch.extend_prefix_lens_cpu, forward_batch.seq_lens_cpu.tolist())):
            if p > 0:
                pos = self.resident.prefix_positions(p, n)
                reqs.append(torch.full_like(pos, i))
                positions.append(pos)
        if not positions:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return ExtendMetadata(new_index, new_rows, empty.cpu(), empty)
        which = req[torch.cat(reqs).to(req.device)]
        pos = torch.cat(positions).to(req.device)
        prefix_slots = self.req_to_token_pool.req_to_token[which, pos].to("cpu", torch.int64)
        return ExtendMetadata(new_index, new_rows, prefix_slots, self.resident.rows(which, pos))

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value() if self.dense else 1

    # -- layers -------------------------------------------------------------------
    def _is_sparse_layer(self, layer) -> bool:
        sw = getattr(layer, "sliding_window_size", None)
        return layer.layer_id in self.layers and not (sw is not None and sw > -1) and not layer.is_cross_attention

    def _encode(self, layer, k: torch.Tensor, positions: torch.Tensor, loc: torch.Tensor) -> None:
        """Store the codes of new keys k [T, Hkv*D] (post-RoPE at ``positions``) at slots ``loc``."""
        k_pre = self.rope.unrotate(k.view(k.shape[0], layer.tp_k_head_num, layer.qk_head_dim), positions.view(-1, 1))
        self.codes[layer.layer_id, loc] = self.layers[layer.layer_id].encode(k_pre)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self.resident is not None:
            out = self._extend_offloaded(q, k, v, layer, forward_batch, save_kv_cache)
        else:
            out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if k is not None and self._is_sparse_layer(layer):
            self._encode(layer, k, forward_batch.positions, forward_batch.out_cache_loc)
        return out

    def _extend_offloaded(self, q, k, v, layer, forward_batch, save_kv_cache):
        """Exact causal extend over the host pool; fills the layer's resident windows."""
        meta, lid, pool = self.forward_metadata, layer.layer_id, self.token_to_kv_pool
        hq, hkv = layer.tp_q_head_num, layer.tp_k_head_num
        if save_kv_cache and k is not None:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        kbuf, vbuf = pool.get_key_buffer(lid), pool.get_value_buffer(lid)
        out = q.new_empty(q.shape[0], hq * layer.v_head_dim)
        paged_extend_attention(
            q.view(-1, hq, layer.qk_head_dim), out.view(-1, hq, layer.v_head_dim), kbuf, vbuf,
            self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens_cpu,
            forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu, layer.scaling, hq != hkv,
        )
        if k is not None:
            new = meta.new_index
            self.resident.store(lid, meta.new_rows, k.view(-1, hkv, layer.qk_head_dim)[new],
                                v.view(-1, hkv, layer.v_head_dim)[new])
        if meta.prefix_slots.numel():
            self.resident.store(lid, meta.prefix_rows, kbuf[meta.prefix_slots], vbuf[meta.prefix_slots])
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        meta = self.forward_metadata
        if not self._is_sparse_layer(layer):
            return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if k is not None:
            self._encode(layer, k, forward_batch.positions, forward_batch.out_cache_loc)
        if self.resident is None and not meta.sparse:
            return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
            if self.resident is not None:
                self.resident.store(layer.layer_id, meta.new_rows, k.view(-1, layer.tp_k_head_num, layer.qk_head_dim),
                                    v.view(-1, layer.tp_k_head_num, layer.v_head_dim))
        b, hq, d = forward_batch.batch_size, layer.tp_q_head_num, layer.qk_head_dim
        q3 = q.reshape(b, hq, d)
        pooled = meta.fixed_slots
        if meta.sparse:
            retrieved = ops.retrieve(
                q3, forward_batch.positions, self.rope, self.distances, self.bounds, self.layers[layer.layer_id].centroids,
                self.codes[layer.layer_id], meta.slots, meta.plan, layer.scaling, self.use_triton, self.use_cpu_kernel,
            )
            pooled = torch.cat([pooled, retrieved], dim=-1)  # disjoint parts
        cap = float(getattr(layer, "logit_cap", 0.0) or 0.0)
        if self.resident is None:  # one attention over the pool
            out, _ = ops.sparse_attention(q3, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                                          self.token_to_kv_pool.get_value_buffer(layer.layer_id), pooled, layer.scaling,
                                          cap, self.use_triton, self.use_cpu_kernel)
        else:
            out = self._attend_offloaded(q3, layer, pooled, meta.window_rows, cap)
        if layer.layer_id == 0:
            attended = int((pooled >= 0).sum()) + (int((meta.window_rows >= 0).sum()) if self.resident else 0)
            self._record(attended, meta.seq_lens, layer.tp_k_head_num)
        return out.reshape(b, hq * layer.v_head_dim)

    def _attend_offloaded(self, q3, layer, pooled, window_rows, cap):
        """The host pool's part (``pooled`` slots) on the CPU worker, the resident window
        here meanwhile, merged by log-sum-exp. q3 [B, Hq, D] -> [B, Hq, Dv]."""
        lid, scale = layer.layer_id, layer.scaling
        remote = pooled.shape[-1] > 0
        if remote and self.worker is not None:
            self.worker.submit(lid, q3.float(), pooled, scale, cap)
        out, lse = ops.sparse_attention(q3, self.resident.k[lid], self.resident.v[lid], window_rows, scale, cap,
                                        self.use_triton, self.use_cpu_kernel)
        if not remote:
            return out
        if self.worker is not None:
            try:
                o_host, lse_host = self.worker.wait()
            except WorkerFailure as e:  # failed twice in a row: keep serving, attend here, start afresh
                logger.error("a2ats: CPU worker failed again (%s); attending this layer in the scheduler", e)
                o_host, lse_host = self._attend_on_host(q3, lid, pooled, scale, cap)
                self._replace_worker()
        else:
            o_host, lse_host = self._attend_on_host(q3, lid, pooled, scale, cap)
        merged, _ = merge_states(out, lse, o_host.to(out.device, out.dtype), lse_host.to(out.device))
        return merged

    def _attend_on_host(self, q3, lid: int, slots, scale: float, cap: float):
        """The worker's job, done in this process: -> (out f32 [B, Hq, Dv], lse [B, Hq]) on the CPU."""
        from a2ats_sglang.kernels.cpu import sparse_attention_cpu

        pool = self.token_to_kv_pool
        return sparse_attention_cpu(q3.float().cpu(), pool.get_key_buffer(lid), pool.get_value_buffer(lid), slots.cpu(),
                                    scale, cap)

    def _record(self, attended: int, seq_lens: torch.Tensor, hkv: int) -> None:
        """Count the share of context attended (layer 0); log it every ``log_interval`` batches."""
        context = int(seq_lens.sum()) * hkv
        self._stats[0] += 1
        self._stats[1] += attended
        self._stats[2] += context
        if self._stats[0] % self.log_interval == 0:
            logger.info(
                "a2ats decode batch: #req %d, context %d tokens (longest %d), attended %.1f%% of context (%.1f%% since start)",
                len(seq_lens), int(seq_lens.sum()), int(seq_lens.max()), 100.0 * attended / max(1, context),
                100.0 * self.attended_share(),
            )

    def attended_share(self) -> float:
        """Share of context token-heads attended over all sparse decode batches so far."""
        return self._stats[1] / max(1, self._stats[2])

    def support_triton(self):
        return self.dense.support_triton() if self.dense else False


def create_a2ats_backend(model_runner):
    """Factory registered as ``--attention-backend a2ats``."""
    if getattr(model_runner, "use_mla_backend", False):
        raise ValueError("a2ats: MLA models are not supported (A2ATS needs per-KV-head keys)")
    return A2ATSAttnBackend(model_runner)
