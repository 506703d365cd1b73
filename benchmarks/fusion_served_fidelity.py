"""Fidelity of served chunk fusion to the full prefill, from the server's own logprobs: A³ and
CacheBlend-style selection at several recompute ratios and naive concatenation, over
retrieval-augmented prompts with a planted fact, in one server (``--attention-backend a2ats
--a2ats-chunk-fusion``).

    python benchmarks/fusion_served_fidelity.py [--prompts 100] [--chunks 8] [--ratios 0.05 0.15 0.3]
        [--methods a3 cacheblend] [--probes asked space-given]

Each prompt: the instruction, ``--chunks`` passages of 256-512 tokens drawn in random order
from a pool of 32 (one with a planted code, or on odd prompts a fact split over two), the
question. Sent plain (the full prefill: greedy tokens, the first token's top-20 logprobs),
then fused per method, asking for the logprobs of the full prefill's top-20 tokens. Per
method: KL(full || fused) of the first token's distribution over those 20 tokens and the rest
of the vocabulary lumped into one outcome (a lower bound of the full-vocabulary KL: merging
outcomes never increases it), first token and first ``--gen-tokens`` greedy tokens equal to
the full prefill's, planted facts answered.

Every prompt is asked twice (``--probes``), as asked and with the answer's first token (the space before the
code) given at the end of the question. On a small model the first of these is a choice among
near-equal openings (" ", " the", " not", ...: the full prefill's top-1 often under 0.1), so
whether a fact counts as answered turns on a near tie unrelated to the fact; with the space
given, the first token generated is the code's first digit, and the KL and the facts measure
whether the fused KV still carries the fact.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offload_memory import write_results  # noqa: E402

from a2ats_sglang.harness.offline_models import model_or_default  # noqa: E402
from a2ats_sglang.harness.rag import RagPrompt, answered_share, facts_answered, paragraphs, rag_prompt  # noqa: E402
from a2ats_sglang.harness.server import launch_server  # noqa: E402

TOP = 20
NEAR_TIE = 1.0  # nats: a first token the full prefill barely prefers
ANSWER_SPACE = " "  # the token a code's answer opens with in the offline models' tokenizers (" 4821" -> " ", "4", ...)


def generate(url, prompt, n, marks=None, **logprobs) -> dict:
    sampling = {"max_new_tokens": n, "temperature": 0}
    if marks is not None:
        sampling["custom_params"] = marks
    r = requests.post(url + "/generate", json={"text": prompt.text, "sampling_params": sampling, "return_logprob": True,
                                               **logprobs}, timeout=1800)
    r.raise_for_status()
    return r.json()


def lumped_kl(p: dict[int, float], q: dict[int, float]) -> float:
    """KL over the tokens of ``p`` (token id -> logprob) plus one outcome for all others."""
    kl = sum(math.exp(lp) * (lp - q[t]) for t, lp in p.items())
    p_rest = max(1e-12, 1 - sum(math.exp(lp) for lp in p.values()))
    q_rest = max(1e-12, 1 - sum(math.exp(q[t]) for t in p))
    return kl + p_rest * math.log(p_rest / q_rest)


PROBES = {"asked": lambda p: p, "space-given": lambda p: replace(p, question=p.question + ANSWER_SPACE)}
PROBE_TITLES = {"asked": "as asked (the question's lead ends before the answer)",
                "space-given": f"the answer's first token ({ANSWER_SPACE!r}) given (the first token generated is "
                               "the code's first digit)"}


def space_is_own_token(tokenizer, prompt: RagPrompt) -> bool:
    """Whether ``prompt``'s text plus :data:`ANSWER_SPACE` tokenizes as the prefix of its text
    plus the spaced answer, so that giving the space is giving the answer's first token."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    given = enc(prompt.text + ANSWER_SPACE)
    return enc(prompt.text + ANSWER_SPACE + prompt.answer)[:len(given)] == given


def probe(url, prompt: RagPrompt, variants, gen_tokens: int, two_chunk: bool) -> tuple[dict, dict[str, dict]]:
    """The full prefill's row for ``prompt`` (planted fact answered, prompt tokens, first-token
    margin) and each variant's (KL to the full prefill's first token, first and all
    ``gen_tokens`` greedy tokens equal to its, fact answered)."""
    full = generate(url, prompt, gen_tokens, top_logprobs_num=TOP)
    meta = full["meta_info"]
    want = [t for _, t, _ in meta["output_token_logprobs"]]
    p = {t: lp for lp, t, _ in meta["output_top_logprobs"][0]}
    top2 = sorted(p.values(), reverse=True)[:2]
    full_row = {"answered": prompt.answer in full["text"], "tokens": meta["prompt_tokens"], "two_chunk": two_chunk,
                "margin": top2[0] - top2[1]}
    rows = {}
    for m, r in variants:
        got = generate(url, prompt, gen_tokens, prompt.marks(ratio=r, method=m), token_ids_logprob=list(p))
        gen = [t for _, t, _ in got["meta_info"]["output_token_logprobs"]]
        q = {t: lp for lp, t, _ in got["meta_info"]["output_token_ids_logprobs"][0]}
        rows[f"{m}@{r:g}"] = {"kl": lumped_kl(p, q), "top1": gen[0] == want[0], "seq": gen == want,
                              "answered": prompt.answer in got["text"], "two_chunk": two_chunk}
    return full_row, rows


def a3_rivals(key: str, rows: dict) -> list[str]:
    """The A³ rows to set method ``key``'s against: every ratio's for naive concatenation, the
    same ratio's for another selection, none for A³'s own."""
    if key.startswith("a3@"):
        return []
    return [k for k in rows if k.startswith("a3@") and (key.startswith("naive@") or k.split("@")[1] == key.split("@")[1])]


def table(title: str, full_rows: list[dict], rows: dict[str, list[dict]], gen_tokens: int) -> list[str]:
    """A probe's results: per method the KL, greedy agreement and facts, then how often A³'s KL
    is the lower one and the facts each method loses that the full prefill answers."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = [f"### {title}", "", f"Full prefill: {facts_answered(full_rows)}; median first-token margin "
             f"{statistics.median(f['margin'] for f in full_rows):.2f} nats.", "",
             f"| method @ ratio | mean KL to full (nats, top-{TOP} + rest) | median KL | first token = full | first "
             f"{gen_tokens} tokens = full | facts, one chunk | facts, two chunks |", "|---|---|---|---|---|---|---|"]
    for key, rs in rows.items():
        lines.append(f"| {key} | {mean([r['kl'] for r in rs]):.4f} | {statistics.median(r['kl'] for r in rs):.4f} | "
                     f"{mean([r['top1'] for r in rs]):.2f} | {mean([r['seq'] for r in rs]):.2f} | "
                     f"{answered_share(rs, False):.2f} | {answered_share(rs, True):.2f} |")
    lines += ["", f"Prompts where A³'s KL is lower than another method's at the same ratio (or naive's), facts the full "
              f"prefill answers and a method does not, and how many of those the full prefill answers with a "
              f"first-token margin (its top-1 logprob minus its top-2's) under {NEAR_TIE} nat:", ""]
    for key, rs in rows.items():
        lost = [f["margin"] for f, r in zip(full_rows, rs) if f["answered"] and not r["answered"]]
        lower = [f"A³@{k.split('@')[1]}'s lower on {sum(x['kl'] < y['kl'] for x, y in zip(rows[k], rs))} of {len(rs)}"
                 for k in a3_rivals(key, rows)]
        lines.append(f"- {key}: {len(lost)} lost, {sum(m < NEAR_TIE for m in lost)} of them near ties"
                     + "".join(f"; KL {x}" for x in lower))
    return lines + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.15, 0.3])
    ap.add_argument("--methods", nargs="+", default=["a3", "cacheblend"], choices=["a3", "cacheblend"],
                    help="selections compared at every ratio (naive concatenation always runs)")
    ap.add_argument("--probes", nargs="+", default=list(PROBES), choices=list(PROBES),
                    help="asked: the prompt as it is; space-given: with the answer's first token given")
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    model = model_or_default(args.model_path)
    tokenizer = AutoTokenizer.from_pretrained(model)
    pool = paragraphs(tokenizer, 32, 256, 512)
    variants = [("naive", 0.0)] + [(m, r) for r in args.ratios for m in args.methods]
    probes = {name: PROBES[name] for name in args.probes}
    results = {name: {"full": [], "methods": {f"{m}@{r:g}": [] for m, r in variants}} for name in probes}
    t0 = time.time()
    server = ["--max-total-tokens", "60000", "--max-running-requests", "4", "--a2ats-chunk-fusion"]
    with launch_server(model, "a2ats", server, timeout=600) as srv:
        for i in range(args.prompts):
            prompt = rag_prompt(pool, args.chunks, i)
            if "space-given" in probes and not space_is_own_token(tokenizer, prompt):
                raise SystemExit(f"the tokenizer of {model} does not open the answer with {ANSWER_SPACE!r} as its "
                                 "own token: run with --probes asked")
            for name, make in probes.items():
                full_row, rows = probe(srv.url, make(prompt), variants, args.gen_tokens, i % 2 == 1)
                results[name]["full"].append(full_row)
                for key, row in rows.items():
                    results[name]["methods"][key].append(row)
            if (i + 1) % 10 == 0:
                print(f"[bench] {i + 1}/{args.prompts} prompts, {time.time() - t0:.0f}s", flush=True)
    full_rows = next(iter(results.values()))["full"]
    lines = [f"Model `{Path(model).name}` served by a2ats with `--a2ats-chunk-fusion`; {args.prompts} prompts of "
             f"{args.chunks} passages of 256-512 tokens from a pool of 32 (median prompt "
             f"{statistics.median(r['tokens'] for r in full_rows)} tokens); {platform.machine()}, {date.today()}. "
             f"Probes: {', '.join(PROBE_TITLES[name] for name in probes)}.", ""]
    for name, res in results.items():
        lines += table(f"Probe: {PROBE_TITLES[name]}", res["full"], res["methods"], args.gen_tokens)
    write_results(args.out, "fusion_served_fidelity", "\n".join(lines), results)
    print(f"[bench] done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
