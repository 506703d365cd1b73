"""A multi-turn chat agent over the OpenAI-compatible API of a server running
``--attention-backend a2ats``. The context grows every turn; the radix cache
serves the shared history, so each turn prefills only what is new.

    python examples/chat_agent.py [--url http://127.0.0.1:30000] [--turns 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_server_args, server_url  # noqa: E402

QUESTIONS = [
    "What is the document about? One sentence.",
    "Name one place mentioned in it.",
    "Name one person or group mentioned in it.",
    "Summarize our conversation in one sentence.",
    "Thank you. Say goodbye.",
]


def run(url: str, turns: int, max_tokens: int, doc_chars: int) -> list[dict]:
    from openai import OpenAI

    from a2ats_sglang.calibration.texts import long_text

    client = OpenAI(base_url=url + "/v1", api_key="none")
    messages = [{"role": "system", "content": "You are a helpful assistant. Use this document:\n\n" + long_text(doc_chars)}]
    stats = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        t = time.perf_counter()
        r = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=max_tokens)
        dt = time.perf_counter() - t
        answer = r.choices[0].message.content
        messages.append({"role": "assistant", "content": answer})
        details = getattr(r.usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", 0) if details else 0
        stats.append({"turn": turn + 1, "prompt_tokens": r.usage.prompt_tokens, "cached_tokens": cached or 0,
                      "completion_tokens": r.usage.completion_tokens, "latency_s": dt, "answer": answer})
        print(f"turn {turn + 1}: {dt:5.2f}s, prompt {r.usage.prompt_tokens} tokens ({cached or 0} cached), "
              f"{r.usage.completion_tokens} generated\n  user: {messages[-2]['content']}\n  assistant: {answer.strip()}", flush=True)
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--doc-chars", type=int, default=6000)
    args = p.parse_args(argv)
    with server_url(args) as (url, _):
        stats = run(url, args.turns, args.max_tokens, args.doc_chars)
    later = stats[1:]
    if later and all(s["cached_tokens"] > 0 for s in later):
        print(f"radix cache: turns 2..{len(stats)} reused {sum(s['cached_tokens'] for s in later)} prompt tokens")


if __name__ == "__main__":
    main()
