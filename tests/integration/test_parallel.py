"""Serving with several ranks on SGLang's own machinery, on CPU: tensor parallelism (each
rank scores and attends its own KV heads with its slice of the codebooks; with fewer KV
heads than ranks, SGLang replicates them and each rank keeps one) and data parallelism
(each replica with its own backend). The CPU platform splits this machine's cores between
the ranks (it has one NUMA node)."""

import concurrent.futures as cf
import re

import pytest
from support.serving import FACTS, SERVER_ARGS, generate, planted_prompt

from a2ats_sglang.harness.server import launch_server

pytestmark = pytest.mark.server

# gloo all-reduce (no custom all-reduce without CUDA); every rank sizes its pool from the whole
# machine's memory, so the pool is sized here and SGLang's per-rank balance check is off
RANKS_ARGS = ["--disable-custom-all-reduce", "--max-total-tokens", "12000"]
RANKS_ENV = {"SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK": "0"}
COVERED = ["The capital of France is", "Here is a short poem about the sea:"]


def answers(srv):
    """Greedy answers: the covered prompts (16 tokens), then two planted-fact prompts (8)."""
    covered = [generate(srv, p, 16)["text"] for p in COVERED]
    facts = [generate(srv, planted_prompt(name, code, offset=40 * i), 8)["text"] for i, (name, code) in
             enumerate(FACTS[:2])]
    return covered, facts


@pytest.fixture(scope="module")
def tp1(a2ats):
    return answers(a2ats)


def test_tensor_parallel_3_answers_as_dense_and_as_one_rank(default_model_dir, tp1):
    """The default model's 9 query / 3 KV heads over 3 ranks: one KV head and its codebooks
    per rank. Covered prompts: the dense baseline's tokens at the same TP; long prompts: the
    planted facts answered, as at TP = 1."""
    tp = ["--tp-size", "3"]
    with launch_server(default_model_dir, "a2ats_dense", SERVER_ARGS + tp + RANKS_ARGS, env=RANKS_ENV) as dense:
        dense_covered = [generate(dense, p, 16)["text"] for p in COVERED]
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + tp + RANKS_ARGS, env=RANKS_ENV) as srv:
        covered, facts = answers(srv)
        log = srv.log()
    assert covered == dense_covered
    assert covered == tp1[0]
    assert all(code in text for (_, code), text in zip(FACTS, facts)), facts
    assert facts == tp1[1]  # the same tokens as one rank (float sums in another order did not flip a token here)
    heads = re.findall(r"a2ats: .*? (\d+) codes", log)
    assert len(heads) == 3, log[-3000:]  # one backend per rank
    assert re.findall(r"attended ([\d.]+)% of context \(", log)


def test_data_parallel_2_concurrent_requests_answer_as_sequential(default_model_dir, tp1):
    """Two replicas behind SGLang's data-parallel controller, requests in flight together."""
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + ["--dp-size", "2"] + RANKS_ARGS, env=RANKS_ENV) as srv:
        prompts = [(p, 16) for p in COVERED] + [(planted_prompt(n, c, offset=40 * i), 8) for i, (n, c) in
                                                enumerate(FACTS[:2])]
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(pool.map(lambda pn: generate(srv, *pn)["text"], prompts * 2))
        log = srv.log()
    want = tp1[0] + tp1[1]
    assert outs == want + want
    assert len(re.findall(r"a2ats: .*? (\d+) codes", log)) == 2  # one backend per replica
