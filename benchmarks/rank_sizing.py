"""Per-rank memory with tensor parallelism, from the servers' own sizing: device bytes per
token and the host pool each rank gets in offload mode, against on-device a2ats (SGLang's
K/V cell, the same per-token size SGLang's pool sizing divides by, plus the codes) at the
same TP.

    python benchmarks/rank_sizing.py [--tp 1 3] [--host-kv-gb 1.0]

Each TP is one real offload server (``--device cpu`` here) answering one request; the figures
are what its ranks log at start (a2ats offload's sizing line and start-up line), so nothing is
timed and one run suffices. ``--a2ats-host-kv-gb`` is the server's host memory for K/V, split
evenly between its ranks.
"""

from __future__ import annotations

import argparse
import platform
import re
from datetime import date
from pathlib import Path

import requests
from offload_memory import write_results

from a2ats_sglang.harness.offline_models import model_or_default
from a2ats_sglang.harness.server import launch_server, on_cpu

# gloo all-reduce on CPU; every rank sizes from the whole machine's memory, so SGLang's per-rank
# balance check is off (the host pool is sized by --a2ats-host-kv-gb)
RANKS_ARGS = ["--disable-custom-all-reduce", "--max-running-requests", "8"]
RANKS_ENV = {"SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK": "0"}
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
    model = model_or_default(args.model_path)
    rows = []
    for tp in args.tp:
        log = serve(model, tp, ["--a2ats-offload", "--a2ats-host-kv-gb", str(args.host_kv_gb)])
        heads = sorted(re.findall(HEADS_LINE, log))
        pools = re.findall(OFFLOAD_LINE, log)
        if not len(heads) == len(pools) == tp:
            raise RuntimeError(f"expected {tp} ranks' sizing lines, found {len(heads)} and {len(pools)}")
        for (rank, lo, hi, total), pool in zip(heads, pools):
            host_tokens, dense_cell, host_gib, code_cell, windows, window_mib = pool
            rows.append({"tp": tp, "rank": int(rank), "kv_heads": f"{lo}-{hi} of {total}", "dense_cell_b": int(dense_cell),
                         "code_cell_b": int(code_cell), "host_tokens": int(host_tokens), "host_gib": float(host_gib),
                         "windows": int(windows), "window_mib": float(window_mib)})
    lines = [f"Model `{Path(model).name}`, float32 K/V; `--a2ats-host-kv-gb {args.host_kv_gb}` for the whole server; "
             f"{platform.machine()}, {'CPU' if on_cpu() else 'GPU'}; {date.today()}; from each rank's start-up log.", "",
             "| TP | rank | KV heads | device B/token, on-device a2ats (K/V + codes) | device B/token, offload (codes) | "
             "offload / on-device | host pool tokens | host B/token | host GiB | resident windows on the device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        on_device = r["dense_cell_b"] + r["code_cell_b"]
        lines.append(f"| {r['tp']} | {r['rank']} | {r['kv_heads']} | {on_device} | {r['code_cell_b']} | "
                     f"{r['code_cell_b'] / on_device:.4f} | {r['host_tokens']} | {r['dense_cell_b']} | "
                     f"{r['host_gib']:.2f} | {r['windows']} x {r['window_mib']:.2f} MiB |")
    write_results(args.out, "rank_sizing", "\n".join(lines), rows)


if __name__ == "__main__":
    main()
