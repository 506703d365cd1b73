"""Which implementation runs a decode layer's retrieval and sparse attention, chosen once.

Three implementations of the same two contracts (:func:`a2ats_sglang.core.retrieval`'s
selection and :func:`a2ats_sglang.core.attention.sparse_attention`): the torch
references, the C++ CPU kernels (:mod:`.cpu`) and the Triton kernels (:mod:`.score`,
:mod:`.sparse_decode`). ``--a2ats-kernel`` asks for one; the one fallback rule: only
``auto`` falls back, to the torch references, when the device has no kernel of ours
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
    the next layer runs); lut f32 [B, Hq, NB, C]: the layer's lookup table; ``retrieve`` /
    ``attend``: the Triton kernels' workspaces (None for the other implementations)."""

    out: torch.Tensor
    lse: torch.Tensor
    lut: torch.Tensor | None
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

    def buffers(self, b: int, hq: int, hkv: int, dv: int, width: int, device, length: int = 0, kmax: int = 0,
                lut_shape: tuple[int, int] | None = None) -> DecodeBuffers:
        """Buffers for a batch of ``b`` requests attending ``width`` slots per KV head;
        with ``lut_shape`` = (NB, C), also those of retrieval over ``length`` positions with
        per-head top-``kmax``."""
        lut = None if lut_shape is None else torch.empty(b, hq, *lut_shape, dtype=torch.float32, device=device)
        if self.impl is not Impl.TRITON:
            return DecodeBuffers(torch.empty(b, hq, dv, dtype=torch.float32, device=device),
                                 torch.empty(b, hq, dtype=torch.float32, device=device), lut)
        from a2ats_sglang.kernels.score import RetrieveBuffers
        from a2ats_sglang.kernels.sparse_decode import AttendBuffers

        attend = AttendBuffers.allocate(b, hq, hkv, dv, width, device)
        ret = None if lut is None else RetrieveBuffers.allocate(b, hq, hkv, length, kmax, device)
        return DecodeBuffers(attend.out, attend.lse, lut, ret, attend)

    def retrieve(self, lut, codes_buf, slots, plan, bounds, out, buffers: DecodeBuffers) -> None:
        """One layer's retrieved physical slots into ``out`` int64 [B, Hkv, R] (ascending
        position, -1 padded; R >= the largest GQA union) from lut f32 [B, Hq, NB, C],
        codes_buf int16 [N, Hkv], slots int64 [B, L] (physical slot of each position), the
        batch's :class:`~a2ats_sglang.core.retrieval.SelectionPlan` and bounds f32 [max(1, NB-1)]."""
        if self.impl is Impl.TRITON:
            from a2ats_sglang.kernels.score import retrieve_triton

            retrieve_triton(lut, codes_buf, slots, plan, bounds, out, buffers.retrieve)
        elif self.impl is Impl.CPP:
            from a2ats_sglang.kernels.cpu import retrieve_cpu

            retrieve_cpu(lut, codes_buf, slots, plan, bounds[: lut.shape[2] - 1], out)
        else:
            codes = codes_buf[slots].permute(0, 2, 1)  # [B, Hkv, L]
            scores = retrieval.approx_scores(lut, codes, plan.seq_lens, bounds[: lut.shape[2] - 1], plan.sinks,
                                             plan.window)
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

            sparse_attention_cpu(q.float().contiguous(), k_buf, v_buf, slots.contiguous(), scale, logit_cap,
                                 buffers.out, buffers.lse)
        else:
            out, lse = attention.sparse_attention(q.float(), k_buf, v_buf, slots, scale, logit_cap)
            buffers.out.copy_(out)
            buffers.lse.copy_(lse)
