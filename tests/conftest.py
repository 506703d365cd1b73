import os

# SGLang on this CPU-only machine runs through the project's opt-in platform.
os.environ.setdefault("SGLANG_PLATFORM", "a2ats_cpu")

import pytest
import torch


@pytest.fixture(scope="session")
def default_model_dir():
    from a2ats_sglang.default_model import build_default_model

    return build_default_model()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
