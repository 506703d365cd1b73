"""User options of the a2ats backend: one table, used for the CLI flags, the
environment transport to SGLang's scheduler processes, and validation.

Flags (``python -m sglang.launch_server ... --attention-backend a2ats --a2ats-budget 0.05``)
are validated in the launcher and exported as ``SGLANG_A2ATS_*`` environment
variables, which the spawned scheduler processes inherit; setting the variables
directly works too (e.g. with ``sglang.Engine``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from a2ats_sglang.core.retrieval import Budget

ENV_PREFIX = "SGLANG_A2ATS_"
KERNELS = ("auto", "torch", "triton")


def _parse_bool(raw) -> bool:
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _parser(default):
    return _parse_bool if isinstance(default, bool) else type(default)


@dataclass(frozen=True)
class A2ATSConfig:
    codebook: str = ""
    budget: float = 0.03
    min_tokens: int = 32
    max_tokens: int = 1 << 30
    sinks: int = 8
    window: int = 64
    dense_below: int = 0
    kernel: str = "auto"
    offload: bool = False
    host_kv_gb: float = 0.0
    worker_timeout: float = 30.0

    HELP = {
        "codebook": "codebooks file (default: MODEL_PATH/a2ats/codebooks.safetensors); build with python -m a2ats_sglang.calibration",
        "budget": "share of each request's context every query head retrieves, in (0, 1] (paper: 0.03)",
        "min_tokens": "retrieve at least this many tokens per query head",
        "max_tokens": "retrieve at most this many tokens per query head",
        "sinks": "first tokens of every sequence always attended (paper: 8)",
        "window": "most recent tokens always attended (paper: 64)",
        "dense_below": "decode batches whose longest context is below this many tokens use dense attention",
        "kernel": "sparse decode implementation: auto (Triton on CUDA, the C++ kernel on CPU), torch (reference), triton",
        "offload": "keep the full KV in shared host memory and attend retrieved tokens in a CPU worker process; "
                   "the device keeps codes, sinks and window",
        "host_kv_gb": "offload: GB of host memory for the full KV pool (0 = auto: half the available host memory per rank "
                      "on a GPU; on --device cpu the pool shares SGLang's memory budget)",
        "worker_timeout": "seconds before an unanswered CPU worker is replaced",
    }

    def __post_init__(self):
        Budget(self.budget, self.min_tokens, self.max_tokens)  # validates the budget triple
        if self.sinks < 0 or self.window < 1:
            raise ValueError(f"a2ats: need sinks >= 0 and window >= 1, got sinks={self.sinks}, window={self.window}")
        if self.dense_below < 0:
            raise ValueError(f"a2ats: dense_below must be >= 0, got {self.dense_below}")
        if self.host_kv_gb < 0:
            raise ValueError(f"a2ats: host_kv_gb must be >= 0, got {self.host_kv_gb}")
        if self.worker_timeout <= 0:
            raise ValueError(f"a2ats: worker_timeout must be > 0, got {self.worker_timeout}")
        if self.kernel not in KERNELS:
            raise ValueError(f"a2ats: kernel must be one of {KERNELS}, got {self.kernel!r}")

    @property
    def budget_policy(self) -> Budget:
        return Budget(self.budget, self.min_tokens, self.max_tokens)

    @staticmethod
    def flag(name: str) -> str:
        return "--a2ats-" + name.replace("_", "-")

    @classmethod
    def add_cli_args(cls, parser) -> None:
        group = parser.add_argument_group("A2ATS attention backend (--attention-backend a2ats)")
        for f in fields(cls):
            extra = {"nargs": "?", "const": True} if isinstance(f.default, bool) else {}
            group.add_argument(cls.flag(f.name), dest="a2ats_" + f.name, type=_parser(f.default), default=None,
                               help=cls.HELP[f.name], **extra)

    @classmethod
    def from_cli_namespace(cls, ns) -> "A2ATSConfig":
        """Flags given on the command line over the environment over the defaults."""
        base = cls.from_env()
        given = {f.name: getattr(ns, "a2ats_" + f.name) for f in fields(cls) if getattr(ns, "a2ats_" + f.name, None) is not None}
        return cls(**{**base.__dict__, **given})

    @classmethod
    def from_env(cls, environ=os.environ) -> "A2ATSConfig":
        kw = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                try:
                    kw[f.name] = _parser(f.default)(raw)
                except ValueError:
                    raise ValueError(f"a2ats: {ENV_PREFIX + f.name.upper()}={raw!r} is not a valid {type(f.default).__name__}") from None
        return cls(**kw)

    def to_env(self, environ=os.environ) -> None:
        for f in fields(self):
            environ[ENV_PREFIX + f.name.upper()] = str(getattr(self, f.name))
