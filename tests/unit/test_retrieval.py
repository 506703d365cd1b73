import math

import pytest
import torch

from a2ats_sglang.core.retrieval import (
    Budget,
    SelectionPlan,
    WRoPERotation,
    approx_scores,
    bucket_of,
    distance_bounds,
    lookup_table,
    mask_to_positions,
    retrieval_break_even,
    select,
    wrope_distances,
)


def test_budget_policy_and_validation():
    b = Budget(0.03, 10, 100, 0.0)
    assert b.tokens(torch.tensor([100, 1000, 10000])).tolist() == [10, 30, 100]
    assert b.least_tokens(torch.tensor([100, 1000, 10000])).tolist() == [10, 30, 100]
    adaptive = Budget(0.03, 10, 100, 0.9)  # per-head counts decided by the scores, within [min, max]
    assert adaptive.tokens(torch.tensor([5, 50, 500])).tolist() == [10, 50, 100]
    assert adaptive.least_tokens(torch.tensor([5, 50, 500])).tolist() == [10, 10, 10]
    for bad in [(0.0, 1, 2, 0.0), (1.5, 1, 2, 0.0), (0.1, 5, 2, 0.0), (0.1, -1, 2, 0.0), (0.1, 1, 2, 1.5), (0.1, 1, 2, -0.1)]:
        with pytest.raises(ValueError):
            Budget(*bad)


def test_budget_defaults_come_from_the_options_table():
    from dataclasses import fields

    from a2ats_sglang.config import A2ATSConfig

    with pytest.raises(TypeError):
        Budget(0.03)  # no defaults of its own
    d = {f.name: f.default for f in fields(A2ATSConfig)}
    assert A2ATSConfig().budget_policy == Budget(d["budget"], d["min_tokens"], d["max_tokens"], d["top_p"])
    assert A2ATSConfig(budget=0.5, min_tokens=3, max_tokens=7).budget_policy == Budget(0.5, 3, 7, 0.0)


def test_wrope_distances_and_buckets():
    assert wrope_distances(1) == (2048,)
    d = wrope_distances(8)
    assert d[0] == 96 and d[-1] == 12288 and len(d) == 8
    bounds = distance_bounds(d)
    dist = torch.tensor([0, 96, 135, 136, 200, 100000])
    got = bucket_of(dist, bounds).tolist()
    want = [min(range(8), key=lambda i: (round(abs(math.log(max(x, 1) / d[i])), 9), -i)) for x in dist.tolist()]
    assert got == want


def brute_scores(lut, codes, seq_lens, distances, sinks, window):
    b, hq, nb, c = lut.shape
    hkv, length = codes.shape[1:]
    g = hq // hkv
    out = torch.full((b, hq, length), float("-inf"))
    for bi in range(b):
        n = int(seq_lens[bi])
        for h in range(hq):
            for j in range(sinks, n - window):
                dist = n - 1 - j
                nb_i = min(range(nb), key=lambda i: (round(abs(math.log(max(dist, 1) / distances[i])), 9), -i))  # ties: larger
                out[bi, h, j] = lut[bi, h, nb_i, codes[bi, h // g, j]]
    return out


def test_approx_scores_match_brute_force_with_buckets():
    distances = (4, 16, 64)
    b, hq, hkv, c, length = 2, 4, 2, 8, 90
    lut = torch.randn(b, hq, 3, c)
    codes = torch.randint(0, c, (b, hkv, length), dtype=torch.int16)
    seq_lens = torch.tensor([90, 41])
    got = approx_scores(lut, codes, seq_lens, distance_bounds(distances), 2, 3)
    torch.testing.assert_close(got, brute_scores(lut, codes, seq_lens, distances, 2, 3))


def test_lookup_table_uses_each_heads_kv_group():
    q = torch.randn(1, 4, 2, 8)
    cents = torch.randn(2, 5, 8)
    lut = lookup_table(q, cents, 0.5)
    assert lut.shape == (1, 4, 2, 5)
    torch.testing.assert_close(lut[0, 3, 1], 0.5 * cents[1] @ q[0, 3, 1])
    torch.testing.assert_close(lut[0, 0, 0], 0.5 * cents[0] @ q[0, 0, 0])


def test_select_union_sinks_window_and_padding():
    b, hq, hkv, length = 2, 4, 2, 200
    scores = torch.randn(b, hq, length)
    seq_lens = torch.tensor([200, 150])
    sinks, window = 4, 8
    pos = torch.arange(length)
    scorable = (pos >= sinks) & (pos < seq_lens.view(-1, 1) - window)
    scores = scores.masked_fill(~scorable.unsqueeze(1), float("-inf"))
    budget = Budget(0.05, 1, 1000, 0.0)
    got = select(scores, seq_lens, budget, sinks, window, hkv)
    for bi in range(b):
        n = int(seq_lens[bi])
        k = math.ceil(n * 0.05)
        for kv in range(hkv):
            want = set(range(sinks)) | set(range(n - window, n))
            for h in range(kv * 2, kv * 2 + 2):
                want |= set(scores[bi, h, :n].topk(k).indices.tolist())
            row = got[bi, kv]
            assert sorted(want) == row[row >= 0].tolist()
            assert (row[len(want):] == -1).all()


@pytest.mark.parametrize("p", [0.3, 0.8, 0.99, 1.0])
def test_top_p_takes_the_fewest_best_tokens_reaching_the_mass(p):
    """Adaptive budget from first principles: per query head, softmax the approximate scores
    of the scorable tokens, walk them best first and stop once the mass reaches p; then
    clamp to [min_tokens, max_tokens]. A skewed head needs few tokens, a flat one many."""
    torch.manual_seed(0)
    b, hq, hkv, length, sinks, window = 2, 4, 2, 300, 4, 8
    scores = torch.randn(b, hq, length) * torch.tensor([0.3, 1.0, 3.0, 6.0]).view(1, -1, 1)
    seq_lens = torch.tensor([300, 220])
    pos = torch.arange(length)
    scorable = (pos >= sinks) & (pos < seq_lens.view(-1, 1) - window)
    scores = scores.masked_fill(~scorable.unsqueeze(1), float("-inf"))
    lo, hi = 5, 150
    plan = SelectionPlan.build(seq_lens, Budget(0.03, lo, hi, p), sinks, window)
    got = plan.retrieved(scores, hkv)
    counts = []
    for bi in range(b):
        n = int(seq_lens[bi])
        for kv in range(hkv):
            want = set()
            for h in range(kv * 2, kv * 2 + 2):
                row = scores[bi, h, sinks : n - window]
                probs = torch.softmax(row.double(), 0)
                order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))
                mass, k = 0.0, 0
                while mass < p * float(probs.sum()) * (1 - 1e-12) and k < len(order):
                    mass += float(probs[order[k]])
                    k += 1
                k = min(max(k, lo), hi)
                counts.append(k)
                want |= {sinks + i for i in order[:k]}
            assert sorted(want) == got[bi, kv].nonzero().flatten().tolist()
    assert p == 1.0 or min(counts) < max(counts)  # the count follows each head's distribution


def test_top_p_bounds_and_covered_requests():
    torch.manual_seed(1)
    budget = Budget(0.03, 40, 1000, 0.5)
    plan = SelectionPlan.build(torch.tensor([100, 30]), budget, 4, 8)
    assert plan.fixed_host[1, :30].all() and not plan.fixed_host[0].all()  # 40 + 12 >= 30: covered
    assert plan.k.tolist() == [100, 40] and plan.kmax == 100


def test_requests_below_dense_below_attend_everything_the_rest_retrieve():
    budget = Budget(0.03, 8, 1000, 0.0)
    plan = SelectionPlan.build(torch.tensor([300, 120, 119]), budget, 4, 8, dense_below=120)
    alone = SelectionPlan.build(torch.tensor([300, 120]), budget, 4, 8)
    assert plan.k.tolist() == [9, 8, 0] and plan.fixed_host[2, :119].all() and not plan.covered
    assert torch.equal(plan.fixed_host[:2, :], alone.fixed_host) and plan.kmax == alone.kmax
    scores = torch.randn(3, 2, 300)
    scores[:, :, 119:] = float("-inf")
    got = plan.retrieved(scores, 1)
    assert not got[2].any() and torch.equal(got[:2], alone.retrieved(scores[:2], 1))
    assert SelectionPlan.build(torch.tensor([119, 50]), budget, 4, 8, dense_below=120).covered


def test_retrieval_break_even_from_the_lookup_table_and_budget():
    """Dense costs 2 L dot products per query head, retrieval (WRoPE buckets read) x C + 2 x
    attended; the break-even is the length from which retrieval always costs less."""
    one_token = Budget(1e-9, 1, 1, 0.0)  # one token per query head: attended = g + sinks + window

    def costs(lens, used, c, g, sinks, window):
        return used * c + 2 * min(lens, g + sinks + window), 2 * lens

    # one distance: C + 2 (g + s + w) < 2 L from L = C/2 + g + s + w + 1 on
    assert retrieval_break_even((2048,), 512, one_token, 0, 1, 1, 10_000) == 256 + 2 + 1
    assert retrieval_break_even((2048,), 512, one_token, 4, 8, 3, 10_000) == 256 + 15 + 1
    # a second bucket read from distance 139 (the geometric midpoint of 96 and 200) on: 2 C, paid from 515
    two = (96, 200)
    assert retrieval_break_even(two, 512, one_token, 0, 1, 1, 10_000) == 515
    for n in (259, 514):
        sparse, dense = costs(n, 2 if n - 1 >= math.sqrt(96 * 200) else 1, 512, 1, 0, 1)
        assert sparse >= dense  # short of the break-even, by its own rule
    # more codes or wider groups push it out; a server whose longest sequence never pays stays dense
    default = Budget(0.03, 32, 1 << 30, 0.0)
    eight = wrope_distances(8)
    assert (retrieval_break_even(eight, 512, default, 8, 64, 1, 1 << 17)
            < retrieval_break_even(eight, 512, default, 8, 64, 8, 1 << 17)
            < retrieval_break_even(eight, 4096, default, 8, 64, 8, 1 << 17))
    assert retrieval_break_even(eight, 4096, default, 8, 64, 8, 2000) == 2001


def test_budget_covering_the_sequence_selects_everything():
    scores = torch.randn(1, 2, 50)
    got = select(scores, torch.tensor([50]), Budget(0.9, 1, 1000, 0.0), 2, 4, 1)
    assert got[0, 0].tolist() == list(range(50))


def test_mask_to_positions():
    m = torch.tensor([[True, False, True, False], [False, False, False, True]])
    assert mask_to_positions(m).tolist() == [[0, 2], [3, -1]]


def test_tiebreak_keys_order_like_scores_and_prefer_earlier_positions():
    from a2ats_sglang.core.retrieval import scores_with_position_tiebreak

    s = torch.tensor([[1.5, -2.0, 1.5, float("-inf"), 0.0, -0.0, 3.0, -1e-30]])
    key = scores_with_position_tiebreak(s)
    order = key.argsort(descending=True)[0].tolist()
    assert order[:3] == [6, 0, 2]  # 3.0, then the tied 1.5s, earlier first
    assert order[-1] == 3 and order[-2] == 1  # -inf last, -2.0 before it
    # a padded batch selects the same tokens
    sel1 = select(s[:, None].expand(1, 2, -1), torch.tensor([8]), Budget(0.25, 1, 1000, 0.0), 0, 1, 1)
    pad = torch.cat([s, torch.full((1, 5), float("-inf"))], -1)
    sel2 = select(pad[:, None].expand(1, 2, -1), torch.tensor([8]), Budget(0.25, 1, 1000, 0.0), 0, 1, 1)
    assert sel1.tolist() == sel2[..., : sel1.shape[-1]].tolist()


@pytest.mark.parametrize("neox,mscale,rotary", [(True, 1.0, 16), (False, 1.3, 12)])
def test_wrope_rotation_equals_unrotate_then_rotate(neox, mscale, rotary):
    """WRoPE queries are RoPE(q_pre, distance) with q_pre = RoPE^-1(q_post, pos), computed as
    one rotation: same result for partial rotary dims and a magnitude factor (yarn)."""
    from a2ats_sglang.core.rope import RopeSpec

    rope = RopeSpec(1.0 / 500 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary), 16, neox, mscale)
    q_post = torch.randn(3, 4, 16)
    positions = torch.tensor([5, 900, 4000])
    distances = (96, 2048)
    got = WRoPERotation.build(rope, positions, distances).apply(q_post)
    q_pre = rope.unrotate(q_post, positions.view(-1, 1))
    want = torch.stack([rope.rotate(q_pre, float(d)) for d in distances], dim=2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
