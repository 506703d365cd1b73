"""Fit query-aware VQ codebooks for a model and write the codebooks file.

    python -m a2ats_sglang.calibration --model-path DIR [--out FILE] [--text F ...]
        [--tokens N] [--num-codes C] [--distances 2048 | --num-distances K] ...

Runs the model over calibration text (Wikipedia paragraphs by default, plus random
UUID strings), captures pre-RoPE keys and queries per layer, rotates the queries
to the WRoPE distances, and fits one codebook per (layer, KV head) by k-means in
the space whitened by the queries' second moment. Prints, per layer, the relative
score error of query-aware VQ next to plain VQ. The paper's setting is
``--num-codes 4096 --tokens 81920 --doc-tokens 16384 --num-distances 1 --max-iters 300``.

The flags are generated from :class:`CollectSettings` and :class:`FitSettings`
(defaults, help and bounds declared once there).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from a2ats_sglang.calibration.capture import load_hf_model, run_documents
from a2ats_sglang.config import A2ATSConfig
from a2ats_sglang.core.codebook import DEFAULT_RELPATH, MAX_CODES, Codebooks, ModelShape, default_codebook_path
from a2ats_sglang.core.quantizer import assign, fit_codebooks, score_error
from a2ats_sglang.core.retrieval import distance_bounds, wrope_distances
from a2ats_sglang.core.rope import RopeSpec
from a2ats_sglang.calibration.texts import calibration_documents
from a2ats_sglang.options import add_arguments, cli_flag, default_of, given, option, validate

DEFAULT_NUM_DISTANCES = 8  # WRoPE distances log-spaced over 96..12288 unless given


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


@dataclass(frozen=True)
class CollectSettings:
    """What the model runs over (defaults finish in minutes on 2 CPU cores for a 135M model;
    the paper: 81920 tokens in documents of 16384)."""

    text_files: tuple[Path, ...] = option((), "calibration text files (default: Wikipedia paragraphs)",
                                          cli={"nargs": "*", "type": Path, "metavar": "FILE"})
    tokens: int = option(16384, "calibration tokens (paper: 81920)", min=1)
    doc_tokens: int = option(2048, "tokens per document (paper: 16384)", min=16)
    uuid_share: float = option(0.2, "share of random-UUID text (paper: 0.2)", min=0, max=1, max_exclusive=True)
    seed: int = option(0, "seed of the calibration text, the query sample and k-means")

    def __post_init__(self):
        object.__setattr__(self, "text_files", tuple(Path(p) for p in self.text_files or ()))
        validate(self, where=_flag)


def _flag(name: str) -> str:
    return "--text" if name == "text_files" else cli_flag(name)


def collect(
    model_path: str | Path, settings: CollectSettings = CollectSettings(), log=print, **overrides
) -> CalibrationData:
    """Run the model over calibration documents and keep its pre-RoPE keys and queries.
    ``overrides``: CollectSettings fields (``collect(path, tokens=4096)``)."""
    st = replace(settings, **overrides)
    model, tok, shape, rope = load_hf_model(model_path)
    docs = calibration_documents(tok, st.tokens, st.doc_tokens, st.uuid_share, list(st.text_files), st.seed)
    n_tok = sum(len(d) for d in docs)
    log(f"[calibrate] {shape.model_type}: {shape.num_layers} layers, {shape.num_q_heads} q / {shape.num_kv_heads} kv heads, "
        f"head dim {shape.head_dim}; {n_tok} tokens in {len(docs)} documents")
    cap = run_documents(model, docs, progress=lambda i, n: log(f"[calibrate] forward {i}/{n} documents"))
    keys = torch.cat([torch.cat(cap.k[li], dim=1) for li in range(shape.num_layers)])
    info = {"tokens": n_tok, "doc_tokens": st.doc_tokens, "uuid_share": st.uuid_share, "seed": st.seed, "model_path": str(model_path)}
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
    the paper: 4096 codes, one distance 2048, 300 iterations). Sinks and window default
    to the backend's (``A2ATSConfig``): fit for the positions retrieval will score."""

    num_codes: int = option(512, "codes per (layer, KV head) (paper: 4096)", min=2, max=MAX_CODES)
    distances: tuple[int, ...] = option(wrope_distances(DEFAULT_NUM_DISTANCES),
                                        "explicit comma-separated WRoPE distances (overrides --num-distances)", min=1)
    sinks: int = option(default_of(A2ATSConfig, "sinks"), "attention sinks of the serving backend", min=0)
    window: int = option(default_of(A2ATSConfig, "window"), "recent-token window of the serving backend", min=1)
    queries_per_head: int = option(4096, "rotated queries sampled per query head", min=1)
    max_iters: int = option(50, "Lloyd iterations (paper: 300)", min=1)
    tol: float = option(1e-4, "stop when the inertia improves by less than this share", min=0)
    seed: int = option(default_of(CollectSettings, "seed"), "seed of the query sample and k-means")

    def __post_init__(self):
        object.__setattr__(self, "distances", tuple(sorted({int(x) for x in self.distances})))
        if not self.distances:
            raise ValueError("need at least one WRoPE distance (--distances)")
        validate(self, where=cli_flag)


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
    collection: CollectSettings = CollectSettings(),
    settings: FitSettings = FitSettings(),
    compare_plain: bool = True,
    log=print,
    **overrides,
) -> tuple[Codebooks, dict]:
    """Collect, fit query-aware codebooks, report their score error next to plain VQ,
    and (if ``out``) save. -> (codebooks, {"qavq": [per layer], "plain": [per layer] | None}).
    ``overrides``: CollectSettings fields (``calibrate(path, tokens=4096)``)."""
    t0 = time.time()
    data = collect(model_path, collection, log, **overrides)
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


def parser() -> argparse.ArgumentParser:
    """The calibration CLI: --model-path, --out, --num-distances, --no-compare-plain, and one
    flag per CollectSettings / FitSettings field (FitSettings.seed is --seed too)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--out", type=Path, help=f"codebooks file (default: MODEL/{DEFAULT_RELPATH})")
    add_arguments(p, CollectSettings, _flag)
    add_arguments(p, FitSettings, exclude=("seed",))
    p.add_argument("--num-distances", type=int, help=f"WRoPE distances, log-spaced 96..12288 (1 = paper's b=2048) "
                                                      f"(default: {DEFAULT_NUM_DISTANCES})")
    p.add_argument("--no-compare-plain", action="store_true", help="skip fitting plain VQ for the error table")
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[CollectSettings, FitSettings]:
    """The settings the parsed flags ask for (flags not given keep the tables' defaults)."""
    collection = CollectSettings(**given(args, CollectSettings))
    fit_kw = given(args, FitSettings, exclude=("seed",))
    if "distances" not in fit_kw and args.num_distances is not None:
        fit_kw["distances"] = wrope_distances(args.num_distances)
    return collection, FitSettings(**fit_kw, seed=collection.seed)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = args.out or default_codebook_path(args.model_path)
    try:
        collection, settings = settings_from_args(args)
        calibrate(args.model_path, out, collection, settings, not args.no_compare_plain)
    except ValueError as e:
        sys.exit(f"calibrate: error: {e}")


if __name__ == "__main__":
    main()
