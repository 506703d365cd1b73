"""The offload KV pool: SGLang's MHA pool with its K/V buffers in shared host memory,
whatever the model's device, and how many tokens it gets.

Addressed by the same physical slot ids as every SGLang pool, so radix-shared
prefixes share one host copy, and a slot's host copy is released exactly when
SGLang's allocator frees or reuses the slot (there is no second copy to manage).
The CPU attention worker maps the same region; it never writes KV. What stays on the
model's device is per token only the codes (and per request the resident window,
:mod:`a2ats_sglang.offload.resident`), so the pool's capacity is set by host memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

from a2ats_sglang.offload.shared_memory import KVLayout, SharedRegion

logger = logging.getLogger(__name__)
HOST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CODE_BYTES = 2  # one int16 code per (layer, KV head, token)


class HostKVPool(MHATokenToKVPool):
    """``MHATokenToKVPool`` whose buffers [slots, Hkv, D] live in one memfd region (NHD layout).
    Writes from any device are copied to the host."""

    def _create_buffers_normal(self):
        if getattr(self, "use_hnd", False) or getattr(self, "kv_cache_layout", "nhd") != "nhd":
            raise ValueError("a2ats offload: the host KV pool needs the NHD KV layout (unset SGLANG_USE_HND_KVCACHE)")
        if self.store_dtype not in HOST_DTYPES:
            raise ValueError(f"a2ats offload: KV cache dtype {self.store_dtype} is not supported on the host "
                             f"(use --kv-cache-dtype auto with a float32/bfloat16/float16 model)")
        k_shape, v_shape = self._kv_buffer_shapes()
        self.kv_layout = KVLayout(self.layer_num, k_shape[0], k_shape[1], k_shape[2], v_shape[2], self.store_dtype)
        self.shared_region = SharedRegion.create(self.kv_layout.nbytes, "a2ats-kv", huge_pages=True)
        pages = "reserved 2 MiB pages" if self.shared_region.hugetlb else "shared memory (huge pages if shmem THP allows)"
        logger.info("a2ats offload: host KV pool of %.2f GiB in %s", self.kv_layout.nbytes / 2**30, pages)
        self.k_buffer, self.v_buffer = self.kv_layout.views(self.shared_region)

    def _init_kv_copy_and_warmup(self):
        raise ValueError("a2ats offload: KV slot moves (speculative decoding) are not supported on the host KV pool")

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, k_scale=None, v_scale=None, layer_id_override=None,
                      dcp_kv_mask=None):
        """Store k [T, Hkv, D] / v [T, Hkv, Dv] (any device) at slots ``loc`` [T] of the host pool."""
        if k_scale is not None or v_scale is not None or dcp_kv_mask is not None:
            raise ValueError("a2ats offload: scaled or masked KV writes are not supported on the host KV pool")
        loc = unwrap_write_loc(loc_info)[0].to("cpu")
        li = (layer_id_override if layer_id_override is not None else layer.layer_id) - self.start_layer
        self.k_buffer[li][loc] = cache_k.to("cpu", self.store_dtype).view(-1, self.head_num, self.head_dim)
        self.v_buffer[li][loc] = cache_v.to("cpu", self.store_dtype).view(-1, self.head_num, self.v_head_dim)


@dataclass(frozen=True)
class OffloadSizing:
    """What offload mode costs, in bytes: ``dense_cell`` per token of full K/V (the host
    pool), ``code_cell`` per token on the device, ``window_cell`` per request on the
    device (its sinks + window of K/V)."""

    dense_cell: int
    code_cell: int
    window_cell: int

    def capacity(self, device_bytes: int, requests: int, host_bytes: int | None) -> int:
        """Tokens of the pool: the device holds codes for every token plus ``requests``
        resident windows; the host holds full K/V (``host_bytes``; None = the same memory
        as the device's, e.g. ``--device cpu``). Raises if not one request's window fits."""
        left = device_bytes - requests * self.window_cell
        if left <= 0:
            raise ValueError(
                f"a2ats offload: {requests} resident windows of {self.window_cell / 2**20:.1f} MiB do not fit the device's "
                f"{device_bytes / 2**30:.2f} GiB KV budget; lower --max-running-requests or --a2ats-window/--a2ats-sinks")
        tokens = left // (self.code_cell + self.dense_cell) if host_bytes is None else min(
            left // self.code_cell, host_bytes // self.dense_cell)
        need = self.window_cell // self.dense_cell + 1  # one request: its sinks + window and the token it decodes
        if tokens < need:
            where = (f"this rank's {host_bytes / 2**20:.2f} MiB of host memory for K/V (--a2ats-host-kv-gb, split "
                     f"evenly between the server's ranks)" if host_bytes is not None and
                     host_bytes // self.dense_cell <= left // self.code_cell else
                     f"the device's {device_bytes / 2**30:.2f} GiB KV budget")
            raise ValueError(
                f"a2ats offload: {where} holds {tokens} tokens of {self.dense_cell} B, fewer than one request's "
                f"{need} (sinks + window + 1); give it at least {need * self.dense_cell / 2**20:.2f} MiB per rank")
        return tokens

    def default_requests(self, device_bytes: int, cap: int = 2048) -> int:
        """Concurrent requests when none are asked for: at most a quarter of the device
        budget goes to resident windows."""
        return max(1, min(cap, device_bytes // 4 // self.window_cell))

    @classmethod
    def of(cls, configurator, sinks: int, window: int) -> "OffloadSizing":
        """From SGLang's ``KVCacheConfigurator``: its dense cell size (what the host pool
        costs per token), the local KV heads and layers (the codes)."""
        from sglang.srt.model_executor.pool_configurator import create_memory_pool_configurator
        from sglang.srt.runtime_context import get_parallel

        dense_cell = int(create_memory_pool_configurator(configurator)._cell_size)
        p = get_parallel()
        heads = configurator.model_config.get_num_kv_heads(p.attn_tp_size, p.attn_dcp_size)
        code_cell = configurator.layer_info.num_effective_layers * heads * CODE_BYTES
        return cls(dense_cell, code_cell, (sinks + window) * dense_cell)


def host_kv_bytes(host_kv_gb: float, device, ranks: int) -> int | None:
    """This rank's host memory for the KV pool, an even share between the server's
    ``ranks`` (tensor x data x pipeline parallel) of ``host_kv_gb`` if given, else of half the
    available host memory; None on a CPU device without ``host_kv_gb`` (host and device are
    one memory, which SGLang's budget already divides)."""
    if host_kv_gb > 0:
        return int(host_kv_gb * 2**30) // ranks
    if str(device).startswith("cpu"):
        return None
    import psutil

    return int(psutil.virtual_memory().available // 2 // ranks)
