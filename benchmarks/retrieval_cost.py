"""One sparse decode layer on CPU, the path issue #12 started from against the fused
call, in the same run, on the same data, with each part's floor.

Old: WRoPE queries and the lookup table in torch, the per-head top-K kernel, the
attention kernel (three calls and a dozen torch ops). New: one native call
(``decode_layer``: rotation, LUT, histogram selection, attention); its retrieval alone
(``retrieve_layer``) is timed too, against the old retrieval (torch LUT + top-K kernel).

    python benchmarks/retrieval_cost.py [--model-path DIR] [--rounds 5] [--out DIR] [--fused-from LABEL=DIR]

``--fused-from LABEL=DIR``: another revision's ``kernels/`` directory (e.g. from ``git worktree add
/tmp/prev REV``), built as its own extension; its fused retrieval (same entry point) joins the
alternation as a column, so a change to the kernels is measured against the revision before it
in the same run.

Shapes: the default model's attention (from its config.json) and a Llama-3.1-8B layer
(32 query / 8 KV heads, head dim 128, 4096 codes); 8 WRoPE distances; the backend's
default budget, sinks and window; each request's slots a contiguous run of the pool (as
SGLang allocates a prefill). Both paths select the same slots (checked). Old and new
alternate ``--rounds`` times (best of 3 calls each); the table gives the median and the
range over rounds. Floors, at the machine's measured copy bandwidth: retrieval must read
per KV head each token's 2-byte code and 8-byte slot id, per query head its LUT row;
attention the K and V rows it attends (bf16). The lookup table is also compute (query
heads x distances x codes x head dim multiply-adds): its floor at the rate of a large
float32 GEMM. Both references are measured in every round, between the paths (the VM's speed
drifts within minutes), each round's figures are set against that round's larger floor, and
the table gives the median of the per-round ratios and the references' median.
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
from a2ats_sglang.core.retrieval import SelectionPlan, WRoPERotation, distance_bounds, lookup_table, wrope_distances
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

    from a2ats_sglang.harness.offline_models import build_default_model

    path = model_path or build_default_model()
    s = ModelShape.from_hf_config(AutoConfig.from_pretrained(path))
    return LayerShape(f"{s.model_type} ({Path(path).name})", s.num_q_heads, s.num_kv_heads, s.head_dim, 512)


def gemm_gflops(n: int = 2048) -> float:
    """GFLOP/s of one large float32 GEMM on every thread: the machine's compute reference."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / best_time(lambda: torch.mm(a, b)) / 1e9


def measure(shape: LayerShape, batch: int, length: int, rounds: int, previous=None) -> dict:
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
    q = torch.randn(batch, hq, d).bfloat16()
    k_buf = torch.randn(n, hkv, d, dtype=torch.bfloat16)
    v_buf = torch.randn(n, hkv, d, dtype=torch.bfloat16)
    plan = SelectionPlan.build(seq_lens, cfg.budget_policy, cfg.sinks, cfg.window)
    rotation = WRoPERotation.build(rope, seq_lens - 1, dist)
    scale = d ** -0.5
    fixed = torch.cat([torch.arange(cfg.sinks), torch.arange(length - cfg.window, length)])
    width = len(fixed) + min((hq // hkv) * plan.kmax, length)

    def selection_buffer():
        sel = torch.full((batch, hkv, width), -1, dtype=torch.int64)
        sel[..., : len(fixed)] = (fixed + slots[:, :1]).unsqueeze(1)
        return sel

    ext = cpu.extension()
    old_sel, new_sel = selection_buffer(), selection_buffer()
    kernels = KernelChoice(Impl.CPP, "benchmark")
    old_buf = kernels.buffers(batch, hq, hkv, d, d, width, "cpu", (len(dist), c))
    new_buf = kernels.buffers(batch, hq, hkv, d, d, width, "cpu", (len(dist), c))
    f = len(fixed)

    def old_retrieve():  # as the backend ran it when the issue was filed
        lookup_table(rotation.apply(q), centroids, scale, out=old_buf.lut)
        ext.retrieve_topk(old_buf.lut, codes, slots, plan.seq_lens, plan.k, bounds, cfg.sinks, cfg.window,
                          old_sel[..., f:])

    def old_layer():
        old_retrieve()
        kernels.attend(q, k_buf, v_buf, old_sel, scale, 0.0, old_buf)

    def new_retrieve():
        cpu.retrieve_layer_cpu(q, rotation, centroids, scale, codes, slots, plan, bounds, new_buf.q32, new_buf.q_rot,
                               new_buf.lut, new_sel[..., f:])

    prev_sel = selection_buffer()

    def prev_retrieve():  # the other revision's fused retrieval
        previous.retrieve_layer(*cpu._layer_args(q, rotation, centroids, scale, codes, slots, plan, bounds,
                                                 new_buf.q32, new_buf.q_rot, new_buf.lut), prev_sel[..., f:])

    attended_count = torch.zeros(2, dtype=torch.int64)  # the decode layer adds its attended slots here

    def new_layer():
        cpu.decode_layer_cpu(q, rotation, centroids, scale, codes, slots, plan, bounds, new_buf.q32, new_buf.q_rot,
                             new_buf.lut, new_sel, f, k_buf, v_buf, 0.0, new_buf.out, new_buf.lse, attended_count)

    old_layer(), new_layer()
    torch.testing.assert_close(new_buf.lut, old_buf.lut, rtol=1e-4, atol=1e-4)
    agree = float((new_sel == old_sel).float().mean())  # LUT rounding may flip a near-tie
    assert agree > 0.99, f"the two paths select different slots ({agree:.3f} agree)"
    paths = [("old_retrieve", old_retrieve), ("new_retrieve", new_retrieve), ("old_layer", old_layer),
             ("new_layer", new_layer)]
    if previous is not None:
        new_retrieve(), prev_retrieve()
        assert torch.equal(prev_sel, new_sel), "the other revision's fused retrieval selects different slots"
        paths.insert(1, ("prev_retrieve", prev_retrieve))
    attended = int((new_sel >= 0).sum())
    retrieve_bytes = batch * hkv * (length * (2 + 8)) + batch * hq * len(dist) * c * 4
    attend_bytes = attended * 2 * d * k_buf.element_size()
    lut_flop = 2 * batch * hq * len(dist) * c * d
    times = {name: [] for name, _ in paths}
    refs = {"copy_gb_s": [], "gemm_gflops": [], "retrieve_floor_ms": [], "layer_floor_ms": [], "lut_ms": []}
    for _ in range(rounds):  # alternate: drift on the VM hits every path and the references alike
        for name, fn in paths:
            times[name].append(best_time(fn, 3))
        copy_gb_s, gflops = copy_bandwidth(), gemm_gflops()
        lut_ms = 1e3 * lut_flop / (gflops * 1e9)
        for key, value in (("copy_gb_s", copy_gb_s), ("gemm_gflops", gflops), ("lut_ms", lut_ms),
                           ("retrieve_floor_ms", max(lut_ms, 1e3 * retrieve_bytes / (copy_gb_s * 1e9))),
                           ("layer_floor_ms", max(lut_ms, 1e3 * (retrieve_bytes + attend_bytes) / (copy_gb_s * 1e9)))):
            refs[key].append(value)
    row = {"shape": shape.name, "heads": f"{hq}/{hkv}", "head_dim": d, "codes": c, "batch": batch, "length": length,
           "attended_per_kv_head": attended / (batch * hkv)}
    for key, values in refs.items():
        row[key] = statistics.median(values)
    for name, t in times.items():
        row[f"{name}_ms"] = 1e3 * statistics.median(t)
        row[f"{name}_range"] = [1e3 * min(t), 1e3 * max(t)]
    for name, floor in (("new_retrieve", "retrieve_floor_ms"), ("new_layer", "layer_floor_ms")):
        row[f"{name}_over_floor"] = statistics.median(1e3 * t / f for t, f in zip(times[name], refs[floor]))
    return row


def cell(row: dict, name: str) -> str:
    lo, hi = row[f"{name}_range"]
    return f"{row[name + '_ms']:.2f} ({lo:.2f}–{hi:.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default="4x16384,4x65536,1x131072", help="BATCHxLENGTH,...")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--fused-from", metavar="LABEL=DIR", help="another revision's kernels/ directory")
    args = ap.parse_args(argv)
    previous, label = None, None
    if args.fused_from:
        label, directory = args.fused_from.split("=", 1)
        previous = cpu.load_sources(Path(directory), f"a2ats_cpu_kernels_{label}")  # built as its own extension
    torch.manual_seed(0)
    shapes = [default_model_shape(args.model_path), LayerShape("Llama-3.1-8B layer", 32, 8, 128, 4096)]
    rows = []
    for shape in shapes:
        for case in args.cases.split(","):
            b, length = (int(x) for x in case.split("x"))
            rows.append(measure(shape, b, length, args.rounds, previous))
            r = rows[-1]
            print(f"{r['shape']} {b}x{length}: retrieval {r['old_retrieve_ms']:.2f} -> {r['new_retrieve_ms']:.2f} ms, "
                  f"layer {r['old_layer_ms']:.2f} -> {r['new_layer_ms']:.2f} ms", flush=True)
    copy, gflops = (statistics.median(r[key] for r in rows) for key in ("copy_gb_s", "gemm_gflops"))
    lines = [f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, copy bandwidth {copy:.1f} GB/s "
             f"({min(r['copy_gb_s'] for r in rows):.1f}–{max(r['copy_gb_s'] for r in rows):.1f} over the cases), "
             f"float32 GEMM {gflops:.0f} GFLOP/s (medians of the rounds); "
             f"{date.today()}; one decode layer; {args.rounds} alternating rounds, median (range) of the best of 3 "
             f"calls per round.", "",
             "| shape | heads | codes | batch × context | retrieval old ms | "
             + (f"retrieval fused@{label} ms | fused@{label} / fused | " if label else "") +
             "retrieval fused ms | old / fused | "
             "floor ms (of it LUT compute) | fused / floor | layer old ms | layer fused ms | old / fused | "
             "fused / floor |",
             "|---|---|---|---|---|" + ("---|---|" if label else "") + "---|---|---|---|---|---|---|---|"]
    for r in rows:
        prev = (f"{cell(r, 'prev_retrieve')} | **{r['prev_retrieve_ms'] / r['new_retrieve_ms']:.2f}x** | "
                if label else "")
        lines.append(f"| {r['shape']} | {r['heads']} | {r['codes']} | {r['batch']} × {r['length']} | "
                     f"{cell(r, 'old_retrieve')} | {prev}{cell(r, 'new_retrieve')} | "
                     f"**{r['old_retrieve_ms'] / r['new_retrieve_ms']:.2f}x** | "
                     f"{r['retrieve_floor_ms']:.3f} ({r['lut_ms']:.3f}) | "
                     f"{r['new_retrieve_over_floor']:.1f}x | {cell(r, 'old_layer')} | "
                     f"{cell(r, 'new_layer')} | **{r['old_layer_ms'] / r['new_layer_ms']:.2f}x** | "
                     f"{r['new_layer_over_floor']:.1f}x |")
    write_results(args.out, "retrieval_cost", "\n".join(lines), {"copy_gb_s": copy, "gemm_gflops": gflops, "rows": rows})


if __name__ == "__main__":
    main()
