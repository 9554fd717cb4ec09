"""The syscall gate: this process's connection to the emulated kernel.

The kernel is another process (``driver_proc``).  A syscall is one request over the control
plane (:class:`Kernel`, a :class:`~shared.control.ControlClient` of ``<rundir>/kernel.sock``;
the message types are :mod:`shared.syscalls`); data never travels that way: regions are named
in the replies and attached by whoever uses them.  :mod:`app_proc.liburing` builds io_uring on
top of :class:`Kernel`; sample programs use it for plain syscalls (``socket``, ``listen``...).

Who owns what in shared memory
------------------------------
* **App memory** (:class:`Memory`: receive buffers, provided-buffer rings, zcrx areas): by
  default a memfd made here (:meth:`shared.shm.Region.memfd`, labelled
  ``memfd:zcrx.<run>.app<task>.<tag><N>``), sealed ``F_SEAL_SHRINK | F_SEAL_GROW |
  F_SEAL_SEAL`` before the kernel sees it, and entered into this process's emulated mm with
  ``mm_map`` by descriptor: the kernel opens it through ``/proc/<our pid>/fd/<n>``, so it
  is memory nothing can shrink under the kernel and NIC (which pin it), that no other
  process can open by name, and that leaves nothing in ``/dev/shm``.  ``named=True`` makes a
  named segment (``/zcrx.<run>.app<task>.<tag><N>``, unlinked here) entered by name instead:
  good for short accesses (a RECV buffer), refused for a pin (an area, an RQ, a buffer ring).
  The kernel writes received bytes into buffers it was given; the app writes everything
  else in them.
* **Kernel regions** (``mmap`` of a ring fd) are named by the kernel here and attached by the
  caller (:mod:`app_proc.liburing`).

Finding the run (:func:`locate_run`): one variable is enough.  ``$ZCRX_RUNDIR`` (or the
``rundir`` argument) is the run directory; else ``$ZCRX_RUN`` names a run under the runs
directory (``$ZCRX_RUNS_DIR/<name>``); with neither, the only run that is up is used.  The run
id that names this process's regions (``/zcrx.<run_id>.app<task>.*``) is read from the run's
``manifest.json`` (:mod:`shared.rundir`): it is not the directory's name.  A missing, ambiguous
or stopped run raises :class:`RunNotFound`, one line that says what to set (sample programs
print it and exit 2).  An explicit ``run`` argument (a run id, e.g. ``--run`` beside
``--rundir``) skips the manifest: in-process tests and launchers that know the id use it.

A failing syscall raises :class:`~shared.msg.ControlError` (a
:class:`~shared.errors.ZcrxError`) whose ``errno`` is Linux's; a kernel that stops answering
raises :class:`~shared.errors.PeerGone`, and so does every later call on that connection (a
timed-out control client has lost its identity, hence its task).  At ``attach`` the gate
learns the kernel's pid (``hello``) and holds a pidfd on it (:mod:`shared.watch`): once the
kernel process has exited every syscall raises ``PeerGone("kernel pid N exited")`` at once.
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

import shared.syscalls  # noqa: F401  (registers the syscall message types)
from shared import bpf
from shared.control import ControlClient, ipc_endpoint
from shared.errors import Misuse, PeerGone, Timeout, ZcrxError
from shared.msg import PROTOCOL_VERSION, ControlError, Message
from shared.rundir import ENV_RUNS_DIR, RunInfo, list_runs, read_run, runs_dir
from shared.shm import Region, page_align, region_name
from shared.syscalls import (
    AF_INET,
    AF_INET6,
    PROT_READ,
    PROT_WRITE,
    RLIMIT_NOFILE,
    SO_INCOMING_NAPI_ID,
    SOCK_STREAM,
    SOL_SOCKET,
)
from shared.watch import PidWatch

__all__ = [
    "ENV_RUN",
    "ENV_RUNDIR",
    "Kernel",
    "Memory",
    "RingHandle",
    "RunNotFound",
    "Transport",
    "default_kernel",
    "locate_run",
]

ENV_RUNDIR = "ZCRX_RUNDIR"
ENV_RUN = "ZCRX_RUN"


class RunNotFound(ZcrxError):
    """No run to join, or not the one meant: the message is one line saying what to set (no
    errno: a configuration mistake, not a failed syscall)."""


def _hint() -> str:
    return (f"set {ENV_RUNDIR} to a run directory (eval \"$(zcrx env --name NAME)\"), "
            f"or {ENV_RUN} to a run's name")


def _names(runs: list[RunInfo]) -> str:
    return ", ".join(r.name for r in runs)


def _must_be_up(info: RunInfo, how: str) -> tuple[Path, str]:
    if not info.up:
        raise RunNotFound(f"run {info.name!r} ({how}) is not up: its kernel is not running; "
                          f"start it (zcrx up --name {info.name}) or {_hint()}")
    return info.rundir, info.run_id


def locate_run(rundir: str | Path | None = None) -> tuple[Path, str]:
    """``(run directory, run id)`` of the run this process joins; :class:`RunNotFound` if none.

    ``rundir`` (else ``$ZCRX_RUNDIR``) must hold a run's manifest; else ``$ZCRX_RUN`` names a
    run under the runs directory (its name; a run id is accepted too); else the only run that
    is up.  When ``$ZCRX_RUN`` is set beside a run directory it must name that run.  The run
    must be up (its kernel process running).
    """
    env_run = os.environ.get(ENV_RUN) or None
    given = rundir if rundir is not None else (os.environ.get(ENV_RUNDIR) or None)
    if given is not None:
        how = "rundir" if rundir is not None else f"{ENV_RUNDIR}={given}"
        info = read_run(given)
        if info is None:
            what = "no such directory" if not Path(given).is_dir() else "no run manifest there"
            raise RunNotFound(f"{how}: {what}; {_hint()}")
        if env_run is not None and env_run not in (info.name, info.run_id):
            raise RunNotFound(f"{ENV_RUN}={env_run} is not the run in {how} ({info.name}, id "
                              f"{info.run_id}): unset {ENV_RUN} or make them agree")
        return _must_be_up(info, how)
    base = runs_dir()
    if env_run is not None:
        how = f"{ENV_RUN}={env_run}"
        info = read_run(base / env_run) if "/" not in env_run else None
        if info is None:  # a run id (what older launchers exported) names the run too
            info = next((r for r in list_runs(base) if r.run_id == env_run), None)
        if info is None:
            up = [r for r in list_runs(base) if r.up]
            have = f"runs up: {_names(up)}" if up else "no run is up"
            raise RunNotFound(f"{how}: no such run in {base} (${ENV_RUNS_DIR}; {have}); "
                              f"set {ENV_RUN} to a run's name, or {ENV_RUNDIR}")
        return _must_be_up(info, how)
    up = [r for r in list_runs(base) if r.up]
    if len(up) == 1:
        return up[0].rundir, up[0].run_id
    if not up:
        raise RunNotFound(f"no run is up in {base} (${ENV_RUNS_DIR}): start one (zcrx up), "
                          f"or {_hint()}")
    raise RunNotFound(f"{len(up)} runs are up ({_names(up)}): set {ENV_RUN} to one of their "
                      f"names, or {ENV_RUNDIR}")


class Transport(Protocol):
    """What :class:`Kernel` needs to send syscalls (a ControlClient, or a test double)."""

    def request(self, type: str, body: Any = None, blobs: Iterable[bytes] = (), *,
                timeout_ms: int | None = None) -> Message: ...

    def request_many(self, requests: Sequence[tuple[str, Any]], *,
                     timeout_ms: int | None = None) -> list[Message | ControlError]: ...

    def close(self) -> None: ...



class RingHandle(Protocol):
    """What :meth:`Kernel.close` tears down before it says bye: each ring a library built on
    this connection (:class:`app_proc.liburing.Ring`, kept in ``Kernel._rings``).

    ``queue_exit`` releases it with syscalls; ``_detach`` only drops this process's views of
    the kernel's regions (no syscall), for when the kernel no longer answers.
    """

    def queue_exit(self) -> None: ...

    def _detach(self) -> None: ...


class Memory:
    """App-owned memory: one region created here and entered into the mm at ``addr``.

    ``view`` is the whole region as ``uint8``; ``addr + i`` is ``view[i]`` to the kernel.
    :meth:`close` unmaps it from the mm, detaches and unlinks it.
    """

    def __init__(self, kernel: Kernel, region: Region, addr: int, length: int) -> None:
        self.kernel = kernel
        self.region = region
        self.addr = addr
        self.length = length
        self.view: NDArray[np.uint8] = region.array(np.uint8)[:length]

    @property
    def name(self) -> str:
        """The shm name, or ``memfd:<label>`` for sealed memory (what the kernel calls it)."""
        return self.region.name

    @property
    def fd(self) -> int:
        """This process's descriptor of sealed memory (-1 for a named segment)."""
        return self.region.fd

    def at(self, addr: int, length: int) -> NDArray[np.uint8]:
        """The bytes at virtual address ``addr`` (must lie inside this memory)."""
        off = addr - self.addr
        if off < 0 or off + length > self.length:
            raise Misuse(f"{addr:#x}+{length} is outside {self.name}", errno.EFAULT)
        return self.view[off:off + length]

    def close(self) -> None:
        if self.region.buf is None:
            return
        try:
            if not self.kernel.closed:
                self.kernel.mm_unmap(self.addr, self.length)
        finally:
            self.view = np.empty(0, dtype=np.uint8)
            self.region.close()
            self.kernel._memories.discard(self)


class Kernel:
    """This process's connection to the emulated kernel (its syscall interface).

    Without ``run`` the run is found by :func:`locate_run` (``rundir``, else the environment,
    else the only run that is up); ``run`` (a run id) with ``rundir`` skips that.
    ``transport`` replaces the control client (tests call the handlers in-process).
    """

    def __init__(self, rundir: str | Path | None = None, *, run: str | None = None,
                 name: str | None = None, timeout_ms: int = 5000,
                 transport: Transport | None = None) -> None:
        if run is None:
            rundir, run = locate_run(rundir)
        elif rundir is None:
            rundir = os.environ.get(ENV_RUNDIR) or None
        region_name(run, "x", "x")  # validates the run id
        self.run = run
        #: the run directory (None with a test transport and no directory)
        self.rundir: Path | None = Path(rundir) if rundir is not None else None
        self.name = name or Path(sys.argv[0] or "app").name
        self.timeout_ms = timeout_ms
        if transport is None:
            if rundir is None:
                raise RunNotFound(f"no run directory for run {run!r}: pass rundir= or set "
                                  f"{ENV_RUNDIR}")
            transport = ControlClient(ipc_endpoint(rundir, "kernel"), timeout_ms)
        self.transport: Transport = transport
        self.task: int | None = None
        self.closed = False
        #: why the kernel connection is dead (its pid exited, or a syscall timed out); then
        #: every call fails at once with PeerGone carrying this text
        self.gone: str | None = None
        #: pidfd on the kernel process (set at attach)
        self._kernel_watch: PidWatch | None = None
        self._mem_seq = 0
        self._memories: set[Memory] = set()
        self._rings: set[RingHandle] = set()

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def watched(self) -> bool:
        """True when this process holds a pidfd on the kernel (set at attach)."""
        return self._kernel_watch is not None

    def syscall(self, type: str, body: dict[str, Any] | None = None,
                blobs: Iterable[bytes] = (), *, timeout_ms: int | None = None,
                idempotent: bool = False) -> Message:
        """Send one syscall; ``ControlError`` (errno) on failure, ``PeerGone`` if no answer.

        ``idempotent``: the call may be repeated (a pure wait): when no reply comes in time
        but the kernel is watched and alive, raise ``ControlError(ETIME)`` instead of
        ``PeerGone`` (the connection stays usable: the client keeps its identity)."""
        self._usable()
        try:
            return self.transport.request(type, body or {}, blobs, timeout_ms=timeout_ms)
        except Timeout as exc:
            if idempotent and self._kernel_watch is not None and not self._kernel_watch.dead:
                raise ControlError(type, errno.ETIME, "no reply in time; kernel alive") \
                    from None
            raise self._no_answer(type, exc) from None

    def syscall_many(self, calls: Sequence[tuple[str, dict[str, Any]]]
                     ) -> list[Message | ControlError]:
        """Several independent syscalls pipelined in one round trip (the kernel handles
        them in order, as if made one after the other); each reply or ``ControlError`` in
        its place.  No answer: ``PeerGone``, as :meth:`syscall`."""
        self._usable()
        try:
            return self.transport.request_many(calls)
        except Timeout as exc:
            raise self._no_answer(calls[0][0], exc) from None

    def _no_answer(self, type: str, exc: Timeout) -> PeerGone:
        """A syscall got no answer.  A timed-out client loses its identity, hence its task:
        the connection is dead, whatever the kernel's fate (said once, in ``gone``)."""
        if self._kernel_watch is not None and self._kernel_watch.dead:
            self.gone = f"kernel pid {self._kernel_watch.pid} exited"
        else:
            self.gone = f"kernel not answering {type}: {exc}"
        return PeerGone(self.gone)

    def _usable(self) -> None:
        if self.closed:
            raise Misuse("kernel connection is closed", errno.EBADF)
        if self.gone is not None:
            raise PeerGone(self.gone)
        if self._kernel_watch is not None and self._kernel_watch.dead:
            self.gone = f"kernel pid {self._kernel_watch.pid} exited"
            raise PeerGone(self.gone)

    def _watch_kernel(self, hello: Message | ControlError) -> None:
        """Open a pidfd on the kernel process (its pid from the ``hello`` reply), so every
        later syscall fails at once with PeerGone once it died (DESIGN §6).  Best effort:
        a transport without ``hello`` (in-process tests) is simply not watched."""
        if isinstance(hello, ControlError):
            return
        try:
            pid = hello.body.get("pid")
            if isinstance(pid, int) and pid > 0 and pid != os.getpid():
                self._kernel_watch = PidWatch(pid)
        except (ZcrxError, OSError):
            pass

    def check_kernel(self) -> None:
        """Raise PeerGone if the kernel process is known to be gone (no syscall)."""
        if self.gone is None and self._kernel_watch is not None and self._kernel_watch.dead:
            self.gone = f"kernel pid {self._kernel_watch.pid} exited"
        if self.gone is not None:
            raise PeerGone(self.gone)

    def attach(self, cap_net_admin: bool = True) -> int:
        """Announce this process (once); returns the task id."""
        if self.task is None:
            body = {"pid": os.getpid(), "name": self.name[:64] or "app",
                    "cap_net_admin": cap_net_admin}
            # attach and hello (the kernel's pid, to watch it) in one round trip
            attached, hello = self.syscall_many([
                ("attach", body),
                ("hello", {"role": "app", "pid": os.getpid(), "version": PROTOCOL_VERSION})])
            if isinstance(attached, ControlError):
                raise attached
            self.task = int(attached.body["task"])
            self._watch_kernel(hello)
        return self.task

    @property
    def owner(self) -> str:
        """The owner field of this process's region names (``app<task>``)."""
        return f"app{self.attach()}"

    # -- memory ---------------------------------------------------------------------------------

    def mm_map(self, name: str, length: int, prot: int = PROT_READ | PROT_WRITE) -> int:
        """Enter the named shm segment ``name`` into this task's mm; its address."""
        return int(self.syscall("mm_map", {"name": name, "length": length,
                                           "prot": prot}).body["addr"])

    def mm_map_fd(self, fd: int, length: int, prot: int = PROT_READ | PROT_WRITE) -> int:
        """Enter the memory this process holds at descriptor ``fd`` (a memfd; sealed against
        shrinking if the kernel is to pin it) into this task's mm; its address."""
        return int(self.syscall("mm_map", {"fd": fd, "length": length,
                                           "prot": prot}).body["addr"])

    def mm_unmap(self, addr: int, length: int) -> None:
        self.syscall("mm_unmap", {"addr": addr, "length": length})

    def mm_protect(self, addr: int, length: int, prot: int) -> None:
        self.syscall("mm_protect", {"addr": addr, "length": length, "prot": prot})

    def mmap(self, fd: int, offset: int, length: int) -> tuple[str, int]:
        """``mmap(fd, offset)`` of a kernel region: ``(shm name, address)``."""
        b = self.syscall("mmap", {"fd": fd, "offset": offset, "length": length}).body
        return str(b["name"]), int(b["addr"])

    def alloc_memory(self, length: int, prot: int = PROT_READ | PROT_WRITE,
                     tag: str = "mem", *, named: bool = False) -> Memory:
        """Create ``length`` bytes of app memory (page aligned, its pages allocated) and map
        it.

        Default: a sealed memfd entered by descriptor (the kernel may pin it: areas, RQs,
        buffer rings).  ``named``: a named shm segment entered by name (short accesses only;
        the kernel refuses to pin it with ``-EFAULT``)."""
        if not named:
            return self.alloc_memories([(length, tag)], prot)[0]
        if length <= 0:
            raise Misuse(f"length {length}")
        region = Region.create(self.memory_name(tag), page_align(length))
        try:
            addr = self.mm_map(region.name, region.size, prot)
        except BaseException:
            region.close()
            raise
        mem = Memory(self, region, addr, region.size)
        self._memories.add(mem)
        return mem

    def alloc_memories(self, specs: Sequence[tuple[int, str] | Region],
                       prot: int = PROT_READ | PROT_WRITE) -> list[Memory]:
        """:meth:`alloc_memory` (sealed memfds) of several ``(length, tag)`` at once: their
        ``mm_map`` calls go in one pipelined round trip.  A spec may also be a memfd
        :class:`Region` made already (:meth:`new_memory`, e.g. by a helper thread while
        this one made syscalls): it is entered as it is, and its :class:`Memory` owns it.
        All or nothing: if the kernel refuses one, every region is unmapped and freed and
        its error is raised."""
        for spec in specs:
            if not isinstance(spec, Region) and spec[0] <= 0:
                raise Misuse(f"length {spec[0]}")
        regions: list[Region] = []
        try:
            for spec in specs:
                regions.append(spec if isinstance(spec, Region)
                               else self.new_memory(spec[0], spec[1]))
            replies = self.syscall_many([("mm_map", {"fd": r.fd, "length": r.size,
                                                     "prot": prot}) for r in regions])
        except BaseException:
            for r in regions:
                r.close()
            raise
        mems: list[Memory] = []
        error: ControlError | None = None
        for region, reply in zip(regions, replies, strict=True):
            if isinstance(reply, ControlError):
                error = error or reply
                region.close()
                continue
            mem = Memory(self, region, int(reply.body["addr"]), region.size)
            self._memories.add(mem)
            mems.append(mem)
        if error is not None:
            for mem in mems:
                mem.close()
            raise error
        return mems

    def new_memory(self, length: int, tag: str = "mem", name: str | None = None) -> Region:
        """A sealed memfd of ``length`` bytes, its pages allocated, not yet in the mm
        (:meth:`alloc_memories` enters it).  Makes no syscall, so another thread may call
        it with a ``name`` from :meth:`memory_name`."""
        return Region.memfd(name or self.memory_name(tag), page_align(length))

    def memory_name(self, tag: str) -> str:
        """The next app memory name (``<tag><seq>``, owner ``app<task>``)."""
        self._mem_seq += 1
        return region_name(self.run, self.owner, f"{tag}{self._mem_seq}")

    # -- sockets --------------------------------------------------------------------------------

    def socket(self, domain: int = AF_INET, type: int = SOCK_STREAM, protocol: int = 0) -> int:
        return int(self.syscall("socket", {"domain": domain, "type": type,
                                           "protocol": protocol}).body["res"])

    def bind(self, fd: int, addr: str, port: int) -> None:
        self.syscall("bind", {"fd": fd, "addr": addr, "port": port})

    def listen(self, fd: int, backlog: int = 128) -> None:
        self.syscall("listen", {"fd": fd, "backlog": backlog})

    def close_fd(self, fd: int) -> None:
        self.syscall("close", {"fd": fd})

    def getsockname(self, fd: int) -> tuple[str, int]:
        b = self.syscall("getsockname", {"fd": fd}).body
        return str(b["addr"]), int(b["port"])

    def getpeername(self, fd: int) -> tuple[str, int]:
        b = self.syscall("getpeername", {"fd": fd}).body
        return str(b["addr"]), int(b["port"])

    def setrlimit_nofile(self, cur: int) -> None:
        """``setrlimit(RLIMIT_NOFILE)``: raise (or lower) this task's descriptor limit."""
        self.syscall("setrlimit", {"resource": RLIMIT_NOFILE, "cur": cur})

    def getsockopt(self, fd: int, level: int, optname: int) -> int:
        """An integer socket option (only ``SOL_SOCKET``/``SO_INCOMING_NAPI_ID`` is known)."""
        return int(self.syscall("getsockopt", {"fd": fd, "level": level,
                                               "optname": optname}).body["value"])

    def setsockopt(self, fd: int, level: int, optname: int, optval: bytes) -> None:
        """``setsockopt(fd, level, optname, optval, len(optval))``."""
        self.syscall("setsockopt", {"fd": fd, "level": level, "optname": optname}, [optval])

    def set_reuseport(self, fd: int, on: bool = True) -> None:
        """``setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on)`` (before bind)."""
        self.setsockopt(fd, SOL_SOCKET, bpf.SO_REUSEPORT, int(on).to_bytes(4, "little"))

    def attach_reuseport_cbpf(self, fd: int, insns: list[tuple[int, int, int, int]]) -> None:
        """``SO_ATTACH_REUSEPORT_CBPF``: the instructions are written to this process's memory
        and ``struct sock_fprog`` points at them, as a C program does; the kernel copies them
        in, so the memory is freed again at once."""
        code = bpf.pack(insns)
        mem = self.alloc_memory(max(len(code), 1), tag="bpf")
        try:
            mem.view[:len(code)] = np.frombuffer(code, dtype=np.uint8)
            fprog = np.zeros(1, dtype=bpf.sock_fprog)
            fprog["len"] = len(insns)
            fprog["filter"] = mem.addr
            self.setsockopt(fd, SOL_SOCKET, bpf.SO_ATTACH_REUSEPORT_CBPF, fprog.tobytes())
        finally:
            mem.close()

    def incoming_napi_id(self, fd: int) -> int:
        """``getsockopt(fd, SOL_SOCKET, SO_INCOMING_NAPI_ID)``: the NAPI id of the RX queue
        the socket's last segment came through (0 before any)."""
        return self.getsockopt(fd, SOL_SOCKET, SO_INCOMING_NAPI_ID)

    def queues(self) -> list[dict[str, Any]]:
        """The netdev queue view (``ynl netdev queue-get`` rows: id, type, napi-id, ifindex,
        io-uring), from the kernel's ``status`` reply."""
        return list(self.syscall("status").body.get("queues", []))

    def listen_tcp(self, port: int, addr: str = "0.0.0.0", backlog: int = 128, *,
                   reuseport: bool = False) -> int:
        """socket + bind + listen, the usual server prologue; returns the listening fd.
        ``reuseport``: SO_REUSEPORT before bind (join the port's group at listen)."""
        domain = AF_INET6 if ":" in addr else AF_INET
        fd = self.socket(domain, SOCK_STREAM, 0)
        try:
            if reuseport:
                self.set_reuseport(fd)
            self.bind(fd, addr, port)
            self.listen(fd, backlog)
        except BaseException:
            self.close_fd(fd)
            raise
        return fd

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Exit every ring, free every memory, say bye and close the connection.  Idempotent."""
        if self.closed:
            return
        try:
            for ring in list(self._rings):
                try:
                    ring.queue_exit()
                except (ControlError, PeerGone):
                    ring._detach()
            for mem in list(self._memories):
                try:
                    mem.close()
                except (ControlError, PeerGone):
                    mem.view = np.empty(0, dtype=np.uint8)
                    mem.region.close()
            if self.task is not None:
                try:
                    self.syscall("bye", timeout_ms=1000)
                except (ControlError, PeerGone):
                    pass
        finally:
            for ring in list(self._rings):
                ring._detach()
            for mem in list(self._memories):
                mem.view = np.empty(0, dtype=np.uint8)
                mem.region.close()
            self._memories.clear()
            self._rings.clear()
            self.closed = True
            self.transport.close()

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: Kernel | None = None


def default_kernel() -> Kernel:
    """The process-wide connection made from the environment (closed at exit)."""
    global _default
    if _default is None or _default.closed:
        _default = Kernel()
        atexit.register(_default.close)
    return _default
