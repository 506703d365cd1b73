"""Random but valid codebooks for unit tests."""

import torch


def make_codebooks(num_layers, num_q, num_kv, head_dim, num_codes=16, distances=(4, 16, 64), seed=0, rope=None):
    """Random but valid codebooks for a model shape (``rope``, default: full rotary, base 10000)."""
    from a2ats_sglang.core.codebook import Codebooks, ModelShape
    from a2ats_sglang.core.rope import RopeSpec

    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    a = torch.randn(num_layers, num_kv, head_dim, head_dim, generator=g) * 0.1
    whiten = torch.linalg.cholesky(a @ a.transpose(-1, -2) + torch.eye(head_dim))
    return Codebooks(
        centroids=torch.randn(num_layers, num_kv, num_codes, head_dim, generator=g),
        whiten=whiten,
        rope=rope or RopeSpec(inv, head_dim),
        distances=tuple(distances),
        shape=ModelShape("tiny", num_layers, num_q, num_kv, head_dim),
    )
