"""End to end: a real `python -m sglang.launch_server --attention-backend a2ats`
process serving the default model on CPU, next to a torch_native server."""

import concurrent.futures as cf
import json
import re

import pytest
import requests
from support.codebooks import make_codebooks
from support.serving import PLANTED_FACTS_FLOOR, SERVER_ARGS, chat, generate, planted_facts_answered

from a2ats_sglang.harness.server import run_server_expecting_failure
from a2ats_sglang.calibration.texts import long_text

pytestmark = pytest.mark.server


def test_generate_and_greedy_equal_to_dense_when_prompts_fit(a2ats, dense):
    prompts = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
    for p in prompts:
        got, want = generate(a2ats, p, 24), generate(dense, p, 24)
        assert got["text"] and got["meta_info"]["completion_tokens"] == want["meta_info"]["completion_tokens"]
        assert got["text"] == want["text"], p


def test_chat_completions_and_streaming(a2ats):
    msgs = [{"role": "user", "content": "Say hello in French."}]
    full = chat(a2ats, msgs)["choices"][0]["message"]["content"]
    assert full.strip()
    with requests.post(a2ats.url + "/v1/chat/completions", json={"model": "default", "messages": msgs, "temperature": 0,
                                                                 "max_tokens": 24, "stream": True}, stream=True, timeout=300) as r:
        r.raise_for_status()
        pieces = []
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    assert len(pieces) > 2 and "".join(pieces) == full


def test_regex_and_json_schema_constrained_output(a2ats):
    out = generate(a2ats, "My phone number is", 20, regex=r"\(\d{3}\) \d{3}-\d{4}")
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", out["text"]), out["text"]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    out = chat(a2ats, [{"role": "user", "content": "Give a person as JSON."}], max_tokens=60,
               response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    obj = json.loads(out["choices"][0]["message"]["content"])
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)


def test_multi_turn_conversation_reuses_radix_cache(a2ats):
    context = long_text(1500)
    msgs = [{"role": "system", "content": "Answer briefly.\n" + context}, {"role": "user", "content": "What is the first topic?"}]
    first = chat(a2ats, msgs)
    msgs += [first["choices"][0]["message"], {"role": "user", "content": "And the second one?"}]
    second = chat(a2ats, msgs)
    assert second["choices"][0]["message"]["content"].strip()
    cached = second["usage"].get("prompt_tokens_details") or {}
    assert cached.get("cached_tokens", 0) >= first["usage"]["prompt_tokens"] - 8, second["usage"]


def test_concurrent_requests(a2ats):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]
    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: generate(a2ats, p, 12), prompts))
    assert all(o["meta_info"]["completion_tokens"] == 12 for o in outs)
    solo = generate(a2ats, prompts[3], 12)
    assert solo["text"] == outs[3]["text"]  # batching does not change a greedy answer


def test_long_prompts_answer_as_often_as_dense_and_attend_a_fraction(a2ats, dense):
    right = {"a2ats": planted_facts_answered(a2ats), "dense": planted_facts_answered(dense)}
    assert right["dense"] >= PLANTED_FACTS_FLOOR, right  # the model finds the facts: the comparison means something
    assert right["a2ats"] >= right["dense"], right
    shares = [float(m) for m in re.findall(r"a2ats decode batch: .* attended ([\d.]+)% of context", a2ats.log())]
    assert shares and min(shares) < 25.0  # sinks + window + 3 % budget of ~2K tokens, per KV head


def test_top_p_budget_answers_long_prompts_as_often_as_dense_and_attends_less(default_model_dir, dense):
    """The adaptive budget served: each query head keeps the fewest best tokens reaching
    p of its estimated softmax mass. It answers the planted facts as often as dense, and
    the per-head counts really follow the scores: the attended share is below everything
    yet differs from the fixed budget's."""
    from a2ats_sglang.harness.server import launch_server

    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + ["--a2ats-top-p", "0.9"]) as srv:
        right = planted_facts_answered(srv)
        log = srv.log()
    assert "top-p 0.9" in log  # the backend's start line states the budget it serves
    want = planted_facts_answered(dense)
    assert want >= PLANTED_FACTS_FLOOR and right >= want, (right, want)
    shares = [float(m) for m in re.findall(r"a2ats decode batch: .* attended ([\d.]+)% of context", log)]
    assert shares and max(shares) < 60.0, shares  # ~30 % over all layers at p = 0.9 on these prompts


def test_missing_codebooks_stop_the_server_at_start(default_model_dir, tmp_path):
    code, out = run_server_expecting_failure(default_model_dir, "a2ats", ["--a2ats-codebook", str(tmp_path / "none.safetensors")])
    assert code != 0 and "codebooks file not found" in out


def test_bad_option_stops_the_server_at_start(default_model_dir):
    code, out = run_server_expecting_failure(default_model_dir, "a2ats", ["--a2ats-budget", "0"])
    assert code != 0 and "budget must be in (0, 1]" in out


def test_mismatched_codebooks_stop_the_server(default_model_dir, tmp_path):
    make_codebooks(30, 9, 1, 64).save(tmp_path / "wrong.safetensors")
    code, out = run_server_expecting_failure(default_model_dir, "a2ats", SERVER_ARGS + ["--a2ats-codebook", str(tmp_path / "wrong.safetensors")])
    assert code != 0 and "num_kv_heads: file has 1, model has 3" in out
