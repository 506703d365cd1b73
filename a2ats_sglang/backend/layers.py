"""The served model's attention layers, read once at start from SGLang's
``RadixAttention`` modules and the modules that rotate their keys: which layers a2ats
retrieves in, which stay dense and why, and the one rotation its codebooks must match.

A layer stays dense when its attention is not plain causal decoder attention over the
whole sequence (a sliding window, as on Gemma's local layers; cross-attention; Llama-4's
chunked local attention; bidirectional attention): A2ATS's selection ranks every past
token of a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from a2ats_sglang.core.rope import RopeSpec


def dense_reason(attn) -> str | None:
    """Why SGLang attention layer ``attn`` must stay dense, or None for plain causal
    decoder attention (the layers a2ats retrieves in)."""
    window = getattr(attn, "sliding_window_size", None)
    if window is not None and window > -1:
        return f"sliding window of {window}"
    if getattr(attn, "is_cross_attention", False):
        return "cross-attention"
    if getattr(attn, "use_irope", False):
        return "chunked local attention"
    kind = getattr(getattr(attn, "attn_type", None), "value", "decoder")
    return None if kind == "decoder" else f"{kind} attention"


def applied_rotary(inner, layer):
    """The module that rotates decoder layer ``layer``'s keys: SGLang 0.5.23's Gemma-3
    rotates at model level (``rotary_emb`` for full-attention layers, ``rotary_emb_local``
    for sliding ones; its layers' own modules run only with the AMX CPU kernels, which
    this build has not), every other model in the layer's attention module."""
    attn = getattr(layer, "self_attn", None)
    if hasattr(inner, "rotary_emb_local") and hasattr(attn, "is_sliding"):
        return inner.rotary_emb_local if attn.is_sliding else inner.rotary_emb
    return getattr(attn, "rotary_emb", None)


@dataclass(frozen=True)
class ModelAttention:
    """layers: layer id -> the model's SGLang ``RadixAttention``; dense: layer id -> why it
    stays dense (:func:`dense_reason`). Empty for a model without such modules (test
    doubles): every layer is then judged when it runs."""

    layers: dict
    dense: dict[int, str]

    @classmethod
    def of(cls, model) -> "ModelAttention":
        from sglang.srt.layers.radix_attention import RadixAttention

        modules = model.modules() if hasattr(model, "modules") else ()
        layers = {m.layer_id: m for m in modules if isinstance(m, RadixAttention)}
        return cls(layers, {i: why for i, m in layers.items() if (why := dense_reason(m)) is not None})

    @property
    def sparse(self) -> list[int]:
        return sorted(i for i in self.layers if i not in self.dense)

    @property
    def logit_caps(self) -> dict[int, float]:
        """layer id -> its attention logit soft-cap, for the layers that have one."""
        caps = {i: float(getattr(m, "logit_cap", 0.0) or 0.0) for i, m in self.layers.items()}
        return {i: c for i, c in caps.items() if c > 0}

    def describe(self) -> str:
        if not self.dense:
            return f"all {len(self.layers)} attention layers retrieve"
        by_reason: dict[str, list[int]] = {}
        for i, why in sorted(self.dense.items()):
            by_reason.setdefault(why, []).append(i)
        dense = "; ".join(f"{why}: {ids}" for why, ids in by_reason.items())
        return f"{len(self.sparse)} of {len(self.layers)} attention layers retrieve, the others stay dense ({dense})"

    def rope(self, model, context_len: int) -> RopeSpec | None:
        """The rotation of the retrieving layers' keys, read from the modules that apply it
        (:func:`applied_rotary`, :meth:`RopeSpec.from_module`), or None for a model that
        exposes none. Raises ValueError when two of those layers rotate differently (one
        codebooks file holds one rotation) or a rotation cannot be un-rotated."""
        inner = getattr(model, "model", model)
        decoder_layers = getattr(inner, "layers", None)
        if decoder_layers is None:
            return None
        specs = []
        for i in self.sparse:
            rotary = applied_rotary(inner, decoder_layers[i])
            if rotary is not None:
                specs.append((i, RopeSpec.from_module(rotary, self.layers[i].qk_head_dim, context_len)))
        for i, spec in specs[1:]:
            specs[0][1].check_matches(spec, f"a2ats: layers {specs[0][0]} and {i}")
        return specs[0][1] if specs else None
