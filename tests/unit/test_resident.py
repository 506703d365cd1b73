"""Offload mode's device side: the resident window (sinks + recent window per request)
and how the pool is sized from device and host memory."""

import pytest
import torch

from a2ats_sglang.offload.host_pool import CODE_BYTES, OffloadSizing
from a2ats_sglang.offload.resident import ResidentWindow

S, W, HKV, D = 3, 5, 2, 4


def window_of(n: int) -> set[int]:
    return set(range(min(S, n))) | set(range(max(S, n - W), n))


def positions_at(res: ResidentWindow, rows: torch.Tensor) -> list[int]:
    """Each resident row stores its position in every element; read them back."""
    return sorted(int(res.k[0][r, 0, 0]) for r in rows.tolist() if r >= 0)


@pytest.mark.parametrize("prompt", [1, 4, 8, 9, 30])
def test_decode_rows_hold_exactly_the_sinks_and_the_window(prompt):
    res = ResidentWindow(1, 3, S, W, HKV, D, D, torch.float32, "cpu")
    req = torch.tensor([2])
    # extend: only the kept positions of the prompt are written (no two share a row)
    pos = torch.arange(prompt)
    kept = res.kept(pos, torch.tensor(prompt))
    assert set(pos[kept].tolist()) == window_of(prompt)
    rows = res.rows(req.expand(prompt)[kept], pos[kept])
    assert rows.unique().numel() == rows.numel()
    val = pos[kept].float().view(-1, 1, 1).expand(-1, HKV, D)
    res.store(0, rows, val, val)
    for n in range(prompt + 1, prompt + 12):  # decode: one position per step
        p = torch.tensor([n - 1])
        v = p.float().view(1, 1, 1).expand(1, HKV, D)
        res.store(0, res.rows(req, p), v, v)
        got = res.decode_rows(req, torch.tensor([n]))
        assert got.shape == (1, S + W)
        assert positions_at(res, got[0]) == sorted(window_of(n))
        assert got.min() >= -1 and int((got >= 0).sum()) == min(n, S + W)


def test_requests_do_not_share_rows():
    res = ResidentWindow(2, 4, S, W, HKV, D, D, torch.float32, "cpu")
    pos = torch.arange(40)
    a, b = res.rows(torch.full_like(pos, 1), pos), res.rows(torch.full_like(pos, 2), pos)
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert a.min() == S + W and a.max() < 2 * (S + W)
    assert res.nbytes == 2 * 2 * 4 * (S + W) * HKV * D * 4


def sizing(layers=30, hkv=3, d=64, itemsize=4, sinks=8, window=64) -> OffloadSizing:
    dense = layers * hkv * 2 * d * itemsize
    return OffloadSizing(dense, layers * hkv * CODE_BYTES, (sinks + window) * dense)


def test_device_bytes_per_token_are_codes_only():
    for d, itemsize in ((64, 4), (128, 2)):  # float32 small model; bfloat16 head_dim 128
        s = sizing(d=d, itemsize=itemsize)
        assert s.code_cell / s.dense_cell <= 0.01


def test_same_device_memory_holds_ten_times_the_tokens_when_the_host_has_room():
    s = sizing(itemsize=2, d=128)
    device = 8 << 30
    dense_tokens = device // s.dense_cell
    requests = s.default_requests(device)
    tokens = s.capacity(device, requests, host_bytes=64 * device)
    assert tokens >= 10 * dense_tokens
    # the device really holds what was counted: codes of every token + the windows
    assert tokens * s.code_cell + requests * s.window_cell <= device


def test_host_memory_sets_the_capacity():
    s = sizing()
    host = 1 << 30
    assert s.capacity(8 << 30, 16, host) == host // s.dense_cell
    # one memory for both (--device cpu): never more than dense, codes and windows included
    shared = s.capacity(8 << 30, 16, None)
    assert shared * (s.dense_cell + s.code_cell) + 16 * s.window_cell <= 8 << 30 < (shared + 1) * (s.dense_cell + s.code_cell) + 16 * s.window_cell


def test_windows_that_do_not_fit_the_device_are_an_error():
    s = sizing()
    with pytest.raises(ValueError, match="resident windows .* do not fit"):
        s.capacity(s.window_cell * 10, 10, 1 << 30)
    assert s.default_requests(s.window_cell * 10) == 2  # a quarter of the budget


def test_a_host_share_smaller_than_one_request_is_an_error():
    """A rank whose host memory holds fewer tokens than one request's sinks + window + the
    token it decodes could serve nothing: refused with what it needs, per rank."""
    s = sizing()
    need = s.window_cell // s.dense_cell + 1
    assert s.capacity(8 << 30, 4, need * s.dense_cell) == need
    with pytest.raises(ValueError, match=r"this rank's .* MiB of host memory .* holds %d tokens .* fewer than one "
                                         r"request's %d" % (need - 1, need)):
        s.capacity(8 << 30, 4, need * s.dense_cell - 1)
    with pytest.raises(ValueError, match="the device's .* KV budget holds"):  # shared memory: the device's budget
        s.capacity(5 * s.window_cell, 4, None)


def test_the_host_memory_given_is_split_between_the_ranks():
    from a2ats_sglang.offload.host_pool import host_kv_bytes

    assert host_kv_bytes(3.0, "cpu", 3) == 2**30
    assert host_kv_bytes(1.0, "cuda:0", 1) == 2**30
    assert host_kv_bytes(0, "cpu", 2) is None  # one memory: SGLang's budget, already per rank


@pytest.mark.parametrize("prefix,n", [(1, 5), (3, 4), (10, 12), (20, 21), (30, 60), (7, 7)])
def test_prefix_positions_are_the_kept_positions_of_the_cached_prefix(prefix, n):
    res = ResidentWindow(1, 1, S, W, HKV, D, D, torch.float32, "cpu")
    pos = torch.arange(prefix)
    want = pos[res.kept(pos, torch.tensor(n))]
    assert res.prefix_positions(prefix, n).tolist() == want.tolist()
