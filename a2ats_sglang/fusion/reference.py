"""A reference engine for chunk-KV fusion over a Hugging Face causal LM: every step of the
method in plain torch, the oracle the served path is measured against and the engine of
``benchmarks/fusion_fidelity.py``.

    engine = FusionEngine(model)                     # a transformers *ForCausalLM
    prompt = FusedPrompt(prefix_ids, [chunk_ids, ...], question_ids)
    result = engine.prefill(prompt, A3(), ratio=0.15)     # or Naive(), CacheBlend(); engine.full(prompt)
    result.logits                                    # float32 [vocab]: the first generated token's
    engine.greedy(result, 8)                         # the first 8 greedy tokens

Steps (A³, arXiv 2511.17560, as this project implements it):

1. **Chunk KV, computed once** (:meth:`FusionEngine.chunk_kv`): each chunk prefilled on its own
   after the shared prefix, at positions ``P ... P + T - 1``; kept by its token ids.
2. **Position recovery**: in a prompt where the chunk starts at ``P + offset`` its post-RoPE
   keys are rotated by ``offset`` (:meth:`~a2ats_sglang.core.rope.RopeSpec.shift`); values are
   position-free. This equals the chunk's KV computed at that position without cross-chunk
   attention.
3. **Selection**: a method (:mod:`a2ats_sglang.fusion.selection`) picks ``ratio`` of the chunk
   tokens from what it measures on the fused KV (A³: the question's attention over it),
   never in the first chunk, whose fused KV is exact.
4. **Selective recomputation**: the picked tokens and the question go through the whole model
   at their true positions, each attending causally (by position) to the fused KV of the
   tokens not recomputed and to the fresh KV of those recomputed; their new K/V replace the
   fused ones, and the question's last token gives the first token's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch

from a2ats_sglang.core.rope import RopeSpec


@dataclass(frozen=True)
class FusedPrompt:
    """A prompt made of an exact prefix (the shared system prompt, computed as usual), the
    chunks (documents whose KV is reused) and the question (the tail after the last chunk).
    All lists of token ids."""

    prefix: list[int]
    chunks: list[list[int]]
    question: list[int]

    def __post_init__(self):
        if not self.chunks or any(len(c) == 0 for c in self.chunks):
            raise ValueError("a fused prompt needs at least one chunk, and no empty chunk")
        if not self.question:
            raise ValueError("a fused prompt needs a question after its chunks")

    @property
    def ids(self) -> list[int]:
        return self.prefix + [t for c in self.chunks for t in c] + self.question

    @property
    def chunk_starts(self) -> list[int]:
        """Position of each chunk's first token in the prompt."""
        starts, pos = [], len(self.prefix)
        for c in self.chunks:
            starts.append(pos)
            pos += len(c)
        return starts

    @property
    def chunk_end(self) -> int:
        """Position of the question's first token."""
        return len(self.prefix) + sum(map(len, self.chunks))


@dataclass
class Prefilled:
    """A prompt's KV after prefill and its first token's distribution. kv: per layer (K, V)
    float [1, Hkv, T, D] post-RoPE, in prompt order; logits float32 [vocab]; computed: the
    positions whose K/V were computed in this prompt (int64, all of them for a full prefill);
    token_layers: tokens x layers run through the model for this prompt (chunks' own prefills
    not counted: they are computed once and reused)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    computed: torch.Tensor
    token_layers: int
    length: int = field(init=False)

    def __post_init__(self):
        self.length = self.kv[0][0].shape[2]


class _Stop(Exception):
    pass


CAPTURE = "a2ats_capture_queries"  # the attention implementation that records each layer's queries
_captured: list[tuple[torch.Tensor, float]] = []


@cache
def _register_capture() -> list[tuple[torch.Tensor, float]]:
    """Register (once per process) attention ``CAPTURE`` with transformers: SDPA, after
    appending (query float [Hq, Tq, D] post-RoPE, scale) to the list returned."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def capture(module, query, key, value, attention_mask, **kwargs):
        _captured.append((query[0].detach().float(), float(kwargs.get("scaling") or module.scaling)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, capture)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)
    return _captured


class FusionEngine:
    """Chunk-KV fusion on a Hugging Face decoder-only model (any attention implementation;
    the question's attention probabilities are read with eager attention, switched on for
    that pass only). Chunk KV is kept per (prefix, chunk) token ids in :attr:`chunks`."""

    def __init__(self, model):
        cfg = model.config.get_text_config()
        self.model = model.eval()
        self.num_layers = cfg.num_hidden_layers
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rope = RopeSpec.from_hf(model.model.rotary_emb, head_dim)
        self.chunks: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.prefixes: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # -- model calls ------------------------------------------------------------------
    @staticmethod
    def cache_of(past):
        """A transformers ``DynamicCache`` holding ``past`` (per-layer (K, V), or None)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(past or []):
            cache.update(k, v, i)
        return cache

    def run(self, ids, positions, past, mask=None, attentions=False):
        """Run ``ids`` at ``positions`` after the KV ``past`` (list of per-layer (K, V) or
        None) -> (model output, new per-layer (K, V) of past + ids)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).view(1, -1)
        pos = torch.as_tensor(positions, dtype=torch.int64).view(1, -1)
        with torch.no_grad():
            out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache_of(past), attention_mask=mask,
                             use_cache=True, output_attentions=attentions)
        return out, [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _causal_mask(self, query_pos: torch.Tensor, key_pos: torch.Tensor, hidden: torch.Tensor | None = None):
        """Additive float mask [1, 1, Tq, Tk]: query i sees key j iff key_pos[j] <= query_pos[i]
        and j is not in ``hidden`` (bool [Tk])."""
        see = key_pos.view(1, -1) <= query_pos.view(-1, 1)
        if hidden is not None:
            see &= ~hidden.view(1, -1)
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(see.shape, dtype=dtype).masked_fill(~see, torch.finfo(dtype).min)[None, None]

    def prefix_kv(self, prefix: list[int]):
        """The shared prefix's KV, computed once."""
        key = tuple(prefix)
        if key not in self.prefixes:
            self.prefixes[key] = self.run(prefix, range(len(prefix)), None)[1] if prefix else []
        return self.prefixes[key]

    def chunk_kv(self, prefix: list[int], chunk: list[int]):
        """A chunk's own KV (per layer (K, V) [1, Hkv, T, D]), prefilled after ``prefix`` at
        positions len(prefix) ... len(prefix) + T - 1; computed once per (prefix, chunk)."""
        key = (tuple(prefix), tuple(chunk))
        if key not in self.chunks:
            past = self.prefix_kv(prefix)
            kv = self.run(chunk, range(len(prefix), len(prefix) + len(chunk)), past)[1]
            self.chunks[key] = [(k[:, :, len(prefix):], v[:, :, len(prefix):]) for k, v in kv]
        return self.chunks[key]

    # -- the method -------------------------------------------------------------------
    def fused_kv(self, prompt: FusedPrompt):
        """Prefix KV + each chunk's KV moved to its place in ``prompt`` (keys rotated by the
        offset, values as they are): per layer (K, V) [1, Hkv, chunk_end, D]."""
        pre = self.prefix_kv(prompt.prefix)
        base = len(prompt.prefix)
        parts = [self.chunk_kv(prompt.prefix, c) for c in prompt.chunks]
        out = []
        for layer in range(self.num_layers):
            ks = [pre[layer][0]] if pre else []
            vs = [pre[layer][1]] if pre else []
            for start, kv in zip(prompt.chunk_starts, parts):
                k, v = kv[layer]
                ks.append(self.rope.shift(k.transpose(1, 2), start - base).transpose(1, 2) if start != base else k)
                vs.append(v)
            out.append((torch.cat(ks, dim=2), torch.cat(vs, dim=2)))
        return out

    def full(self, prompt: FusedPrompt) -> Prefilled:
        """Exact prefill of the whole prompt (the prefix's KV reused: it is exact)."""
        pre = self.prefix_kv(prompt.prefix)
        n = len(prompt.ids)
        out, kv = self.run(prompt.ids[len(prompt.prefix):], range(len(prompt.prefix), n), pre)
        return Prefilled(kv, out.logits[0, -1].float(), torch.arange(len(prompt.prefix), n),
                         (n - len(prompt.prefix)) * self.num_layers)

    def prefill(self, prompt: FusedPrompt, method, ratio: float) -> Prefilled:
        """Fused prefill of ``prompt``: fused KV, ``method`` picks ``ratio`` of the chunk
        tokens, those and the question recomputed."""
        ctx = self.measurements(prompt)
        return self.recompute(prompt, ctx.fused, method.choose(ctx, ratio), ctx.token_layers)

    def measurements(self, prompt: FusedPrompt) -> "Measurements":
        """What the selection methods measure on ``prompt`` (its fused KV, built here; the rest
        on first use)."""
        return Measurements(self, prompt)

    def recompute(self, prompt: FusedPrompt, fused, chosen: torch.Tensor, token_layers: int = 0) -> Prefilled:
        """Run the chunk tokens at positions ``chosen`` (int64, ascending) and the question
        through the model over ``fused``: each attends by position to the fused KV of the
        tokens not chosen and to the fresh KV of those chosen; their K/V replace the fused ones."""
        ids = torch.tensor(prompt.ids)
        end = prompt.chunk_end
        qpos = torch.arange(end, len(ids))
        pos = torch.cat([chosen, qpos])
        stale = torch.zeros(end, dtype=torch.bool)
        stale[chosen] = True
        key_pos = torch.cat([torch.arange(end), pos])
        mask = self._causal_mask(pos, key_pos, torch.cat([stale, torch.zeros(len(pos), dtype=torch.bool)]))
        out, kv = self.run(ids[pos], pos, fused, mask)
        merged = []
        n = len(chosen)
        for k, v in kv:  # [1, H, end + n + Tq, D]: fused, the chosen tokens' fresh K/V, the question's
            k_, v_ = k[:, :, :end].clone(), v[:, :, :end].clone()
            k_[:, :, chosen], v_[:, :, chosen] = k[:, :, end:end + n], v[:, :, end:end + n]
            merged.append((torch.cat([k_, k[:, :, end + n:]], dim=2), torch.cat([v_, v[:, :, end + n:]], dim=2)))
        return Prefilled(merged, out.logits[0, -1].float(), pos, token_layers + len(pos) * self.num_layers)

    def greedy(self, result: Prefilled, max_new_tokens: int) -> list[int]:
        """The first ``max_new_tokens`` greedy tokens after a prefill (decoded exactly over its KV)."""
        tokens = [int(result.logits.argmax())]
        kv, n = result.kv, result.length
        while len(tokens) < max_new_tokens:
            out, kv = self.run([tokens[-1]], [n], kv)
            n += 1
            tokens.append(int(out.logits[0, -1].argmax()))
        return tokens


class Measurements:
    """One fused prompt's measurements, each computed when asked for
    (:class:`~a2ats_sglang.fusion.selection.FusionContext`); ``token_layers`` counts the
    model computation they ran."""

    def __init__(self, engine: FusionEngine, prompt: FusedPrompt):
        self.engine, self.prompt = engine, prompt
        self.fused = engine.fused_kv(prompt)
        self.chunk_positions = torch.arange(len(prompt.prefix), prompt.chunk_end)
        self.exact = self.chunk_positions < len(prompt.prefix) + len(prompt.chunks[0])  # prefilled where it stands
        self.token_layers = 0  # the measurements' own cost

    def question_attention(self) -> list[torch.Tensor]:
        e, p = self.engine, self.prompt
        impl = e.model.config._attn_implementation
        e.model.set_attn_implementation("eager")  # the only one that returns attention probabilities
        try:
            out, _ = e.run(p.question, range(p.chunk_end, len(p.ids)), self.fused, attentions=True)
        finally:
            e.model.set_attn_implementation(impl)
        self.token_layers += len(p.question) * e.num_layers
        return list(out.attentions)

    def question_queries(self) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        """The question run over the fused KV with the model's own attention, each layer's
        post-RoPE queries (and the softmax scale) read on the way by an attention function
        registered with transformers that records them and calls SDPA."""
        e, p = self.engine, self.prompt
        impl = e.model.config._attn_implementation
        captured = _register_capture()
        e.model.set_attn_implementation(CAPTURE)
        try:
            e.run(p.question, range(p.chunk_end, len(p.ids)), self.fused)
            queries = [q for q, _ in captured]
            scales = {s for _, s in captured}
        finally:
            e.model.set_attn_implementation(impl)
            captured.clear()
        if len(scales) != 1:
            raise ValueError(f"the model's layers use different attention scales {sorted(scales)}")
        self.token_layers += len(p.question) * e.num_layers
        return queries, torch.arange(p.chunk_end, len(p.ids)), scales.pop()

    def keys(self, layer: int) -> torch.Tensor:
        return self.fused[layer][0][0]

    def fused_kv(self, layer: int):
        k, v = self.fused[layer]
        return k[0, :, self.chunk_positions], v[0, :, self.chunk_positions]

    def fresh_kv(self, layer: int):
        """Layers 0 ... ``layer`` of the full prompt (a pre-hook stops the model after them)."""
        e, p = self.engine, self.prompt
        layers = e.model.model.layers

        def stop(module, args, kwargs):
            raise _Stop

        handle = layers[layer + 1].register_forward_pre_hook(stop, with_kwargs=True) if layer + 1 < len(layers) else None
        cache = e.cache_of(e.prefix_kv(p.prefix))
        try:
            with torch.no_grad():
                e.model(input_ids=torch.tensor([p.ids[len(p.prefix):p.chunk_end]]),
                        position_ids=torch.arange(len(p.prefix), p.chunk_end).view(1, -1), past_key_values=cache,
                        use_cache=True)
        except _Stop:
            pass
        finally:
            if handle is not None:
                handle.remove()
        self.token_layers += (p.chunk_end - len(p.prefix)) * (layer + 1)
        got = cache.layers[layer]
        return got.keys[0, :, self.chunk_positions], got.values[0, :, self.chunk_positions]
