"""Capture pre-RoPE queries, keys and values from a Hugging Face causal LM.

The model's own ``apply_rotary_pos_emb`` is wrapped for the duration, so what is
recorded is exactly what RoPE receives (after any q/k norm), for every
architecture that follows the Llama attention layout (Llama, Qwen2, Qwen3, Mistral...).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from a2ats_sglang.core.codebook import ModelShape
from a2ats_sglang.core.rope import RopeSpec


@dataclass
class Captured:
    """Per layer, per forward: q [Hq, T, D], k [Hkv, T, D], v [Hkv, T, Dv] (float32, pre-RoPE)."""

    q: list[list[torch.Tensor]] = field(default_factory=list)
    k: list[list[torch.Tensor]] = field(default_factory=list)
    v: list[list[torch.Tensor]] = field(default_factory=list)


def load_hf_model(model_path: str | Path):
    """(model, tokenizer, ModelShape, RopeSpec) on CPU in float32, eager attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    shape = ModelShape.from_hf_config(model.config)
    rope = RopeSpec.from_hf(model.model.rotary_emb, shape.head_dim)
    return model, tok, shape, rope


def _attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


@contextmanager
def capture_qkv(model, keep_v: bool = False):
    """Yield a :class:`Captured` filled by every forward run inside the block."""
    attns = _attention_modules(model)
    cap = Captured([[] for _ in attns], [[] for _ in attns], [[] for _ in attns])
    current = {"layer": None}
    modules = {sys.modules[type(a).__module__] for a in attns}
    originals = {m: m.apply_rotary_pos_emb for m in modules}
    handles = []

    def wrap(orig):
        def apply(q, k, cos, sin, *a, **kw):
            li = current["layer"]
            cap.q[li].append(q[0].detach().float().clone())
            cap.k[li].append(k[0].detach().float().clone())
            return orig(q, k, cos, sin, *a, **kw)

        return apply

    for li, attn in enumerate(attns):
        handles.append(attn.register_forward_pre_hook(lambda mod, args, li=li: current.__setitem__("layer", li)))
        if keep_v:
            hd = attn.head_dim

            def vhook(mod, args, out, li=li, hd=hd):
                cap.v[li].append(out[0].detach().float().view(out.shape[1], -1, hd).transpose(0, 1).clone())

            handles.append(attn.v_proj.register_forward_hook(vhook))
    for m in modules:
        m.apply_rotary_pos_emb = wrap(originals[m])
    try:
        yield cap
    finally:
        for m in modules:
            m.apply_rotary_pos_emb = originals[m]
        for h in handles:
            h.remove()


@torch.no_grad()
def run_documents(model, docs: list[list[int]], keep_v: bool = False, progress=None) -> Captured:
    """Run each token-id document through the model (batch 1) and capture q/k(/v)."""
    with capture_qkv(model, keep_v=keep_v) as cap:
        for i, doc in enumerate(docs):
            model.model(torch.tensor([doc]), use_cache=False)  # no LM head: only q/k/v are needed
            if progress:
                progress(i + 1, len(docs))
    return cap
