"""Triton kernels against the torch references: on CUDA when there is one,
otherwise on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported)."""

import pytest
import torch

from a2ats_sglang.core import attention, retrieval
from a2ats_sglang.kernels import cpu
from a2ats_sglang.kernels.dispatch import Impl, KernelChoice
from a2ats_sglang.kernels.merge import merge_states_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_cpp = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason="no C++ compiler for the CPU kernels")


def attend(impl: Impl, q, k_buf, v_buf, slots, scale, cap=0.0):
    """One kernel's attention through the backend's dispatch, into buffers allocated as a batch plan does."""
    kernels = KernelChoice(impl, "test")
    b, hq, _ = q.shape
    buffers = kernels.buffers(b, hq, slots.shape[1], q.shape[-1], v_buf.shape[-1], slots.shape[-1], q.device)
    kernels.attend(q, k_buf, v_buf, slots, scale, cap, buffers)
    return buffers.out.to(q.dtype), buffers.lse


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


def read_buckets(seq_lens, plan, bounds, nb: int) -> torch.Tensor:
    """bool [B, NB]: the WRoPE buckets up to the farthest one a request's scorable positions
    [sinks, n - window) fall in (by distance n - 1 - position), none for a request its budget
    covers; from first principles."""
    out = torch.zeros(len(seq_lens), nb, dtype=torch.bool)
    for b, n in enumerate(seq_lens.tolist()):
        if plan.fixed[b].sum() == n:  # covered
            continue
        farthest = max(int(retrieval.bucket_of(torch.tensor([n - 1 - pos]), bounds)[0])
                       for pos in range(plan.sinks, n - plan.window))
        out[b, : farthest + 1] = True
    return out


def reference_selection(lut, codes_buf, slots, plan, bounds, hkv: int, width: int) -> torch.Tensor:
    """The torch reference's retrieved slots from a given lookup table, -1 padded to ``width``."""
    scores = retrieval.approx_scores(lut, codes_buf[slots].permute(0, 2, 1), plan.seq_lens, bounds, plan.sinks,
                                     plan.window)
    picked = retrieval.positions_to_slots(retrieval.mask_to_positions(plan.retrieved(scores, hkv)), slots)
    out = torch.full((*picked.shape[:2], width), -1, dtype=torch.int64)
    out[..., : picked.shape[-1]] = picked
    return out


BUDGETS = {"fixed": (0.03, 8, 1 << 30, 0.0), "top-p": (0.03, 8, 150, 0.9)}


@pytest.mark.parametrize("dense_below", [0, 400])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("impl", [Impl.CPP, Impl.TRITON])
@pytest.mark.parametrize("hq,hkv,nb,twins", [(8, 2, 4, False), (9, 3, 1, False), (4, 4, 8, False), (16, 2, 3, True)])
def test_retrieve_kernels_match_torch(impl, hq, hkv, nb, twins, budget, dense_below):
    """The backend's whole retrieval step (WRoPE rotation, LUT, scores, per-head counts with
    a fixed or adaptive budget, GQA union) through a kernel choice: its lookup table equals
    the torch path's up to rounding, and its slots, written into a column range of a wider
    selection buffer as the batch plan lays it out, are exactly the torch reference's from
    that table, on ragged requests, one of them covered by its budget; GQA groups of 1 to 8;
    ``twins``: pairs of equal centroids, so that different LUT cells tie too (their tokens
    are cut by position across cells); ``dense_below`` 400: the 300-token request attends
    everything and retrieves nothing. With the C++ kernels, the per-head top-K baseline
    agrees, and the fused decode layer writes the same slots and attends them exactly."""
    from a2ats_sglang.backend.retriever import Retriever
    from a2ats_sglang.core.codebook import Codebooks, ModelShape
    from a2ats_sglang.core.rope import RopeSpec

    if impl is Impl.CPP and cpu.unavailable_reason() is not None:
        pytest.skip("no C++ compiler for the CPU kernels")
    dev = DEV if impl is Impl.TRITON else "cpu"
    d, c, n_slots, fixed_width = 32, 16, 6000, 5  # few codes: many exact ties, broken by position
    seq_lens = torch.tensor([900, 25, 1500, 300])  # 300: its farthest positions in the third of 4 buckets
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
    plan = retrieval.SelectionPlan.build(seq_lens, retrieval.Budget(*BUDGETS[budget]), 4, 16, dense_below=dense_below)
    width = min((hq // hkv) * plan.kmax, length)

    def run(kernels, device):
        retriever = Retriever(books, rope, slice(0, hkv), n_slots, kernels, device)
        retriever.codes[0] = codes_buf.to(device)
        p = retrieval.SelectionPlan.build(seq_lens, retrieval.Budget(*BUDGETS[budget]), 4, 16, device,
                                          dense_below=dense_below)
        selection = torch.full((4, hkv, fixed_width + width), 7, dtype=torch.int64, device=device)
        buffers = kernels.buffers(4, hq, hkv, d, d, selection.shape[-1], device, retriever.lut_shape)
        rotation = retriever.rotation((seq_lens - 1).to(device))
        retriever.retrieve(0, q.to(device), rotation, d ** -0.5, slots.to(device), p, selection[..., fixed_width:],
                           buffers)
        assert (selection[..., :fixed_width] == 7).all()  # the fixed part is left alone
        return selection[..., fixed_width:].cpu(), buffers.lut.cpu(), retriever

    want, want_lut, retriever = run(KernelChoice(Impl.TORCH, "test"), "cpu")
    got, lut, impl_retriever = run(KernelChoice(impl, "test"), dev)
    read = torch.ones_like(lut, dtype=torch.bool)
    if impl is Impl.CPP:  # the C++ table skips the buckets beyond a request's farthest scorable position, and a covered request's
        read = read_buckets(seq_lens, plan, retriever.bounds, nb).view(4, 1, nb, 1).expand_as(lut)
    torch.testing.assert_close(lut[read], want_lut[read], rtol=1e-4, atol=1e-4)
    assert torch.equal(got, reference_selection(lut, codes_buf, slots, plan, retriever.bounds, hkv, width))
    if torch.equal(lut[read], want_lut[read]):
        assert torch.equal(got, want)
    count = (got >= 0).sum(-1)  # per KV head: each query head's count, unioned; the covered request nothing
    most = plan.k.view(-1, 1).clamp_max(seq_lens.view(-1, 1) - 20)
    sparse = [0, 2] if dense_below else [0, 2, 3]
    assert ((count >= plan.min_tokens) & (count <= (hq // hkv) * most))[sparse].all()
    assert (count[[i for i in range(4) if i not in sparse]] == 0).all()
    if impl is not Impl.CPP:
        return
    if not plan.top_p:  # the earlier C++ kernel (per-head nth_element over tokens) on the same LUT
        baseline = torch.full_like(got, 7)
        cpu.extension().retrieve_topk(lut, codes_buf, slots, plan.seq_lens, plan.k, retriever.bounds, 4, 16, baseline)
        assert torch.equal(baseline, got)
    # the fused decode layer (the C++ retriever's one native call): the same slots behind a fixed part,
    # attended exactly
    assert impl_retriever.kernels.impl is Impl.CPP
    k_buf, v_buf = torch.randn(n_slots, hkv, d).bfloat16(), torch.randn(n_slots, hkv, d).bfloat16()
    selection = torch.randint(0, n_slots, (4, hkv, fixed_width + width))
    buffers = impl_retriever.kernels.buffers(4, hq, hkv, d, d, selection.shape[-1], "cpu", retriever.lut_shape)
    counts = torch.tensor([5, 7])  # the layer adds the slots it attends and the context token-heads
    impl_retriever.decode(0, q.bfloat16(), impl_retriever.rotation(seq_lens - 1), d ** -0.5, slots, plan, selection,
                          fixed_width, k_buf, v_buf, 0.0, buffers, counts)
    got_bf16 = reference_selection(buffers.lut, codes_buf, slots, plan, retriever.bounds, hkv, width)
    assert torch.equal(selection[..., fixed_width:], got_bf16)
    assert counts.tolist() == [5 + int((selection >= 0).sum()), 7 + int(seq_lens.sum()) * hkv]
    want_o, want_l = attention.sparse_attention(q.bfloat16().float(), k_buf, v_buf, selection, d ** -0.5)
    torch.testing.assert_close(buffers.out, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buffers.lse, want_l, atol=1e-5, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("rows", [900, "parallel"])
def test_cpu_kernel_chunks_merge_with_holes_and_empty_chunks(rows):
    """Long selections are split into chunks of 256 rows (attended in parallel once the work
    passes the kernels' serial threshold) and merged by log-sum-exp: padding anywhere,
    including a whole empty chunk, changes nothing."""
    if rows == "parallel":  # 4x the threshold: the chunks run on the thread pool
        rows = 4 * cpu.extension().serial_work // (2 * 2 * 4 * 128)
    k_buf, v_buf = torch.randn(3000, 2, 64), torch.randn(3000, 2, 64)
    q = torch.randn(2, 8, 64)
    slots = torch.randint(0, 3000, (2, 2, rows))
    slots[torch.rand(slots.shape) < 0.1] = -1  # holes
    slots[1, 0, 256:600] = -1  # a whole chunk and more empty
    want_o, want_l = attention.sparse_attention(q, k_buf, v_buf, slots, 0.1)
    got_o, got_l = attend(Impl.CPP, q, k_buf, v_buf, slots, 0.1)
    torch.testing.assert_close(got_o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_l, want_l, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,rotary,neox,mscale", [(64, 64, True, 1.0), (40, 24, False, 1.3)])  # off the lanes, partial
@pytest.mark.parametrize("tokens", [1, 37, "parallel"])
@needs_cpp
def test_cpu_encoder_matches_reference(dtype, d, rotary, neox, mscale, tokens):
    """The C++ key encoder (un-rotation and nearest whitened centroid in one call) stores at
    each key's slot the code of the torch path (RopeSpec.unrotate, then LayerCodebook.encode),
    for one decode token, a ragged block of keys, and enough keys to run on the thread pool;
    other slots keep their codes. The two compute cos/sin and the dot products in different
    orders, so a code may differ only where its score ties the reference's to rounding."""
    from a2ats_sglang.core.codebook import LayerCodebook
    from a2ats_sglang.core.rope import RopeSpec

    hkv, c = 3, 100
    if tokens == "parallel":
        tokens = 4 * cpu.extension().serial_work // (c * d) + 5
    rope = RopeSpec(1.0 / 10000 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary), d, neox, mscale)
    a = torch.randn(hkv, d, d) / d ** 0.5
    books = LayerCodebook.build(torch.randn(hkv, c, d), torch.linalg.cholesky(torch.eye(d) + a @ a.transpose(1, 2)), "cpu")
    positions = torch.randint(0, 20000, (tokens,))
    k = rope.rotate(torch.randn(tokens, hkv, d), positions.view(-1, 1)).to(dtype)
    loc = torch.randperm(2 * tokens)[:tokens]
    k_pre = rope.unrotate(k.float(), positions.view(-1, 1))  # keys un-rotated in float32 (both paths)
    want = torch.full((2 * tokens, hkv), -7, dtype=torch.int16)
    want[loc] = books.encode(k_pre)
    got = torch.full_like(want, -7)
    KernelChoice(Impl.CPP, "test").encode(books, rope, k, positions, got, loc)
    assert ((got == -7).all(-1) == (want == -7).all(-1)).all()  # exactly the slots in loc written
    scores = torch.einsum("thd,hcd->thc", k_pre.float(), books.enc_rows) + books.enc_bias
    picked = scores.gather(-1, got[loc].long().unsqueeze(-1)).squeeze(-1)
    best = scores.max(-1).values
    assert torch.all(best - picked <= 1e-5 * best.abs().clamp_min(1.0))  # the nearest, up to rounding
    assert (got == want).float().mean() > 0.99


@needs_cpp
def test_cpp_retrieval_on_the_thread_pool_matches_torch():
    """Contexts long enough that the C++ selection runs on the thread pool select exactly
    the torch reference's slots from the same lookup table."""
    from a2ats_sglang.core.rope import RopeSpec

    hq, hkv, d, c, nb = 8, 2, 32, 64, 4
    length = 2 * cpu.extension().serial_work // (cpu.extension().select_token_work * hkv) + 100
    seq_lens = torch.tensor([length, length - 1000, 40, length - 7])
    slots = torch.randperm(4 * length).view(4, length)
    codes_buf = torch.randint(0, c, (4 * length, hkv), dtype=torch.int16)
    dist = retrieval.wrope_distances(nb, lo=16, hi=4096)
    rope = RopeSpec(1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d), d)
    rotation = retrieval.WRoPERotation.build(rope, seq_lens - 1, torch.tensor(dist, dtype=torch.float32))
    plan = retrieval.SelectionPlan.build(seq_lens, retrieval.Budget(0.03, 8, 1 << 30, 0.0), 4, 16)
    width = (hq // hkv) * plan.kmax
    kernels = KernelChoice(Impl.CPP, "test")
    buffers = kernels.buffers(4, hq, hkv, d, d, width, "cpu", (nb, c))
    out = torch.full((4, hkv, width), 7, dtype=torch.int64)
    bounds = retrieval.distance_bounds(dist)
    kernels.retrieve(torch.randn(4, hq, d), rotation, torch.randn(hkv, c, d), d ** -0.5, codes_buf, slots, plan, bounds,
                     out, buffers)
    assert torch.equal(out, reference_selection(buffers.lut, codes_buf, slots, plan, bounds, hkv, width))


@needs_cpp
@pytest.mark.parametrize("slots_laid", ["scattered", "runs"])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("hq,hkv,c,twins", [(9, 3, 512, False), (8, 1, 512, True), (16, 2, 256, True),
                                            (40, 8, 128, False)])
def test_cpp_selection_at_serving_shapes_matches_torch(hq, hkv, c, twins, budget, slots_laid):
    """At serving shapes (hundreds of codes, 8 WRoPE buckets, thousands of tokens: cells far
    outnumbering the lanes, so every vectorized stage of the C++ selection runs, the threshold
    search narrowing to a window of cells, 16-position blocks with and without cells at a
    head's threshold), the C++ slots are exactly the torch reference's from the same lookup
    table; ``twins``: pairs of equal centroids, so cells of different codes tie exactly;
    ``runs``: each request's slots consecutive runs of the pool (as SGLang allocates a prefill,
    the codes read in blocks) broken every few hundred positions, the last run ending at the
    pool's last slot (a block may not read past the codes)."""
    from a2ats_sglang.core.rope import RopeSpec

    d, nb = 32, 8
    seq_lens = torch.tensor([6000, 2500, 4321])
    length = int(seq_lens.max())
    if slots_laid == "runs":  # runs of 1 to 600 consecutive slots, in shuffled order
        edges = torch.cat([torch.tensor([0]), torch.randint(1, 600, (3 * length,)).cumsum(0)])
        edges = edges[edges < 3 * length].tolist() + [3 * length]
        runs = [torch.arange(a, b) for a, b in zip(edges[:-1], edges[1:])]
        order = torch.randperm(len(runs) - 1).tolist() + [len(runs) - 1]
        slots = torch.cat([runs[i] for i in order]).view(3, length)
    else:
        slots = torch.randperm(3 * length).view(3, length)
    codes_buf = torch.randint(0, c, (3 * length, hkv), dtype=torch.int16)
    centroids = torch.randn(hkv, c, d)
    if twins:
        centroids[:, c // 2:] = centroids[:, : c // 2]
    dist = retrieval.wrope_distances(nb, lo=16, hi=4096)
    rope = RopeSpec(1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d), d)
    rotation = retrieval.WRoPERotation.build(rope, seq_lens - 1, torch.tensor(dist, dtype=torch.float32))
    plan = retrieval.SelectionPlan.build(seq_lens, retrieval.Budget(*BUDGETS[budget]), 8, 64)
    width = (hq // hkv) * plan.kmax
    kernels = KernelChoice(Impl.CPP, "test")
    buffers = kernels.buffers(3, hq, hkv, d, d, width, "cpu", (nb, c))
    out = torch.full((3, hkv, width), 7, dtype=torch.int64)
    bounds = retrieval.distance_bounds(dist)
    kernels.retrieve(torch.randn(3, hq, d), rotation, centroids, d ** -0.5, codes_buf, slots, plan, bounds, out, buffers)
    assert torch.equal(out, reference_selection(buffers.lut, codes_buf, slots, plan, bounds, hkv, width))
    assert ((out >= 0).sum(-1) >= plan.min_tokens).all()
