"""The CPU attention worker: a real process, real ZMQ IPC socket, real memfd shared memory."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

from a2ats_sglang.core.attention import sparse_attention
from a2ats_sglang.offload.shared_memory import KVLayout, SharedRegion
from a2ats_sglang.offload.client import CPUAttentionWorker
from a2ats_sglang.offload.protocol import IPC_DIR_PREFIX, MAGIC, OP_ATTEND, REQUEST, VERSION, WorkerFailure, ipc_path
from a2ats_sglang.offload.worker import SIGNAL_EXIT_BASE

HQ, HKV, D = 6, 2, 16
ONE_CPU = sorted(os.sched_getaffinity(0))[-1:]  # a rank's share: one CPU, one thread


@pytest.fixture
def pool():
    layout = KVLayout(num_layers=2, slots=500, kv_heads=HKV, head_dim=D, v_head_dim=D, dtype=torch.float32)
    region = SharedRegion.create(layout.nbytes, huge_pages=True)  # as the host KV pool is
    ks, vs = layout.views(region)
    for t in ks + vs:
        t.copy_(torch.randn_like(t))
    yield layout, region, ks, vs
    region.close()


@pytest.fixture
def worker(pool):
    layout, region, _, _ = pool
    w = CPUAttentionWorker(region, layout, HQ, batch=4, slots=64, timeout=5.0, cpus=ONE_CPU)
    yield w
    w.close()


def request(b=3, s=40, n_slots=500):
    q = torch.randn(b, HQ, D)
    slots = torch.stack([torch.stack([torch.randperm(n_slots)[:s] for _ in range(HKV)]) for _ in range(b)])
    slots[0, :, s // 2:] = -1  # ragged
    return q, slots


def test_worker_result_equals_local_attention(pool, worker):
    _, _, ks, vs = pool
    q, slots = request()
    worker.submit(1, q, slots, 0.25)
    out, lse = worker.wait()
    want_o, want_l = sparse_attention(q, ks[1], vs[1], slots, 0.25)
    torch.testing.assert_close(out, want_o)
    torch.testing.assert_close(lse, want_l)
    assert worker.restarts == 0
    assert os.sched_getaffinity(worker.pid) == set(ONE_CPU) and worker.threads == 1  # pinned to its rank's share


def test_sees_kv_written_after_start(pool, worker):
    _, _, ks, vs = pool
    q, slots = request()
    ks[0][slots[1, 0, 0]] += 5.0  # the pool is shared memory, not a copy
    worker.submit(0, q, slots, 0.25)
    out, _ = worker.wait()
    torch.testing.assert_close(out, sparse_attention(q, ks[0], vs[0], slots, 0.25)[0])


def test_malformed_messages_are_rejected_and_the_worker_keeps_serving(pool, worker):
    worker._pending = None
    for bad in [b"garbage", REQUEST.pack(b"XXXX", VERSION, OP_ATTEND, 0, 1, HQ, HKV, D, D, 1, 1.0, 0.0, 0)]:
        worker.sock.send(bad)
        with pytest.raises(RuntimeError, match="rejected"):
            worker._recv(5.0)
    for fields, msg in [((0, 1, HQ, HKV, D + 1, D, 1), "does not match the pool"), ((7, 1, HQ, HKV, D, D, 1), "does not match"),
                        ((0, 99, HQ, HKV, D, D, 1), "exceeds the arena")]:
        worker._seq += 1
        worker.sock.send(REQUEST.pack(MAGIC, VERSION, OP_ATTEND, *fields, 1.0, 0.0, worker._seq))
        with pytest.raises(RuntimeError, match=msg):
            worker._recv(5.0)
    q, slots = request()
    worker.submit(0, q, slots, 0.25)
    worker.wait()
    assert worker.restarts == 0 and worker.proc.poll() is None


def test_a_request_rejected_twice_raises_worker_failure_and_the_replacement_serves_on(pool, worker):
    _, _, ks, vs = pool
    q, slots = request()
    slots[0, 0, 0] = 10_000  # not a slot of the pool: every worker rejects it
    old = worker.pid
    worker.submit(0, q, slots, 0.25)
    with pytest.raises(WorkerFailure, match="out of the pool's range") as e:
        worker.wait()
    assert isinstance(e.value, RuntimeError) and e.value.worker_message == "slot id out of the pool's range"
    assert worker.restarts == 1 and worker.pid != old  # replaced and resubmitted once, then raised
    q, slots = request()
    worker.submit(0, q, slots, 0.25)
    out, _ = worker.wait()
    torch.testing.assert_close(out, sparse_attention(q, ks[0], vs[0], slots, 0.25)[0])
    assert worker.restarts == 1 and worker.proc.poll() is None


def test_a_rejection_replaces_the_worker_and_the_request_is_resubmitted(pool, worker):
    _, _, ks, vs = pool
    q, slots = request()
    old = worker.pid
    worker._pending = (1, q, slots, 0.5, 0.0)  # as after submit(), but the worker got a frame it rejects
    worker.sock.send(b"garbage")
    out, lse = worker.wait()
    want_o, want_l = sparse_attention(q, ks[1], vs[1], slots, 0.5)
    torch.testing.assert_close(out, want_o)
    torch.testing.assert_close(lse, want_l)
    assert worker.restarts == 1 and worker.pid != old


def test_killed_worker_is_replaced_and_the_request_recomputed(pool, worker):
    _, _, ks, vs = pool
    q, slots = request()
    old = worker.pid
    os.kill(old, signal.SIGSTOP)  # it cannot answer before it dies (else the kill may come after its reply)
    worker.submit(1, q, slots, 0.5)
    os.kill(old, signal.SIGKILL)
    out, lse = worker.wait()
    torch.testing.assert_close(out, sparse_attention(q, ks[1], vs[1], slots, 0.5)[0])
    assert worker.restarts == 1 and worker.pid != old


def test_hung_worker_is_detected_within_the_timeout(pool):
    layout, region, ks, vs = pool
    w = CPUAttentionWorker(region, layout, HQ, batch=4, slots=64, timeout=2.0, cpus=ONE_CPU)
    try:
        q, slots = request()
        old = w.pid
        os.kill(old, signal.SIGSTOP)
        t = time.monotonic()
        w.submit(0, q, slots, 0.25)
        out, _ = w.wait()
        assert time.monotonic() - t < 2.0 + 60  # timeout, then a fresh worker's start
        torch.testing.assert_close(out, sparse_attention(q, ks[0], vs[0], slots, 0.25)[0])
        assert w.restarts == 1
        with pytest.raises(ProcessLookupError):
            os.kill(old, 0)  # the hung one was killed, not leaked
    finally:
        w.close()


def test_arena_grows_for_larger_requests(pool, worker):
    _, _, ks, vs = pool
    q, slots = request(b=4, s=200)
    worker.submit(0, q, slots, 0.25)
    out, _ = worker.wait()
    torch.testing.assert_close(out, sparse_attention(q, ks[0], vs[0], slots, 0.25)[0])
    assert worker.arena.slots >= 200


def test_close_leaves_nothing_behind(pool):
    layout, region, _, _ = pool
    w = CPUAttentionWorker(region, layout, HQ, batch=2, slots=8, cpus=ONE_CPU)
    pid, d = w.pid, w.dir
    w.close()
    assert not os.path.exists(d)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_worker_exits_when_its_parent_dies(tmp_path):
    script = textwrap.dedent("""
        import os, sys, time, torch
        from a2ats_sglang.offload.shared_memory import KVLayout, SharedRegion
        from a2ats_sglang.offload.client import CPUAttentionWorker
        layout = KVLayout(1, 10, 1, 8, 8, torch.float32)
        w = CPUAttentionWorker(SharedRegion.create(layout.nbytes), layout, 1, 1, 4, cpus=[min(os.sched_getaffinity(0))])
        print(w.pid, w.dir, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid, d = parent.stdout.readline().split()
    parent.kill()
    parent.wait()
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("worker outlived its parent")
    assert not os.path.exists(d)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_worker_removes_its_directory(worker, sig):
    """SIGTERM to a server's process group reaches the worker too: it exits through its
    cleanup, not by the signal, and leaves no directory (nor socket) behind."""
    d = worker.dir
    assert os.path.exists(ipc_path(d))
    os.kill(worker.pid, sig)
    assert worker.proc.wait(15) == SIGNAL_EXIT_BASE + sig
    assert not os.path.exists(d)


def catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def test_a_worker_stopped_while_starting_removes_its_directory(pool):
    """SIGTERM before the worker is ready (importing torch, mapping the regions): no directory left."""
    layout, region, _, _ = pool
    d = tempfile.mkdtemp(prefix=IPC_DIR_PREFIX)
    args = ["--ipc", ipc_path(d), "--dtype", "float32", "--kv-fd", region.fd, "--arena-fd", region.fd, "--layers",
            layout.num_layers, "--kv-slots", layout.slots, "--kv-heads", HKV, "--q-heads", HQ, "--head-dim", D,
            "--v-head-dim", D, "--batch", 1, "--slots", 1, "--parent", os.getpid(), "--threads", 1, "--cpus", ONE_CPU[0]]
    proc = subprocess.Popen([sys.executable, "-m", "a2ats_sglang.offload.worker", *map(str, args)], pass_fds=(region.fd,))
    try:
        deadline = time.time() + 15
        while not catches_sigterm(proc.pid) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)  # until the handler is in: the worker is then still importing torch
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == SIGNAL_EXIT_BASE + signal.SIGTERM  # a slow VM takes a while to import torch
        assert not os.path.exists(d)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("huge_pages", [False, True])
def test_region_is_shared_through_its_descriptor(huge_pages):
    """Writes through one mapping are seen through another of the same fd; a hugetlb region
    (where the system reserves 2 MiB pages) is whole huge pages, else exactly the size."""
    region = SharedRegion.create(3 * 4096 + 12, huge_pages=huge_pages)
    other = SharedRegion.attach(region.fd, region.nbytes)
    try:
        region.tensor(4096, (3,), torch.float32).copy_(torch.tensor([1.0, 2.0, 3.0]))
        assert other.tensor(4096, (3,), torch.float32).tolist() == [1.0, 2.0, 3.0]
        size = os.fstat(region.fd).st_size
        assert size % (2 << 20) == 0 if region.hugetlb else size == region.nbytes
        with pytest.raises(ValueError, match="does not fit"):
            other.tensor(region.nbytes - 4, (2,), torch.float32)
        with pytest.raises(ValueError, match="expected"):
            SharedRegion.attach(region.fd, size + 1)
    finally:
        other.close()
        region.close()
