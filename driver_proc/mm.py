"""The emulated mm of one application: virtual address ranges backed by shm regions.

Linux resolves a user address by walking the task's page tables; the emulated kernel resolves
it through this table (DESIGN §2 "Emulated address space").  An app enters a shm region it
created into its mm with the ``mm_map`` syscall and gets a virtual address back; it then passes
that address in SQEs and uapi structs (``sqe.addr``, ``io_uring_buf_reg.ring_addr``,
``area_reg.addr``...).  The kernel turns ``(addr, length, write)`` into a numpy ``uint8`` view
of the backing region with :meth:`Mm.resolve`, exactly where the real kernel would call
``copy_to_user`` / ``pin_user_pages``.

Who owns what
-------------
* The **app** creates, writes and unlinks the regions it maps (``/zcrx.<run>.app<tid>.*``).
  :class:`Mm` only attaches them (lazily, on the first :meth:`Mm.resolve` that needs one) and
  detaches them when no mapping refers to them any more; it never unlinks an app region.
* **Kernel regions** (io_uring rings, SQEs, kernel-allocated buffer rings, zcrx RQ) enter the
  mm through the ``mmap`` syscall on a ring fd (``map(..., kernel=True)``); the kernel keeps
  owning and unlinking them.  As on Linux the mapping stays valid after the ring is closed,
  until the app unmaps it.
* The mm itself (the VMA list) is kernel state: only the kernel process has it.

Rules (Linux behaviour unless said otherwise)
---------------------------------------------
* Addresses start at :data:`USER_BASE` (0x7f0000000000), are page aligned, and mappings never
  overlap: :meth:`Mm.map` picks the lowest free range, or with ``fixed=`` behaves like
  ``MAP_FIXED_NOREPLACE`` (``-EEXIST`` on overlap).  Lengths are rounded up to whole pages.
* ``munmap`` (:meth:`Mm.unmap`) needs a page-aligned address and a non-zero length
  (``-EINVAL``); unmapping a hole is not an error; a partial unmap splits the mapping.
* ``mprotect`` (:meth:`Mm.protect`) needs a page-aligned address (``-EINVAL``) and every page
  of the range mapped (``-ENOMEM``); a partial change splits the mapping.
* :meth:`Mm.resolve`: any byte of ``[addr, addr + length)`` outside a mapping, or a write into
  a mapping without ``PROT_WRITE``, or a read from one without ``PROT_READ`` is ``-EFAULT``.
  A range may cross mapping boundaries only where the next mapping continues the same region
  at the next offset (a split mapping); otherwise it cannot be one numpy view and is
  ``-EFAULT`` (departure: Linux would copy across unrelated mappings).
* A region that has been unlinked or shrunk under a mapping resolves to ``-EFAULT`` (Linux:
  SIGBUS on access; the kernel's copy fails with ``-EFAULT``).

Every method raises :class:`~shared.errors.Misuse` with the Linux errno; nothing an app passes
can raise anything else.
"""

from __future__ import annotations

import bisect
import errno
import os
import re
from dataclasses import dataclass, field

import numpy as np

from shared.errors import Misuse
from shared.shm import PAGE_SIZE, SHM_DIR, Region

__all__ = [
    "PROT_EXEC",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "USER_BASE",
    "USER_TOP",
    "Mm",
    "Vma",
]

PROT_NONE = 0
PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4
_PROT_VALID = PROT_READ | PROT_WRITE | PROT_EXEC

#: Lowest address handed out (a canonical x86-64 user address, where Linux puts mmaps).
USER_BASE = 0x7F00_0000_0000
#: One past the highest user address we hand out (x86-64 TASK_SIZE, 47-bit, minus a page).
USER_TOP = 0x7FFF_FFFF_F000

_PAGE_MASK = PAGE_SIZE - 1
_NAME = re.compile(r"^/[A-Za-z0-9_.-]{1,250}$")


def _page_up(n: int) -> int:
    return (n + _PAGE_MASK) & ~_PAGE_MASK


def _shm_size(name: str) -> int | None:
    """Size of shm segment ``name`` (``/zcrx....``), or None if it does not exist."""
    try:
        return os.stat(os.path.join(SHM_DIR, name.lstrip("/"))).st_size
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass
class _Backing:
    """One shm region referenced by one or more VMAs; attached on first use."""

    key: str
    name: str
    kernel: bool
    region: Region | None = None
    users: int = 0
    dead: bool = False  # attach failed or the segment is too small: every access faults

    def view(self) -> np.ndarray | None:
        if self.region is None and not self.dead:
            try:
                self.region = Region.attach(self.name)
            except Misuse:
                self.dead = True
                return None
        if self.region is None or self.region.buf is None:
            return None
        return self.region.array(np.uint8)

    def detach(self) -> None:
        if self.region is not None:
            self.region.detach()
            self.region = None


@dataclass
class Vma:
    """One mapping: ``[start, end)`` backed by ``backing`` from byte ``offset``."""

    start: int
    end: int
    prot: int
    offset: int
    backing: _Backing = field(repr=False)

    @property
    def name(self) -> str:
        return self.backing.name

    @property
    def length(self) -> int:
        return self.end - self.start


class Mm:
    """The address space of one task (kernel-side state).

    ``allowed_prefix``: shm names an app may map with :meth:`map` (its own regions, e.g.
    ``/zcrx.<run>.app7.``); others are refused with ``-EACCES``.  ``None`` allows any name.
    """

    def __init__(self, allowed_prefix: str | None = None, *, base: int = USER_BASE,
                 top: int = USER_TOP) -> None:
        if base & _PAGE_MASK or top & _PAGE_MASK or not 0 < base < top:
            raise Misuse(f"bad address space [{base:#x}, {top:#x})")
        self.allowed_prefix = allowed_prefix
        self.base = base
        self.top = top
        self._starts: list[int] = []  # sorted VMA starts, parallel to _vmas
        self._vmas: list[Vma] = []
        self._backings: dict[str, _Backing] = {}
        self._last: Vma | None = None  # resolve() cache
        self._kseq = 0
        #: -EFAULT results handed out (bad addresses from the app), for stats.
        self.faults = 0

    # -- inspection ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._vmas)

    def vmas(self) -> list[Vma]:
        """The mappings, lowest address first (copies of the bookkeeping, for tests/stats)."""
        return [Vma(v.start, v.end, v.prot, v.offset, v.backing) for v in self._vmas]

    def find(self, addr: int) -> Vma | None:
        """The mapping containing ``addr``, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._vmas[i].end:
            return self._vmas[i]
        return None

    @property
    def mapped_bytes(self) -> int:
        return sum(v.length for v in self._vmas)

    # -- map / unmap / protect ----------------------------------------------------------------

    def map(self, name: str, length: int, prot: int, *, fixed: int | None = None,
            offset: int = 0, kernel: bool = False) -> int:
        """Map ``length`` bytes of region ``name`` from ``offset``; return the address.

        ``kernel=True`` is the ``mmap`` of a ring fd: a kernel region, not subject to
        ``allowed_prefix``.  Errors: ``-EINVAL`` (length 0, bad prot, unaligned offset/fixed
        address), ``-EACCES`` (not the app's region), ``-ENOENT`` (no such segment),
        ``-ENXIO`` (range past the end of the segment), ``-EEXIST`` (``fixed`` overlaps),
        ``-ENOMEM`` (no room in the address space).
        """
        if length <= 0:
            raise Misuse(f"mmap length {length}", errno.EINVAL)
        if prot & ~_PROT_VALID:
            raise Misuse(f"bad prot {prot:#x}", errno.EINVAL)
        if offset < 0 or offset & _PAGE_MASK:
            raise Misuse(f"unaligned mmap offset {offset:#x}", errno.EINVAL)
        if not _NAME.match(name):
            raise Misuse(f"bad shm name {name!r}", errno.EINVAL)
        if not kernel and self.allowed_prefix is not None and \
                not name.startswith(self.allowed_prefix):
            raise Misuse(f"{name} is not this task's memory", errno.EACCES)
        size = _shm_size(name)
        if size is None:
            raise Misuse(f"no shm segment {name}", errno.ENOENT)
        length = _page_up(length)
        if offset + length > _page_up(size):
            raise Misuse(f"{name}: [{offset}, {offset + length}) past its {size} bytes",
                         errno.ENXIO)
        if fixed is not None:
            if fixed & _PAGE_MASK or fixed < self.base or fixed + length > self.top:
                raise Misuse(f"bad fixed address {fixed:#x}", errno.EINVAL)
            if self._overlaps(fixed, fixed + length):
                raise Misuse(f"[{fixed:#x}, {fixed + length:#x}) overlaps a mapping",
                             errno.EEXIST)
            start = fixed
        else:
            start = self._find_gap(length)
        # A kernel region's name can be reused by a later ring with the same fd: never share
        # its backing with another mapping.
        key = f"{name}#k{self._kseq}" if kernel else name
        self._kseq += kernel
        backing = self._backings.get(key)
        if backing is None:
            backing = self._backings[key] = _Backing(key, name, kernel)
        self._insert(Vma(start, start + length, prot, offset, backing))
        return start

    def unmap(self, addr: int, length: int) -> None:
        """``munmap``: drop every page of ``[addr, addr + length)`` (holes are fine)."""
        if addr & _PAGE_MASK or length <= 0:
            raise Misuse(f"munmap({addr:#x}, {length})", errno.EINVAL)
        end = addr + _page_up(length)
        if end > 1 << 64:
            raise Misuse("munmap range past the address space", errno.EINVAL)
        for v in self._split_range(addr, end):
            self._remove(v)

    def protect(self, addr: int, length: int, prot: int) -> None:
        """``mprotect``: set ``prot`` on every page of the range (all must be mapped)."""
        if addr & _PAGE_MASK:
            raise Misuse(f"unaligned mprotect address {addr:#x}", errno.EINVAL)
        if prot & ~_PROT_VALID:
            raise Misuse(f"bad prot {prot:#x}", errno.EINVAL)
        if length < 0:
            raise Misuse(f"mprotect length {length}", errno.EINVAL)
        if length == 0:
            return
        end = addr + _page_up(length)
        pos = addr
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            i = 0
        for v in self._vmas[i:]:
            if v.end <= pos:
                continue
            if v.start > pos or pos >= end:
                break
            pos = v.end
        if pos < end:
            raise Misuse(f"mprotect of unmapped memory at {pos:#x}", errno.ENOMEM)
        for v in self._split_range(addr, end):
            v.prot = prot
        self._last = None

    # -- resolve (the kernel's copy_to_user / pin_user_pages) -------------------------------------

    def resolve(self, addr: int, length: int, write: bool) -> np.ndarray:
        """A ``uint8`` view of ``[addr, addr + length)`` for a kernel read or write.

        Raises ``Misuse(EFAULT)`` when any byte is unmapped, lacks the needed protection, or
        the backing segment is gone; ``length == 0`` returns an empty array for any address.
        The view aliases the app's memory (no copy) and keeps the mapping alive while it lives.
        """
        if length == 0:
            return np.empty(0, dtype=np.uint8)
        if length < 0 or addr < 0:
            self.faults += 1
            raise Misuse(f"bad user range {addr:#x}+{length}", errno.EFAULT)
        need = PROT_WRITE if write else PROT_READ
        v = self._last
        if v is None or not v.start <= addr < v.end:
            v = self.find(addr)
            if v is None:
                self.faults += 1
                raise Misuse(f"address {addr:#x} is not mapped", errno.EFAULT)
            self._last = v
        end = addr + length
        if not v.prot & need and not (need == PROT_READ and v.prot & PROT_WRITE):
            self.faults += 1
            raise Misuse(f"address {addr:#x} not {'writable' if write else 'readable'}",
                         errno.EFAULT)
        if end > v.end:
            self._check_continuation(v, end, need)
        buf = v.backing.view()
        off = v.offset + (addr - v.start)
        if buf is None or off + length > len(buf):
            self.faults += 1
            raise Misuse(f"{v.name} is gone or shorter than its mapping", errno.EFAULT)
        return buf[off:off + length]

    def _check_continuation(self, v: Vma, end: int, need: int) -> None:
        i = self._vmas.index(v)
        cur = v
        while cur.end < end:
            i += 1
            nxt = self._vmas[i] if i < len(self._vmas) else None
            if (nxt is None or nxt.start != cur.end or nxt.backing is not cur.backing
                    or nxt.offset != cur.offset + cur.length):
                self.faults += 1
                raise Misuse(f"range crosses into unmapped memory at {cur.end:#x}",
                             errno.EFAULT)
            if not nxt.prot & need and not (need == PROT_READ and nxt.prot & PROT_WRITE):
                self.faults += 1
                raise Misuse(f"address {nxt.start:#x} lacks permission", errno.EFAULT)
            cur = nxt

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop every mapping and detach every region (task exit).  Idempotent."""
        for b in self._backings.values():
            b.detach()
        self._backings.clear()
        self._vmas.clear()
        self._starts.clear()
        self._last = None

    # -- internals ------------------------------------------------------------------------------

    def _overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self._starts, end) - 1
        return i >= 0 and self._vmas[i].end > start

    def _find_gap(self, length: int) -> int:
        pos = self.base
        for v in self._vmas:
            if v.start - pos >= length:
                break
            pos = max(pos, v.end)
        if pos + length > self.top:
            raise Misuse("address space exhausted", errno.ENOMEM)
        return pos

    def _insert(self, v: Vma) -> None:
        i = bisect.bisect_left(self._starts, v.start)
        self._starts.insert(i, v.start)
        self._vmas.insert(i, v)
        v.backing.users += 1

    def _remove(self, v: Vma) -> None:
        i = self._vmas.index(v)
        del self._vmas[i]
        del self._starts[i]
        b = v.backing
        b.users -= 1
        if b.users == 0:
            b.detach()
            self._backings.pop(b.key, None)
        self._last = None

    def _split_at(self, addr: int) -> None:
        """Make ``addr`` a VMA boundary if it falls inside a mapping."""
        v = self.find(addr)
        if v is None or v.start == addr:
            return
        tail = Vma(addr, v.end, v.prot, v.offset + (addr - v.start), v.backing)
        v.end = addr
        self._insert(tail)

    def _split_range(self, start: int, end: int) -> list[Vma]:
        """Split at both ends; return the VMAs lying inside ``[start, end)``."""
        self._split_at(start)
        self._split_at(end)
        self._last = None
        i = bisect.bisect_left(self._starts, start)
        out = []
        while i < len(self._vmas) and self._vmas[i].start < end:
            out.append(self._vmas[i])
            i += 1
        return out
