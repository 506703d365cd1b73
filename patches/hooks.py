"""Hooks on SGLang 0.5.23 functions, registered from the general plugin.

- ``ServerArgs.add_cli_args`` (AFTER): adds the ``--a2ats-*`` flag group.
- ``ServerArgs.from_cli_args`` (BEFORE): validates the flags and exports them as
  ``SGLANG_A2ATS_*`` so scheduler processes see them; with ``--attention-backend
  a2ats`` it also checks the codebooks file is there, so a bad start fails at once.
- ``handle_attention_backend_compatibility`` (AFTER): the backend's decode runs
  data-dependent top-K on host-sized shapes, so CUDA graphs are turned off for it
  (logged), as SGLang does for ``torch_native``.
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

logger = logging.getLogger(__name__)
_installed = False


def _add_cli_args(result, parser, *args, **kwargs):
    from a2ats_sglang.config import A2ATSConfig

    if not any(a.dest == "a2ats_budget" for a in parser._actions):
        A2ATSConfig.add_cli_args(parser)
    return None


def _from_cli_args(*args, **kwargs):
    from pathlib import Path

    from a2ats_sglang.codebook import default_codebook_path
    from a2ats_sglang.config import A2ATSConfig

    ns = args[-1] if args else kwargs["args"]
    try:
        cfg = A2ATSConfig.from_cli_namespace(ns)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if getattr(ns, "attention_backend", None) == "a2ats" or getattr(ns, "decode_attention_backend", None) == "a2ats":
        path = Path(cfg.codebook) if cfg.codebook else default_codebook_path(ns.model_path)
        if Path(ns.model_path).is_dir() and not path.is_file():
            raise SystemExit(
                f"error: a2ats: codebooks file not found: {path}\n"
                f"  build it with: python -m a2ats_sglang.calibrate --model-path {ns.model_path}"
                f" (or pass --a2ats-codebook FILE)"
            )
    cfg.to_env()
    return None


def _disable_cuda_graph(result, server_args, *args, **kwargs):
    from sglang.srt.arg_groups import attention_hook as ah

    if ah.resolved_view(server_args).attention_backend != "a2ats":
        return None
    cfg = ah.resolving_view(server_args)
    logger.warning("Cuda graph is disabled because of using the a2ats attention backend")
    for phase in (ah.Phase.DECODE, ah.Phase.PREFILL):
        cfg = ah.resolving_view(server_args)
        ah.declare_resolution(
            server_args,
            "a2ats",
            cuda_graph_config=ah.with_phase(cfg.cuda_graph_config, phase, backend=ah.Backend.DISABLED),
        )
    return None


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _from_cli_args, HookType.BEFORE)
    HookRegistry.register(
        "sglang.srt.arg_groups.attention_hook.handle_attention_backend_compatibility", _disable_cuda_graph, HookType.AFTER
    )
