"""Chunk fusion at the server's front (the tokenizer manager's process), around SGLang's
``TokenizerManager.generate_request``, so ``/generate`` and the OpenAI-compatible completions
and chat APIs take the same marks (:mod:`a2ats_sglang.fusion.marks`).

A marked request is checked and tokenized here, its chunks found in its tokens, and then sent
as up to three kinds of ordinary SGLang requests, in order:

1. for each chunk, ``prefix + chunk`` with ``max_new_tokens=0`` (a prefill whose KV SGLang's
   radix tree keeps: computed the first time, a cache hit afterwards), concurrently;
2. for A³ at a ratio strictly between 0 and 1, the scoring pass: the whole prompt, nothing
   recomputed, ``max_new_tokens=0``, which measures the question's attention;
3. the request itself, with its layout and the fused radix namespace, whose replies are the
   client's.

A request with a single chunk is sent plain (step 3 without fusion): right after the shared
prefix the chunk sits where it is prefilled alone, so its fused KV would be the full prefill's,
which SGLang's radix cache already reuses. A request without marks goes straight to SGLang.
Bad marks raise :class:`~.marks.FusionMarkError` (a ``ValueError``: SGLang answers HTTP 400
with its message) before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from a2ats_sglang.fusion.marks import CLIENT_KEYS, EXTRA_KEY_TAG, ChunkMarks, FusedLayout, FusionMarkError, locate_chunks

logger = logging.getLogger(__name__)


def marks_of(obj, default_ratio: float) -> ChunkMarks | None:
    """The chunk marks of a ``GenerateReqInput`` (None without marks)."""
    params = obj.sampling_params
    if isinstance(params, list):
        if any(ChunkMarks.of(p.get("custom_params") if isinstance(p, dict) else None, default_ratio) for p in params):
            raise FusionMarkError("chunk fusion takes one prompt per request, not a batch")
        return None
    return ChunkMarks.of(params.get("custom_params") if isinstance(params, dict) else None, default_ratio)


def fused_extra_key(extra_key: str | None, marks: ChunkMarks) -> str:
    """The radix namespace of a fused request's KV: the client's, tagged with method and ratio
    (fused KV is approximate: it may be shared only by requests fused the same way)."""
    return f"{extra_key or ''}{EXTRA_KEY_TAG}/{marks.method}/{marks.ratio:.6f}\x1f"


async def fused_generate(original, manager, obj, request, default_ratio: float, fusion_enabled: bool):
    """``TokenizerManager.generate_request`` for a request with chunk marks (see the module);
    ``default_ratio``: the server's recompute ratio."""
    marks = marks_of(obj, default_ratio)  # raises for a2ats_* keys that are not marks
    if not fusion_enabled:
        raise FusionMarkError("this server does not fuse chunks (custom_params.a2ats_chunks): start it with "
                              "--attention-backend a2ats --a2ats-chunk-fusion")
    ids = await _prompt_ids(manager, obj)
    context = manager.context_len
    if len(ids) >= context:
        raise FusionMarkError(f"the prompt ({len(ids)} tokens) does not fit the model's context of {context} tokens")
    params = dict(obj.sampling_params or {})
    if int(params.get("n", 1) or 1) != 1:
        raise FusionMarkError("chunk fusion serves one completion per request (n = 1)")
    if obj.return_logprob and obj.logprob_start_len not in (None, -1):
        raise FusionMarkError("chunk fusion does not return prompt logprobs (logprob_start_len must be -1): the "
                              "reused chunk tokens are not computed")
    chunks = [manager.tokenizer.encode(c, add_special_tokens=False) for c in marks.chunks]
    spans = locate_chunks(ids, chunks)
    custom = {k: v for k, v in (params.get("custom_params") or {}).items() if k not in CLIENT_KEYS}
    obj.input_ids, obj.text = ids, None
    if len(spans) == 1:  # right after the prefix, where it is prefilled alone: its KV is the full prefill's
        logger.info("a2ats fusion: request %s: one chunk, served as a plain request (SGLang's radix cache reuses "
                    "the prefix and chunk exactly)", obj.rid)
        obj.sampling_params = {**params, "custom_params": custom or None}
        async for reply in original(manager, obj, request):
            yield reply
        return
    prefix = ids[:spans[0][0]]
    base = {"lora_path": obj.lora_path, "extra_key": obj.extra_key, "cache_salt": obj.cache_salt}
    await asyncio.gather(*(_prefill(original, manager, prefix + ids[s:e], **base) for s, e in spans))
    fusion_id = uuid.uuid4().hex
    namespace = {**base, "extra_key": fused_extra_key(obj.extra_key, marks)}
    if marks.needs_scoring:
        layout = FusedLayout(tuple(spans), marks.ratio, marks.method, True, fusion_id)
        rid = f"{obj.rid}.a2ats-score" if isinstance(obj.rid, str) else None  # named after the client's request
        await _prefill(original, manager, ids, custom_params=layout.to_params(), rid=rid, **namespace)
    layout = FusedLayout(tuple(spans), marks.ratio, marks.method, False, fusion_id)
    obj.sampling_params = {**params, "custom_params": {**custom, **layout.to_params()}}
    obj.extra_key = namespace["extra_key"]
    async for reply in original(manager, obj, request):
        yield reply


async def _prompt_ids(manager, obj) -> list[int]:
    """The prompt's token ids, as SGLang would tokenize its text."""
    if obj.input_ids is not None:
        ids = obj.input_ids
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise FusionMarkError("chunk fusion takes one prompt per request (input_ids: a list of token ids)")
        return list(ids)
    if not isinstance(obj.text, str):
        raise FusionMarkError("chunk fusion takes one prompt per request (text: a string)")
    return list((await manager._tokenize_texts(obj.text))[0])


async def _prefill(original, manager, ids: list[int], custom_params: dict | None = None, **fields) -> None:
    """One prefill-only request through SGLang (``max_new_tokens = 0``), its replies dropped."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    sampling = {"max_new_tokens": 0}
    if custom_params:
        sampling["custom_params"] = custom_params
    obj = GenerateReqInput(input_ids=list(ids), sampling_params=sampling, **fields)
    async for _ in original(manager, obj, None):
        pass
