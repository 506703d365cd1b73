"""Which KV heads this tensor-parallel rank serves (and so which codebooks it loads)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place among ``size`` tensor-parallel ranks."""

    rank: int
    size: int

    def local_kv_heads(self, num_kv_heads: int) -> slice:
        """The KV heads this rank holds, as SGLang splits them: a contiguous share when there
        are at least as many heads as ranks, else one replicated head."""
        if num_kv_heads >= self.size:
            n = num_kv_heads // self.size
            return slice(self.rank * n, (self.rank + 1) * n)
        head = self.rank * num_kv_heads // self.size
        return slice(head, head + 1)

    def local_group(self, num_q_heads: int, num_kv_heads: int) -> int:
        """Query heads per local KV head on this rank: SGLang gives each rank
        ``num_q_heads / size`` query heads, and one KV head when the KV heads are replicated
        (fewer than ranks), so the group shrinks with the ranks then."""
        local = self.local_kv_heads(num_kv_heads)
        return num_q_heads // self.size // (local.stop - local.start)

    @classmethod
    def of_process(cls) -> "TensorParallel":
        """This process's attention tensor-parallel rank, as SGLang published it; raises
        SGLang's error where none was (outside a server: state it with
        ``get_parallel().override(attn_tp_rank=..., attn_tp_size=...)`` or pass ``tp``)."""
        from sglang.srt.runtime_context import get_parallel

        p = get_parallel()
        return cls(int(p.attn_tp_rank), int(p.attn_tp_size))
