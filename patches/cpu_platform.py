"""Opt-in CPU platform for SGLang (entry point ``sglang.srt.platforms: a2ats_cpu``).

Selected only with ``SGLANG_PLATFORM=a2ats_cpu``; in auto-discovery it returns
None, so it never takes over a GPU machine. With it, ``--device cpu`` runs from
the PyPI wheels (whose own CPU engine needs a source build of sgl-kernel).
"""

from __future__ import annotations

import os

NAME = "a2ats_cpu"


def activate() -> str | None:
    if os.environ.get("SGLANG_PLATFORM") != NAME:
        return None
    return "a2ats_sglang.patches.cpu_platform_impl.A2ATSCpuPlatform"
