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
from support.serving import SERVER_ARGS


@pytest.fixture(scope="session")
def default_model_dir():
    from a2ats_sglang.harness.offline_models import build_default_model, ensure_default_codebooks

    path = build_default_model()
    ensure_default_codebooks(path)
    return path


@pytest.fixture(scope="session")
def a2ats(default_model_dir):
    """A real `sglang.launch_server --attention-backend a2ats` on the default model."""
    from a2ats_sglang.harness.server import launch_server

    with launch_server(default_model_dir, "a2ats", SERVER_ARGS) as srv:
        yield srv


@pytest.fixture(scope="session")
def fusing(default_model_dir):
    """An a2ats server that fuses marked chunks (``--a2ats-chunk-fusion``)."""
    from a2ats_sglang.harness.server import launch_server

    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + ["--a2ats-chunk-fusion"]) as srv:
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

