"""Retrieval-augmented question answering with A³ chunk fusion: a library of Wikipedia
passages, each with a planted fact; every question retrieves a few passages (in a different
order each time) and is asked twice of one server started with ``--a2ats-chunk-fusion``:
as a plain prompt (SGLang reuses only an exact prefix) and with the passages marked as
chunks (their KV reused at any position, ``--ratio`` of their tokens recomputed; default the
server's ``--a2ats-fusion-ratio``). Prints
the time to first token and the answer of each.

    python examples/rag_fusion.py [--url URL] [--library 12] [--questions 6] [--retrieve 6] [--ratio R]

A client marks chunks with ``custom_params``::

    {"text": prompt, "sampling_params": {"max_new_tokens": 16, "custom_params":
        {"a2ats_chunks": [passage, ...], "a2ats_recompute_ratio": 0.15}}}

where each passage appears verbatim in the prompt, set off by newlines.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_server_args, server_url  # noqa: E402

NAMES = ["Zorblat", "Quenmir", "Havelin", "Brostak", "Yselda", "Tormund", "Wexley", "Ombrina", "Castellan", "Verhoek",
         "Ansgaria", "Milodrin", "Pellucia", "Rostavin", "Quillane", "Dravenor"]


def library(tokenizer_path: str | None, url: str, size: int) -> list[tuple[str, str, str]]:
    """``size`` (passage, name, code): Wikipedia passages of 256-512 tokens, each with the
    secret code of someone planted in it."""
    from transformers import AutoTokenizer

    from a2ats_sglang.harness.rag import paragraphs, plant

    if tokenizer_path is None:
        tokenizer_path = requests.get(url + "/get_model_info", timeout=30).json()["tokenizer_path"]
    rng = random.Random(0)
    out = []
    for i, passage in enumerate(paragraphs(AutoTokenizer.from_pretrained(tokenizer_path), size)):
        name, code = NAMES[i % len(NAMES)], str(rng.randrange(1000, 10000))
        out.append((plant(passage, f"The secret code of {name} is {code}.", rng), name, code))
    return out


def ask(url: str, prompt: str, chunks: list[str] | None, ratio: float | None) -> tuple[float, str]:
    sampling = {"max_new_tokens": 8, "temperature": 0}
    if chunks is not None:
        sampling["custom_params"] = {"a2ats_chunks": chunks}
        if ratio is not None:
            sampling["custom_params"]["a2ats_recompute_ratio"] = ratio
    t = time.perf_counter()
    r = requests.post(url + "/generate", json={"text": prompt, "sampling_params": sampling, "stream": True},
                      stream=True, timeout=900)
    r.raise_for_status()
    first, text = None, ""
    import json

    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            first = first or time.perf_counter() - t
            text = json.loads(line[6:])["text"]
    return first, text.strip()


def run(url: str, size: int, questions: int, retrieve: int, ratio: float | None, tokenizer_path=None) -> list[dict]:
    from a2ats_sglang.harness.rag import INSTRUCTION

    docs = library(tokenizer_path, url, size)
    rng = random.Random(1)
    rows = []
    for q in range(questions):
        picked = rng.sample(range(size), retrieve)  # "retrieval": the target passage and others, in any order
        passage, name, code = docs[picked[0]]
        rng.shuffle(picked)
        chunks = [docs[j][0] for j in picked]
        prompt = INSTRUCTION + "".join(c + "\n\n" for c in chunks) + (
            f"Question: What is the secret code of {name}?\nAnswer: The secret code of {name} is")
        plain_s, plain = ask(url, prompt, None, ratio)
        fused_s, fused = ask(url, prompt, chunks, ratio)
        rows.append({"question": q, "plain_ttft_s": plain_s, "fused_ttft_s": fused_s, "plain_right": code in plain,
                     "fused_right": code in fused})
        print(f"Q{q + 1}: code of {name} (passages {picked}) expected {code}\n"
              f"  plain prompt: TTFT {plain_s:.2f} s  {plain!r}\n"
              f"  fused chunks: TTFT {fused_s:.2f} s  {fused!r}  ({plain_s / fused_s:.1f}x)", flush=True)
    print(f"right answers: plain {sum(r['plain_right'] for r in rows)}/{len(rows)}, fused "
          f"{sum(r['fused_right'] for r in rows)}/{len(rows)}; median TTFT plain "
          f"{sorted(r['plain_ttft_s'] for r in rows)[len(rows) // 2]:.2f} s, fused "
          f"{sorted(r['fused_ttft_s'] for r in rows)[len(rows) // 2]:.2f} s")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p)
    p.add_argument("--library", type=int, default=12, help="passages in the library")
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--retrieve", type=int, default=6, help="passages per question")
    p.add_argument("--ratio", type=float, help="share of the chunk tokens recomputed (default: the server's)")
    args = p.parse_args(argv)
    with server_url(args, "a2ats", extra_args=["--a2ats-chunk-fusion"]) as (url, _):
        run(url, args.library, args.questions, args.retrieve, args.ratio, args.model_path)


if __name__ == "__main__":
    main()
