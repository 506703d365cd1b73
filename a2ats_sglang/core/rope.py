"""Windowed RoPE: rotary embedding as an explicit rotation, so keys can be
un-rotated to position-free form and queries rotated to a fixed distance.

All rotary variants whose angle is linear in position (default, linear,
llama3, yarn, partial rotary, neox or interleaved pairing) reduce to
``angle(p) = p * inv_freq`` plus a magnitude scale ``mscale``; that is what a
:class:`RopeSpec` holds. It is read from the model itself (SGLang's rotary
module in the server, the Hugging Face module at calibration), never assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one attention layer.

    inv_freq: float32 [rotary_dim // 2], angle per position of each rotated pair.
    head_dim: full head dim D (dims past ``rotary_dim`` pass through).
    neox: True for rotate-half pairing (i, i + rotary_dim/2), False for (2i, 2i+1).
    mscale: magnitude factor folded into cos/sin (yarn), 1.0 otherwise.
    """

    inv_freq: torch.Tensor
    head_dim: int
    neox: bool = True
    mscale: float = 1.0

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def __post_init__(self):
        if self.inv_freq.dim() != 1 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"rotary dim {self.rotary_dim} does not fit head dim {self.head_dim}"
            )

    def cos_sin(self, pos: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (float32 [..., rotary_dim // 2], no ``mscale``) of the rotation by
        ``pos`` (float32, any shape, may be negative)."""
        pos = torch.as_tensor(pos, dtype=torch.float32, device=self.inv_freq.device)
        ang = pos.unsqueeze(-1) * self.inv_freq.to(pos.device)
        return ang.cos(), ang.sin()

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., D] rotated by precomputed cos/sin [..., rotary_dim // 2] (broadcasting;
        dims past rotary_dim pass through) -> float32 [..., D]. The kernels apply the same
        pairing to a per-batch table (:meth:`cos_sin`): out_i = x_i cos - x_j sin,
        out_j = x_j cos + x_i sin for each pair (i, j)."""
        xf = x.float()
        rd = self.rotary_dim
        rot, rest = xf[..., :rd], xf[..., rd:]
        if self.neox:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((out, rest.expand(*out.shape[:-1], -1)), dim=-1)

    def rotate(self, x: torch.Tensor, pos: torch.Tensor | float) -> torch.Tensor:
        """RoPE(x, pos). x: [..., D] any float dtype; pos broadcasts to x.shape[:-1]
        (int or float, may be negative). Computed in float32, returned in x.dtype."""
        cos, sin = self.cos_sin(torch.as_tensor(pos, dtype=torch.float32, device=x.device))
        return self.apply(x, cos * self.mscale, sin * self.mscale).to(x.dtype)

    def unrotate(self, x: torch.Tensor, pos: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`rotate`: recovers pre-RoPE vectors from post-RoPE ones."""
        pos = torch.as_tensor(pos, dtype=torch.float32, device=x.device)
        out = self.rotate(x.float(), -pos) / (self.mscale**2)
        rd = self.rotary_dim
        out[..., rd:] = x[..., rd:].float()
        return out.to(x.dtype)

    def shift(self, x: torch.Tensor, delta: torch.Tensor | float) -> torch.Tensor:
        """Post-RoPE vectors at position p -> the same vectors as RoPE would give them at
        p + ``delta`` (broadcasts to x.shape[:-1], may be negative): a pure rotation by
        ``delta`` (angles are linear in position, so rotations compose; ``mscale`` is already
        in x). Computed in float32, returned in x.dtype."""
        return self.apply(x, *self.cos_sin(torch.as_tensor(delta, dtype=torch.float32, device=x.device))).to(x.dtype)

    def to(self, device) -> "RopeSpec":
        """The same rotation with its frequencies on ``device`` (no copy per call there)."""
        return RopeSpec(self.inv_freq.to(device), self.head_dim, self.neox, self.mscale)

    def describe(self) -> dict:
        return {"head_dim": self.head_dim, "rotary_dim": self.rotary_dim, "neox": self.neox, "mscale": self.mscale}

    def check_matches(self, other: "RopeSpec", what: str) -> None:
        """Raise ValueError naming the difference if ``other`` is a different rotary embedding
        (the magnitude scale compared to float32 precision: calibration and the server
        compute it in different orders)."""
        mine, theirs = self.describe(), other.describe()
        if ([mine[k] for k in ("head_dim", "rotary_dim", "neox")] != [theirs[k] for k in ("head_dim", "rotary_dim", "neox")]
                or not math.isclose(mine["mscale"], theirs["mscale"], rel_tol=1e-6)):
            raise ValueError(f"{what}: rotary embedding differs: {mine} vs {theirs}")
        if not torch.allclose(self.inv_freq.float().cpu(), other.inv_freq.float().cpu(), rtol=1e-4, atol=1e-7):
            raise ValueError(f"{what}: rotary frequencies differ (rope theta or scaling)")

    @classmethod
    def from_cos_sin_cache(cls, cache: torch.Tensor, head_dim: int, neox: bool) -> "RopeSpec":
        """From SGLang's ``cos_sin_cache`` [max_pos, rotary_dim] (cos half, sin half).

        Raises ValueError if the angles are not linear in position (e.g. dynamic NTK)."""
        cache = cache.double()
        cos, sin = cache.chunk(2, dim=-1)
        mscale = float(cos[0].mean())
        inv_freq = torch.atan2(sin[1], cos[1])
        n = cache.shape[0]
        pos = torch.tensor([n // 3, n - 1], dtype=torch.float64)
        ang = pos[:, None] * inv_freq
        if not (
            torch.allclose(ang.cos() * mscale, cos[pos.long()], atol=2e-3)
            and torch.allclose(ang.sin() * mscale, sin[pos.long()], atol=2e-3)
        ):
            raise ValueError("rotary embedding is not linear in position; A2ATS cannot un-rotate its keys")
        return cls(inv_freq.float(), head_dim, neox, mscale)

    @classmethod
    def from_sglang(cls, rotary_emb) -> "RopeSpec":
        """From an SGLang ``RotaryEmbedding`` module; rebuilt in float32 for precision."""
        cache = rotary_emb._compute_cos_sin_cache().float()
        return cls.from_cos_sin_cache(cache, rotary_emb.head_size, bool(rotary_emb.is_neox_style))

    @classmethod
    def from_module(cls, rotary, head_dim: int, context_len: int) -> "RopeSpec":
        """From the module that rotates a served layer's keys: SGLang's rotary embeddings
        (their cos/sin cache); Phi-3's LongRoPE (its short factors, which it applies until a
        position of the batch passes ``original_max_position_embeddings``, after which it
        re-rotates the whole batch with its long ones: refused when the server's
        ``context_len`` can pass that); a Hugging Face style module (``inv_freq``,
        ``attention_scaling``: SGLang's Gemma-3 rotates at model level with one).
        Raises ValueError for a rotation that cannot be un-rotated."""
        if hasattr(rotary, "short_factor") and hasattr(rotary, "long_factor"):
            limit = rotary.original_max_position_embeddings
            if context_len > limit:
                raise ValueError(
                    f"a2ats: the rotary embedding ({type(rotary).__name__}) re-rotates every key of a batch with its "
                    f"long factors once a position passes {limit}, so keys stored before cannot be un-rotated; serve "
                    f"with --context-length {limit} or less")
            cache = rotary._compute_cos_sin_cache(limit, rotary.short_factor, rotary.short_mscale)
            return cls.from_cos_sin_cache(cache.float(), rotary.head_size, True)
        if hasattr(rotary, "_compute_cos_sin_cache"):
            return cls.from_sglang(rotary)
        if hasattr(rotary, "inv_freq") and "dynamic" not in str(getattr(rotary, "rope_type", "")):
            return cls.from_hf(rotary, head_dim)
        raise ValueError(f"a2ats: cannot read the rotation of {type(rotary).__name__} as one linear in position")

    @classmethod
    def from_hf(cls, rotary_emb, head_dim: int) -> "RopeSpec":
        """From a Hugging Face ``*RotaryEmbedding`` (rotate-half models: Llama, Qwen2, Mistral...;
        a module with one rotation per layer type, Gemma-3's: the full-attention one, that of
        the layers a2ats retrieves in)."""
        kind = "full_attention_" if hasattr(rotary_emb, "full_attention_inv_freq") else ""
        return cls(getattr(rotary_emb, kind + "inv_freq").detach().float().cpu(), head_dim, True,
                   float(getattr(rotary_emb, kind + "attention_scaling")))
