"""One decode layer's retrieval on CPU: the histogram selection against the earlier
per-head top-K kernel, in the same run, on the same data, with the layer's other parts
(WRoPE queries + lookup table, sparse attention) and the selection's byte floor.

    python benchmarks/retrieval_cost.py [--model-path DIR] [--rounds 5] [--out DIR]

Shapes: the default model's attention (from its config.json) and a Llama-3.1-8B layer
(32 query / 8 KV heads, head dim 128, 4096 codes); 8 WRoPE distances; the backend's
default budget, sinks and window; each request's slots a contiguous run of the pool (as
SGLang allocates a prefill). Both kernels write the same slots (checked). Baseline and
candidate alternate ``--rounds`` times (best of 3 calls each); the table gives the
median and the range over rounds. Floor: the bytes selection must read (per KV head,
each token's 2-byte code and 8-byte slot id; per query head its LUT row) at the
machine's measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from offload_memory import best_time, copy_bandwidth, write_results

from a2ats_sglang.config import A2ATSConfig
from a2ats_sglang.core.codebook import ModelShape
from a2ats_sglang.core.retrieval import SelectionPlan, distance_bounds, lookup_table, rotated_queries, wrope_distances
from a2ats_sglang.core.rope import RopeSpec
from a2ats_sglang.kernels import cpu
from a2ats_sglang.kernels.dispatch import Impl, KernelChoice


@dataclass(frozen=True)
class LayerShape:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    codes: int
    distances: int = 8


def default_model_shape(model_path: str | None) -> LayerShape:
    from transformers import AutoConfig

    from a2ats_sglang.harness.default_model import build_default_model

    path = model_path or build_default_model()
    s = ModelShape.from_hf_config(AutoConfig.from_pretrained(path))
    return LayerShape(f"{s.model_type} ({Path(path).name})", s.num_q_heads, s.num_kv_heads, s.head_dim, 512)


def measure(shape: LayerShape, batch: int, length: int, rounds: int, copy_gb_s: float) -> dict:
    cfg = A2ATSConfig()
    hq, hkv, d, c = shape.q_heads, shape.kv_heads, shape.head_dim, shape.codes
    n = batch * length
    codes = torch.randint(0, c, (n, hkv), dtype=torch.int16)
    slots = torch.arange(n).view(batch, length)
    seq_lens = torch.full((batch,), length, dtype=torch.int64)
    dist = wrope_distances(shape.distances)
    bounds = distance_bounds(dist)
    rope = RopeSpec(1.0 / 500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d), d)
    centroids = torch.randn(hkv, c, d)
    q = torch.randn(batch, hq, d)
    plan = SelectionPlan.build(seq_lens, cfg.budget_policy, cfg.sinks, cfg.window)
    width = min((hq // hkv) * plan.kmax, length)
    lut = torch.empty(batch, hq, len(dist), c)
    distances = torch.tensor(dist, dtype=torch.float32)

    def lut_step():
        lookup_table(rotated_queries(q, seq_lens - 1, rope, distances), centroids, d ** -0.5, out=lut)

    lut_step()
    ext = cpu.extension()
    out_old = torch.empty(batch, hkv, width, dtype=torch.int64)
    out_new = torch.empty_like(out_old)
    args = (lut, codes, slots, plan.seq_lens, plan.k, bounds, cfg.sinks, cfg.window)
    old = lambda: ext.retrieve_topk(*args, out_old)  # noqa: E731
    new = lambda: ext.retrieve(*args, out_new)  # noqa: E731
    old(), new()
    assert torch.equal(out_old, out_new), "the two kernels disagree"
    t_old, t_new = [], []
    for _ in range(rounds):  # alternate: drift on the VM hits both
        t_old.append(best_time(old, 3))
        t_new.append(best_time(new, 3))
    # the rest of the layer, for scale: WRoPE + LUT, and attention over the selection (bf16 K/V)
    t_lut = best_time(lut_step, 3)
    kv = KernelChoice(Impl.CPP, "benchmark")
    k_buf = torch.randn(n, hkv, d, dtype=torch.bfloat16)
    v_buf = torch.randn(n, hkv, d, dtype=torch.bfloat16)
    fixed = torch.cat([torch.arange(cfg.sinks), torch.arange(length - cfg.window, length)])
    selection = torch.cat([(fixed + slots[:, :1]).unsqueeze(1).expand(-1, hkv, -1), out_new], -1).contiguous()
    buffers = kv.buffers(batch, hq, hkv, d, selection.shape[-1], "cpu")
    t_attn = best_time(lambda: kv.attend(q, k_buf, v_buf, selection, d ** -0.5, 0.0, buffers), 3)
    floor_bytes = batch * hkv * (length * (2 + 8)) + batch * hq * len(dist) * c * 4
    med_old, med_new = statistics.median(t_old), statistics.median(t_new)
    return {"shape": shape.name, "heads": f"{hq}/{hkv}", "head_dim": d, "codes": c, "batch": batch, "length": length,
            "topk_ms": 1e3 * med_old, "topk_range": [1e3 * min(t_old), 1e3 * max(t_old)],
            "hist_ms": 1e3 * med_new, "hist_range": [1e3 * min(t_new), 1e3 * max(t_new)],
            "speedup": med_old / med_new, "lut_ms": 1e3 * t_lut, "attn_ms": 1e3 * t_attn,
            "floor_ms": 1e3 * floor_bytes / (copy_gb_s * 1e9), "retrieved_per_kv_head": int((out_new >= 0).sum(-1).max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default="4x16384,4x65536,1x131072", help="BATCHxLENGTH,...")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    copy = copy_bandwidth()
    shapes = [default_model_shape(args.model_path), LayerShape("Llama-3.1-8B layer", 32, 8, 128, 4096)]
    rows = []
    for shape in shapes:
        for case in args.cases.split(","):
            b, length = (int(x) for x in case.split("x"))
            rows.append(measure(shape, b, length, args.rounds, copy))
            r = rows[-1]
            print(f"{r['shape']} {b}x{length}: top-K {r['topk_ms']:.2f} ms, histogram {r['hist_ms']:.2f} ms "
                  f"({r['speedup']:.2f}x), floor {r['floor_ms']:.2f} ms", flush=True)
    lines = [f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, copy bandwidth {copy:.1f} GB/s; "
             f"{date.today()}; one decode layer; {args.rounds} alternating rounds, median (range) of the best of 3 "
             f"calls per round.", "",
             "| shape | heads | codes | batch × context | top-K kernel ms | histogram kernel ms | speedup | "
             "histogram / floor | WRoPE + LUT ms | attention ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['heads']} | {r['codes']} | {r['batch']} × {r['length']} | "
                     f"{r['topk_ms']:.2f} ({r['topk_range'][0]:.2f}–{r['topk_range'][1]:.2f}) | "
                     f"{r['hist_ms']:.2f} ({r['hist_range'][0]:.2f}–{r['hist_range'][1]:.2f}) | "
                     f"**{r['speedup']:.2f}x** | {r['hist_ms'] / r['floor_ms']:.1f}x | {r['lut_ms']:.2f} | "
                     f"{r['attn_ms']:.2f} |")
    write_results(args.out, "retrieval_cost", "\n".join(lines), {"copy_gb_s": copy, "rows": rows})


if __name__ == "__main__":
    main()
