"""Serving with several ranks on SGLang's own machinery, on CPU: tensor parallelism (each
rank scores and attends its own KV heads with its slice of the codebooks; with fewer KV
heads than ranks, SGLang replicates them and each rank keeps one) and data parallelism
(each replica with its own backend). The CPU platform splits this machine's cores between
the ranks (it has one NUMA node)."""

import concurrent.futures as cf
import os
import re
import signal

import pytest
from support.families import family_model
from support.serving import FACTS, SERVER_ARGS, generate, planted_prompt, stream_until_decoding, worker_pids

from a2ats_sglang.harness.server import launch_server, run_server_expecting_failure

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
    heads = sorted(re.findall(r"TP rank (\d) of 3: KV heads (\d)-(\d) of 3, 3 query heads each", log))
    assert heads == [(str(r), str(r), str(r)) for r in range(3)], log[-3000:]  # one KV head and its codebooks each
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
    assert len(re.findall(r"TP rank 0 of 1: KV heads 0-2 of 3", log)) == 2  # one backend per replica


def test_offload_with_tensor_parallel_3_answers_as_on_device_and_survives_a_dead_worker(default_model_dir, tp1):
    """Each rank its own host pool share and CPU worker: the planted facts answered with
    on-device's tokens (here at TP = 1, which TP = 3 on-device equals above); killing one
    rank's worker mid-stream leaves the server answering."""
    args = SERVER_ARGS + ["--tp-size", "3", "--a2ats-offload", "--a2ats-worker-timeout", "10"] + RANKS_ARGS
    with launch_server(default_model_dir, "a2ats", args, env=RANKS_ENV) as srv:
        assert answers(srv) == tp1
        pids = worker_pids(srv)
        assert len(set(pids)) == 3, srv.log()[-3000:]  # one worker per rank
        t, chunks = stream_until_decoding(srv, planted_prompt(*FACTS[2], offset=80) + " Write more:", 30)
        os.kill(pids[1], signal.SIGKILL)
        t.join(600)
        assert chunks and chunks[-1]["meta_info"]["completion_tokens"] == 30
        assert "restarting CPU attention worker pid %d" % pids[1] in srv.log()
        assert answers(srv) == tp1


@pytest.fixture(scope="module")
def one_kv_head_model(tmp_path_factory, default_model_dir):
    """A Llama-3.1-shaped model (random weights) with 8 query heads and one KV head."""
    return family_model(tmp_path_factory.mktemp("one_kv"), default_model_dir, "llama3.1", num_key_value_heads=1)


def test_kv_heads_sglang_pads_for_cpu_tensor_parallelism_stop_at_start(one_kv_head_model):
    """8 query heads and 1 KV head over 2 ranks: on CPU SGLang pads the heads to 16 / 2 (it
    replicates KV heads only on GPUs), and padded heads have no codebooks: refused with the
    reason."""
    model = one_kv_head_model
    args = ["--load-format", "dummy", "--context-length", "4096", "--tp-size", "2",
            "--a2ats-codebook", str(model / "codebooks.safetensors")] + RANKS_ARGS
    code, log = run_server_expecting_failure(model, "a2ats", args, env=RANKS_ENV)
    assert code != 0 and "SGLang pads this model's 1 KV heads to 2 (and its query heads to 16)" in log, log[-3000:]
    assert "use a --tp-size that divides 1" in log
