"""The served half of chunk fusion without a server: the client's marks and their checks,
finding chunks in a prompt, the layout the scheduler gets, the radix namespaces, the
extend attention by position (against the plain paged extend) with A³'s attention mass,
and moving a cached chunk's KV to another position in a real pool layout."""

import argparse
import re

import pytest
import torch

from a2ats_sglang.backend.dense import paged_extend_attention
from a2ats_sglang.backend.fused_extend import fused_extend_attention, positional_attention
from a2ats_sglang.config import A2ATSConfig
from a2ats_sglang.core.rope import RopeSpec
from a2ats_sglang.fusion.admission import fused_extra_key
from a2ats_sglang.fusion.marks import ChunkMarks, FusedLayout, FusionMarkError, locate_chunks
from a2ats_sglang.fusion.served import FusedExtend, ScoreStore, base_extra_key
from a2ats_sglang.patches.hooks import fusion_refusals


def test_marks_parsed_with_the_server_default_ratio_and_bad_ones_refused():
    assert ChunkMarks.of(None, 0.15) is None and ChunkMarks.of({"other": 1}, 0.15) is None
    m = ChunkMarks.of({"a2ats_chunks": ["a b", "c"]}, 0.15)
    assert m == ChunkMarks(("a b", "c"), 0.15, "a3") and m.needs_scoring
    assert not ChunkMarks.of({"a2ats_chunks": ["a"], "a2ats_recompute_ratio": 1}, 0.15).needs_scoring
    assert not ChunkMarks.of({"a2ats_chunks": ["a"], "a2ats_fusion_method": "naive"}, 0.15).needs_scoring
    assert ChunkMarks.of({"a2ats_chunks": ["a", "b"], "a2ats_fusion_method": "cacheblend"}, 0.15).needs_scoring
    for params, message in [
        ({"a2ats_chunks": []}, "non-empty list"), ({"a2ats_chunks": "text"}, "non-empty list"),
        ({"a2ats_chunks": ["a", " \n"]}, "a2ats_chunks[1] is empty"),
        ({"a2ats_chunks": ["a"], "a2ats_recompute_ratio": 1.5}, "in [0, 1]"),
        ({"a2ats_chunks": ["a"], "a2ats_recompute_ratio": True}, "in [0, 1]"),
        ({"a2ats_chunks": ["a"], "a2ats_fusion_method": "a3-lut"}, "one of ('a3', 'naive', 'cacheblend')"),
        ({"a2ats_recompute_ratio": 0.2}, "non-empty list"),  # a ratio without chunks
        ({"a2ats_fusion_layout": [0, 0, 0, 1, 2]}, "a2ats_fusion_layout is not a chunk mark"),  # the scheduler's own
    ]:
        with pytest.raises(FusionMarkError, match=re.escape(message)):
            ChunkMarks.of(params, 0.15)


def test_chunks_found_in_order_after_each_other_with_a_question_after():
    prompt = [1, 2, 7, 8, 9, 3, 7, 8, 4, 5]
    assert locate_chunks(prompt, [[7, 8, 9], [7, 8]]) == [(2, 5), (6, 8)]
    assert locate_chunks(prompt, [[7, 8], [7, 8]]) == [(2, 4), (6, 8)]  # the second after the first
    with pytest.raises(FusionMarkError, match=r"a2ats_chunks\[1\] is not in the prompt"):
        locate_chunks(prompt, [[7, 8, 9], [8, 9]])  # only before the first one's end
    with pytest.raises(FusionMarkError, match="no question"):
        locate_chunks(prompt, [[4, 5]])


def test_layout_survives_the_trip_to_the_scheduler():
    layout = FusedLayout(((3, 10), (12, 40)), 0.15, "a3", True, "abc")
    params = layout.to_params()
    assert all(isinstance(x, int) for x in params["a2ats_fusion_layout"])  # JSON scalars: SGLang's custom_params
    back = FusedLayout.of({**params, "other": 1})
    assert back == layout and back.prefix_len == 3 and back.question_start == 40
    assert FusedLayout.of({"other": 1}) is None


@pytest.mark.parametrize("extra", [None, "tenant-7"])
def test_fused_namespace_is_apart_and_maps_back_to_the_plain_one(extra):
    marks = ChunkMarks(("a",), 0.15, "a3")
    fused = fused_extra_key(extra, marks)
    assert fused != extra and fused != fused_extra_key(extra, ChunkMarks(("a",), 0.3, "a3"))
    assert base_extra_key(fused) == extra
    assert base_extra_key(fused + "lora-1") == (extra or "") + "lora-1"  # SGLang appends the LoRA id
    assert base_extra_key(extra) == extra


def test_score_store_keeps_the_newest():
    store = ScoreStore(capacity=2)
    for k in "abc":
        store.put(k, torch.zeros(1))
    assert store.take("a") is None and store.take("c") is not None and store.take("c") is None


def test_positional_extend_equals_the_paged_causal_extend_and_counts_the_question_mass():
    torch.manual_seed(0)
    n_slots, hq, hkv, d = 80, 6, 2, 16
    k_cache, v_cache = torch.randn(n_slots, hkv, d), torch.randn(n_slots, hkv, d)
    req_to_token = torch.randperm(n_slots).view(2, 40)
    seq, prefix, ext = torch.tensor([25, 40]), [5, 0], [20, 40]
    q = torch.randn(sum(ext), hq, d)
    want = paged_extend_attention(q, torch.empty_like(q), k_cache, v_cache, req_to_token, torch.tensor([0, 1]), seq,
                                  prefix, ext, 0.3, True)
    mass = torch.zeros(40)
    fused = FusedExtend([torch.arange(5, 25), torch.arange(0, 40)], [None, (30, mass)])
    got = fused_extend_attention(q, torch.empty_like(q), k_cache, v_cache, req_to_token, torch.tensor([0, 1]), seq,
                                 fused, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert mass.sum().item() == pytest.approx(10 * hq)  # 10 question rows x heads, each a distribution
    # the mass is those rows' attention probabilities
    k = k_cache[req_to_token[1]].movedim(0, 1).repeat_interleave(hq // hkv, 0)
    logits = (q[20 + 30:20 + 40].movedim(0, 1) @ k.transpose(1, 2)) * 0.3
    mask = torch.arange(40).view(1, -1) <= torch.arange(30, 40).view(-1, 1)
    torch.testing.assert_close(mass, torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).sum((0, 1)))


def test_positional_attention_skips_what_is_not_computed():
    """Rows at scattered positions attend to every key at or before their own position:
    the keys in between (copied KV) included, later ones not."""
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 3, 8), torch.randn(2, 30, 8), torch.randn(2, 30, 8)
    positions = torch.tensor([3, 17, 29])
    got = positional_attention(q, k, v, positions, 0.5)
    for row, p in enumerate(positions.tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, row:row + 1], k[:, :p + 1], v[:, :p + 1],
                                                               scale=0.5, enable_gqa=True)
        torch.testing.assert_close(got[:, row:row + 1], ref, atol=1e-6, rtol=1e-5)


class LayerPool:
    """KV laid out as SGLang's token-slot pools: per layer K/V [slots, Hkv, D]."""

    def __init__(self, layers: int, slots: int, heads: int, dim: int):
        self.k = [torch.zeros(slots, heads, dim) for _ in range(layers)]
        self.v = [torch.zeros(slots, heads, dim) for _ in range(layers)]

    def get_key_buffer(self, i):
        return self.k[i]

    def get_value_buffer(self, i):
        return self.v[i]


def test_place_kv_moves_a_chunk_as_if_computed_at_its_new_position():
    """place_kv over a pool laid out as SGLang's ([slots, Hkv, D] per layer): keys rotated at p
    come out as rotated at p + delta, values and codes copied, nothing else written."""
    from a2ats_sglang.backend.fused_extend import place_kv

    rope = RopeSpec(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)), 16)
    pre = torch.randn(2, 6, 2, 16)  # layers x tokens x heads x dim, before rotation
    pos = torch.arange(10, 16)

    class Retriever:
        layers = {0: None, 1: None}
        codes = torch.arange(2 * 40 * 2, dtype=torch.int16).view(2, 40, 2)

        def __init__(self):
            self.rope = rope

        def copy_codes(self, src, dst):
            self.codes[:, dst] = self.codes[:, src]

    pool, retriever = LayerPool(2, 40, 2, 16), Retriever()
    src, dst = torch.arange(0, 6), torch.arange(20, 26)
    for layer in range(2):
        pool.k[layer][src] = rope.rotate(pre[layer], pos.view(-1, 1))
        pool.v[layer][src] = pre[layer] + 1
    codes_before = retriever.codes.clone()
    place_kv(pool, retriever, src, dst, torch.full((6,), 7))
    for layer in range(2):
        torch.testing.assert_close(pool.k[layer][dst], rope.rotate(pre[layer], (pos + 7).view(-1, 1)), atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(pool.v[layer][dst], pre[layer] + 1)
        assert not pool.k[layer][26:].any() and not pool.k[layer][6:20].any()
    assert torch.equal(retriever.codes[:, dst], codes_before[:, src])
    assert torch.equal(retriever.codes[:, 26:], codes_before[:, 26:])


def test_servers_fusion_cannot_serve_with_are_refused_naming_why():
    ns = argparse.Namespace(attention_backend="a2ats", prefill_attention_backend=None, tp_size=1, dp_size=1,
                            pp_size=1, disable_radix_cache=False, enable_mixed_chunk=False, device="cpu")
    cfg = A2ATSConfig(chunk_fusion=True)
    assert fusion_refusals(ns, cfg) == []
    for change, reason in [({"attention_backend": "torch_native"}, "needs --attention-backend a2ats"),
                           ({"tp_size": 2}, "--tp-size 2: one rank only"), ({"dp_size": 2}, "--dp-size 2"),
                           ({"disable_radix_cache": True}, "needs the radix cache"),
                           ({"enable_mixed_chunk": True}, "--enable-mixed-chunk"), ({"device": "cuda"}, "--device cpu")]:
        bad = argparse.Namespace(**{**vars(ns), **change})
        assert any(reason in r for r in fusion_refusals(bad, cfg)), (change, fusion_refusals(bad, cfg))
    assert fusion_refusals(ns, A2ATSConfig(chunk_fusion=True, offload=True)) == []


def test_round_copies_only_what_the_tree_holds_and_computes_the_rest():
    """FusionPlanner's plan of one extend over a tree holding the shared prefix and chunk 1
    whole, chunk 2 only in part (evicted after its first 3 tokens): chunk 1 copied except
    the tokens chosen for recomputation, rotated by its offset; chunk 2 past what is cached
    computed; the question always computed."""
    from array import array

    from a2ats_sglang.fusion.served import FusionPlanner, RequestFusion

    prefix, c1, c2, question = [1, 2], [10, 11, 12, 13], [20, 21, 22, 23, 24], [30, 31]
    ids = array("q", prefix + c1 + c2 + question)  # c1 at 2..5 (offset 0), c2 at 6..10 (offset 4), question 11..12
    layout = FusedLayout(((2, 6), (6, 11)), 0.15, "a3", False, "x")
    cached = {tuple(prefix + c1): torch.arange(100, 106), tuple(prefix + c2): torch.arange(200, 205)}

    class Planner(FusionPlanner):
        @staticmethod
        def _cached_slots(tree, key, extra_key, cache_salt):
            assert extra_key == "tenant" and cache_salt is None
            return cached[tuple(key)]

    recompute = torch.zeros(len(ids), dtype=torch.bool)
    recompute[3] = True  # chosen: c1's second token
    state = RequestFusion(layout, recompute, None)
    req = type("Req", (), {"origin_input_ids": ids, "extra_key": "tenant", "cache_salt": None})()
    slots = torch.arange(500, 513)
    plan = Planner(None, "cpu")._round(req, state, None, slots, 0, 13)
    assert plan.keep.nonzero().squeeze(1).tolist() == [3, 9, 10, 11, 12]
    assert plan.dst.tolist() == [500, 501, 502, 504, 505, 506, 507, 508]
    assert plan.src.tolist() == [100, 101, 102, 104, 105, 202, 203, 204]
    assert plan.delta.tolist() == [0, 0, 0, 0, 0, 4, 4, 4]
    assert (plan.found, plan.missing) == (6, 2)
    later = Planner(None, "cpu")._round(req, state, None, slots[11:], 11, 13)  # a later chunked-prefill round
    assert later.keep.tolist() == [True, True] and later.src.numel() == 0


def test_cacheblend_scoring_pass_scores_each_cached_chunk_token_by_its_kv_deviation():
    """The CacheBlend scoring pass over the tree of the test above: every chunk token computed,
    those cached probed against their cached KV re-positioned (chunk 2 by 4 positions); the
    probe adds each one's squared K/V distance at its prompt position: zero where the fresh
    K/V are the fused ones moved, the perturbation's square where they differ."""
    from array import array

    from a2ats_sglang.backend.fused_extend import placed_kv
    from a2ats_sglang.fusion.served import DeviationProbe, FusionPlanner, RequestFusion

    prefix, c1, c2, question = [1, 2], [10, 11, 12, 13], [20, 21, 22, 23, 24], [30, 31]
    ids = array("q", prefix + c1 + c2 + question)
    layout = FusedLayout(((2, 6), (6, 11)), 0.15, "cacheblend", True, "x")
    cached = {tuple(prefix + c1): torch.arange(0, 6), tuple(prefix + c2): torch.arange(10, 15)}

    class Planner(FusionPlanner):
        @staticmethod
        def _cached_slots(tree, key, extra_key, cache_salt):
            return cached[tuple(key)]

    recompute = torch.zeros(len(ids), dtype=torch.bool)
    recompute[2:11] = True
    state = RequestFusion(layout, recompute, torch.zeros(len(ids)), probe_layer=1)
    req = type("Req", (), {"origin_input_ids": ids, "extra_key": None, "cache_salt": None})()
    plan = Planner(None, "cpu")._round(req, state, None, torch.arange(20, 33), 0, 13)
    assert plan.keep.nonzero().squeeze(1).tolist() == list(range(2, 13)) and plan.src.tolist() == [0, 1]
    assert plan.probed.nonzero().squeeze(1).tolist() == [2, 3, 4, 5, 6, 7, 8]  # c2's last two are not cached
    assert plan.probe_src.tolist() == [2, 3, 4, 5, 12, 13, 14] and (plan.found, plan.missing) == (0, 2)
    assert plan.probe_delta.tolist() == [0, 0, 0, 0, 4, 4, 4]

    rope = RopeSpec(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)), 16)
    torch.manual_seed(3)
    pool, pre = LayerPool(2, 40, 2, 16), torch.randn(7, 2, 16)
    standalone = torch.tensor([2, 3, 4, 5, 2, 3, 4])  # positions in the chunks' own prefills
    pool.k[1][plan.probe_src] = rope.rotate(pre, standalone.view(-1, 1))
    pool.v[1][plan.probe_src] = pre + 1
    positions = plan.probed.nonzero().squeeze(1)
    k, v = placed_kv(pool, rope, 1, plan.probe_src, plan.probe_delta)
    rows = torch.arange(7) + 1  # the batch: one token of another request first
    probe = DeviationProbe(1, rows, positions, k, v, state.scores)
    fresh_k, fresh_v = torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    fresh_k[rows] = rope.rotate(pre, positions.view(-1, 1))
    fresh_v[rows] = pre + 1
    fresh_v[rows[5], 1, 3] += 0.5  # c2's second token
    probe.add(fresh_k, fresh_v)
    want = torch.zeros(len(ids))
    want[7] = 0.25
    torch.testing.assert_close(state.scores, want, atol=1e-4, rtol=0)


def test_backend_refuses_fusion_where_it_cannot_serve():
    from types import SimpleNamespace

    from a2ats_sglang.backend.fused_extend import check_servable
    from a2ats_sglang.backend.layers import ModelAttention

    plain = {i: SimpleNamespace(logit_cap=0.0) for i in range(3)}
    check_servable(ModelAttention(plain, {}))
    with pytest.raises(ValueError, match="sliding window of 512: \\[1\\]"):
        check_servable(ModelAttention(plain, {1: "sliding window of 512"}))
    with pytest.raises(ValueError, match="soft-capping"):
        check_servable(ModelAttention({**plain, 2: SimpleNamespace(logit_cap=30.0)}, {}))


def test_chunk_edges_that_tokenize_differently_inside_the_prompt_are_left_to_compute():
    prompt = [1, 2, 10, 11, 12, 13, 14, 15, 16, 17, 99, 3, 20, 21, 22, 23, 24, 25, 26, 27, 28, 4, 5]
    first = [10, 11, 12, 13, 14, 15, 16, 17, 18]  # its last token merged with the separator (99)
    second = [30, 20, 21, 22, 23, 24, 25, 26, 27, 31]  # its first and last differ inside the prompt
    assert locate_chunks(prompt, [first, second]) == [(2, 10), (12, 20)]
    assert locate_chunks(prompt, [first[:-1], second[1:-1]]) == [(2, 10), (12, 20)]  # whole where it is whole
    with pytest.raises(FusionMarkError, match=r"a2ats_chunks\[0\] is not in the prompt"):
        locate_chunks(prompt, [[10, 11, 12, 18]])  # a short chunk must be there whole
    with pytest.raises(FusionMarkError, match=r"a2ats_chunks\[0\] is not in the prompt"):
        locate_chunks(prompt, [[40, 41, 42] + first[:-1]])  # more than EDGE_TOKENS differ


def test_a_byte_level_bpe_that_merges_punctuation_with_newlines_still_finds_each_chunk():
    """Llama-3's and Qwen2's pre-tokenizer keeps a chunk's closing period together with the
    blank line after it, so a chunk tokenized alone ends with another token than inside the
    prompt (a real BPE, trained here on text with such separators)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    docs = ["The river floods in spring. Farmers plant rice on its banks.",
            "A small town grew around the old mill. Its people trade wool and salt."]
    tok.train_from_iterator([("\n\n".join(docs) + ".\n\n") * 20], trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    prompt = enc("Answer from the documents.\n\n" + "\n\n".join(docs) + "\n\nQuestion: where is the mill?")
    chunks = [enc(d) for d in docs]
    assert any(prompt[i:i + len(c)] == c for c in chunks for i in range(len(prompt))) is False  # none is there whole
    spans = locate_chunks(prompt, chunks)
    for (s, e), c in zip(spans, chunks):
        assert prompt[s:e] == c[:e - s] and e - s == len(c) - 1  # all but the period merged with the newlines
