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


def test_phi3_longrope_reads_its_short_factors_and_refuses_a_context_past_them():
    """SGLang's LongRoPE rotates a batch with its short factors while no position passes
    original_max_position_embeddings: the spec inverts exactly that rotation (partial rotary
    included); a server whose context can pass it is refused."""
    from sglang.srt.layers.rotary_embedding import get_rope

    short, long = [1.0 + 0.01 * i for i in range(24)], [1.0 + i for i in range(24)]
    rot = get_rope(64, 48, 16384, 10000, is_neox_style=True, dtype=torch.float32,
                   rope_scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long,
                                 "original_max_position_embeddings": 4096})
    r = RopeSpec.from_module(rot, 64, 4096)
    assert r.rotary_dim == 48
    pos = torch.tensor([0, 9, 1000, 4095])
    q, k = torch.randn(4, 2 * 64), torch.randn(4, 64)
    _, k_ref = rot.forward(pos, q.clone(), k.clone())
    torch.testing.assert_close(r.unrotate(k_ref.view(4, 64), pos), k, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="long factors once a position passes 4096.*--context-length 4096"):
        RopeSpec.from_module(rot, 64, 4097)


def test_check_matches_tolerates_float_rounding_of_the_magnitude_only():
    a = spec(head_dim=32, rotary_dim=32)
    b = RopeSpec(a.inv_freq, 32, True, 1.1386294361)
    b.check_matches(RopeSpec(a.inv_freq, 32, True, 1.13862943611), "x")  # calibration vs server, float32 apart
    with pytest.raises(ValueError, match="rotary embedding differs"):
        b.check_matches(RopeSpec(a.inv_freq, 32, True, 1.14), "x")
    with pytest.raises(ValueError, match="rotary embedding differs"):
        a.check_matches(RopeSpec(a.inv_freq, 32, False), "x")
