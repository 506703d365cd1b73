"""Model families a user brings, each served for real by SGLang with random weights
(``--load-format dummy``: the family's config, small; the default model's tokenizer).
Codebooks are written for each model with the rotation Hugging Face's implementation of
the family computes (what calibration records), and the server checks them against the
rotation SGLang applies, so every start is also a cross-check of the two.

Per family: a2ats starts (or stops at start with the reason), answers a prompt its budget
covers (with the dense baseline's greedy tokens where the attention differs: the same weights,
SGLang's dummy loader is seeded), retrieves on a long prompt with a small budget, logs which
layers stay dense; offload (for the families whose attention shapes differ) answers the covered
prompt as dense and the long one, or stops with the reason (it attends plain causal layers only:
gemma3)."""

import re

import pytest
from support.families import family_model
from support.serving import generate

from a2ats_sglang.calibration.texts import long_text
from a2ats_sglang.harness.server import launch_server, run_server_expecting_failure

pytestmark = pytest.mark.server

CONTEXT = 4096
ARGS = ["--load-format", "dummy", "--context-length", str(CONTEXT), "--max-total-tokens", "12000",
        "--decode-log-interval", "1", "--max-running-requests", "4"]
SPARSE = ["--a2ats-budget", "0.02", "--a2ats-min-tokens", "8", "--a2ats-dense-below", "0"]
SHORT = "The capital of France is"  # covered by every budget: attended whole
# The dense baseline's tokens compared, and offload served, for the families whose attention
# differs (head size, GQA ratio, partial rotary; gemma3: sliding layers beside full ones, dense
# only); qwen2.5 (q/k/v bias) and mistral differ in the model, not in what attention receives
# once K/V are written: they start, check their codebooks against SGLang's rotation, retrieve.
OFFLOAD_FAMILIES = {"llama3.1", "qwen3", "phi3"}
DENSE_FAMILIES = OFFLOAD_FAMILIES | {"gemma3"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, default_model_dir):
    """family -> its model directory, written once per module."""
    root, made = tmp_path_factory.mktemp("families"), {}
    return lambda family: made.get(family) or made.setdefault(family, family_model(root, default_model_dir, family))


def long_prompt() -> str:
    return long_text(7000, offset=11) + "\n\nIn short,"


def attended_shares(srv) -> list[float]:
    return [float(s) for s in re.findall(r"a2ats decode batch: .* attended ([\d.]+)% of context \(", srv.log())]


@pytest.mark.parametrize("family, layers_line", [
    ("llama3.1", "all 2 attention layers retrieve"),
    ("qwen2.5", "all 2 attention layers retrieve"),
    ("qwen3", "all 2 attention layers retrieve"),
    ("mistral", "all 2 attention layers retrieve"),  # SGLang 0.5.23 serves Mistral's sliding_window as full attention
    ("gemma3", "1 of 4 attention layers retrieve, the others stay dense (sliding window of 511: [0, 1, 2])"),
    ("phi3", "all 2 attention layers retrieve"),
])
def test_family_serves_like_dense_and_retrieves(models, family, layers_line):
    model = models(family)
    book = ["--a2ats-codebook", str(model / "codebooks.safetensors")]
    want = None
    if family in DENSE_FAMILIES:
        with launch_server(model, "a2ats_dense", ARGS) as dense:
            want = generate(dense, SHORT, 12, ignore_eos=True)
    with launch_server(model, "a2ats", ARGS + book + SPARSE) as srv:
        short = generate(srv, SHORT, 12, ignore_eos=True)
        assert len(short["output_ids"]) == 12 and (want is None or short["output_ids"] == want["output_ids"])
        out = generate(srv, long_prompt(), 12, ignore_eos=True)
        assert out["meta_info"]["prompt_tokens"] > 1000 and len(out["output_ids"]) == 12
        shares = attended_shares(srv)
        assert shares and max(shares) < 50.0, shares  # the long prompt retrieved
        assert layers_line in srv.log(), srv.log()[-3000:]
    if family == "gemma3":
        code, log = run_server_expecting_failure(model, "a2ats", ARGS + book + ["--a2ats-offload"])
        assert code != 0 and "a2ats offload: plain causal attention layers only" in log, log[-3000:]
        return
    if family not in OFFLOAD_FAMILIES:
        return
    with launch_server(model, "a2ats", ARGS + book + SPARSE + ["--a2ats-offload"]) as off:
        assert generate(off, SHORT, 12, ignore_eos=True)["output_ids"] == want["output_ids"]
        assert len(generate(off, long_prompt(), 12, ignore_eos=True)["output_ids"]) == 12
        assert "offload, CPU worker pid" in off.log()


@pytest.mark.parametrize("family, extra, reason", [
    ("deepseek-v2", [], "uses multi-head latent attention (MLA, kv_lora_rank 64)"),
    ("gemma2", [], "attention logit soft-capping (layer 0: cap 50; 4 layers) is not applied by SGLang's CPU attention"),
    ("phi3", ["--context-length", "16384"], "re-rotates every key of a batch with its long factors once a position "
                                            "passes 4096"),
])
def test_family_that_cannot_be_served_stops_at_start_with_the_reason(models, family, extra, reason):
    model = models(family)
    book = ["--a2ats-codebook", str(model / "codebooks.safetensors")] if family != "deepseek-v2" else []
    code, log = run_server_expecting_failure(model, "a2ats", ARGS + book + extra)
    assert code != 0 and reason in log, log[-3000:]
