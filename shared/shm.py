"""POSIX shared-memory regions: the only way zcrx-emu processes exchange data.

A :class:`Region` is one POSIX shm object mapped into this process.  Names are
``/zcrx.<run>.<owner>.<object>``: ``<run>`` is the run id (topology name plus a
random token), ``<owner>`` the role that created it (``nic``, ``kernel``,
``app3``...), ``<object>`` what it holds (``q0.rxring``, ``area0``...).  Fields are
``[A-Za-z0-9_-]`` with dots between them (the object part may contain dots), so
a run's segments are exactly the ``/dev/shm`` entries starting ``zcrx.<run>.``.

Lifetime rules (DESIGN §2):

* The creator creates exclusively (``O_CREAT|O_EXCL``), mode 0600, with a
  page-aligned size, and allocates its pages up front (``fallocate``: tmpfs
  zero-fills them now, as a pin or a page allocation would), so the first DMA into
  the region does not pay the allocation, only mapping the page (a minor fault
  every mapping pays once, the creator's own included).  A creator may leave the
  tail of a region to be allocated at first touch (``Region.create(allocate=)``:
  the kernel's page pools, which a queue bound to zcrx never touches) or by a
  helper thread later (``keep_fd`` + :meth:`Region.allocate_later`: header slots);
  the file system must have room for it at creation (else ENOMEM).
* Only the creator unlinks (:meth:`Region.unlink`).  Everyone else attaches and
  detaches.  Segments survive SIGKILL of every process that mapped them, so
  nothing may rely on process exit: :func:`remove_run_segments` is what
  ``zcrx cleanup`` uses to remove a run's leftovers.
* Detaching drops this process's mapping.  numpy views into it keep the mapping
  alive until they are garbage; :meth:`Region.close` then defers the unmap
  instead of failing.

Sealed app memory (:meth:`Region.memfd`): an app's long-lived memory (zcrx areas, RQs,
buffer rings, receive buffers) is a memfd rather than a named segment: it has no name in
``/dev/shm`` (nothing to unlink, nothing another process can open by name), and it is sealed
``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`` before anyone else maps it, so no process, its
creator included, can make it shorter than the mappings the kernel and the NIC keep of it
(touching a mapping past a file's end is SIGBUS).  The region keeps its descriptor
(:attr:`Region.fd`): the kernel reaches the memory through ``/proc/<pid>/fd/<fd>``
(``mm_map`` by fd) and the NIC through the kernel's own descriptor
(:meth:`Region.open_proc_fd`), never by a name the app could swap.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import mmap
import os
import re
import stat
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np
import posix_ipc

from shared.errors import Misuse

PAGE_SIZE = mmap.PAGESIZE
SHM_DIR = "/dev/shm"
NAME_PREFIX = "zcrx"
_FIELD = re.compile(r"^[A-Za-z0-9_-]+$")
_OBJECT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
# Linux NAME_MAX for a /dev/shm entry is 255; keep well under it.
_MAX_NAME = 200

#: ``fcntl`` seal bits (Linux ``<linux/fcntl.h>``; ``F_SEAL_FUTURE_WRITE`` is not in Python's
#: ``fcntl`` module).
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
#: What :meth:`Region.memfd` seals by default: a fixed size nobody can change, for good.
MEMFD_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
#: What a long-term pin (zcrx area, user RQ, buffer ring) needs (``driver_proc.mm``).
PIN_SEALS = F_SEAL_SHRINK | F_SEAL_SEAL
_MEMFD_PREFIX = "memfd:"


def page_align(size: int) -> int:
    """Round ``size`` up to a whole number of pages (at least one page)."""
    size = max(int(size), 1)
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def region_name(run: str, owner: str, obj: str) -> str:
    """The shm name ``/zcrx.<run>.<owner>.<object>``, validated."""
    if not _FIELD.match(run):
        raise Misuse(f"bad run id {run!r}: use letters, digits, '_' and '-'")
    if not _FIELD.match(owner):
        raise Misuse(f"bad region owner {owner!r}: use letters, digits, '_' and '-'")
    if not _OBJECT.match(obj):
        raise Misuse(f"bad region object name {obj!r}")
    name = f"/{NAME_PREFIX}.{run}.{owner}.{obj}"
    if len(name) > _MAX_NAME:
        raise Misuse(f"region name too long ({len(name)} > {_MAX_NAME}): {name}")
    return name


class Region:
    """One mapped POSIX shm object.

    Use :meth:`create` (the owner) or :meth:`attach` (everyone else); both return
    a mapped region usable as a context manager.  ``buf`` is the mmap object and
    :meth:`array` gives numpy views of it.
    """

    def __init__(self, name: str, size: int, mm: mmap.mmap, *, owner: bool,
                 fd: int = -1) -> None:
        self.name = name
        self.size = size
        self.buf: mmap.mmap | None = mm
        self.is_owner = owner
        #: a descriptor kept with the mapping (a memfd, the kernel's checked descriptor of
        #: app memory, or a segment created with ``keep_fd``): closed by :meth:`detach`;
        #: else -1
        self.fd = fd
        # a memfd has no name to unlink
        self._unlinked = name.startswith(_MEMFD_PREFIX)

    # -- paired verbs: create/unlink, attach/detach -------------------------------

    @classmethod
    def create(cls, name: str, size: int, *, pretouch: bool = True,
               uid: int | None = None, allocate: int | None = None,
               keep_fd: bool = False) -> Region:
        """Create the segment exclusively (mode 0600), size it, allocate its pages, map it.

        ``allocate``: how many bytes from the start get their pages now (default: all of
        them with ``pretouch``, none without); the rest get theirs on first touch, or from
        :meth:`allocate_later` (``keep_fd``: the region keeps its descriptor for that).
        ``uid``: the process whose memory this is, when not the creator's (the kernel
        creating an app's rings as root): the segment is given to that uid, still 0600, so
        that process and root reach it and no other app does.  Misuse ENOMEM when /dev/shm
        cannot hold the pages allocated now (nothing is left behind)."""
        size = page_align(size)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError as e:
            raise Misuse(f"shm segment {name} already exists", errno=17) from e
        try:
            if uid is not None and uid != os.geteuid():
                os.fchown(shm.fd, uid, -1)
            now = (size if pretouch else 0) if allocate is None else max(0, min(allocate, size))
            _allocate(shm.fd, name, now)
            _check_room(shm.fd, name, size - now)
            mm = mmap.mmap(shm.fd, size)
            fd = os.dup(shm.fd) if keep_fd else -1
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise
        shm.close_fd()
        return cls(name, size, mm, owner=True, fd=fd)

    def allocate_later(self, offset: int, nbytes: int) -> Callable[[], None]:
        """A job that gives bytes ``[offset, offset + nbytes)`` their pages (``fallocate``),
        for another thread to run while this one goes on.  It takes the descriptor the
        region kept (``create(keep_fd=True)``) and closes it when done, so the region may
        be closed meanwhile.  A full /dev/shm is not an error there: those pages come at
        first touch."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            raise Misuse(f"{self.name}: no descriptor kept to allocate through")

        def job() -> None:
            try:
                os.posix_fallocate(fd, offset, nbytes)
            except OSError:
                pass
            finally:
                os.close(fd)
        return job

    def touch(self, nbytes: int) -> None:
        """Fault the first ``nbytes`` into this process's mapping now: one store per page (a
        page not allocated yet is allocated, zero-filled), so this process does not take
        the faults in its hot path later."""
        assert self.buf is not None
        np.frombuffer(self.buf, dtype=np.uint8, count=min(nbytes, self.size))[::PAGE_SIZE] = 0

    @classmethod
    def memfd(cls, name: str, size: int, *, seals: int = MEMFD_SEALS,
              pretouch: bool = True) -> Region:
        """Anonymous shared memory (``memfd_create(MFD_ALLOW_SEALING | MFD_CLOEXEC)``) of
        ``size`` bytes (page aligned), its pages allocated (``pretouch``: as :meth:`create`),
        sealed with ``seals`` before it is mapped.

        ``name`` is ``/zcrx.<run>.<owner>.<object>`` as for :meth:`create` but names nothing
        in ``/dev/shm``: the region's :attr:`name` is ``memfd:<that name>``, what
        ``/proc/<pid>/fd`` shows (a label only).  The region keeps the descriptor (:attr:`fd`)
        until :meth:`close`; there is nothing to unlink."""
        size = page_align(size)
        label = name.lstrip("/")
        fd = os.memfd_create(label, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if pretouch:
                _allocate(fd, name, size)
            if seals:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(_MEMFD_PREFIX + label, size, mm, owner=True, fd=fd)

    @classmethod
    def open_proc_fd(cls, pid: int, fd: int, name: str, *,
                     inode: tuple[int, int] | None = None) -> Region:
        """Map the file process ``pid`` holds at descriptor ``fd`` (whole size) through
        ``/proc/<pid>/fd/<fd>``: the NIC mapping the very inode the kernel checked.

        ``inode`` (``(st_dev, st_ino)``) must match what was opened.  Raises ``Misuse``:
        ``-ENOENT`` (no such process or descriptor), ``-EINVAL`` (not a regular file, or
        another inode than ``inode``), ``-EACCES``; the descriptor is not kept."""
        path = f"/proc/{int(pid)}/fd/{int(fd)}"
        try:
            st = os.stat(path)  # the target's inode, before opening anything
        except OSError as e:
            raise _proc_error(path, name, e) from None
        if not stat.S_ISREG(st.st_mode):
            raise Misuse(f"{path} ({name}) is not a regular file", _errno.EINVAL)
        try:
            own = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            raise _proc_error(path, name, e) from None
        try:
            st = os.fstat(own)
            if not stat.S_ISREG(st.st_mode) or (
                    inode is not None and (st.st_dev, st.st_ino) != tuple(inode)):
                raise Misuse(f"{path} ({name}) is not the inode expected", _errno.EINVAL)
            if st.st_size <= 0:
                raise Misuse(f"{path} ({name}) is empty", _errno.EINVAL)
            mm = mmap.mmap(own, st.st_size)
        except OSError as e:
            raise Misuse(f"{path} ({name}): {e.strerror}", _errno.EINVAL) from None
        finally:
            os.close(own)
        return cls(name, st.st_size, mm, owner=False)

    @classmethod
    def attach(cls, name: str, *, size: int | None = None) -> Region:
        """Map an existing segment (its whole size, or check it is ``size``)."""
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as e:
            raise Misuse(f"no shm segment {name}", errno=2) from e
        try:
            actual = shm.size
            if size is not None and page_align(size) > actual:
                raise Misuse(f"shm segment {name} has {actual} bytes, expected {size}")
            mm = mmap.mmap(shm.fd, actual)
        finally:
            shm.close_fd()
        return cls(name, actual, mm, owner=False)

    def detach(self) -> None:
        """Unmap from this process (and close :attr:`fd`).  Deferred to GC while numpy views
        still exist."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        mm, self.buf = self.buf, None
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            # Exported views (numpy arrays, memoryviews) still point into the
            # mapping; it is unmapped when the last of them is collected.
            pass

    def unlink(self) -> None:
        """Remove the name (creator only).  Mappings stay valid until detached."""
        if not self.is_owner:
            raise Misuse(f"only the creator unlinks {self.name}", errno=1)
        if self._unlinked:
            return
        self._unlinked = True
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def close(self) -> None:
        """Detach, and unlink if we created it."""
        self.detach()
        if self.is_owner:
            self.unlink()

    def __enter__(self) -> Region:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- views ---------------------------------------------------------------------

    def array(self, dtype: Any = np.uint8, offset: int = 0, count: int = -1) -> np.ndarray:
        """A numpy view of the region (no copy)."""
        if self.buf is None:
            raise Misuse(f"region {self.name} is detached", errno=9)
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=offset)

    def __repr__(self) -> str:
        state = "mapped" if self.buf is not None else "detached"
        return f"Region({self.name!r}, {self.size} bytes, {state}, owner={self.is_owner})"


def _allocate(fd: int, name: str, nbytes: int) -> None:
    """Give the first ``nbytes`` of file ``fd`` their pages now (``fallocate``, zero-filled by
    tmpfs), without mapping them anywhere: a third of the cost of storing to every page
    of a mapping (the stores take one fault each), and the processes that map the file later
    pay the same minor fault per page either way.  Misuse ENOMEM if /dev/shm is full."""
    if nbytes <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        raise Misuse(f"{name}: cannot allocate {nbytes} bytes: {e.strerror}",
                     errno=_errno.ENOMEM) from None


def _check_room(fd: int, name: str, later: int) -> None:
    """Misuse ENOMEM unless the file system of ``fd`` has room now for the ``later`` bytes
    whose pages are allocated at first touch: a region that cannot get them is refused at
    creation rather than found out by the process that first writes it (SIGBUS).  A check,
    not a reservation: memory taken by others meanwhile still counts against it."""
    if later <= 0:
        return
    st = os.fstatvfs(fd)
    if st.f_bavail * st.f_frsize < later:
        raise Misuse(f"{name}: {later} bytes to be allocated on first touch, "
                     f"{st.f_bavail * st.f_frsize} free in its file system",
                     errno=_errno.ENOMEM)


def _proc_error(path: str, name: str, e: OSError) -> Misuse:
    """An ``OSError`` reaching ``/proc/<pid>/fd/<n>`` as the errno a caller reports."""
    if e.errno in (_errno.ENOENT, _errno.ESRCH):
        return Misuse(f"{path} ({name}): no such descriptor", _errno.ENOENT)
    if e.errno in (_errno.EACCES, _errno.EPERM):
        return Misuse(f"{path} ({name}): permission denied", _errno.EACCES)
    return Misuse(f"{path} ({name}): {e.strerror}", _errno.EINVAL)


def run_prefix(run: str) -> str:
    """The ``/dev/shm`` entry prefix shared by every segment of ``run``."""
    region_name(run, "x", "x")  # validates the run id
    return f"{NAME_PREFIX}.{run}."


def owner_prefix(run: str, owner: str) -> str:
    """The shm name prefix ``/zcrx.<run>.<owner>.`` of every segment ``owner`` creates."""
    region_name(run, owner, "x")  # validates the run id and the owner
    return f"/{NAME_PREFIX}.{run}.{owner}."


def is_owner_prefix(prefix: str) -> bool:
    """True for a prefix naming one owner of one run (``/zcrx.<run>.<owner>.``): narrow
    enough to unlink by.  Anything broader (``/zcrx.``, a whole run) is refused."""
    stem = prefix.lstrip("/")
    return stem.startswith(f"{NAME_PREFIX}.") and stem.count(".") >= 3


def remove_prefix_segments(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with ``prefix`` (one owner of one run: see
    :func:`is_owner_prefix`, else nothing is removed).  Only the names go: live mappings
    stay valid.  Returns the names removed (with leading ``/``)."""
    if not is_owner_prefix(prefix):
        return []  # never a broad pattern
    stem = prefix.lstrip("/")
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    removed = []
    for e in sorted(entries):
        if e.startswith(stem):
            try:
                os.unlink(os.path.join(SHM_DIR, e))
                removed.append("/" + e)
            except FileNotFoundError:
                pass
    return removed


def list_run_segments(run: str) -> list[str]:
    """Every shm name (with leading ``/``) that belongs to ``run``, sorted."""
    prefix = run_prefix(run)
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted("/" + e for e in entries if e.startswith(prefix))


def list_all_runs() -> list[str]:
    """Run ids that have at least one segment in ``/dev/shm``."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    runs = set()
    for e in entries:
        parts = e.split(".")
        if len(parts) >= 4 and parts[0] == NAME_PREFIX:
            runs.add(parts[1])
    return sorted(runs)


def remove_run_segments(run: str, names: list[str] | None = None) -> list[str]:
    """Unlink the given names (from a manifest) and every segment with the run's prefix.

    Idempotent: names already gone are skipped.  Returns what was removed.
    """
    targets = set(names or ()) | set(list_run_segments(run))
    removed = []
    for name in sorted(targets):
        try:
            posix_ipc.unlink_shared_memory(name)
            removed.append(name)
        except posix_ipc.ExistentialError:
            pass
    return removed
