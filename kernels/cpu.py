"""The CPU sparse-attention kernel (C++, built on first use, for this machine's CPU, with torch's extension
builder and cached in ~/.cache/torch_extensions). If no compiler is available the
torch reference is used and a warning logged."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _extension():
    try:
        from torch.utils.cpp_extension import load

        return load(name="a2ats_cpu_sparse_attention", sources=[str(Path(__file__).with_name("cpu_sparse_attention.cpp"))],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler / headers: stay correct, just slower
        logger.warning("a2ats: CPU attention kernel unavailable (%s); using the torch reference", e)
        return None


def available() -> bool:
    return _extension() is not None


def sparse_attention_cpu(q, k_buf, v_buf, slots, scale: float, logit_cap: float = 0.0):
    """Same contract as :func:`a2ats_sglang.attention.sparse_attention`, on CPU tensors."""
    ext = _extension()
    if ext is None:
        from a2ats_sglang.attention import sparse_attention

        return sparse_attention(q, k_buf, v_buf, slots, scale, logit_cap)
    out, lse = ext.sparse_attention(q.float(), k_buf, v_buf, slots.long(), float(scale), float(logit_cap))
    return out.to(q.dtype), lse
