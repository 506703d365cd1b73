"""Decode throughput and time per output token: a2ats against a dense backend,
both served for real by SGLang in the same run, on the same machine.

For each context length and batch size: B requests share a long prefix (cached
in the radix tree after a warm-up) and differ in their last tokens; they are
streamed at once, and only the window in which all B decode together is timed
(from the last request's first token to the first request's last token): time per
output token and batch tokens/s over that window, with no prefill inside it.

    python benchmarks/decode_throughput.py [--lengths 1024 4096 8192 16384] [--batches 1 4]
        [--dense a2ats_dense torch_native] [--rounds 3] [--graphs off|on|both] [--packed-linear]
        (on a GPU: --dense flashinfer)

Each round serves every dense backend, then a2ats, one server at a time (with
``--graphs both``, each eagerly and then under SGLang's CPU graph runner,
``--enable-torch-compile``, as ``NAME+graphs``); the table gives per configuration the
median ms/token over rounds (and its range), a2ats's throughput against each dense
backend run the same way, and with both, each backend's throughput with graphs against
without, as the median of the per-round ratios (and their range). The server logs'
capture time and memory of the graph runner are printed and kept in the JSON. With
``--packed-linear``, each a2ats configuration is also served with the CPU platform's opt-in
oneDNN-packed linear layers (``A2ATS_CPU_LINEAR=packed``), as ``NAME+packed-linear``, and
compared with the default (SGLang's own linear layers).
Floors: the bytes one decode step must read (the weights once, plus per request the K/V
it attends and, for a2ats, its codes) at the machine's measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import re
import statistics
import time
from datetime import date
from functools import lru_cache
from pathlib import Path

import requests

from a2ats_sglang.core.codebook import ModelShape
from a2ats_sglang.harness.offline_models import model_or_default
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


GRAPH_ARGS = ("--enable-torch-compile", "--cuda-graph-bs-decode")  # + the batch sizes measured
# Backends SGLang serves eagerly whatever the flags ("Cuda graph is disabled because of using torch native attention
# backend"): served once, eagerly, and every configuration is compared with that.
GRAPHLESS = {"torch_native"}
PACKED_LINEAR = "+packed-linear"  # a configuration served with A2ATS_CPU_LINEAR=packed
CAPTURE = re.compile(r"Capture target decode CPU graph end\. bs=\[([\d, ]+)\], elapsed=([\d.]+) s, mem usage=([\d.-]+) GB")


def installed_copy_env(site: Path) -> dict:
    """Server environment that imports a2ats_sglang (and its SGLang plugin entry points) from
    ``site``, a ``pip install --no-deps --target`` of another revision, whose C++ kernels
    build in their own directory there (the server runs in ``site``: this tree's package
    would come first on the path from its own directory)."""
    return {"PYTHONPATH": str(site), "TORCH_EXTENSIONS_DIR": str(site / "torch_extensions")}


def measure(backend, model, base_ids, lengths, batches, new_tokens, extra, env=None):
    ctx_max = max(lengths) + TAIL + new_tokens + 64
    args = ["--context-length", ctx_max, "--max-total-tokens", ctx_max + max(batches) * (2 * TAIL + new_tokens + 8) + 4096,
            "--max-running-requests", max(batches), "--decode-log-interval", 1, *extra]
    cwd = env.get("PYTHONPATH") if env else None
    packed = on_cpu() and (env or {}).get("A2ATS_CPU_LINEAR") == "packed"  # this tree's opt-in packed linear layers
    env = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1", **(env or {})}
    rows = []
    with launch_server(model, backend, args, env=env, timeout=600, cwd=cwd) as srv:
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
        log = srv.log()
        if packed and "packed by oneDNN" not in log:
            raise RuntimeError(f"{backend}'s linear layers were not packed; see {srv.log_path}")
        if GRAPH_ARGS[0] in extra and ("cpu graph: True" not in log or "CPU graph capture failed" in log):
            raise RuntimeError(f"{backend} did not decode under CPU graphs; see {srv.log_path}")
        shares = [float(x) for x in re.findall(r"attended ([\d.]+)% of context \(", log)]
        capture = [{"bs": [int(b) for b in m[0].split(",")], "seconds": float(m[1]), "gb": float(m[2])}
                   for m in CAPTURE.findall(log)]
    return rows, shares, capture


@lru_cache(maxsize=None)
def model_bytes(model: str) -> tuple[int, int, int]:
    """(weights, K/V bytes per token in float32 as served on CPU, code bytes per token) of ``model``."""
    from transformers import AutoConfig

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(model))
    weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
    heads = shape.num_layers * shape.num_kv_heads
    return weights, heads * shape.head_dim * 2 * 4, heads * 2


def step_floor_ms(model: str, length: int, batch: int, share: float, copy_gb_s: float, codes: bool) -> float:
    """ms one decode step must take at ``copy_gb_s``: the weights once, and per request the K/V
    of ``share`` of its context plus, with ``codes``, a 2-byte code per token and KV head."""
    weights, kv_per_token, code_per_token = model_bytes(model)
    tokens = batch * length
    return 1e3 * (weights + tokens * share * kv_per_token + (tokens * code_per_token if codes else 0)) / (copy_gb_s * 1e9)


def span(xs) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--dense", nargs="*", default=["a2ats_dense", "torch_native"] if on_cpu() else ["flashinfer"])
    ap.add_argument("--rounds", type=int, default=1, help="alternate the backends this many times")
    ap.add_argument("--a2ats-args", default="", help="extra server flags for a2ats, e.g. '--a2ats-budget 0.05'")
    ap.add_argument("--graphs", choices=("off", "on", "both"), default="off",
                    help="serve each backend eagerly, under SGLang's CPU graph runner, or both")
    ap.add_argument("--a2ats-from", metavar="LABEL=DIR",
                    help="also serve a2ats (eagerly) from DIR, a `pip install --no-deps --target DIR` of another "
                         "revision, as a2ats@LABEL, and compare this tree's a2ats against it")
    ap.add_argument("--packed-linear", action="store_true",
                    help="also serve each a2ats configuration with the CPU platform's oneDNN-packed linear layers "
                         "(A2ATS_CPU_LINEAR=packed)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    model = model_or_default(args.model_path)
    from offload_memory import copy_bandwidth
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    base_ids = tok(long_text(max(args.lengths) * 6), add_special_tokens=False)["input_ids"]
    t0 = time.time()
    suffixes = {"off": [""], "on": ["+graphs"], "both": ["", "+graphs"]}[args.graphs]
    backends = [n + sfx for n in [*args.dense, "a2ats"] for sfx in ([""] if n in GRAPHLESS else suffixes)]
    graph_extra = [GRAPH_ARGS[0], GRAPH_ARGS[1], *map(str, sorted(set(args.batches)))]
    # (numerator, denominator): the throughput of the first over the second, per round
    pairs = [(f"a2ats{sfx}", d + ("" if d in GRAPHLESS else sfx)) for sfx in suffixes for d in args.dense]
    pairs += [(n + "+graphs", n) for n in [*args.dense, "a2ats"] if n not in GRAPHLESS] if args.graphs == "both" else []
    other = {}  # a2ats@LABEL or NAME+packed-linear -> its server environment
    if args.packed_linear:
        mine = [f"a2ats{sfx}" for sfx in suffixes]
        other = {n + PACKED_LINEAR: {"A2ATS_CPU_LINEAR": "packed"} for n in mine}
        backends += list(other)
        pairs += [(n + PACKED_LINEAR, n) for n in mine]
    if args.a2ats_from:
        label, site = args.a2ats_from.split("=", 1)
        other[f"a2ats@{label}"] = installed_copy_env(Path(site).resolve())
        backends = [f"a2ats@{label}", *backends]
        pairs += [(f"a2ats{sfx}", f"a2ats@{label}") for sfx in suffixes]
    runs = {name: [] for name in backends}  # per configuration, per round: rows
    shares, copies, captures = [], [], {}
    for _ in range(args.rounds):
        copies.append(copy_bandwidth())
        for name in backends:
            backend = name.split("+")[0].split("@")[0]  # a2ats@LABEL: a2ats of another revision
            extra = (args.a2ats_args.split() if backend == "a2ats" else []) + (graph_extra if "+graphs" in name else [])
            rows, got, capture = measure(backend, model, base_ids, args.lengths, args.batches, args.new_tokens, extra,
                                         other.get(name))
            runs[name].append(rows)
            shares += got if name in ("a2ats", "a2ats+graphs") else []
            captures.setdefault(name, []).extend(capture)
    copy = statistics.median(copies)
    share = statistics.median(shares) / 100 if shares else 1.0
    machine = f"{platform.machine()}, {'CPU' if on_cpu() else 'GPU'}"
    lines = [f"Model `{Path(model).name}`; {args.new_tokens} output tokens per request; shared cached prefix; "
             f"{machine}; {date.today()}; {args.rounds} round(s), each serving {', '.join(backends)} in turn"
             f"{' (+graphs: ' + ' '.join(graph_extra) + ')' if args.graphs != 'off' else ''}; "
             f"copy bandwidth {copy:.1f} GB/s; a2ats args `{args.a2ats_args or 'defaults'}`. Contexts past the "
             f"model's 8K training length are for throughput only.", "",
             "| context | batch | " + " | ".join(f"{n} ms/token" for n in backends) + " | " +
             " | ".join(f"{a} / {b} throughput" for a, b in pairs) + " | dense floor ms | a2ats floor ms |",
             "|---|---|" + "---|" * (len(backends) + len(pairs) + 2)]
    table_rows = []
    for i, first in enumerate(runs[backends[0]][0]):
        length, batch = first["length"], first["batch"]
        ms = {n: [r[i]["tpot_ms"] for r in runs[n]] for n in backends}
        ratios = {f"{a} / {b}": [d[i]["tpot_ms"] / s[i]["tpot_ms"] for s, d in zip(runs[a], runs[b])] for a, b in pairs}
        floors = (step_floor_ms(model, length, batch, 1.0, copy, False),
                  step_floor_ms(model, length, batch, share, copy, True))
        table_rows.append({"length": length, "batch": batch, "ms": ms, "ratios": ratios, "floor_ms": floors})
        lines.append(f"| {length} | {batch} | " + " | ".join(span(ms[n]) for n in backends) + " | " +
                     " | ".join(f"**{statistics.median(ratios[n]):.2f}x** ({min(ratios[n]):.2f}–{max(ratios[n]):.2f})"
                                for n in ratios) + f" | {floors[0]:.1f} | {floors[1]:.1f} |")
    if shares:
        lines += ["", f"a2ats attended between {min(shares):.1f} % and {max(shares):.1f} % of the context per decode "
                      f"step (median {100 * share:.1f} %, used for its floor)."]
    for name, caps in captures.items():
        if caps:
            buckets = len(caps[0]["bs"])
            lines += [f"{name}: graph capture of batch sizes {caps[0]['bs']}: {span([c['seconds'] for c in caps])} s "
                      f"over the rounds ({span([c['seconds'] / buckets for c in caps])} s per bucket), memory "
                      f"{span([c['gb'] for c in caps])} GB as SGLang reports it (host memory, compile workers included)"]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_throughput.md").write_text(table + "\n")
    (args.out / "decode_throughput.json").write_text(json.dumps({"copy_gb_s": copies, "rows": table_rows, "runs": runs,
                                                                "captures": captures},
                                                                indent=1))
    plot(runs, args.out / "decode_throughput.png")
    print(f"[bench] done in {time.time() - t0:.0f}s")


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, rounds in runs.items():
        for b in sorted({r["batch"] for r in rounds[0]}):
            pts = [(r["length"], statistics.median(rr[i]["tpot_ms"] for rr in rounds))
                   for i, r in enumerate(rounds[0]) if r["batch"] == b]
            ax.plot(*zip(*pts), marker="o", label=f"{name}, batch {b}")
    ax.set(xlabel="context tokens", ylabel="time per output token (ms, median over rounds)", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
