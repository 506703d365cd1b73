import os

# SGLang on this CPU-only machine runs through the project's opt-in platform.
os.environ.setdefault("SGLANG_PLATFORM", "a2ats_cpu")
# Triton kernels run on CPU tensors through the interpreter where there is no GPU
# (read when a kernel is defined, so before anything imports them).
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
except ImportError:
    pass

import pytest
import torch


@pytest.fixture(scope="session")
def default_model_dir():
    from a2ats_sglang.harness.default_model import build_default_model, ensure_default_codebooks

    path = build_default_model()
    ensure_default_codebooks(path)
    return path


SERVER_ARGS = ["--max-total-tokens", "20000", "--decode-log-interval", "1", "--max-running-requests", "8", "--enable-cache-report"]


@pytest.fixture(scope="session")
def a2ats(default_model_dir):
    """A real `sglang.launch_server --attention-backend a2ats` on the default model."""
    from a2ats_sglang.harness.server import launch_server

    with launch_server(default_model_dir, "a2ats", SERVER_ARGS) as srv:
        yield srv


@pytest.fixture(scope="session")
def dense(default_model_dir):
    """The same model served with SGLang's torch_native backend."""
    from a2ats_sglang.harness.server import launch_server

    with launch_server(default_model_dir, "torch_native", SERVER_ARGS) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_codebooks(num_layers, num_q, num_kv, head_dim, num_codes=16, distances=(4, 16, 64), seed=0):
    """Random but valid codebooks for a model shape (default rope, base 10000)."""
    from a2ats_sglang.core.codebook import Codebooks, ModelShape
    from a2ats_sglang.core.rope import RopeSpec

    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    a = torch.randn(num_layers, num_kv, head_dim, head_dim, generator=g) * 0.1
    whiten = torch.linalg.cholesky(a @ a.transpose(-1, -2) + torch.eye(head_dim))
    return Codebooks(
        centroids=torch.randn(num_layers, num_kv, num_codes, head_dim, generator=g),
        whiten=whiten,
        rope=RopeSpec(inv, head_dim),
        distances=tuple(distances),
        shape=ModelShape("tiny", num_layers, num_q, num_kv, head_dim),
    )
