"""Which of this machine's CPUs are a rank's share (where its CPU attention worker runs),
in SGLang's bind syntax."""

from __future__ import annotations

import os

CPU_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"  # SGLang's per-rank CPU lists: "0-3|4-7", or "all"


def cpu_shares(cpus: list[int], ranks: int) -> list[list[int]]:
    """Each of ``ranks`` ranks an equal contiguous share of ``cpus`` (the first ones one more
    where they do not divide), or one CPU each, shared round-robin, when there are more ranks
    than CPUs."""
    if ranks > len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(ranks)]
    base, extra = divmod(len(cpus), ranks)
    bounds = [i * base + min(i, extra) for i in range(ranks + 1)]
    return [cpus[bounds[i]:bounds[i + 1]] for i in range(ranks)]


def format_cpu_list(cpus: list[int]) -> str:
    """``[0, 1, 2]`` -> ``"0-2"``, ``[0, 2]`` -> ``"0,2"`` (SGLang's bind syntax)."""
    contiguous = len(cpus) > 1 and cpus[-1] - cpus[0] == len(cpus) - 1
    return f"{cpus[0]}-{cpus[-1]}" if contiguous else ",".join(map(str, cpus))


def parse_cpu_list(text: str) -> list[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]``; raises ValueError on anything else."""
    cpus = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return cpus


def rank_cpus(index: int, ranks: int, bind: str | None = None) -> list[int]:
    """The CPUs of the rank at ``index`` (SGLang's ``gpu_id``) of ``ranks`` on this machine:
    its entry of ``bind`` (default ``$SGLANG_CPU_OMP_THREADS_BIND``) where that names each
    rank's CPUs, else an even share of this process's CPUs."""
    bind = os.environ.get(CPU_BIND_ENV, "all") if bind is None else bind
    if bind != "all":
        entries = bind.split("|")
        if not 0 <= index < len(entries):
            raise ValueError(f"{CPU_BIND_ENV}={bind!r} names {len(entries)} ranks' CPUs, not rank {index}'s")
        return parse_cpu_list(entries[index])
    return cpu_shares(sorted(os.sched_getaffinity(0)), ranks)[index % ranks]
