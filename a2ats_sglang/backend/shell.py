"""The ``a2ats`` SGLang attention backend: a thin shell over a planner and a strategy.

Data flow per step: SGLang calls :meth:`A2ATSAttnBackend.init_forward_metadata` once per
batch (the strategy plans it: :mod:`.planner`), then ``forward_extend`` /
``forward_decode`` per layer, which encode the new keys (:mod:`.retriever`) and hand the
layer to the strategy: :class:`~.on_device.OnDevice` (full KV on the device) or
:class:`~.offloaded.Offload` (full KV in host memory, a CPU worker). Layers that are not
plain causal attention stay dense (:mod:`.layers`, logged at start).

Under SGLang's CPU graph runner (``--enable-torch-compile`` on ``--device cpu``) the
backend implements its hooks: :meth:`A2ATSAttnBackend.init_cpu_graph_state` sizes the
static buffers (:class:`~.planner.GraphCapacity`) and
:meth:`A2ATSAttnBackend.init_forward_metadata_capture_cpu_graph` allocates one captured
batch size's; at replay the ordinary :meth:`A2ATSAttnBackend.init_forward_metadata` plans
into them, outside the compiled step.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from a2ats_sglang.backend.fused_extend import check_servable, place_kv, placed_kv
from a2ats_sglang.backend.layers import ModelAttention, dense_reason
from a2ats_sglang.backend.parallel import TensorParallel
from a2ats_sglang.backend.planner import AttendedShare, CaptureBatch, DecodePlanner
from a2ats_sglang.backend.retriever import Retriever
from a2ats_sglang.config import A2ATSConfig
from a2ats_sglang.core.codebook import load_for_model_runner
from a2ats_sglang.core.retrieval import retrieval_break_even
from a2ats_sglang.kernels.dispatch import KernelChoice

logger = logging.getLogger(__name__)


class A2ATSAttnBackend(AttentionBackend):
    """SGLang ``AttentionBackend`` for A2ATS retrieval. ``tp``: this rank (default: as
    SGLang published it for this process); ``dense_backend``: what on-device mode wraps (default: the
    best dense backend for the device, :func:`.dense.dense_backend`)."""

    def __init__(self, model_runner, config: A2ATSConfig | None = None, tp: TensorParallel | None = None,
                 dense_backend: AttentionBackend | None = None):
        super().__init__()
        cfg = self.config = config or A2ATSConfig.from_env()
        tp = tp or TensorParallel.of_process()
        self.attention = ModelAttention.of(model_runner.model)
        books, rope, path = load_for_model_runner(
            model_runner, cfg.codebook, self.attention.rope(model_runner.model, model_runner.model_config.context_len))
        heads = tp.local_kv_heads(books.shape.num_kv_heads)
        pool, device = model_runner.token_to_kv_pool, model_runner.device
        self.max_context = model_runner.req_to_token_pool.req_to_token.shape[1]  # the longest sequence admitted
        kernels = KernelChoice.select(cfg.kernel, device)
        self.retriever = Retriever(books, rope, heads, pool.get_key_buffer(0).shape[0], kernels, device)
        group = tp.local_group(books.shape.num_q_heads, books.shape.num_kv_heads)
        dense_below = cfg.dense_below
        if dense_below < 0:  # auto: the CPU's break-even (a GPU runs the table as a GEMM far above attention's rate)
            dense_below = 0 if torch.device(device).type != "cpu" else retrieval_break_even(
                books.distances, books.num_codes, cfg.budget_policy, cfg.sinks, cfg.window, group, self.max_context)
        planner = DecodePlanner(model_runner.req_to_token_pool.req_to_token, cfg.budget_policy, cfg.sinks, cfg.window,
                                dense_below, self.retriever.kv_heads, group, device)
        self.stats = AttendedShare(model_runner.server_args.decode_log_interval, device)
        if cfg.offload:
            from a2ats_sglang.backend.offloaded import Offload

            self.strategy = Offload(model_runner, planner, self.retriever, self.stats, cfg.sinks, cfg.window,
                                    cfg.worker_timeout)
        else:
            from a2ats_sglang.backend.dense import dense_backend as default_dense
            from a2ats_sglang.backend.on_device import OnDevice

            self.strategy = OnDevice(dense_backend or default_dense(model_runner), pool, planner, self.retriever,
                                     self.stats, self.retriever.kv_heads * group, pool.get_key_buffer(0).shape[-1],
                                     pool.get_value_buffer(0).shape[-1])
        if cfg.chunk_fusion:
            check_servable(self.attention)
        self.forward_metadata = None
        self.fused = self.staged_fusion = None  # chunk fusion: this batch's FusedExtend / the next one's
        self.sparse_layers = frozenset(self.attention.sparse).intersection(self.retriever.layers) if (
            self.attention.layers) else None  # read once: which layers retrieve is fixed at start
        logger.info("a2ats: %s, %d codes, WRoPE distances %s, %s + %d sinks + %d window, dense below %d tokens%s; "
                    "kernel %s (%s); %s; %s; TP rank %d of %d: KV heads %d-%d of %d, %d query heads each",
                    path, books.num_codes, list(books.distances), cfg.budget_policy.describe(), cfg.sinks, cfg.window,
                    dense_below, " (auto)" if cfg.dense_below < 0 else "", kernels.impl.value, kernels.reason,
                    self.strategy.describe(), self.attention.describe(), tp.rank, tp.size, heads.start, heads.stop - 1,
                    books.shape.num_kv_heads, group)

    def init_forward_metadata(self, forward_batch):
        idle = forward_batch.forward_mode.is_idle() or not forward_batch.batch_size
        self.fused, self.staged_fusion = self.staged_fusion, None
        if self.fused is not None:
            self.fused.check(forward_batch)
        self.forward_metadata = None if idle else self.strategy.init_forward_metadata(forward_batch, self.fused)

    def stage_fusion(self, fused) -> None:
        """Chunk fusion: the next extend batch (the one SGLang is building) holds fused requests;
        ``fused`` (:class:`~a2ats_sglang.fusion.served.FusedExtend`) says where its tokens sit.
        Handed over here because SGLang's runners copy the forward batch into their own."""
        self.staged_fusion = fused

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self.fused is not None:  # staged by the fusion planner (chunk fusion)
            out = self.strategy.forward_fused_extend(q, k, v, layer, forward_batch, self.fused, self.forward_metadata,
                                                     save_kv_cache)
        else:
            out = self.strategy.forward_extend(q, k, v, layer, forward_batch, self.forward_metadata, save_kv_cache,
                                               **kwargs)
        if k is not None and self.is_sparse_layer(layer):
            self.retriever.encode(layer.layer_id, k, forward_batch.positions, forward_batch.out_cache_loc)
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if not self.is_sparse_layer(layer):
            return self.strategy.forward_dense_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if k is not None:
            self.retriever.encode(layer.layer_id, k, forward_batch.positions, forward_batch.out_cache_loc)
        return self.strategy.forward_decode(q, k, v, layer, forward_batch, self.forward_metadata, save_kv_cache,
                                            **kwargs)

    def place_kv(self, src, dst, delta) -> None:
        """Chunk fusion: every layer's K/V and codes of slots ``src`` copied to ``dst``, keys
        rotated by ``delta`` positions (int64 [m] each)."""
        place_kv(self.strategy.pool, self.retriever, src, dst, delta)

    def placed_kv(self, layer_id: int, src, delta):
        """Chunk fusion: layer ``layer_id``'s K/V of slots ``src`` as :meth:`place_kv` would
        place them (:func:`~.fused_extend.placed_kv`), without writing them anywhere."""
        pool = self.strategy.pool
        return placed_kv(pool, self.retriever.rope.to(pool.get_key_buffer(layer_id).device), layer_id, src, delta)

    def is_sparse_layer(self, layer) -> bool:
        if self.sparse_layers is not None:
            return layer.layer_id in self.sparse_layers
        return layer.layer_id in self.retriever.layers and dense_reason(layer) is None  # a model without RadixAttention

    # -- SGLang's CPU graph runner ------------------------------------------------
    def init_cpu_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Size the captured decode step for the longest sequence the server admits; raises
        (the runner then serves eagerly, logged) where the configuration cannot be captured."""
        self.strategy.init_graph_state(self.max_context)

    def get_cpu_graph_seq_len_fill_value(self) -> int:
        return 1  # a padded request: one token, in the reserved request row 0 and KV slot 0

    def init_forward_metadata_capture_cpu_graph(self, bs: int, num_tokens: int, req_pool_indices, seq_lens,
                                                out_cache_loc, encoder_lens, forward_mode, spec_info) -> None:
        self.strategy.add_graph_batch_size(bs)
        self.init_forward_metadata(CaptureBatch(bs, seq_lens, req_pool_indices, out_cache_loc, forward_mode))

    def attended_share(self) -> float:
        """Share of context token-heads attended over all sparse decode batches so far."""
        return self.stats.share

    def support_triton(self):
        return self.strategy.support_triton()

    def get_cuda_graph_seq_len_fill_value(self):
        return self.strategy.get_cuda_graph_seq_len_fill_value()


def create_a2ats_backend(model_runner):
    """Factory registered as ``--attention-backend a2ats``."""
    if getattr(model_runner, "use_mla_backend", False):
        raise ValueError("a2ats: MLA models are not supported (A2ATS needs per-KV-head keys)")
    return A2ATSAttnBackend(model_runner)
