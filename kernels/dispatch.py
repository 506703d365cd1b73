"""Which implementation encodes new keys and runs a decode layer's retrieval and sparse
attention, chosen once.

Three implementations of the same contracts (:meth:`a2ats_sglang.core.codebook.LayerCodebook.encode`,
:func:`a2ats_sglang.core.retrieval`'s selection and
:func:`a2ats_sglang.core.attention.sparse_attention`): the torch references, the C++ CPU
kernels (:mod:`.cpu`) and the Triton kernels (:mod:`.retrieve`, :mod:`.sparse_decode`;
keys are encoded by the torch reference there). ``--a2ats-kernel`` asks for one; the one
fallback rule: only ``auto`` falls back, to the torch references, when the device has no kernel of ours
or the C++ kernels cannot be built here; an explicit request that cannot be met stops
the start. Every call writes into buffers its caller allocated once per decode batch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from a2ats_sglang.core import attention, retrieval


class Impl(enum.Enum):
    TORCH = "torch"
    CPP = "cpp"
    TRITON = "triton"


@dataclass(frozen=True)
class DecodeBuffers:
    """A decode batch's buffers for one kernel choice, shared by its layers.

    out f32 [B, Hq, Dv] and lse f32 [B, Hq]: the attention result of a layer (read before
    the next layer runs); lut f32 [B, Hq, NB, C]: the layer's lookup table (None without
    retrieval); q32 f32 [B, Hq, D] and q_rot f32 [B, Hq, NB, D]: the C++ kernels' query
    workspaces; ``retrieve`` / ``attend``: the Triton kernels' workspaces (None for the
    other implementations)."""

    out: torch.Tensor
    lse: torch.Tensor
    lut: torch.Tensor | None
    q32: torch.Tensor | None = None
    q_rot: torch.Tensor | None = None
    retrieve: object | None = None
    attend: object | None = None


@dataclass(frozen=True)
class KernelChoice:
    impl: Impl
    reason: str

    @classmethod
    def select(cls, requested: str, device) -> "KernelChoice":
        """``requested``: auto | torch | cpp | triton (``--a2ats-kernel``)."""
        from a2ats_sglang.kernels import cpu

        device = torch.device(device)
        if requested == "auto":
            if device.type == "cuda":
                return cls(Impl.TRITON, "auto on a CUDA device")
            if device.type == "cpu":
                reason = cpu.unavailable_reason()
                if reason is None:
                    return cls(Impl.CPP, "auto on a CPU device")
                return cls(Impl.TORCH, f"auto on a CPU device; the C++ kernels cannot be built here ({reason})")
            return cls(Impl.TORCH, f"auto on a {device.type} device, which has no kernels of ours")
        impl = Impl(requested)
        if impl is Impl.CPP:
            if device.type != "cpu":
                raise ValueError(f"a2ats: --a2ats-kernel cpp runs on CPU tensors; the model is on {device}")
            cpu.extension()  # raises with the build error
        return cls(impl, "asked for with --a2ats-kernel")

    def buffers(self, b: int, hq: int, hkv: int, d: int, dv: int, width: int, device,
                lut_shape: tuple[int, int] | None = None) -> DecodeBuffers:
        """Buffers for a batch of ``b`` requests (head dims ``d`` / ``dv``) attending ``width``
        slots per KV head; with ``lut_shape`` = (NB, C), WRoPE distances x codes, also those of
        retrieval."""
        f32 = dict(dtype=torch.float32, device=device)
        if self.impl is Impl.TRITON:
            from a2ats_sglang.kernels.retrieve import RetrieveBuffers
            from a2ats_sglang.kernels.sparse_decode import AttendBuffers

            attend = AttendBuffers.allocate(b, hq, hkv, dv, width, device)
            ret = None if lut_shape is None else RetrieveBuffers.allocate(b, hq, hkv, *lut_shape, device)
            return DecodeBuffers(attend.out, attend.lse, None if ret is None else ret.lut, retrieve=ret, attend=attend)
        out, lse = torch.empty(b, hq, dv, **f32), torch.empty(b, hq, **f32)
        lut = None if lut_shape is None else torch.empty(b, hq, *lut_shape, **f32)
        if self.impl is Impl.CPP:
            q_rot = None if lut_shape is None else torch.empty(b, hq, lut_shape[0], d, **f32)
            return DecodeBuffers(out, lse, lut, torch.empty(b, hq, d, **f32), q_rot)
        return DecodeBuffers(out, lse, lut)

    def encode(self, books, rope, k, positions, codes_buf, loc) -> None:
        """Store the codes of post-RoPE keys k [T, Hkv, D] at ``positions`` int64 [T] in
        physical slots loc int64 [T] of codes_buf int16 [N, Hkv] (one layer's): un-rotated by
        ``rope`` (:class:`~a2ats_sglang.core.rope.RopeSpec`), encoded by ``books`` (the layer's
        :class:`~a2ats_sglang.core.codebook.LayerCodebook`). One native call with the C++ kernels."""
        if self.impl is Impl.CPP:
            from a2ats_sglang.kernels.cpu import encode_keys_cpu

            encode_keys_cpu(k, positions, rope, books.enc_rows, books.enc_bias, loc, codes_buf)
        else:
            codes_buf[loc] = books.encode(rope.unrotate(k.float(), positions.view(-1, 1)))

    def retrieve(self, q, rotation, centroids, scale: float, codes_buf, slots, plan, bounds, out,
                 buffers: DecodeBuffers) -> None:
        """One layer's retrieved physical slots into ``out`` int64 [B, Hkv, R] (ascending
        position, -1 padded; R >= the largest GQA union) and its lookup table into
        ``buffers.lut``. q [B, Hq, D] post-RoPE decode queries; rotation: the batch's
        :class:`~a2ats_sglang.core.retrieval.WRoPERotation`; centroids f32 [Hkv, C, D];
        ``scale``: the softmax scale; codes_buf int16 [N, Hkv]; slots int64 [B, L] (physical
        slot of each position); plan: the batch's
        :class:`~a2ats_sglang.core.retrieval.SelectionPlan`; bounds f32 [NB-1]."""
        if self.impl is Impl.TRITON:
            from a2ats_sglang.kernels.retrieve import retrieve_triton

            retrieve_triton(q, rotation.cos, rotation.sin, rotation.rope.neox, centroids, scale, codes_buf, slots, plan,
                            bounds, out, buffers.retrieve)
        elif self.impl is Impl.CPP:
            from a2ats_sglang.kernels.cpu import retrieve_layer_cpu

            retrieve_layer_cpu(q, rotation, centroids, scale, codes_buf, slots, plan, bounds, buffers.q32,
                               buffers.q_rot, buffers.lut, out)
        else:
            retrieval.lookup_table(rotation.apply(q), centroids, scale, out=buffers.lut)
            codes = codes_buf[slots].permute(0, 2, 1)  # [B, Hkv, L]
            scores = retrieval.approx_scores(buffers.lut, codes, plan.seq_lens, bounds, plan.sinks, plan.window)
            picked = retrieval.positions_to_slots(
                retrieval.mask_to_positions(plan.retrieved(scores, codes.shape[1])), slots)
            out.fill_(-1)
            out[..., : picked.shape[-1]] = picked

    def attend(self, q, k_buf, v_buf, slots, scale: float, logit_cap: float, buffers: DecodeBuffers) -> None:
        """Exact attention of q [B, Hq, D] over its KV head's ``slots`` int64 [B, Hkv, S] (-1
        pad) of k_buf [N, Hkv, D] / v_buf [N, Hkv, Dv] -> buffers.out f32 [B, Hq, Dv],
        buffers.lse f32 [B, Hq]."""
        if self.impl is Impl.TRITON:
            from a2ats_sglang.kernels.sparse_decode import sparse_decode_triton

            sparse_decode_triton(q, k_buf, v_buf, slots, scale, logit_cap, buffers.attend)
        elif self.impl is Impl.CPP:
            from a2ats_sglang.kernels.cpu import sparse_attention_cpu

            q32 = q if q.dtype == torch.float32 and q.is_contiguous() else buffers.q32.copy_(q)
            sparse_attention_cpu(q32, k_buf, v_buf, slots.contiguous(), scale, logit_cap, buffers.out, buffers.lse)
        else:
            out, lse = attention.sparse_attention(q.float(), k_buf, v_buf, slots, scale, logit_cap)
            buffers.out.copy_(out)
            buffers.lse.copy_(lse)

    def attend_paged(self, q, k_buf, v_buf, slots, seq_lens, scale: float, logit_cap: float,
                     buffers: DecodeBuffers) -> None:
        """Dense decode attention: each request of q [B, Hq, D] attends slots[b, :seq_lens[b]]
        (slots int64 [B, W] contiguous, W >= every length: the columns past a request's are
        never read; seq_lens int64 [B]) of k_buf [N, Hkv, D] / v_buf [N, Hkv, Dv] ->
        buffers.out f32 [B, Hq, Dv], buffers.lse f32 [B, Hq]. The C++ kernels and the torch
        reference."""
        if self.impl is Impl.CPP:
            from a2ats_sglang.kernels.cpu import paged_attention_cpu

            q32 = q if q.dtype == torch.float32 and q.is_contiguous() else buffers.q32.copy_(q)
            paged_attention_cpu(q32, k_buf, v_buf, slots, seq_lens, scale, logit_cap, buffers.out, buffers.lse)
        elif self.impl is Impl.TORCH:
            inside = torch.arange(slots.shape[1], device=slots.device) < seq_lens.view(-1, 1)
            per_head = torch.where(inside, slots, torch.full_like(slots, -1)).unsqueeze(1).expand(-1, k_buf.shape[1], -1)
            self.attend(q, k_buf, v_buf, per_head, scale, logit_cap, buffers)
        else:
            raise ValueError("a2ats: dense decode over a slot table has no Triton kernel (use SGLang's triton backend)")

    def decode(self, q, rotation, centroids, scale: float, codes_buf, slots, plan, bounds, selection,
               fixed_width: int, k_buf, v_buf, logit_cap: float, buffers: DecodeBuffers, attended) -> None:
        """A sparse decode layer: :meth:`retrieve` into ``selection[..., fixed_width:]``
        (selection int64 [B, Hkv, F + R]: the slots attended in every layer in front), then
        :meth:`attend` over the whole selection; the number of slots attended and of context
        token-heads are added to ``attended`` (int64 [2], in place). One native call with the
        C++ kernels."""
        if self.impl is Impl.CPP:
            from a2ats_sglang.kernels.cpu import decode_layer_cpu

            decode_layer_cpu(q, rotation, centroids, scale, codes_buf, slots, plan, bounds, buffers.q32, buffers.q_rot,
                             buffers.lut, selection, fixed_width, k_buf, v_buf, logit_cap, buffers.out, buffers.lse,
                             attended)
            return
        self.retrieve(q, rotation, centroids, scale, codes_buf, slots, plan, bounds, selection[..., fixed_width:],
                      buffers)
        self.attend(q, k_buf, v_buf, selection, scale, logit_cap, buffers)
        context = plan.seq_lens.clamp_max(slots.shape[1]).sum() * selection.shape[1]
        attended += torch.stack(((selection >= 0).sum(), context))
