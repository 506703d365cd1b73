"""Issue #6 in the server: the long planted-fact prompts answered with single-position
WRoPE codebooks (the paper: one b = 2048) and with the default multi-scale ones."""

import pytest
from support.serving import FACTS, PLANTED_FACTS_FLOOR, SERVER_ARGS, planted_facts_answered

from a2ats_sglang.calibration.calibrate import FitSettings, calibrate
from a2ats_sglang.harness.server import launch_server

pytestmark = pytest.mark.server


def test_long_prompts_with_and_without_multiscale_wrope(default_model_dir, a2ats, tmp_path):
    single = tmp_path / "single_b.safetensors"
    calibrate(default_model_dir, single, tokens=4096, doc_tokens=1024, compare_plain=False, log=lambda *a: None,
              settings=FitSettings(num_codes=256, distances=(2048,), max_iters=20))
    with launch_server(default_model_dir, "a2ats", SERVER_ARGS + ["--a2ats-codebook", single]) as paper:
        assert "WRoPE distances [2048]" in paper.log()
        right = {"single b": planted_facts_answered(paper), "multi-scale": planted_facts_answered(a2ats)}
    print(f"planted facts answered: {right} of {len(FACTS)}")
    assert right["multi-scale"] >= PLANTED_FACTS_FLOOR, right  # the default codebooks find the facts
    assert right["multi-scale"] >= right["single b"], right
