"""Anonymous shared memory (Linux ``memfd``) viewed as torch tensors.

A region is reachable only through its file descriptor, which the owner hands
to the worker process it starts (``pass_fds``): no name in /dev/shm, nothing to
unlink, nothing left behind when a process is killed.

The KV pool is read at scattered rows, so its TLB reach matters: a region asked for
with ``huge_pages`` uses 2 MiB pages where the system has them (reserved hugetlb pages,
else transparent huge pages for shared memory when the kernel's ``shmem_enabled`` is
``advise``/``always``), and plain pages otherwise."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import torch

HUGE_PAGE = 2 << 20


@dataclass
class SharedRegion:
    fd: int
    nbytes: int
    buf: mmap.mmap

    @classmethod
    def create(cls, nbytes: int, name: str = "a2ats", huge_pages: bool = False) -> "SharedRegion":
        if huge_pages:
            size, fd = align(max(1, nbytes), HUGE_PAGE), -1
            try:
                fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_HUGETLB)
                os.ftruncate(fd, size)
                # hugetlb shared mappings reserve their pages here: ENOMEM when too few are free
                return cls(fd, nbytes, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            except OSError:
                if fd >= 0:
                    os.close(fd)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, max(1, nbytes))
        region = cls(fd, nbytes, mmap.mmap(fd, max(1, nbytes), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
        if huge_pages:
            region.buf.madvise(mmap.MADV_HUGEPAGE)  # honoured if shmem THP is 'advise' or 'always'
        return region

    @classmethod
    def attach(cls, fd: int, nbytes: int) -> "SharedRegion":
        size = os.fstat(fd).st_size  # a hugetlb region is rounded up to whole huge pages
        if size < nbytes:
            raise ValueError(f"shared region fd {fd} has {size} bytes, expected {nbytes}")
        region = cls(fd, nbytes, mmap.mmap(fd, max(1, size), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
        region.buf.madvise(mmap.MADV_HUGEPAGE)
        return region

    @property
    def hugetlb(self) -> bool:
        """Backed by reserved 2 MiB pages (hugetlbfs reports them as its block size)."""
        return os.fstat(self.fd).st_blksize >= HUGE_PAGE

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
