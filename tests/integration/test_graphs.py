"""SGLang's CPU graph runner (``--enable-torch-compile`` on ``--device cpu``): the decode
step compiled per batch-size bucket gives the same greedy tokens as eager decode, for
a2ats and the dense baseline, at batch sizes inside, between and above the captured
buckets; for requests the budget covers, requests it does not, and requests that grow
past the length a2ats retrieves from while they decode. Configurations that are not captured (offload,
the torch kernels, a backend without the hooks) serve eagerly, answer as dense, and say why."""

import concurrent.futures as cf
import re

import pytest
import torch
from support.serving import SERVER_ARGS, generate

from a2ats_sglang.calibration.texts import long_text
from a2ats_sglang.config import A2ATSConfig
from a2ats_sglang.harness.server import launch_server

pytestmark = pytest.mark.server

BUCKETS = ("4",)  # one bucket (capture costs 20-80 s each): sizes 1 and 3 replay it padded
GRAPHS = ["--enable-torch-compile", "--cuda-graph-bs-decode", *BUCKETS]
START = 900  # seconds a server capturing graphs may take to start (~80 s per bucket seen on a slow 2-core VM)
NEW_TOKENS = 24


def covered_up_to() -> int:
    """The longest sequence the default budget covers (attended whole, no retrieval)."""
    budget, cfg = A2ATSConfig().budget_policy, A2ATSConfig()
    lens = torch.arange(1, 4096)
    return int(lens[budget.least_tokens(lens) + cfg.sinks + cfg.window >= lens].max())


def dense_below(srv) -> int:
    """The length from which a2ats retrieves, as the server logged it (auto on CPU)."""
    return int(re.search(r"dense below (\d+) tokens \(auto\)", srv.log())[1])


def prompts(model_dir, boundary: int):
    """(name, text): covered, one that reaches ``boundary`` tokens while decoding, and long ones."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(long_text(8 * boundary, offset=7), add_special_tokens=False).input_ids[:boundary - NEW_TOKENS // 2]
    return [("covered", "The capital of France is"), ("crossing", tok.decode(ids)),
            ("long", long_text(9000, offset=3)), ("long2", long_text(12000, offset=90) + "\n\nIn short,")]


def answers(srv, items, concurrency: int):
    """Greedy answers to ``items`` (:func:`prompts`), sent ``concurrency`` at a time (repeated
    to fill the batch) -> {name: (prompt tokens, text)}."""
    work = [items[i % len(items)] for i in range(max(concurrency, len(items)))]
    with cf.ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(lambda item: generate(srv, item[1], NEW_TOKENS, ignore_eos=True), work))
    got = {}
    for (name, _), out in zip(work, outs):
        pair = (out["meta_info"]["prompt_tokens"], out["text"])
        assert got.setdefault(name, pair) == pair, name  # repeats of a prompt in one batch agree
    return got


def decode_lines(srv, graph: bool) -> list[int]:
    """Running-request counts of the decode batches logged with ``cpu graph: graph``."""
    flag = "True" if graph else "False"
    return [int(n) for n in re.findall(rf"Decode batch, #running-req: (\d+),.*cpu graph: {flag}", srv.log())]


def assert_same_answers_as_eager(graphs, eager, items, boundary: int):
    """``boundary``: the length past which requests stop attending everything (a2ats: its
    dense-below length), which the crossing prompt reaches while it decodes."""
    want = answers(eager, items, 1)
    tokens = want["crossing"][0]
    assert tokens < boundary < tokens + NEW_TOKENS - 1, (tokens, boundary)  # dense, then retrieving, in one request
    assert want["long"][0] > boundary
    for concurrency in (1, 4, 6):  # padded to the bucket, the captured size, above every bucket
        assert answers(graphs, items, concurrency) == want, concurrency
    ran = decode_lines(graphs, True)
    assert 1 in ran and 4 in ran, ran  # bs 1 replayed padded to 4 (and 2, 3 as requests finish); bs 4 replayed
    assert any(n > int(BUCKETS[-1]) for n in decode_lines(graphs, False))  # bs 6: eager in the same server
    assert "CPU graph capture failed" not in graphs.log()


def test_a2ats_under_graphs_answers_as_eager(default_model_dir, a2ats):
    boundary = dense_below(a2ats)
    assert boundary > covered_up_to()  # the default codebooks' lookup table outweighs dense attention at short contexts
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + GRAPHS, timeout=START) as srv:
        assert_same_answers_as_eager(srv, a2ats, prompts(default_model_dir, boundary), boundary)
        shares = [float(s) for s in re.findall(r"a2ats decode batch: .* attended ([\d.]+)% of context \(", srv.log())]
        assert shares and min(shares) < 50.0  # the long prompts really retrieved under graphs
        assert re.search(r"Capture target decode CPU graph end\. bs=\[4\]", srv.log())


def test_dense_baseline_under_graphs_answers_as_eager(default_model_dir):
    with launch_server(default_model_dir, "a2ats_dense", SERVER_ARGS) as eager, \
            launch_server(default_model_dir, "a2ats_dense", SERVER_ARGS + GRAPHS, timeout=START) as srv:
        boundary = covered_up_to()
        assert_same_answers_as_eager(srv, eager, prompts(default_model_dir, boundary), boundary)


@pytest.mark.parametrize("backend, extra, reason", [
    # offload: compiled piecewise around its worker round trip it ran slower than eager
    # (test_offload: offload answers as on-device eager)
    ("a2ats", ["--a2ats-offload"], "ValueError: a2ats offload decodes eagerly"),
    ("a2ats", ["--a2ats-kernel", "torch"], "CPU graphs need the C++ kernels"),
    ("torch_native", [], "init_cpu_graph_state"),
], ids=["offload", "torch-kernels", "torch_native"])
def test_a_configuration_that_cannot_be_captured_serves_eagerly(default_model_dir, dense, backend, extra, reason):
    with launch_server(default_model_dir, backend, SERVER_ARGS + GRAPHS + extra, timeout=START) as srv:
        out = generate(srv, "The capital of France is", 12)
        assert out["text"] == generate(dense, "The capital of France is", 12)["text"]
        line = re.search(r"CPU graph capture failed \((.*)\); decode runs eagerly", srv.log())
        assert line and reason in line[1], srv.log()[-3000:]
        assert decode_lines(srv, False) and not decode_lines(srv, True)
