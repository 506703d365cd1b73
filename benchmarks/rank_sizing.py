"""Per-rank memory with tensor parallelism, from the servers' own sizing: device bytes per
token and the host pool each rank gets in offload mode, against on-device a2ats (SGLang's
dense K/V pool plus codes) at the same TP.

    python benchmarks/rank_sizing.py [--tp 1 3] [--host-kv-gb 1.0]

Each configuration is one real server (``--device cpu`` here); the figures are what its ranks
log at start (SGLang's ``KV Cache is allocated`` line, a2ats offload's sizing line), so
nothing is timed and one run suffices. ``--a2ats-host-kv-gb`` is the server's host memory for
K/V, split evenly between its ranks.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from datetime import date
from pathlib import Path

import requests

from a2ats_sglang.harness.default_model import build_default_model, ensure_default_codebooks
from a2ats_sglang.harness.server import launch_server, on_cpu

# gloo all-reduce on CPU; every rank would size its pool from the whole machine's memory, so
# the on-device pool is sized here and SGLang's per-rank balance check is off
RANKS_ARGS = ["--disable-custom-all-reduce", "--max-running-requests", "8"]
RANKS_ENV = {"SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK": "0"}
ON_DEVICE_TOKENS = 20000
KV_LINE = r"KV Cache is allocated\. dtype: \S+, #tokens: (\d+), K size: ([\d.]+) GB, V size: ([\d.]+) GB"
OFFLOAD_LINE = (r"a2ats offload: (\d+) tokens of KV in host memory \((\d+) B/token, ([\d.]+) GiB of host memory for it\);"
                r" on the device (\d+) B/token of codes and (\d+) resident windows of ([\d.]+) MiB")
HEADS_LINE = r"TP rank (\d+) of \d+: KV heads (\d+)-(\d+) of (\d+)"


def serve(model, tp: int, extra: list[str]) -> str:
    """Start a server at ``tp``, answer one request, return its log."""
    with launch_server(model, "a2ats", ["--tp-size", str(tp)] + RANKS_ARGS + extra, env=RANKS_ENV) as srv:
        r = requests.post(srv.url + "/generate", json={"text": "The capital of France is", "sampling_params": {
            "max_new_tokens": 4, "temperature": 0}}, timeout=600)
        r.raise_for_status()
        return srv.log()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--host-kv-gb", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    model = args.model_path or build_default_model()
    if not args.model_path:
        ensure_default_codebooks(model)
    rows = []
    for tp in args.tp:
        on_device = serve(model, tp, ["--max-total-tokens", str(ON_DEVICE_TOKENS)])
        offload = serve(model, tp, ["--a2ats-offload", "--a2ats-host-kv-gb", str(args.host_kv_gb)])
        kv = re.findall(KV_LINE, on_device)
        heads = sorted(re.findall(HEADS_LINE, offload))
        pools = re.findall(OFFLOAD_LINE, offload)
        if not (len(kv) == len(heads) == len(pools) == tp):
            raise RuntimeError(f"expected {tp} ranks' sizing lines, found {len(kv)}, {len(heads)}, {len(pools)}")
        for (rank, lo, hi, total), (tokens, k_gb, v_gb), pool in zip(heads, kv, pools):
            host_tokens, host_cell, host_gib, code_cell, windows, window_mib = pool
            dense_cell = (float(k_gb) + float(v_gb)) * 1e9 / int(tokens)  # SGLang prints 2 decimals of GB
            rows.append({"tp": tp, "rank": int(rank), "kv_heads": f"{lo}-{hi} of {total}", "on_device_cell_b": dense_cell,
                         "host_tokens": int(host_tokens), "host_cell_b": int(host_cell), "host_gib": float(host_gib),
                         "device_code_cell_b": int(code_cell), "windows": int(windows),
                         "window_mib": float(window_mib)})
    lines = [f"Model `{Path(model).name}`, float32 K/V; `--a2ats-host-kv-gb {args.host_kv_gb}` for the whole server; "
             f"{platform.machine()}, {'CPU' if on_cpu() else 'GPU'}; {date.today()}; from each rank's start-up log.", "",
             "| TP | rank | KV heads | on-device K/V B/token (SGLang) | offload: device B/token (codes) | device share | "
             "host pool tokens | host B/token | host GiB | resident windows |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tp']} | {r['rank']} | {r['kv_heads']} | {r['on_device_cell_b']:.0f} | "
                     f"{r['device_code_cell_b']} | {r['device_code_cell_b'] / r['host_cell_b']:.4f} | "
                     f"{r['host_tokens']} | {r['host_cell_b']} | {r['host_gib']:.2f} | {r['windows']} x "
                     f"{r['window_mib']:.2f} MiB |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rank_sizing.md").write_text(table + "\n")
    (args.out / "rank_sizing.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
