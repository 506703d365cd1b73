"""Planning a decode batch: everything that is the same in every layer, built once per
batch from host-side lengths (no device sync), so that a layer only runs kernels.

The planner is mode-agnostic; each strategy (:mod:`.on_device`, :mod:`.offload`) turns
a :class:`DecodeBatch` into its own metadata, with the selection buffer from
:meth:`DecodePlanner.selection_buffer`: per KV head the slots attended in every layer
(``fixed``) followed by room for one layer's retrieved slots, a host-known capacity.

Under a graph runner (:meth:`DecodePlanner.init_graph_state`) a batch of a captured size
is planned into that size's static buffers (:class:`GraphBuffers`), whose widths come from
:class:`GraphCapacity` instead of the batch, and every decode batch of that size takes the
sparse path (a request its budget covers attends everything through its fixed part), so
the captured step never changes shape or branch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from a2ats_sglang.core.retrieval import Budget, SelectionPlan, mask_to_positions, positions_to_slots

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphCapacity:
    """The widths a captured decode step is sized for, whatever its batch holds: context,
    the longest sequence the server admits (SGLang's request-to-token table width); fixed,
    the most positions one request attends in every layer (sinks + window, or all of a
    sequence its budget covers or shorter than ``--a2ats-dense-below``); retrieved, the
    most slots one layer retrieves per KV head (the union of g top-Ks, at most context)."""

    context: int
    fixed: int
    retrieved: int

    @classmethod
    def of(cls, budget: Budget, sinks: int, window: int, dense_below: int, group: int, context: int) -> "GraphCapacity":
        lens = torch.arange(1, context + 1)
        covered = lens[budget.least_tokens(lens) + sinks + window >= lens]
        longest_covered = int(covered.max()) if covered.numel() else 0
        fixed = min(context, max(sinks + window, longest_covered, dense_below - 1))
        retrieved = min(context, group * int(budget.tokens(lens[-1:])[0]))
        return cls(context, fixed, retrieved)


@dataclass
class GraphBuffers:
    """One captured batch size's static buffers (the compiled step was traced with their
    shapes): slots int64 [bs, context] the physical slot of each position (columns past a
    request's length are never read); selection int64 [bs, Hkv, fixed + retrieved]."""

    slots: torch.Tensor
    selection: torch.Tensor


@dataclass
class DecodeBatch:
    """What every layer of one decode batch shares. B requests, L = longest context (a
    captured batch: the graph capacity's context).

    seq_lens: int64 [B] on the device, seq_lens_cpu the same on the host; positions: int64
    [B] the decode tokens' positions; slots: int64 [B, L] physical slot of each position
    (0 past a request's end); plan: the selection's layer-independent part, or None when
    nothing is retrieved (every request covered by its budget or shorter than
    ``--a2ats-dense-below``; never for a captured batch); graph: the static buffers of a
    captured batch size, else None."""

    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    plan: SelectionPlan | None
    graph: GraphBuffers | None = None

    @property
    def inside_host(self) -> torch.Tensor:
        """bool [B, longest] on the host: positions inside each sequence."""
        return torch.arange(int(self.seq_lens_cpu.max())) < self.seq_lens_cpu.view(-1, 1)

    @property
    def dense(self) -> bool:
        """Every request attends all of its sequence (nothing retrieved in any layer)."""
        return self.plan is None or self.plan.covered


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


@dataclass
class CaptureBatch:
    """The fields of a ForwardBatch that planning reads, for the batch a graph runner captures
    with (it passes them one by one): bs requests, seq_lens / req_pool_indices int64 [bs],
    out_cache_loc int64 [bs]; no host lengths (:func:`host_seq_lens` reads seq_lens, on the CPU)."""

    batch_size: int
    seq_lens: torch.Tensor
    req_pool_indices: torch.Tensor
    out_cache_loc: torch.Tensor
    forward_mode: object
    seq_lens_cpu: torch.Tensor | None = None


def slot_table(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, longest: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [B, longest] the physical slot of each position of each request (0 past its
    length), from SGLang's request-to-token table; written into ``out`` (a view of that
    shape, e.g. the first columns of a captured batch's static table) when given."""
    rows = req_to_token[req_pool_indices, :longest].to(torch.int64)
    inside = torch.arange(longest, device=rows.device) < seq_lens.view(-1, 1)
    zero = torch.zeros_like(rows)
    return torch.where(inside, rows, zero) if out is None else torch.where(inside, rows, zero, out=out)


def host_seq_lens(forward_batch) -> torch.Tensor:
    """int64 [B] the batch's sequence lengths on the host: SGLang's host copy, or (a batch a
    graph runner built, which has none) the lengths themselves, on the CPU device only."""
    if forward_batch.seq_lens_cpu is not None:
        return forward_batch.seq_lens_cpu.to(torch.int64)
    if forward_batch.seq_lens.device.type != "cpu":
        raise ValueError("a2ats: a decode batch without host sequence lengths on a non-CPU device")
    return forward_batch.seq_lens.to(torch.int64)


class DecodePlanner:
    """Builds a :class:`DecodeBatch` per decode batch for ``num_kv_heads`` local KV heads
    and groups of ``group`` query heads."""

    def __init__(self, req_to_token: torch.Tensor, budget: Budget, sinks: int, window: int, dense_below: int,
                 num_kv_heads: int, group: int, device):
        self.req_to_token = req_to_token
        self.budget, self.sinks, self.window, self.dense_below = budget, sinks, window, dense_below
        self.num_kv_heads, self.group = num_kv_heads, group
        self.device = device
        self.capacity: GraphCapacity | None = None
        self.graph: dict[int, GraphBuffers] = {}  # captured batch size -> its static buffers

    def init_graph_state(self, context: int) -> GraphCapacity:
        """Size the static buffers of captured batches for sequences up to ``context`` tokens."""
        self.capacity = GraphCapacity.of(self.budget, self.sinks, self.window, self.dense_below, self.group, context)
        self.graph = {}
        return self.capacity

    def add_graph_batch_size(self, bs: int) -> GraphBuffers:
        """The static buffers of captured batch size ``bs`` (after :meth:`init_graph_state`)."""
        cap, i64 = self.capacity, dict(dtype=torch.int64, device=self.device)
        self.graph[bs] = GraphBuffers(torch.zeros(bs, cap.context, **i64),
                                      torch.full((bs, self.num_kv_heads, cap.fixed + cap.retrieved), -1, **i64))
        return self.graph[bs]

    def plan(self, forward_batch) -> DecodeBatch:
        lens_cpu = host_seq_lens(forward_batch)
        longest = int(lens_cpu.max())
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        graph = self.graph.get(forward_batch.batch_size)
        if graph is not None and longest > self.capacity.context:
            raise ValueError(f"a2ats: a sequence of {longest} tokens is longer than the {self.capacity.context} the "
                             f"captured decode step was sized for")
        plan = SelectionPlan.build(lens_cpu, self.budget, self.sinks, self.window, self.device,
                                   dense_below=self.dense_below)
        if graph is not None:  # into the static table; the columns past longest are never read
            slot_table(self.req_to_token, forward_batch.req_pool_indices, seq_lens, longest, out=graph.slots[:, :longest])
            return DecodeBatch(seq_lens, lens_cpu, seq_lens - 1, graph.slots, plan, graph)
        slots = slot_table(self.req_to_token, forward_batch.req_pool_indices, seq_lens, longest)
        return DecodeBatch(seq_lens, lens_cpu, seq_lens - 1, slots, None if plan.covered else plan)

    def retrieve_capacity(self, batch: DecodeBatch) -> int:
        """R: room for one layer's retrieved slots per KV head (the union of g top-Ks; a
        captured batch's is its capacity's)."""
        return 0 if batch.plan is None else min(self.group * batch.plan.kmax, batch.slots.shape[1])

    def selection_buffer(self, batch: DecodeBatch, fixed_host: torch.Tensor) -> SelectionBuffer:
        """The batch's selection buffer with ``fixed_host`` (bool [B, longest] on the host:
        the positions attended in every layer, the same for every KV head) in front; a
        captured batch's is its static buffer, the fixed part padded to the capacity."""
        fixed = mask_to_positions(fixed_host).to(self.device)  # [B, F], no device sync
        width = fixed.shape[-1]
        if batch.graph is not None:
            out, full = batch.graph.selection, self.capacity.fixed
            if width > full:
                raise ValueError(f"a2ats: {width} positions attended in every layer, more than the {full} the captured "
                                 f"decode step was sized for")
            out[..., width:full] = -1
        else:
            full = width
            out = torch.full((fixed.shape[0], self.num_kv_heads, width + self.retrieve_capacity(batch)), -1,
                             dtype=torch.int64, device=self.device)
        out[..., :width] = positions_to_slots(fixed.unsqueeze(1), batch.slots)
        return SelectionBuffer(out, full)


class AttendedShare:
    """The share of context token-heads that sparse decode layers attend, over every sparse
    layer of every sparse decode batch (layers differ under an adaptive budget), counted on
    the device by the layers themselves (no host work per layer, which a captured step
    cannot do; no sync on the hot path) and logged every ``interval`` batches."""

    def __init__(self, interval: int, device):
        self.interval = max(1, interval)
        self.batches = 0
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)
        """int64 [2] device tensor: the token-heads attended so far, and the context token-heads
        they were chosen from (each sparse layer's kernel adds its own, in place)."""
        self._at_last_log = (0, 0)

    def batch(self, batch: DecodeBatch) -> None:
        """A sparse decode batch begins: every ``interval`` batches, log the share attended since the last line."""
        self.batches += 1
        if self.batches % self.interval:
            return
        attended, context = self.counts.tolist()  # one sync per log line
        if context == self._at_last_log[1]:
            return
        since = (attended - self._at_last_log[0], context - self._at_last_log[1])
        self._at_last_log = (attended, context)
        lens = batch.seq_lens_cpu
        logger.info("a2ats decode batch: #req %d, context %d tokens (longest %d); the sparse layers since the last "
                    "line attended %.1f%% of context (%.1f%% since start)", len(lens), int(lens.sum()),
                    int(lens.max()), 100.0 * since[0] / since[1], 100.0 * attended / context)

    @property
    def share(self) -> float:
        """Attended share over all sparse layers so far (syncs: not for the hot path)."""
        attended, context = self.counts.tolist()
        return attended / max(1, context)
