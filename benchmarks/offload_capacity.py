"""Concurrent long requests with the same device KV budget: the dense pool against
offload mode, both served for real by SGLang in the same run.

Both servers get the same ``--mem-fraction-static``, chosen so that SGLang's KV budget
(what it profiles on the device) is about ``--device-gib``; the offload server also gets
``--a2ats-host-kv-gb`` = ``--host-ratio`` x the dense server's measured pool bytes.
Then ``--requests`` distinct prompts of ``--prompt-tokens`` are sent at once to each,
and the table gives each pool's tokens, the peak number of requests decoding together
(SGLang's ``#running-req``) and the wall time to finish them all.

    python benchmarks/offload_capacity.py [--device-gib 0.25] [--host-ratio 12] [--requests 12]

On ``--device cpu`` the "device" budget is host memory like the host pool (an offload
pool's pages are touched only as tokens arrive): this measures admission, i.e. what a
GPU with that KV budget would admit, not a saving of CPU memory.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import platform
import re
import time
from datetime import date
from pathlib import Path

import psutil
import requests
from transformers import AutoTokenizer

from a2ats_sglang.harness.offline_models import model_or_default
from a2ats_sglang.harness.server import launch_server, on_cpu
from a2ats_sglang.calibration.texts import long_text

WEIGHT_OVERHEAD = 0.15  # GiB the server allocates after profiling its free memory, besides the weights


def mem_fraction(model: Path, device_gib: float) -> float:
    """``--mem-fraction-static`` that leaves about ``device_gib`` for the KV cache on this CPU:
    SGLang's budget = free memory after loading - (1 - fraction) x free memory before."""
    free = psutil.virtual_memory().available / 2**30
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30
    return 1.0 - (free - weights - WEIGHT_OVERHEAD - device_gib) / free


def serve_all(model, backend, args, prompts, new_tokens):
    """-> (pool tokens, device KV budget GiB or None, peak #running-req, seconds for all prompts)."""
    with launch_server(model, backend, args, timeout=600) as srv:
        def one(ids):
            r = requests.post(srv.url + "/generate", json={"input_ids": ids, "sampling_params": {
                "max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}}, timeout=3600)
            r.raise_for_status()
            return r.json()["meta_info"]["completion_tokens"]

        t = time.perf_counter()
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            done = list(pool.map(one, prompts))
        seconds = time.perf_counter() - t
        assert all(n == new_tokens for n in done), done
        log = srv.log()
    tokens = int(re.search(r"max_total_num_tokens=(\d+)", log).group(1))
    budget = re.search(r"device KV budget ([\d.]+) GiB", log)
    running = [int(n) for n in re.findall(r"#running-req: (\d+)", log)]
    return tokens, float(budget.group(1)) if budget else None, max(running, default=0), seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--device-gib", type=float, default=0.25, help="device KV budget both servers get (approximate)")
    ap.add_argument("--host-ratio", type=float, default=12.0, help="host pool = this x the dense pool's bytes")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--prompt-tokens", type=int, default=3000)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    model = model_or_default(args.model_path)
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    itemsize = 4 if on_cpu() else 2
    dense_cell = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 2 * head_dim * itemsize
    frac = mem_fraction(model, args.device_gib) if on_cpu() else 1.0 - args.device_gib / 80
    common = ["--mem-fraction-static", f"{frac:.4f}", "--max-running-requests", args.requests,
              "--decode-log-interval", 1, "--chunked-prefill-size", 2048]
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer(long_text(8 * args.prompt_tokens, offset=500 * i)).input_ids[:args.prompt_tokens]
               for i in range(args.requests)]  # distinct texts: no shared prefix
    dense = serve_all(model, "a2ats_dense" if on_cpu() else "triton", common, prompts, args.new_tokens)
    host_gib = math.ceil(args.host_ratio * dense[0] * dense_cell / 2**30 * 100) / 100
    offload = serve_all(model, "a2ats", common + ["--a2ats-offload", "--a2ats-host-kv-gb", host_gib], prompts,
                        args.new_tokens)
    rows = [("dense", dense, "-"), ("a2ats offload", offload, f"{host_gib:g} GiB")]
    lines = [f"Model `{model.name}`; {args.requests} requests of {args.prompt_tokens} prompt tokens + {args.new_tokens} "
             f"new, sent at once; `--mem-fraction-static {frac:.4f}` for both; {platform.machine()}, "
             f"{'CPU' if on_cpu() else 'GPU'}; {date.today()}.", "",
             "| server | device KV budget | host KV pool | pool tokens | peak requests decoding together | "
             "time for all (s) |", "|---|---|---|---|---|---|"]
    for name, (tokens, budget, peak, seconds), host in rows:
        device = budget if budget is not None else tokens * dense_cell / 2**30
        lines.append(f"| {name} | {device:.2f} GiB | {host} | {tokens:,} | {peak} | {seconds:.0f} |")
    lines += ["", f"Offload / dense: **{offload[0] / dense[0]:.1f}x** the tokens, "
                  f"**{offload[2] / max(1, dense[2]):.1f}x** the requests decoding together, "
                  f"{dense[3] / offload[3]:.2f}x the completion rate."]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "offload_capacity.md").write_text(table + "\n")
    (args.out / "offload_capacity.json").write_text(json.dumps(
        {"mem_fraction_static": frac, "host_kv_gb": host_gib, "dense_cell": dense_cell,
         "dense": dense, "offload": offload}, indent=1))


if __name__ == "__main__":
    main()
