"""What A³'s selection gains from each of its choices, on the reference engine
(:mod:`a2ats_sglang.fusion.reference`) over ``fusion_fidelity.py``'s prompts (Wikipedia
paragraphs in random order, a planted fact in one chunk or split over two):

- ``a3``: as served, the question's attention mass per chunk token (summed over layers, heads
  and question tokens), the budget spent outside the first chunk (exact right after the prefix);
- ``a3-first-chunk``: the same scores, the first chunk's tokens eligible too (the rule before
  the first chunk was known exact: part of the budget recomputes tokens that cannot change);
- ``a3-vnorm``: each token's attention weighted by the norm of its value (the attention-norm
  signal of InfoFlow KV, arXiv 2603.05353), first chunk excluded;
- ``a3+facts``: an oracle: every planted-fact token outside the first chunk recomputed first,
  the rest of the budget by A³'s scores: whether choosing the fact's tokens is what is missing.

    python benchmarks/fusion_selection_ablation.py [--prompts 80] [--chunks 4] [--ratios 0.15 0.3]

Per variant: mean and median KL of the first token's distribution from the full prefill's,
planted facts answered (one chunk, two chunks), and for ``a3`` the share of the planted tokens
outside the first chunk it chose.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from fusion_fidelity import kl, make_prompt, paragraph_pool
from offload_memory import write_results

from a2ats_sglang.fusion.reference import FusionEngine
from a2ats_sglang.fusion.selection import question_attention_scores, top_ratio
from a2ats_sglang.harness.offline_models import build_default_model
from a2ats_sglang.harness.rag import answered_share, facts_answered


def value_norm_scores(attentions, fused, chunk_positions: torch.Tensor) -> torch.Tensor:
    """Attention mass per chunk token weighted by its value's norm, summed over layers, query
    heads and question tokens (``attentions`` per layer [1, Hq, Tq, T]; ``fused`` per layer
    (K, V) [1, Hkv, T, D]) -> float32 [n]."""
    total = 0
    for a, (_, v) in zip(attentions, fused):
        group = a.shape[1] // v.shape[1]
        norms = v[0][:, chunk_positions].float().norm(dim=-1).repeat_interleave(group, 0)  # [Hq, n]
        total = total + (a[0][:, :, chunk_positions].float().sum(1) * norms).sum(0)
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=80)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.15, 0.3])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = FusionEngine(AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                               dtype=torch.float32))
    pool = paragraph_pool(tok, 32, 256, 512)
    rows: dict[str, list[dict]] = {}
    full_rows, fact_share = [], {r: [] for r in args.ratios}
    t0 = time.time()
    for i in range(args.prompts):
        prompt, code, facts = make_prompt(tok, pool, args.chunks, i)
        two = i % 2 == 1
        full = engine.full(prompt)
        full_rows.append({"answered": code in tok.decode(engine.greedy(full, 8)), "two_chunk": two})
        ctx = engine.measurements(prompt)
        cp = ctx.chunk_positions
        attention = ctx.question_attention()
        mass = question_attention_scores(attention, cp)
        scores = {"a3": mass, "a3-vnorm": value_norm_scores(attention, ctx.fused, cp),
                  "a3+facts": mass + torch.isin(cp, facts) * (mass.max() + 1)}
        open_facts = facts[~torch.isin(facts, cp[ctx.exact])]

        def run(name: str, chosen: torch.Tensor) -> None:
            got = engine.recompute(prompt, ctx.fused, chosen)
            rows.setdefault(name, []).append({"kl": kl(full.logits, got.logits), "two_chunk": two,
                                              "answered": code in tok.decode(engine.greedy(got, 8))})

        run("naive@0", cp[:0])
        for r in args.ratios:
            for name, s in scores.items():
                chosen = cp[top_ratio(s, r, ctx.exact)]
                run(f"{name}@{r:g}", chosen)
                if name == "a3" and open_facts.numel():
                    fact_share[r].append(float(torch.isin(open_facts, chosen).float().mean()))
            run(f"a3-first-chunk@{r:g}", cp[top_ratio(mass, r)])
        if (i + 1) % 10 == 0:
            print(f"[bench] {i + 1}/{args.prompts} prompts, {time.time() - t0:.0f}s", flush=True)
    lines = [f"Model `{Path(model_dir).name}` (transformers, SDPA, float32); {args.prompts} prompts of {args.chunks} "
             f"chunks of 256-512 tokens from a pool of 32 Wikipedia paragraphs; {platform.machine()}, CPU; "
             f"{date.today()}; {time.time() - t0:.0f} s.", "",
             f"Full prefill: {facts_answered(full_rows)}. Planted tokens outside the first chunk that a3 "
             f"chose: " + ", ".join(f"{statistics.fmean(v):.2f} at r = {r:g}" for r, v in fact_share.items()) + ".", "",
             "| variant @ ratio | mean KL to full (nats) | median KL | facts, one chunk | facts, two chunks |",
             "|---|---|---|---|---|"]
    for key, rs in rows.items():
        kls = [r["kl"] for r in rs]
        lines.append(f"| {key} | {statistics.fmean(kls):.4f} | {statistics.median(kls):.4f} | "
                     f"{answered_share(rs, False):.2f} | {answered_share(rs, True):.2f} |")
    write_results(args.out, "fusion_selection_ablation", "\n".join(lines), {"full": full_rows, "variants": rows})
    plot(rows, args.out / "fusion_selection_ablation.png")
    print(f"[bench] done in {time.time() - t0:.0f}s")


def plot(rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(rows)
    ax.barh(names, [statistics.mean(r["kl"] for r in rows[n]) for n in names])
    ax.set(xlabel="mean KL to full prefill (nats)", title="A³ selection variants, reference engine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
