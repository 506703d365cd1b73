"""The backend's side of the CPU attention worker: starts, feeds, watches and restarts
the worker process (:mod:`a2ats_sglang.offload.worker`) of one model-runner rank.

    client.submit(layer, q, slots, scale)   # returns at once: the device works meanwhile
    out, lse = client.wait()                # a dead, hung or failing worker is replaced and the request resubmitted once

Wire format and arena: :mod:`a2ats_sglang.offload.protocol`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import zmq

from a2ats_sglang.offload.protocol import (CLIENT_POLL_MS, IPC_DIR_PREFIX, MAGIC, MIN_START_TIMEOUT_S, OK, OP_ATTEND,
                                           OP_PING, REPLY, REQUEST, VERSION, ArenaLayout, WorkerFailure, dtype_name,
                                           ipc_path)
from a2ats_sglang.offload.shared_memory import KVLayout, SharedRegion

logger = logging.getLogger(__name__)

ARENA_SLOT_GROWTH = 2  # a request with more slots than the arena holds: at least this many times more room


class CPUAttentionWorker:
    """Starts, feeds, watches and restarts the worker process of one model-runner rank.

    ``kv_region``/``kv_layout``: the host KV pool; ``q_heads``: query heads of this rank;
    ``batch``/``slots``: the arena's first size (it grows on demand); ``timeout``: seconds a
    reply may take; ``cpus``: the CPUs the worker runs on (default: this process's), its torch
    threads half of them (the rank's own compute runs meanwhile)."""

    def __init__(self, kv_region: SharedRegion, kv_layout: KVLayout, q_heads: int, batch: int, slots: int,
                 timeout: float = 30.0, cpus: list[int] | None = None):
        self.kv_region, self.kv = kv_region, kv_layout
        self.q_heads = q_heads
        self.timeout = timeout
        self.cpus = sorted(cpus or os.sched_getaffinity(0))
        self.cpu_list = ",".join(map(str, self.cpus))  # as the worker's --cpus and the log line give it
        self.threads = max(1, len(self.cpus) // 2)
        self.restarts = 0
        self.proc = None
        self.sock = None
        self.dir = None
        self.arena_region = None
        self._ctx = zmq.Context.instance()
        self._seq = 0
        self._pending = None
        self._start(ArenaLayout(batch, q_heads, kv_layout.kv_heads, kv_layout.head_dim, kv_layout.v_head_dim, slots))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _start(self, arena: ArenaLayout) -> None:
        self.arena = arena
        try:
            self.arena_region = SharedRegion.create(arena.nbytes, "a2ats-arena")
            self.dir = tempfile.mkdtemp(prefix=IPC_DIR_PREFIX)  # 0700
            ipc = ipc_path(self.dir)
            kv = self.kv
            cmd = [sys.executable, "-m", "a2ats_sglang.offload.worker", "--ipc", ipc, "--dtype", dtype_name(kv.dtype),
                   "--kv-fd", self.kv_region.fd, "--arena-fd", self.arena_region.fd, "--layers", kv.num_layers,
                   "--kv-slots", kv.slots, "--kv-heads", kv.kv_heads, "--q-heads", self.q_heads, "--head-dim",
                   kv.head_dim, "--v-head-dim", kv.v_head_dim, "--batch", arena.batch, "--slots", arena.slots,
                   "--parent", os.getpid(), "--threads", self.threads, "--cpus", self.cpu_list]
            self.proc = subprocess.Popen([str(c) for c in cmd], pass_fds=(self.kv_region.fd, self.arena_region.fd))
            self.sock = self._ctx.socket(zmq.PAIR)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(f"ipc://{ipc}")
            self._send(OP_PING, 0, 0, 0, 0.0, 0.0)
            self._recv(timeout=max(MIN_START_TIMEOUT_S, self.timeout))  # ready: torch imported, regions mapped
        except BaseException:  # no half-started worker, directory or region is left behind
            self._stop_process()
            raise
        logger.info("a2ats: CPU attention worker pid %d ready (ipc %s, %d threads on CPUs %s)", self.proc.pid, ipc,
                    self.threads, self.cpu_list)

    def _stop_process(self) -> None:
        """Kill the worker (if running) and remove its directory and arena; safe to repeat."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.arena_region is not None:
            self.arena_region.close()
            self.arena_region = None

    def restart(self, arena: ArenaLayout | None = None, reason: str = "") -> None:
        """Replace the worker (with a new arena of layout ``arena`` if given)."""
        logger.warning("a2ats: restarting CPU attention worker pid %s%s", self.proc.pid if self.proc else "-",
                       f" ({reason})" if reason else "")
        self._stop_process()
        self.restarts += 1
        self._start(arena or self.arena)

    def _send(self, op: int, layer: int, b: int, s: int, scale: float, logit_cap: float) -> None:
        self._seq += 1
        a = self.arena
        self.sock.send(REQUEST.pack(MAGIC, VERSION, op, layer, b, a.q_heads, a.kv_heads, a.head_dim, a.v_head_dim, s,
                                    scale, logit_cap, self._seq))

    def _recv(self, timeout: float) -> None:
        """Wait for the reply to the last request; raise WorkerFailure on anything but its OK."""
        deadline = time.monotonic() + timeout
        while not self.sock.poll(CLIENT_POLL_MS):
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
            text = frames[1].decode(errors="replace") if len(frames) > 1 else ""
            raise WorkerFailure(f"a2ats CPU worker pid {self.proc.pid} rejected a request: {text}", worker_message=text)
        if seq != self._seq:
            raise WorkerFailure(f"out-of-order reply from worker (seq {seq}, expected {self._seq})")

    def submit(self, layer: int, q: torch.Tensor, slots: torch.Tensor, scale: float, logit_cap: float = 0.0) -> None:
        """q [B, Hq, D]; slots int [B, Hkv, S] (-1 pad). Returns at once; pair with :meth:`wait`."""
        b, s = q.shape[0], slots.shape[2]
        if b > self.arena.batch or s > self.arena.slots:  # grow the arena: a new region, a new worker
            a = self.arena
            grown = ArenaLayout(max(b, a.batch), a.q_heads, a.kv_heads, a.head_dim, a.v_head_dim,
                                max(s, ARENA_SLOT_GROWTH * a.slots))
            self.restart(grown, "larger arena")
        qa, sa, _, _ = self.arena.views(self.arena_region, b, s)
        qa.copy_(q)
        sa.copy_(slots)
        self._pending = (layer, q, slots, scale, logit_cap)
        self._send(OP_ATTEND, layer, b, s, scale, logit_cap)

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out f32 [B, Hq, Dv], lse f32 [B, Hq]). A worker that died, hung or rejected the
        request is replaced and the request resubmitted once; a second failure raises WorkerFailure."""
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
