"""Model families a user brings, each served for real by SGLang with random weights
(``--load-format dummy``: the family's config, small; the default model's tokenizer).
Codebooks are written for each model with the rotation Hugging Face's implementation of
the family computes (what calibration records), and the server checks them against the
rotation SGLang applies, so every start is also a cross-check of the two.

Per family: a2ats starts (or stops at start with the reason), answers a prompt its budget
covers with the dense baseline's greedy tokens (the same weights: SGLang's dummy loader is
seeded), retrieves on a long prompt with a small budget, logs which layers stay dense; offload
starts and answers, or stops with the reason."""

import json
import re
import shutil

import pytest
import torch
from support.codebooks import make_codebooks
from support.serving import generate

from a2ats_sglang.calibration.texts import long_text
from a2ats_sglang.harness.server import launch_server, run_server_expecting_failure

pytestmark = pytest.mark.server

COMMON = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
              torch_dtype="float32", rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, num_hidden_layers=2,
              hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
PHI_FACTORS = dict(short_factor=[1.0 + 0.2 * i / 47 for i in range(48)],  # one per rotated pair: 128 x 0.75 / 2
                   long_factor=[1.0 + 29 * i / 47 for i in range(48)])
FAMILIES = {
    "llama3.1": dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=16384,
                     rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=512, max_position_embeddings=32768,
                    rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768, max_window_layers=2),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_attention_heads=4, head_dim=128,
                  max_position_embeddings=40960, rope_theta=1000000.0, use_sliding_window=False, sliding_window=None),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", max_position_embeddings=32768,
                    rope_theta=10000.0, sliding_window=4096),
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_hidden_layers=4,
                   num_attention_heads=4, head_dim=128, max_position_embeddings=32768,
                   hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=168, sliding_window=512,
                   layer_types=["sliding_attention"] * 3 + ["full_attention"], rope_theta=1000000.0,
                   rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                   attn_logit_softcapping=None, final_logit_softcapping=None),
    "phi3": dict(architectures=["Phi3ForCausalLM"], model_type="phi3", num_attention_heads=4, num_key_value_heads=2,
                 head_dim=128, hidden_size=512, partial_rotary_factor=0.75, max_position_embeddings=16384,
                 original_max_position_embeddings=4096, rope_theta=10000.0, sliding_window=None,
                 rope_scaling={"type": "longrope", **PHI_FACTORS}),
    "gemma2": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", num_hidden_layers=4, num_attention_heads=4,
                   head_dim=256, max_position_embeddings=8192, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "deepseek-v2": dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", num_attention_heads=4,
                        num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32,
                        qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=2, moe_intermediate_size=128,
                        max_position_embeddings=16384, rope_theta=10000.0),
}
CONTEXT = 4096
ARGS = ["--load-format", "dummy", "--context-length", str(CONTEXT), "--max-total-tokens", "12000",
        "--decode-log-interval", "1", "--max-running-requests", "4"]
SPARSE = ["--a2ats-budget", "0.02", "--a2ats-min-tokens", "8", "--a2ats-dense-below", "0"]
SHORT = "The capital of France is"  # covered by every budget: attended whole


def family_model(root, default_model_dir, family: str):
    """A model directory for ``family``: its config, the default model's tokenizer and (for a
    family a2ats indexes) codebooks with the rotation Hugging Face's implementation computes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from a2ats_sglang.core.codebook import ModelShape
    from a2ats_sglang.core.rope import RopeSpec

    path = root / family
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**COMMON, **FAMILIES[family]}))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (default_model_dir / f).exists():
            shutil.copy(default_model_dir / f, path / f)
    cfg = AutoConfig.from_pretrained(path)
    if getattr(cfg, "kv_lora_rank", None):
        return path
    shape = ModelShape.from_hf_config(cfg)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg)
    rope = RopeSpec.from_hf(hf.model.rotary_emb, shape.head_dim)
    make_codebooks(shape.num_layers, shape.num_q_heads, shape.num_kv_heads, shape.head_dim, num_codes=32,
                   distances=(64, 512), rope=rope).save(path / "codebooks.safetensors")
    return path


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
    with launch_server(model, "a2ats_dense", ARGS) as dense:
        want = generate(dense, SHORT, 12, ignore_eos=True)
    with launch_server(model, "a2ats", ARGS + book + SPARSE) as srv:
        assert generate(srv, SHORT, 12, ignore_eos=True)["output_ids"] == want["output_ids"]
        out = generate(srv, long_prompt(), 12, ignore_eos=True)
        assert out["meta_info"]["prompt_tokens"] > 1000 and len(out["output_ids"]) == 12
        shares = attended_shares(srv)
        assert shares and max(shares) < 50.0, shares  # the long prompt retrieved
        assert layers_line in srv.log(), srv.log()[-3000:]
    if family == "gemma3":
        code, log = run_server_expecting_failure(model, "a2ats", ARGS + book + ["--a2ats-offload"])
        assert code != 0 and "a2ats offload: plain causal attention layers only" in log, log[-3000:]
        return
    with launch_server(model, "a2ats", ARGS + book + SPARSE + ["--a2ats-offload"]) as off:
        assert len(generate(off, SHORT, 12, ignore_eos=True)["output_ids"]) == 12
        assert len(generate(off, long_prompt(), 12, ignore_eos=True)["output_ids"]) == 12
        assert "offload, CPU worker pid" in off.log()


@pytest.mark.parametrize("family, extra, reason", [
    ("deepseek-v2", [], "uses multi-head latent attention (MLA, kv_lora_rank 64)"),
    ("gemma2", [], "attention logit soft-capping (layer 0: cap 50; 4 layers) is not applied by SGLang's CPU attention"),
    ("gemma2", ["--a2ats-offload"], "a2ats offload: plain causal attention layers only"),
    ("phi3", ["--context-length", "16384"], "re-rotates every key of a batch with its long factors once a position "
                                            "passes 4096"),
])
def test_family_that_cannot_be_served_stops_at_start_with_the_reason(models, family, extra, reason):
    model = models(family)
    book = ["--a2ats-codebook", str(model / "codebooks.safetensors")] if family != "deepseek-v2" else []
    code, log = run_server_expecting_failure(model, "a2ats", ARGS + book + extra)
    assert code != 0 and reason in log, log[-3000:]
