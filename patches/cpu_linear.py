"""The model's float32 linear layers on the a2ats CPU platform, with their weights packed
once by oneDNN.

SGLang computes an unquantized linear layer as ``F.linear`` and the logits as
``hidden @ lm_head.weight.T``; on CPU both go to MKL's sgemm, which at a batch of more
than one token re-packs every weight panel on every call (BENCHMARKS.md §23: 27 % of a
captured batch-4 decode step in ``mkl_blas_def_sgemm_scopy_down16_bdz``). Here each such
weight is reordered once, after loading (:meth:`A2ATSCpuPlatform.post_load_model`), into
oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``) and multiplied with
``torch.ops.mkldnn._linear_pointwise``. The plain
weight of a linear layer is then released; an lm_head whose weight is shared with the
token embedding keeps it, for the embedding lookups, beside the packed copy.

Opt-in (``A2ATS_CPU_LINEAR=packed``); the default is SGLang's own product. Served on this
project's VMs (BENCHMARKS.md §24) packing helped only eager batches of several requests
(1.15x at 2K x 4) and cost eager batch 1 (0.80x) and every captured step (0.58-0.88x under
SGLang's CPU graph runner, where inductor already handles the plain ``F.linear``).

Scope: float32 weights on CPU under SGLang's unquantized methods (``UnquantizedLinearMethod``,
and ``UnquantizedEmbeddingMethod`` for the lm_head); any other dtype or quantization is left
as SGLang computes it. A packed layer's weights cannot be updated in place
(``/update_weights_from_*``).

Under ``torch.compile`` (SGLang's CPU graph runner) the product is the custom op
``torch.ops.a2ats.packed_linear``, opaque to the compiler (inductor lowers oneDNN's op only
for weights it froze itself), which finds the packed weight by its index in this process's
:data:`_PACKED`; eagerly it is oneDNN's op directly.
"""

from __future__ import annotations

import logging
import os

import torch
from sglang.srt.layers.quantization.unquant import UnquantizedEmbeddingMethod, UnquantizedLinearMethod
from torch import Tensor

logger = logging.getLogger(__name__)

MODE_ENV = "A2ATS_CPU_LINEAR"
MODES = ("torch", "packed")  # the first is the default

_PACKED: list[Tensor] = []  # this process's packed weights (oneDNN opaque tensors), indexed by PackedWeight.key


def mode() -> str:
    """``A2ATS_CPU_LINEAR``: ``torch`` (unset) or ``packed``; anything else stops the load."""
    value = os.environ.get(MODE_ENV, MODES[0])
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def _packed_linear(x: Tensor, key: int, out_features: int, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[key], bias, "none", [], "")


if hasattr(torch.ops.a2ats, "packed_linear"):  # registered by an earlier import of this module
    _packed_linear_op = torch.ops.a2ats.packed_linear.default
else:
    _packed_linear_op = torch.library.custom_op("a2ats::packed_linear", _packed_linear, mutates_args=())
    _packed_linear_op.register_fake(lambda x, key, out_features, bias: x.new_empty((*x.shape[:-1], out_features)))


class PackedWeight:
    """One layer's weight [N, K] float32 in oneDNN's layout, registered in :data:`_PACKED`."""

    def __init__(self, weight: Tensor):
        self.key = len(_PACKED)
        self.out_features = weight.shape[0]
        _PACKED.append(torch.ops.mkldnn._reorder_linear_weight(weight.detach()))

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x [..., K] float32 -> [..., N] float32 (``x @ weight.T + bias``)."""
        if torch.compiler.is_compiling():
            return _packed_linear_op(x, self.key, self.out_features, bias)
        return _packed_linear(x, self.key, self.out_features, bias)


def _packable(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, Tensor) and w.dim() == 2 and w.dtype == torch.float32 and w.device.type == "cpu"


def _shares_weight(model: torch.nn.Module, lm_head: torch.nn.Module) -> bool:
    """Whether ``lm_head`` is also another of ``model``'s modules (SGLang ties an embedding by
    assigning it as the lm_head) or its weight is another module's parameter."""
    if sum(m is lm_head for _, m in model.named_modules(remove_duplicate=False)) > 1:
        return True
    ptr = lm_head.weight.data_ptr()
    return any(p.data_ptr() == ptr for m in model.modules() if m is not lm_head for p in m.parameters(recurse=False))


def _release(module: torch.nn.Module) -> None:
    """Free the plain weight; a zero-stride stand-in keeps its shape and dtype (a write into
    it raises)."""
    w = module.weight
    module.weight = torch.nn.Parameter(torch.zeros((), dtype=w.dtype).expand(w.shape), requires_grad=False)


class PackedLinearMethod(UnquantizedLinearMethod):
    """SGLang's unquantized linear method with the layer's weight packed by oneDNN."""

    def __init__(self, packed: PackedWeight):
        super().__init__()
        self.packed = packed

    def apply(self, layer, x, bias=None):
        return self.packed(x, bias)


class PackedLMHeadMethod(UnquantizedEmbeddingMethod):
    """SGLang's unquantized embedding method for an lm_head: the logits with the packed weight
    (SGLang's logits processor calls ``apply`` of a method it does not know as unquantized),
    the lookups of a tied embedding from the plain weight."""

    def __init__(self, packed: PackedWeight):
        super().__init__()
        self.packed = packed

    def apply(self, layer, x, bias=None):
        return self.packed(x, bias)


def pack_model(model: torch.nn.Module) -> None:
    """Pack, in place, the float32 CPU weights of ``model``'s unquantized linear layers and of
    its ``lm_head`` when ``A2ATS_CPU_LINEAR=packed``; logged once."""
    if mode() != "packed":
        return
    layers = [m for m in model.modules()
              if type(getattr(m, "quant_method", None)) is UnquantizedLinearMethod and _packable(m)]
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and not (type(getattr(lm_head, "quant_method", None)) is UnquantizedEmbeddingMethod
                                    and _packable(lm_head)):
        lm_head = None
    tied = lm_head is not None and _shares_weight(model, lm_head)
    for m in layers:
        m.quant_method = PackedLinearMethod(PackedWeight(m.weight))
        _release(m)
    if lm_head is not None:
        lm_head.quant_method = PackedLMHeadMethod(PackedWeight(lm_head.weight))
        if not tied:
            _release(lm_head)
    packed_bytes = sum(m.quant_method.packed.out_features * m.weight.shape[1] * 4 for m in layers)
    logger.info("a2ats CPU platform: %d linear layers packed by oneDNN (%.0f MB); lm_head %s", len(layers),
                packed_bytes / 2**20, "not packed" if lm_head is None else
                "packed beside the token embedding it shares" if tied else "packed")
