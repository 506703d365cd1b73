"""Triton kernels against the torch references: on CUDA when there is one,
otherwise on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported)."""

import pytest
import torch

from a2ats_sglang.core import attention, retrieval
from a2ats_sglang.kernels import cpu
from a2ats_sglang.kernels.dispatch import Impl, KernelChoice
from a2ats_sglang.kernels.merge import merge_states_triton
from a2ats_sglang.kernels.score import NOT_SCORABLE, score_keys_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_cpp = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason="no C++ compiler for the CPU kernels")


def attend(impl: Impl, q, k_buf, v_buf, slots, scale, cap=0.0):
    """One kernel's attention through the backend's dispatch, into buffers allocated as a batch plan does."""
    kernels = KernelChoice(impl, "test")
    b, hq, _ = q.shape
    buffers = kernels.buffers(b, hq, slots.shape[1], v_buf.shape[-1], slots.shape[-1], q.device)
    kernels.attend(q, k_buf, v_buf, slots, scale, cap, buffers)
    return buffers.out.to(q.dtype), buffers.lse


@pytest.mark.parametrize("hq,hkv,nb", [(4, 2, 1), (9, 3, 8), (8, 8, 3)])
def test_score_keys_kernel_matches_reference(hq, hkv, nb):
    """The Triton scores, as top-K keys: ordered like the reference scores with ties to
    the earlier position; sinks, window and padding below every score."""
    b, c, n_slots = 3, 32, 700
    seq_lens = torch.tensor([300, 17, 211])
    length = int(seq_lens.max())
    lut = torch.randn(b, hq, nb, c)
    codes_buf = torch.randint(0, c, (n_slots, hkv), dtype=torch.int16)
    slots = torch.stack([torch.randperm(n_slots)[:length] for _ in range(b)])
    bounds = retrieval.distance_bounds(retrieval.wrope_distances(nb, lo=4, hi=400))
    scores = retrieval.approx_scores(lut, codes_buf[slots].permute(0, 2, 1), seq_lens, bounds, 4, 16)
    want = retrieval.scores_with_position_tiebreak(scores).masked_fill(scores == float("-inf"), NOT_SCORABLE)
    got = torch.empty(b, hq, length, dtype=torch.int64, device=DEV)
    bounds = bounds if nb > 1 else torch.zeros(1)
    score_keys_triton(lut.to(DEV), codes_buf.to(DEV), slots.to(DEV), seq_lens.to(DEV), bounds.to(DEV), 4, 16, got,
                      block=64)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 1, 64), (9, 3, 64), (2, 2, 32)])
def test_sparse_decode_matches_reference(dtype, hq, hkv, d):
    b, n_slots = 3, 400
    k_buf = torch.randn(n_slots, hkv, d, dtype=dtype)
    v_buf = torch.randn(n_slots, hkv, d, dtype=dtype)
    q = torch.randn(b, hq, d, dtype=dtype)
    lens = [70, 5, 0]  # ragged, one empty selection
    slots = torch.full((b, hkv, max(lens)), -1, dtype=torch.int64)
    for i, n in enumerate(lens):
        for h in range(hkv):
            slots[i, h, :n] = torch.randperm(n_slots)[:n]
    want_o, want_l = attention.sparse_attention(q, k_buf, v_buf, slots, 0.125)
    got_o, got_l = attend(Impl.TRITON, q.to(DEV), k_buf.to(DEV), v_buf.to(DEV), slots.to(DEV), 0.125)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_o.cpu().float(), want_o.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_l.cpu(), want_l, atol=1e-3, rtol=1e-3)


def test_sparse_decode_logit_cap():
    q, k_buf, v_buf = torch.randn(1, 2, 32) * 4, torch.randn(50, 1, 32) * 4, torch.randn(50, 1, 32)
    slots = torch.arange(50).view(1, 1, -1)
    want_o, want_l = attention.sparse_attention(q, k_buf, v_buf, slots, 0.5, logit_cap=5.0)
    got_o, got_l = attend(Impl.TRITON, q.to(DEV), k_buf.to(DEV), v_buf.to(DEV), slots.to(DEV), 0.5, 5.0)
    torch.testing.assert_close(got_o.cpu(), want_o, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_l.cpu(), want_l, atol=1e-4, rtol=1e-4)


def test_merge_kernel_matches_reference():
    o1, o2 = torch.randn(5, 3, 16), torch.randn(5, 3, 16)
    l1, l2 = torch.randn(5, 3), torch.randn(5, 3)
    l1[0, 0] = float("-inf")  # an empty partial
    want = attention.merge_states(o1, l1, o2, l2)
    got = merge_states_triton(o1.to(DEV), l1.to(DEV), o2.to(DEV), l2.to(DEV))
    torch.testing.assert_close(got[0].cpu(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].cpu(), want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [0.0, 4.0])
@pytest.mark.parametrize("d,dv", [(64, 32), (40, 24), (128, 128)])  # vector paths, and head dims off 16 lanes
@needs_cpp
def test_cpu_kernel_matches_reference(dtype, cap, d, dv):
    k_buf, v_buf = torch.randn(300, 3, d).to(dtype), torch.randn(300, 3, dv).to(dtype)
    q = torch.randn(3, 9, d)
    slots = torch.randint(0, 300, (3, 3, 50))
    slots[0, :, 20:] = -1  # ragged
    slots[2] = -1  # empty selection
    want_o, want_l = attention.sparse_attention(q, k_buf, v_buf, slots, 0.2, cap)
    got_o, got_l = attend(Impl.CPP, q, k_buf, v_buf, slots, 0.2, cap)
    torch.testing.assert_close(got_o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_l, want_l, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq,hkv,nb,twins", [(8, 2, 4, False), (9, 3, 1, False), (4, 4, 8, False), (16, 2, 3, True)])
def test_retrieve_kernels_match_torch(hq, hkv, nb, twins):
    """The backend's whole retrieval step (WRoPE, LUT, scores, per-head top-K, GQA union)
    through each kernel choice: the Triton kernels (on the device) and the C++ kernel (CPU)
    write exactly the torch path's slots into a column range of a wider selection buffer
    (as the batch plan lays it out), on ragged requests, one of them covered by its budget;
    GQA groups of 1 to 8; ``twins``: pairs of equal centroids, so that different LUT
    cells tie too (their tokens are cut by position across cells)."""
    from a2ats_sglang.backend.retriever import Retriever
    from a2ats_sglang.core.codebook import Codebooks, ModelShape
    from a2ats_sglang.core.rope import RopeSpec

    d, c, n_slots, fixed_width = 32, 16, 6000, 5  # few codes: many exact ties, broken by position
    seq_lens = torch.tensor([900, 25, 1500, 1200])
    length = int(seq_lens.max())
    rope = RopeSpec(1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d), d)
    whiten = torch.eye(d).expand(1, hkv, d, d)
    centroids = torch.randn(1, hkv, c, d)
    if twins:
        centroids[:, :, c // 2:] = centroids[:, :, : c // 2]
    books = Codebooks(centroids, whiten, rope, retrieval.wrope_distances(nb, lo=16, hi=1024),
                      ModelShape("t", 1, hq, hkv, d))
    codes_buf = torch.randint(0, c, (n_slots, hkv), dtype=torch.int16)
    slots = torch.randperm(n_slots)[: 4 * length].view(4, length)
    q = torch.randn(4, hq, d)
    budget = retrieval.Budget(0.03, 8, 1 << 30)

    def run(dev, impl, topk_baseline=False):
        kernels = KernelChoice(impl, "test")
        retriever = Retriever(books, rope, slice(0, hkv), n_slots, kernels, dev)
        retriever.codes[0] = codes_buf.to(dev)
        p = retrieval.SelectionPlan.build(seq_lens, budget, 4, 16, dev)
        width = (hq // hkv) * p.kmax
        selection = torch.full((4, hkv, fixed_width + width), 7, dtype=torch.int64, device=dev)
        buffers = kernels.buffers(4, hq, hkv, d, selection.shape[-1], dev, length, p.kmax, retriever.lut_shape)
        retriever.retrieve(0, q.to(dev), (seq_lens - 1).to(dev), d ** -0.5, slots.to(dev), p,
                           selection[..., fixed_width:], buffers)
        if topk_baseline:  # the earlier C++ kernel (per-head nth_element over tokens) on the same LUT
            cpu.extension().retrieve_topk(buffers.lut, retriever.codes[0], slots, p.seq_lens, p.k,
                                          retriever.bounds[: nb - 1], 4, 16, selection[..., fixed_width:])
        assert (selection[..., :fixed_width] == 7).all()  # the fixed part is left alone
        return selection[..., fixed_width:].cpu()

    want = run("cpu", Impl.TORCH)
    assert torch.equal(run(DEV, Impl.TRITON), want)
    if cpu.unavailable_reason() is None:
        assert torch.equal(run("cpu", Impl.CPP), want)  # the histogram kernel
        assert torch.equal(run("cpu", Impl.CPP, topk_baseline=True), want)
    want = want[..., : int((want >= 0).sum(-1).max())]
    # each request retrieves its budget per query head: K..g*K per KV head; the covered one nothing
    count = (want >= 0).sum(-1)
    k = budget.tokens(seq_lens).view(-1, 1)
    assert ((count >= k) & (count <= (hq // hkv) * k))[[0, 2, 3]].all() and (count[1] == 0).all()


@needs_cpp
def test_cpu_kernel_chunks_merge_with_holes_and_empty_chunks():
    """Long selections are split into chunks attended in parallel and merged by
    log-sum-exp: padding anywhere, including a whole empty chunk, changes nothing."""
    k_buf, v_buf = torch.randn(3000, 2, 64), torch.randn(3000, 2, 64)
    q = torch.randn(2, 8, 64)
    slots = torch.randint(0, 3000, (2, 2, 900))
    slots[torch.rand(slots.shape) < 0.1] = -1  # holes
    slots[1, 0, 256:600] = -1  # a whole chunk and more empty
    want_o, want_l = attention.sparse_attention(q, k_buf, v_buf, slots, 0.1)
    got_o, got_l = attend(Impl.CPP, q, k_buf, v_buf, slots, 0.1)
    torch.testing.assert_close(got_o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_l, want_l, atol=1e-5, rtol=1e-5)
