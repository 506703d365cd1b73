"""The offload KV pool: SGLang's MHA pool with its K/V buffers in shared host memory.

Addressed by the same physical slot ids as every SGLang pool, so radix-shared
prefixes share one host copy, and a slot's host copy is released exactly when
SGLang's allocator frees or reuses the slot (there is no second copy to manage).
The CPU attention worker maps the same region read-only in spirit (it never writes KV).
"""

from __future__ import annotations

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from a2ats_sglang.shared_memory import KVLayout, SharedRegion


class HostKVPool(MHATokenToKVPool):
    """``MHATokenToKVPool`` whose buffers live in one memfd region (CPU device, NHD layout)."""

    def _create_buffers_normal(self):
        if str(self.device) != "cpu" or getattr(self, "use_hnd", False) or getattr(self, "kv_cache_layout", "nhd") != "nhd":
            raise ValueError("a2ats offload: the host KV pool needs --device cpu and the NHD KV layout")
        k_shape, v_shape = self._kv_buffer_shapes()
        self.kv_layout = KVLayout(self.layer_num, k_shape[0], k_shape[1], k_shape[2], v_shape[2], self.store_dtype)
        self.shared_region = SharedRegion.create(self.kv_layout.nbytes, "a2ats-kv")
        self.k_buffer, self.v_buffer = self.kv_layout.views(self.shared_region)
