"""Time to first token of chunk-fused requests against the full prefill, in one real server
(``--attention-backend a2ats --a2ats-chunk-fusion``), with the first token's agreement.

    python benchmarks/fusion_ttft.py [--chunks 1 2 4 8 16] [--ratios 0.05 0.15 0.3] [--rounds 3] [--questions 2]

A pool of ``--pool`` Wikipedia passages of 256-512 tokens is ingested first (each passage's KV
computed once after the shared instruction, as a RAG system ingests its documents). Then, per
round, per chunk count, per question: a prompt of that many passages in a random order and a
question; sent as a plain request (the baseline: SGLang's radix cache reuses what it can, the
instruction and the first passage), then fused with naive concatenation and with A³ at each
ratio, each ``max_new_tokens=1`` (its latency is the TTFT, admission included: the passages'
cache-hit prefills, A³'s scoring pass and the final request; a single passage is served as a
plain request, its prefix and passage found in the radix cache). Every prompt is new to every
radix namespace it is sent to. Per round, the ratio of TTFTs on the same prompts; reported:
median over rounds with the range, the first token's agreement with the baseline, the
share of the prompt computed (the scheduler's per-request lines) and the TTFT bound that share
gives (full TTFT x computed share: what fusion would cost if time were proportional to tokens
computed).
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offload_memory import write_results  # noqa: E402

from a2ats_sglang.harness.offline_models import model_or_default  # noqa: E402
from a2ats_sglang.harness.rag import paragraphs, rag_prompt  # noqa: E402
from a2ats_sglang.harness.server import launch_server  # noqa: E402


def post(url, prompt, marks=None, rid=None) -> tuple[float, dict]:
    sampling = {"max_new_tokens": 1, "temperature": 0}
    if marks is not None:
        sampling["custom_params"] = marks
    body = {"text": prompt.text, "sampling_params": sampling, "return_logprob": True, "top_logprobs_num": 1}
    if rid:
        body["rid"] = rid
    t = time.perf_counter()
    r = requests.post(url + "/generate", json=body, timeout=1800)
    r.raise_for_status()
    return time.perf_counter() - t, r.json()


def computed(log: str, rid: str, meta: dict) -> int:
    """Tokens the scheduler computed for request ``rid``: its scoring pass (``rid.a2ats-score``)
    and its final extend, or for a request served plain (a single chunk) the prompt tokens its
    radix match (``meta``: its reply's ``meta_info``) did not cover."""
    lines = re.findall(r"a2ats fusion: request (\S+) \((?:final|scoring pass)\) positions \d+-\d+: (\d+) computed", log)
    fused = [int(n) for r, n in lines if r in (rid, rid + ".a2ats-score")]
    return sum(fused) if fused else meta["prompt_tokens"] - meta["cached_tokens"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.15, 0.3])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--questions", type=int, default=2, help="prompts per chunk count per round")
    ap.add_argument("--pool", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    model = model_or_default(args.model_path)
    tok = AutoTokenizer.from_pretrained(model)
    pool = paragraphs(tok, args.pool, 256, 512)
    context = 8000  # tokens a prompt may have (the default model's context is 8192; longer draws are redrawn)
    variants = [("naive", 0.0)] + [("a3", r) for r in args.ratios]
    server = ["--max-total-tokens", "120000", "--max-running-requests", "4", "--a2ats-chunk-fusion"]
    runs = {k: {f"{m}@{r:g}": [] for m, r in variants} for k in args.chunks}
    full = {k: [] for k in args.chunks}
    t0 = time.time()
    with launch_server(model, "a2ats", server, timeout=600) as srv:
        for i, passage in enumerate(pool):  # ingest: each passage's KV after the instruction, once
            post(srv.url, rag_prompt([passage], 1, i, plant_fact=False), {"a2ats_chunks": [passage],
                                                                         "a2ats_fusion_method": "naive"})
        print(f"[bench] ingested {len(pool)} passages in {time.time() - t0:.0f}s", flush=True)
        for rnd in range(args.rounds):
            for k in args.chunks:
                for q in range(args.questions):
                    seed = 1000 * (rnd + 1) + 37 * k + 5 * q
                    prompt = rag_prompt(pool, k, seed, plant_fact=False)
                    while len(tok.encode(prompt.text)) > context:
                        seed += 1
                        prompt = rag_prompt(pool, k, seed, plant_fact=False)
                    base_s, base = post(srv.url, prompt)
                    tokens = base["meta_info"]["prompt_tokens"]
                    top = base["meta_info"]["output_top_logprobs"][0][0][1]
                    full[k].append({"round": rnd, "seed": seed, "seconds": base_s, "tokens": tokens})
                    for m, r in variants:
                        rid = f"b{seed}-{m}{int(r * 1000)}"
                        s, out = post(srv.url, prompt, prompt.marks(ratio=r, method=m), rid=rid)
                        runs[k][f"{m}@{r:g}"].append({
                            "round": rnd, "seed": seed, "seconds": s, "ratio_to_full": base_s / s,
                            "top1": out["meta_info"]["output_top_logprobs"][0][0][1] == top,
                            "computed": computed(srv.log(), rid, out["meta_info"]), "tokens": tokens})
                full_s = statistics.median(x["seconds"] for x in full[k] if x["round"] == rnd)
                speedups = ", ".join(f"{v} {round_medians(rs)[rnd]:.2f}x" for v, rs in runs[k].items())
                print(f"[bench] round {rnd + 1} {k} chunks: full {full_s:.2f}s, {speedups} ({time.time() - t0:.0f}s)",
                      flush=True)
    lines = [f"Model `{Path(model).name}`, one a2ats server with `--a2ats-chunk-fusion` (default options otherwise); "
             f"pool of {args.pool} Wikipedia passages of 256-512 tokens ingested first; {args.questions} prompts per "
             f"chunk count per round, {args.rounds} rounds; TTFT = latency of a 1-token request, admission included; "
             f"{platform.machine()}, {date.today()}.", "",
             "| chunks | prompt tokens (median) | full TTFT (s, median) | method @ r | speedup vs full (median of "
             "rounds, range) | first token = full | computed share | TTFT bound from computed share |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for k in args.chunks:
        full_s = statistics.median(x["seconds"] for x in full[k])
        for v, rs in runs[k].items():
            per_round = round_medians(rs)
            share = statistics.mean(x["computed"] / x["tokens"] for x in rs)
            summary[f"{k}/{v}"] = statistics.median(per_round)
            lines.append(f"| {k} | {statistics.median(x['tokens'] for x in rs)} | {full_s:.2f} | {v} | "
                         f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-{max(per_round):.2f}) | "
                         f"{statistics.mean(x['top1'] for x in rs):.2f} | {share:.3f} | {1 / share:.1f}x |")
    write_results(args.out, "fusion_ttft", "\n".join(lines), {"full": full, "runs": runs, "summary": summary})
    plot(args.chunks, runs, args.out / "fusion_ttft.png")
    print(f"[bench] done in {time.time() - t0:.0f}s")


def round_medians(rs: list[dict]) -> list[float]:
    """Per round, the median speedup of its prompts."""
    return [statistics.median(x["ratio_to_full"] for x in rs if x["round"] == rnd)
            for rnd in sorted({x["round"] for x in rs})]


def plot(chunks, runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v in runs[chunks[0]]:
        ax.plot(chunks, [statistics.median(round_medians(runs[k][v])) for k in chunks], "o-", label=v)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="chunks per prompt", ylabel="TTFT speedup vs full prefill (median of rounds)", xscale="log",
           title="Served chunk fusion")
    ax.set_xticks(chunks, [str(k) for k in chunks])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
