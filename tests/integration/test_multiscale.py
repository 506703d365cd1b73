"""Issue #6 in the server: the long planted-fact prompts answered with single-position
WRoPE codebooks (the paper: one b = 2048) and with the default multi-scale ones."""

import pytest
from conftest import SERVER_ARGS
from test_server import FACTS, generate, planted_prompt

from a2ats_sglang.calibration.calibrate import FitSettings, calibrate
from a2ats_sglang.harness.server import launch_server

pytestmark = pytest.mark.server


def test_long_prompts_with_and_without_multiscale_wrope(default_model_dir, a2ats, tmp_path):
    single = tmp_path / "single_b.safetensors"
    calibrate(default_model_dir, single, tokens=4096, doc_tokens=1024, compare_plain=False, log=lambda *a: None,
              settings=FitSettings(num_codes=256, distances=(2048,), max_iters=20))
    right = {"multi-scale": 0, "single b": 0}
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + ["--a2ats-codebook", single]) as paper:
        assert "WRoPE distances [2048]" in paper.log()
        for i, (name, code) in enumerate(FACTS):
            prompt = planted_prompt(name, code, offset=40 * i)
            right["single b"] += code in generate(paper, prompt, 8)["text"]
            right["multi-scale"] += code in generate(a2ats, prompt, 8)["text"]
    print(f"planted facts answered: {right} of {len(FACTS)}")
    assert right["multi-scale"] >= right["single b"], right
