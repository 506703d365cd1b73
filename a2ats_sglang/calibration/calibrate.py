"""Fit query-aware VQ codebooks for a model and write the codebooks file.

    python -m a2ats_sglang.calibration --model-path DIR [--out FILE] [--text F ...]
        [--tokens N] [--num-codes C] [--distances 2048 | --num-distances K] ...

Runs the model over calibration text (Wikipedia paragraphs by default, plus random
UUID strings), captures pre-RoPE keys and queries per layer, rotates the queries
to the WRoPE distances, and fits one codebook per (layer, KV head) by k-means in
the space whitened by the queries' second moment. Prints, per layer, the relative
score error of query-aware VQ next to plain VQ. The paper's setting is
``--num-codes 4096 --tokens 81920 --doc-tokens 16384 --num-distances 1``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from a2ats_sglang.calibration.capture import load_hf_model, run_documents
from a2ats_sglang.core.codebook import DEFAULT_RELPATH, Codebooks, ModelShape, default_codebook_path
from a2ats_sglang.core.quantizer import assign, fit_codebooks, score_error
from a2ats_sglang.core.retrieval import distance_bounds, wrope_distances
from a2ats_sglang.core.rope import RopeSpec
from a2ats_sglang.calibration.texts import calibration_documents


def pair_weights(doc_len: int, distances, sinks: int, window: int) -> torch.Tensor:
    """How many keys each query position of a document scores at each WRoPE distance.

    -> float32 [doc_len, NB]: keys j with sinks <= j and distance i - j >= window,
    split by the distance bucket they fall in."""
    bounds = distance_bounds(distances).tolist()
    lo = [0.0] + bounds
    hi = bounds + [float("inf")]
    i = torch.arange(doc_len, dtype=torch.float64).unsqueeze(1)
    max_d = i - sinks  # largest distance to a scorable key
    low = torch.tensor(lo, dtype=torch.float64).clamp_min(window).ceil()
    high = torch.minimum(torch.tensor(hi, dtype=torch.float64).ceil() - 1, max_d)
    return (high - low + 1).clamp_min(0).float()


def sample_rotated_queries(
    q_docs: list[torch.Tensor], rope: RopeSpec, distances, sinks: int, window: int, num: int, gen: torch.Generator
) -> torch.Tensor:
    """Sample WRoPE-rotated queries as retrieval will see them: query positions and
    distances drawn in proportion to the keys they score.

    q_docs: per document [Hq, T, D] pre-RoPE -> [Hq, num, D] rotated queries."""
    w = torch.cat([pair_weights(q.shape[1], distances, sinks, window) for q in q_docs])  # [N, NB]
    if float(w.sum()) <= 0:
        raise ValueError(f"calibration documents are too short to have keys beyond the window ({window}) and sinks ({sinks})")
    q_all = torch.cat(q_docs, dim=1)  # [Hq, N, D]
    flat = torch.multinomial(w.flatten(), num, replacement=True, generator=gen)
    tok, bucket = flat // w.shape[1], flat % w.shape[1]
    dist = torch.tensor(distances, dtype=torch.float32)[bucket]
    return rope.rotate(q_all[:, tok], dist)


@dataclass
class CalibrationData:
    """What the model produced on calibration text.

    keys: [G, N, D] pre-RoPE keys, G = layers * Hkv (layer-major); q_docs: per layer,
    per document [Hq, T, D] pre-RoPE queries."""

    keys: torch.Tensor
    q_docs: list[list[torch.Tensor]]
    shape: ModelShape
    rope: RopeSpec
    info: dict


def collect(
    model_path: str | Path,
    text_files: list[Path] | None = None,
    tokens: int = 16384,
    doc_tokens: int = 2048,
    uuid_share: float = 0.2,
    seed: int = 0,
    log=print,
) -> CalibrationData:
    """Run the model over calibration documents and keep its pre-RoPE keys and queries."""
    model, tok, shape, rope = load_hf_model(model_path)
    docs = calibration_documents(tok, tokens, doc_tokens, uuid_share, text_files, seed)
    n_tok = sum(len(d) for d in docs)
    log(f"[calibrate] {shape.model_type}: {shape.num_layers} layers, {shape.num_q_heads} q / {shape.num_kv_heads} kv heads, "
        f"head dim {shape.head_dim}; {n_tok} tokens in {len(docs)} documents")
    cap = run_documents(model, docs, progress=lambda i, n: log(f"[calibrate] forward {i}/{n} documents"))
    keys = torch.cat([torch.cat(cap.k[li], dim=1) for li in range(shape.num_layers)])
    info = {"tokens": n_tok, "doc_tokens": doc_tokens, "uuid_share": uuid_share, "seed": seed, "model_path": str(model_path)}
    return CalibrationData(keys, cap.q, shape, rope, info)


def rotated_query_sample(
    data: CalibrationData, distances, sinks: int, window: int, queries_per_head: int, seed: int
) -> torch.Tensor:
    """[G, g * M, D] WRoPE-rotated queries of each (layer, KV head) group, M per query head."""
    gen = torch.Generator().manual_seed(seed)
    g = data.shape.num_q_heads // data.shape.num_kv_heads
    out = [
        sample_rotated_queries(q_docs, data.rope, distances, sinks, window, queries_per_head, gen).view(
            data.shape.num_kv_heads, g * queries_per_head, -1)
        for q_docs in data.q_docs
    ]
    return torch.cat(out)


@dataclass(frozen=True)
class FitSettings:
    """How codebooks are fitted (defaults finish in minutes on 2 CPU cores for a 135M model;
    the paper: 4096 codes, one distance 2048, 300 iterations)."""

    num_codes: int = 512
    distances: tuple[int, ...] = wrope_distances(8)
    sinks: int = 8
    window: int = 64
    queries_per_head: int = 4096
    max_iters: int = 50
    tol: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.num_codes <= 32767:
            raise ValueError(f"num_codes must be in [2, 32767], got {self.num_codes}")
        if self.max_iters < 1 or self.queries_per_head < 1:
            raise ValueError("max_iters and queries_per_head must be >= 1")


def fit(data: CalibrationData, settings: FitSettings = FitSettings(), query_aware: bool = True, log=print) -> tuple[Codebooks, list[float]]:
    """Fit codebooks (query-aware, or plain VQ) -> (codebooks, relative score error per layer)."""
    st = settings
    if data.keys.shape[1] < st.num_codes:
        raise ValueError(f"calibration text gives {data.keys.shape[1]} tokens, fewer than {st.num_codes} codes")
    queries = rotated_query_sample(data, st.distances, st.sinks, st.window, st.queries_per_head, st.seed)
    name = "query-aware" if query_aware else "plain"
    step = max(1, st.max_iters // 10)
    books = fit_codebooks(
        data.keys, queries if query_aware else None, st.num_codes, max_iters=st.max_iters, tol=st.tol, seed=st.seed,
        progress=lambda it, inertia: log(f"[calibrate] {name} VQ k-means iter {it + 1}/{st.max_iters} inertia {inertia:.4g}") if it % step == 0 else None,
    )
    codes, _ = assign(data.keys @ books.whiten, books.centroids @ books.whiten)
    approx = torch.gather(books.centroids, 1, codes.unsqueeze(-1).expand(-1, -1, data.keys.shape[-1]))
    ev = slice(0, min(512, queries.shape[1]))
    err = score_error(data.keys, queries[:, ev], approx).view(data.shape.num_layers, -1).mean(1).tolist()
    lyr, hkv, d = data.shape.num_layers, data.shape.num_kv_heads, data.shape.head_dim
    out = Codebooks(
        centroids=books.centroids.view(lyr, hkv, st.num_codes, d),
        whiten=books.whiten.view(lyr, hkv, d, d),
        rope=data.rope,
        distances=tuple(st.distances),
        shape=data.shape,
        info={**data.info, "sinks": st.sinks, "window": st.window, "query_aware": query_aware},
    )
    return out, err


def calibrate(
    model_path: str | Path,
    out: str | Path | None = None,
    text_files: list[Path] | None = None,
    tokens: int = 16384,
    doc_tokens: int = 2048,
    uuid_share: float = 0.2,
    settings: FitSettings = FitSettings(),
    compare_plain: bool = True,
    log=print,
) -> tuple[Codebooks, dict]:
    """Collect, fit query-aware codebooks, report their score error next to plain VQ,
    and (if ``out``) save. -> (codebooks, {"qavq": [per layer], "plain": [per layer] | None})."""
    t0 = time.time()
    data = collect(model_path, text_files, tokens, doc_tokens, uuid_share, settings.seed, log)
    log(f"[calibrate] captured in {time.time() - t0:.0f}s; {settings.num_codes} codes, WRoPE distances {list(settings.distances)}")
    books, qa_err = fit(data, settings, True, log)
    report = {"qavq": qa_err, "plain": fit(data, settings, False, log)[1] if compare_plain else None}
    log("[calibrate] relative score error E[(q.(k-k^))^2]/E[(q.k)^2] per layer:")
    log("  layer  query-aware VQ  plain VQ")
    for li, e in enumerate(report["qavq"]):
        p = f"{report['plain'][li]:.4f}" if report["plain"] else "-"
        log(f"  {li:5d}  {e:14.4f}  {p:>8}")
    if out is not None:
        books.save(out)
        log(f"[calibrate] wrote {out} in {time.time() - t0:.0f}s total")
    return books, report


def _distances(args) -> tuple[int, ...]:
    if args.distances:
        return tuple(sorted({int(x) for x in args.distances.split(",")}))
    return wrope_distances(args.num_distances)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--out", type=Path, help=f"codebooks file (default: MODEL/{DEFAULT_RELPATH})")
    p.add_argument("--text", type=Path, nargs="*", help="calibration text files (default: Wikipedia paragraphs)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens (paper: 81920)")
    p.add_argument("--doc-tokens", type=int, default=2048, help="tokens per document (paper: 16384)")
    p.add_argument("--uuid-share", type=float, default=0.2, help="share of random-UUID text (paper: 0.2)")
    p.add_argument("--num-codes", type=int, default=512, help="codes per (layer, KV head) (paper: 4096)")
    p.add_argument("--num-distances", type=int, default=8, help="WRoPE distances, log-spaced 96..12288 (1 = paper's b=2048)")
    p.add_argument("--distances", help="explicit comma-separated WRoPE distances (overrides --num-distances)")
    p.add_argument("--sinks", type=int, default=8)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--queries-per-head", type=int, default=4096)
    p.add_argument("--max-iters", type=int, default=50, help="Lloyd iterations (paper: 300)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compare-plain", action="store_true", help="skip fitting plain VQ for the error table")
    args = p.parse_args(argv)
    out = args.out or default_codebook_path(args.model_path)
    try:
        settings = FitSettings(args.num_codes, _distances(args), args.sinks, args.window, args.queries_per_head,
                               args.max_iters, args.tol, args.seed)
        calibrate(args.model_path, out, args.text, args.tokens, args.doc_tokens, args.uuid_share, settings,
                  not args.no_compare_plain)
    except ValueError as e:
        sys.exit(f"calibrate: error: {e}")


if __name__ == "__main__":
    main()
