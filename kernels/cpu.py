"""The CPU kernels (C++, one extension built on first use for this machine's CPU with
torch's extension builder, cached in ~/.cache/torch_extensions): key encoding, sparse and
dense decode attention, one layer's retrieval and the fused decode layer. Whether they
are used is decided once, by :class:`a2ats_sglang.kernels.dispatch.KernelChoice`; these
wrappers never fall back.

The entry points a decode step runs are also torch custom ops (``torch.ops.a2ats.*``,
:func:`torch.library.custom_op`): under ``torch.compile`` (SGLang's CPU graph runner) the
wrappers call the op, which the compiler sees as one opaque call that writes only the
buffers it names (its fake does nothing: no output changes shape), and the data-dependent
loops stay inside the kernel; eagerly they call the extension directly (no dispatcher
round trip).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

SOURCES = ("cpu_bindings.cpp", "cpu_sparse_attention.cpp", "cpu_select.cpp", "cpu_decode.cpp", "cpu_encode.cpp")


def load_sources(directory: Path, name: str = "a2ats_cpu_kernels"):
    """The extension built (or taken from torch's cache) from the SOURCES in ``directory``, as
    ``name``: this package's kernels, or (the benchmarks) another revision's kernels directory."""
    from torch.utils.cpp_extension import load

    return load(name=name, sources=[str(directory / f) for f in SOURCES], extra_include_paths=[str(directory)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


@lru_cache(maxsize=1)
def _build():
    """-> (extension module, None) or (None, the reason it cannot be built)."""
    try:
        return load_sources(Path(__file__).parent), None
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


def _custom_op(name: str, mutates: tuple[str, ...]):
    """Register the decorated function as ``torch.ops.a2ats.<name>``, writing ``mutates`` and
    returning nothing, with a fake that does nothing (safe to import twice: an op already
    registered in this process is reused)."""

    def register(fn):
        if hasattr(torch.ops.a2ats, name):  # registered by an earlier import of this module
            return getattr(torch.ops.a2ats, name).default
        op = torch.library.custom_op(f"a2ats::{name}", fn, mutates_args=mutates)
        op.register_fake(lambda *args: None)
        return op

    return register


@_custom_op("encode_keys", ("codes",))
def _encode_keys_op(k: Tensor, positions: Tensor, inv_freq: Tensor, neox: bool, mscale: float, enc_rows: Tensor,
                    enc_bias: Tensor, loc: Tensor, codes: Tensor) -> None:
    extension().encode_keys(k, positions, inv_freq, neox, mscale, enc_rows, enc_bias, loc, codes)


@_custom_op("sparse_attention", ("out", "lse"))
def _sparse_attention_op(q: Tensor, k_buf: Tensor, v_buf: Tensor, slots: Tensor, scale: float, logit_cap: float,
                         out: Tensor, lse: Tensor) -> None:
    extension().sparse_attention(q, k_buf, v_buf, slots, scale, logit_cap, out, lse)


@_custom_op("paged_attention", ("out", "lse"))
def _paged_attention_op(q: Tensor, k_buf: Tensor, v_buf: Tensor, slots: Tensor, seq_lens: Tensor, scale: float,
                        logit_cap: float, out: Tensor, lse: Tensor) -> None:
    extension().paged_attention(q, k_buf, v_buf, slots, seq_lens, scale, logit_cap, out, lse)


@_custom_op("decode_layer", ("q32", "q_rot", "lut", "selection", "out", "lse", "attended"))
def _decode_layer_op(q: Tensor, cos: Tensor, sin: Tensor, neox: bool, centroids: Tensor, scale: float, codes: Tensor,
                     slots: Tensor, seq_lens: Tensor, k: Tensor, top_p: float, min_tokens: int, bounds: Tensor,
                     sinks: int, window: int, q32: Tensor, q_rot: Tensor, lut: Tensor, selection: Tensor,
                     fixed_width: int, k_buf: Tensor, v_buf: Tensor, logit_cap: float, out: Tensor, lse: Tensor,
                     attended: Tensor) -> None:
    extension().decode_layer(q, cos, sin, neox, centroids, scale, codes, slots, seq_lens, k, top_p, min_tokens, bounds,
                             sinks, window, q32, q_rot, lut, selection, fixed_width, k_buf, v_buf, logit_cap, out, lse,
                             attended)


def _entry(op, name: str):
    """The custom op while torch.compile traces, else the extension's function."""
    return op if torch.compiler.is_compiling() else getattr(extension(), name)


def encode_keys_cpu(k, positions, rope, enc_rows, enc_bias, loc, codes_buf) -> None:
    """Codes of post-RoPE keys k [T, Hkv, D] (any float dtype, last dim contiguous) at
    ``positions`` int64 [T], stored at physical slots loc int64 [T] of codes_buf int16 [N, Hkv]:
    un-rotated by ``rope`` (:meth:`a2ats_sglang.core.rope.RopeSpec.unrotate`), then the nearest
    centroid in the whitened space, argmax_c (enc_rows [Hkv, C, D] . k + enc_bias [Hkv, C]) (f32,
    contiguous), as :meth:`a2ats_sglang.core.codebook.LayerCodebook.encode`."""
    _entry(_encode_keys_op, "encode_keys")(k.float(), positions.long().contiguous(), rope.inv_freq, rope.neox, float(rope.mscale),
                            enc_rows, enc_bias, loc.long().contiguous(), codes_buf)


def sparse_attention_cpu(q, k_buf, v_buf, slots, scale: float, logit_cap: float, out, lse) -> None:
    """Decode attention over selected slots into caller-owned buffers.

    q f32 [B, Hq, D] contiguous; k_buf [N, Hkv, D], v_buf [N, Hkv, Dv] (f32/bf16/f16);
    slots int64 [B, Hkv, S] contiguous (-1 = padding) -> writes out f32 [B, Hq, Dv] and
    lse f32 [B, Hq] (the contract of :func:`a2ats_sglang.core.attention.sparse_attention`)."""
    _entry(_sparse_attention_op, "sparse_attention")(q, k_buf, v_buf, slots, float(scale), float(logit_cap), out, lse)


def paged_attention_cpu(q, k_buf, v_buf, slots, seq_lens, scale: float, logit_cap: float, out, lse) -> None:
    """Dense decode attention over a slot table: each request attends slots[b, :seq_lens[b]]
    (int64 [B, L] contiguous; the columns past a request's length are never read, so L may be
    a capacity); seq_lens int64 [B] contiguous; q, k_buf, v_buf, out, lse as
    :func:`sparse_attention_cpu`."""
    _entry(_paged_attention_op, "paged_attention")(q, k_buf, v_buf, slots, seq_lens, float(scale), float(logit_cap),
                                                   out, lse)


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
    slots attended (selection >= 0) and of context token-heads to ``attended`` int64 [2]."""
    _entry(_decode_layer_op, "decode_layer")(*_layer_args(q, rotation, centroids, scale, codes_buf, slots, plan, bounds, q32, q_rot,
                                          lut), selection, fixed_width, k_buf, v_buf, float(logit_cap), out, lse, attended)
