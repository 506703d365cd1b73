"""Decode throughput and time per output token: a2ats against a dense backend,
both served for real by SGLang in the same run, on the same machine.

For each context length and batch size: B requests share a long prefix (cached
in the radix tree after a warm-up) and differ in their last tokens; they are
streamed at once, and only the window in which all B decode together is timed
(from the last request's first token to the first request's last token): time per
output token and batch tokens/s over that window, with no prefill inside it.

    python benchmarks/decode_throughput.py [--lengths 1024 4096 8192 16384] [--batches 1 4]
        [--dense torch_native]   (on a GPU: --dense flashinfer)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import re
import time
from datetime import date
from pathlib import Path

import requests

from a2ats_sglang.harness.default_model import build_default_model, ensure_default_codebooks
from a2ats_sglang.harness.server import launch_server, on_cpu, stream_token_times
from a2ats_sglang.calibration.texts import long_text

TAIL = 8


def tokens_by(marks, t: float) -> int:
    """Tokens a request had streamed by time t (marks from ``stream_token_times``)."""
    return max((n for n, tm in marks if tm <= t), default=0)


def decode_timing(url, prompts, max_new_tokens):
    """Stream B requests at once and time the window in which all B decode together (from
    the last request's first token to the first request's last token), so that no
    request's prefill, nor a batch smaller than B, is in the measurement.
    -> (ms per output token of one request, output tokens/s of the batch)."""
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        runs = list(pool.map(lambda ids: stream_token_times(url, ids, max_new_tokens), prompts))
    start, end = max(m[0][1] for m in runs), min(m[-1][1] for m in runs)
    made = [tokens_by(m, end) - tokens_by(m, start) for m in runs]
    if end <= start or min(made) < 2:
        raise RuntimeError(f"the {len(prompts)} requests never decoded together for 2 tokens; raise --new-tokens")
    window = end - start
    return 1000 * window * len(made) / sum(made), sum(made) / window


def measure(backend, model, base_ids, lengths, batches, new_tokens, extra):
    ctx_max = max(lengths) + TAIL + new_tokens + 64
    args = ["--context-length", ctx_max, "--max-total-tokens", ctx_max + max(batches) * (2 * TAIL + new_tokens + 8) + 4096,
            "--max-running-requests", max(batches), "--decode-log-interval", 1, *extra]
    env = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
    rows = []
    with launch_server(model, backend, args, env=env, timeout=600) as srv:
        for length in lengths:
            prefix = base_ids[: length - TAIL]
            for b in batches:
                prompts = [prefix + [(1000 + 37 * i + j) % 40000 + 100 for j in range(TAIL)] for i in range(b)]
                # warm-up, untimed: the shared prefix into the radix cache
                requests.post(srv.url + "/generate", json={"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 1}},
                              timeout=3600).raise_for_status()
                tpot_ms, tok_s = decode_timing(srv.url, prompts, 1 + new_tokens)
                rows.append({"length": length, "batch": b, "tpot_ms": tpot_ms, "tok_s": tok_s})
                print(f"[{backend}] ctx {length:6d} batch {b}: {rows[-1]['tpot_ms']:8.1f} ms/token, {rows[-1]['tok_s']:7.2f} tok/s", flush=True)
        shares = [float(x) for x in re.findall(r"attended ([\d.]+)% of context \(", srv.log())]
    return rows, shares


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--dense", default="torch_native" if on_cpu() else "flashinfer")
    ap.add_argument("--a2ats-args", default="", help="extra server flags for a2ats, e.g. '--a2ats-budget 0.05'")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    model = args.model_path or build_default_model()
    if not args.model_path:
        ensure_default_codebooks(model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    base_ids = tok(long_text(max(args.lengths) * 6), add_special_tokens=False)["input_ids"]
    t0 = time.time()
    dense, _ = measure(args.dense, model, base_ids, args.lengths, args.batches, args.new_tokens, [])
    sparse, shares = measure("a2ats", model, base_ids, args.lengths, args.batches, args.new_tokens, args.a2ats_args.split())
    machine = f"{platform.machine()}, {'CPU' if on_cpu() else 'GPU'}"
    lines = [f"Model `{Path(model).name}`; {args.new_tokens} output tokens per request; shared cached prefix; "
             f"{machine}; {date.today()}; dense = `{args.dense}`; a2ats args `{args.a2ats_args or 'defaults'}`. "
             f"Contexts past the model's 8K training length are for throughput only.", "",
             "| context | batch | dense ms/token | a2ats ms/token | dense tok/s | a2ats tok/s | a2ats / dense throughput |",
             "|---|---|---|---|---|---|---|"]
    for d, s in zip(dense, sparse):
        lines.append(f"| {d['length']} | {d['batch']} | {d['tpot_ms']:.1f} | {s['tpot_ms']:.1f} | {d['tok_s']:.2f} | "
                     f"{s['tok_s']:.2f} | **{s['tok_s'] / d['tok_s']:.2f}x** |")
    if shares:
        lines += ["", f"a2ats attended between {min(shares):.1f} % and {max(shares):.1f} % of the context per decode step."]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_throughput.md").write_text(table + "\n")
    (args.out / "decode_throughput.json").write_text(json.dumps({"dense": dense, "a2ats": sparse}, indent=1))
    plot(dense, sparse, args.dense, args.out / "decode_throughput.png")
    print(f"[bench] done in {time.time() - t0:.0f}s")


def plot(dense, sparse, dense_name, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for rows, name in ((dense, dense_name), (sparse, "a2ats")):
        for b in sorted({r["batch"] for r in rows}):
            pts = [(r["length"], r["tpot_ms"]) for r in rows if r["batch"] == b]
            ax.plot(*zip(*pts), marker="o", label=f"{name}, batch {b}")
    ax.set(xlabel="context tokens", ylabel="time per output token (ms)", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
