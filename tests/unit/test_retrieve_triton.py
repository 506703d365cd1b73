"""The Triton retrieval (kernels/retrieve.py) against the torch reference: on CUDA when
there is one, otherwise on CPU tensors under TRITON_INTERPRET=1 (set by conftest before
triton is imported)."""

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from a2ats_sglang.core import retrieval
from a2ats_sglang.core.rope import RopeSpec
from a2ats_sglang.kernels import retrieve
from a2ats_sglang.kernels.retrieve import RetrieveBuffers, retrieve_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SINKS, WINDOW, SENTINEL, LEFT = 4, 16, 7, 3  # LEFT: columns of the wider buffer before `out`


def on_cpu(plan):
    return replace(plan, seq_lens=plan.seq_lens.cpu(), k=plan.k.cpu(), fixed=plan.fixed.cpu())


def scores_of(lut, args):
    """The reference's approximate scores [B, Hq, L] of the call's tokens from ``lut`` (CPU)."""
    codes = args["codes_buf"].cpu()[args["slots"].cpu()].permute(0, 2, 1)
    return retrieval.approx_scores(lut, codes, args["plan"].seq_lens.cpu(), args["bounds"].cpu(), SINKS, WINDOW)


def reference(lut, args, r):
    """SelectionPlan.retrieved on the approximate scores of ``lut``, as slots padded to r."""
    slots, hkv = args["slots"].cpu(), args["centroids"].shape[0]
    retrieved = on_cpu(args["plan"]).retrieved(scores_of(lut, args), hkv)
    picked = retrieval.positions_to_slots(retrieval.mask_to_positions(retrieved), slots)
    out = torch.full((*picked.shape[:2], r), -1, dtype=torch.int64)
    out[..., : picked.shape[-1]] = picked
    return out


def case(hq, hkv, nb, budget, seq_lens, d=32, rd=32, neox=True, c=16, twins=False, dtype=torch.float32, scale=0.5):
    """Inputs of one layer's retrieval on the device, and the wider selection buffer holding `out`."""
    seq_lens = torch.tensor(seq_lens)
    b, length = len(seq_lens), int(seq_lens.max())
    rope = RopeSpec(1.0 / 10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd), d, neox)
    distances = retrieval.wrope_distances(nb, lo=16, hi=1024)
    rotation = retrieval.WRoPERotation.build(rope, seq_lens - 1, distances)
    centroids = torch.randn(hkv, c, d)
    if twins:  # equal centroids: different cells of one bucket tie exactly
        centroids[:, c // 2:] = centroids[:, : c // 2]
    n_slots = b * length + 50
    plan = retrieval.SelectionPlan.build(seq_lens, budget, SINKS, WINDOW, DEV)
    r = hq // hkv * plan.kmax
    return dict(
        q=torch.randn(b, hq, d).to(dtype).to(DEV), cos=rotation.cos.to(DEV), sin=rotation.sin.to(DEV), neox=neox,
        centroids=centroids.to(DEV), scale=scale,
        codes_buf=torch.randint(0, c, (n_slots, hkv), dtype=torch.int16).to(DEV),
        slots=torch.randperm(n_slots)[: b * length].view(b, length).to(DEV), plan=plan,
        bounds=retrieval.distance_bounds(distances).to(DEV),
    ), rotation, torch.full((b, hkv, LEFT + r + 2), SENTINEL, dtype=torch.int64, device=DEV)


def run(args, wide):
    hq, hkv = args["q"].shape[1], args["centroids"].shape[0]
    nb, c = args["cos"].shape[1], args["centroids"].shape[1]
    buffers = RetrieveBuffers.allocate(args["q"].shape[0], hq, hkv, nb, c, DEV)
    out = wide[..., LEFT: wide.shape[-1] - 2]
    retrieve_triton(**args, out=out, buffers=buffers)
    return out, buffers


def check(args, rotation, wide, again=False):
    """LUT close to the reference, selection exactly the reference's on that LUT, the wider
    buffer untouched outside `out`, the histogram left zero; ``again``: a second call on the
    same buffers gives the same result."""
    out, buffers = run(args, wide)
    want_lut = retrieval.lookup_table(rotation.apply(args["q"].cpu()), args["centroids"].cpu(), args["scale"])
    torch.testing.assert_close(buffers.lut.cpu(), want_lut, rtol=1e-4, atol=1e-4)
    lut = buffers.lut.cpu()
    want = reference(lut, args, out.shape[-1])
    assert torch.equal(out.cpu(), want)
    assert (wide[..., :LEFT] == SENTINEL).all() and (wide[..., -2:] == SENTINEL).all()
    assert not buffers.hist.any()
    if again:
        out.fill_(SENTINEL)
        retrieve_triton(**args, out=out, buffers=buffers)
        assert torch.equal(out.cpu(), want) and not buffers.hist.any()
    return lut, want


FIXED = retrieval.Budget(0.05, 8, 1 << 30, 0.0)
LENS = [300, 25, 12, 1, 180]  # the 25 is covered by its budget (8 + 4 + 16), the 12 and the 1 by sinks + window


@pytest.mark.parametrize("hq,hkv,nb,twins", [(4, 4, 1, False), (4, 2, 4, True), (9, 3, 3, False),
                                             (16, 2, 1, True)])
def test_fixed_budget_matches_reference(hq, hkv, nb, twins):
    """GQA groups 1, 2, 3, 8; one and several distances; few codes, so many tokens tie in a
    cell, and with ``twins`` across cells too."""
    args, rotation, wide = case(hq, hkv, nb, FIXED, LENS, twins=twins)
    lut, want = check(args, rotation, wide, again=hq == 9)
    if twins:  # the case exercises ties across cells
        c = lut.shape[-1]
        assert torch.equal(lut[..., : c // 2], lut[..., c // 2:])
    count = (want >= 0).sum(-1)
    k = FIXED.tokens(torch.tensor(LENS)).view(-1, 1)
    assert ((count >= k) & (count <= hq // hkv * k))[[0, 4]].all() and (count[1:4] == 0).all()


@pytest.mark.parametrize("top_p,least,most,scale", [(0.05, 6, 1 << 30, 1.0), (0.5, 0, 1 << 30, 1.0), (0.9, 2, 40, 1.0),
                                                    (1.0, 0, 1 << 30, 0.5)])
def test_top_p_matches_reference(top_p, least, most, scale):
    """Adaptive budgets: several masses, the least count binding for some heads at 0.05 and
    the most at 0.9. (At 1.0 the scores' spread stays well inside float64: where the
    weakest tokens' weights fall below the total's rounding, the reference's token-by-token
    sum and the kernel's per-cell sums may stop at different tokens.)"""
    budget = retrieval.Budget(0.5, least, most, top_p)
    args, rotation, wide = case(4, 2, 3, budget, [400, 20, 1, 150], twins=True, scale=scale)
    lut, want = check(args, rotation, wide)
    counts = (want >= 0).sum(-1)
    assert (counts[1:3] == 0).all() and (counts[[0, 3]] > 0).all()
    plan = on_cpu(args["plan"])
    reach = replace(plan, k=plan.seq_lens, min_tokens=0).head_tokens(scores_of(lut, args))[[0, 3]]
    assert (reach < least).any() == (least == 6) and (reach > most).any() == (most == 40)


@pytest.mark.parametrize("neox,d,rd,dtype", [(True, 64, 48, torch.bfloat16), (False, 32, 16, torch.float32),
                                             (False, 48, 32, torch.float16)])
def test_rotary_pairing_and_query_dtype(neox, d, rd, dtype):
    """Rotate-half and interleaved pairing, a partial rotary dim (dims past it pass through;
    pairs across the kernel's 32-dim chunks), 16-bit queries with strided rows."""
    args, rotation, wide = case(6, 2, 2, FIXED, [200, 90], d=d, rd=rd, neox=neox, dtype=dtype)
    args["q"] = torch.cat([args["q"], args["q"]], dim=-1)[..., :d]  # rows of stride 2 * d
    check(args, rotation, wide)


def test_four_launches_no_torch_op(monkeypatch):
    """One call is four kernel launches with no torch op (allocation, fill, sync) between them."""
    args, _, wide = case(4, 2, 2, FIXED, [120, 60])
    out = wide[..., LEFT: wide.shape[-1] - 2]
    buffers = RetrieveBuffers.allocate(2, 4, 2, 2, 16, DEV)
    launches, ops = [], []
    kernel_type = type(retrieve._lut_kernel)
    launch = kernel_type.run

    def counted(self, *a, **kw):
        launches.append(self)
        with _disable_current_modes():
            return launch(self, *a, **kw)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            ops.append(func)
            return func(*a, **(kw or {}))

    monkeypatch.setattr(kernel_type, "run", counted)
    with Ops():
        retrieve_triton(**args, out=out, buffers=buffers)
    assert len(launches) == 4 and not ops, (launches, ops)
