"""Chunk-KV fusion's reference engine and selection rules, on a small random Llama (GQA,
3 layers) and on the default model."""

import pytest
import torch

from a2ats_sglang.fusion.reference import FusedPrompt, FusionEngine
from a2ats_sglang.fusion.selection import A3, A3Lut, CacheBlend, Naive, lut_attention_scores, top_ratio


@pytest.fixture(scope="module")
def engine():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=4096, rope_theta=10000.0)
    cfg._attn_implementation = "sdpa"  # the question's attention is read with eager, switched on for that pass
    return FusionEngine(LlamaForCausalLM(cfg).float())


def prompt(seed=1, chunks=(30, 20, 25), prefix=5, question=6) -> FusedPrompt:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 97, (n,), generator=g).tolist()  # noqa: E731
    return FusedPrompt(ids(prefix), [ids(n) for n in chunks], ids(question))


def test_position_recovery_equals_computing_the_chunk_at_its_new_place(engine):
    """A chunk's KV computed after the prefix at P..., moved to P + offset, equals the same
    tokens computed at positions shifted by the offset (RoPE is relative): keys rotated,
    values unchanged, at every layer (float32 rounding of the angles aside)."""
    p = prompt()
    prefix, chunk = p.prefix, p.chunks[1]
    moved = engine.fused_kv(FusedPrompt(prefix, [p.chunks[0], chunk], p.question))
    offset = len(p.chunks[0])
    _, direct = engine.run(prefix + chunk, range(offset, offset + len(prefix) + len(chunk)), None)
    for (mk, mv), (dk, dv) in zip(moved, direct):
        got_k, got_v = mk[:, :, len(prefix) + offset:], mv[:, :, len(prefix) + offset:]
        torch.testing.assert_close(got_k, dk[:, :, len(prefix):], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got_v, dv[:, :, len(prefix):], atol=2e-5, rtol=1e-4)
    # and without the move the keys would be wrong: the test can fail
    k_unmoved = engine.chunk_kv(prefix, chunk)[0][0]
    assert not torch.allclose(k_unmoved, direct[0][0][:, :, len(prefix):], atol=1e-3)


def test_layer_zero_of_the_fused_kv_is_exact(engine):
    """Layer 0's K/V depend on each token and its position only: fused = full prompt's;
    from layer 1 on cross-chunk attention makes them differ (what fusion approximates)."""
    ctx = engine.measurements(prompt())
    for a, b in zip(ctx.fused_kv(0), ctx.fresh_kv(0)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    fk, _ = ctx.fused_kv(1)
    rk, _ = ctx.fresh_kv(1)
    assert not torch.allclose(fk, rk, atol=1e-3)


def test_cacheblend_fresh_kv_equals_the_full_prefill_at_that_layer(engine):
    """The early-layer K/V CacheBlend compares against are the full prompt's, though only
    layers 0 ... layer ran (the pre-hook stops the rest and is removed after)."""
    p = prompt()
    ctx = engine.measurements(p)
    full = engine.full(p)
    k, v = ctx.fresh_kv(1)
    torch.testing.assert_close(k, full.kv[1][0][0, :, ctx.chunk_positions], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v, full.kv[1][1][0, :, ctx.chunk_positions], atol=1e-5, rtol=1e-4)
    assert ctx.token_layers == (p.chunk_end - len(p.prefix)) * 2
    assert not engine.model.model.layers[2]._forward_pre_hooks  # the stop hook is gone


@pytest.mark.parametrize("method", [A3(), CacheBlend(), Naive()], ids=lambda m: m.name)
def test_recomputing_everything_is_the_full_prefill(engine, method):
    """ratio 1: every chunk token recomputed at its true position over fresh K/V only: the
    full prefill's logits, KV and greedy tokens (Naive recomputes nothing: it must differ)."""
    p = prompt(seed=2)
    full = engine.full(p)
    fused = engine.prefill(p, method, 1.0)
    assert engine.model.config._attn_implementation == "sdpa"  # eager only for A³'s question pass
    if isinstance(method, Naive):
        assert not torch.allclose(fused.logits, full.logits, atol=1e-3)
        return
    torch.testing.assert_close(fused.logits, full.logits, atol=1e-4, rtol=1e-4)
    for (a, b), (c, d) in zip(fused.kv, full.kv):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b, d, atol=1e-4, rtol=1e-4)
    assert engine.greedy(fused, 6) == engine.greedy(full, 6)


def test_recomputed_tokens_replace_their_fused_kv_and_nothing_else(engine):
    """A partial recompute: chosen positions get new K/V (the question's too), the others keep
    the fused K/V bit for bit; the cost counts the recomputed tokens x layers."""
    p = prompt(seed=3)
    ctx_fused = engine.fused_kv(p)
    chosen = torch.tensor([len(p.prefix) + 3, len(p.prefix) + 40, len(p.prefix) + 70])
    out = engine.recompute(p, ctx_fused, chosen)
    keep = torch.ones(p.chunk_end, dtype=torch.bool)
    keep[chosen] = False
    for (k, v), (fk, fv) in zip(out.kv, ctx_fused):
        assert torch.equal(k[:, :, :p.chunk_end][:, :, keep], fk[:, :, keep])
        assert torch.equal(v[:, :, :p.chunk_end][:, :, keep], fv[:, :, keep])
    assert not torch.allclose(out.kv[2][1][:, :, chosen], ctx_fused[2][1][:, :, chosen], atol=1e-4)
    assert out.length == len(p.ids)
    assert out.token_layers == (3 + len(p.question)) * 3


def test_top_ratio_takes_the_highest_and_ties_to_the_earlier():
    s = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.5])
    assert top_ratio(s, 0.4).tolist() == [1, 3]  # 2 of 5: 0.9, then the first 0.5
    assert top_ratio(s, 0.0).tolist() == []
    assert top_ratio(s, 1.0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="recompute ratio must be in"):
        top_ratio(s, 1.5)
    exact = torch.tensor([False, False, False, True, False])
    assert top_ratio(s, 0.4, exact).tolist() == [1, 2]  # the budget counts all 5, spent off the exact one
    assert top_ratio(s, 1.0, exact).tolist() == [0, 1, 2, 4]


def test_bad_prompts_and_settings_are_refused():
    with pytest.raises(ValueError, match="no empty chunk"):
        FusedPrompt([1], [[2], []], [3])
    with pytest.raises(ValueError, match="needs a question"):
        FusedPrompt([1], [[2]], [])
    with pytest.raises(ValueError, match="layer 0's are exact"):
        CacheBlend(layer=0)


def test_a3_recomputes_the_planted_fact_on_the_default_model(default_model_dir):
    """On the default model, with a fact planted in one of four Wikipedia chunks, A³ at 10 %
    recomputes most of the fact's tokens (chance: 10 %), and its first-token distribution is
    closer to the full prefill's than plain concatenation's. Scored through the lookup table
    with the model's codebooks (A3Lut) it chooses most of the same tokens (chance: 10 %),
    though not the fact's rare tokens, which the codebook's centroids do not tell apart
    (BENCHMARKS.md §20)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from a2ats_sglang.calibration.texts import long_text
    from a2ats_sglang.core.codebook import Codebooks, default_codebook_path

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    engine = FusionEngine(model)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    fact = " The secret code of Zorblat is 7319. "
    docs = [long_text(900, offset=200 + 30 * i)[:900] + "\n\n" for i in range(4)]
    docs[2] = docs[2][:400] + fact + docs[2][400:]
    p = FusedPrompt(enc("Answer from the documents.\n\n"), [enc(d) for d in docs],
                    enc("Question: What is the secret code of Zorblat?\nAnswer: The secret code of Zorblat is"))
    spans = tok(docs[2], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    fact_pos = torch.tensor([p.chunk_starts[2] + i for i, (a, b) in enumerate(spans) if a < 400 + len(fact) and b > 400])
    ctx = engine.measurements(p)
    chosen = A3().choose(ctx, 0.1)
    assert torch.isin(fact_pos, chosen).float().mean() >= 0.5, tok.decode(torch.tensor(p.ids)[chosen])
    by_lut = A3Lut(Codebooks.load(default_codebook_path(default_model_dir))).choose(ctx, 0.1)
    assert torch.isin(by_lut, chosen).float().mean() >= 0.5

    def kl(result, full):
        return torch.nn.functional.kl_div(result.logits.log_softmax(-1), full.logits.log_softmax(-1), log_target=True,
                                          reduction="sum")

    full = engine.full(p)
    assert kl(engine.prefill(p, A3(), 0.1), full) < kl(engine.prefill(p, Naive(), 0.1), full)


@pytest.mark.parametrize("neox", [True, False])
def test_lut_scores_equal_exact_attention_when_every_key_is_its_own_centroid(neox):
    """With one centroid per chunk key (its pre-RoPE key; no whitening) and a WRoPE distance
    for every distance in use, the lookup table's logits are the exact ones, so the LUT-scored
    relevance equals the question's exact attention mass on each chunk token (softmax over
    the prefix's and the chunks' keys)."""
    from a2ats_sglang.core.codebook import LayerCodebook
    from a2ats_sglang.core.rope import RopeSpec

    torch.manual_seed(3)
    hkv, g, d, prefix, n, tq = 2, 3, 16, 4, 40, 5
    rope = RopeSpec(1.0 / 100.0 ** (torch.arange(0, d, 2).float() / d), d, neox)
    length = prefix + n
    pre = torch.randn(hkv, length, d)
    keys = rope.rotate(pre, torch.arange(length).view(1, -1))  # post-RoPE, prompt order
    q_pos = torch.arange(length, length + tq)
    q = rope.rotate(torch.randn(hkv * g, tq, d), q_pos.view(1, -1))
    chunk = torch.arange(prefix, length)
    book = LayerCodebook.build(pre[:, chunk], torch.eye(d).expand(hkv, d, d), "cpu")
    distances = list(range(1, length + tq))
    got = lut_attention_scores(q, q_pos, keys, chunk, book, rope, distances, 0.25)

    logits = 0.25 * q @ keys.repeat_interleave(g, 0).transpose(1, 2)  # [Hq, Tq, L]
    want = logits.softmax(-1)[..., chunk].sum(dim=(0, 1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, want.flip(0))  # the test would see tokens swapped
