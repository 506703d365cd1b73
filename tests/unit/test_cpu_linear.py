"""The CPU platform's packed linear layers (:mod:`a2ats_sglang.patches.cpu_linear`, opt-in) on SGLang's
own layer classes: the same products as SGLang's unquantized methods, eagerly and under
torch.compile, the plain weights released except a tied embedding's, other dtypes untouched."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.runtime_context import get_parallel

from a2ats_sglang.patches import cpu_linear

HIDDEN, INTER, VOCAB = 64, 96, 300
# what LogitsProcessor._compute_lm_head reads of its processor (built from a model config in a server)
LOGITS_OPTIONS = SimpleNamespace(use_fp32_lm_head=False, use_fp32_lm_head_output=False, rl_on_policy_target=None)


class TinyModel(torch.nn.Module):
    """The shapes SGLang's models have: linear layers under a ``model`` and an ``lm_head``,
    tied (the embedding module itself, as SGLang ties it) or not."""

    def __init__(self, tied: bool, dtype=torch.float32):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(VOCAB, HIDDEN, params_dtype=dtype)
        self.model.up = ReplicatedLinear(HIDDEN, INTER, bias=True, params_dtype=dtype)
        self.model.down = ReplicatedLinear(INTER, HIDDEN, bias=False, params_dtype=dtype)
        self.lm_head = self.model.embed_tokens if tied else ParallelLMHead(VOCAB, HIDDEN, params_dtype=dtype)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.2)

    def forward(self, ids):
        x = self.model.embed_tokens.quant_method.embedding(self.model.embed_tokens, ids)
        x = self.model.down(F.silu(self.model.up(x)[0]))[0]
        return LogitsProcessor._compute_lm_head(LOGITS_OPTIONS, x, self.lm_head)  # SGLang's dispatch of the logits


@pytest.fixture(autouse=True)
def _parallel():
    with get_parallel().override(tp_rank=0, tp_size=1, attn_tp_rank=0, attn_tp_size=1), torch.no_grad():
        yield


@pytest.mark.parametrize("tied", [True, False])
def test_packed_model_computes_what_sglangs_unquantized_methods_compute(tied, monkeypatch):
    monkeypatch.setenv(cpu_linear.MODE_ENV, "packed")
    torch.manual_seed(0)
    model = TinyModel(tied)
    ids = {m: torch.randint(0, VOCAB, (m,)) for m in (1, 4, 257)}
    expected = {m: model(i) for m, i in ids.items()}
    embed_before = model.model.embed_tokens.weight.clone()
    cpu_linear.pack_model(model)
    assert isinstance(model.model.up.quant_method, cpu_linear.PackedLinearMethod)
    assert isinstance(model.lm_head.quant_method, cpu_linear.PackedLMHeadMethod)
    for m, i in ids.items():
        torch.testing.assert_close(model(i), expected[m], rtol=1e-4, atol=1e-4)
    # the linear layers' plain weights are gone (a stand-in of the same shape, no storage)
    assert model.model.up.weight.shape == (INTER, HIDDEN) and model.model.up.weight.stride() == (0, 0)
    if tied:  # the embedding still looks tokens up from its plain weight
        torch.testing.assert_close(model.model.embed_tokens.weight, embed_before)
    else:
        assert model.lm_head.weight.stride() == (0, 0)
        torch.testing.assert_close(model.model.embed_tokens.weight, embed_before)


def test_packed_layers_compile_to_the_eager_result(monkeypatch):
    monkeypatch.setenv(cpu_linear.MODE_ENV, "packed")
    torch.manual_seed(1)
    model = TinyModel(tied=True)
    cpu_linear.pack_model(model)
    ids = torch.randint(0, VOCAB, (4,))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # one graph: the packed op is opaque to it
    torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_packed_linear_takes_inputs_of_any_leading_shape_and_layout():
    torch.manual_seed(2)
    w, b = torch.randn(40, 24), torch.randn(40)
    packed = cpu_linear.PackedWeight(w)
    x = torch.randn(3, 5, 48)[..., ::2]  # [3, 5, 24], not contiguous
    torch.testing.assert_close(packed(x, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", [None, "torch"])
def test_other_dtypes_and_the_default_mode_are_left_as_sglang_computes_them(value, monkeypatch):
    monkeypatch.setenv(cpu_linear.MODE_ENV, "packed")
    bf16 = TinyModel(tied=False, dtype=torch.bfloat16)
    cpu_linear.pack_model(bf16)
    assert type(bf16.model.up.quant_method) is UnquantizedLinearMethod
    if value is None:  # unset: the default
        monkeypatch.delenv(cpu_linear.MODE_ENV)
    else:
        monkeypatch.setenv(cpu_linear.MODE_ENV, value)
    fp32 = TinyModel(tied=False)
    cpu_linear.pack_model(fp32)
    assert type(fp32.model.up.quant_method) is UnquantizedLinearMethod and fp32.model.up.weight.stride() == (HIDDEN, 1)


def test_an_unknown_mode_stops_the_load(monkeypatch):
    monkeypatch.setenv(cpu_linear.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="A2ATS_CPU_LINEAR='fast': expected one of torch, packed"):
        cpu_linear.pack_model(TinyModel(tied=True))
