"""Codes of the stored keys, and one layer's retrieval at a decode step.

Keys are encoded when SGLang writes them (extend and decode): un-rotated to pre-RoPE,
assigned their nearest centroid in the whitened space, stored per physical KV slot
([layers, slots, Hkv] int16), so radix-shared prefixes share their codes and a reused
slot is simply re-encoded. At decode, the query is rotated to the WRoPE distances, the
lookup table of query . centroid scores is built, and the chosen kernel selects each
query head's top-K (GQA union) into the batch's selection buffer.
"""

from __future__ import annotations

import torch

from a2ats_sglang.core.codebook import Codebooks, LayerCodebook
from a2ats_sglang.core.retrieval import SelectionPlan, distance_bounds, lookup_table, rotated_queries
from a2ats_sglang.core.rope import RopeSpec
from a2ats_sglang.kernels.dispatch import DecodeBuffers, KernelChoice


class Retriever:
    """Per-layer codebooks of this rank's KV heads ``heads``, the codes of every slot of
    a pool of ``num_slots`` tokens, and the kernel choice that selects with them."""

    def __init__(self, books: Codebooks, rope: RopeSpec, heads: slice, num_slots: int, kernels: KernelChoice, device):
        self.rope = rope.to(device)
        self.kernels = kernels
        self.distances = torch.tensor(books.distances, dtype=torch.float32, device=device)
        bounds = distance_bounds(books.distances)
        # the Triton kernel needs one element even with a single distance; the others read NB - 1
        self.bounds = (bounds if bounds.numel() else torch.zeros(1)).to(device)
        self.layers = {li: LayerCodebook.build(books.centroids[li, heads], books.whiten[li, heads], device)
                       for li in range(books.shape.num_layers)}
        self.kv_heads = heads.stop - heads.start
        self.codes = torch.zeros(books.shape.num_layers, num_slots, self.kv_heads, dtype=torch.int16, device=device)

    @property
    def lut_shape(self) -> tuple[int, int]:
        """(NB, C): WRoPE distances x codes."""
        return self.distances.numel(), next(iter(self.layers.values())).centroids.shape[1]

    def encode(self, layer_id: int, k: torch.Tensor, positions: torch.Tensor, loc: torch.Tensor) -> None:
        """Store the codes of new keys k [T, Hkv * D] (post-RoPE at ``positions`` int64 [T])
        at physical slots ``loc`` int64 [T]."""
        k_pre = self.rope.unrotate(k.view(k.shape[0], self.kv_heads, -1), positions.view(-1, 1))
        self.codes[layer_id, loc] = self.layers[layer_id].encode(k_pre)

    def retrieve(self, layer_id: int, q: torch.Tensor, positions: torch.Tensor, scale: float, slots: torch.Tensor,
                 plan: SelectionPlan, out: torch.Tensor, buffers: DecodeBuffers) -> None:
        """One layer's retrieved slots into ``out`` int64 [B, Hkv, R] (ascending position, -1
        padded). q [B, Hq, D] post-RoPE at ``positions`` int64 [B]; slots int64 [B, L] physical
        slot of each position; ``plan`` and ``buffers`` built once per batch."""
        q_rot = rotated_queries(q, positions, self.rope, self.distances)
        lookup_table(q_rot, self.layers[layer_id].centroids, scale, out=buffers.lut)
        self.kernels.retrieve(buffers.lut, self.codes[layer_id], slots, plan, self.bounds, out, buffers)
