"""A³ chunk fusion in a real server (``--a2ats-chunk-fusion``) on the default model: what a
fused request computes and reuses (read from the scheduler's log line per request), that
recomputing everything is the full prefill, chunk reuse across orders and questions,
concurrency with plain requests, chunks evicted before use, bad marks, and refused servers."""

import concurrent.futures as cf
import re

import pytest
import requests
from support.serving import SERVER_ARGS

from a2ats_sglang.harness.rag import RagPrompt, paragraphs, rag_prompt
from a2ats_sglang.harness.server import launch_server, run_server_expecting_failure

pytestmark = pytest.mark.server
FUSION = ["--a2ats-chunk-fusion"]


@pytest.fixture(scope="module")
def pool(default_model_dir):
    from transformers import AutoTokenizer

    return paragraphs(AutoTokenizer.from_pretrained(default_model_dir), 8, 200, 320)


def ask(srv, prompt: RagPrompt, marks: dict | None, rid: str | None = None, max_new_tokens: int = 8, **body):
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0}
    if marks is not None:
        sampling["custom_params"] = marks
    payload = {"text": prompt.text, "sampling_params": sampling, **body}
    if rid:
        payload["rid"] = rid
    return requests.post(srv.url + "/generate", json=payload, timeout=600)


def fused_line(srv, rid: str, kind: str = "final") -> dict:
    """The scheduler's account of request ``rid``'s extend (``kind``: final, scoring pass)."""
    m = re.findall(rf"a2ats fusion: request {re.escape(rid)} \({kind}\) positions (\d+)-(\d+): (\d+) computed, (\d+) "
                   rf"chunk tokens reused, (\d+) of the shared prefix copied, (\d+) chunk tokens not cached; chosen "
                   rf"for recomputation per chunk \[([\d, ]*)\]", srv.log())
    assert len(m) == 1, m
    first, last, computed, reused, prefix, missing = map(int, m[0][:6])
    return {"tokens": last - first + 1, "computed": computed, "reused": reused, "prefix": prefix, "missing": missing,
            "chosen": [int(x) for x in m[0][6].split(",")]}


def test_recomputing_everything_is_the_full_prefill(fusing, pool):
    """r = 1: every chunk token recomputed (the shared prefix copied exactly): the same
    greedy tokens as the plain request, through /generate and the chat API."""
    for seed in (0, 1):
        p = rag_prompt(pool, 4, seed)
        plain = ask(fusing, p, None, max_new_tokens=12).json()
        fused = ask(fusing, p, p.marks(ratio=1.0), rid=f"full-{seed}", max_new_tokens=12).json()
        assert fused["text"] == plain["text"] and plain["text"].strip()
        line = fused_line(fusing, f"full-{seed}")
        assert line["reused"] == 0 and line["computed"] + line["prefix"] == line["tokens"]
    p = rag_prompt(pool, 3, 5)
    msgs = [{"role": "user", "content": p.text}]
    body = {"model": "default", "messages": msgs, "temperature": 0, "max_tokens": 12}
    plain = requests.post(fusing.url + "/v1/chat/completions", json=body, timeout=600).json()
    fused = requests.post(fusing.url + "/v1/chat/completions", json={**body, "custom_params": p.marks(ratio=1.0)},
                          timeout=600).json()
    assert fused["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_chunks_reused_in_other_orders_and_the_planted_fact_answered(fusing, pool):
    """The same documents in another order behind another question: every chunk token found
    in the radix tree, only the default share recomputed, the planted code still answered."""
    first = rag_prompt(pool, 4, 10)  # fact in one chunk
    second = RagPrompt(tuple(reversed(first.chunks)), first.question, first.answer)
    for i, p in enumerate((first, second)):
        plain = ask(fusing, p, None).json()["text"]
        fused = ask(fusing, p, p.marks(), rid=f"order-{i}").json()["text"]
        assert p.answer in plain and p.answer in fused, (plain, fused)
    line = fused_line(fusing, "order-1")
    assert line["missing"] == 0 and line["reused"] > 0.6 * line["tokens"]
    assert line["computed"] < 0.3 * line["tokens"]
    again = ask(fusing, second, second.marks(), rid="order-again").json()["text"]  # the fused prompt itself cached
    assert again == fused and fused_line(fusing, "order-again")["computed"] == 1


def test_cacheblend_recomputes_where_the_fused_kv_deviates(fusing, pool):
    """CacheBlend-style selection served: its scoring pass computes every chunk token and
    compares K/V at layer 1; the first chunk (right after the shared prefix, where its fused
    KV is its exact KV) gets none of the recomputation, the later chunks all of it, and so
    with A³ on the same prompt, at the same budget. The planted code is still answered."""
    p = rag_prompt(pool, 4, 12)
    plain = ask(fusing, p, None).json()["text"]
    blend = ask(fusing, p, p.marks(method="cacheblend"), rid="blend").json()["text"]
    score, final = fused_line(fusing, "blend.a2ats-score", "scoring pass"), fused_line(fusing, "blend")
    chunk_tokens = sum(score["chosen"])  # the scoring pass computes every chunk token
    assert score["reused"] == 0 and score["missing"] == 0 and score["computed"] > chunk_tokens
    assert final["chosen"][0] == 0 and sum(final["chosen"]) == round(0.15 * chunk_tokens), final
    assert final["reused"] == chunk_tokens - sum(final["chosen"]) and final["missing"] == 0
    ask(fusing, p, p.marks(), rid="a3-same")
    a3 = fused_line(fusing, "a3-same")["chosen"]
    assert a3[0] == 0 and sum(a3) == sum(final["chosen"]), (a3, final)
    assert p.answer in plain and p.answer in blend, (plain, blend)


def test_a_single_chunk_is_served_as_a_plain_request(fusing, pool):
    """One chunk right after the shared prefix is where it is prefilled alone: fusing it would
    give the full prefill's KV, so the request goes to SGLang plain (no chunk prefill, no
    scoring pass, no fused extend), its prefix and chunk reused by the radix cache; its marks
    are still checked."""
    p = rag_prompt(pool, 1, 14)
    plain = ask(fusing, p, None).json()
    fused = ask(fusing, p, p.marks(), rid="single").json()
    log = fusing.log()
    assert "a2ats fusion: request single: one chunk, served as a plain request" in log
    assert "a2ats fusion: request single " not in log and "single.a2ats-score" not in log
    assert fused["meta_info"]["cached_tokens"] >= fused["meta_info"]["prompt_tokens"] - 1
    assert fused["text"] == plain["text"] and p.answer in fused["text"], (plain, fused)
    bad = ask(fusing, p, {**p.marks(), "a2ats_recompute_ratio": -1})
    assert bad.status_code == 400 and "in [0, 1]" in bad.json()["error"]["message"]


def test_fused_and_plain_requests_in_flight_together(fusing, pool):
    prompts = [rag_prompt(pool, 3, s, plant_fact=False) for s in (20, 21)]
    plain_alone = [ask(fusing, p, None, max_new_tokens=10).json()["text"] for p in prompts]
    fused_alone = [ask(fusing, p, p.marks(), max_new_tokens=10).json()["text"] for p in prompts]
    with cf.ThreadPoolExecutor(4) as ex:
        plain = [ex.submit(ask, fusing, p, None, None, 10) for p in prompts]
        fused = [ex.submit(ask, fusing, p, p.marks(), None, 10) for p in prompts]
        assert [f.result().json()["text"] for f in plain] == plain_alone
        assert [f.result().json()["text"] for f in fused] == fused_alone


def test_bad_marks_get_a_clear_error_and_nothing_else_is_disturbed(fusing, a2ats, pool):
    p = rag_prompt(pool, 2, 30, plant_fact=False)
    cases = [({"a2ats_chunks": ["", p.chunks[1]]}, {}, "a2ats_chunks[0] is empty"),
             ({"a2ats_chunks": ["words that are nowhere in this prompt"]}, {}, "is not in the prompt"),
             ({"a2ats_chunks": list(p.chunks), "a2ats_recompute_ratio": 2}, {}, "in [0, 1]"),
             ({"a2ats_chunks": list(p.chunks), "a2ats_fusion_method": "a3-lut"}, {}, "one of ('a3', 'naive', "),
             (p.marks(), {"return_logprob": True, "logprob_start_len": 0}, "does not return prompt logprobs")]
    for marks, body, message in cases:
        r = ask(fusing, p, marks, **body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    long = RagPrompt((p.chunks[0] * 40,), "Question: what?\nAnswer:", "")  # longer than the model's context
    r = ask(fusing, long, long.marks())
    assert r.status_code == 400 and "does not fit the model's context" in r.json()["error"]["message"], r.text[:300]
    r = ask(a2ats, p, p.marks())  # a server started without the flag
    assert r.status_code == 400 and "--a2ats-chunk-fusion" in r.json()["error"]["message"]
    assert ask(fusing, p, p.marks(), max_new_tokens=4).status_code == 200  # the server still fuses


def test_evicted_chunks_are_recomputed_and_long_prompts_fuse_over_prefill_chunks(default_model_dir, pool):
    """A KV pool barely larger than the prompt: allocating the fused request evicts most of the
    chunks its admission just cached; what is not found is computed (every token computed or
    copied), and the planted fact is still answered. Prefill in chunks of 512 tokens: each
    round plans its own positions; recomputing everything is still the full prefill."""
    p = rag_prompt(pool, 6, 40)
    args = [a for a in SERVER_ARGS] + FUSION + ["--chunked-prefill-size", "512"]
    args[args.index("--max-total-tokens") + 1] = "2600"
    with launch_server(default_model_dir, "a2ats", args) as srv:
        n = ask(srv, p, None, max_new_tokens=1).json()["meta_info"]["prompt_tokens"]
        assert 1800 < n < 2500
        plain = ask(srv, p, None).json()["text"]
        fused = ask(srv, p, p.marks(), rid="evicted").json()["text"]
        rounds = re.findall(r"a2ats fusion: request evicted \(final\) positions (\d+)-(\d+): (\d+) computed, (\d+) chunk "
                            r"tokens reused, (\d+) of the shared prefix copied, (\d+) chunk tokens not cached", srv.log())
        full = ask(srv, p, p.marks(ratio=1.0), rid="all").json()["text"]
    assert len(rounds) >= 4 and int(rounds[0][0]) == 0 and int(rounds[-1][1]) == n - 1
    totals = [sum(int(r[i]) for r in rounds) for i in (2, 3, 4, 5)]
    computed, reused, prefix, missing = totals
    assert computed + reused + prefix == n and missing > 0  # each token computed or copied
    assert p.answer in plain and p.answer in fused, (plain, fused)
    assert full == plain


def test_servers_fusion_cannot_serve_stop_at_start(default_model_dir):
    code, out = run_server_expecting_failure(default_model_dir, "torch_native", FUSION, timeout=120)
    assert code != 0 and "--a2ats-chunk-fusion: needs --attention-backend a2ats" in out, out[-2000:]
    code, out = run_server_expecting_failure(default_model_dir, "a2ats", FUSION + ["--tp-size", "2"], timeout=120)
    assert code != 0 and "--tp-size 2: one rank only" in out, out[-2000:]


def test_offload_fuses_like_on_device(default_model_dir, fusing, pool):
    """With the full KV in host memory: r = 1 is the full prefill, A³ answers the planted code,
    every chunk token found on a second order, and the decode after a fused prefill (whose
    resident windows hold copied and computed tokens alike) gives on-device's tokens."""
    p = rag_prompt(pool, 4, 60)
    q = RagPrompt(tuple(reversed(p.chunks)), p.question, p.answer)
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + FUSION + ["--a2ats-offload"]) as srv:
        plain = ask(srv, p, None, max_new_tokens=12).json()["text"]
        full = ask(srv, p, p.marks(ratio=1.0), max_new_tokens=12).json()["text"]
        fused = [ask(srv, x, x.marks(), rid=f"off-{i}", max_new_tokens=12).json()["text"] for i, x in enumerate((p, q))]
        line = fused_line(srv, "off-1")
    want = [ask(fusing, x, x.marks(), max_new_tokens=12).json()["text"] for x in (p, q)]
    assert full == plain and p.answer in plain
    assert line["missing"] == 0 and line["reused"] > 0.6 * line["tokens"]
    assert fused == want and all(p.answer in f for f in fused), (fused, want)


def test_frontend_program_fuses_the_library_documents_its_prompt_contains(fusing, pool):
    """An ``sgl.function`` on ChunkFusionEndpoint: the documents in its prompt are marked and
    fused (a final fused extend logged per gen), the planted code answered as by the plain
    endpoint; a prompt with no document goes out plain."""
    import sglang as sgl
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    from a2ats_sglang.fusion.frontend import ChunkFusionEndpoint

    p = rag_prompt(pool, 3, 50)
    backend = ChunkFusionEndpoint(fusing.url, documents=list(reversed(p.chunks)) + pool)
    assert backend.marks_for(p.text) == {"a2ats_chunks": list(p.chunks)}  # in prompt order

    @sgl.function
    def answer(s, text):
        s += text + sgl.gen("answer", max_tokens=8, temperature=0)

    fused_lines = lambda: len(re.findall(r"a2ats fusion: request \S+ \(final\)", fusing.log()))  # noqa: E731
    before = fused_lines()
    fused = answer.run(text=p.text, backend=backend)["answer"]
    assert fused_lines() == before + 1
    plain = answer.run(text=p.text, backend=RuntimeEndpoint(fusing.url))["answer"]
    assert p.answer in fused and p.answer in plain, (fused, plain)
    answer.run(text="The capital of France is", backend=backend)
    assert fused_lines() == before + 1
