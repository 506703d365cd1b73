"""Retrieval at a decode step (A2ATS section 3, with multi-scale WRoPE of section 5).

Shapes: B requests, Hq query heads, Hkv KV heads (group g = Hq / Hkv), NB WRoPE
distances, C codes, L = longest context in the batch. Positions are logical
(0 .. seq_len-1); the decode token is at seq_len-1 and its KV is already stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from a2ats_sglang.core.rope import RopeSpec


@dataclass(frozen=True)
class Budget:
    """How many tokens each query head retrieves (sinks and the window come on top).

    Fixed (``top_p == 0``): ``clamp(ceil(ratio * seq_len), min_tokens, max_tokens)``.
    Adaptive (``0 < top_p <= 1``, the paper's future work): each query head takes the
    fewest tokens, best first, whose estimated softmax mass (``exp(score - max)`` of the
    approximate scores) reaches ``top_p`` of the mass of all retrievable tokens, clamped
    to ``[min_tokens, max_tokens]``; ``ratio`` is not used. A request whose sinks + window
    + least budget cover the whole sequence attends everything (equal to dense
    attention). The defaults live in the options table: ``A2ATSConfig().budget_policy``."""

    ratio: float
    min_tokens: int
    max_tokens: int
    top_p: float

    def __post_init__(self):
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"budget ratio must be in (0, 1], got {self.ratio}")
        if self.min_tokens < 0 or self.max_tokens < max(1, self.min_tokens):
            raise ValueError(f"need 0 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top-p must be in [0, 1] (0 = off), got {self.top_p}")

    def tokens(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """seq_lens: int [B] -> the most tokens a query head may retrieve (int64 [B]): the
        top-K of a fixed budget, the upper clamp of an adaptive one."""
        if self.top_p:
            return seq_lens.long().clamp(self.min_tokens, self.max_tokens)
        k = torch.ceil(seq_lens.double() * self.ratio).long()
        return k.clamp(self.min_tokens, self.max_tokens)

    def describe(self) -> str:
        bounds = f"[{self.min_tokens}, {self.max_tokens}] tokens per query head"
        return f"top-p {self.top_p:g} {bounds}" if self.top_p else f"budget {self.ratio:g} of the context {bounds}"

    def least_tokens(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """seq_lens: int [B] -> the fewest tokens a query head retrieves (int64 [B])."""
        return torch.full_like(seq_lens.long(), self.min_tokens) if self.top_p else self.tokens(seq_lens)


PAPER_B = 2048
MULTISCALE_RANGE = (96, 12288)


def wrope_distances(num: int, lo: int = MULTISCALE_RANGE[0], hi: int = MULTISCALE_RANGE[1], b: int = PAPER_B) -> tuple[int, ...]:
    """WRoPE query distances: ``(b,)`` for one (the paper), else ``num`` log-spaced from lo to hi."""
    if num < 1:
        raise ValueError(f"need at least one WRoPE distance, got {num}")
    if num == 1:
        return (int(b),)
    r = (hi / lo) ** (1.0 / (num - 1))
    return tuple(int(round(lo * r**i)) for i in range(num))


def distance_bounds(distances: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Upper bounds (exclusive, float32 [NB-1]) of each distance bucket: geometric
    midpoints, so a token uses the WRoPE distance nearest its own in log scale."""
    d = list(distances)
    return torch.tensor([math.sqrt(a * b) for a, b in zip(d[:-1], d[1:])], dtype=torch.float32)


def bucket_of(dist: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """dist: int [...] distances -> bucket index int64 [...] (0 for one distance)."""
    if bounds.numel() == 0:
        return torch.zeros_like(dist, dtype=torch.long)
    return torch.bucketize(dist.float(), bounds.to(dist.device), right=True)


def retrieval_break_even(distances, num_codes: int, budget: Budget, sinks: int, window: int, group: int,
                         longest: int) -> int:
    """The shortest context from which retrieval costs less than attending every token, at
    every length up to ``longest`` (``longest + 1`` when it never does): what
    ``--a2ats-dense-below -1`` (auto) resolves to.

    Cost in dot products of the head dimension per query head. Dense: 2 L (scores and
    values of every token). Sparse: the lookup table's rows of the WRoPE buckets a request
    reads (those up to the bucket of its farthest scorable position, the kernels' rule) x
    C codes, plus 2 per attended token (its KV head's GQA union of ``group`` budgets, sinks
    and window; the least count under top-p). The selection's pass over the codes (a few
    operations per token and KV head) is left out. At short contexts the table alone
    costs as much as dense attention: 4 buckets x 512 codes at 1K tokens."""
    lens = torch.arange(1, longest + 1)
    used = bucket_of((lens - 1 - sinks).clamp_min(0), distance_bounds(distances)) + 1
    attended = torch.minimum(lens, group * budget.least_tokens(lens) + sinks + window)
    loses = (used * num_codes + 2 * attended >= 2 * lens).nonzero()
    return int(loses.max()) + 2 if loses.numel() else 1


@dataclass(frozen=True)
class WRoPERotation:
    """A decode batch's WRoPE rotation, the same in every layer: cos and sin float32
    [B, NB, rotary_dim // 2] of the rotation taking each request's query from its
    position to each WRoPE distance; ``rope`` gives the pairing and the rotary dims."""

    rope: RopeSpec
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(cls, rope: RopeSpec, positions: torch.Tensor, distances) -> "WRoPERotation":
        """positions int [B] of the decode tokens; distances: NB ints or a float32 tensor."""
        dist = torch.as_tensor(distances, dtype=torch.float32, device=positions.device)
        return cls(rope, *rope.cos_sin(dist.view(1, -1) - positions.view(-1, 1).float()))

    def apply(self, q_post: torch.Tensor) -> torch.Tensor:
        """WRoPE queries: q_post [B, Hq, D] after RoPE at the batch's positions -> float32
        [B, Hq, NB, D], each = RoPE(q_pre, distance) (one rotation by distance - position)."""
        return self.rope.apply(q_post.unsqueeze(2), self.cos.unsqueeze(1), self.sin.unsqueeze(1))


def lookup_table(q_rot: torch.Tensor, centroids: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """LUT[b, h, n, c] = scale * q_rot[b, h, n] . centroid[kv(h), c].

    q_rot: [B, Hq, NB, D]; centroids: [Hkv, C, D] -> float32 [B, Hq, NB, C], written into
    ``out`` (contiguous) when given."""
    b, hq, nb, d = q_rot.shape
    hkv, c = centroids.shape[:2]
    if out is None:
        out = torch.empty(b, hq, nb, c, dtype=torch.float32, device=q_rot.device)
    grouped = out.view(b, hkv, hq // hkv * nb, c)
    q = q_rot.float().reshape(b, hkv, -1, d)
    cent_t = centroids.float().transpose(1, 2)
    for i in range(b):  # one GEMM per request: a matmul broadcasting over B takes a path several times slower
        torch.bmm(q[i], cent_t, out=grouped[i])
    return out.mul_(scale)


def approx_scores(
    lut: torch.Tensor, codes: torch.Tensor, seq_lens: torch.Tensor, bounds: torch.Tensor, sinks: int, window: int
) -> torch.Tensor:
    """Approximate scores of every scorable token (torch reference of the Triton kernel).

    lut: [B, Hq, NB, C]; codes: int [B, Hkv, L] codes of each request's tokens in
    position order; seq_lens: [B]. -> float32 [B, Hq, L], -inf for sinks, window and
    positions past the sequence."""
    b, hq, nb, c = lut.shape
    hkv, length = codes.shape[1], codes.shape[2]
    g = hq // hkv
    pos = torch.arange(length, device=codes.device)
    dist = (seq_lens.view(-1, 1) - 1 - pos).clamp_min(0)  # [B, L]
    flat = bucket_of(dist, bounds) * c  # [B, L]
    idx = (codes.long() + flat.unsqueeze(1)).repeat_interleave(g, dim=1)  # [B, Hq, L]
    s = lut.reshape(b, hq, nb * c).gather(2, idx)
    scorable = (pos >= sinks) & (pos < seq_lens.view(-1, 1) - window)
    return s.masked_fill(~scorable.unsqueeze(1), float("-inf"))


@dataclass
class SelectionPlan:
    """What a decode batch's selection needs that is the same in every layer, built once
    per batch from host-side lengths (no device sync). B requests, L = longest context.

    seq_lens int64 [B]; k int64 [B] the most tokens a query head retrieves (a fixed
    budget's top-K); kmax = max(k, capped at L), the host-known bound of every per-head
    count; top_p: the adaptive budget's mass (0: fixed budget), whose per-head counts are
    clamped to [min_tokens, k]; fixed bool [B, L] sinks + window (the whole sequence for
    a request its budget covers), only positions < seq_len, and fixed_host the same on
    the CPU; covered: every request is covered (dense)."""

    seq_lens: torch.Tensor
    k: torch.Tensor
    kmax: int
    top_p: float
    min_tokens: int
    fixed: torch.Tensor
    fixed_host: torch.Tensor
    sinks: int
    window: int
    covered: bool

    @classmethod
    def build(cls, seq_lens: torch.Tensor, budget: Budget, sinks: int, window: int, device=None,
              length: int | None = None, dense_below: int = 0) -> "SelectionPlan":
        """``length``: L of the score rows (default: the longest sequence); a request shorter
        than ``dense_below`` attends everything, like one its budget covers (its top-K is 0)."""
        lens = seq_lens.detach().to("cpu", torch.int64)
        if length is None:
            length = int(lens.max()) if lens.numel() else 0
        dense = ((budget.least_tokens(lens) + sinks + window) >= lens) | (lens < dense_below)
        k = torch.where(lens < dense_below, 0, budget.tokens(lens))
        pos = torch.arange(length)
        fixed = ((pos < sinks) | (pos >= lens.view(-1, 1) - window) | dense.view(-1, 1)) & (pos < lens.view(-1, 1))
        device = device if device is not None else seq_lens.device
        kmax = int(min(int(k.max()), length)) if lens.numel() else 0
        return cls(lens.to(device), k.to(device), kmax, budget.top_p, budget.min_tokens, fixed.to(device), fixed,
                   sinks, window, bool(dense.all()))

    def head_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        """How many tokens each query head retrieves, int64 [B, Hq] (at most its scorable
        tokens). scores: [B, Hq, L] from :func:`approx_scores`.

        Adaptive budget: the fewest best tokens whose mass ``exp(s - max)`` (float64)
        reaches ``top_p`` of the total; the kernels compute the same count from the
        lookup table's cells (tokens of one cell share a weight)."""
        scorable = (scores > float("-inf")).sum(-1)
        if not self.top_p:
            want = self.k.view(-1, 1).expand_as(scorable)
        else:
            s = scores.double().sort(dim=-1, descending=True).values
            w = (s - s[..., :1]).exp().nan_to_num(0.0)  # 0 past the scorable tokens (and for a row of none)
            cum = w.cumsum(-1)
            reach = (cum < self.top_p * cum[..., -1:]).sum(-1) + 1
            want = torch.minimum(reach.clamp_min(self.min_tokens), self.k.view(-1, 1))
        return torch.minimum(want, scorable)

    def retrieved(self, scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """One layer's retrieved part, bool [B, Hkv, L], disjoint from ``fixed``: the best
        :meth:`head_tokens` of each query head (ties to the earlier position), unioned over
        the GQA group. scores: [B, Hq, L] from :func:`approx_scores`."""
        b, hq, length = scores.shape
        hit = torch.zeros(b, hq, length, dtype=torch.bool, device=scores.device)
        if self.kmax > 0:
            idx = scores_with_position_tiebreak(scores).topk(self.kmax, dim=-1).indices  # [B, Hq, kmax]
            ok = torch.arange(self.kmax, device=scores.device) < self.head_tokens(scores).unsqueeze(-1)
            hit.scatter_(2, idx, ok)
        return hit.view(b, num_kv_heads, hq // num_kv_heads, length).any(2) & ~self.fixed.unsqueeze(1)


def selection_masks(
    scores: torch.Tensor, seq_lens: torch.Tensor, budget: Budget, sinks: int, window: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of a selection, bool [B, Hkv, L] each, disjoint: ``fixed`` (sinks +
    window, or everything a budget covers) and ``retrieved`` (:meth:`SelectionPlan.retrieved`).
    One-off; the backend builds the plan once per batch."""
    plan = SelectionPlan.build(seq_lens, budget, sinks, window, scores.device, scores.shape[-1])
    return plan.fixed.unsqueeze(1).expand(-1, num_kv_heads, -1), plan.retrieved(scores, num_kv_heads)


def select(
    scores: torch.Tensor, seq_lens: torch.Tensor, budget: Budget, sinks: int, window: int, num_kv_heads: int
) -> torch.Tensor:
    """Selected positions per KV head: sinks, window and the retrieved top-K (see
    :func:`selection_masks`); everything when that covers the sequence.

    -> int64 [B, Hkv, S], ascending positions, -1 padded (S = the largest selection)."""
    fixed, retrieved = selection_masks(scores, seq_lens, budget, sinks, window, num_kv_heads)
    return mask_to_positions(fixed | retrieved)


def scores_with_position_tiebreak(scores: torch.Tensor) -> torch.Tensor:
    """float32 [..., L] -> int64 keys ordered like the scores, ties going to the earlier
    position: tokens sharing a code tie, and the selection must not depend on what
    else is in the batch. (float32 bits made order-preserving, then the position.)"""
    bits = scores.float().contiguous().view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    length = scores.shape[-1]
    rank = length - 1 - torch.arange(length, device=scores.device)
    return (ordered << 32) | rank


def mask_to_positions(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., L] -> int64 [..., S] ascending set positions, -1 padded (S = max count).
    A stable compaction (prefix sum + scatter), O(L), no sort."""
    length = mask.shape[-1]
    s = int(mask.sum(-1).max()) if mask.numel() else 0
    dest = torch.where(mask, mask.long().cumsum(-1) - 1, s)  # unselected go to a spill column
    out = torch.full((*mask.shape[:-1], s + 1), -1, dtype=torch.int64, device=mask.device)
    out.scatter_(-1, dest, torch.arange(length, device=mask.device).expand_as(dest))
    return out[..., :s]


def positions_to_slots(positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """positions int64 [B, H, S] (-1 pad) + slots int64 [B, L] physical slot of each
    position -> physical slots int64 [B, H, S] (-1 pad)."""
    b, h, s = positions.shape
    phys = slots.gather(1, positions.clamp_min(0).reshape(b, h * s)).view(b, h, s)
    return torch.where(positions >= 0, phys, torch.full_like(phys, -1))
