"""The CPU kernels (C++, one extension built on first use for this machine's CPU with
torch's extension builder, cached in ~/.cache/torch_extensions): sparse decode
attention and one layer's retrieval. Whether they are used is decided once, by
:class:`a2ats_sglang.kernels.dispatch.KernelChoice`; these wrappers never fall back."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

SOURCES = ("cpu_bindings.cpp", "cpu_sparse_attention.cpp", "cpu_select.cpp", "cpu_decode.cpp", "cpu_encode.cpp")


@lru_cache(maxsize=1)
def _build():
    """-> (extension module, None) or (None, the reason it cannot be built)."""
    try:
        from torch.utils.cpp_extension import load

        here = Path(__file__).parent
        ext = load(name="a2ats_cpu_kernels", sources=[str(here / f) for f in SOURCES], extra_include_paths=[str(here)],
                   extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        return ext, None
    except Exception as e:  # no compiler / headers
        return None, f"{type(e).__name__}: {e}"


def unavailable_reason() -> str | None:
    """None when the extension builds (or is cached) here, else why not."""
    return _build()[1]


def extension():
    """The built extension; raises RuntimeError saying why it cannot be built."""
    ext, reason = _build()
    if ext is None:
        raise RuntimeError(f"a2ats: the C++ CPU kernels cannot be built here ({reason})")
    return ext


def encode_keys_cpu(k, positions, rope, enc_rows, enc_bias, loc, codes_buf) -> None:
    """Codes of post-RoPE keys k [T, Hkv, D] (any float dtype, last dim contiguous) at
    ``positions`` int64 [T], stored at physical slots loc int64 [T] of codes_buf int16 [N, Hkv]:
    un-rotated by ``rope`` (:meth:`a2ats_sglang.core.rope.RopeSpec.unrotate`), then the nearest
    centroid in the whitened space, argmax_c (enc_rows [Hkv, C, D] . k + enc_bias [Hkv, C]) (f32,
    contiguous), as :meth:`a2ats_sglang.core.codebook.LayerCodebook.encode`."""
    extension().encode_keys(k.float(), positions.long().contiguous(), rope.inv_freq, rope.neox, float(rope.mscale),
                            enc_rows, enc_bias, loc.long().contiguous(), codes_buf)


def sparse_attention_cpu(q, k_buf, v_buf, slots, scale: float, logit_cap: float, out, lse) -> None:
    """Decode attention over selected slots into caller-owned buffers.

    q f32 [B, Hq, D] contiguous; k_buf [N, Hkv, D], v_buf [N, Hkv, Dv] (f32/bf16/f16);
    slots int64 [B, Hkv, S] contiguous (-1 = padding) -> writes out f32 [B, Hq, Dv] and
    lse f32 [B, Hq] (the contract of :func:`a2ats_sglang.core.attention.sparse_attention`)."""
    extension().sparse_attention(q, k_buf, v_buf, slots, float(scale), float(logit_cap), out, lse)


def _layer_args(q, rotation, centroids, scale, codes_buf, slots, plan, bounds, q32, q_rot, lut):
    return (q, rotation.cos, rotation.sin, rotation.rope.neox, centroids, float(scale), codes_buf, slots, plan.seq_lens,
            plan.k, plan.top_p, plan.min_tokens, bounds, plan.sinks, plan.window, q32, q_rot, lut)


def retrieve_layer_cpu(q, rotation, centroids, scale: float, codes_buf, slots, plan, bounds, q32, q_rot, lut,
                       out) -> None:
    """One layer's retrieved slots into ``out`` int64 [B, Hkv, R] (ascending position, -1
    padded; last dim contiguous, any row stride; R >= the largest GQA union), with the WRoPE
    rotation, the lookup table and the histogram selection in one native call: q [B, Hq, D]
    post-RoPE (f32/bf16/f16); rotation: the batch's
    :class:`~a2ats_sglang.core.retrieval.WRoPERotation`; centroids f32 [Hkv, C, D];
    codes_buf int16 [N, Hkv]; slots int64 [B, L] contiguous; the batch's
    :class:`~a2ats_sglang.core.retrieval.SelectionPlan`; the WRoPE bucket bounds f32 [NB-1];
    workspaces q32 f32 [B, Hq, D], q_rot f32 [B, Hq, NB, D], lut f32 [B, Hq, NB, C] (the
    layer's lookup table afterwards)."""
    extension().retrieve_layer(*_layer_args(q, rotation, centroids, scale, codes_buf, slots, plan, bounds, q32, q_rot,
                                            lut), out)


def decode_layer_cpu(q, rotation, centroids, scale: float, codes_buf, slots, plan, bounds, q32, q_rot, lut,
                     selection, fixed_width: int, k_buf, v_buf, logit_cap: float, out, lse, attended) -> None:
    """A whole sparse decode layer in one native call: :func:`retrieve_layer_cpu` into
    ``selection[..., fixed_width:]`` (selection int64 [B, Hkv, F + R] contiguous, the
    batch's slots attended in every layer in front), then :func:`sparse_attention_cpu`
    over the whole selection into out f32 [B, Hq, Dv] and lse f32 [B, Hq]; adds the number of
    slots attended (selection >= 0) to ``attended`` int64 0-d."""
    extension().decode_layer(*_layer_args(q, rotation, centroids, scale, codes_buf, slots, plan, bounds, q32, q_rot,
                                          lut), selection, fixed_width, k_buf, v_buf, float(logit_cap), out, lse, attended)
