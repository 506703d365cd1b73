"""The device-side KV of offload mode: each request's attention sinks and recent window.

Per layer one K buffer [R * (S + W), Hkv, D] and one V buffer [R * (S + W), Hkv, Dv]
on the model's device, R = request slots (SGLang's ``req_to_token_pool`` rows). The
row of position p of the request in slot r is ``r * (S + W) + i`` with i = p for a
sink (p < S) and i = S + (p - S) mod W after it, so once position L - 1 is written the
first min(L, S + W) rows of the request are exactly its sinks and its last W
positions: what every decode step attends on the device. The full K/V is in the host
pool (:mod:`a2ats_sglang.offload.host_pool`); nothing here is addressed by physical slot.
"""

from __future__ import annotations

import torch


class ResidentWindow:
    def __init__(self, num_layers: int, requests: int, sinks: int, window: int, kv_heads: int, head_dim: int,
                 v_head_dim: int, dtype: torch.dtype, device):
        self.sinks, self.window = sinks, window
        self.width = sinks + window
        rows = requests * self.width
        self.k = [torch.zeros(rows, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(rows, kv_heads, v_head_dim, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def rows(self, req: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of positions int [...] of the requests in slots ``req`` int [...] -> int64 [...]."""
        p = positions.to(torch.int64)
        i = torch.where(p < self.sinks, p, self.sinks + (p - self.sinks) % self.window)
        return req.to(torch.int64) * self.width + i

    def kept(self, positions: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """bool [...]: position p of a sequence of ``seq_lens`` tokens is a sink or in its window."""
        return (positions < self.sinks) | (positions >= seq_lens - self.window)

    def prefix_positions(self, prefix: int, seq_len: int) -> torch.Tensor:
        """int64 [P]: the positions below ``prefix`` (already cached) that are :meth:`kept`
        in a sequence of ``seq_len`` tokens: its sinks and the part of the window in the prefix."""
        tail = max(self.sinks, seq_len - self.window)
        return torch.cat([torch.arange(min(self.sinks, prefix)), torch.arange(tail, max(tail, prefix))])

    def decode_rows(self, req: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """int64 [B, S + W]: the rows a decode step attends (its first min(L, S + W)), -1 after."""
        i = torch.arange(self.width, device=req.device)
        rows = req.to(torch.int64).view(-1, 1) * self.width + i
        return torch.where(i < seq_lens.view(-1, 1), rows, torch.full_like(rows, -1))

    def store(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k [T, Hkv, D] / v [T, Hkv, Dv] (any device, cast to the buffers' dtype) at ``rows`` [T]."""
        self.k[layer][rows] = k.to(self.k[layer].device, self.k[layer].dtype)
        self.v[layer][rows] = v.to(self.v[layer].device, self.v[layer].dtype)
