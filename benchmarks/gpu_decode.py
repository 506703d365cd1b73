"""One decode layer on a GPU: the a2ats step (retrieval + sparse attention) against
dense decode attention over the whole context, in the same run, on the same data.

The layer shape is given by flags (default: a Llama-3.1-8B layer, 32 query heads,
8 KV heads, head dim 128, bf16 KV; 4096 codes, 8 WRoPE distances). SGLang itself is
not needed: this times the backend's own decode functions (WRoPE + LUT +
``KernelChoice.retrieve``, ``KernelChoice.attend`` into per-batch buffers), i.e. what
``forward_decode`` runs per layer, against

- ``sdpa``: PyTorch's fused scaled-dot-product attention over each request's
  contiguous K/V (dense, the best case for a dense kernel: no page table), and
- ``dense-triton``: this project's Triton decode kernel given every slot (dense
  attention through the same paged kernel a2ats uses for its selection).

    python benchmarks/gpu_decode.py [--lengths 8192 32768 131072] [--batches 1 8 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from a2ats_sglang.config import A2ATSConfig
from a2ats_sglang.core.retrieval import (SelectionPlan, WRoPERotation, distance_bounds, mask_to_positions,
                                         positions_to_slots, wrope_distances)
from a2ats_sglang.core.rope import RopeSpec
from a2ats_sglang.kernels.dispatch import Impl, KernelChoice


def cuda_ms(fn, iters: int = 20) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def layer_case(batch: int, length: int, args, dev: str):
    """Random K/V, codes, codebook and queries for one layer; each request owns a run of
    ``length`` slots in a shuffled pool (as after churn in a real server)."""
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    dtype = getattr(torch, args.dtype)
    n = batch * length
    k_buf = torch.randn(n, hkv, d, device=dev, dtype=dtype)
    v_buf = torch.randn(n, hkv, d, device=dev, dtype=dtype)
    codes = torch.randint(0, args.codes, (n, hkv), device=dev, dtype=torch.int16)
    slots = torch.randperm(n, device=dev).view(batch, length)
    centroids = torch.randn(hkv, args.codes, d, device=dev)
    q = torch.randn(batch, hq, d, device=dev, dtype=dtype)
    seq_lens = torch.full((batch,), length, device=dev, dtype=torch.int64)
    return k_buf, v_buf, codes, slots, centroids, q, seq_lens


def measure(batch: int, length: int, args, dev: str) -> dict:
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    k_buf, v_buf, codes, slots, centroids, q, seq_lens = layer_case(batch, length, args, dev)
    rope = RopeSpec(1.0 / args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d), d).to(dev)
    bounds = distance_bounds(wrope_distances(args.distances)).to(dev)
    distances = wrope_distances(args.distances)
    budget = A2ATSConfig(budget=args.budget).budget_policy  # min/max tokens: the backend defaults
    scale = d ** -0.5
    rotation = WRoPERotation.build(rope, seq_lens - 1, distances)  # once per batch, as served
    kernels = KernelChoice(Impl.TRITON, "benchmark")
    # once per batch, as served (DecodePlanner): the plan, the selection buffer with the fixed part, the buffers
    plan = SelectionPlan.build(seq_lens.cpu(), budget, args.sinks, args.window, dev)
    fixed = positions_to_slots(mask_to_positions(plan.fixed_host).to(dev).unsqueeze(1), slots)  # [B, 1, F]
    width = fixed.shape[-1]
    selection = torch.full((batch, hkv, width + min((hq // hkv) * plan.kmax, length)), -1, dtype=torch.int64,
                           device=dev)
    selection[..., :width] = fixed
    buffers = kernels.buffers(batch, hq, hkv, d, d, selection.shape[-1], dev, (len(distances), args.codes))
    every = slots.unsqueeze(1).expand(batch, hkv, length).contiguous()
    dense_buffers = kernels.buffers(batch, hq, hkv, d, d, length, dev)

    def select():  # what Retriever.retrieve runs per layer: four launches
        kernels.retrieve(q, rotation, centroids, scale, codes, slots, plan, bounds, selection[..., width:], buffers)

    def attend():
        kernels.attend(q, k_buf, v_buf, selection, scale, 0.0, buffers)

    def a2ats():
        select()
        attend()

    select()
    attended = float((selection >= 0).sum()) / (batch * hkv * length)
    # Contiguous per-request K/V for SDPA (dense best case): [B, Hkv, L, D].
    k_dense = k_buf[slots].permute(0, 2, 1, 3).contiguous()
    v_dense = v_buf[slots].permute(0, 2, 1, 3).contiguous()
    q4 = q.view(batch, hq, 1, d)
    row = {
        "batch": batch, "length": length, "attended": attended,
        "sdpa_ms": cuda_ms(lambda: F.scaled_dot_product_attention(q4, k_dense, v_dense, scale=scale, enable_gqa=True)),
        "dense_triton_ms": cuda_ms(lambda: kernels.attend(q, k_buf, v_buf, every, scale, 0.0, dense_buffers)),
        "select_ms": cuda_ms(select),
        "sparse_attn_ms": cuda_ms(attend),
        "a2ats_ms": cuda_ms(a2ats),
    }
    # Same answer as dense where the selection is everything (sanity, not timing).
    kernels.attend(q, k_buf, v_buf, every, scale, 0.0, dense_buffers)
    o_sparse = dense_buffers.out
    o_ref = F.scaled_dot_product_attention(q4, k_dense, v_dense, scale=scale, enable_gqa=True).view(batch, hq, d)
    row["dense_max_abs_diff"] = float((o_sparse.float() - o_ref.float()).abs().max())
    del k_dense, v_dense, k_buf, v_buf
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=1 << 21, help="skip cases with batch x length above this")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--codes", type=int, default=4096)
    ap.add_argument("--distances", type=int, default=8)
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--budget", type=float, default=0.03)
    ap.add_argument("--sinks", type=int, default=8)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode.py needs a CUDA device")
    torch.manual_seed(0)
    rows = []
    for length in args.lengths:
        for batch in args.batches:
            if batch * length > args.max_tokens:
                continue
            rows.append(measure(batch, length, args, "cuda"))
            r = rows[-1]
            print(f"L={length:7d} B={batch:3d}: sdpa {r['sdpa_ms']:.3f} ms, dense-triton {r['dense_triton_ms']:.3f} ms, "
                  f"a2ats {r['a2ats_ms']:.3f} ms (select {r['select_ms']:.3f} + attend {r['sparse_attn_ms']:.3f}), "
                  f"attended {100 * r['attended']:.1f} %", flush=True)
    name = torch.cuda.get_device_name()
    lines = [f"{name}, torch {torch.__version__}; {date.today()}; one layer of {args.q_heads} query / {args.kv_heads} KV "
             f"heads, head dim {args.head_dim}, {args.dtype} KV; {args.codes} codes, {args.distances} WRoPE distances, "
             f"budget {args.budget}, {args.sinks} sinks, {args.window} window. Median of 20 timed runs (CUDA events).", "",
             "| context | batch | attended | SDPA dense ms | dense via Triton ms | a2ats ms (select + attend) | "
             "SDPA / a2ats | dense Triton / a2ats |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['length']} | {r['batch']} | {100 * r['attended']:.1f} % | {r['sdpa_ms']:.3f} | "
                     f"{r['dense_triton_ms']:.3f} | {r['a2ats_ms']:.3f} ({r['select_ms']:.3f} + {r['sparse_attn_ms']:.3f}) | "
                     f"**{r['sdpa_ms'] / r['a2ats_ms']:.2f}x** | {r['dense_triton_ms'] / r['a2ats_ms']:.2f}x |")
    worst = max(r["dense_max_abs_diff"] for r in rows) if rows else math.nan
    lines += ["", f"Dense-through-Triton vs SDPA output, max abs difference over all cases: {worst:.2e}."]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_decode.md").write_text(table + "\n")
    (args.out / "gpu_decode.json").write_text(json.dumps({"device": name, "args": {k: str(v) for k, v in vars(args).items()},
                                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
