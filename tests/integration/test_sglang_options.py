"""SGLang options users combine with a2ats, on the device and with offload: each serves
(greedy tokens equal to the dense backend's where the budget covers the prompt, the planted
fact answered where it does not, requests in flight together), or stops at start naming the
option and why."""

import concurrent.futures as cf
import re

import pytest
import requests
from support.serving import FACTS, SERVER_ARGS, generate, planted_prompt

from a2ats_sglang.harness.server import launch_server, run_server_expecting_failure

pytestmark = pytest.mark.server

COVERED = ["The capital of France is", "Here is a short poem about the sea:"]
NAME, CODE = FACTS[0]


def together(srv):
    """A long planted-fact prompt and the covered ones, sent at once (so prefill chunks and
    decode steps share batches) -> (the long answer, the covered greedy texts)."""
    with cf.ThreadPoolExecutor(3) as pool:
        long = pool.submit(generate, srv, planted_prompt(NAME, CODE, offset=0), 8)
        short = [pool.submit(generate, srv, p, 16) for p in COVERED]
        return long.result(), [f.result()["text"] for f in short]


@pytest.fixture(scope="module")
def dense_covered(dense):
    return [generate(dense, p, 16)["text"] for p in COVERED]


OFFLOAD = ["--a2ats-offload"]
PAGE_SIZE_4, MIXED_CHUNK = ["--page-size", "4"], ["--enable-mixed-chunk", "--chunked-prefill-size", "256"]


# Paged and mixed-chunk batches with the radix cache (the default) in both modes; without the
# radix cache once, with offload, whose host pool then frees a request's KV as it finishes.
@pytest.mark.parametrize("option, mode", [(PAGE_SIZE_4, []), (PAGE_SIZE_4, OFFLOAD), (MIXED_CHUNK, []),
                                          (MIXED_CHUNK, OFFLOAD), (["--disable-radix-cache"], OFFLOAD)],
                         ids=["page-size-4-on-device", "page-size-4-offload", "mixed-chunk-on-device",
                              "mixed-chunk-offload", "no-radix-cache-offload"])
def test_option_serves_like_dense(default_model_dir, dense_covered, option, mode):
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + option + mode) as srv:
        long, covered = together(srv)
        assert covered == dense_covered
        assert long["meta_info"]["prompt_tokens"] >= 2000 and CODE in long["text"], long["text"]
        shares = [float(s) for s in re.findall(r"attended ([\d.]+)% of context \(", srv.log())]
        assert shares and min(shares) < 50.0  # the long prompt retrieved
        again = generate(srv, COVERED[0], 16)["text"]  # a second turn over the same prefix (a radix hit, if enabled)
        assert again == dense_covered[0]


@pytest.mark.parametrize("option, reason", [
    (["--enable-hierarchical-cache", "--a2ats-offload"], "--enable-hierarchical-cache moves KV pages between device and host"),
    (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3: a2ats's kernels attend float32"),
    (["--speculative-algorithm", "NGRAM", "--a2ats-offload"], "--speculative-algorithm NGRAM: the verify pass attends a tree"),
    (["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "q_proj"],
     "--enable-lora on --device cpu: SGLang's LoRA layers pin host memory"),
], ids=["hierarchical-cache-offload", "fp8-kv", "speculative-offload", "lora-on-cpu"])
def test_option_a2ats_cannot_serve_with_stops_at_start(default_model_dir, option, reason):
    """Refused by the launcher, before any process starts, on the device and with offload
    alike (the refusal does not look at the mode: half the cases each)."""
    code, out = run_server_expecting_failure(default_model_dir, "a2ats", option, timeout=120)
    assert code != 0 and reason in out, out[-2000:]


@pytest.fixture(scope="module")
def offload(default_model_dir):
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + OFFLOAD) as srv:
        yield srv


@pytest.mark.parametrize("mode", ["a2ats", "offload"], ids=["on-device", "offload"])
def test_parallel_sampling_and_logprobs_as_dense(request, dense, mode):
    """n > 1 greedy samples are the dense greedy answer each; return_logprob gives the dense
    backend's log-probabilities (to float rounding) for a prompt the budget covers."""
    a2ats = request.getfixturevalue(mode)

    def ask(srv, **extra):
        r = requests.post(srv.url + "/generate", json={"text": COVERED[0], "return_logprob": True, "top_logprobs_num": 2,
                                                       "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                           **extra}}, timeout=300)
        r.raise_for_status()
        return r.json()

    want = ask(dense)
    outs = ask(a2ats, n=3)
    assert isinstance(outs, list) and len(outs) == 3 and all(o["text"] == want["text"] for o in outs)
    got = [lp for lp, _, _ in outs[0]["meta_info"]["output_token_logprobs"]]
    ref = [lp for lp, _, _ in want["meta_info"]["output_token_logprobs"]]
    assert len(got) == len(ref) == 8 and max(abs(a - b) for a, b in zip(got, ref)) < 1e-3, (got, ref)
    assert len(outs[0]["meta_info"]["output_top_logprobs"][0]) == 2

