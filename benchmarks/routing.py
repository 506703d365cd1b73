"""Cache-aware routing against round-robin over two a2ats servers behind SGLang's router
(``sglang-router``), on a multi-turn workload whose sessions share a long prefix each.

    python benchmarks/routing.py [--sessions 8] [--turns 4] [--concurrency 4] [--rounds 3] [--a2ats-args '--a2ats-offload']

Both servers stay up for the whole run; each round serves the workload through a router with
each policy in turn (the servers' radix caches flushed before each), so the policies alternate
on the same processes. Every session has a document of its own (~``--doc-chars`` characters)
as its system prompt and asks ``--turns`` questions, each sent with the conversation so far;
``--concurrency`` sessions are in flight at a time. Measured per turn through the router:
time to first token (streamed) and the prompt tokens the server found in its radix cache (the
server's own cache report). What cache-aware routing should show: later turns find their
conversation where it was computed, so more cached tokens and a shorter time to first token.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import statistics
import time
from contextlib import ExitStack
from datetime import date
from pathlib import Path

import requests
from offload_memory import write_results

from a2ats_sglang.calibration.texts import long_text
from a2ats_sglang.harness.offline_models import model_or_default
from a2ats_sglang.harness.server import launch_router, launch_server, on_cpu

POLICIES = ("cache_aware", "round_robin")
SERVER_ARGS = ["--max-total-tokens", "30000", "--max-running-requests", "8", "--enable-cache-report"]


def streamed_turn(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One greedy chat turn, streamed: its answer, time to first token and cache report."""
    t0 = time.perf_counter()
    ttft, parts, usage = None, [], None
    with requests.post(url + "/v1/chat/completions", json={
            "model": "default", "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}, stream=True, timeout=1200) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    ttft = ttft or time.perf_counter() - t0
                    parts.append(choice["delta"]["content"])
    return {"answer": "".join(parts), "ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def session(url: str, i: int, turns: int, doc_chars: int, max_tokens: int) -> list[dict]:
    msgs = [{"role": "system", "content": long_text(doc_chars, offset=500 + 53 * i)}]
    out = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {t + 1}: what does the text say about its main subject?"})
        turn = streamed_turn(url, msgs, max_tokens)
        out.append({"session": i, "turn": t, **turn})
        msgs.append({"role": "assistant", "content": turn["answer"]})
    return out


def workload(url: str, args) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(args.concurrency) as pool:
        sessions = list(pool.map(lambda i: session(url, i, args.turns, args.doc_chars, args.max_tokens),
                                 range(args.sessions)))
    return [t for s in sessions for t in s], time.perf_counter() - t0


def summary(turns: list[dict], wall: float) -> dict:
    later = [t for t in turns if t["turn"] > 0]
    return {"cached_share": sum(t["cached_tokens"] for t in turns) / sum(t["prompt_tokens"] for t in turns),
            "later_cached_share": sum(t["cached_tokens"] for t in later) / sum(t["prompt_tokens"] for t in later),
            "first_ttft_ms": 1000 * statistics.median(t["ttft_s"] for t in turns if t["turn"] == 0),
            "later_ttft_ms": 1000 * statistics.median(t["ttft_s"] for t in later),
            "later_mean_ttft_ms": 1000 * statistics.mean(t["ttft_s"] for t in later),
            "wall_s": wall}


def span(xs, fmt="{:.0f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--doc-chars", type=int, default=6000, help="each session's document (system prompt) length")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens generated per turn")
    ap.add_argument("--rounds", type=int, default=3, help="alternate the policies this many times")
    ap.add_argument("--a2ats-args", default="", help="extra server flags, e.g. '--a2ats-offload'")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="routing", help="results file name (OUT/NAME.md, .json, .png)")
    ap.add_argument("--table-from", type=Path, help="re-render the table and plot of a saved OUT/NAME.json (same flags)")
    args = ap.parse_args(argv)
    model = model_or_default(args.model_path)
    t0 = time.time()
    if args.table_from:  # re-render a saved run
        runs = json.loads(args.table_from.read_text())
    else:
        runs = {p: [] for p in POLICIES}
        with ExitStack() as stack:
            servers = [stack.enter_context(launch_server(model, "a2ats", SERVER_ARGS + args.a2ats_args.split()))
                       for _ in range(2)]
            for _ in range(args.rounds):
                for policy in POLICIES:
                    for s in servers:
                        requests.post(s.url + "/flush_cache", timeout=60).raise_for_status()
                    with launch_router([s.url for s in servers], policy) as router:
                        turns, wall = workload(router.url, args)
                    runs[policy].append({"wall_s": wall, "turns": turns})
                    print(f"[bench] {policy}: {summary(turns, wall)}", flush=True)
    s = {p: [summary(r["turns"], r["wall_s"]) for r in runs[p]] for p in POLICIES}
    ratio = {key: [rr[key] / ca[key] for ca, rr in zip(s["cache_aware"], s["round_robin"])]
             for key in ("later_ttft_ms", "later_mean_ttft_ms", "wall_s")}
    lines = [f"Model `{Path(model).name}`, two a2ats servers (`{' '.join(SERVER_ARGS + args.a2ats_args.split())}`) "
             f"behind sglang-router 0.3.2; {args.sessions} sessions x {args.turns} turns, {args.concurrency} in flight, "
             f"~{args.doc_chars}-character document per session, {args.max_tokens} tokens per turn; "
             f"{platform.machine()}, {'CPU' if on_cpu() else 'GPU'}; {date.today()}; {len(runs['cache_aware'])} rounds "
             f"alternating the policies (radix caches flushed before each). Median (range) over the rounds.", "",
             "| policy | cached share, all turns | cached share, turns 2+ | TTFT ms, turn 1 (median) | TTFT ms, turns 2+ "
             "(median) | TTFT ms, turns 2+ (mean) | workload s |", "|---|---|---|---|---|---|---|"]
    for p in POLICIES:
        lines.append(f"| {p} | {span([x['cached_share'] for x in s[p]], '{:.2f}')} | "
                     f"{span([x['later_cached_share'] for x in s[p]], '{:.2f}')} | "
                     f"{span([x['first_ttft_ms'] for x in s[p]])} | {span([x['later_ttft_ms'] for x in s[p]])} | "
                     f"{span([x['later_mean_ttft_ms'] for x in s[p]])} | {span([x['wall_s'] for x in s[p]], '{:.1f}')} |")
    lines += ["", "Round-robin / cache-aware, per round then median (range): " + "; ".join(
        f"{label} **{span(ratio[key], '{:.2f}')}x** ({', '.join(f'{x:.2f}' for x in ratio[key])})"
        for key, label in (("later_ttft_ms", "median TTFT of turns 2+"), ("later_mean_ttft_ms", "mean TTFT of turns 2+"),
                           ("wall_s", "workload time"))) + "."]
    write_results(args.out, args.name, "\n".join(lines), runs)
    plot(runs, args.turns, args.out / f"{args.name}.png")
    print(f"[bench] done in {time.time() - t0:.0f}s")


def plot(runs, turns: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for policy, rounds in runs.items():
        all_turns = [t for r in rounds for t in r["turns"]]
        by_turn = [[t for t in all_turns if t["turn"] == k] for k in range(turns)]
        ax1.plot(range(1, turns + 1), [1000 * statistics.median(t["ttft_s"] for t in ts) for ts in by_turn], "o-",
                 label=policy)
        ax2.plot(range(1, turns + 1), [sum(t["cached_tokens"] for t in ts) / sum(t["prompt_tokens"] for t in ts)
                                       for ts in by_turn], "o-", label=policy)
    ax1.set(xlabel="turn", ylabel="median TTFT (ms)", title="Time to first token")
    ax2.set(xlabel="turn", ylabel="cached prompt share", title="Radix-cache hits", ylim=(0, 1))
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
