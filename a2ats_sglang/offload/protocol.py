"""Wire format between the CPU attention worker process and its client.

The client (:class:`~a2ats_sglang.offload.client.CPUAttentionWorker`) and the worker
(:mod:`a2ats_sglang.offload.worker`) share two memfd regions, passed as file
descriptors at start: the KV pool (:class:`~a2ats_sglang.offload.shared_memory.KVLayout`)
and an arena (:class:`ArenaLayout`) holding each request's query and slot lists and the
worker's output and log-sum-exp. Over a ZMQ PAIR socket on a local IPC path in a
private (0700) temp directory go only fixed-size binary headers (``struct``), validated
on arrival; nothing is unpickled. One request is in flight at a time.

    client -> worker   REQUEST                      (op ATTEND or PING)
    worker -> client   REPLY [+ error text if ERR]  (status OK or ERR, the request's seq)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from a2ats_sglang.offload.shared_memory import SharedRegion, align

MAGIC, VERSION = b"A2AW", 1
OP_ATTEND, OP_PING = 1, 2
OK, ERR = 0, 1
# magic, version, op, pad, layer, batch, hq, hkv, d, dv, s, scale, logit cap (0 = none), seq
REQUEST = struct.Struct("<4sHBxIIIIIIIddQ")
# magic, version, status, pad, seq
REPLY = struct.Struct("<4sHBxQ")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

IPC_DIR_PREFIX = "a2ats-worker-"  # the private directory (tempfile.mkdtemp) holding the socket
IPC_SOCKET_NAME = "sock"
WORKER_POLL_MS = 1000  # worker, while idle: how often it checks that its parent is still there
CLIENT_POLL_MS = 50  # client, while waiting for a reply: how often it checks that the worker is alive
MIN_START_TIMEOUT_S = 60.0  # a fresh worker imports torch and maps the regions before it answers
ERROR_TEXT_MAX_BYTES = 1000  # cap on the error text of an ERR reply
SIGNAL_EXIT_BASE = 128  # a worker stopped by signal N exits with code 128 + N, after cleaning up


class WorkerFailure(RuntimeError):
    """The worker died, did not answer in time, answered out of protocol, or rejected a
    request; ``worker_message`` is the worker's own error text for a rejection, else None."""

    def __init__(self, message: str, worker_message: str | None = None):
        super().__init__(message)
        self.worker_message = worker_message


def ipc_path(directory: str) -> str:
    """The worker's socket file inside its private directory."""
    return f"{directory}/{IPC_SOCKET_NAME}"


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> its name in :data:`DTYPES` (the worker's ``--dtype``)."""
    return next(k for k, v in DTYPES.items() if v == dtype)


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
