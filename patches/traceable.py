"""Stand-ins, traceable by ``torch.compile``, for SGLang 0.5.23 classes that the decode
step builds at every layer (registered as class REPLACE hooks by :mod:`.hooks`).

SGLang's CPU graph runner compiles the whole decode step, but its layer boundaries
record each attention and MLP output in a ``msgspec.Struct``
(``layer_boundary.residual.stream.Contribution``), which TorchDynamo cannot construct
("Unsupported object.__new__ user-defined class construction ... object.__new__(Contribution)
is not safe"): the step breaks into pieces around every layer and ran slower than eager
(BENCHMARKS.md). A plain class with the same fields and methods traces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class Contribution:
    """``sglang.srt.layers.layer_boundary.residual.stream.Contribution`` as a plain class:
    a producer's output ``value`` (tensor or None), its residual ``update`` and the
    outstanding completion ``owed`` (None when complete)."""

    __slots__ = ("value", "update", "owed")

    def __init__(self, value, update, owed=None):
        self.value, self.update, self.owed = value, update, owed

    def for_boundary(self):
        from sglang.srt.layers.layer_boundary.output import DeferredFinalize, UnreducedOutput

        if isinstance(self.owed, (UnreducedOutput, DeferredFinalize)):
            return self.owed
        return self.value

    def complete(self):
        from sglang.srt.layers.layer_boundary.residual.stream import DeclaredSum

        if isinstance(self.owed, DeclaredSum):
            value = self.owed.complete(self.value)
        elif self.owed is not None:
            value = self.owed.complete()
        else:
            return self.value
        self.value, self.owed = value, None
        return value

    def release(self):
        self.value = None
        self.owed = None
        self.update = None


@dataclass(frozen=True)
class ExitDecision:
    """``sglang.srt.layers.layer_boundary.exit.ExitDecision`` as a frozen dataclass: one
    decision for an FFN output, made before compute runs."""

    defer_moe_finalize: bool
    sum_in_reduce_scatter: bool
    complete: Callable
