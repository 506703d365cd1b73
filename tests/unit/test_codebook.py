import pytest
import torch
from support.codebooks import make_codebooks

from a2ats_sglang.core.codebook import CodebookMismatch, Codebooks, LayerCodebook, ModelShape
from a2ats_sglang.core.quantizer import assign


def test_round_trip(tmp_path):
    books = make_codebooks(2, 4, 2, 16)
    books.save(tmp_path / "cb.safetensors")
    back = Codebooks.load(tmp_path / "cb.safetensors")
    torch.testing.assert_close(back.centroids, books.centroids)
    torch.testing.assert_close(back.whiten, books.whiten)
    assert back.distances == books.distances and back.shape == books.shape
    back.validate(books.shape, books.rope)


@pytest.mark.parametrize(
    "field,value,msg",
    [("num_layers", 3, "num_layers: file has 2, model has 3"), ("num_kv_heads", 4, "num_kv_heads"),
     ("head_dim", 32, "head_dim"), ("num_q_heads", 8, "num_q_heads")],
)
def test_mismatch_says_what_differs(field, value, msg):
    books = make_codebooks(2, 4, 2, 16)
    shape = ModelShape(**{**books.shape.__dict__, field: value})
    with pytest.raises(CodebookMismatch, match=msg):
        books.validate(shape)


def test_rope_mismatch():
    books = make_codebooks(1, 4, 2, 16)
    other = make_codebooks(1, 4, 2, 16).rope
    other = type(other)(other.inv_freq * 2, 16)
    with pytest.raises(CodebookMismatch, match="rotary frequencies differ"):
        books.validate(books.shape, other)


def test_bad_files(tmp_path):
    with pytest.raises(CodebookMismatch, match="not found"):
        Codebooks.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(CodebookMismatch, match="not an A2ATS codebooks file"):
        Codebooks.load(tmp_path / "weights.safetensors")
    make_codebooks(1, 2, 1, 8).save(tmp_path / "cb.safetensors")
    data = (tmp_path / "cb.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CodebookMismatch, match="cannot read"):
        Codebooks.load(tmp_path / "cut.safetensors")


def test_encoder_picks_nearest_centroid_in_whitened_space():
    books = make_codebooks(1, 4, 2, 16, num_codes=32)
    lcb = LayerCodebook.build(books.centroids[0], books.whiten[0], "cpu")
    k = torch.randn(50, 2, 16)
    got = lcb.encode(k)
    L = books.whiten[0]
    want, _ = assign(k.transpose(0, 1) @ L, books.centroids[0] @ L)
    assert got.dtype == torch.int16
    assert torch.equal(got.long(), want.transpose(0, 1))
