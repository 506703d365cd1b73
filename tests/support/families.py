"""Small configs of the model families the tests serve with random weights
(``--load-format dummy``), and the model directories built from them."""

import json
import shutil

import torch

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

def family_model(root, default_model_dir, family: str, **overrides):
    """A model directory for ``family``: its config, the default model's tokenizer and (for a
    family a2ats indexes) codebooks with the rotation Hugging Face's implementation computes;
    ``overrides``: config fields changed (the directory is named after them too)."""
    from support.codebooks import make_codebooks
    from transformers import AutoConfig, AutoModelForCausalLM

    from a2ats_sglang.core.codebook import ModelShape
    from a2ats_sglang.core.rope import RopeSpec

    path = root / "-".join([family, *(f"{k}{v}" for k, v in overrides.items())])
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**COMMON, **FAMILIES[family], **overrides}))
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
