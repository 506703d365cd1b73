"""Query-aware vector quantization of pre-RoPE keys (A2ATS section 2).

For one (layer, KV head): ``H = E[q~ q~^T]`` over the WRoPE-rotated queries of
its GQA group, ``L = cholesky(H / rms(H) + eps I)``, and k-means on ``z = k L``
(row-vector form of ``L^T k``) minimises the expected squared *score* error.
``L = I`` is plain VQ. Everything is batched over heads: tensors carry a
leading group dim G (= layers x KV heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

EPS = 1e-6


def second_moment(q: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """q: [G, N, D] rotated queries -> H: [G, D, D] float32, normalized by its RMS.

    weights: optional [G, N] or [N] non-negative sample weights."""
    q = q.float()
    if weights is None:
        h = q.transpose(1, 2) @ q / q.shape[1]
    else:
        w = weights.float().expand(q.shape[0], -1)
        h = (q * w.unsqueeze(-1)).transpose(1, 2) @ q / w.sum(1).clamp_min(EPS)[:, None, None]
    rms = h.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(EPS)
    return h / rms


def whitening(h: torch.Tensor) -> torch.Tensor:
    """H: [G, D, D] -> lower Cholesky factor L: [G, D, D] with z = k @ L."""
    eye = torch.eye(h.shape[-1], dtype=torch.float32, device=h.device)
    return torch.linalg.cholesky(h.float() + EPS * eye)


def assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid. x: [G, N, D], c: [G, C, D] -> (codes int64 [G, N], sq dist [G, N])."""
    c2 = c.pow(2).sum(-1).unsqueeze(1)  # [G, 1, C]
    ct = c.transpose(1, 2)
    codes, dists = [], []
    for s in range(0, x.shape[1], chunk):
        xs = x[:, s : s + chunk]
        m, i = torch.baddbmm(c2, xs, ct, alpha=-2).min(-1)  # |c|^2 - 2 x.c
        codes.append(i)
        dists.append((m + xs.pow(2).sum(-1)).clamp_min_(0))
    return torch.cat(codes, 1), torch.cat(dists, 1)


def kmeans_pp_init(x: torch.Tensor, num_codes: int, gen: torch.Generator, oversample: int = 4) -> torch.Tensor:
    """k-means++ seeding, batched over G, on a random subset of ``oversample * C``
    points per group (the full set costs O(C N D) memory passes). x: [G, N, D] -> [G, C, D]."""
    g, n, _ = x.shape
    if n > oversample * num_codes:
        x = x[:, torch.randperm(n, generator=gen)[: oversample * num_codes]]
        n = x.shape[1]
    ar = torch.arange(g)
    x2 = x.pow(2).sum(-1)  # [G, N]

    def dist_to(c):  # c: [G, D] -> [G, N]
        return (x2 - 2 * torch.bmm(x, c.unsqueeze(2)).squeeze(2) + c.pow(2).sum(-1, keepdim=True)).clamp_min_(0)

    def sample(weights):  # one index per group, proportional to weights [G, N]
        cdf = weights.double().cumsum(1)
        u = torch.rand(g, 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).squeeze(1).clamp_max(n - 1)

    cents = [x[ar, torch.randint(n, (g,), generator=gen)]]
    best = dist_to(cents[0])
    for _ in range(1, num_codes):
        total = best.sum(1, keepdim=True)
        c = x[ar, sample(torch.where(total > 0, best, torch.ones_like(best)))]
        cents.append(c)
        torch.minimum(best, dist_to(c), out=best)
    return torch.stack(cents, 1)


def kmeans(
    x: torch.Tensor,
    num_codes: int,
    max_iters: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Lloyd's k-means in float32, batched over G. x: [G, N, D] -> centroids [G, C, D].

    Stops when the mean inertia improves by less than ``tol`` (relative) or after
    ``max_iters``. Empty clusters are re-seeded at the points farthest from their centroid."""
    x = x.float()
    g, n, d = x.shape
    if n < num_codes:
        raise ValueError(f"{n} calibration tokens cannot fit {num_codes} codes; give more text or fewer codes")
    gen = torch.Generator().manual_seed(seed)
    c = kmeans_pp_init(x, num_codes, gen)
    prev = math.inf
    for it in range(max_iters):
        codes, dist = assign(x, c)
        inertia = float(dist.mean())
        sums = torch.zeros(g, num_codes, d).scatter_add_(1, codes.unsqueeze(-1).expand(-1, -1, d), x)
        counts = torch.zeros(g, num_codes).scatter_add_(1, codes, torch.ones(g, n))
        c = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), c)
        empty = counts == 0
        if empty.any():
            far = dist.argsort(1, descending=True)
            for gi in empty.any(1).nonzero().flatten().tolist():
                slots = empty[gi].nonzero().flatten()
                c[gi, slots] = x[gi, far[gi, : slots.numel()]]
        if progress is not None:
            progress(it, inertia)
        if prev - inertia <= tol * max(prev, 1e-30) and it > 0:
            break
        prev = inertia
    return c


@dataclass
class FittedCodebooks:
    """centroids: [G, C, D] in key space; whiten: [G, D, D] (L, identity for plain VQ)."""

    centroids: torch.Tensor
    whiten: torch.Tensor


def fit_codebooks(
    keys: torch.Tensor,
    queries: torch.Tensor | None,
    num_codes: int,
    query_weights: torch.Tensor | None = None,
    max_iters: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> FittedCodebooks:
    """keys: [G, N, D] pre-RoPE; queries: [G, M, D] WRoPE-rotated queries of each group
    (None -> plain VQ). Returns key-space centroids and the whitening used."""
    g, _, d = keys.shape
    if queries is None:
        lmat = torch.eye(d).expand(g, d, d).clone()
    else:
        lmat = whitening(second_moment(queries, query_weights))
    z = keys.float() @ lmat
    zc = kmeans(z, num_codes, max_iters=max_iters, tol=tol, seed=seed, progress=progress)
    centroids = torch.linalg.solve_triangular(lmat.transpose(1, 2), zc.transpose(1, 2), upper=True).transpose(1, 2)
    return FittedCodebooks(centroids=centroids, whiten=lmat)


def score_error(keys: torch.Tensor, queries: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Relative score error per group: E[(q.(k - k^))^2] / E[(q.k)^2].

    keys, approx: [G, N, D]; queries: [G, M, D] -> [G] float32."""
    qf = queries.float()
    err = (qf @ (keys.float() - approx.float()).transpose(1, 2)).pow(2).mean((1, 2))
    ref = (qf @ keys.float().transpose(1, 2)).pow(2).mean((1, 2)).clamp_min(1e-30)
    return err / ref
