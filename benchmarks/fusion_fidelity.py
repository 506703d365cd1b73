"""Fidelity of chunk-KV fusion to the full prefill: A³ (its question attention computed
exactly, or scored through the a2ats lookup table from the chunk tokens' codes: ``a3-lut``)
against CacheBlend-style selection and plain concatenation at equal recompute ratios, over retrieval-augmented prompts made of
Wikipedia paragraphs reused in random orders, on the reference engine
(:mod:`a2ats_sglang.fusion.reference`, the model in Hugging Face transformers, SDPA attention;
A³'s question pass with eager attention, which returns the probabilities).

    python benchmarks/fusion_fidelity.py [--prompts 100] [--chunks 8] [--ratios 0.05 0.15 0.3]
        [--methods cacheblend a3 a3-lut]

Each prompt: a short instruction (the shared prefix), ``--chunks`` paragraphs of 256-512
tokens drawn from a pool (so chunks recur at other positions in other prompts, their KV
computed once), one of them carrying a planted fact (every other prompt: a fact split over
two chunks, "X lives in Y" and "the code of Y is N"), then the question. Per method and ratio:
KL divergence of the first token's distribution from the full prefill's, agreement of the
first token and of the first ``--gen-tokens`` greedy tokens, the planted facts answered, and
the share of the full prefill's token x layer computation it ran, and for ``a3-lut`` the share
of A³'s chosen tokens it chose too (same prompt and ratio). Wall times are of this
reference engine on this machine, not of a server.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from offload_memory import write_results

from a2ats_sglang.calibration.texts import wiki_split
from a2ats_sglang.fusion.reference import FusedPrompt, FusionEngine
from a2ats_sglang.core.codebook import Codebooks, ModelShape, default_codebook_path
from a2ats_sglang.fusion.selection import A3, A3Lut, CacheBlend, Naive
from a2ats_sglang.harness.offline_models import build_default_model
from a2ats_sglang.harness.rag import NAMES, TOWNS, answered_share, facts_answered



def paragraph_pool(tok, n: int, lo: int, hi: int) -> list[list[int]]:
    """``n`` Wikipedia paragraphs (the eval split) of ``lo``-``hi`` tokens (longer ones cut)."""
    pool = []
    for para in wiki_split("eval"):
        ids = tok(para + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= lo:
            pool.append(ids[:hi])
        if len(pool) == n:
            return pool
    raise RuntimeError(f"only {len(pool)} paragraphs of at least {lo} tokens")


def plant(tok, chunk: list[int], sentence: str, rng: random.Random) -> tuple[list[int], range]:
    """``chunk`` with ``sentence`` inserted at a paragraph-internal token boundary, and the
    inserted tokens' indices in it."""
    cut = rng.randrange(len(chunk) // 4, 3 * len(chunk) // 4)
    ids = tok(" " + sentence + " ", add_special_tokens=False)["input_ids"]
    return chunk[:cut] + ids + chunk[cut:], range(cut, cut + len(ids))


def make_prompt(tok, pool, k: int, i: int) -> tuple[FusedPrompt, str, torch.Tensor]:
    """Prompt ``i`` (a fact in one chunk for even ``i``, split over two for odd), its planted
    code, and the positions (int64, ascending) of the planted sentences' tokens in it."""
    rng = random.Random(i)
    chunks = [list(c) for c in rng.sample(pool, k)]
    name, code = rng.choice(NAMES), str(rng.randrange(1000, 10000))
    if i % 2 == 0:  # the answer in one chunk
        planted = {rng.randrange(k): f"The secret code of {name} is {code}."}
        question = f"What is the secret code of {name}?"
        lead = f"The secret code of {name} is"
    else:  # the answer needs two chunks
        town = rng.choice(TOWNS)
        a, b = rng.sample(range(k), 2)
        planted = {a: f"{name} lives in the town of {town}.", b: f"The secret code of the town of {town} is {code}."}
        question = f"What is the secret code of the town where {name} lives?"
        lead = "The secret code of that town is"
    inserted = {}
    for j, sentence in planted.items():
        chunks[j], inserted[j] = plant(tok, chunks[j], sentence, rng)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = FusedPrompt(enc("Answer the question from the documents below.\n\n"), chunks,
                         enc(f"Question: {question}\nAnswer: {lead}"))
    facts = sorted(prompt.chunk_starts[j] + t for j, run in inserted.items() for t in run)
    return prompt, code, torch.tensor(facts, dtype=torch.int64)


def model_codebooks(model_dir, model, engine: FusionEngine) -> Codebooks:
    """The model's a2ats codebooks (the default file beside it), checked against the model."""
    path = default_codebook_path(model_dir)
    books = Codebooks.load(path)
    books.validate(ModelShape.from_hf_config(model.config), engine.rope, str(path))
    return books


def overlap(rs) -> str:
    """Mean share of A³'s chosen tokens a method chose too, where measured."""
    got = [r["a3_overlap"] for r in rs if "a3_overlap" in r]
    return f"{sum(got) / len(got):.2f}" if got else "–"


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) of two logit vectors' softmaxes, in nats."""
    return float(torch.nn.functional.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True,
                                            reduction="sum"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk-tokens", type=int, nargs=2, default=[256, 512], metavar=("MIN", "MAX"))
    ap.add_argument("--pool", type=int, default=32, help="paragraphs the chunks are drawn from")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.15, 0.3])
    ap.add_argument("--methods", nargs="+", default=["cacheblend", "a3", "a3-lut"],
                    choices=["cacheblend", "a3", "a3-lut"], help="compared at every ratio (naive always runs)")
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = args.model_path or build_default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    engine = FusionEngine(model)
    pool = paragraph_pool(tok, args.pool, *args.chunk_tokens)
    make = {"cacheblend": CacheBlend, "a3": A3, "a3-lut": lambda: A3Lut(model_codebooks(model_dir, model, engine))}
    methods = [make[name]() for name in args.methods]
    configs = [("naive", Naive(), 0.0)] + [(m.name, m, r) for r in args.ratios for m in methods]
    rows = {f"{n}@{r:g}": [] for n, _, r in configs}
    full_rows = []
    t0 = time.time()
    for i in range(args.prompts):
        prompt, code, _ = make_prompt(tok, pool, args.chunks, i)
        for c in prompt.chunks:  # chunk KV is computed once and reused; not part of any prompt's time
            engine.chunk_kv(prompt.prefix, c)
        t = time.perf_counter()
        full = engine.full(prompt)
        full_s = time.perf_counter() - t
        want = engine.greedy(full, args.gen_tokens)
        full_rows.append({"seconds": full_s, "answered": code in tok.decode(want), "tokens": len(prompt.ids),
                          "two_chunk": i % 2 == 1})
        chosen = {}
        for name, method, ratio in configs:
            t = time.perf_counter()
            ctx = engine.measurements(prompt)
            chosen[name, ratio] = method.choose(ctx, ratio)
            got = engine.recompute(prompt, ctx.fused, chosen[name, ratio], ctx.token_layers)
            seconds = time.perf_counter() - t
            gen = engine.greedy(got, args.gen_tokens)
            rows[f"{name}@{ratio:g}"].append({
                "kl": kl(full.logits, got.logits), "top1": gen[0] == want[0], "seq": gen == want,
                "answered": code in tok.decode(gen), "compute": got.token_layers / full.token_layers,
                "seconds": seconds, "speedup": full_s / seconds, "two_chunk": i % 2 == 1})
        for (name, ratio), picked in chosen.items():  # against A³'s choice for the same prompt and ratio
            exact = chosen.get(("a3", ratio))
            if name != "a3" and exact is not None and len(exact):
                rows[f"{name}@{ratio:g}"][-1]["a3_overlap"] = len(set(picked.tolist()) & set(exact.tolist())) / len(exact)
        if (i + 1) % 10 == 0:
            print(f"[bench] {i + 1}/{args.prompts} prompts, {time.time() - t0:.0f}s", flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = [f"Model `{Path(model_dir).name}` (transformers, SDPA attention, float32); {args.prompts} prompts of "
             f"{args.chunks} chunks of {args.chunk_tokens[0]}-{args.chunk_tokens[1]} tokens from a pool of {args.pool} "
             f"Wikipedia paragraphs (median prompt {statistics.median(r['tokens'] for r in full_rows)} tokens); "
             f"{platform.machine()}, CPU; {date.today()}.", "",
             f"Full prefill: {facts_answered(full_rows)}; median "
             f"{statistics.median(r['seconds'] for r in full_rows):.2f} s per prompt.", "",
             f"| method @ ratio | mean KL to full (nats) | median KL | first token = full | first {args.gen_tokens} "
             f"tokens = full | facts, one chunk | facts, two chunks | compute share | reference speedup (median) | "
             f"A³'s tokens also chosen (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, rs in rows.items():
        lines.append(f"| {key} | {mean([r['kl'] for r in rs]):.4f} | {statistics.median(r['kl'] for r in rs):.4f} | "
                     f"{mean([r['top1'] for r in rs]):.2f} | {mean([r['seq'] for r in rs]):.2f} | "
                     f"{answered_share(rs, False):.2f} | "
                     f"{answered_share(rs, True):.2f} | {mean([r['compute'] for r in rs]):.3f} | "
                     f"{statistics.median(r['speedup'] for r in rs):.2f}x | {overlap(rs)} |")
    write_results(args.out, "fusion_fidelity", "\n".join(lines), {"full": full_rows, "methods": rows})
    plot(rows, args.out / "fusion_fidelity.png")
    print(f"[bench] done in {time.time() - t0:.0f}s")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("naive", "cacheblend", "a3", "a3-lut"):
        pts = sorted((float(k.split("@")[1]), statistics.mean(r["kl"] for r in rs)) for k, rs in rows.items()
                     if k.startswith(name + "@"))
        ax.plot(*zip(*pts), "o-", label=name)
    ax.set(xlabel="recompute ratio r", ylabel="mean KL to full prefill (nats)", yscale="log",
           title="First-token fidelity of fused prefill")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
