"""The emulated mm of one application: virtual address ranges backed by shm regions.

Linux resolves a user address by walking the task's page tables; the emulated kernel resolves
it through this table (DESIGN §2 "Emulated address space").  An app enters a shm region it
created (a sealed memfd, by descriptor, or a named segment) into its mm with the ``mm_map``
syscall and gets a virtual address back; it then passes
that address in SQEs and uapi structs (``sqe.addr``, ``io_uring_buf_reg.ring_addr``,
``area_reg.addr``...).  The kernel turns ``(addr, length, write)`` into a numpy ``uint8`` view
of the backing region with :meth:`Mm.resolve`, exactly where the real kernel would call
``copy_to_user`` / ``pin_user_pages``.

Who owns what
-------------
* The **app** creates the memory it maps: by default a sealed memfd (no name; the app closes
  it), else a named segment (``/zcrx.<run>.app<tid>.*``, which it unlinks).  :meth:`Mm.map`
  (by name) and :meth:`Mm.map_fd` (by descriptor) open it once (see "Untrusted memory"
  below) and keep that file descriptor; :class:`Mm` maps it into the kernel process lazily,
  on the first :meth:`Mm.resolve` that needs it, and closes both when no mapping refers to it
  any more.  It never unlinks an app region.
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
* An app region unlinked before the kernel first touched it, or shorter than the mapping by
  then, resolves to ``-EFAULT`` (departure: Linux keeps an unlinked file's pages mapped; a
  truncated one gives SIGBUS, and the kernel's copy ``-EFAULT``).  Kernel regions stay valid
  after the kernel unlinks them, until the app unmaps them.

Untrusted memory (the app owns the name and can change what it points to at any time)
--------------------------------------------------------------------------------------
:meth:`Mm.map` opens the segment **once**, with ``O_NOFOLLOW``, ``fstat``-s that descriptor
and keeps it: every later access (:meth:`Mm.resolve`, :meth:`Mm.pin_region`) maps the inode
that was checked, never the name again, so swapping the name afterwards changes nothing.  An
app region is accepted only if it is

* a **regular file** (else ``-EINVAL``: the name does not name a shm object; a directory
  such as ``/..`` included),
* **not a symlink** (``-ELOOP``, what Linux's ``shm_open`` answers, since it opens with
  ``O_NOFOLLOW`` too),
* with **one link** (``-EACCES``: a hard link under the app's prefix may be another task's
  memory),
* **owned by the task's uid** (``-EACCES``).  ``Mm(uid=...)`` is the owner the kernel expects;
  it defaults to the kernel's own uid, right as long as every process of a run has one uid.

:meth:`Mm.map_fd` (``mm_map`` by descriptor) opens ``/proc/<pid>/fd/<fd>``, ``pid`` being the
task's process as the OS named it at ``attach`` (SO_PEERCRED), never a message field.  That
path is a magic link, so ``O_NOFOLLOW`` does not apply: the kernel ``stat``-s its target first
and opens nothing but a regular file (a directory, socket, pipe, device or eventfd is
``-ENODEV``, as Linux's ``mmap`` of a file that cannot be mapped), then checks the task's
pidfd is still alive after the open (if the process died and its pid was reused in between,
the descriptor was someone else's: ``-ESRCH``) and that the inode opened is the one stat-ed
(``-EBADF``: the task swapped the number meanwhile).  It accepts shared memory only (a memfd
or a tmpfs file: ``F_GET_SEALS`` works; a file on disk is ``-ENODEV``), with at most one link
(a memfd has none), owned by the task's uid (``-EACCES``); ``PROT_WRITE`` on memory sealed
``F_SEAL_WRITE``/``F_SEAL_FUTURE_WRITE`` is ``-EPERM`` (Linux's ``mmap``).  A descriptor number
the task does not hold is ``-EBADF``.  The kernel keeps its own descriptor, so whatever the
task does with its number afterwards (close it, ``dup2`` another memfd over it) changes
nothing.

Each refusal is counted per reason in :attr:`Mm.refused` and in the kernel-wide
:data:`MM_COUNTERS` (``map_refused_<reason>``).  Kernel regions (``kernel=True``) are opened
the same way (``O_NOFOLLOW``, regular file) but need no owner or link check.

Every method raises :class:`~shared.errors.Misuse` with the Linux errno; nothing an app passes
or does to its memory (unlink, replace, symlink, hard link, truncate) can raise anything else
(``OSError`` from attaching becomes ``-EFAULT``).

Shrinking.  Touching a mapping past its file's new end is SIGBUS, which would kill the
kernel (or the NIC) process.  Linux pins the pages of long-lived buffers; here the memory
must be sealed so that it cannot shrink:

* **Long-lived pins** (:meth:`Mm.pin_region` of a zcrx area, :meth:`Mm.pin` of a user-memory
  RQ or a buffer ring: views the kernel keeps, and the area the NIC maps) need app memory
  sealed ``F_SEAL_SHRINK | F_SEAL_SEAL`` (read with ``F_GET_SEALS`` at the pin; seals only
  grow, so nothing can undo them), else ``-EFAULT``, counted as ``pin_refused_unsealed``.
  ``-EFAULT`` because it is what ``pin_user_pages`` reports for memory it cannot pin and what
  these registrations already answer for a bad pointer (``-EINVAL`` would blame an argument
  of the struct).  A named segment can never be pinned: tmpfs files made by name come with
  ``F_SEAL_SEAL`` and no way to add seals.  Kernel regions are the kernel's own and never
  shrink.
* **Short accesses** (a RECV copy, a struct read): a backing sealed ``F_SEAL_SHRINK`` is
  served as is; any other app backing is ``fstat``-ed per access and only the bytes it still
  has are served (``-EFAULT`` past them, counted in ``access_shrunk``).

Residual hole: an unsealed backing (a named segment, an unsealed memfd) truncated between that
``fstat`` and the copy itself.  The library maps only sealed memory unless asked for a named
segment (``alloc_memory(named=True)``).
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.errors import Misuse
from shared.shm import (
    F_SEAL_FUTURE_WRITE,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    PAGE_SIZE,
    PIN_SEALS,
    SHM_DIR,
    Region,
)

__all__ = [
    "MM_COUNTERS",
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
#: What a by-fd backing is called in logs and stats (its target as /proc shows it, when tame).
_LABEL = re.compile(r"^[A-Za-z0-9_.:/-]{1,250}$")
#: Highest descriptor number :meth:`Mm.map_fd` looks at (Linux's fs.nr_open default).
FD_MAX = 1 << 20


def _page_up(n: int) -> int:
    return (n + _PAGE_MASK) & ~_PAGE_MASK


#: Kernel-wide mm counters (every task of this kernel process, live or gone): refusals of
#: :meth:`Mm.map` by reason (``map_refused_<reason>``) and attaches that failed
#: (``attach_failed``).  The kernel's ``stats`` shows them under ``mm``.
MM_COUNTERS: Counter[str] = Counter()

_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_FD_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def _fd_label(own: int, fd: int) -> str:
    """What a by-fd backing is called: its target as ``/proc`` shows it (``memfd:<name>``
    for a memfd), else ``fd<N>`` (a label for logs and stats; nothing looks it up)."""
    try:
        target = os.readlink(f"/proc/self/fd/{own}")
    except OSError:
        return f"fd{fd}"
    target = target.removesuffix(" (deleted)")
    if target.startswith("/memfd:"):
        target = target[1:]
    return target if _LABEL.match(target) else f"fd{fd}"


def _open_segment(name: str) -> tuple[int, os.stat_result]:
    """Open shm segment ``name`` without following links: ``(fd, fstat of that fd)``.

    Raises ``Misuse`` with the errno; a refusal (symlink, not a regular file, permission) is a
    :class:`_Refused` carrying the reason the caller counts it under.
    """
    path = os.path.join(SHM_DIR, name[1:])
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise Misuse(f"no shm segment {name}", errno.ENOENT) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _Refused("symlink", f"{name} is a symbolic link", errno.ELOOP) from None
        if e.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.ENOTDIR):
            raise _Refused("not_regular", f"{name} is not a shm object", errno.EINVAL) from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise _Refused("permission", f"{name}: permission denied", errno.EACCES) from None
        raise Misuse(f"{name}: {e.strerror}", e.errno or errno.EIO) from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise Misuse(f"{name}: {e.strerror}", errno.EIO) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _Refused("not_regular", f"{name} is not a shm object", errno.EINVAL)
    return fd, st


class _Refused(Misuse):
    """A :meth:`Mm.map` refusal with the reason it is counted under."""

    def __init__(self, reason: str, message: str, errno: int) -> None:
        self.reason = reason
        super().__init__(message, errno)


@dataclass
class _Backing:
    """One shm inode referenced by one or more VMAs.

    ``fd`` is the descriptor :meth:`Mm.map` opened and checked; the region is mapped from it
    (never from the name) on first use and closed with it.
    """

    key: str
    name: str
    kernel: bool
    fd: int = -1
    region: Region | None = None
    users: int = 0
    dead: bool = False  # attach failed or the segment is too small: every access faults
    #: entered by descriptor (``mm_map`` by fd): a memfd has no name to lose
    by_fd: bool = False
    #: the inode's seals as last read (``F_GET_SEALS``; they only ever grow)
    seals: int = 0

    def _gone(self) -> bool:
        """True when the fd is closed or an app segment lost its name before first use."""
        if self.fd < 0:
            return True
        if self.kernel or self.by_fd:
            return False  # the kernel unlinks its regions; a memfd never had a name
        return os.fstat(self.fd).st_nlink == 0

    @property
    def fixed_size(self) -> bool:
        """True when the inode can never shrink (a kernel region, or ``F_SEAL_SHRINK``)."""
        return self.kernel or bool(self.seals & F_SEAL_SHRINK)

    def read_seals(self) -> int:
        """The inode's seals now (0 if they cannot be read), remembered in :attr:`seals`."""
        if self.fd >= 0:
            try:
                self.seals = fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)
            except OSError:
                pass
        return self.seals

    def _map(self) -> Region:
        """A fresh mapping of the whole checked inode (its current size)."""
        size = os.fstat(self.fd).st_size
        return Region(self.name, size, mmap.mmap(self.fd, size), owner=False)

    def view(self) -> np.ndarray | None:
        """The mapped bytes the inode still has: an app may shrink its segment at any time,
        and touching the mapping past the new end is SIGBUS (for a kernel region: all)."""
        buf = self._view()
        if buf is None or self.fixed_size:
            return buf  # sealed against shrinking: no fstat per access
        try:
            size = _page_up(os.fstat(self.fd).st_size)
        except OSError:
            return None
        if size < len(buf):
            MM_COUNTERS["access_shrunk"] += 1
            return buf[:size]
        return buf

    def _view(self) -> np.ndarray | None:
        if self.region is None and not self.dead:
            try:
                if self._gone():
                    raise FileNotFoundError(self.name)
                self.region = self._map()
            except (OSError, ValueError, OverflowError):
                # unlinked, emptied or unmappable behind the kernel's back: the task's
                # accesses fault (-EFAULT); nothing reaches the kernel loop
                MM_COUNTERS["attach_failed"] += 1
                self.dead = True
                return None
        if self.region is None or self.region.buf is None:
            return None
        return self.region.array(np.uint8)

    def pin(self) -> Region:
        """A separate mapping of the checked inode, owned by the caller (``pin_user_pages``
        of a zcrx area), keeping a duplicate of the checked descriptor (``Region.fd``: what
        the NIC is pointed at); ``-EFAULT`` if it cannot be made."""
        try:
            if self.dead or self._gone():
                raise FileNotFoundError(self.name)
            size = os.fstat(self.fd).st_size
            fd = os.dup(self.fd)
            try:
                return Region(self.name, size, mmap.mmap(fd, size), owner=False, fd=fd)
            except BaseException:
                os.close(fd)
                raise
        except (OSError, ValueError, OverflowError):
            MM_COUNTERS["attach_failed"] += 1
            raise Misuse(f"{self.name} is gone or cannot be mapped", errno.EFAULT) from None

    def detach(self) -> None:
        if self.region is not None:
            self.region.detach()
            self.region = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


def _check_mmap_args(length: int, prot: int, offset: int) -> None:
    """``mmap``'s own argument checks, before anything is looked up (-EINVAL)."""
    if length <= 0:
        raise Misuse(f"mmap length {length}", errno.EINVAL)
    if prot & ~_PROT_VALID:
        raise Misuse(f"bad prot {prot:#x}", errno.EINVAL)
    if offset < 0 or offset & _PAGE_MASK:
        raise Misuse(f"unaligned mmap offset {offset:#x}", errno.EINVAL)

class Mm:
    """The address space of one task (kernel-side state).

    ``allowed_prefix``: shm names an app may map with :meth:`map` (its own regions, e.g.
    ``/zcrx.<run>.app7.``); others are refused with ``-EACCES``.  ``None`` allows any name.
    ``uid``: the owner an app segment must have (the task's uid); ``None`` means the kernel
    process's own effective uid, which is every task's while a run has a single uid.
    """

    def __init__(self, allowed_prefix: str | None = None, *, uid: int | None = None,
                 base: int = USER_BASE, top: int = USER_TOP) -> None:
        if base & _PAGE_MASK or top & _PAGE_MASK or not 0 < base < top:
            raise Misuse(f"bad address space [{base:#x}, {top:#x})")
        self.allowed_prefix = allowed_prefix
        self.uid = os.geteuid() if uid is None else uid
        self.base = base
        self.top = top
        self._starts: list[int] = []  # sorted VMA starts, parallel to _vmas
        self._vmas: list[Vma] = []
        self._backings: dict[str, _Backing] = {}
        self._last: Vma | None = None  # resolve() cache
        self._kseq = 0
        #: -EFAULT results handed out (bad addresses from the app), for stats.
        self.faults = 0
        #: :meth:`map` refusals by reason (foreign, symlink, links, owner, not_regular...)
        self.refused: Counter[str] = Counter()

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
        ``allowed_prefix`` nor to the owner and link checks.  Errors: ``-EINVAL`` (length 0,
        bad prot, unaligned offset/fixed address, not a regular file), ``-EACCES`` (not the
        app's region: another prefix, more than one link, another owner), ``-ELOOP`` (a
        symbolic link), ``-ENOENT`` (no such segment), ``-ENXIO`` (range past the end of the
        segment), ``-EEXIST`` (``fixed`` overlaps), ``-ENOMEM`` (no room in the address space).
        """
        _check_mmap_args(length, prot, offset)
        if not _NAME.match(name):
            raise Misuse(f"bad shm name {name!r}", errno.EINVAL)
        try:
            if not kernel and self.allowed_prefix is not None and \
                    not name.startswith(self.allowed_prefix):
                raise _Refused("foreign", f"{name} is not this task's memory", errno.EACCES)
            fd, st = _open_segment(name)
        except _Refused as e:
            self._refuse(e.reason)
            raise
        try:
            if not kernel:
                self._check_owned(name, st)
            length, start = self._fit(name, st, offset, length, fixed)
        except BaseException:
            os.close(fd)
            raise
        # A kernel region's name can be reused by a later ring with the same fd: never share
        # its backing with another mapping.  An app name shares its backing only while it
        # names the same inode.
        if kernel:
            key = f"{name}#k{self._kseq}"
            self._kseq += 1
        else:
            key = f"{name}#{st.st_dev}:{st.st_ino}"
        backing = self._backings.get(key)
        if backing is None:
            backing = self._backings[key] = _Backing(key, name, kernel, fd)
            backing.read_seals()
        else:
            os.close(fd)  # the backing's own descriptor names the same inode
        self._insert(Vma(start, start + length, prot, offset, backing))
        return start

    def map_fd(self, pid: int, fd: int, length: int, prot: int, *, fixed: int | None = None,
               offset: int = 0, alive: Callable[[], bool] | None = None) -> int:
        """Map ``length`` bytes of the file the task holds at descriptor ``fd``; the address.

        ``pid`` is the task's process as the OS named it (never a message's word).  The kernel
        opens ``/proc/<pid>/fd/<fd>`` (a magic link: followed, so no ``O_NOFOLLOW``), after
        ``stat``-ing its target so nothing but a regular file is ever opened; ``alive()`` (the
        task's pidfd) must still hold after the open, so a pid reused by another process in
        between is refused (``-ESRCH``).  The descriptor is kept: every later access maps
        that inode, whatever the task does with its descriptor number afterwards.

        Accepted: a regular shared-memory file (memfd or tmpfs: ``F_GET_SEALS`` works) with
        at most one link, owned by the task's uid.  Errors: those of :meth:`map` for the
        arguments, ``-EBADF`` (no such descriptor, or it changed during the call),
        ``-ENODEV`` (not a regular file, or not shared memory: a directory, a socket, a
        pipe, a file on disk), ``-EACCES`` (another owner, more links, unreadable),
        ``-EPERM`` (``PROT_WRITE`` on write-sealed memory, as Linux's ``mmap``),
        ``-ENXIO`` (range past its end).  Refusals are counted as :meth:`map`'s.
        """
        _check_mmap_args(length, prot, offset)
        if not 0 <= fd < FD_MAX or pid <= 0:
            raise Misuse(f"bad file descriptor {fd}", errno.EBADF)
        path = f"/proc/{pid}/fd/{fd}"
        own, st = self._open_task_fd(path, fd, alive)
        try:
            label = _fd_label(own, fd)
            self._check_owned(label, st, unnamed_ok=True)
            try:
                seals = fcntl.fcntl(own, fcntl.F_GET_SEALS)
            except OSError:
                self._refuse("not_shmem")
                raise Misuse(f"fd {fd} is not shared memory (memfd or tmpfs)",
                             errno.ENODEV) from None
            if prot & PROT_WRITE and seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
                self._refuse("write_sealed")
                raise Misuse(f"fd {fd} is sealed against writing", errno.EPERM)
            length, start = self._fit(f"fd {fd}", st, offset, length, fixed)
        except BaseException:
            os.close(own)
            raise
        key = f"fd#{st.st_dev}:{st.st_ino}"
        backing = self._backings.get(key)
        if backing is None:
            backing = self._backings[key] = _Backing(key, label, False, own, by_fd=True,
                                                     seals=seals)
        else:
            os.close(own)  # the backing's own descriptor names the same inode
            backing.seals |= seals
        self._insert(Vma(start, start + length, prot, offset, backing))
        return start

    def _open_task_fd(self, path: str, fd: int, alive: Callable[[], bool] | None
                      ) -> tuple[int, os.stat_result]:
        """Open the task's descriptor through ``/proc``: ``(our fd, its fstat)``."""
        try:
            before = os.stat(path)  # the target's inode: nothing but a regular file is opened
        except (FileNotFoundError, ProcessLookupError):
            raise Misuse(f"bad file descriptor {fd}", errno.EBADF) from None
        except PermissionError:
            self._refuse("permission")
            raise Misuse(f"fd {fd}: permission denied", errno.EACCES) from None
        except OSError as e:
            raise Misuse(f"fd {fd}: {e.strerror}", errno.EBADF) from None
        if not stat.S_ISREG(before.st_mode):
            self._refuse("not_regular")
            raise Misuse(f"fd {fd} is not a regular file", errno.ENODEV)
        try:
            own = os.open(path, _FD_OPEN_FLAGS)
        except FileNotFoundError:
            raise Misuse(f"bad file descriptor {fd}", errno.EBADF) from None
        except PermissionError:
            self._refuse("permission")
            raise Misuse(f"fd {fd}: permission denied", errno.EACCES) from None
        except OSError as e:
            self._refuse("not_regular")
            raise Misuse(f"fd {fd}: {e.strerror}", errno.ENODEV) from None
        try:
            if alive is not None and not alive():
                raise Misuse(f"the process holding fd {fd} is gone", errno.ESRCH)
            st = os.fstat(own)
            if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino) \
                    or not stat.S_ISREG(st.st_mode):
                self._refuse("fd_swapped")
                raise Misuse(f"fd {fd} changed during mm_map", errno.EBADF)
        except BaseException:
            os.close(own)
            raise
        return own, st

    def _refuse(self, reason: str) -> None:
        self.refused[reason] += 1
        MM_COUNTERS[f"map_refused_{reason}"] += 1

    def _check_owned(self, name: str, st: os.stat_result, *, unnamed_ok: bool = False) -> None:
        """An app segment must have one link (none for a memfd entered by descriptor:
        ``unnamed_ok``) and belong to the task (``-EACCES``)."""
        if st.st_nlink > 1 or (st.st_nlink == 0 and not unnamed_ok):
            self._refuse("links")
            raise Misuse(f"{name} has {st.st_nlink} links", errno.EACCES)
        if st.st_uid != self.uid:
            self._refuse("owner")
            raise Misuse(f"{name} belongs to uid {st.st_uid}, not {self.uid}", errno.EACCES)

    def _fit(self, what: str, st: os.stat_result, offset: int, length: int,
             fixed: int | None) -> tuple[int, int]:
        """``(page-rounded length, address)`` for a mapping of ``[offset, offset + length)``
        of the object ``st`` describes (-ENXIO past its end; :meth:`_place` for the rest)."""
        length = _page_up(length)
        if offset + length > _page_up(st.st_size):
            raise Misuse(f"{what}: [{offset}, {offset + length}) past its {st.st_size} bytes",
                         errno.ENXIO)
        return length, self._place(length, fixed)

    def _place(self, length: int, fixed: int | None) -> int:
        """Where a new mapping of ``length`` bytes goes (``fixed`` or the lowest gap)."""
        if fixed is not None:
            if fixed & _PAGE_MASK or fixed < self.base or fixed + length > self.top:
                raise Misuse(f"bad fixed address {fixed:#x}", errno.EINVAL)
            if self._overlaps(fixed, fixed + length):
                raise Misuse(f"[{fixed:#x}, {fixed + length:#x}) overlaps a mapping",
                             errno.EEXIST)
            return fixed
        return self._find_gap(length)

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

    def pin_region(self, vma: Vma) -> Region:
        """A mapping of the whole inode behind ``vma``, for the caller to keep and close.

        Linux ``pin_user_pages`` of a long-lived buffer (a zcrx area): the inode :meth:`map`
        checked, through its descriptor, never the name again.  ``-EFAULT`` when that inode
        lost its name before the kernel first touched it, cannot be mapped, or is not sealed
        against shrinking (:meth:`check_pinnable`).
        """
        self.check_pinnable(vma)
        return vma.backing.pin()

    def pin(self, addr: int, length: int, write: bool) -> np.ndarray:
        """:meth:`resolve` for a view the kernel keeps (a user-memory zcrx RQ, a buffer ring):
        the memory must be pinnable (:meth:`check_pinnable`), else ``-EFAULT``."""
        view = self.resolve(addr, length, write)
        vma = self.find(addr)
        if vma is not None:
            self.check_pinnable(vma)
        return view

    def check_pinnable(self, vma: Vma) -> None:
        """A long-term pin needs memory that can never shrink under the kernel: a kernel
        region, or app memory sealed ``F_SEAL_SHRINK | F_SEAL_SEAL`` (read now: seals only
        grow).  Else ``-EFAULT`` (what ``pin_user_pages`` says of memory it cannot pin),
        counted in ``pin_refused_unsealed``."""
        b = vma.backing
        if b.kernel or b.read_seals() & PIN_SEALS == PIN_SEALS:
            return
        self.refused["pin_unsealed"] += 1
        MM_COUNTERS["pin_refused_unsealed"] += 1
        self.faults += 1
        raise Misuse(f"{vma.name} is not sealed against shrinking (F_SEAL_SHRINK | "
                     "F_SEAL_SEAL): the kernel cannot pin it", errno.EFAULT)

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
