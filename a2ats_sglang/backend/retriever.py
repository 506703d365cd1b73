"""Codes of the stored keys, and one layer's retrieval at a decode step.

Keys are encoded when SGLang writes them (extend and decode): un-rotated to pre-RoPE,
assigned their nearest centroid in the whitened space, stored per physical KV slot
([layers, slots, Hkv] int16), so radix-shared prefixes share their codes and a reused
slot is simply re-encoded. At decode, the chosen kernel rotates the query to the WRoPE
distances (a rotation built once per batch), builds the lookup table of query . centroid
scores and selects each query head's tokens (GQA union) into the batch's selection
buffer, and (:meth:`Retriever.decode`) attends them.
"""

from __future__ import annotations

import torch

from a2ats_sglang.core.codebook import Codebooks, LayerCodebook
from a2ats_sglang.core.retrieval import SelectionPlan, WRoPERotation, distance_bounds
from a2ats_sglang.core.rope import RopeSpec
from a2ats_sglang.kernels.dispatch import DecodeBuffers, KernelChoice


class Retriever:
    """Per-layer codebooks of this rank's KV heads ``heads``, the codes of every slot of
    a pool of ``num_slots`` tokens, and the kernel choice that selects with them."""

    def __init__(self, books: Codebooks, rope: RopeSpec, heads: slice, num_slots: int, kernels: KernelChoice, device):
        self.rope = rope.to(device)
        self.kernels = kernels
        self.distances = torch.tensor(books.distances, dtype=torch.float32, device=device)
        self.bounds = distance_bounds(books.distances).to(device)
        self.layers = {li: LayerCodebook.build(books.centroids[li, heads], books.whiten[li, heads], device)
                       for li in range(books.shape.num_layers)}
        self.kv_heads = heads.stop - heads.start
        self.codes = torch.zeros(books.shape.num_layers, num_slots, self.kv_heads, dtype=torch.int16, device=device)

    @property
    def lut_shape(self) -> tuple[int, int]:
        """(NB, C): WRoPE distances x codes."""
        return self.distances.numel(), next(iter(self.layers.values())).centroids.shape[1]

    def rotation(self, positions: torch.Tensor) -> WRoPERotation:
        """The WRoPE rotation of a decode batch's queries at ``positions`` int64 [B]."""
        return WRoPERotation.build(self.rope, positions, self.distances)

    def encode(self, layer_id: int, k: torch.Tensor, positions: torch.Tensor, loc: torch.Tensor) -> None:
        """Store the codes of new keys k [T, Hkv * D] (post-RoPE at ``positions`` int64 [T])
        at physical slots ``loc`` int64 [T]."""
        self.kernels.encode(self.layers[layer_id], self.rope, k.view(k.shape[0], self.kv_heads, -1), positions,
                            self.codes[layer_id], loc)

    def copy_codes(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's codes of slots ``src`` to slots ``dst`` (int64 [m]): codes are of
        pre-RoPE keys, so a key moved to another position keeps its code."""
        self.codes[:, dst] = self.codes[:, src]

    def retrieve(self, layer_id: int, q: torch.Tensor, rotation: WRoPERotation, scale: float, slots: torch.Tensor,
                 plan: SelectionPlan, out: torch.Tensor, buffers: DecodeBuffers) -> None:
        """One layer's retrieved slots into ``out`` int64 [B, Hkv, R] (ascending position, -1
        padded). q [B, Hq, D] post-RoPE; ``rotation`` (:meth:`rotation`), slots int64 [B, L]
        (physical slot of each position), ``plan`` and ``buffers``: built once per batch."""
        self.kernels.retrieve(q, rotation, self.layers[layer_id].centroids, scale, self.codes[layer_id], slots, plan,
                              self.bounds, out, buffers)

    def decode(self, layer_id: int, q: torch.Tensor, rotation: WRoPERotation, scale: float, slots: torch.Tensor,
               plan: SelectionPlan, selection: torch.Tensor, fixed_width: int, k_buf: torch.Tensor,
               v_buf: torch.Tensor, logit_cap: float, buffers: DecodeBuffers, attended: torch.Tensor) -> None:
        """:meth:`retrieve` into ``selection[..., fixed_width:]`` (int64 [B, Hkv, F + R]), then
        exact attention over the whole selection of k_buf [N, Hkv, D] / v_buf [N, Hkv, Dv] into
        buffers.out f32 [B, Hq, Dv] / buffers.lse f32 [B, Hq]; the slots attended and the context
        token-heads are added to ``attended`` (int64 [2], in place)."""
        self.kernels.decode(q, rotation, self.layers[layer_id].centroids, scale, self.codes[layer_id], slots, plan,
                            self.bounds, selection, fixed_width, k_buf, v_buf, logit_cap, buffers, attended)
