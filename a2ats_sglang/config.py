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
from a2ats_sglang.options import add_arguments, given, option, parser_for, validate

ENV_PREFIX = "SGLANG_A2ATS_"
KERNELS = ("auto", "torch", "cpp", "triton")


@dataclass(frozen=True)
class A2ATSConfig:
    """The backend's options: defaults, help and bounds in one table (flag ``--a2ats-NAME``,
    environment variable ``SGLANG_A2ATS_NAME``)."""

    codebook: str = option("", "codebooks file (default: MODEL_PATH/a2ats/codebooks.safetensors); "
                               "build with python -m a2ats_sglang.calibration")
    budget: float = option(0.03, "share of each request's context every query head retrieves (paper: 0.03)",
                           min=0, max=1, min_exclusive=True)
    min_tokens: int = option(32, "retrieve at least this many tokens per query head", min=0)
    max_tokens: int = option(1 << 30, "retrieve at most this many tokens per query head", min=1)
    top_p: float = option(0.0, "adaptive budget: each query head retrieves the fewest tokens whose estimated softmax "
                               "mass reaches this share (clamped by min/max tokens; replaces --a2ats-budget); 0 = off",
                          min=0, max=1)
    sinks: int = option(8, "first tokens of every sequence always attended (paper: 8)", min=0)
    window: int = option(64, "most recent tokens always attended (paper: 64)", min=1)
    dense_below: int = option(-1, "requests shorter than this many tokens attend every token in decode; -1 = auto: "
                                  "on CPU the length from which retrieval (the lookup table's WRoPE buckets x codes, "
                                  "the budget) costs less than dense attention, from the codebooks; on a GPU 0 = never",
                              min=-1)
    kernel: str = option("auto", "sparse decode implementation: auto (Triton on CUDA, the C++ kernels on CPU), "
                                 "torch (references), cpp (the C++ CPU kernels), triton", choices=KERNELS)
    offload: bool = option(False, "keep the full KV in shared host memory and attend retrieved tokens in a CPU worker "
                                  "process; the device keeps codes, sinks and window")
    host_kv_gb: float = option(0.0, "offload: GB of host memory for the full KV pool, split evenly between the "
                                    "server's ranks (0 = auto: half the available host memory on a GPU; on --device "
                                    "cpu the pool shares SGLang's memory budget)", min=0)
    chunk_fusion: bool = option(False, "A3 chunk-KV fusion: requests that mark their documents "
                                       "(custom_params.a2ats_chunks) reuse each one's cached KV at any position and "
                                       "recompute only what the question needs")
    fusion_ratio: float = option(0.15, "chunk fusion: share of the chunk tokens recomputed when a request does not "
                                       "say (custom_params.a2ats_recompute_ratio)", min=0, max=1)
    worker_timeout: float = option(30.0, "seconds before an unanswered CPU worker is replaced", min=0, min_exclusive=True)

    def __post_init__(self):
        validate(self, "a2ats: ", self.where)  # each option's own range, naming its flag
        try:
            self.budget_policy  # the core's check across options (0 <= min_tokens <= max_tokens)
        except ValueError as e:
            raise ValueError(f"a2ats: {e} ({', '.join(map(self.where, ('min_tokens', 'max_tokens')))})") from None

    @property
    def budget_policy(self) -> Budget:
        return Budget(self.budget, self.min_tokens, self.max_tokens, self.top_p)

    @staticmethod
    def flag(name: str) -> str:
        return "--a2ats-" + name.replace("_", "-")

    @staticmethod
    def env_name(name: str) -> str:
        return ENV_PREFIX + name.upper()

    @classmethod
    def where(cls, name: str) -> str:
        """Where an option is set, for error messages: ``--a2ats-window / SGLANG_A2ATS_WINDOW``."""
        return f"{cls.flag(name)} / {cls.env_name(name)}"

    @classmethod
    def add_cli_args(cls, parser) -> None:
        group = parser.add_argument_group("A2ATS attention backend (--attention-backend a2ats)")
        add_arguments(group, cls, cls.flag, dest=lambda name: "a2ats_" + name)

    @classmethod
    def from_cli_namespace(cls, ns) -> "A2ATSConfig":
        """Flags given on the command line over the environment over the defaults."""
        base = cls.from_env()
        return cls(**{**base.__dict__, **given(ns, cls, dest=lambda name: "a2ats_" + name)})

    @classmethod
    def from_env(cls, environ=os.environ) -> "A2ATSConfig":
        kw = {}
        for f in fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is not None:
                try:
                    kw[f.name] = parser_for(f.default)(raw)
                except ValueError:
                    raise ValueError(f"a2ats: {cls.env_name(f.name)}={raw!r} is not a valid {type(f.default).__name__}") from None
        return cls(**kw)

    def to_env(self, environ=os.environ) -> None:
        for f in fields(self):
            environ[self.env_name(f.name)] = str(getattr(self, f.name))
