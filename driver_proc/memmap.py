"""``mmap`` of an io_uring fd (Linux ``io_uring/memmap.c``, ``io_uring_mmap``).

The kernel regions an app may map are kept per ring in ``Ring.mmap_regions``, by mmap
offset: the rings region at ``IORING_OFF_SQ_RING`` and ``IORING_OFF_CQ_RING`` (one region:
``IORING_FEAT_SINGLE_MMAP``) and the SQE array at ``IORING_OFF_SQES`` (both created by
:class:`driver_proc.io_uring.Ring`), kernel-allocated buffer rings at
``IORING_OFF_PBUF_RING | bgid << IORING_OFF_PBUF_SHIFT`` (:mod:`driver_proc.kbuf`), and
whatever other subsystems add (zcrx's refill-queue regions).  Mapping one enters the region
into the task's emulated mm (:meth:`driver_proc.mm.Mm.map` with ``kernel=True``: a kernel
region, exempt from the task's ``allowed_prefix``).  The kernel created the region and
unlinks it when the ring (or the buffer group) goes; the app only maps it.

Departures: ``IORING_SETUP_NO_MMAP`` (app-provided ring memory) is refused at setup, so
every ring is mapped through here.
"""

from __future__ import annotations

import errno

from driver_proc.files import Task
from driver_proc.io_uring import Ring
from driver_proc.mm import PROT_READ, PROT_WRITE
from shared.errors import Misuse
from shared.shm import Region

__all__ = ["io_uring_mmap"]


def io_uring_mmap(task: Task, fd: int, offset: int, length: int) -> tuple[Region, int]:
    """``mmap(ring_fd, offset)``: the kernel region and the address in the task's mm."""
    obj = task.get(fd)
    if not isinstance(obj, Ring):
        raise Misuse(f"fd {fd} cannot be mapped", errno.ENODEV)
    if length <= 0 or offset < 0:
        raise Misuse(f"mmap length {length} offset {offset}", errno.EINVAL)
    region = obj.mmap_regions.get(offset)
    if region is None:
        raise Misuse(f"no io_uring region at offset {offset:#x}", errno.EINVAL)
    if length > region.size:
        raise Misuse(f"mmap of {length} bytes, region has {region.size}", errno.EINVAL)
    addr = task.mm.map(region.name, length, PROT_READ | PROT_WRITE, kernel=True)
    return region, addr
