"""Talking to the servers the tests start: server arguments, request helpers and the
planted-fact prompts. Imports are inside the functions so that conftest (which reads
SERVER_ARGS) needs neither ``requests`` nor the text corpus to run the unit tests."""

SERVER_ARGS = ["--max-total-tokens", "20000", "--decode-log-interval", "1", "--max-running-requests", "8", "--enable-cache-report"]


def generate(srv, text, max_new_tokens=16, **params):
    """Greedy ``/generate`` (temperature 0 unless ``params`` says otherwise); the JSON reply."""
    import requests

    r = requests.post(srv.url + "/generate", json={"text": text, "sampling_params": {
        "max_new_tokens": max_new_tokens, "temperature": 0, **params}}, timeout=300)
    r.raise_for_status()
    return r.json()


def chat(srv, messages, timeout=300, **kw):
    """Greedy ``/v1/chat/completions`` (24 tokens unless ``kw`` says otherwise); the JSON reply."""
    import requests

    r = requests.post(srv.url + "/v1/chat/completions", json={"model": "default", "messages": messages,
                                                             "temperature": 0, "max_tokens": 24, **kw}, timeout=timeout)
    r.raise_for_status()
    return r.json()


FACTS = [("Zorblat", "7319"), ("Quenmir", "2846"), ("Havelin", "5093")]
# How many of FACTS a working server must answer: quality comparisons that pass when both
# sides answer nothing would not catch a broken model, tokenizer or backend.
PLANTED_FACTS_FLOOR = len(FACTS)


def planted_prompt(name, code, offset):
    """About 2K tokens of real text with ``name``'s secret code planted in the middle, then the question."""
    from a2ats_sglang.calibration.texts import long_text

    text = long_text(9000, offset=offset)
    cut = len(text) // 2
    text = text[:cut] + f"\n\nImportant: the secret code of {name} is {code}.\n\n" + text[cut:]
    return f"{text}\n\nQuestion: What is the secret code of {name}?\nAnswer: The secret code of {name} is"


def planted_facts_answered(srv, facts=FACTS):
    """How many of ``facts`` the server answers right when each is planted in a long prompt
    (greedy, 8 tokens); every prompt checked to be at least 2000 tokens long."""
    right = 0
    for i, (name, code) in enumerate(facts):
        out = generate(srv, planted_prompt(name, code, offset=40 * i), 8)
        assert out["meta_info"]["prompt_tokens"] >= 2000
        right += code in out["text"]
    return right


def worker_pids(srv):
    """Pids of the CPU attention workers the server started, in order."""
    import re

    return [int(p) for p in re.findall(r"CPU attention worker pid (\d+) ready", srv.log())]


def stream_until_decoding(srv, prompt: str, max_new_tokens: int):
    """Stream a greedy request in a thread; return (thread, chunks) once 3 chunks arrived
    (the request is decoding). ``chunks`` keeps filling until the thread ends."""
    import json
    import threading
    import time

    import requests

    chunks = []

    def stream():
        with requests.post(srv.url + "/generate", json={"text": prompt, "stream": True, "sampling_params": {
                "max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}, stream=True, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    chunks.append(json.loads(line[6:]))

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 300
    while len(chunks) < 3 and time.time() < deadline:
        time.sleep(0.05)
    return t, chunks


def multi_turn_session(srv, i: int, turns: int = 3, max_tokens: int = 6) -> list[tuple[str, int, int]]:
    """Session ``i``: a ~700-token document of its own as the system prompt, then ``turns``
    greedy questions, each turn sent with the whole conversation so far. -> per turn
    (answer, cached prompt tokens, prompt tokens)."""
    from a2ats_sglang.calibration.texts import long_text

    msgs = [{"role": "system", "content": long_text(3000, offset=300 + 37 * i)}]
    out = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {t + 1} of session {i}: name one thing the text says."})
        r = chat(srv, msgs, max_tokens=max_tokens, timeout=600)
        usage = r["usage"]
        out.append((r["choices"][0]["message"]["content"], usage["prompt_tokens_details"]["cached_tokens"],
                    usage["prompt_tokens"]))
        msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
    return out
