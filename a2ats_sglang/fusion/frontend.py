"""Chunk fusion for SGLang frontend programs (``sgl.function``): a backend that marks the
documents of a library wherever a program's prompt contains them.

SGLang's frontend sends no ``custom_params`` of its own, so the marks are added on the way
out: every ``gen`` whose prompt contains some of ``documents`` (verbatim, set off by
newlines) asks the server to fuse them; a prompt with none goes out unchanged::

    import sglang as sgl
    from a2ats_sglang.fusion.frontend import ChunkFusionEndpoint

    sgl.set_default_backend(ChunkFusionEndpoint("http://localhost:30000", documents=passages))

    @sgl.function
    def answer(s, docs, question):
        s += "Answer from the documents below.\\n\\n" + "".join(d + "\\n\\n" for d in docs)
        s += question + sgl.gen("answer", max_tokens=32)
"""

from __future__ import annotations

import copy

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

from a2ats_sglang.fusion.marks import CHUNKS_KEY, METHOD_KEY, RATIO_KEY


class ChunkFusionEndpoint(RuntimeEndpoint):
    """SGLang's ``RuntimeEndpoint`` whose generations mark the ``documents`` their prompt
    contains (in prompt order) as chunks; ``ratio`` / ``method``: the marks' recompute ratio
    and method (default: the server's)."""

    def __init__(self, base_url: str, documents, ratio: float | None = None, method: str | None = None, **kwargs):
        super().__init__(base_url, **kwargs)
        self.documents = [d for d in dict.fromkeys(documents) if d.strip()]
        self.options = {k: v for k, v in ((RATIO_KEY, ratio), (METHOD_KEY, method)) if v is not None}

    def marks_for(self, text: str) -> dict | None:
        """The ``custom_params`` for a prompt ``text``: the documents it contains, in order."""
        found = sorted((text.find(d), d) for d in self.documents if d in text)
        return {CHUNKS_KEY: [d for _, d in found], **self.options} if found else None

    def _marked(self, s, sampling_params):
        marks = self.marks_for(s.text_)
        if marks is None:
            return sampling_params
        params = copy.copy(sampling_params)
        plain = sampling_params.to_srt_kwargs
        params.to_srt_kwargs = lambda: {**plain(), "custom_params": marks}
        return params

    def generate(self, s, sampling_params):
        return super().generate(s, self._marked(s, sampling_params))

    def generate_stream(self, s, sampling_params):
        return super().generate_stream(s, self._marked(s, sampling_params))
