from dataclasses import replace

import pytest

from a2ats_sglang.calibration.calibrate import CollectSettings, FitSettings, calibrate, main
from a2ats_sglang.core.codebook import MAX_CODES, Codebooks
from a2ats_sglang.calibration.capture import load_hf_model

FIT = dict(num_codes=16, max_iters=5, queries_per_head=256, window=16, sinks=4)
COLLECT = CollectSettings(tokens=1024, doc_tokens=256)
TINY = dict(collection=COLLECT, settings=FitSettings(**FIT))


def test_calibrate_writes_codebooks_that_validate_against_the_model(default_model_dir, tmp_path):
    out = tmp_path / "cb.safetensors"
    settings = FitSettings(**FIT, distances=(96, 768, 6144))
    books, report = calibrate(default_model_dir, out, COLLECT, settings, log=lambda *a: None)
    loaded = Codebooks.load(out)
    _, _, shape, rope = load_hf_model(default_model_dir)
    loaded.validate(shape, rope)
    assert loaded.centroids.shape == (shape.num_layers, shape.num_kv_heads, 16, shape.head_dim)
    assert loaded.distances == (96, 768, 6144)
    assert len(report["qavq"]) == len(report["plain"]) == shape.num_layers
    # Query-aware VQ approximates scores better than plain VQ (its objective).
    assert sum(report["qavq"]) < sum(report["plain"])


def test_deterministic_with_a_seed(default_model_dir):
    a, _ = calibrate(default_model_dir, None, compare_plain=False, log=lambda *a: None, **TINY)
    b, _ = calibrate(default_model_dir, None, compare_plain=False, log=lambda *a: None, **TINY)
    assert (a.centroids == b.centroids).all()


def test_bad_calibration_input(default_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        calibrate(default_model_dir, None, replace(COLLECT, text_files=(empty,)), TINY["settings"], log=lambda *a: None)
    short = tmp_path / "short.txt"
    short.write_text("Just a few words of text.")
    with pytest.raises(ValueError, match="fewer than"):
        calibrate(default_model_dir, None, text_files=[short], log=lambda *a: None, **TINY)  # a field override
    with pytest.raises(SystemExit, match=rf"num_codes must be in \[2, {MAX_CODES}\], got 1 \(--num-codes\)"):
        main(["--model-path", str(default_model_dir), "--num-codes", "1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_settings_overrides_are_validated_before_the_model_loads():
    with pytest.raises(ValueError, match=r"tokens must be >= 1, got 0 \(--tokens\)"):
        calibrate("/nonexistent/model", None, tokens=0)
    with pytest.raises(ValueError, match=r"uuid_share must be in \[0, 1\), got 1.0 \(--uuid-share\)"):
        calibrate("/nonexistent/model", None, COLLECT, uuid_share=1.0)
