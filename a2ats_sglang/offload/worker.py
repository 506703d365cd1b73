"""The CPU attention worker process: attends retrieved tokens on the host KV pool.

Started by :class:`~a2ats_sglang.offload.client.CPUAttentionWorker` as
``python -m a2ats_sglang.offload.worker`` with the memfd descriptors of the KV pool and
of the arena; wire format in :mod:`a2ats_sglang.offload.protocol`. It answers one request
at a time and never dies on a bad one: a request it cannot serve gets an ERR reply with
the reason.

It leaves nothing behind: SIGTERM or SIGINT (a server stopped through its process group,
Ctrl-C) and its parent's disappearance all end it through one ``finally`` that closes the
socket and removes its private directory. The memfd regions need nothing: they go with
the last process that maps them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal

from a2ats_sglang.offload.cpus import parse_cpu_list

# Nothing heavy is imported above: main() installs the signal handlers before serve()
# imports torch (seconds), so that a stop while the worker starts also cleans up.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SIGNAL_EXIT_BASE = 128  # stopped by signal N, the worker cleans up and exits with 128 + N (the shell's convention)


def exit_on_stop_signals() -> None:
    """Turn SIGTERM/SIGINT into ``SystemExit(128 + signal)``, so that ``finally`` blocks run."""

    def stop(signum, _frame):
        for s in STOP_SIGNALS:  # a second signal must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(SIGNAL_EXIT_BASE + signum)

    for s in STOP_SIGNALS:
        signal.signal(s, stop)


def serve(args) -> None:
    """Answer requests on ``args.ipc`` until the parent process is gone."""
    import torch
    import zmq

    from a2ats_sglang.kernels.dispatch import DecodeBuffers, KernelChoice
    from a2ats_sglang.offload.protocol import (DTYPES, ERR, ERROR_TEXT_MAX_BYTES, MAGIC, OK, OP_ATTEND, OP_PING, REPLY,
                                               REQUEST, VERSION, WORKER_POLL_MS, ArenaLayout)
    from a2ats_sglang.offload.shared_memory import KVLayout, SharedRegion

    os.sched_setaffinity(0, args.cpus)  # this rank's share of the machine
    torch.set_num_threads(args.threads)
    kernels = KernelChoice.select("auto", "cpu")  # the C++ kernel, or the torch reference where it cannot be built
    if args.dtype not in DTYPES:
        raise SystemExit(f"unknown --dtype {args.dtype!r}; one of {sorted(DTYPES)}")
    kv = KVLayout(args.layers, args.kv_slots, args.kv_heads, args.head_dim, args.v_head_dim, DTYPES[args.dtype])
    ks, vs = kv.views(SharedRegion.attach(args.kv_fd, kv.nbytes))
    arena = ArenaLayout(args.batch, args.q_heads, args.kv_heads, args.head_dim, args.v_head_dim, args.slots)
    region = SharedRegion.attach(args.arena_fd, arena.nbytes)

    def answer(frames: list[bytes]) -> list[bytes]:
        """One request's frames -> the reply's frames; results go to the arena."""
        seq = 0
        try:
            if len(frames) != 1 or len(frames[0]) != REQUEST.size:
                raise ValueError(f"malformed request: {len(frames)} frame(s), {len(frames[0]) if frames else 0} bytes")
            magic, version, op, layer, b, hq, hkv, d, dv, s, scale, cap, seq = REQUEST.unpack(frames[0])
            if magic != MAGIC or version != VERSION:
                raise ValueError(f"bad magic/version {magic!r}/{version}")
            if op == OP_PING:
                return [REPLY.pack(MAGIC, VERSION, OK, seq)]
            if op != OP_ATTEND:
                raise ValueError(f"unknown op {op}")
            if (hq, hkv, d, dv) != (arena.q_heads, kv.kv_heads, kv.head_dim, kv.v_head_dim) or layer >= kv.num_layers:
                raise ValueError(f"request shape (layer {layer}, heads {hq}/{hkv}, dims {d}/{dv}) does not match the pool")
            if not (0 < b <= arena.batch and 0 <= s <= arena.slots):
                raise ValueError(f"batch {b} x {s} slots exceeds the arena ({arena.batch} x {arena.slots})")
            q, slots, out, lse = arena.views(region, b, s)
            if s and (int(slots.min()) < -1 or int(slots.max()) >= kv.slots):
                raise ValueError("slot id out of the pool's range")
            kernels.attend(q, ks[layer], vs[layer], slots, scale, cap, DecodeBuffers(out, lse, None))  # into the arena
            return [REPLY.pack(MAGIC, VERSION, OK, seq)]
        except Exception as e:  # reply, never die on a bad message
            return [REPLY.pack(MAGIC, VERSION, ERR, seq), str(e).encode()[:ERROR_TEXT_MAX_BYTES]]

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"ipc://{args.ipc}")
        while True:
            if not sock.poll(WORKER_POLL_MS):
                if os.getppid() != args.parent:  # the backend's process is gone
                    return
                continue
            sock.send_multipart(answer(sock.recv_multipart()))
    finally:
        sock.close()
        ctx.term()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A2ATS CPU attention worker (started by the backend)")
    for name in ("kv-fd", "arena-fd", "layers", "kv-slots", "kv-heads", "q-heads", "head-dim", "v-head-dim", "batch",
                 "slots", "parent", "threads"):
        p.add_argument("--" + name, type=int, required=True)
    p.add_argument("--cpus", type=parse_cpu_list, required=True, help="CPUs to run on: 0-3 or 0,2")
    p.add_argument("--ipc", required=True, help="socket path inside the worker's private directory")
    p.add_argument("--dtype", required=True, help="the KV pool's dtype: float32, bfloat16 or float16")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        exit_on_stop_signals()
        serve(args)
    finally:  # however it ends: parent gone, stop signal, error
        shutil.rmtree(os.path.dirname(args.ipc), ignore_errors=True)


if __name__ == "__main__":
    main()
