"""Each example in examples/ runs, with short settings, against real servers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name, *args, timeout=900):
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_chat_agent_reuses_the_radix_cache(a2ats):
    out = run_example("chat_agent.py", "--url", a2ats.url, "--turns", 3, "--max-tokens", 16, "--doc-chars", 2000)
    turns = re.findall(r"turn (\d+):\s+[\d.]+s, prompt (\d+) tokens \((\d+) cached\)", out)
    assert [t[0] for t in turns] == ["1", "2", "3"]
    assert all(int(prompt) > int(p_prev) for (_, p_prev, _), (_, prompt, _) in zip(turns, turns[1:]))  # growing context
    assert all(int(cached) > 0 for _, _, cached in turns[1:]), out
    assert "radix cache: turns 2..3 reused" in out


def test_structured_programs(a2ats):
    out = run_example("structured_programs.py", "--url", a2ats.url)
    assert re.search(r"^date: (19|20)\d\d-\d\d-\d\d$", out, re.M), out
    assert re.search(r"^card: \{'name': .*'year_of_birth': \d+, 'field': '(science|art|politics|sport)'\}$", out, re.M), out
    assert re.search(r"^labels: \['(positive|negative)', '(positive|negative)'\]$", out, re.M), out
    assert re.search(r"^pros_and_cons: Advantage: \S.*\nDisadvantage: \S", out, re.M), out  # both forks wrote


def test_long_document_qa_compares_with_dense(a2ats, dense):
    out = run_example("long_document_qa.py", "--a2ats-url", a2ats.url, "--dense-url", dense.url, "--doc-chars", 5000, "--questions", 1)
    assert re.search(r"Q1 \(\d+ tokens\) Who is the lighthouse keeper\?", out), out
    assert re.search(r"time per output token at \d+ tokens: a2ats [\d.]+ ms, dense [\d.]+ ms", out), out
    m = re.search(r"^right answers: a2ats (\d+)/(\d+), dense (\d+)/(\d+)$", out, re.M)
    assert m, out
    a2ats_right, a2ats_asked, dense_right, dense_asked = map(int, m.groups())
    assert a2ats_asked == dense_asked == 1, out
    assert dense_right == dense_asked, out  # the model answers the planted fact: the comparison means something
    assert a2ats_right >= dense_right, out  # a2ats answers as often as dense
    for key in ("a2ats", "dense"):  # the answers themselves name the keeper, not only the example's tally
        assert re.search(rf"^  {key}: .*Ottoline.* \(right\)$", out, re.M), out


def test_rag_fusion_example_reuses_passages_and_answers(fusing):
    out = run_example("rag_fusion.py", "--url", fusing.url, "--library", 6, "--questions", 3, "--retrieve", 4)
    rows = re.findall(r"plain prompt: TTFT ([\d.]+) s .*\n  fused chunks: TTFT ([\d.]+) s", out)
    assert len(rows) == 3, out
    right = re.search(r"right answers: plain (\d+)/3, fused (\d+)/3", out)
    assert right and int(right.group(2)) >= int(right.group(1)) - 1 and int(right.group(1)) >= 2, out
    assert float(rows[-1][1]) < float(rows[-1][0]), out  # by the last question its passages are cached
