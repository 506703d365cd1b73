"""Offload mode, measured: device bytes per token against dense KV, how many tokens
the same device memory holds, and the CPU sparse-attention kernel's bandwidth
against a copy on the same machine.

    python benchmarks/offload_memory.py [--model-path DIR] [--device-gib 16] [--host-gib 256] [--requests 256]

Pool sizes come from the server's own sizing (:class:`a2ats_sglang.offload.host_pool.OffloadSizing`,
what the ``--a2ats-offload`` hook gives SGLang): on the device, codes of every token
plus a resident window (sinks + window of K/V) per request; on the host, full K/V.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import platform
import time
from datetime import date
from pathlib import Path

import torch

from a2ats_sglang.core.codebook import Codebooks, ModelShape, default_codebook_path
from a2ats_sglang.harness.offline_models import build_default_model
from a2ats_sglang.offload.host_pool import CODE_BYTES, OffloadSizing
from a2ats_sglang.kernels.dispatch import Impl, KernelChoice

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def best_time(fn, repeat=5):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def write_results(out: Path, name: str, table: str, payload: dict) -> None:
    """Print ``table`` and write it to OUT/NAME.md, ``payload`` to OUT/NAME.json."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))


def copy_bandwidth(nbytes=512 << 20) -> float:
    """GB/s of torch copy (bytes read + bytes written per second), the machine's streaming reference."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src)) / 1e9


def pool_tensor(shape: tuple[int, ...], dtype, huge_pages: bool) -> torch.Tensor:
    """Random rows in anonymous memory, advised into 2 MiB pages (THP) if ``huge_pages``."""
    count = math.prod(shape)
    buf = mmap.mmap(-1, count * torch.empty((), dtype=dtype).element_size(), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages:
        buf.madvise(mmap.MADV_HUGEPAGE)
    t = torch.frombuffer(buf, dtype=dtype, count=count).view(shape)
    t.copy_(torch.randn(shape).to(dtype))
    return t


def kernel_bandwidth(impl: Impl, shape: ModelShape, batch: int, selected: int, context: int, dtype,
                     huge_pages=False) -> float:
    """GB/s of K and V bytes read by one implementation's sparse attention, into buffers
    allocated once (as a decode batch's plan does): each request owns a
    contiguous run of ``context`` slots (as SGLang allocates a prefill) and selects
    ``selected`` random positions of it per KV head, in ascending order (as served)."""
    hkv, d = shape.num_kv_heads, shape.head_dim
    k = pool_tensor((batch * context, hkv, d), dtype, huge_pages)
    v = pool_tensor((batch * context, hkv, d), dtype, huge_pages)
    q = torch.randn(batch, shape.num_q_heads, d).float()
    idx = torch.stack([torch.stack([torch.randperm(context)[:selected].sort().values + b * context for _ in range(hkv)])
                       for b in range(batch)])
    read = batch * hkv * selected * 2 * d * k.element_size()
    kernels = KernelChoice(impl, "benchmark")
    buffers = kernels.buffers(batch, shape.num_q_heads, hkv, d, d, selected, "cpu")
    return read / best_time(lambda: kernels.attend(q, k, v, idx, d ** -0.5, 0.0, buffers)) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--device-gib", type=float, default=16.0, help="device memory given to the KV cache")
    ap.add_argument("--host-gib", type=float, default=256.0, help="host memory given to the offload KV pool")
    ap.add_argument("--requests", type=int, default=256, help="concurrent requests (resident windows on the device)")
    ap.add_argument("--sinks", type=int, default=8)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    model = Path(args.model_path or build_default_model())
    books = Codebooks.load(default_codebook_path(model))
    shape = books.shape
    device, host = int(args.device_gib * 2**30), int(args.host_gib * 2**30)
    rows = []
    for dtype in ("bfloat16", "float32"):
        dense = shape.num_layers * shape.num_kv_heads * 2 * shape.head_dim * BYTES[dtype]
        sizing = OffloadSizing(dense, shape.num_layers * shape.num_kv_heads * CODE_BYTES, (args.sinks + args.window) * dense)
        tokens = sizing.capacity(device, args.requests, host)
        used = tokens * sizing.code_cell + args.requests * sizing.window_cell
        rows.append({"dtype": dtype, "dense_bytes_per_token": dense, "code_bytes_per_token": sizing.code_cell,
                     "device_bytes_per_token": used / tokens, "ratio": used / tokens / dense,
                     "tokens_dense": device // dense, "tokens_offload": tokens,
                     "limited_by": "host" if tokens == host // dense else "device"})
    copy = copy_bandwidth()
    kern = []
    for batch, context in ((1, 16384), (4, 16384), (8, 32768)):
        selected = context * 3 // 100 * (shape.num_q_heads // shape.num_kv_heads)  # 3 % per query head, GQA union
        kern.append({"batch": batch, "context": context, "selected_per_kv_head": selected,
                     "cpp_gb_s": kernel_bandwidth(Impl.CPP, shape, batch, selected, context, torch.float32),
                     "cpp_huge_gb_s": kernel_bandwidth(Impl.CPP, shape, batch, selected, context, torch.float32,
                                                       huge_pages=True),
                     "torch_gb_s": kernel_bandwidth(Impl.TORCH, shape, batch, selected, context, torch.float32)})
    torch_threads = torch.get_num_threads()
    lines = [f"Model `{model.name}` ({shape.num_layers} layers, {shape.num_kv_heads} KV heads, head dim {shape.head_dim}); "
             f"{platform.machine()} CPU, {torch_threads} torch threads; {date.today()}.", "",
             f"Device KV budget {args.device_gib:g} GiB, host {args.host_gib:g} GiB, {args.requests} resident windows of "
             f"{args.sinks} + {args.window} tokens.", "",
             "| KV dtype | dense bytes/token | offload device bytes/token (codes + windows) | share of dense | "
             "tokens, dense | tokens, offload | ratio | set by |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['dense_bytes_per_token']} | {r['device_bytes_per_token']:.0f} "
                     f"({r['code_bytes_per_token']} + {r['device_bytes_per_token'] - r['code_bytes_per_token']:.0f}) | "
                     f"{100 * r['ratio']:.2f} % | {r['tokens_dense']:,} | {r['tokens_offload']:,} | "
                     f"**{r['tokens_offload'] / r['tokens_dense']:.1f}x** | {r['limited_by']} memory |")
    lines += ["", f"Copy bandwidth (torch copy of 512 MiB, read + write): **{copy:.1f} GB/s**.", "",
              "| batch | context | selected per KV head | C++ kernel, K+V read | share of copy | C++ kernel, pool in "
              "2 MiB pages (THP) | share of copy | torch reference | share of copy |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k in kern:
        lines.append(f"| {k['batch']} | {k['context']} | {k['selected_per_kv_head']} | {k['cpp_gb_s']:.1f} GB/s | "
                     f"**{100 * k['cpp_gb_s'] / copy:.0f} %** | {k['cpp_huge_gb_s']:.1f} GB/s | "
                     f"**{100 * k['cpp_huge_gb_s'] / copy:.0f} %** | {k['torch_gb_s']:.1f} GB/s | "
                     f"{100 * k['torch_gb_s'] / copy:.0f} % |")
    write_results(args.out, "offload_memory", "\n".join(lines), {"memory": rows, "copy_gb_s": copy, "kernel": kern})


if __name__ == "__main__":
    main()
