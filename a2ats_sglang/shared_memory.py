"""Anonymous shared memory (Linux ``memfd``) viewed as torch tensors.

A region is reachable only through its file descriptor, which the owner hands
to the worker process it starts (``pass_fds``): no name in /dev/shm, nothing to
unlink, nothing left behind when a process is killed."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import torch


@dataclass
class SharedRegion:
    fd: int
    nbytes: int
    buf: mmap.mmap

    @classmethod
    def create(cls, nbytes: int, name: str = "a2ats") -> "SharedRegion":
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, max(1, nbytes))
        return cls(fd, nbytes, mmap.mmap(fd, max(1, nbytes), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))

    @classmethod
    def attach(cls, fd: int, nbytes: int) -> "SharedRegion":
        if os.fstat(fd).st_size < nbytes:
            raise ValueError(f"shared region fd {fd} has {os.fstat(fd).st_size} bytes, expected {nbytes}")
        return cls(fd, nbytes, mmap.mmap(fd, max(1, nbytes), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of ``shape``/``dtype`` at byte ``offset`` (aligned to the dtype)."""
        count = 1
        for n in shape:
            count *= n
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offset % itemsize or offset + count * itemsize > self.nbytes:
            raise ValueError(f"view of {count} x {dtype} at {offset} does not fit a {self.nbytes}-byte region")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.buf, dtype=dtype, count=count, offset=offset).view(shape)

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:  # tensors still view it; the mapping goes with the process
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class KVLayout:
    """Where each layer's K [slots, Hkv, D] and V [slots, Hkv, Dv] sit in the region."""

    num_layers: int
    slots: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype

    @property
    def k_bytes(self) -> int:
        return align(self.slots * self.kv_heads * self.head_dim * self.itemsize)

    @property
    def v_bytes(self) -> int:
        return align(self.slots * self.kv_heads * self.v_head_dim * self.itemsize)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.num_layers * (self.k_bytes + self.v_bytes)

    def views(self, region: SharedRegion) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ks, vs = [], []
        for li in range(self.num_layers):
            base = li * (self.k_bytes + self.v_bytes)
            ks.append(region.tensor(base, (self.slots, self.kv_heads, self.head_dim), self.dtype))
            vs.append(region.tensor(base + self.k_bytes, (self.slots, self.kv_heads, self.v_head_dim), self.dtype))
        return ks, vs
