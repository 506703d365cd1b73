"""CPU attention worker: a process that attends retrieved tokens on the host KV pool.

The backend (client) and the worker share two memfd regions, passed as file
descriptors at start: the KV pool (:class:`~a2ats_sglang.offload.host_pool.HostKVPool`)
and an arena holding each request's query and slot lists and the worker's
output and log-sum-exp. Over a ZMQ PAIR socket on a local IPC path in a private
(0700) temp directory go only fixed-size binary headers (``struct``), validated
on arrival; nothing is unpickled. One request is in flight at a time.

    client.submit(layer, q, slots, scale)   # returns at once: the device works meanwhile
    out, lse = client.wait()                # restarts a dead or hung worker and resubmits once
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import zmq

from a2ats_sglang.offload.shared_memory import KVLayout, SharedRegion, align

logger = logging.getLogger(__name__)

MAGIC, VERSION = b"A2AW", 1
OP_ATTEND, OP_PING = 1, 2
OK, ERR = 0, 1
# magic, version, op, pad, layer, batch, hq, hkv, d, dv, s, scale, logit cap (0 = none), seq
REQUEST = struct.Struct("<4sHBxIIIIIIIddQ")
# magic, version, status, pad, seq
REPLY = struct.Struct("<4sHBxQ")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WorkerFailure(RuntimeError):
    """The worker died or did not answer in time."""


@dataclass(frozen=True)
class ArenaLayout:
    """Request/response arena for up to ``batch`` requests of ``slots`` selected tokens per KV head."""

    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    slots: int

    def _sizes(self):
        return [align(self.batch * self.q_heads * self.head_dim * 4), align(self.batch * self.kv_heads * self.slots * 8),
                align(self.batch * self.q_heads * self.v_head_dim * 4), align(self.batch * self.q_heads * 4)]

    @property
    def nbytes(self) -> int:
        return sum(self._sizes())

    def views(self, region: SharedRegion, b: int, s: int):
        """(q f32 [b, Hq, D], slots i64 [b, Hkv, s], out f32 [b, Hq, Dv], lse f32 [b, Hq])."""
        o = [0]
        for n in self._sizes()[:-1]:
            o.append(o[-1] + n)
        return (region.tensor(o[0], (b, self.q_heads, self.head_dim), torch.float32),
                region.tensor(o[1], (b, self.kv_heads, s), torch.int64),
                region.tensor(o[2], (b, self.q_heads, self.v_head_dim), torch.float32),
                region.tensor(o[3], (b, self.q_heads), torch.float32))


# ---------------------------------------------------------------------------- worker side
def serve(args) -> None:
    from a2ats_sglang.kernels.cpu import sparse_attention_cpu

    torch.set_num_threads(args.threads)
    kv = KVLayout(args.layers, args.kv_slots, args.kv_heads, args.head_dim, args.v_head_dim, DTYPES[args.dtype])
    ks, vs = kv.views(SharedRegion.attach(args.kv_fd, kv.nbytes))
    arena = ArenaLayout(args.batch, args.q_heads, args.kv_heads, args.head_dim, args.v_head_dim, args.slots)
    region = SharedRegion.attach(args.arena_fd, arena.nbytes)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"ipc://{args.ipc}")
    while True:
        if not sock.poll(1000):
            if os.getppid() != args.parent:  # the backend's process is gone
                break
            continue
        frames = sock.recv_multipart()
        seq = 0
        try:
            if len(frames) != 1 or len(frames[0]) != REQUEST.size:
                raise ValueError(f"malformed request: {len(frames)} frame(s), {len(frames[0]) if frames else 0} bytes")
            magic, version, op, layer, b, hq, hkv, d, dv, s, scale, cap, seq = REQUEST.unpack(frames[0])
            if magic != MAGIC or version != VERSION:
                raise ValueError(f"bad magic/version {magic!r}/{version}")
            if op == OP_PING:
                sock.send_multipart([REPLY.pack(MAGIC, VERSION, OK, seq)])
                continue
            if op != OP_ATTEND:
                raise ValueError(f"unknown op {op}")
            if (hq, hkv, d, dv) != (arena.q_heads, kv.kv_heads, kv.head_dim, kv.v_head_dim) or layer >= kv.num_layers:
                raise ValueError(f"request shape (layer {layer}, heads {hq}/{hkv}, dims {d}/{dv}) does not match the pool")
            if not (0 < b <= arena.batch and 0 <= s <= arena.slots):
                raise ValueError(f"batch {b} x {s} slots exceeds the arena ({arena.batch} x {arena.slots})")
            q, slots, out, lse = arena.views(region, b, s)
            if s and (int(slots.min()) < -1 or int(slots.max()) >= kv.slots):
                raise ValueError("slot id out of the pool's range")
            o, l = sparse_attention_cpu(q, ks[layer], vs[layer], slots, scale, cap)
            out.copy_(o)
            lse.copy_(l)
            sock.send_multipart([REPLY.pack(MAGIC, VERSION, OK, seq)])
        except Exception as e:  # reply, never die on a bad message
            sock.send_multipart([REPLY.pack(MAGIC, VERSION, ERR, seq), str(e).encode()[:1000]])
    sock.close()
    ctx.term()
    shutil.rmtree(os.path.dirname(args.ipc), ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="A2ATS CPU attention worker (started by the backend)")
    for name in ("kv-fd", "arena-fd", "layers", "kv-slots", "kv-heads", "q-heads", "head-dim", "v-head-dim", "batch",
                 "slots", "parent", "threads"):
        p.add_argument("--" + name, type=int, required=True)
    p.add_argument("--ipc", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), required=True)
    serve(p.parse_args(argv))


# ---------------------------------------------------------------------------- client side
class CPUAttentionWorker:
    """Starts, feeds, watches and restarts the worker process of one model-runner rank."""

    def __init__(self, kv_region: SharedRegion, kv_layout, q_heads: int, batch: int, slots: int,
                 timeout: float = 30.0, threads: int | None = None):
        self.kv_region, self.kv = kv_region, kv_layout
        self.q_heads = q_heads
        self.timeout = timeout
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self.restarts = 0
        self.proc = None
        self.sock = None
        self._ctx = zmq.Context.instance()
        self._seq = 0
        self._pending = None
        self._start(ArenaLayout(batch, q_heads, kv_layout.kv_heads, kv_layout.head_dim, kv_layout.v_head_dim, slots))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _start(self, arena: ArenaLayout) -> None:
        self.arena = arena
        self.arena_region = SharedRegion.create(arena.nbytes, "a2ats-arena")
        self.dir = tempfile.mkdtemp(prefix="a2ats-worker-")  # 0700
        ipc = os.path.join(self.dir, "sock")
        kv = self.kv
        dtype = next(k for k, v in DTYPES.items() if v == kv.dtype)
        cmd = [sys.executable, "-m", "a2ats_sglang.offload.worker", "--ipc", ipc, "--dtype", dtype,
               "--kv-fd", self.kv_region.fd, "--arena-fd", self.arena_region.fd, "--layers", kv.num_layers,
               "--kv-slots", kv.slots, "--kv-heads", kv.kv_heads, "--q-heads", self.q_heads, "--head-dim", kv.head_dim,
               "--v-head-dim", kv.v_head_dim, "--batch", arena.batch, "--slots", arena.slots, "--parent", os.getpid(),
               "--threads", self.threads]
        self.proc = subprocess.Popen([str(c) for c in cmd], pass_fds=(self.kv_region.fd, self.arena_region.fd))
        self.sock = self._ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{ipc}")
        self._send(OP_PING, 0, 0, 0, 0.0, 0.0)
        self._recv(timeout=max(60.0, self.timeout))  # ready: torch imported, regions mapped
        logger.info("a2ats: CPU attention worker pid %d ready (ipc %s, %d threads)", self.proc.pid, ipc, self.threads)

    def _stop_process(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.arena_region.close()

    def restart(self, arena: ArenaLayout | None = None, reason: str = "") -> None:
        logger.warning("a2ats: restarting CPU attention worker pid %s%s", self.proc.pid if self.proc else "-", f" ({reason})" if reason else "")
        self._stop_process()
        self.restarts += 1
        self._start(arena or self.arena)

    def _send(self, op: int, layer: int, b: int, s: int, scale: float, logit_cap: float) -> None:
        self._seq += 1
        a = self.arena
        self.sock.send(REQUEST.pack(MAGIC, VERSION, op, layer, b, a.q_heads, a.kv_heads, a.head_dim, a.v_head_dim, s, scale,
                                    logit_cap, self._seq))

    def _recv(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.sock.poll(50):
            if self.proc.poll() is not None:
                raise WorkerFailure(f"worker pid {self.proc.pid} exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise WorkerFailure(f"worker pid {self.proc.pid} did not answer within {timeout:.0f}s")
        frames = self.sock.recv_multipart()
        if len(frames[0]) != REPLY.size:
            raise WorkerFailure(f"malformed reply from worker pid {self.proc.pid}")
        magic, version, status, seq = REPLY.unpack(frames[0])
        if magic != MAGIC or version != VERSION:
            raise WorkerFailure(f"malformed reply from worker pid {self.proc.pid}")
        if status != OK:
            raise RuntimeError(f"a2ats CPU worker rejected a request: {frames[1].decode(errors='replace') if len(frames) > 1 else ''}")
        if seq != self._seq:
            raise WorkerFailure(f"out-of-order reply from worker (seq {seq}, expected {self._seq})")

    def submit(self, layer: int, q: torch.Tensor, slots: torch.Tensor, scale: float, logit_cap: float = 0.0) -> None:
        """q [B, Hq, D]; slots int [B, Hkv, S] (-1 pad). Returns at once; pair with :meth:`wait`."""
        b, s = q.shape[0], slots.shape[2]
        if b > self.arena.batch or s > self.arena.slots:  # grow the arena: a new region, a new worker
            a = self.arena
            self.restart(ArenaLayout(max(b, a.batch), a.q_heads, a.kv_heads, a.head_dim, a.v_head_dim, max(s, 2 * a.slots)), "larger arena")
        qa, sa, _, _ = self.arena.views(self.arena_region, b, s)
        qa.copy_(q)
        sa.copy_(slots)
        self._pending = (layer, q, slots, scale, logit_cap)
        self._send(OP_ATTEND, layer, b, s, scale, logit_cap)

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out f32 [B, Hq, Dv], lse f32 [B, Hq]). A dead or hung worker is replaced and the
        request resubmitted once; a second failure raises WorkerFailure."""
        layer, q, slots, scale, cap = self._pending
        try:
            self._recv(self.timeout)
        except WorkerFailure as e:
            self.restart(reason=str(e))
            self.submit(layer, q, slots, scale, cap)
            self._recv(self.timeout)
        self._pending = None
        _, _, out, lse = self.arena.views(self.arena_region, q.shape[0], slots.shape[2])
        return out.clone(), lse.clone()

    def close(self) -> None:
        self._stop_process()


if __name__ == "__main__":
    main()
