import pytest
import torch

from a2ats_sglang.core.attention import merge_states, sparse_attention


def dense_reference(q, k, v, scale):
    """q [Hq, D], k/v [T, Hkv, D] -> out [Hq, Dv], lse [Hq]."""
    hq, hkv = q.shape[0], k.shape[1]
    kk = k.repeat_interleave(hq // hkv, dim=1).float()
    logits = torch.einsum("hd,thd->ht", q.float(), kk) * scale
    lse = logits.logsumexp(-1)
    out = torch.einsum("ht,thd->hd", logits.softmax(-1), v.repeat_interleave(hq // hkv, dim=1).float())
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_attention_over_all_slots_equals_dense(dtype):
    n, hkv, hq, d = 64, 2, 6, 16
    k_buf, v_buf = torch.randn(n, hkv, d, dtype=dtype), torch.randn(n, hkv, d, dtype=dtype)
    perm = torch.randperm(n)[:40]
    q = torch.randn(1, hq, d, dtype=dtype)
    slots = perm.view(1, 1, -1).expand(1, hkv, -1).clone()
    slots = torch.cat([slots, torch.full((1, hkv, 5), -1)], -1)  # padding is ignored
    out, lse = sparse_attention(q, k_buf, v_buf, slots, 0.25)
    ref_o, ref_l = dense_reference(q[0], k_buf[perm], v_buf[perm], 0.25)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[0].float(), ref_o, atol=tol, rtol=tol)
    torch.testing.assert_close(lse[0], ref_l, atol=1e-4, rtol=1e-4)


def test_merge_of_disjoint_halves_equals_whole():
    n, hkv, hq, d = 50, 1, 2, 8
    k_buf, v_buf = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    q = torch.randn(1, hq, d)
    a, b = torch.arange(0, 20).view(1, 1, -1), torch.arange(20, 50).view(1, 1, -1)
    o1, l1 = sparse_attention(q, k_buf, v_buf, a, 0.3)
    o2, l2 = sparse_attention(q, k_buf, v_buf, b, 0.3)
    o, lse = merge_states(o1, l1, o2, l2)
    ref_o, ref_l = sparse_attention(q, k_buf, v_buf, torch.arange(50).view(1, 1, -1), 0.3)
    torch.testing.assert_close(o, ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_l)


def test_empty_set_contributes_nothing():
    k_buf, v_buf = torch.randn(10, 1, 4), torch.randn(10, 1, 4)
    q = torch.randn(1, 1, 4)
    o1, l1 = sparse_attention(q, k_buf, v_buf, torch.full((1, 1, 3), -1), 1.0)
    assert torch.isneginf(l1).all() and (o1 == 0).all()
    o2, l2 = sparse_attention(q, k_buf, v_buf, torch.arange(10).view(1, 1, -1), 1.0)
    o, lse = merge_states(o1, l1, o2, l2)
    torch.testing.assert_close(o, o2)
    torch.testing.assert_close(lse, l2)


@pytest.mark.parametrize("prefix,n", [(0, 7), (0, 45), (30, 1), (30, 45), (100, 16)])
def test_cpu_extend_equals_full_causal_attention(monkeypatch, prefix, n):
    """The CPU dense backend's extend (new queries only, in row blocks) equals causal
    attention over the whole sequence, restricted to the new rows (torch_native's way)."""
    from torch.nn.functional import scaled_dot_product_attention

    dense = pytest.importorskip("a2ats_sglang.backend.dense")  # the CPU dense backend subclasses SGLang's torch_native

    monkeypatch.setattr(dense, "QUERY_BLOCK", 16)
    total = prefix + n
    q_all = torch.randn(6, total, 32)
    k, v = torch.randn(2, total, 32), torch.randn(2, total, 24)
    want = scaled_dot_product_attention(q_all, k, v, is_causal=True, scale=0.3, enable_gqa=True)[:, prefix:]
    got = dense.causal_extend_attention(q_all[:, prefix:], k, v, prefix, 0.3, True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
