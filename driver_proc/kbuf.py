"""Provided-buffer rings (Linux ``io_uring/kbuf.c``): :class:`BufRing` and its register calls.

A :class:`BufRing` is one ``struct io_buffer_list`` of the ring-mapped kind
(``IORING_REGISTER_PBUF_RING``); the ring keeps them in ``Ring.buf_rings`` by group id.
RECV with ``IOSQE_BUFFER_SELECT`` (:mod:`driver_proc.net`) peeks and takes buffers from it.
The three register handlers here (:func:`register_pbuf_ring`, :func:`unregister_pbuf_ring`,
:func:`register_pbuf_status`) are plugged into the ``io_uring_register`` table by
:class:`driver_proc.setup.IoUring`; they have the :data:`driver_proc.register.RegisterHandler`
signature.

Shared memory, and who writes what (uapi-layouts.md §6)
------------------------------------------------------
* **The buffer ring** is app memory (``ring_addr`` resolved through the task's mm, kept mapped
  while registered, like Linux pins the pages) or, with ``IOU_PBUF_RING_MMAP``, a kernel
  region ``/zcrx.<run>.kernel.t<tid>.ring<fd>.pbuf<bgid>`` created here, mapped at
  ``IORING_OFF_PBUF_RING | bgid << 16`` (:mod:`driver_proc.memmap`) and unlinked on
  unregister.  The app writes the ``io_uring_buf`` entries and the u16 tail (in entry 0's
  ``resv``); the kernel keeps the head privately.
* The tail is read through an untrusted view: the implied count is clamped to the ring size
  and the fault counted (``buf_ring_faults`` in the ring's stats).

Not emulated, refused with -EINVAL: incremental buffer rings (``IOU_PBUF_RING_INC``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from driver_proc.files import Task
from driver_proc.register import one_blob
from shared import abi
from shared.errors import Misuse
from shared.shm import Region, region_name

if TYPE_CHECKING:
    from driver_proc.io_uring import Ring

__all__ = [
    "BufRing",
    "register_pbuf_ring",
    "register_pbuf_status",
    "unregister_pbuf_ring",
]


class BufRing:
    """A registered provided-buffer ring (``IORING_REGISTER_PBUF_RING``).

    ``bufs`` views the app-written ``io_uring_buf`` entries; the u16 tail sits in entry 0's
    ``resv`` (offset 14).  The head is kernel-private.  ``region`` is set when the kernel
    allocated the memory (``IOU_PBUF_RING_MMAP``) and is unlinked on unregister.
    """

    def __init__(self, bgid: int, entries: int, raw: NDArray[np.uint8],
                 region: Region | None = None, ring_addr: int = 0) -> None:
        self.bgid = bgid
        self.entries = entries
        self.mask = entries - 1
        self.raw = raw
        self.bufs = raw[:entries * abi.io_uring_buf.itemsize].view(abi.io_uring_buf)
        self._tail = raw[14:16].view("<u2")
        self.head = 0
        self.region = region
        self.ring_addr = ring_addr
        self.faults = 0

    def available(self) -> int:
        """Buffers published and not yet taken (clamped to the ring size)."""
        n = (int(self._tail[0]) - self.head) & 0xFFFF
        if n > self.entries:
            self.faults += 1
            n = self.entries
        return n

    def peek(self, k: int) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """``(addrs, lens, bids)`` of the next ``k`` buffers (copies; nothing is taken)."""
        idx = (self.head + np.arange(k)) & self.mask
        e = self.bufs[idx]
        return (e["addr"].astype(np.int64), e["len"].astype(np.int64),
                e["bid"].astype(np.int64))

    def advance(self, k: int) -> None:
        """Take ``k`` buffers (kernel-private head)."""
        self.head = (self.head + k) & 0xFFFF

    def close(self) -> None:
        self.bufs = np.empty(0, dtype=abi.io_uring_buf)
        self.raw = np.empty(0, dtype=np.uint8)
        self._tail = np.zeros(1, dtype="<u2")
        if self.region is not None:
            self.region.close()
            self.region = None


# --------------------------------------------------------------------------------------------
# io_uring_register opcodes
# --------------------------------------------------------------------------------------------


def register_pbuf_ring(ring: Ring | None, task: Task, nr_args: int,
                       blobs: list[bytes]) -> tuple[int, list[bytes]]:
    """``IORING_REGISTER_PBUF_RING``: add buffer group ``bgid`` to ``ring``."""
    assert ring is not None
    reg = one_blob(nr_args, blobs, abi.io_uring_buf_reg)
    flags = int(reg["flags"][0])
    entries = int(reg["ring_entries"][0])
    bgid = int(reg["bgid"][0])
    addr = int(reg["ring_addr"][0])
    if reg["resv"].any() or reg["min_left"][0]:
        raise Misuse("buf_reg reserved fields must be 0", errno.EINVAL)
    if flags & ~(abi.IOU_PBUF_RING_MMAP | abi.IOU_PBUF_RING_INC):
        raise Misuse(f"buf_reg flags {flags:#x}", errno.EINVAL)
    if flags & abi.IOU_PBUF_RING_INC:
        raise Misuse("incremental buffer rings are not emulated", errno.EINVAL)
    if entries <= 0 or entries & (entries - 1) or entries >= 65536:
        raise Misuse(f"ring_entries {entries}", errno.EINVAL)
    if bgid in ring.buf_rings:
        raise Misuse(f"buffer group {bgid} exists", errno.EEXIST)
    size = entries * abi.io_uring_buf.itemsize
    if flags & abi.IOU_PBUF_RING_MMAP:
        if addr:
            raise Misuse("ring_addr with IOU_PBUF_RING_MMAP", errno.EINVAL)
        name = region_name(ring.uring.run_id, "kernel",
                           f"t{task.tid}.ring{ring.fd}.pbuf{bgid}")
        region = Region.create(name, size, uid=task.uid)  # the task's memory
        br = BufRing(bgid, entries, region.array(np.uint8), region)
        ring.mmap_regions[abi.IORING_OFF_PBUF_RING
                          | (bgid << abi.IORING_OFF_PBUF_SHIFT)] = region
    else:
        if not addr:
            raise Misuse("ring_addr is 0", errno.EFAULT)
        if addr & (abi.PAGE_SIZE - 1):
            raise Misuse("ring_addr not page aligned", errno.EINVAL)
        raw = task.mm.pin(addr, size, write=True)  # kept: must be sealed memory
        br = BufRing(bgid, entries, raw, None, addr)
    ring.buf_rings[bgid] = br
    return 0, [reg.tobytes()]


def unregister_pbuf_ring(ring: Ring | None, task: Task, nr_args: int,
                         blobs: list[bytes]) -> tuple[int, list[bytes]]:
    """``IORING_UNREGISTER_PBUF_RING``: drop buffer group ``bgid`` (and its kernel region)."""
    assert ring is not None
    reg = one_blob(nr_args, blobs, abi.io_uring_buf_reg)
    if reg["resv"].any() or reg["flags"][0]:
        raise Misuse("buf_reg reserved fields must be 0", errno.EINVAL)
    bgid = int(reg["bgid"][0])
    br = ring.buf_rings.pop(bgid, None)
    if br is None:
        raise Misuse(f"no buffer group {bgid}", errno.ENOENT)
    ring.mmap_regions.pop(abi.IORING_OFF_PBUF_RING | (bgid << abi.IORING_OFF_PBUF_SHIFT),
                          None)
    br.close()
    return 0, [reg.tobytes()]


def register_pbuf_status(ring: Ring | None, task: Task, nr_args: int,
                         blobs: list[bytes]) -> tuple[int, list[bytes]]:
    """``IORING_REGISTER_PBUF_STATUS``: write back the kernel-private head of a group."""
    assert ring is not None
    st = one_blob(nr_args, blobs, abi.io_uring_buf_status)
    if st["resv"].any():
        raise Misuse("buf_status.resv must be 0", errno.EINVAL)
    br = ring.buf_rings.get(int(st["buf_group"][0]))
    if br is None:
        raise Misuse("no such buffer group", errno.ENOENT)
    st["head"] = br.head
    return 0, [st.tobytes()]
