"""Long-document question answering over real text (Wikipedia paragraphs), a2ats
against the dense backend: the answer, the share of the context a2ats attended,
and time per output token.

A fact is planted in the middle of the document; both servers are asked for it.

    python examples/long_document_qa.py [--a2ats-url URL --dense-url URL] [--doc-chars 9000] [--questions 3]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import requests

from a2ats_sglang.harness.server import decode_ms_per_token

sys.path.insert(0, str(Path(__file__).parent))
from _common import server_url  # noqa: E402

FACTS = [("the lighthouse keeper", "Ottoline Varga"), ("the harbour master", "Bertil Ankarsvard"),
         ("the ferry captain", "Imre Halloway"), ("the museum curator", "Sunniva Oduya")]


def ask(url: str, doc: str, role: str, max_new_tokens: int) -> dict:
    prompt = f"{doc}\n\nQuestion: Who is {role}?\nAnswer: The name of {role} is"
    t = time.perf_counter()
    r = requests.post(url + "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}, timeout=900)
    r.raise_for_status()
    out = r.json()
    return {"answer": out["text"].strip(), "latency_s": time.perf_counter() - t, **{k: out["meta_info"][k] for k in ("prompt_tokens", "completion_tokens")}}


def run(a2ats_url: str, dense_url: str, doc_chars: int, questions: int, a2ats_log=None) -> list[dict]:
    from a2ats_sglang.calibration.texts import long_text

    rows = []
    for i, (role, name) in enumerate(FACTS[:questions]):
        doc = long_text(doc_chars, offset=60 * i)
        cut = len(doc) // 2
        doc = doc[:cut] + f"\n\n{role.capitalize()} of the town is {name}.\n\n" + doc[cut:]
        row = {"question": f"Who is {role}?", "expected": name}
        for key, url in (("a2ats", a2ats_url), ("dense", dense_url)):
            res = ask(url, doc, role, 10)
            row[key] = res["answer"]
            row[f"{key}_right"] = name.split()[0] in res["answer"]
            row["prompt_tokens"] = res["prompt_tokens"]
        rows.append(row)
        print(f"Q{i + 1} ({row['prompt_tokens']} tokens) {row['question']} expected {name!r}\n"
              f"  a2ats: {row['a2ats']!r} ({'right' if row['a2ats_right'] else 'wrong'})\n"
              f"  dense: {row['dense']!r} ({'right' if row['dense_right'] else 'wrong'})", flush=True)
    doc = long_text(doc_chars)
    tp = {key: decode_ms_per_token(url, doc, 16) for key, url in (("a2ats", a2ats_url), ("dense", dense_url))}
    print(f"time per output token at {rows[0]['prompt_tokens']} tokens: a2ats {tp['a2ats']:.1f} ms, dense {tp['dense']:.1f} ms")
    if a2ats_log is not None:
        shares = re.findall(r"attended ([\d.]+)% of context \(", a2ats_log())
        if shares:
            print(f"a2ats attended {shares[-1]}% of the context per decode step")
    print(f"right answers: a2ats {sum(r['a2ats_right'] for r in rows)}/{len(rows)}, dense {sum(r['dense_right'] for r in rows)}/{len(rows)}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a2ats-url")
    p.add_argument("--dense-url")
    p.add_argument("--model-path")
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--doc-chars", type=int, default=9000)
    p.add_argument("--questions", type=int, default=3)
    args = p.parse_args(argv)
    with server_url(args, "a2ats", args.a2ats_url) as (a_url, a_srv), server_url(args, "torch_native", args.dense_url) as (d_url, _):
        run(a_url, d_url, args.doc_chars, args.questions, a_srv.log if a_srv else None)


if __name__ == "__main__":
    main()
