"""The CPU kernels (C++, one extension built on first use for this machine's CPU with
torch's extension builder, cached in ~/.cache/torch_extensions): sparse decode
attention and one layer's retrieval. If no compiler is available the torch
references are used and a warning logged."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)
SOURCES = ("cpu_bindings.cpp", "cpu_sparse_attention.cpp", "cpu_select.cpp")


@lru_cache(maxsize=1)
def _extension():
    try:
        from torch.utils.cpp_extension import load

        return load(name="a2ats_cpu_kernels", sources=[str(Path(__file__).with_name(f)) for f in SOURCES],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler / headers: stay correct, just slower
        logger.warning("a2ats: CPU kernels unavailable (%s); using the torch references", e)
        return None


def available() -> bool:
    return _extension() is not None


def sparse_attention_cpu(q, k_buf, v_buf, slots, scale: float, logit_cap: float = 0.0):
    """Same contract as :func:`a2ats_sglang.core.attention.sparse_attention`, on CPU tensors."""
    ext = _extension()
    if ext is None:
        from a2ats_sglang.core.attention import sparse_attention

        return sparse_attention(q, k_buf, v_buf, slots, scale, logit_cap)
    out, lse = ext.sparse_attention(q.float(), k_buf, v_buf, slots.long(), float(scale), float(logit_cap))
    return out.to(q.dtype), lse


def retrieve_cpu(lut, codes_buf, slots, plan, bounds):
    """One layer's retrieved slots int64 [B, Hkv, S] (ascending position, -1 pad) from
    lut f32 [B, Hq, NB, C], codes_buf int16 [N, Hkv], slots int64 [B, L], the batch's
    :class:`~a2ats_sglang.core.retrieval.SelectionPlan` and the WRoPE bucket bounds f32 [NB-1];
    None without the extension (the caller uses the torch path)."""
    ext = _extension()
    if ext is None:
        return None
    return ext.retrieve(lut.float(), codes_buf, slots, plan.seq_lens, plan.k, bounds, plan.sinks, plan.window)
