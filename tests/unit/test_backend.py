"""The backend inside SGLang's own attention test kit (real ReqToTokenPool /
MHATokenToKVPool, backends looked up by registry name), and direct decode
batches checked against a reference selection computed independently."""

import math

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
from sglang.srt.runtime_context import get_parallel
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit
from support.codebooks import make_codebooks

from a2ats_sglang.core import retrieval
from a2ats_sglang.core.codebook import CodebookMismatch
from a2ats_sglang.core.quantizer import assign
from a2ats_sglang.plugin import register

HEAD_DIM = 16


class _TC:
    def skipTest(self, msg):
        pytest.skip(msg)


@pytest.fixture(autouse=True)
def _sglang(request):
    """The plugin registered (as SGLang does in each process: twice is harmless), this
    process stated as tensor-parallel rank 0 of 1 (a server publishes it; not for tests
    marked ``unpublished_rank``), no autograd (the kit fills pools in place, as inference does)."""
    register()
    register()
    rank = {} if request.node.get_closest_marker("unpublished_rank") else {"attn_tp_rank": 0, "attn_tp_size": 1}
    with get_parallel().override(**rank), torch.no_grad():
        yield


@pytest.fixture
def env(monkeypatch, tmp_path):
    def set_books(num_q, num_kv, **cfg):
        books = make_codebooks(1, num_q, num_kv, HEAD_DIM)
        path = tmp_path / f"cb_{num_q}_{num_kv}.safetensors"
        books.save(path)
        monkeypatch.setenv("SGLANG_A2ATS_CODEBOOK", str(path))
        cfg.setdefault("dense_below", 0)  # the kit's sequences are far shorter than any break-even
        for k, v in cfg.items():
            monkeypatch.setenv("SGLANG_A2ATS_" + k.upper(), str(v))
        return books

    return set_books


@pytest.mark.parametrize("case", kit.make_dense_cases("a2ats"), ids=lambda c: c.name)
def test_sglang_kit_dense_cases(env, case):
    """Short sequences fit the budget: a2ats must equal dense attention, on every kit layout."""
    env(case.num_heads, case.num_kv_heads)
    kit.run_dense_attention_case(_TC(), case, head_dim=HEAD_DIM, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("case", kit.make_dense_cases("a2ats_dense"), ids=lambda c: c.name)
def test_sglang_kit_cases_cpu_dense_backend(case):
    """The dense CPU backend (prefix-aware extend) on every kit layout: equal to the kit's reference."""
    kit.run_dense_attention_case(_TC(), case, head_dim=HEAD_DIM, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("case", [c for c in kit.make_dense_cases("a2ats_dense") if c.forward_mode.is_decode()],
                         ids=lambda c: c.name)
def test_cpu_dense_decode_is_the_cpp_kernel_over_every_slot(case):
    """a2ats_dense's decode (the dense baseline) runs the C++ kernel over every slot and
    equals the kit's dense reference to float32 rounding, tighter than the kit's tolerance."""
    from a2ats_sglang.kernels import cpu

    if cpu.unavailable_reason() is not None:
        pytest.skip("no C++ compiler for the CPU kernels: torch_native's decode is used")
    fixture = kit.build_dense_attention_fixture(_TC(), case, head_dim=HEAD_DIM, device="cpu", dtype=torch.float32)
    out = kit.run_dense_fixture_eager(fixture)
    assert fixture.backend.decode_state is not None  # the batch's slots and buffers: the C++ path ran
    torch.testing.assert_close(out, kit.expected_dense_fixture_output(fixture), atol=1e-5, rtol=1e-5)


def reference_selection(books, codes, q_post, n, scale, sinks, window, budget, kv, g):
    """Positions attended by KV head ``kv`` of a request of ``n`` tokens, from first
    principles: each query head of its group scores every token outside sinks and window
    as q (rotated to the WRoPE distance nearest the token's, in log scale) . centroid of
    the token's code, keeps its best K (ties to the earlier position; a fixed budget's K,
    or with top-p the fewest whose softmax mass reaches p, within [min, max] tokens), and
    the group attends the union plus sinks and window; everything when that covers the
    request."""
    least = budget.min_tokens if budget.top_p else min(max(budget.min_tokens, math.ceil(budget.ratio * n)),
                                                       budget.max_tokens)
    if least + sinks + window >= n:
        return set(range(n))
    chosen = set(range(min(sinks, n))) | set(range(max(0, n - window), n))
    d = list(books.distances)
    for h in range(kv * g, (kv + 1) * g):
        q_pre = books.rope.unrotate(q_post[h], n - 1)
        scored = []
        for j in range(sinks, n - window):
            dist = n - 1 - j
            bucket = sum(dist >= math.sqrt(a * b) for a, b in zip(d[:-1], d[1:]))
            q_rot = books.rope.rotate(q_pre, float(d[bucket]))
            scored.append((-float(q_rot @ books.centroids[0, kv, codes[kv, j]]) * scale, j))
        scored.sort()
        k = least
        if budget.top_p:
            probs = torch.tensor([-s for s, _ in scored], dtype=torch.float64).softmax(0).tolist()
            mass, k = 0.0, 0
            while mass < budget.top_p * (1 - 1e-9):
                mass += probs[k]
                k += 1
            k = min(max(k, budget.min_tokens), budget.max_tokens)
        chosen |= {j for _, j in scored[:k]}
    return chosen


def reference_decode(books, fixture, q, sinks, window, budget):
    """Independent reference: codes by brute-force nearest centroid in the whitened
    space, :func:`reference_selection`, exact softmax over the selected positions.
    -> (output [B, Hq * D], attended token-heads)."""
    runner, fb, layer = fixture.runner, fixture.forward_batch, fixture.actual_module.attn
    kbuf = runner.token_to_kv_pool.get_key_buffer(0)
    vbuf = runner.token_to_kv_pool.get_value_buffer(0)
    hq, hkv = layer.tp_q_head_num, layer.tp_k_head_num
    g = hq // hkv
    L, cents = books.whiten[0], books.centroids[0]
    outs, attended = [], 0
    for b in range(fb.batch_size):
        n = int(fb.seq_lens_cpu[b])
        slots = runner.req_to_token_pool.req_to_token[fb.req_pool_indices[b], :n].long()
        k_post, v = kbuf[slots].float(), vbuf[slots].float()  # [n, Hkv, D]
        k_pre = books.rope.unrotate(k_post, torch.arange(n).view(-1, 1))
        codes, _ = assign(k_pre.transpose(0, 1) @ L, cents @ L)  # [Hkv, n]
        qb = q[b].view(hq, HEAD_DIM).float()
        out = torch.empty(hq, HEAD_DIM)
        for kv in range(hkv):
            pos = torch.tensor(sorted(reference_selection(books, codes, qb, n, layer.scaling, sinks, window, budget,
                                                          kv, g)))
            attended += len(pos)
            for h in range(kv * g, (kv + 1) * g):
                logits = (k_post[pos, kv] @ qb[h]) * layer.scaling
                out[h] = logits.softmax(-1) @ v[pos, kv]
        outs.append(out.reshape(-1))
    return torch.stack(outs), attended


def run_sparse_decode(books, case, sinks, window, budget, max_context_len=None):
    """A kit decode case through the a2ats backend with the prefix's codes stored (the kit
    writes the prefix into the pool directly) -> (backend output, reference output,
    attended token-heads of the reference, the backend)."""
    extra = {} if max_context_len is None else {"max_context_len": max_context_len}
    fixture = kit.build_dense_attention_fixture(_TC(), case, head_dim=HEAD_DIM, device="cpu", dtype=torch.float32,
                                                **extra)
    backend, fb, layer = fixture.backend, fixture.forward_batch, fixture.actual_module.attn
    encode_prefix(backend, fixture, case)
    q, k, v = fixture.actual_module.project_qkv(fixture.input_hidden)
    with forward_context(ForwardContext(attn_backend=backend)):
        backend.init_forward_metadata(fb)
        assert backend.forward_metadata.batch.plan is not None  # sparse
        out = layer(q, k, v, fb)  # RadixAttention -> backend, as in a model
    want, attended = reference_decode(books, fixture, q, sinks, window, budget)
    return out, want, attended, backend


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kernel", ["torch", "triton", "cpp"])
def test_sparse_decode_equals_reference_selection(env, page_size, kernel):
    sinks, window = 4, 8
    books = env(4, 2, budget=0.05, min_tokens=4, sinks=sinks, window=window, kernel=kernel)
    case = kit.DenseAttentionCase(
        name="a2ats_sparse", backend="a2ats", forward_mode=ForwardMode.DECODE, num_heads=4, num_kv_heads=2,
        page_size=page_size, prefix_lens=(300, 10, 200),
    )
    out, want, attended, backend = run_sparse_decode(books, case, sinks, window, retrieval.Budget(0.05, 4, 1 << 30, 0.0), 320)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    total = sum(case.seq_lens) * 2
    assert attended < total  # the long requests were really sparse
    assert backend.attended_share() == pytest.approx(attended / total)
    # The short request (11 tokens) fits its budget: its row is exact dense attention.
    assert attended >= 11 * 2 + 2 * (sinks + window + math.ceil(301 * 0.05))


@pytest.mark.parametrize("kernel", ["torch", "triton", "cpp"])
def test_sparse_decode_with_top_p_equals_reference_selection(env, kernel):
    """The adaptive budget through the backend: each query head keeps the fewest best tokens
    reaching half the estimated softmax mass, clamped; the short request stays dense."""
    sinks, window = 4, 8
    budget = retrieval.Budget(0.05, 4, 40, 0.5)
    books = env(4, 2, top_p=0.5, min_tokens=4, max_tokens=40, sinks=sinks, window=window, kernel=kernel)
    case = kit.DenseAttentionCase(
        name="a2ats_top_p", backend="a2ats", forward_mode=ForwardMode.DECODE, num_heads=4, num_kv_heads=2,
        page_size=1, prefix_lens=(300, 10, 200),
    )
    out, want, attended, backend = run_sparse_decode(books, case, sinks, window, budget, 320)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert attended < sum(case.seq_lens) * 2
    assert backend.forward_metadata.batch.plan.top_p == 0.5


SPARSE = dict(budget=0.05, min_tokens=1, sinks=1, window=2)  # a kit sequence of 8-17 tokens keeps 4 of them


@pytest.mark.parametrize("case", kit.make_dense_cases("a2ats"), ids=lambda c: c.name)
def test_sglang_kit_cases_with_a_small_budget(env, case):
    """Every kit layout with a budget far below its sequences: extend stays exact; decode
    attends a strict subset, equal to the independent reference selection."""
    books = env(case.num_heads, case.num_kv_heads, **SPARSE)
    if not case.forward_mode.is_decode():
        kit.run_dense_attention_case(_TC(), case, head_dim=HEAD_DIM, device="cpu", dtype=torch.float32)
        return
    budget = retrieval.Budget(SPARSE["budget"], SPARSE["min_tokens"], 1 << 30, 0.0)
    out, want, attended, _ = run_sparse_decode(books, case, SPARSE["sinks"], SPARSE["window"], budget)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert attended < sum(case.seq_lens) * case.num_kv_heads


def test_mismatched_codebooks_stop_backend_creation(env):
    env(4, 1)  # the model below has 2 KV heads
    case = kit.DenseAttentionCase(name="x", backend="a2ats", forward_mode=ForwardMode.DECODE, num_heads=4,
                                  num_kv_heads=2, page_size=1, prefix_lens=(3,))
    with pytest.raises(CodebookMismatch, match="num_kv_heads: file has 1, model has 2"):
        kit.build_dense_attention_fixture(_TC(), case, head_dim=HEAD_DIM, device="cpu", dtype=torch.float32)


def test_bad_config_is_rejected(env):
    env(4, 2, budget=1.5)
    case = kit.DenseAttentionCase(name="x", backend="a2ats", forward_mode=ForwardMode.DECODE, num_heads=4,
                                  num_kv_heads=2, page_size=1, prefix_lens=(3,))
    with pytest.raises(ValueError, match="budget must be in"):
        kit.build_dense_attention_fixture(_TC(), case, head_dim=HEAD_DIM, device="cpu", dtype=torch.float32)


@pytest.mark.unpublished_rank
def test_a_rank_nobody_published_stops_backend_creation(env):
    """Outside a server nothing says which KV heads are this rank's: creating the backend
    fails, naming the missing rank, instead of silently serving heads 0..Hkv/TP."""
    env(4, 2)
    case = kit.DenseAttentionCase(name="x", backend="a2ats", forward_mode=ForwardMode.DECODE, num_heads=4,
                                  num_kv_heads=2, page_size=1, prefix_lens=(3,))
    with pytest.raises(RuntimeError, match="attn_tp_rank"):
        kit.build_dense_attention_fixture(_TC(), case, head_dim=HEAD_DIM, device="cpu", dtype=torch.float32)


def test_tensor_parallel_kv_head_split():
    from a2ats_sglang.backend.parallel import TensorParallel

    assert [TensorParallel(r, 4).local_kv_heads(8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert [TensorParallel(r, 4).local_kv_heads(2) for r in range(4)] == [slice(0, 1), slice(0, 1), slice(1, 2), slice(1, 2)]
    # query heads per local KV head: the model's group while KV heads split, smaller once they are replicated
    assert [TensorParallel(0, n).local_group(32, 8) for n in (1, 2, 4, 8)] == [4, 4, 4, 4]
    assert [TensorParallel(1, n).local_group(8, 1) for n in (1, 2, 4)] == [8, 4, 2]
    assert TensorParallel(2, 3).local_group(9, 3) == 3 and TensorParallel(3, 4).local_group(16, 2) == 4


@pytest.mark.parametrize("page_size", [1, 16])
def test_offload_extend_is_exact_and_fills_the_resident_windows(env, monkeypatch, page_size):
    """Offload mode on the kit: K/V in the shared host pool (a real CPU worker started),
    extend over cached prefixes equals the kit's dense reference, and afterwards each
    request's resident window holds exactly its sinks and last positions, copied from
    the host pool, though the device-side rows held another request's tokens before."""
    from a2ats_sglang.backend.offloaded import Offload
    from a2ats_sglang.offload.host_pool import HostKVPool

    sinks, window = 4, 8
    monkeypatch.setattr(kit, "MHATokenToKVPool", HostKVPool)
    env(4, 2, sinks=sinks, window=window, offload=True)
    case = kit.DenseAttentionCase(name="a2ats_offload", backend="a2ats", forward_mode=ForwardMode.EXTEND, num_heads=4,
                                  num_kv_heads=2, page_size=page_size, prefix_lens=(0, 40, 15, 2), extend_lens=(30, 12, 1, 3))
    fixture = kit.build_dense_attention_fixture(_TC(), case, head_dim=HEAD_DIM, device="cpu", dtype=torch.float32)
    backend, fb, pool = fixture.backend, fixture.forward_batch, fixture.runner.token_to_kv_pool
    try:
        offload = backend.strategy
        assert isinstance(pool, HostKVPool) and isinstance(offload, Offload) and offload.worker is not None
        res = offload.resident
        for t in res.k + res.v:  # stale: rows last used by other requests
            t.normal_()
        out = kit.run_dense_fixture_eager(fixture)
        torch.testing.assert_close(out, kit.expected_dense_fixture_output(fixture), atol=1e-4, rtol=1e-4)
        req_to_token = fixture.runner.req_to_token_pool.req_to_token
        for b, n in enumerate(case.seq_lens):
            req = fb.req_pool_indices[b]
            pos = torch.tensor(sorted(set(range(min(sinks, n))) | set(range(max(sinks, n - window), n))))
            slots = req_to_token[req, pos].long()
            rows = res.rows(req.expand(len(pos)), pos)
            assert torch.equal(res.k[0][rows], pool.k_buffer[0][slots])
            assert torch.equal(res.v[0][rows], pool.v_buffer[0][slots])
            decode = res.decode_rows(req.view(1), torch.tensor([n]))[0]
            assert sorted(decode[decode >= 0].tolist()) == sorted(rows.tolist())
    finally:
        offload.close()


def test_attended_share_counts_every_sparse_layer(caplog):
    """Layers differ under an adaptive budget: the share is over every recorded layer, and a
    log line reports the batches since the previous one (none before anything was recorded)."""
    import logging

    from a2ats_sglang.backend.planner import AttendedShare, DecodeBatch

    lens = torch.tensor([100, 300])
    batch = DecodeBatch(lens, lens, lens - 1, torch.zeros(2, 300, dtype=torch.int64), None)
    stats = AttendedShare(1, "cpu")
    with caplog.at_level(logging.INFO, logger="a2ats_sglang.backend.planner"):
        stats.batch(batch)  # nothing recorded yet: no line
        stats.counts += torch.tensor([400, 800])  # layer 0: 50 % of 800 token-heads
        stats.counts += torch.tensor([80, 800])  # layer 1: 10 %
        stats.batch(batch)
    assert stats.share == pytest.approx(0.3)
    lines = [r.getMessage() for r in caplog.records if "a2ats decode batch" in r.getMessage()]
    assert len(lines) == 1 and "attended 30.0% of context" in lines[0]


def test_graph_capacity_is_the_widest_any_batch_needs():
    """Brute force over every sequence length: the fixed part of a covered request, sinks +
    window otherwise, all of a request shorter than dense-below; the union of g top-Ks, at most the context."""
    from a2ats_sglang.backend.planner import GraphCapacity

    for budget, sinks, window, dense_below, group in [(retrieval.Budget(0.03, 32, 1 << 30, 0.0), 8, 64, 0, 3),
                                                      (retrieval.Budget(0.2, 4, 50, 0.0), 2, 6, 300, 4),
                                                      (retrieval.Budget(0.05, 16, 1000, 0.9), 4, 16, 0, 8)]:
        context = 2000
        cap = GraphCapacity.of(budget, sinks, window, dense_below, group, context)
        fixed, retrieved = 0, 0
        for n in range(1, context + 1):
            plan = retrieval.SelectionPlan.build(torch.tensor([n]), budget, sinks, window, dense_below=dense_below)
            fixed = max(fixed, int(plan.fixed.sum()))
            retrieved = max(retrieved, 0 if plan.covered else min(group * plan.kmax, n))
        assert (cap.fixed, cap.retrieved) == (fixed, retrieved)


def encode_prefix(backend, fixture, case):
    """Store the codes of the kit's prefix keys (the kit writes the prefix into the pool directly)."""
    fb, layer, runner = fixture.forward_batch, fixture.actual_module.attn, fixture.runner
    kbuf = runner.token_to_kv_pool.get_key_buffer(0)
    for b, n in enumerate(case.prefix_lens):
        slots = runner.req_to_token_pool.req_to_token[fb.req_pool_indices[b], :n].long()
        backend.retriever.encode(layer.layer_id, kbuf[slots].reshape(n, -1), torch.arange(n), slots)


@pytest.mark.parametrize("backend_name", ["a2ats", "a2ats_dense"])
def test_decode_layer_compiles_whole_and_replays_new_batches_without_recompiling(env, backend_name):
    """The graph contract without a server: after the CPU graph runner's hooks (state, one
    captured batch size), a decode layer compiles to one graph (fullgraph: no break) with
    static shapes, equals the eager layer for a batch, then for a batch of other lengths
    (covered, sparse, longer and shorter) planned into the same buffers, with no recompile."""
    from a2ats_sglang.kernels import cpu

    if cpu.unavailable_reason() is not None:
        pytest.skip("no C++ compiler: CPU graphs need the C++ kernels")
    env(4, 2, budget=0.05, min_tokens=4, sinks=4, window=8, kernel="cpp")
    case = kit.DenseAttentionCase(name="graph", backend=backend_name, forward_mode=ForwardMode.DECODE, num_heads=4,
                                  num_kv_heads=2, page_size=1, prefix_lens=(300, 10, 200))
    fixture = kit.build_dense_attention_fixture(_TC(), case, head_dim=HEAD_DIM, device="cpu", dtype=torch.float32,
                                                max_context_len=320)
    backend, fb, layer = fixture.backend, fixture.forward_batch, fixture.actual_module.attn
    if backend_name == "a2ats":
        encode_prefix(backend, fixture, case)
    q, k, v = fixture.actual_module.project_qkv(fixture.input_hidden)
    batches = [fb.seq_lens.clone(), torch.tensor([120, 301, 11]), torch.tensor([9, 250, 201])]

    def run(step, lens):
        fb.seq_lens.copy_(lens)
        fb.seq_lens_cpu.copy_(lens)
        fb.positions.copy_(lens - 1)
        with forward_context(ForwardContext(attn_backend=backend)):
            backend.init_forward_metadata(fb)
            return step(q, k, v).clone()

    eager = lambda q, k, v: layer(q, k, v, fb)  # noqa: E731
    want = [run(eager, lens) for lens in batches]
    assert not torch.equal(want[0], want[1])
    backend.init_cpu_graph_state(4, 4)
    backend.init_forward_metadata_capture_cpu_graph(3, 3, fb.req_pool_indices, fb.seq_lens, fb.out_cache_loc, None,
                                                    fb.forward_mode, None)
    torch._dynamo.reset()
    compiled = torch.compile(eager, fullgraph=True, dynamic=False)
    got = [run(compiled, batches[0])]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got += [run(compiled, lens) for lens in batches[1:]]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_model_attention_names_the_layers_that_stay_dense_and_their_reason():
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

    from a2ats_sglang.backend.layers import ModelAttention

    kinds = [dict(sliding_window_size=511), dict(), dict(sliding_window_size=511), dict(logit_cap=30.0),
             dict(is_cross_attention=True), dict(attn_type=AttentionType.ENCODER_ONLY), dict(use_irope=True)]
    model = torch.nn.ModuleList([RadixAttention(4, 64, 0.125, 2, layer_id=i, **kw) for i, kw in enumerate(kinds)])
    att = ModelAttention.of(model)
    assert att.sparse == [1, 3] and att.logit_caps == {3: 30.0}
    assert att.dense == {0: "sliding window of 511", 2: "sliding window of 511", 4: "cross-attention",
                         5: "encoder_only attention", 6: "chunked local attention"}
    assert att.describe() == ("2 of 7 attention layers retrieve, the others stay dense (sliding window of 511: [0, 2]; "
                              "cross-attention: [4]; encoder_only attention: [5]; chunked local attention: [6])")
    assert ModelAttention.of(torch.nn.ModuleList(model[i] for i in (1, 3))).describe() == "all 2 attention layers retrieve"
