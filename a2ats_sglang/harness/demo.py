"""The main job: serve the embedded default model with ``--attention-backend a2ats``
on this machine and ask it a long-document question and a chat question.

    python -m a2ats_sglang.harness.demo [--model-path DIR] [--doc-chars 9000]
"""

from __future__ import annotations

import argparse
import re
import time

import requests

from a2ats_sglang.harness.offline_models import model_or_default
from a2ats_sglang.harness.server import launch_server
from a2ats_sglang.calibration.texts import long_text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", help="default: the embedded SmolLM2-135M-Instruct (built if needed)")
    p.add_argument("--doc-chars", type=int, default=9000, help="length of the document (about 4 chars per token)")
    args = p.parse_args(argv)
    model = model_or_default(args.model_path)
    print(f"starting SGLang with --attention-backend a2ats on {model} ...", flush=True)
    with launch_server(model, "a2ats", ["--max-total-tokens", "20000", "--decode-log-interval", "1"]) as srv:
        doc = long_text(args.doc_chars)
        cut = len(doc) // 2
        doc = doc[:cut] + "\n\nNote: the library's new opening hours are 9 to 17.\n\n" + doc[cut:]
        prompt = f"{doc}\n\nQuestion: What are the library's new opening hours?\nAnswer: The library's new opening hours are"
        t = time.time()
        out = requests.post(srv.url + "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 0}}).json()
        meta = out["meta_info"]
        print(f"\n[long document] {meta['prompt_tokens']} prompt tokens, {meta['completion_tokens']} generated in {time.time() - t:.1f}s")
        print(f"  answer: {out['text'].strip()!r}")
        shares = re.findall(r"attended ([\d.]+)% of context", srv.log())
        if shares:
            print(f"  attended {shares[-1]}% of the context per decode step (sinks + window + top-K)")
        t = time.time()
        chat = requests.post(srv.url + "/v1/chat/completions", json={
            "model": "default", "temperature": 0, "max_tokens": 40,
            "messages": [{"role": "user", "content": "Name three planets of the solar system."}]}).json()
        n = chat["usage"]["completion_tokens"]
        dt = time.time() - t
        print(f"\n[chat] {chat['choices'][0]['message']['content'].strip()!r}")
        print(f"  {n} tokens in {dt:.1f}s ({1000 * dt / max(1, n):.0f} ms per token, prefill included)")


if __name__ == "__main__":
    main()
