"""SGLang general plugin (entry point ``sglang.srt.plugins: a2ats``).

SGLang runs :func:`register` in every process it starts (launcher, schedulers,
detokenizer): it adds ``a2ats`` to ``--attention-backend``, registers the
backend factory, and installs the hooks of :mod:`a2ats_sglang.patches.hooks`.
It also registers ``a2ats_dense``: the dense CPU backend a2ats wraps (SGLang's
``torch_native`` decode, with an extend that does not recompute the cached prefix's
rows), a fair dense baseline for long contexts on CPU.
"""

from __future__ import annotations

BACKEND_NAME = "a2ats"
DENSE_BACKEND_NAME = "a2ats_dense"


def register() -> None:
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    from a2ats_sglang.patches import hooks

    add_attention_backend_choices([BACKEND_NAME, DENSE_BACKEND_NAME])

    @register_attention_backend(BACKEND_NAME)
    def create(model_runner):
        from a2ats_sglang.backend.shell import create_a2ats_backend

        return create_a2ats_backend(model_runner)

    @register_attention_backend(DENSE_BACKEND_NAME)
    def create_dense(model_runner):
        from a2ats_sglang.backend.dense import CpuDenseAttnBackend

        if str(model_runner.device) != "cpu":
            raise ValueError(f"{DENSE_BACKEND_NAME} is a CPU backend; on {model_runner.device} use triton or flashinfer")
        return CpuDenseAttnBackend(model_runner)

    hooks.install()
