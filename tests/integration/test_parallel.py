"""Serving with several ranks on SGLang's own machinery, on CPU: tensor parallelism (each
rank scores and attends its own KV heads with its slice of the codebooks; with fewer KV
heads than ranks, SGLang replicates them and each rank keeps one) and data parallelism
(each replica with its own backend). The CPU platform splits this machine's cores between
the ranks (it has one NUMA node)."""

import concurrent.futures as cf
import json
import os
import re
import signal

import pytest
from support.families import family_model
from support.serving import (FACTS, SERVER_ARGS, generate, multi_turn_session, planted_prompt, stream_until_decoding,
                             worker_pids)

from a2ats_sglang.offload.cpus import cpu_shares
from a2ats_sglang.config import A2ATSConfig
from a2ats_sglang.harness.server import launch_router, launch_server, run_server_expecting_failure

pytestmark = pytest.mark.server

# gloo all-reduce (no custom all-reduce without CUDA); every rank sizes its pool from the whole
# machine's memory, so the pool is sized here and SGLang's per-rank balance check is off
RANKS_ARGS = ["--disable-custom-all-reduce", "--max-total-tokens", "12000"]
RANKS_ENV = {"SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK": "0"}
COVERED = ["The capital of France is", "Here is a short poem about the sea:"]
SESSIONS = 4  # concurrent multi-turn chat sessions, each with a document of its own


def sessions_concurrently(srv) -> list:
    with cf.ThreadPoolExecutor(SESSIONS) as pool:
        return list(pool.map(lambda i: multi_turn_session(srv, i), range(SESSIONS)))


def answers_of(sessions) -> list:
    return [[answer for answer, _, _ in turns] for turns in sessions]


@pytest.fixture(scope="module")
def sequential_sessions(a2ats):
    """The multi-turn sessions one after another on one server: what several ranks must answer."""
    return answers_of([multi_turn_session(a2ats, i) for i in range(SESSIONS)])


def answers(srv):
    """Greedy answers: the covered prompts (16 tokens), then two planted-fact prompts (8)."""
    covered = [generate(srv, p, 16)["text"] for p in COVERED]
    facts = [generate(srv, planted_prompt(name, code, offset=40 * i), 8)["text"] for i, (name, code) in
             enumerate(FACTS[:2])]
    return covered, facts


@pytest.fixture(scope="module")
def tp1(a2ats):
    return answers(a2ats)


def test_tensor_parallel_3_answers_as_dense_and_as_one_rank(default_model_dir, tp1, dense):
    """The default model's 9 query / 3 KV heads over 3 ranks: one KV head and its codebooks
    per rank. Covered prompts: the dense baseline's tokens (the session's, at TP = 1: the
    same tokens as one a2ats rank, so float sums in another order flipped none); long
    prompts: the planted facts answered, as at TP = 1."""
    tp = ["--tp-size", "3"]
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + tp + RANKS_ARGS, env=RANKS_ENV) as srv:
        covered, facts = answers(srv)
        log = srv.log()
    assert covered == [generate(dense, p, 16)["text"] for p in COVERED]
    assert covered == tp1[0]
    assert all(code in text for (_, code), text in zip(FACTS, facts)), facts
    assert facts == tp1[1]  # the same tokens as one rank (float sums in another order did not flip a token here)
    heads = sorted(re.findall(r"TP rank (\d) of 3: KV heads (\d)-(\d) of 3, 3 query heads each", log))
    assert heads == [(str(r), str(r), str(r)) for r in range(3)], log[-3000:]  # one KV head and its codebooks each
    assert re.findall(r"attended ([\d.]+)% of context \(", log)


def test_data_parallel_2_concurrent_requests_answer_as_sequential(default_model_dir, tp1, sequential_sessions):
    """Two replicas behind SGLang's data-parallel controller: single requests and multi-turn
    sessions in flight together answer as one server does one at a time."""
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + ["--dp-size", "2"] + RANKS_ARGS, env=RANKS_ENV) as srv:
        prompts = [(p, 16) for p in COVERED] + [(planted_prompt(n, c, offset=40 * i), 8) for i, (n, c) in
                                                enumerate(FACTS[:2])]
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(pool.map(lambda pn: generate(srv, *pn)["text"], prompts * 2))
        sessions = sessions_concurrently(srv)
        log = srv.log()
    want = tp1[0] + tp1[1]
    assert outs == want + want
    assert answers_of(sessions) == sequential_sessions
    assert len(re.findall(r"TP rank 0 of 1: KV heads 0-2 of 3", log)) == 2  # one backend per replica


def test_router_keeps_multi_turn_sessions_on_the_server_holding_their_prefix(default_model_dir, sequential_sessions):
    """Two a2ats servers behind SGLang's router (cache-aware): concurrent multi-turn sessions
    answer as one server does one at a time, and every later turn finds the conversation so
    far in the radix cache of the server it lands on (round-robin would alternate servers)."""
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS) as a, \
            launch_server(default_model_dir, "a2ats", SERVER_ARGS) as b, \
            launch_router([a.url, b.url], "cache_aware") as router:
        sessions = sessions_concurrently(router)
        served = [len(re.findall(r"POST /v1/chat/completions HTTP/1.1\" 200", s.log())) for s in (a, b)]
    assert answers_of(sessions) == sequential_sessions
    for turns in sessions:
        for (_, cached, _), (_, _, previous) in zip(turns[1:], turns):
            assert cached >= previous - 8, sessions  # all of the previous turn's prompt (but its last tokens)
    assert sum(served) == SESSIONS * len(sessions[0]) and min(served) > 0, served  # both servers in use


def test_offload_with_tensor_parallel_3_answers_as_on_device_and_survives_a_dead_worker(default_model_dir, tp1):
    """Each rank its own share of the host memory given and its own CPU worker, pinned to the
    rank's CPUs: the planted facts answered with on-device's tokens (here at TP = 1, which
    TP = 3 on-device equals above); killing one rank's worker mid-stream leaves the server
    answering."""
    host_gb = 0.36
    args = SERVER_ARGS + ["--tp-size", "3", "--a2ats-offload", "--a2ats-worker-timeout", "10",
                          "--a2ats-host-kv-gb", str(host_gb)] + RANKS_ARGS
    with launch_server(default_model_dir, "a2ats", args, env=RANKS_ENV) as srv:
        assert answers(srv) == tp1
        log = srv.log()
        cfg = json.loads((default_model_dir / "config.json").read_text())
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        rank_cell = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] // 3 * 2 * head_dim * 4  # float32 K, V
        pools = re.findall(r"a2ats offload: (\d+) tokens of KV in host memory \((\d+) B/token", log)
        assert pools == [(str(int(host_gb * 2**30) // 3 // rank_cell), str(rank_cell))] * 3, pools
        workers = re.findall(r"CPU attention worker pid (\d+) ready \(ipc \S+, (\d+) threads on CPUs ([\d,]+)\)", log)
        assert len({pid for pid, _, _ in workers}) == 3, log[-3000:]  # one worker per rank
        shares = cpu_shares(sorted(os.sched_getaffinity(0)), 3)
        assert sorted(cpus for _, _, cpus in workers) == sorted(",".join(map(str, c)) for c in shares)
        for pid, threads, cpus in workers:  # pinned to its rank's share, half of it in threads
            assert os.sched_getaffinity(int(pid)) == set(map(int, cpus.split(",")))
            assert int(threads) == max(1, len(cpus.split(",")) // 2)
        pids = worker_pids(srv)
        t, chunks = stream_until_decoding(srv, planted_prompt(*FACTS[2], offset=80) + " Write more:", 30)
        os.kill(pids[1], signal.SIGKILL)
        t.join(600)
        assert chunks and chunks[-1]["meta_info"]["completion_tokens"] == 30
        assert "restarting CPU attention worker pid %d" % pids[1] in srv.log()
        assert answers(srv) == tp1


def test_offload_host_memory_too_small_for_one_rank_stops_at_start(default_model_dir):
    """--a2ats-host-kv-gb split over 3 ranks leaves each fewer tokens than one request's
    sinks + window: the server stops at start saying what a rank needs."""
    args = SERVER_ARGS + ["--tp-size", "3", "--a2ats-offload", "--a2ats-host-kv-gb", "0.003"] + RANKS_ARGS
    code, log = run_server_expecting_failure(default_model_dir, "a2ats", args, env=RANKS_ENV)
    assert code != 0 and re.search(r"a2ats offload: this rank's 1\.\d\d MiB of host memory for K/V "
                                   r"\(--a2ats-host-kv-gb, split evenly between the server's ranks\) holds \d+ tokens", log), log[-3000:]
    need = A2ATSConfig().sinks + A2ATSConfig().window + 1
    assert f"fewer than one request's {need} (sinks + window + 1)" in log


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
