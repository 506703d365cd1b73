"""The ``a2ats`` SGLang attention backend.

Extend (prefill, chunked prefill, mixed batches) is exact dense attention by the
wrapped dense backend; it also encodes the new keys. Codes are stored per
physical KV slot ([layers, slots, Hkv] int16), so radix-shared prefixes share
their codes and nothing needs invalidating: a reused slot is re-encoded when it
is written. Decode scores every past token through the lookup table, selects
sinks + window + top-K (GQA union) and attends that set exactly.

Dense backend (:mod:`a2ats_sglang.dense`): triton on CUDA, torch_native with a prefix-aware
extend on CPU. Layers with a sliding window stay dense.
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from a2ats_sglang import ops
from a2ats_sglang.attention import merge_states
from a2ats_sglang.codebook import Codebooks, LayerCodebook, ModelShape, default_codebook_path
from a2ats_sglang.config import A2ATSConfig
from a2ats_sglang.dense import dense_backend as default_dense_backend
from a2ats_sglang.retrieval import SelectionPlan, distance_bounds
from a2ats_sglang.rope import RopeSpec
from a2ats_sglang.worker import WorkerFailure

logger = logging.getLogger(__name__)


@dataclass
class DecodeMetadata:
    """Per decode batch: seq_lens int64 [B]; when sparse, slots int64 [B, L] physical slot
    of each position (0 past the end), plan: the layer-independent part of the selection,
    fixed_slots int64 [B, Hkv, F]: the slots of its fixed part (sinks, window, covered
    requests) in every layer; all None for a dense decode batch."""

    seq_lens: torch.Tensor
    slots: torch.Tensor | None = None
    plan: SelectionPlan | None = None
    fixed_slots: torch.Tensor | None = None

    @property
    def sparse(self) -> bool:
        return self.plan is not None


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
        self.dense = dense_backend or default_dense_backend(model_runner)
        self.forward_metadata: DecodeMetadata | None = None

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
        self.worker = self._start_worker(model_runner, shape.num_q_heads // tp_size, hkv_local) if self.config.offload else None
        self.log_interval = _decode_log_interval()
        logger.info(
            "a2ats: %s, %d codes, WRoPE distances %s, budget %.3g [%d, %d] + %d sinks + %d window, kernel %s, dense %s",
            path, books.num_codes, list(books.distances), self.budget.ratio, self.budget.min_tokens,
            self.budget.max_tokens, self.config.sinks, self.config.window,
            "triton" if self.use_triton else "c++" if self.use_cpu_kernel else "torch", type(self.dense).__name__,
        )

    def _start_worker(self, model_runner, hq_local: int, hkv_local: int):
        """Offload mode: the pool must be the shared host pool; start this rank's CPU worker."""
        from a2ats_sglang.host_pool import HostKVPool
        from a2ats_sglang.worker import CPUAttentionWorker

        if not isinstance(self.token_to_kv_pool, HostKVPool):
            raise ValueError(
                "a2ats offload needs the shared host KV pool: run with SGLANG_PLATFORM=a2ats_cpu and --device cpu "
                "(offload from a GPU is not implemented)"
            )
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
        self.dense.init_forward_metadata(forward_batch)
        if not forward_batch.forward_mode.is_decode():
            self.forward_metadata = None
            return
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        longest = int(forward_batch.seq_lens_cpu.max()) if forward_batch.batch_size else 0
        plan = SelectionPlan.build(forward_batch.seq_lens_cpu, self.budget, self.config.sinks, self.config.window, self.device)
        if plan.covered or longest < self.config.dense_below:
            self.forward_metadata = DecodeMetadata(seq_lens)
            return
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices, :longest].to(torch.int64)
        pos = torch.arange(longest, device=rows.device)
        slots = torch.where(pos < seq_lens.view(-1, 1), rows, torch.zeros_like(rows))
        fixed = ops.selected_slots(plan.fixed.unsqueeze(1).expand(-1, self.codes.shape[2], -1), slots)
        self.forward_metadata = DecodeMetadata(seq_lens, slots, plan, fixed)

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value()

    # -- layers -------------------------------------------------------------------
    def _is_sparse_layer(self, layer) -> bool:
        sw = getattr(layer, "sliding_window_size", None)
        return layer.layer_id in self.layers and not (sw is not None and sw > -1) and not layer.is_cross_attention

    def _encode(self, layer, k: torch.Tensor, positions: torch.Tensor, loc: torch.Tensor) -> None:
        """Store the codes of new keys k [T, Hkv*D] (post-RoPE at ``positions``) at slots ``loc``."""
        k_pre = self.rope.unrotate(k.view(k.shape[0], layer.tp_k_head_num, layer.qk_head_dim), positions.view(-1, 1))
        self.codes[layer.layer_id, loc] = self.layers[layer.layer_id].encode(k_pre)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if k is not None and self._is_sparse_layer(layer):
            self._encode(layer, k, forward_batch.positions, forward_batch.out_cache_loc)
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        meta = self.forward_metadata
        if not self._is_sparse_layer(layer):
            return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if k is not None:
            self._encode(layer, k, forward_batch.positions, forward_batch.out_cache_loc)
        if not meta.sparse:
            return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        b, hq, d = forward_batch.batch_size, layer.tp_q_head_num, layer.qk_head_dim
        q3 = q.reshape(b, hq, d)
        retrieved = ops.retrieve(
            q3, forward_batch.positions, self.rope, self.distances, self.bounds, self.layers[layer.layer_id].centroids,
            self.codes[layer.layer_id], meta.slots, meta.plan, layer.scaling, self.use_triton, self.use_cpu_kernel,
        )
        fixed = meta.fixed_slots
        kbuf, vbuf = self.token_to_kv_pool.get_key_buffer(layer.layer_id), self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        cap = float(getattr(layer, "logit_cap", 0.0) or 0.0)
        if self.worker is None:  # the two parts are disjoint: one attention over both
            both = torch.cat([fixed, retrieved], dim=-1)
            out, _ = ops.sparse_attention(q3, kbuf, vbuf, both, layer.scaling, cap, self.use_triton, self.use_cpu_kernel)
        else:  # retrieved tokens on the CPU worker, sinks + window here, overlapped, merged by log-sum-exp
            self.worker.submit(layer.layer_id, q3.float(), retrieved, layer.scaling, cap)
            o_local, lse_local = ops.sparse_attention(q3, kbuf, vbuf, fixed, layer.scaling, cap, self.use_triton, self.use_cpu_kernel)
            try:
                o_remote, lse_remote = self.worker.wait()
            except WorkerFailure as e:  # failed twice in a row: keep serving, attend here, start afresh
                logger.error("a2ats: CPU worker failed again (%s); attending this layer in the scheduler", e)
                o_remote, lse_remote = ops.sparse_attention(q3, kbuf, vbuf, retrieved, layer.scaling, cap, False, self.use_cpu_kernel)
                self._replace_worker()
            out, _ = merge_states(o_local, lse_local, o_remote.to(o_local.dtype), lse_remote)
        if layer.layer_id == 0:
            self._record(int((fixed >= 0).sum() + (retrieved >= 0).sum()), meta.seq_lens, layer.tp_k_head_num)
        return out.reshape(b, hq * layer.v_head_dim)

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
        return self.dense.support_triton()


def create_a2ats_backend(model_runner):
    """Factory registered as ``--attention-backend a2ats``."""
    if getattr(model_runner, "use_mla_backend", False):
        raise ValueError("a2ats: MLA models are not supported (A2ATS needs per-KV-head keys)")
    return A2ATSAttnBackend(model_runner)
