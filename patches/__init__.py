"""How SGLang is extended without editing its source (installed as ``a2ats_sglang.patches``).

- ``hooks``: plugin hooks through ``sglang.srt.plugins.hook_registry.HookRegistry``:
  the ``--a2ats-*`` flags, and turning CUDA graphs off for this backend.
- ``cpu_platform``: an opt-in out-of-tree platform (``SGLANG_PLATFORM=a2ats_cpu``)
  so ``--device cpu`` works with the PyPI wheels.
"""
