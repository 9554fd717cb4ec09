"""Handlers for the emulated syscalls of :mod:`shared.syscalls` (memory, sockets, io_uring).

Each handler takes ``(ctx, msg, peer)``: the :class:`KernelContext` (the kernel state the
syscall touches), the validated request and the caller's control-plane identity, which names
the calling task (``attach`` creates it).  A handler returns the reply body (or a
:class:`~shared.control.Reply` with blobs), raises :class:`~shared.errors.Misuse` with the
errno Linux would return, or returns :data:`~shared.control.DEFER` when the answer comes later
(``io_uring_enter`` waiting for CQEs).  :func:`handlers` binds them to a context for a
:class:`~shared.control.ControlServer`; :func:`service` is what the kernel loop calls each
iteration to run io_uring's periodic work and send the deferred replies.  Nothing here does
I/O of its own except through the server passed to :func:`service`.

Who owns what: every object reached from here is kernel-process state (tasks, sockets, rings).
Shared memory is only created by io_uring (kernel regions: :mod:`driver_proc.io_uring` and the
modules beside it) and by apps (their memory, entered with ``mm_map``); see those modules.

Not here: ``ethtool``, ``stats``, ``status``, ``shutdown`` (the integrator's, in the kernel
loop), and the zcrx register opcodes (plugged into :class:`driver_proc.setup.IoUring` by
:class:`driver_proc.zcrx.Zcrx`, which :meth:`KernelContext.create` installs).

Identity: a task's pid and uid are what the OS says about its control connection (the
:class:`~shared.control.Peer` credentials), never what a message says; a request whose
connection's pid is not the task's is treated as coming from a process that never attached.

Departures: the calling task is identified by its control socket, so a process that recreates
its control socket (after a timeout) must ``attach`` again and gets a new task; syscalls from a
peer that never attached fail with ``-ESRCH``.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from driver_proc.files import NOFILE_MAX, SkbStore, SocketFile, Sockets, Task, Tasks
from driver_proc.io_uring import Wait
from driver_proc.setup import IoUring
from driver_proc.tcp import SocketTable
from driver_proc.zcrx import Zcrx
from shared import abi, bpf
from shared.control import DEFER, ControlServer, Handler, HandlerResult, Reply, peer_cred
from shared.errors import Misuse
from shared.msg import Message
from shared.syscalls import MIN_NAPI_ID, RLIMIT_NOFILE, SO_INCOMING_NAPI_ID, SOL_SOCKET

__all__ = [
    "SYSCALLS",
    "KernelContext",
    "handlers",
    "service",
    "task_exit",
]


@dataclass
class KernelContext:
    """What the syscall handlers act on (a slice of the kernel process's state)."""

    run: str
    sockets: Sockets
    rings: IoUring
    tasks: Tasks
    #: the zcrx subsystem (RECV_ZC, ZCRX_IFQ/CTRL, QUERY); its ``netdevs`` are the kernel's
    zcrx: Zcrx | None = None

    @property
    def skbs(self) -> SkbStore:
        return self.sockets.skbs

    @classmethod
    def create(cls, run: str, skbs: SkbStore, table: SocketTable | None = None, *,
               kernel: tuple[int, int] = abi.LINUX_VERSION) -> KernelContext:
        """A context with a fresh socket layer (over ``table``, or a new one), io_uring and
        zcrx (no netdevs: NODEV only, until the kernel hands it its netdevs)."""
        sockets = Sockets(table if table is not None else SocketTable(), skbs)
        rings = IoUring(run, sockets, skbs)
        return cls(run, sockets, rings, Tasks(run), Zcrx(rings, skbs=skbs, kernel=kernel))


def _task(ctx: KernelContext, peer: Any) -> Task:
    return ctx.tasks.by_peer(peer)


# -- process ------------------------------------------------------------------------------------


def sys_attach(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    """Create the calling process's task, as the OS names it.

    The pid and uid are the connection's peer credentials (SO_PEERCRED, :class:`Peer`); the
    ``pid`` the message carries is ignored (apps still send it; nothing believes it).  A
    connection the OS says nothing about (not ``ipc://``) cannot attach: ``-EPERM``.
    ``cap_net_admin`` in the message can only drop the capability the launcher granted.
    """
    b = msg.body
    cred = peer_cred(peer)
    if cred is None:
        raise Misuse("attach needs a unix (ipc://) connection: the kernel learns who you are "
                     "from the socket's peer credentials", errno.EPERM)
    task = ctx.tasks.attach(peer, cred.pid, b["name"], b["cap_net_admin"], uid=cred.uid)
    return {"task": task.tid}


def task_exit(ctx: KernelContext, task: Task) -> None:
    """The process died or detached: close every file (rings torn down, sockets released),
    drop its mm, forget the task.  Idempotent."""
    for fd in sorted(task.files):
        if fd in task.files:
            ctx.rings.close_fd(task, fd)
    task.mm.close()
    ctx.tasks.forget(task)


def sys_bye(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    """``bye``: the process is going away; same as its death."""
    task = ctx.tasks.find_peer(peer)
    if task is not None:
        task_exit(ctx, task)
    return None


# -- memory -------------------------------------------------------------------------------------


def sys_mm_map(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    """``mm_map`` by shm name, or by the caller's own descriptor number (``fd``): the
    kernel opens ``/proc/<task pid>/fd/<fd>``, the pid being the one the OS gave at attach,
    and checks the task's pidfd is still alive after that open (a reused pid is refused)."""
    b = msg.body
    task = _task(ctx, peer)
    if b["fd"] >= 0:
        watch = task.watch
        alive = (lambda: not watch.dead) if watch is not None else None
        addr = task.mm.map_fd(task.pid, b["fd"], b["length"], b["prot"], alive=alive)
    else:
        addr = task.mm.map(b["name"], b["length"], b["prot"])
    return {"addr": addr}


def sys_mm_unmap(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    b = msg.body
    _task(ctx, peer).mm.unmap(b["addr"], b["length"])
    return {"res": 0}


def sys_mm_protect(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    b = msg.body
    _task(ctx, peer).mm.protect(b["addr"], b["length"], b["prot"])
    return {"res": 0}


def sys_mmap(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    b = msg.body
    region, addr = ctx.rings.mmap(_task(ctx, peer), b["fd"], b["offset"], b["length"])
    return {"name": region.name, "offset": 0, "length": b["length"], "addr": addr}


# -- sockets ------------------------------------------------------------------------------------


def sys_socket(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    b = msg.body
    task = _task(ctx, peer)
    sf = ctx.sockets.socket(b["domain"], b["type"], b["protocol"], uid=task.uid)
    return {"res": task.install(sf)}


def sys_bind(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    b = msg.body
    ctx.sockets.bind(_task(ctx, peer).get_socket(b["fd"]), b["addr"], b["port"])
    return {"res": 0}


def sys_listen(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    b = msg.body
    ctx.sockets.listen(_task(ctx, peer).get_socket(b["fd"]), b["backlog"])
    return {"res": 0}


def sys_close(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    ctx.rings.close_fd(_task(ctx, peer), msg.body["fd"])
    return {"res": 0}


def sys_getsockname(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    sf: SocketFile = _task(ctx, peer).get_socket(msg.body["fd"])
    return {"addr": sf.addr_text(sf.local_addr), "port": sf.local_port}


def sys_getpeername(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    sf: SocketFile = _task(ctx, peer).get_socket(msg.body["fd"])
    if not sf.is_connected:
        raise Misuse("socket is not connected", errno.ENOTCONN)
    return {"addr": sf.addr_text(sf.peer_addr), "port": sf.peer_port}


def sys_getsockopt(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    """``SO_INCOMING_NAPI_ID``: the NAPI id the socket's last skb was received on (0 for a
    socket that never received one, as Linux reports ids below ``MIN_NAPI_ID`` as 0)."""
    b = msg.body
    sf: SocketFile = _task(ctx, peer).get_socket(b["fd"])
    if b["level"] != SOL_SOCKET or b["optname"] != SO_INCOMING_NAPI_ID:
        raise Misuse(f"getsockopt level {b['level']} optname {b['optname']}", errno.ENOPROTOOPT)
    napi_id = sf.conn.napi_id if sf.conn is not None else 0
    return {"res": 0, "value": napi_id if napi_id >= MIN_NAPI_ID else 0}


def sys_setsockopt(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    """``SO_REUSEPORT``, ``SO_ATTACH_REUSEPORT_CBPF``, ``SO_DETACH_REUSEPORT_BPF``
    (``sk_setsockopt``): an int option shorter than 4 bytes is ``-EINVAL``; the program's
    ``struct sock_fprog`` must be exactly 16 bytes (``-EINVAL``) and its instructions are
    read through the task's mm (``-EFAULT``), then checked (:func:`shared.bpf.check`)."""
    b = msg.body
    task = _task(ctx, peer)
    sf: SocketFile = task.get_socket(b["fd"])
    optval = msg.blobs[0]
    name = b["optname"]
    if b["level"] != SOL_SOCKET or name not in (bpf.SO_REUSEPORT, bpf.SO_ATTACH_REUSEPORT_CBPF,
                                                bpf.SO_DETACH_REUSEPORT_BPF):
        raise Misuse(f"setsockopt level {b['level']} optname {name}", errno.ENOPROTOOPT)
    if name == bpf.SO_ATTACH_REUSEPORT_CBPF:
        if len(optval) != bpf.sock_fprog.itemsize:
            raise Misuse(f"sock_fprog is {bpf.sock_fprog.itemsize} bytes", errno.EINVAL)
        fprog = np.frombuffer(optval, dtype=bpf.sock_fprog)[0]
        n, ptr = int(fprog["len"]), int(fprog["filter"])
        if n == 0 or n > bpf.BPF_MAXINSNS:
            raise Misuse(f"sock_fprog.len {n}", errno.EINVAL)
        raw = task.mm.resolve(ptr, n * bpf.sock_filter.itemsize, write=False)
        ctx.sockets.attach_reuseport_cbpf(sf, bpf.check(bpf.unpack(raw.tobytes())))
        return {"res": 0}
    if len(optval) < 4:
        raise Misuse("optlen < sizeof(int)", errno.EINVAL)
    if name == bpf.SO_REUSEPORT:
        ctx.sockets.set_reuseport(sf, int.from_bytes(optval[:4], "little", signed=True) != 0)
    else:
        ctx.sockets.detach_reuseport_bpf(sf)
    return {"res": 0}


def sys_setrlimit(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    """``RLIMIT_NOFILE`` only: the task's descriptor limit (``-EPERM`` above the hard limit,
    ``-EINVAL`` for another resource or a limit below 1)."""
    b = msg.body
    if b["resource"] != RLIMIT_NOFILE or b["cur"] < 1:
        raise Misuse(f"setrlimit resource {b['resource']} cur {b['cur']}", errno.EINVAL)
    if b["cur"] > NOFILE_MAX:
        raise Misuse(f"RLIMIT_NOFILE {b['cur']} above the hard limit", errno.EPERM)
    _task(ctx, peer).nofile = b["cur"]
    return {"res": 0}


# -- io_uring -----------------------------------------------------------------------------------


def sys_io_uring_setup(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    fd, params = ctx.rings.setup(_task(ctx, peer), msg.body["entries"], msg.blobs[0])
    return Reply({"res": fd}, [params])


def sys_io_uring_enter(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    b = msg.body
    r = ctx.rings.enter(_task(ctx, peer), b["fd"], b["to_submit"], b["min_complete"],
                        b["flags"], b["timeout_ms"], token=(peer, msg),
                        min_wait_usec=b["min_wait_usec"])
    if isinstance(r, Wait):
        return DEFER
    return {"res": r}


def sys_io_uring_register(ctx: KernelContext, msg: Message, peer: Any) -> HandlerResult:
    b = msg.body
    res, blobs = ctx.rings.register(_task(ctx, peer), b["fd"], b["opcode"], b["nr_args"],
                                    list(msg.blobs))
    return Reply({"res": res}, blobs)


SyscallHandler = Callable[[KernelContext, Message, Any], HandlerResult]

#: Message type -> handler, for every syscall this module serves.
SYSCALLS: dict[str, SyscallHandler] = {
    "attach": sys_attach,
    "bye": sys_bye,
    "mm_map": sys_mm_map,
    "mm_unmap": sys_mm_unmap,
    "mm_protect": sys_mm_protect,
    "mmap": sys_mmap,
    "socket": sys_socket,
    "bind": sys_bind,
    "listen": sys_listen,
    "close": sys_close,
    "getsockname": sys_getsockname,
    "getpeername": sys_getpeername,
    "getsockopt": sys_getsockopt,
    "setsockopt": sys_setsockopt,
    "setrlimit": sys_setrlimit,
    "io_uring_setup": sys_io_uring_setup,
    "io_uring_enter": sys_io_uring_enter,
    "io_uring_register": sys_io_uring_register,
}


def handlers(ctx: KernelContext) -> dict[str, Handler]:
    """The handlers of :data:`SYSCALLS` bound to ``ctx``, for ``ControlServer(handlers=...)``."""
    def bind(fn: SyscallHandler) -> Handler:
        return lambda msg, peer: fn(ctx, msg, peer)
    return {name: bind(fn) for name, fn in SYSCALLS.items()}


def service(ctx: KernelContext, server: ControlServer, now: float | None = None) -> int:
    """Per-iteration work of the kernel loop for io_uring: SQPOLL, overflow flushes, wait
    timeouts, then the replies of every finished ``io_uring_enter`` wait.

    Returns how much was done (SQEs consumed + CQEs flushed + replies sent), 0 when idle.
    """
    now = time.monotonic() if now is None else now
    work = ctx.rings.poll(now)
    for w in ctx.rings.take_completed_waits():
        work += 1
        peer, msg = w.token
        res = w.result if w.result is not None else 0
        if res >= 0:
            server.reply(peer, msg, {"res": res})
        else:
            server.reply_error(peer, msg, -res, os.strerror(-res))
    return work
