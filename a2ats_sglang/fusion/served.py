"""Chunk fusion in the scheduler: what a fused request's extend computes, and the KV it reuses.

SGLang admits a fused request like any other: its radix match (in the fused namespace,
:data:`~a2ats_sglang.fusion.marks.EXTRA_KEY_TAG`) gives its exact prefix, the allocator gives
slots for the rest of the prompt, and the request's row in ``req_to_token`` covers every
position. Then, as each extend's ``ForwardBatch`` is built (:meth:`FusionPlanner.apply`):

1. each chunk's own KV (the prompt ``prefix + chunk``, prefilled as a plain request) is looked
   up in SGLang's radix tree; what is found is copied into the request's slots, keys rotated to
   the chunk's place in this prompt (:meth:`~a2ats_sglang.backend.shell.A2ATSAttnBackend.place_kv`);
   chunk tokens not found (never cached, or evicted since) are computed instead, never read stale;
2. the forward batch keeps only the tokens to compute: the question, the text between chunks,
   what was not found, and the chunk tokens chosen for recomputation; their true positions go
   to the model and to the attention backend (:class:`FusedExtend`), which attends each by
   position over the request's whole row.

A3 and CacheBlend choose from a score per position measured by a scoring pass: the same prompt
sent first (:class:`~a2ats_sglang.fusion.marks.FusedLayout` ``score_pass``, its KV never
entering the tree), the scores kept in :data:`SCORES` until the final request takes them.

- A3: nothing recomputed; the question rows add their attention probabilities to the mass.
- CacheBlend: every cached chunk token recomputed (the pass costs a full prefill: it is a
  fidelity baseline, not layer-pipelined as CacheBlend's own engine is); at layer
  :attr:`~a2ats_sglang.fusion.selection.CacheBlend.layer` each one's fresh K/V is compared with
  its fused K/V, read from the chunk's cached slots and re-positioned (:class:`DeviationProbe`).

Fused KV is ordinary KV in SGLang's pool: accounting, eviction and radix sharing (within the
fused namespace) are SGLang's own.
"""

from __future__ import annotations

import logging
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from a2ats_sglang.fusion.marks import EXTRA_KEY_TAG, SCORED_METHODS, FusedLayout
from a2ats_sglang.fusion.selection import CacheBlend, kv_deviation_scores, top_ratio

logger = logging.getLogger(__name__)


class ScoreStore:
    """fusion id -> float32 [prompt length]: the question's attention mass per position from a
    scoring pass, until its final request takes it; the oldest dropped beyond ``capacity``
    (a client that never sent its final request)."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._scores: OrderedDict[str, torch.Tensor] = OrderedDict()

    def put(self, fusion_id: str, scores: torch.Tensor) -> None:
        self._scores[fusion_id] = scores
        while len(self._scores) > self.capacity:
            self._scores.popitem(last=False)

    def take(self, fusion_id: str) -> torch.Tensor | None:
        return self._scores.pop(fusion_id, None)


SCORES = ScoreStore()


def base_extra_key(extra_key: str | None) -> str | None:
    """A fused request's radix namespace -> the plain one its chunks were cached in (the
    client's extra key and LoRA id, the fusion tag removed)."""
    if not extra_key or EXTRA_KEY_TAG not in extra_key:
        return extra_key
    start = extra_key.index(EXTRA_KEY_TAG)
    end = extra_key.index("\x1f", start + 1) + 1
    return (extra_key[:start] + extra_key[end:]) or None


@dataclass
class RequestFusion:
    """One fused request's state, kept on its ``Req`` from its first extend. recompute: bool
    [prompt length], the chunk tokens computed rather than copied; scores: float32 [prompt
    length], what a scoring pass measures per position (filled by the backend), else None;
    probe_layer: the layer a CacheBlend scoring pass compares K/V at (None: the question's
    attention mass is measured instead)."""

    layout: FusedLayout
    recompute: torch.Tensor
    scores: torch.Tensor | None
    probe_layer: int | None = None


@dataclass
class DeviationProbe:
    """A CacheBlend scoring pass's comparison of one request's recomputed chunk tokens at one
    layer (:meth:`add`). rows int64 [m]: their rows among the extend batch's computed tokens;
    positions int64 [m]: theirs in the prompt; fused_k [m, Hkv, D] / fused_v [m, Hkv, Dv]: their
    K/V as fused at ``layer``; scores float32 [prompt length]: where the deviations are added."""

    layer: int
    rows: torch.Tensor
    positions: torch.Tensor
    fused_k: torch.Tensor
    fused_v: torch.Tensor
    scores: torch.Tensor

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The layer's fresh k [T, Hkv, D] / v [T, Hkv, Dv] of the whole batch: each probed
        token's squared K and V distance from its fused K/V added to its score."""
        rows = self.rows.to(k.device)
        fresh_k, fresh_v = k[rows].movedim(0, 1), v[rows].movedim(0, 1)
        deviation = kv_deviation_scores(self.fused_k.to(k.device).movedim(0, 1),
                                        self.fused_v.to(v.device).movedim(0, 1), fresh_k, fresh_v)
        self.scores[self.positions.to(self.scores.device)] += deviation.to(self.scores.device)


@dataclass
class FusedExtend:
    """What the attention backend needs for an extend batch holding fused requests (every
    request of the batch attends through it). Per request, in batch order: positions int64
    [n_i], the positions of its computed tokens (ascending; a plain request's are contiguous);
    question: (first row of the question among its computed tokens, float32 [seq_len] mass it
    adds to) for an A³ scoring pass, else None. probes: the CacheBlend scoring passes'
    comparisons (any request, any order)."""

    positions: list[torch.Tensor]
    question: list[tuple[int, torch.Tensor] | None]
    probes: list[DeviationProbe] = field(default_factory=list)

    def check(self, forward_batch) -> None:
        """Raise if ``forward_batch`` is not the batch this was planned for."""
        tokens = sum(p.numel() for p in self.positions)
        if (forward_batch.batch_size != len(self.positions) or forward_batch.input_ids is None or
                forward_batch.input_ids.shape[0] != tokens):
            raise RuntimeError(f"a2ats chunk fusion: the extend planned for {len(self.positions)} requests and "
                               f"{tokens} tokens ran as {forward_batch.batch_size} requests and "
                               f"{None if forward_batch.input_ids is None else forward_batch.input_ids.shape[0]}")


@dataclass
class RoundPlan:
    """One fused request's extend round [start, end): keep bool [end - start], the tokens
    computed; src / dst int64 [m] and delta int64 [m]: KV copied from cached slots to this
    request's, keys rotated by delta positions; found / missing: chunk tokens copied / not
    cached (the others of the m copied belong to the shared prefix). For a CacheBlend scoring
    pass, probed bool [end - start]: the recomputed chunk tokens that are cached, whose cached
    KV are at probe_src int64 [p], to be rotated by probe_delta int64 [p]."""

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    delta: torch.Tensor
    found: int
    missing: int
    probed: torch.Tensor
    probe_src: torch.Tensor
    probe_delta: torch.Tensor


def planner_for(model_runner) -> "FusionPlanner":
    """The model runner's :class:`FusionPlanner` (made on its first fused batch)."""
    planner = getattr(model_runner, "a2ats_fusion_planner", None)
    if planner is None:
        backend = model_runner.attn_backend
        if not hasattr(backend, "place_kv"):
            raise ValueError(f"a2ats chunk fusion needs --attention-backend a2ats, not {type(backend).__name__}")
        planner = model_runner.a2ats_fusion_planner = FusionPlanner(backend, model_runner.device)
    return planner


def fused_layout(req) -> FusedLayout | None:
    params = getattr(req.sampling_params, "custom_params", None)
    return FusedLayout.of(params) if params else None


class FusionPlanner:
    """Turns an extend ``ForwardBatch`` with fused requests into the computation it needs
    (one per model runner). ``backend``: the a2ats attention backend (writes the copied KV)."""

    def __init__(self, backend, device):
        self.backend = backend
        self.device = device

    def apply(self, fb, batch) -> None:
        """Copy the reused KV of ``batch``'s fused requests into their slots and cut the forward
        batch ``fb`` (built from ``batch`` by SGLang) down to the tokens to compute."""
        keep, positions, question, probes = [], [], [], []
        start = 0
        counts = []
        starts = fb.extend_logprob_start_lens_cpu  # the ScheduleBatch's list: its result processing reads it
        logprob_starts = None if starts is None else list(starts)
        for i, req in enumerate(batch.reqs):
            a, n = fb.extend_prefix_lens_cpu[i], fb.extend_seq_lens_cpu[i]
            state = self._state(req)
            if state is None:
                mask = torch.ones(n, dtype=torch.bool)
                question.append(None)
            else:
                plan = self._round(req, state, batch.tree_cache, fb.out_cache_loc[start:start + n], a, a + n)
                if plan.src.numel():
                    self.backend.place_kv(plan.src, plan.dst, plan.delta)
                mask = plan.keep
                q0 = state.layout.question_start
                pos = torch.arange(a, a + n)[mask]
                question.append((int((pos < q0).sum()), state.scores) if state.scores is not None and
                                state.probe_layer is None and int(pos[-1]) >= q0 else None)
                if plan.probe_src.numel():
                    rows = (mask.cumsum(0) - 1)[plan.probed] + sum(counts)
                    k, v = self.backend.placed_kv(state.probe_layer, plan.probe_src, plan.probe_delta)
                    probes.append(DeviationProbe(state.probe_layer, rows, torch.arange(a, a + n)[plan.probed], k, v,
                                                 state.scores))
                logger.info("a2ats fusion: request %s (%s) positions %d-%d: %d computed, %d chunk tokens reused, %d of "
                            "the shared prefix copied, %d chunk tokens not cached; chosen for recomputation per "
                            "chunk %s", req.rid, "scoring pass" if state.layout.score_pass else "final", a, a + n - 1,
                            int(mask.sum()), plan.found, int((~mask).sum()) - plan.found, plan.missing,
                            [int(state.recompute[s:e].sum()) for s, e in state.layout.spans])
            index = mask.nonzero().squeeze(1)
            keep.append(index + start)
            positions.append((index + a).to(fb.positions.device))
            counts.append(int(index.numel()))
            if logprob_starts is not None and state is not None:  # the same count of prompt logprobs, from the end
                logprob_starts[i] = counts[-1] - (n - logprob_starts[i])
            start += n
        keep_t = torch.cat(keep).to(fb.input_ids.device)
        fb.input_ids = fb.input_ids[keep_t]
        fb.out_cache_loc = fb.out_cache_loc[keep_t.to(fb.out_cache_loc.device)]
        fb.positions = torch.cat(positions).to(fb.positions.dtype)
        fb.extend_seq_lens_cpu = counts
        fb.extend_seq_lens = torch.tensor(counts, dtype=fb.extend_seq_lens.dtype, device=fb.extend_seq_lens.device)
        fb.extend_num_tokens = sum(counts)
        fb.extend_logprob_start_lens_cpu = logprob_starts
        fb.extend_start_loc = torch.cumsum(fb.extend_seq_lens, 0) - fb.extend_seq_lens
        fb.global_num_token_non_padded_cpu = fb.extend_num_tokens
        if getattr(fb, "global_num_token_non_padded", None) is not None:
            fb.global_num_token_non_padded = torch.tensor(fb.extend_num_tokens, dtype=torch.int32,
                                                          device=fb.global_num_token_non_padded.device)
        self.backend.stage_fusion(FusedExtend(positions, question, probes))

    # -- one request ---------------------------------------------------------------
    def _state(self, req) -> RequestFusion | None:
        state = getattr(req, "a2ats_fusion", None)
        if state is not None:
            return state
        layout = fused_layout(req)
        if layout is None:
            return None
        n = len(req.origin_input_ids)
        if layout.question_start >= n:
            raise ValueError(f"a2ats fusion: request {req.rid}: chunk spans {layout.spans} leave no question in "
                             f"{n} prompt tokens")
        chunk = torch.cat([torch.arange(s, e) for s, e in layout.spans])
        recompute = torch.zeros(n, dtype=torch.bool)
        scores = probe_layer = None
        if layout.score_pass:
            req.skip_radix_cache_insert = True  # measured once, never kept
            scores = torch.zeros(n, dtype=torch.float32, device=self.device)
            SCORES.put(layout.fusion_id, scores)
            if layout.method == CacheBlend.name:  # every chunk token fresh, compared with its fused KV
                recompute[chunk] = True
                probe_layer = CacheBlend().layer
        elif layout.ratio >= 1.0:
            recompute[chunk] = True
        elif layout.ratio > 0.0 and layout.method in SCORED_METHODS:
            measured = SCORES.take(layout.fusion_id)
            if measured is None or measured.numel() != n:
                logger.warning("a2ats fusion: request %s: no scoring pass found (%s); every chunk token is recomputed",
                               req.rid, layout.fusion_id)
                recompute[chunk] = True
            else:  # the first chunk, right after the prefix, is where it was prefilled: exact, never chosen
                exact = torch.arange(chunk.numel()) < layout.spans[0][1] - layout.spans[0][0]
                recompute[chunk[top_ratio(measured.cpu()[chunk], layout.ratio, exact)]] = True
        state = RequestFusion(layout, recompute, scores, probe_layer)
        req.a2ats_fusion = state
        return state

    def _round(self, req, state: RequestFusion, tree, slots: torch.Tensor, a: int, b: int) -> RoundPlan:
        """What positions [a, b) of ``req`` compute and copy (slots: the KV slots SGLang gave
        them this round, in position order)."""
        layout, ids = state.layout, req.origin_input_ids
        p, spans = layout.prefix_len, layout.spans
        src = torch.full((b - a,), -1, dtype=torch.int64)  # each position's cached slot, copied or recomputed
        delta = torch.zeros(b - a, dtype=torch.int64)
        base, lookups = base_extra_key(req.extra_key), {}

        def cached(j: int) -> torch.Tensor:  # KV slots of prefix + chunk j as cached on its own
            if j not in lookups:
                s, e = spans[j]
                lookups[j] = self._cached_slots(tree, ids[:p] + ids[s:e], base, req.cache_salt)
            return lookups[j]

        if a < p:  # the shared prefix: exact wherever cached
            pos = torch.arange(a, min(p, b))
            have = pos < cached(0).numel()
            src[pos[have] - a] = cached(0)[pos[have]]
        missing = 0
        for j, (s, e) in enumerate(spans):
            lo, hi = max(s, a), min(e, b)
            if lo >= hi:
                continue
            pos = torch.arange(lo, hi)
            standalone = pos - s + p  # the token's position in its chunk's own prefill
            cached_here = standalone < cached(j).numel()
            src[pos[cached_here] - a] = cached(j)[standalone[cached_here]]
            delta[pos - a] = s - p
            missing += int((~cached_here).sum())
        recomputed = state.recompute[a:b]  # chunk tokens only: the prefix is never recomputed
        keep = (src < 0) | recomputed
        if not keep.any():  # an extend computes at least one token: its last gives the logits
            keep[-1] = True
        copy = ~keep
        found = int(copy[max(p - a, 0):].sum())
        probed = (src >= 0) & recomputed if state.probe_layer is not None else torch.zeros_like(keep)
        dst = slots.to("cpu", torch.int64)[copy]
        return RoundPlan(keep, src[copy], dst, delta[copy], found, missing, probed, src[probed], delta[probed])

    @staticmethod
    def _cached_slots(tree, ids, extra_key, cache_salt) -> torch.Tensor:
        """int64 [m]: the KV slots of the longest cached prefix of ``ids`` in ``tree`` (plain
        namespace ``extra_key``), on the CPU."""
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        key = RadixKey(token_ids=array("q", ids), extra_key=extra_key, cache_salt=cache_salt)
        result = tree.match_prefix(MatchPrefixParams(key=key))
        n = result.device_prefix_len
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        path = tree.tree_core.collect_full_device_indices(result.last_device_node, tree.root_node_handle(extra_key))
        return path[:n].to("cpu", torch.int64)
