"""The codebooks file: per (layer, KV head) query-aware VQ codebooks in safetensors.

Tensors: ``centroids`` float32 [layers, kv_heads, codes, head_dim] (key space),
``whiten`` float32 [layers, kv_heads, head_dim, head_dim] (L, z = k @ L),
``rope_inv_freq`` float32 [rotary_dim // 2]. Metadata (strings): format, version,
model identity (type, layers, q/kv heads, head dim), rope, WRoPE distances.
Loading validates all of it against the model that will use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from a2ats_sglang.core.rope import RopeSpec

FORMAT = "a2ats-codebooks"
VERSION = 1
# A subfolder: SGLang loads every *.safetensors at the top of a model directory as weights.
DEFAULT_RELPATH = Path("a2ats") / "codebooks.safetensors"
MAX_CODES = 32767  # codes are stored as int16


def default_codebook_path(model_path: str | Path) -> Path:
    """Where calibration writes, and the backend looks, by default: MODEL_PATH/a2ats/codebooks.safetensors."""
    return Path(model_path) / DEFAULT_RELPATH


def check_attention_kind(cfg) -> None:
    """Raise :class:`CodebookMismatch` for a HF (text) config whose attention A2ATS cannot
    index: multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi), whose keys are not per
    KV head."""
    cfg = getattr(cfg, "text_config", None) or cfg
    if getattr(cfg, "kv_lora_rank", None):
        raise CodebookMismatch(f"a2ats: {getattr(cfg, 'model_type', 'this model')} uses multi-head latent attention "
                               f"(MLA, kv_lora_rank {cfg.kv_lora_rank}): its keys are not per KV head, which A2ATS "
                               f"needs")


@dataclass(frozen=True)
class ModelShape:
    """What a codebook must agree with: read from the model's HF config."""

    model_type: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, cfg, num_layers: int | None = None) -> "ModelShape":
        """``num_layers`` stands in where the config has no ``num_hidden_layers``."""
        cfg = getattr(cfg, "text_config", None) or cfg
        check_attention_kind(cfg)
        q_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
        return cls(
            model_type=str(getattr(cfg, "model_type", "unknown")),
            num_layers=int(getattr(cfg, "num_hidden_layers", None) or num_layers),
            num_q_heads=int(q_heads),
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or q_heads),
            head_dim=int(head_dim),
        )


class CodebookMismatch(ValueError):
    """The codebooks file does not belong to the model (or is not a codebooks file)."""


@dataclass
class Codebooks:
    """centroids [Lyr, Hkv, C, D] f32, whiten [Lyr, Hkv, D, D] f32, the model's rope,
    the WRoPE distances (one = the paper's b; several = multi-scale buckets)."""

    centroids: torch.Tensor
    whiten: torch.Tensor
    rope: RopeSpec
    distances: tuple[int, ...]
    shape: ModelShape
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        lyr, hkv, c, d = self.centroids.shape
        if self.whiten.shape != (lyr, hkv, d, d):
            raise CodebookMismatch(f"whiten shape {tuple(self.whiten.shape)} != {(lyr, hkv, d, d)}")
        if (lyr, hkv, d) != (self.shape.num_layers, self.shape.num_kv_heads, self.shape.head_dim):
            raise CodebookMismatch("centroid tensor shape disagrees with the recorded model shape")
        if not self.distances or any(x <= 0 for x in self.distances) or list(self.distances) != sorted(set(self.distances)):
            raise CodebookMismatch(f"WRoPE distances must be positive and increasing, got {self.distances}")
        if c > MAX_CODES:
            raise CodebookMismatch(f"{c} codes do not fit int16 codes")

    @property
    def num_codes(self) -> int:
        return self.centroids.shape[2]

    # -- the model-facing check -------------------------------------------------
    def validate(self, shape: ModelShape, rope: RopeSpec | None = None, source: str = "codebooks") -> None:
        """Raise CodebookMismatch saying exactly what differs from the serving model."""
        diffs = [
            f"{k}: file has {getattr(self.shape, k)}, model has {getattr(shape, k)}"
            for k in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")
            if getattr(self.shape, k) != getattr(shape, k)
        ]
        if diffs:
            raise CodebookMismatch(f"{source} do not match the model ({'; '.join(diffs)}); recalibrate with python -m a2ats_sglang.calibration")
        if rope is not None:
            try:
                self.rope.check_matches(rope, source)
            except ValueError as e:
                raise CodebookMismatch(str(e)) from None

    # -- file I/O ---------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {
            "format": FORMAT,
            "version": str(VERSION),
            "model": json.dumps(self.shape.__dict__),
            "rope": json.dumps({"head_dim": self.rope.head_dim, "neox": self.rope.neox, "mscale": self.rope.mscale}),
            "distances": json.dumps(list(self.distances)),
            "num_codes": str(self.num_codes),
            "info": json.dumps(self.info),
        }
        tensors = {
            "centroids": self.centroids.float().contiguous(),
            "whiten": self.whiten.float().contiguous(),
            "rope_inv_freq": self.rope.inv_freq.float().contiguous(),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Codebooks":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CodebookMismatch(f"codebooks file not found: {path} (build one with python -m a2ats_sglang.calibration)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise CodebookMismatch(f"{path} is not an A2ATS codebooks file (format={meta.get('format')!r})")
                if meta.get("version") != str(VERSION):
                    raise CodebookMismatch(f"{path}: format version {meta.get('version')} is not supported (need {VERSION})")
                tensors = {k: f.get_tensor(k) for k in ("centroids", "whiten", "rope_inv_freq")}
        except CodebookMismatch:
            raise
        except Exception as e:  # truncated file, missing tensor, bad header
            raise CodebookMismatch(f"cannot read codebooks file {path}: {e}") from None
        r = json.loads(meta["rope"])
        rope = RopeSpec(tensors["rope_inv_freq"], int(r["head_dim"]), bool(r["neox"]), float(r["mscale"]))
        return cls(
            centroids=tensors["centroids"],
            whiten=tensors["whiten"],
            rope=rope,
            distances=tuple(int(x) for x in json.loads(meta["distances"])),
            shape=ModelShape(**json.loads(meta["model"])),
            info=json.loads(meta.get("info", "{}")),
        )


def load_for_model_runner(model_runner, path: str = "", rope: RopeSpec | None = None) -> tuple[Codebooks, RopeSpec, Path]:
    """The codebooks an SGLang model runner serves with, in one call: ``path`` (default:
    :func:`default_codebook_path` of the model), loaded and validated against the runner's
    model shape and ``rope``, the rotation of its retrieving layers (when it exposes one).

    -> (codebooks, the RoPE that retrieval uses: ``rope``, else the file's, the file's path).
    Raises :class:`CodebookMismatch` saying what is missing or differs."""
    mc = model_runner.model_config
    if not path and not getattr(mc, "model_path", None):
        raise CodebookMismatch("a2ats: no codebooks file given (--a2ats-codebook or SGLANG_A2ATS_CODEBOOK)")
    file = Path(path) if path else default_codebook_path(mc.model_path)
    books = Codebooks.load(file)
    hf = getattr(mc, "hf_text_config", None) or mc.hf_config
    shape = ModelShape.from_hf_config(hf, num_layers=getattr(model_runner.token_to_kv_pool, "layer_num", None))
    real_kv = getattr(hf, "original_total_num_kv_heads", None)
    if real_kv is not None and real_kv != shape.num_kv_heads:  # SGLang's CPU tensor parallelism pads heads
        raise CodebookMismatch(
            f"a2ats: SGLang pads this model's {real_kv} KV heads to {shape.num_kv_heads} (and its query heads to "
            f"{shape.num_q_heads}) to split them between tensor-parallel ranks on CPU; padded heads have no "
            f"codebooks: use a --tp-size that divides {real_kv}")
    books.validate(shape, rope, source=f"codebooks {file}")
    return books, rope or books.rope, file


@dataclass
class LayerCodebook:
    """One layer's codebooks on the serving device, with the encoder precomputed.

    centroids: [Hkv, C, D] (LUT GEMM); enc_rows: [Hkv, C, D] = z L^T (one row per code); enc_bias:
    [Hkv, C] = -|z|^2/2, so ``code(k) = argmax_c (enc_rows[c] . k + enc_bias[c])``."""

    centroids: torch.Tensor
    enc_rows: torch.Tensor
    enc_bias: torch.Tensor

    @classmethod
    def build(cls, centroids: torch.Tensor, whiten: torch.Tensor, device, dtype=torch.float32) -> "LayerCodebook":
        z = centroids.float() @ whiten.float()
        return cls(
            centroids=centroids.to(device=device, dtype=dtype).contiguous(),
            enc_rows=(z @ whiten.float().transpose(1, 2)).to(device).contiguous(),
            enc_bias=(-0.5 * z.pow(2).sum(-1)).to(device).contiguous(),
        )

    def encode(self, k_pre: torch.Tensor) -> torch.Tensor:
        """k_pre: [T, Hkv, D] -> codes int16 [T, Hkv]."""
        s = torch.einsum("thd,hcd->thc", k_pre.float(), self.enc_rows) + self.enc_bias
        return s.argmax(-1).to(torch.int16)
