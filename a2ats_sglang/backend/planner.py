"""Planning a decode batch: everything that is the same in every layer, built once per
batch from host-side lengths (no device sync), so that a layer only runs kernels.

The planner is mode-agnostic; each strategy (:mod:`.on_device`, :mod:`.offload`) turns
a :class:`DecodeBatch` into its own metadata, with the selection buffer from
:meth:`DecodePlanner.selection_buffer`: per KV head the slots attended in every layer
(``fixed``) followed by room for one layer's retrieved slots, a host-known capacity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import torch

from a2ats_sglang.core.retrieval import Budget, SelectionPlan, mask_to_positions, positions_to_slots

logger = logging.getLogger(__name__)


@dataclass
class DecodeBatch:
    """What every layer of one decode batch shares. B requests, L = longest context.

    seq_lens: int64 [B] on the device, seq_lens_cpu the same on the host; positions: int64
    [B] the decode tokens' positions; slots: int64 [B, L] physical slot of each position
    (0 past a request's end); plan: the selection's layer-independent part, or None when
    nothing is retrieved (every request covered by its budget, or the batch below
    ``--a2ats-dense-below``)."""

    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    plan: SelectionPlan | None

    @cached_property
    def context_tokens(self) -> int:
        """Tokens in the batch's sequences (host lengths; summed once, read by every layer)."""
        return int(self.seq_lens_cpu.sum())

    @property
    def inside_host(self) -> torch.Tensor:
        """bool [B, L] on the host: positions inside each sequence."""
        return torch.arange(self.slots.shape[1]) < self.seq_lens_cpu.view(-1, 1)


@dataclass
class SelectionBuffer:
    """int64 [B, Hkv, F + R] physical slots, -1 padded: ``[..., :F]`` the slots attended in
    every layer (written once per batch), ``retrieved`` = ``[..., F:]`` where each layer
    writes its retrieved slots (R = g * max top-K, at most L)."""

    slots: torch.Tensor
    fixed_width: int

    @property
    def retrieved(self) -> torch.Tensor:
        return self.slots[..., self.fixed_width:]


class DecodePlanner:
    """Builds a :class:`DecodeBatch` per decode batch for ``num_kv_heads`` local KV heads
    and groups of ``group`` query heads."""

    def __init__(self, req_to_token: torch.Tensor, budget: Budget, sinks: int, window: int, dense_below: int,
                 num_kv_heads: int, group: int, device):
        self.req_to_token = req_to_token
        self.budget, self.sinks, self.window, self.dense_below = budget, sinks, window, dense_below
        self.num_kv_heads, self.group = num_kv_heads, group
        self.device = device

    def plan(self, forward_batch) -> DecodeBatch:
        lens_cpu = forward_batch.seq_lens_cpu.to(torch.int64)
        longest = int(lens_cpu.max())
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        plan = SelectionPlan.build(lens_cpu, self.budget, self.sinks, self.window, self.device)
        rows = self.req_to_token[forward_batch.req_pool_indices, :longest].to(torch.int64)
        inside = torch.arange(longest, device=rows.device) < seq_lens.view(-1, 1)
        slots = torch.where(inside, rows, torch.zeros_like(rows))
        dense = plan.covered or longest < self.dense_below
        return DecodeBatch(seq_lens, lens_cpu, seq_lens - 1, slots, None if dense else plan)

    def retrieve_capacity(self, batch: DecodeBatch) -> int:
        """R: room for one layer's retrieved slots per KV head (the union of g top-Ks)."""
        return 0 if batch.plan is None else min(self.group * batch.plan.kmax, batch.slots.shape[1])

    def selection_buffer(self, batch: DecodeBatch, fixed_host: torch.Tensor) -> SelectionBuffer:
        """The batch's selection buffer with ``fixed_host`` (bool [B, L] on the host: the
        positions attended in every layer, the same for every KV head) in front."""
        fixed = mask_to_positions(fixed_host).to(self.device)  # [B, F], no device sync
        width = fixed.shape[-1]
        out = torch.full((fixed.shape[0], self.num_kv_heads, width + self.retrieve_capacity(batch)), -1,
                         dtype=torch.int64, device=self.device)
        out[..., :width] = positions_to_slots(fixed.unsqueeze(1), batch.slots)
        return SelectionBuffer(out, width)


class AttendedShare:
    """The share of context token-heads that sparse decode layers attend, over every sparse
    layer of every sparse decode batch (layers differ under an adaptive budget), counted on
    the device (no sync on the hot path) and logged every ``interval`` batches."""

    def __init__(self, interval: int, device):
        self.interval = max(1, interval)
        self.batches = 0
        self.context = 0  # token-heads over the layers recorded, from host lengths
        self.attended = torch.zeros((), dtype=torch.int64, device=device)
        """int64 0-d device tensor: the token-heads attended so far (a kernel may add to it in place)."""
        self._at_last_log = (0, 0)

    def record(self, attended: torch.Tensor | None, batch: DecodeBatch, kv_heads: int) -> None:
        """One sparse layer of ``batch``: ``attended`` int64 0-d device tensor, the token-heads it
        attends (None: the layer's kernel already added them to :attr:`attended`)."""
        if attended is not None:
            self.attended += attended
        self.context += batch.context_tokens * kv_heads

    def batch(self, batch: DecodeBatch) -> None:
        """A sparse decode batch begins: every ``interval`` batches, log the share attended since the last line."""
        self.batches += 1
        if self.batches % self.interval or self.context == self._at_last_log[1]:
            return
        attended = int(self.attended)  # one sync per log line
        since = (attended - self._at_last_log[0], self.context - self._at_last_log[1])
        self._at_last_log = (attended, self.context)
        lens = batch.seq_lens_cpu
        logger.info("a2ats decode batch: #req %d, context %d tokens (longest %d); the sparse layers since the last "
                    "line attended %.1f%% of context (%.1f%% since start)", len(lens), int(lens.sum()),
                    int(lens.max()), 100.0 * since[0] / since[1], 100.0 * attended / self.context)

    @property
    def share(self) -> float:
        """Attended share over all sparse layers so far (syncs: not for the hot path)."""
        return int(self.attended) / max(1, self.context)
