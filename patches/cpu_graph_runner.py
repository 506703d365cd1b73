"""SGLang's CPU graph runner on the project's CPU platform (``--enable-torch-compile`` with
``--device cpu``): the decode step of each batch-size bucket under ``torch.compile``.

One difference from SGLang's runner: a configuration that cannot be captured (one the
runner refuses, such as LoRA or data parallelism, an attention backend without its
hooks, a kernel choice a2ats cannot capture, or a compile error) is logged and served
eagerly instead of stopping the server. The fakes of ``sgl_kernel``'s CPU operators,
missing from the PyPI (CUDA) build, are handled by a hook (:mod:`.hooks`).
"""

from __future__ import annotations

import logging

from sglang.srt.model_executor.cpu_graph_runner import CPUGraphRunner

logger = logging.getLogger(__name__)


class EagerFallbackCPUGraphRunner(CPUGraphRunner):
    def __init__(self, model_runner):
        try:
            super().__init__(model_runner)
            self.failure: str | None = None
        except Exception as e:  # anything the capture raises: the server still serves, eagerly
            self.failure = f"{type(e).__name__}: {e}".splitlines()[0]
            self.graphs, self.capture_bs = {}, []
            logger.warning("CPU graph capture failed (%s); decode runs eagerly", self.failure)

    def can_run_graph(self, forward_batch) -> bool:
        return self.failure is None and super().can_run_graph(forward_batch)
