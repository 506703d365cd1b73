"""Hooks on SGLang 0.5.23 functions, registered from the general plugin.

- ``ServerArgs.add_cli_args`` (AFTER): adds the ``--a2ats-*`` flag group.
- ``ServerArgs.from_cli_args`` (BEFORE): validates the flags and exports them as
  ``SGLANG_A2ATS_*`` so scheduler processes see them; with ``--attention-backend
  a2ats`` it also refuses options (:func:`unsupported_options`) and models (MLA) a2ats cannot
  serve with and checks the codebooks file is there, so a bad start fails at once.
- ``handle_attention_backend_compatibility`` (AFTER): CUDA graphs are turned off for the
  backend (logged), as SGLang does for ``torch_native``: its CUDA-graph hooks have never run
  on a GPU. On ``--device cpu`` SGLang's CPU graph runner calls the backend's CPU graph hooks
  instead, which it has.
- ``cpu_graph_runner.register_fake_ops`` (AROUND): registers the torch.compile fakes of the
  ``sgl_kernel`` CPU operators that exist in this build only (the PyPI build has none).
- ``numa_utils.init_threads_binding`` (AROUND): on a machine with fewer NUMA nodes than a
  server's ranks (``--tp-size``/``--dp-size`` > 1 on one node), splits the CPUs evenly
  between the ranks instead of stopping (unless ``SGLANG_CPU_OMP_THREADS_BIND`` is set).
- ``layer_boundary.residual.stream.Contribution`` and ``layer_boundary.exit.ExitDecision``
  (class REPLACE): plain-class stand-ins TorchDynamo can construct (:mod:`.traceable`), so a
  compiled decode step does not break at every layer boundary.
- With ``--a2ats-offload`` (scheduler processes), on SGLang's KV cache configurator:
  ``_resolve_kv_pool_class`` (AFTER) gives the MHA pool class
  :class:`~a2ats_sglang.offload.host_pool.HostKVPool`; ``_profile_available_bytes`` (AFTER)
  turns the device's KV budget into the offload pool's token count (codes and resident
  windows on the device, full K/V on the host: :class:`~a2ats_sglang.offload.host_pool.OffloadSizing`),
  expressed as the byte budget SGLang's own dense sizing divides back into that count;
  ``resolve_max_num_reqs`` (AFTER) caps concurrent requests at the resident windows reserved.
- Chunk fusion (:mod:`a2ats_sglang.fusion`): ``TokenizerManager.generate_request`` (AROUND)
  admits requests with chunk marks (:mod:`~a2ats_sglang.fusion.admission`; a request without
  marks passes straight through); ``ForwardBatch.init_new`` (AFTER) cuts an extend batch with
  fused requests down to the tokens they compute (:class:`~a2ats_sglang.fusion.served.FusionPlanner`).
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

    from transformers import AutoConfig

    from a2ats_sglang.config import A2ATSConfig
    from a2ats_sglang.core.codebook import CodebookMismatch, check_attention_kind, default_codebook_path

    ns = args[-1] if args else kwargs["args"]
    try:
        cfg = A2ATSConfig.from_cli_namespace(ns)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.offload and (getattr(ns, "attention_backend", None) != "a2ats" or
                        getattr(ns, "prefill_attention_backend", None) not in (None, "a2ats") or
                        getattr(ns, "decode_attention_backend", None) not in (None, "a2ats")):
        raise SystemExit("error: --a2ats-offload needs --attention-backend a2ats for prefill and decode "
                         "(the KV pool lives in host memory, which only a2ats reads)")
    if getattr(ns, "attention_backend", None) == "a2ats" or getattr(ns, "decode_attention_backend", None) == "a2ats":
        refused = unsupported_options(ns)
        if refused:
            raise SystemExit("error: a2ats: " + "; ".join(refused))
        if (Path(ns.model_path) / "config.json").is_file():  # a model a2ats cannot serve stops before its weights load
            try:
                hf = AutoConfig.from_pretrained(ns.model_path, trust_remote_code=bool(getattr(ns, "trust_remote_code", 0)))
            except (OSError, ValueError):  # SGLang reports a config it cannot read itself
                hf = None
            try:
                check_attention_kind(hf)
            except CodebookMismatch as e:
                raise SystemExit(f"error: {e}") from None
        path = Path(cfg.codebook) if cfg.codebook else default_codebook_path(ns.model_path)
        if Path(ns.model_path).is_dir() and not path.is_file():
            raise SystemExit(
                f"error: a2ats: codebooks file not found: {path}\n"
                f"  build it with: python -m a2ats_sglang.calibration --model-path {ns.model_path}"
                f" (or pass --a2ats-codebook FILE)"
            )
    if cfg.chunk_fusion:
        refused = fusion_refusals(ns, cfg)
        if refused:
            raise SystemExit("error: --a2ats-chunk-fusion: " + "; ".join(refused))
    cfg.to_env()
    return None


def fusion_refusals(ns, cfg) -> list[str]:
    """The server options given in ``ns`` that chunk fusion cannot serve with, each with the reason."""
    out = []
    if getattr(ns, "attention_backend", None) != "a2ats" or getattr(ns, "prefill_attention_backend", None) not in (
            None, "a2ats"):
        out.append("needs --attention-backend a2ats (a2ats attends the fused requests' extends by position)")
    for flag in ("tp_size", "dp_size", "pp_size"):
        if int(getattr(ns, flag, 1) or 1) > 1:
            out.append(f"--{flag.replace('_', '-')} {getattr(ns, flag)}: one rank only (each rank would measure "
                       f"the question's attention over its own heads and choose different tokens)")
    if getattr(ns, "disable_radix_cache", False):
        out.append("needs the radix cache (chunks' KV is found there)")
    if getattr(ns, "enable_mixed_chunk", False):
        out.append("not with --enable-mixed-chunk (an extend batch carrying decode tokens)")
    if getattr(ns, "device", None) not in ("cpu",):
        out.append("runs on --device cpu only so far (its path has not run on a GPU)")
    return out


def unsupported_options(ns) -> list[str]:
    """The SGLang options given in ``ns`` that a2ats cannot serve with, each with the reason."""
    out = []
    if getattr(ns, "enable_hierarchical_cache", False):
        out.append("--enable-hierarchical-cache moves KV pages between device and host behind the attention backend, "
                   "so the codes a2ats keeps per KV slot would go stale; --a2ats-offload keeps the full KV in host "
                   "memory instead")
    dtype = str(getattr(ns, "kv_cache_dtype", "auto") or "auto")
    if dtype not in ("auto", "bfloat16", "bf16", "float16", "fp16", "float32"):
        out.append(f"--kv-cache-dtype {dtype}: a2ats's kernels attend float32, bfloat16 and float16 KV caches only")
    if getattr(ns, "enable_lora", False) and getattr(ns, "device", None) == "cpu":
        out.append("--enable-lora on --device cpu: SGLang's LoRA layers pin host memory (sglang/srt/lora/layers.py), "
                   "which needs a CUDA driver, so SGLang cannot serve LoRA on this device with any backend")
    if getattr(ns, "speculative_algorithm", None):
        out.append(f"--speculative-algorithm {ns.speculative_algorithm}: the verify pass attends a tree of draft "
                   f"tokens, which a2ats's per-request retrieval does not plan")
    return out


def _disable_cuda_graph(result, server_args, *args, **kwargs):
    from sglang.srt.arg_groups import attention_hook as ah

    if ah.resolved_view(server_args).attention_backend != "a2ats" or server_args.device == "cpu":
        return None  # on CPU, SGLang's graph runner does not consult this (it calls the backend's CPU graph hooks)
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


_offload_requests: dict[int, int] = {}  # configurator -> resident windows reserved (it has __slots__)


def _offload_config():
    from a2ats_sglang.config import A2ATSConfig

    cfg = A2ATSConfig.from_env()
    return cfg if cfg.offload else None


def _host_pool_class(result, configurator, *args, kind=None, **kwargs):
    if kind == "mha" and _offload_config() is not None:
        from a2ats_sglang.offload.host_pool import HostKVPool

        return HostKVPool
    return None


def _offload_budget(result, configurator, *args, **kwargs):
    cfg = _offload_config()
    if cfg is None:
        return None
    from sglang.srt.runtime_context import get_parallel, get_schedule

    from a2ats_sglang.offload.host_pool import OffloadSizing, host_kv_bytes

    sizing = OffloadSizing.of(configurator, cfg.sinks, cfg.window)
    requests = get_schedule().max_running_requests or sizing.default_requests(result)
    p = get_parallel()
    host = host_kv_bytes(cfg.host_kv_gb, configurator.device, p.dp_size * p.tp_size * p.pp_size)
    tokens = sizing.capacity(result, requests + 1, host)  # SGLang's request table has one padding row
    _offload_requests[id(configurator)] = requests
    logger.info(
        "a2ats offload: %d tokens of KV in host memory (%d B/token%s); on the device %d B/token of codes and "
        "%d resident windows of %.2f MiB (device KV budget %.2f GiB)",
        tokens, sizing.dense_cell, f", {host / 2**30:.2f} GiB of host memory for it" if host is not None else ", shared with the device",
        sizing.code_cell, requests, sizing.window_cell / 2**20, result / 2**30,
    )
    return tokens * sizing.dense_cell


def _cap_requests(result, configurator, *args, **kwargs):
    cap = _offload_requests.get(id(configurator))
    return cap if cap is not None and result > cap else None


def _fake_ops_of_present_kernels(original, *args, **kwargs):
    """SGLang's CPU graph runner registers torch.compile fakes for ~50 ``sgl_kernel`` CPU ops
    and stops on the first one missing ("operator sgl_kernel::shm_allreduce does not exist":
    the PyPI ``sgl_kernel`` is the CUDA build). Register those that exist; a model that
    called a missing one could not run eagerly either."""
    import torch
    from sglang.srt.model_executor import cpu_graph_runner as runner

    strict = runner.register_cpu_compile_fake

    def present_only(op_name: str):
        try:
            getattr(torch.ops.sgl_kernel, op_name)
        except (AttributeError, RuntimeError):
            return lambda fake: fake
        return strict(op_name)

    runner.register_cpu_compile_fake = present_only
    try:
        return original(*args, **kwargs)
    finally:
        runner.register_cpu_compile_fake = strict


def _spread_ranks_over_cpus(original, *args, **kwargs):
    """SGLang binds each CPU rank to a NUMA node and stops when a server has more ranks than
    nodes unless ``SGLANG_CPU_OMP_THREADS_BIND`` names each rank's cores (one node here, so
    any ``--tp-size``/``--dp-size`` above 1): without it, every rank takes the same even split
    of this machine's CPUs (:func:`~a2ats_sglang.offload.cpus.cpu_shares`), logged."""
    import os

    from sglang.srt.utils import numa_utils

    from a2ats_sglang.offload.cpus import CPU_BIND_ENV, cpu_shares, format_cpu_list

    world = kwargs.get("world_size", 1)
    if os.environ.get(CPU_BIND_ENV, "all") == "all" and world > len(numa_utils.get_cpu_ids_by_node()):
        shares = cpu_shares(sorted(os.sched_getaffinity(0)), world)
        os.environ[CPU_BIND_ENV] = "|".join(map(format_cpu_list, shares))
        logger.info("a2ats CPU platform: %d ranks on one NUMA node, %s=%s", world, CPU_BIND_ENV,
                    os.environ[CPU_BIND_ENV])
    return original(*args, **kwargs)


_fusion_cfg = None


def _fusion_config():
    """This process's options (read once: the launcher exported them before SGLang's
    managers start)."""
    global _fusion_cfg
    if _fusion_cfg is None:
        from a2ats_sglang.config import A2ATSConfig

        _fusion_cfg = A2ATSConfig.from_env()
    return _fusion_cfg


def _fusion_admission(original, manager, obj, request=None):
    from a2ats_sglang.fusion.marks import names_fusion

    params = getattr(obj, "sampling_params", None)
    if not any(isinstance(p, dict) and names_fusion(p.get("custom_params"))
               for p in (params if isinstance(params, list) else [params])):
        return original(manager, obj, request)
    from a2ats_sglang.fusion.admission import fused_generate

    cfg = _fusion_config()
    return fused_generate(original, manager, obj, request, cfg.fusion_ratio, cfg.chunk_fusion)


def _fuse_chunks(result, cls, batch, model_runner, *args, **kwargs):
    from a2ats_sglang.fusion.marks import LAYOUT_KEY

    if not result.forward_mode.is_extend() or not any(
            LAYOUT_KEY in (r.sampling_params.custom_params or ()) for r in batch.reqs):
        return None
    from a2ats_sglang.fusion.served import planner_for

    planner_for(model_runner).apply(result, batch)
    translator = model_runner.kv_index_translator
    translator.own_plan(result).bind(result, translator)  # the write ids are the kept tokens' now
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
    HookRegistry.register("sglang.srt.model_executor.cpu_graph_runner.register_fake_ops", _fake_ops_of_present_kernels,
                          HookType.AROUND)
    HookRegistry.register("sglang.srt.utils.numa_utils.init_threads_binding", _spread_ranks_over_cpus, HookType.AROUND)
    from a2ats_sglang.patches import traceable

    boundary = "sglang.srt.layers.layer_boundary."
    HookRegistry.register(boundary + "residual.stream.Contribution", traceable.Contribution, HookType.REPLACE)
    HookRegistry.register(boundary + "exit.ExitDecision", traceable.ExitDecision, HookType.REPLACE)
    configurator = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator."
    HookRegistry.register(configurator + "_resolve_kv_pool_class", _host_pool_class, HookType.AFTER)
    HookRegistry.register(configurator + "_profile_available_bytes", _offload_budget, HookType.AFTER)
    HookRegistry.register(configurator + "resolve_max_num_reqs", _cap_requests, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request", _fusion_admission,
                          HookType.AROUND)
    HookRegistry.register("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", _fuse_chunks,
                          HookType.AFTER)
