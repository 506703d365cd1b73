"""Retrieval quality of A2ATS scoring variants at equal budget.

On queries, keys and values captured from the model over real text it was not
calibrated on, for the last ``--positions`` query positions of every query head
of every layer: attention-mass recall (share of the exact softmax mass inside
the selected set: sinks + window + top-K, GQA union, as served) and the relative
error of the attention output, for budgets of 1, 2, 3, 5, 10 % of the context.

Methods: oracle top-K (exact scores); WRoPE at one position b = 2048 (paper) with
keys unquantized, query-aware VQ, plain VQ; multi-scale WRoPE with 2/4/8
distances, unquantized and query-aware VQ; query-aware VQ fitted for b but scored
with 8 distances (does the bucket-weighted second moment matter?); Quest-style
page bounds (page 16).

    python benchmarks/retrieval_quality.py [--model-path DIR] [--lengths 2048 8192]

With ``--top-p``: the served configuration only (the model's codebooks file, as the
server loads it), fixed budgets against the adaptive top-p budget at several ``p``, each
with the attended share it costs (sinks + window + the GQA union, per KV head, of the
context), written to ``retrieval_quality_top_p.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from datetime import date
from pathlib import Path

import torch
from offload_memory import write_results

from a2ats_sglang.core import retrieval
from a2ats_sglang.calibration.calibrate import FitSettings, collect, fit
from a2ats_sglang.calibration.capture import load_hf_model, run_documents
from a2ats_sglang.core.codebook import LayerCodebook
from a2ats_sglang.harness.offline_models import build_default_model
from a2ats_sglang.calibration.texts import long_text

BUDGETS = (0.01, 0.02, 0.03, 0.05, 0.10)
TOP_P = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def fixed_budgets(ratios=BUDGETS) -> dict:
    return {f"{r * 100:g} %": retrieval.Budget(r, 1, 1 << 30, 0.0) for r in ratios}


def top_p_budgets(ps=TOP_P, min_tokens: int = 1) -> dict:
    return {f"top-p {p:g}": retrieval.Budget(0.03, min_tokens, 1 << 30, p) for p in ps}


def quest_scores(q_post, k_post, seq_lens, page: int, group: int):
    """Quest-style upper bound per page of post-RoPE keys, given to every token of the page.
    q_post [P, Hq, D]; k_post [Hkv, L, D] -> [P, Hq, L]."""
    hkv, length, d = k_post.shape
    pages = math.ceil(length / page)
    pad = pages * page - length
    kp = torch.nn.functional.pad(k_post, (0, 0, 0, pad)).view(hkv, pages, page, d)
    valid = torch.nn.functional.pad(torch.ones(length, dtype=torch.bool), (0, pad)).view(pages, page)
    big = torch.finfo(torch.float32).max
    kmax = kp.masked_fill(~valid[None, :, :, None], -big).amax(2).repeat_interleave(group, 0)  # [Hq, pages, D]
    kmin = kp.masked_fill(~valid[None, :, :, None], big).amin(2).repeat_interleave(group, 0)
    q = q_post.unsqueeze(2)  # [P, Hq, 1, D]
    bound = torch.maximum(q * kmax, q * kmin).sum(-1)  # [P, Hq, pages]
    return bound.repeat_interleave(page, -1)[..., :length]


def mask_scores(s, seq_lens, sinks, window):
    pos = torch.arange(s.shape[-1])
    ok = (pos >= sinks) & (pos < seq_lens.view(-1, 1) - window)
    return s.masked_fill(~ok.unsqueeze(1), float("-inf"))


def wrope_scores(q_pre, k_pre, positions, rope, distances, group):
    """Unquantized WRoPE: RoPE(q, distance bucket of i - j) . k_pre. -> [P, Hq, L]."""
    length = k_pre.shape[1]
    dist = torch.tensor(distances, dtype=torch.float32)
    q_rot = rope.rotate(q_pre.unsqueeze(2).expand(-1, -1, len(distances), -1), dist)  # [P, Hq, NB, D]
    k = k_pre.repeat_interleave(group, 0)  # [Hq, L, D]
    s = torch.einsum("phnd,hld->phnl", q_rot, k)
    b = retrieval.bucket_of((positions.view(-1, 1) - torch.arange(length)).clamp_min(0), retrieval.distance_bounds(distances))
    return s.gather(2, b[:, None, None, :].expand(-1, s.shape[1], 1, -1)).squeeze(2)


def evaluate_layer(q_pre, k_pre, v, rope, scale, methods, sinks, window, budgets):
    """q_pre [Hq, T, D], k_pre/v [Hkv, T, D] of one document; methods: name -> score fn;
    budgets: label -> Budget. -> {name: {label: (recall sum, error sum, attended share sum, count)}}"""
    hq, t, d = q_pre.shape
    hkv = k_pre.shape[0]
    g = hq // hkv
    positions = torch.arange(t - methods["__positions__"], t)
    seq_lens = positions + 1
    qp = q_pre[:, positions].transpose(0, 1)  # [P, Hq, D]
    q_post = rope.rotate(qp, positions.view(-1, 1))
    k_post = rope.rotate(k_pre, torch.arange(t).view(1, -1))
    kk, vv = k_post.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    logits = torch.einsum("phd,hld->phl", q_post, kk) * scale
    causal = torch.arange(t) < seq_lens.view(-1, 1)
    logits = logits.masked_fill(~causal.unsqueeze(1), float("-inf"))
    p = logits.softmax(-1)
    o_full = torch.einsum("phl,hld->phd", p, vv)
    ctx = dict(q_pre=qp, q_post=q_post, k_pre=k_pre, k_post=k_post, positions=positions, seq_lens=seq_lens, logits=logits, group=g)
    out = {}
    for name, fn in methods.items():
        if name.startswith("__"):
            continue
        s = mask_scores(fn(ctx), seq_lens, sinks, window)
        out[name] = {}
        for label, budget in budgets.items():
            sel = retrieval.select(s, seq_lens, budget, sinks, window, hkv)
            m = torch.zeros(len(positions), hkv, t + 1, dtype=torch.bool)  # column t takes the -1 padding
            m.scatter_(2, torch.where(sel >= 0, sel, t), True)
            m = m[..., :t].repeat_interleave(g, 1)
            ps = p * m
            recall = ps.sum(-1)
            o_sel = torch.einsum("phl,hld->phd", ps / recall.unsqueeze(-1), vv)
            err = (o_sel - o_full).norm(dim=-1) / o_full.norm(dim=-1).clamp_min(1e-12)
            share = m.sum(-1) / seq_lens.view(-1, 1)
            out[name][label] = (float(recall.sum()), float(err.sum()), float(share.sum()), recall.numel())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--positions", type=int, default=8)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--num-codes", type=int, default=512)
    ap.add_argument("--max-iters", type=int, default=50)
    ap.add_argument("--sinks", type=int, default=8)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--top-p", action="store_true", help="fixed vs adaptive budgets of the served codebooks only")
    args = ap.parse_args(argv)
    t0 = time.time()
    model_path = args.model_path or build_default_model()
    if args.top_p:
        return compare_top_p(model_path, args, t0)
    quiet = lambda *a, **k: None  # noqa: E731
    data = collect(model_path, tokens=args.calib_tokens, log=quiet)
    def settings(distances):
        return FitSettings(args.num_codes, distances, args.sinks, args.window, max_iters=args.max_iters)

    books = {
        "qavq_b": fit(data, settings((2048,)), log=quiet)[0],
        "plain": fit(data, settings((2048,)), query_aware=False, log=quiet)[0],
        **{f"qavq_ms{n}": fit(data, settings(retrieval.wrope_distances(n)), log=quiet)[0] for n in (2, 4, 8)},
    }
    print(f"[bench] calibrated {len(books)} codebook variants in {time.time() - t0:.0f}s", flush=True)
    model, tok, shape, rope = load_hf_model(model_path)
    scale = shape.head_dim ** -0.5

    def vq(book, distances, li):
        return vq_scorer(book, distances, li, rope, scale)

    def unq(distances):
        return lambda c: wrope_scores(c["q_pre"], c["k_pre"], c["positions"], rope, distances, c["group"])

    ms8 = retrieval.wrope_distances(8)
    budgets = fixed_budgets()
    results = {}
    for length in args.lengths:
        ids = tok(long_text(length * 6), add_special_tokens=False)["input_ids"][:length]
        if len(ids) < length:
            raise SystemExit(f"eval text too short for {length} tokens")
        cap = run_documents(model, [ids], keep_v=True)
        acc = {}
        for li in range(shape.num_layers):
            methods = {
                "__positions__": args.positions,
                "oracle top-K": lambda c: c["logits"],
                "WRoPE b=2048, unquantized": unq((2048,)),
                "WRoPE b=2048 + query-aware VQ (paper)": vq(books["qavq_b"], (2048,), li),
                "WRoPE b=2048 + plain VQ": vq(books["plain"], (2048,), li),
                **{f"multi-scale x{n}, unquantized": unq(retrieval.wrope_distances(n)) for n in (2, 4, 8)},
                **{f"multi-scale x{n} + query-aware VQ": vq(books[f"qavq_ms{n}"], retrieval.wrope_distances(n), li) for n in (2, 4, 8)},
                "multi-scale x8 + plain VQ": vq(books["plain"], ms8, li),
                "multi-scale x8 + query-aware VQ fitted at b only": vq(books["qavq_b"], ms8, li),
                "Quest page bounds (page 16)": lambda c: quest_scores(c["q_post"], c["k_post"], c["seq_lens"], 16, c["group"]),
            }
            res = evaluate_layer(cap.q[li][0], cap.k[li][0], cap.v[li][0], rope, scale, methods, args.sinks, args.window,
                                 budgets)
            accumulate(acc, res)
        results[length] = means(acc)
        print(f"[bench] evaluated {length} tokens ({time.time() - t0:.0f}s)", flush=True)

    lines = [f"Model `{Path(model_path).name}`, {shape.num_layers} layers, {shape.num_q_heads}/{shape.num_kv_heads} heads; "
             f"{args.num_codes} codes, {data.info['tokens']} calibration tokens; sinks {args.sinks}, window {args.window}; "
             f"last {args.positions} positions of every query head; {platform.processor() or platform.machine()}, {date.today()}."]
    for length, res in results.items():
        for metric, idx in (("attention-mass recall (higher is better)", 0), ("relative output error (lower is better)", 1)):
            lines += ["", f"**{length} tokens: {metric}**", "",
                      "| method | " + " | ".join(f"{int(b * 100)} %" for b in BUDGETS) + " |",
                      "|---|" + "---|" * len(BUDGETS)]
            for name, per_b in res.items():
                lines.append(f"| {name} | " + " | ".join(f"{per_b[b][idx]:.3f}" for b in budgets) + " |")
    write_results(args.out, "retrieval_quality", "\n".join(lines), {str(k): v for k, v in results.items()})
    plot(results, args.out / "retrieval_quality.png")
    print(f"[bench] done in {time.time() - t0:.0f}s; wrote {args.out}/retrieval_quality.{{md,json,png}}")


def vq_scorer(book, distances, li, rope, scale):
    """Scores as served: keys encoded with ``book``'s layer ``li``, queries rotated to ``distances``, the LUT."""
    lcb = LayerCodebook.build(book.centroids[li], book.whiten[li], "cpu")

    def score(c):
        codes = lcb.encode(c["k_pre"].transpose(0, 1)).transpose(0, 1)  # [Hkv, L]
        q_rot = rope.rotate(c["q_pre"].unsqueeze(2).expand(-1, -1, len(distances), -1),
                            torch.tensor(distances, dtype=torch.float32))
        lut = retrieval.lookup_table(q_rot, lcb.centroids, scale)
        return retrieval.approx_scores(lut, codes.unsqueeze(0).expand(len(c["positions"]), -1, -1), c["seq_lens"],
                                       retrieval.distance_bounds(distances), 0, 0)
    return score


def accumulate(acc: dict, res: dict) -> None:
    """Add one layer's sums (:func:`evaluate_layer`) into ``acc``."""
    for name, per_b in res.items():
        for label, sums in per_b.items():
            a = acc.setdefault(name, {}).setdefault(label, [0.0] * len(sums))
            for i, x in enumerate(sums):
                a[i] += x


def means(acc: dict) -> dict:
    """-> {name: {label: (recall, error, attended share)}} means over layers, heads and positions."""
    return {name: {label: tuple(x / a[-1] for x in a[:-1]) for label, a in per_b.items()} for name, per_b in acc.items()}


def compare_top_p(model_path, args, t0):
    """Fixed budgets against top-p on the served codebooks: recall and error at the attended share each costs."""
    from a2ats_sglang.core.codebook import Codebooks, default_codebook_path

    model, tok, shape, rope = load_hf_model(model_path)
    books = Codebooks.load(default_codebook_path(model_path))
    distances = books.distances
    scale = shape.head_dim ** -0.5
    budgets = {**fixed_budgets(), **top_p_budgets()}
    results = {}
    for length in args.lengths:
        ids = tok(long_text(length * 6), add_special_tokens=False)["input_ids"][:length]
        cap = run_documents(model, [ids], keep_v=True)
        acc = {}
        for li in range(shape.num_layers):
            methods = {"__positions__": args.positions, "served codebooks": vq_scorer(books, distances, li, rope, scale)}
            accumulate(acc, evaluate_layer(cap.q[li][0], cap.k[li][0], cap.v[li][0], rope, scale, methods, args.sinks,
                                           args.window, budgets))
        results[length] = means(acc)["served codebooks"]
        print(f"[bench] evaluated {length} tokens ({time.time() - t0:.0f}s)", flush=True)
    lines = [f"Model `{Path(model_path).name}`, {shape.num_layers} layers, {shape.num_q_heads}/{shape.num_kv_heads} heads; "
             f"its served codebooks ({books.num_codes} codes, WRoPE distances {list(distances)}); sinks {args.sinks}, "
             f"window {args.window}; last {args.positions} positions of every query head; "
             f"{platform.processor() or platform.machine()}, {date.today()}.", "",
             "| budget | " + " | ".join(f"{n} tokens: attended share | recall | output error" for n in results) + " |",
             "|---|" + "---|---|---|" * len(results)]
    for label in budgets:
        lines.append(f"| {label} | " + " | ".join(
            f"{res[label][2]:.3f} | {res[label][0]:.3f} | {res[label][1]:.3f}" for res in results.values()) + " |")
    write_results(args.out, "retrieval_quality_top_p", "\n".join(lines), {str(k): v for k, v in results.items()})
    plot_top_p(results, args.out / "retrieval_quality_top_p.png")
    print(f"[bench] done in {time.time() - t0:.0f}s")


def plot_top_p(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, (length, res) in zip(axes[0], results.items()):
        for kind in ("%", "top-p"):
            pts = sorted((v[2], v[0]) for label, v in res.items() if kind in label)
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o",
                    label="fixed budget" if kind == "%" else "top-p")
        ax.set(title=f"{length} tokens", xlabel="attended share (% of context)", ylabel="attention-mass recall")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    keep = ["oracle top-K", "WRoPE b=2048 + query-aware VQ (paper)", "WRoPE b=2048 + plain VQ",
            "multi-scale x8 + query-aware VQ", "multi-scale x8, unquantized", "Quest page bounds (page 16)"]
    for ax, (length, res) in zip(axes[0], results.items()):
        for name in keep:
            ax.plot([b * 100 for b in BUDGETS], [res[name][label][0] for label in fixed_budgets()], marker="o",
                    label=name)
        ax.set(title=f"{length} tokens", xlabel="budget (% of context)", ylabel="attention-mass recall")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
