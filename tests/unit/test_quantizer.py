import pytest
import torch

from a2ats_sglang.core.quantizer import assign, fit_codebooks, kmeans, score_error


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    centers = torch.randn(2, 8, 16) * 20
    labels = torch.randint(0, 8, (2, 800))
    x = torch.gather(centers, 1, labels.unsqueeze(-1).expand(-1, -1, 16)) + 0.1 * torch.randn(2, 800, 16)
    c1 = kmeans(x, 8, seed=3)
    c2 = kmeans(x, 8, seed=3)
    torch.testing.assert_close(c1, c2)
    codes, dist = assign(x, c1)
    assert dist.mean() < 0.1 * 16 * 1.5  # every point sits in its own cluster
    for g in range(2):  # the partition equals the true one
        pairs = set(zip(labels[g].tolist(), codes[g].tolist()))
        assert len(pairs) == 8


def test_query_aware_beats_plain_vq_on_anisotropic_queries():
    g, n, d = 3, 2000, 32
    keys = torch.randn(g, n, d)
    scale = torch.ones(d)
    scale[:4] = 10.0  # queries live mostly in 4 directions
    queries = torch.randn(g, 1000, d) * scale
    qa = fit_codebooks(keys, queries, 64, max_iters=30)
    pv = fit_codebooks(keys, None, 64, max_iters=30)

    def approx(fit):
        codes, _ = assign(keys @ fit.whiten, fit.centroids @ fit.whiten)
        return torch.gather(fit.centroids, 1, codes.unsqueeze(-1).expand(-1, -1, d))

    e_qa = score_error(keys, queries, approx(qa))
    e_pv = score_error(keys, queries, approx(pv))
    assert (e_qa < 0.7 * e_pv).all(), (e_qa, e_pv)


def test_too_few_points_is_an_error():
    with pytest.raises(ValueError, match="cannot fit"):
        kmeans(torch.randn(1, 10, 4), 16)
