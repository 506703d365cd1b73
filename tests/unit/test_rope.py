import pytest
import torch

from a2ats_sglang.core.rope import RopeSpec


def spec(head_dim=64, rotary_dim=64, neox=True, mscale=1.0, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    return RopeSpec(inv, head_dim, neox, mscale)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
@pytest.mark.parametrize("mscale", [1.0, 1.2])
def test_unrotate_inverts_rotate(neox, rotary_dim, mscale):
    r = spec(rotary_dim=rotary_dim, neox=neox, mscale=mscale)
    x = torch.randn(7, 3, 64)
    pos = torch.randint(0, 10000, (7, 1))
    torch.testing.assert_close(r.unrotate(r.rotate(x, pos), pos), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("neox", [True, False])
def test_scores_depend_only_on_distance(neox):
    """RoPE(q, i) . RoPE(k, j) == RoPE(q, i - j) . k: the identity WRoPE rests on."""
    r = spec(neox=neox)
    q, k = torch.randn(5, 64), torch.randn(5, 64)
    i, j = torch.tensor([900, 50, 4000, 70, 12]), torch.tensor([3, 50, 1000, 7, 0])
    exact = (r.rotate(q, i) * r.rotate(k, j)).sum(-1)
    wrope = (r.rotate(q, i - j) * k).sum(-1)
    torch.testing.assert_close(exact, wrope, atol=1e-3, rtol=1e-4)


def test_matches_sglang_rotary_embedding_including_llama3_scaling():
    from sglang.srt.layers.rotary_embedding import get_rope

    for scaling in (None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}):
        rot = get_rope(64, 64, 16384, 500000, is_neox_style=True, rope_scaling=scaling, dtype=torch.float32)
        r = RopeSpec.from_sglang(rot)
        pos = torch.tensor([0, 5, 777, 16000])
        q, k = torch.randn(4, 2 * 64), torch.randn(4, 64)
        q_ref, k_ref = rot.forward_native(pos, q.clone(), k.clone())
        torch.testing.assert_close(r.rotate(k, pos.view(-1)).view(4, 64), k_ref.view(4, 64), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(r.unrotate(k_ref.view(4, 64), pos), k, atol=1e-2, rtol=1e-2)


def test_nonlinear_rope_is_rejected():
    cache = torch.randn(100, 64)
    with pytest.raises(ValueError, match="not linear in position"):
        RopeSpec.from_cos_sin_cache(cache, 64, True)


def test_rotary_dim_larger_than_head_dim_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        spec(head_dim=32, rotary_dim=64)
