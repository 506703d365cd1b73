"""Offload mode end to end: full KV in a shared host pool, retrieved tokens attended
by the CPU worker process, sinks + window by the backend, merged by log-sum-exp."""

import concurrent.futures as cf
import json
import os
import re
import signal
import time

import pytest
import requests
from support.serving import SERVER_ARGS, chat, generate, stream_until_decoding, worker_pids

from a2ats_sglang.harness.server import launch_server, run_server_expecting_failure
from a2ats_sglang.calibration.texts import long_text

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def offload(default_model_dir):
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + ["--a2ats-offload", "--a2ats-worker-timeout", "10"]) as srv:
        yield srv


def test_offload_gives_the_same_tokens_as_on_device(offload, a2ats):
    for i in range(2):
        prompt = long_text(6000, offset=100 * i) + "\n\nIn one sentence, the text above is about"
        got, want = generate(offload, prompt, 16), generate(a2ats, prompt, 16)
        assert got["meta_info"]["prompt_tokens"] > 1000
        assert got["text"] == want["text"]
    assert re.search(r"a2ats decode batch: .* attended [\d.]+% of context", offload.log())


def test_branches_of_one_prefix_share_one_host_copy(offload, a2ats):
    prefix = long_text(3000, offset=300)
    a = generate(offload, prefix + "\n\nQuestion one: what is the first subject?", 12)
    b = generate(offload, prefix + "\n\nQuestion two: what is the last subject?", 12)
    # The second branch found the prefix's slots (so its host KV) in the radix tree, not a copy.
    assert b["meta_info"]["cached_tokens"] >= a["meta_info"]["prompt_tokens"] - 20, b["meta_info"]
    # ...and its device-side window (sinks, last tokens) was rebuilt from that host copy.
    assert b["text"] == generate(a2ats, prefix + "\n\nQuestion two: what is the last subject?", 12)["text"]


def test_killing_the_worker_mid_stream_leaves_the_server_answering(offload):
    before = worker_pids(offload)[-1]
    prompt = long_text(5000, offset=500) + "\n\nWrite a long summary:"
    t, chunks = stream_until_decoding(offload, prompt, 40)
    os.kill(before, signal.SIGKILL)
    t.join(600)
    assert chunks and chunks[-1]["meta_info"]["completion_tokens"] == 40
    assert "restarting CPU attention worker pid %d" % before in offload.log()
    after = worker_pids(offload)[-1]
    assert after != before
    os.kill(after, 0)  # the new worker is alive
    assert generate(offload, prompt, 4)["meta_info"]["completion_tokens"] == 4


def test_dozens_of_concurrent_multi_turn_sessions(offload):
    """24 two-turn sessions, 12 at a time, give each session the same greedy answers
    as the same sessions run one after another, and every turn of every session is answered."""
    doc = long_text(1200, offset=800)

    def session(i):
        msgs = [{"role": "system", "content": doc}, {"role": "user", "content": f"Give me the number {i}."}]
        turns = []
        for _ in range(2):
            r = chat(offload, msgs, max_tokens=4, timeout=600)
            turns.append((r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]))
            msgs += [r["choices"][0]["message"], {"role": "user", "content": "And again?"}]
        return turns

    with cf.ThreadPoolExecutor(12) as pool:
        concurrent = dict(zip(range(24), pool.map(session, range(24))))
    sequential = {i: session(i) for i in range(24)}
    assert all(len(turns) == 2 and all(n >= 1 for _, _, n in turns) for turns in concurrent.values()), concurrent
    assert concurrent == sequential


def test_host_pool_full_evicts_instead_of_failing(default_model_dir):
    """A pool too small for all prompts: the radix cache evicts finished prefixes, every request
    completes; one longer than the whole pool is refused with a clear error."""
    args = ["--max-total-tokens", "2000", "--a2ats-offload", "--decode-log-interval", "1", "--enable-cache-report"]
    with launch_server(default_model_dir, "a2ats", args) as srv:
        prompts = [long_text(3000, offset=1000 + 50 * i) + "\n\nSummary:" for i in range(5)]
        for p in prompts:  # together they need more slots than the pool has
            assert generate(srv, p, 4)["meta_info"]["prompt_tokens"] > 600
        again = generate(srv, prompts[0], 4)  # its prefix was evicted to make room: recomputed, still right
        assert again["meta_info"]["cached_tokens"] < again["meta_info"]["prompt_tokens"] // 2
        # a request longer than the whole host pool: a clear error for it, the server serves on
        r = requests.post(srv.url + "/generate", json={"text": long_text(12000, offset=4000), "sampling_params": {
            "max_new_tokens": 4, "temperature": 0}}, timeout=300)
        assert r.status_code == 400 and "exceeds the maximum allowed length" in r.json()["error"]["message"]
        assert generate(srv, prompts[1], 4)["meta_info"]["completion_tokens"] == 4
        assert "Traceback" not in srv.log()


def worker_processes() -> set[int]:
    """PIDs of every running CPU attention worker process on this machine."""
    pids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b"a2ats_sglang.offload.worker" in f.read():
                        pids.add(int(d))
            except OSError:
                pass
    return pids


def test_worker_failing_twice_is_replaced_and_the_layer_attended_in_the_scheduler(offload):
    """The worker is killed mid-stream and its replacement hangs before it is ready: the
    backend attends that layer's retrieved tokens itself, starts a third worker, and the
    request (and the next one) completes with every token."""
    before = worker_pids(offload)[-1]
    known = worker_processes()
    prompt = long_text(5000, offset=700) + "\n\nWrite a long summary:"
    stopped = []
    t, chunks = stream_until_decoding(offload, prompt, 24)
    os.kill(before, signal.SIGKILL)
    deadline = time.time() + 300
    while not stopped and time.time() < deadline:  # the replacement: hang it while it starts
        for pid in worker_processes() - known - {before}:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        time.sleep(0.01)
    t.join(600)
    assert stopped and chunks and chunks[-1]["meta_info"]["completion_tokens"] == 24
    log = offload.log()
    assert "CPU worker failed again" in log and "attending this layer in the scheduler" in log
    after = worker_pids(offload)[-1]
    assert after not in (before, stopped[0])
    os.kill(after, 0)  # the third worker is alive, the hung one is gone
    assert stopped[0] not in worker_processes()
    assert generate(offload, prompt, 4)["meta_info"]["completion_tokens"] == 4


def test_host_memory_sets_the_pool_size(default_model_dir):
    """--a2ats-host-kv-gb sizes the pool: the device budget would hold far more tokens
    (codes only), the host holds full K/V; long prompts still complete."""
    host_gb = 0.05
    args = ["--a2ats-offload", "--a2ats-host-kv-gb", str(host_gb), "--max-running-requests", "4", "--decode-log-interval", "1"]
    with launch_server(default_model_dir, "a2ats", args) as srv:
        log = srv.log()
        cfg = json.loads((default_model_dir / "config.json").read_text())
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        dense_cell = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 2 * head_dim * 4  # float32 K and V
        tokens = int(re.search(r"max_total_num_tokens=(\d+)", log).group(1))
        assert tokens == int(host_gb * 2**30) // dense_cell
        budget = float(re.search(r"device KV budget ([\d.]+) GiB", log).group(1)) * 2**30
        assert tokens < budget // dense_cell  # the device alone would have held more: host memory decided
        assert re.search(r"a2ats offload: on the device [\d.]+ MiB of codes \(%d tokens\)" % tokens, log)
        r = generate(srv, long_text(2000, offset=3000) + "\n\nSummary:", 4)
        assert r["meta_info"]["completion_tokens"] == 4


def test_offload_without_the_a2ats_backend_is_refused(default_model_dir):
    code, out = run_server_expecting_failure(default_model_dir, "torch_native", ["--a2ats-offload"])
    assert code != 0 and "--a2ats-offload needs --attention-backend a2ats" in out


def test_a_server_stopped_by_sigterm_leaves_no_worker_directory(default_model_dir):
    """SIGTERM to the server's process group (as harness stop(), systemd and container
    runtimes do) reaches its CPU worker: it removes its private ``a2ats-worker-*`` directory
    (the IPC socket) on the way out, so no new one remains in the temp folder."""
    import tempfile

    from a2ats_sglang.offload.protocol import IPC_DIR_PREFIX

    def worker_dirs() -> set[str]:
        tmp = tempfile.gettempdir()
        return {os.path.join(tmp, d) for d in os.listdir(tmp) if d.startswith(IPC_DIR_PREFIX)}

    before = worker_dirs()
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + ["--a2ats-offload"]) as srv:
        r = generate(srv, long_text(2000, offset=2500) + "\n\nSummary:", 4)
        assert r["meta_info"]["completion_tokens"] == 4  # the worker has served: started, ready, busy
        pids = set()
        for pid in worker_processes():
            try:
                if os.getpgid(pid) == srv.process.pid:  # started with a session (group) of its own
                    pids.add(pid)
            except ProcessLookupError:
                pass
        # this server's workers' directories: logged when ready (also replaced ones) or on a live worker's command line
        ours = {os.path.dirname(p) for p in re.findall(r"CPU attention worker pid \d+ ready \(ipc (\S+),", srv.log())}
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode().split("\0")
            ours.add(os.path.dirname(args[args.index("--ipc") + 1]))
        assert pids and ours and ours <= worker_dirs() - before
    # launch_server has stopped it: SIGTERM to its process group, SIGKILL to what was left after the grace period
    assert not pids & worker_processes()
    new = worker_dirs() - before  # (a concurrent unit test elsewhere may add its own: only ours must be gone)
    assert not new & ours, f"left behind: {sorted(new & ours)}"
