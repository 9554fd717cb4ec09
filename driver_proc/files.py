"""Tasks, their file tables, and socket files: the kernel's per-process state.

A :class:`Task` is an attached application process (``attach`` syscall): its pid and uid (what
the OS said about its control connection, never what it wrote: :class:`shared.control.Peer`),
its name, its CAP_NET_ADMIN (DESIGN §9: what the run's launcher granted its pid,
:class:`CapGrants`, and that the app did not drop at attach), its emulated mm
(:class:`driver_proc.mm.Mm`) and its file table ``fd -> file``.  Files are kernel objects: a
:class:`SocketFile` (a TCP socket: new, bound, listening or connected) or an io_uring instance
(:class:`driver_proc.io_uring.Ring`).  Descriptors are allocated lowest-free from 3 (0-2 stand
for stdio, as in a real process) up to :data:`NOFILE` (``-EMFILE`` beyond).

:class:`Sockets` is the socket layer on top of :class:`driver_proc.tcp.SocketTable`: the
``socket/bind/listen/accept/close`` verbs with Linux's errnos, the port bindings, and the map
from a TCP object (connection or listener) back to its file so that readiness reported by the
NAPI path can wake the io_uring requests armed on it.

Ownership: all of this is kernel-process state; nothing here lives in shared memory.  Socket
payload lives in skbs owned by the skb store; every skb handle the TCP layer gives back (on
close) is freed here through ``skbs.free``.

Departures from Linux (documented in docs/design.md):

* TCP is the only protocol on the emulated wire.  ``SOCK_DGRAM`` (UDP) sockets can be
  created and closed, so ``RECV_ZC`` can meet a non-TCP socket (``-EPROTONOSUPPORT``), but
  they cannot be bound (``-EOPNOTSUPP``) and never receive anything; other types
  (``SOCK_RAW``...) are ``-ESOCKTNOSUPPORT``.
* Any address can be bound: the emulated host owns every address the NIC receives for.
* Closing a socket fd cancels the io_uring requests armed on it (they complete with
  ``-ECANCELED``) and releases the socket at once.  Linux keeps the file alive while a request
  holds a reference and completes the request later.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from driver_proc.mm import Mm
from driver_proc.tcp import Listener, SocketTable, TcpReceiver, TcpState, ip_bytes, split_flow_key
from shared.bpf import Program
from shared.errors import Misuse
from shared.shm import owner_prefix
from shared.watch import PidWatch, parent_pid

__all__ = [
    "AF_INET",
    "AF_INET6",
    "EPHEMERAL_HI",
    "EPHEMERAL_LO",
    "NOFILE",
    "SHUT_RD",
    "SHUT_RDWR",
    "SHUT_WR",
    "SOCK_CLOEXEC",
    "SOCK_NONBLOCK",
    "SOCK_STREAM",
    "SkbStore",
    "SocketFile",
    "Sockets",
    "Task",
    "Tasks",
    "Transmit",
    "Waiter",
]

AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_RAW = 3
SOCK_MAX = 11  # SOCK_PACKET (10) + 1
SOCK_NONBLOCK = 0o4000
SOCK_CLOEXEC = 0o2000000
SOCK_TYPE_MASK = 0xF
IPPROTO_TCP = 6
IPPROTO_UDP = 17
SOMAXCONN = 4096
SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2
_ANY_ADDRS = (bytes(16), bytes(10) + b"\xff\xff" + bytes(4))
#: RLIMIT_NOFILE soft limit of every task (at attach; ``setrlimit`` raises it up to
#: :data:`NOFILE_MAX`, Linux's default ``fs.nr_open``).
NOFILE = 1024
NOFILE_MAX = 1 << 20
#: First fd handed out (0, 1, 2 are the process's stdio).
FIRST_FD = 3
#: Linux's default ip_local_port_range.
EPHEMERAL_LO = 32768
EPHEMERAL_HI = 60999


class SkbStore(Protocol):
    """What the socket and io_uring layers need from the skb store (driver_proc/skb.py)."""

    def copy_out(self, handles: Any, offsets: Any, lengths: Any,
                 dst: NDArray[np.uint8]) -> Any:
        """Copy the pieces' payload bytes, in order, contiguously into ``dst``."""

    def free(self, handles: Any) -> Any:
        """Drop the skbs (their buffers go back to their pools)."""


class Transmit(Protocol):
    """TCP's write side as the socket layer sees it (:class:`driver_proc.tcp_output.
    TcpOutput`): what a send may do on a connection, and queueing its bytes."""

    def send_error(self, sock: TcpReceiver) -> int | None: ...

    def send_space(self, sock: TcpReceiver) -> int: ...

    def send(self, sock: TcpReceiver, data: bytes) -> None: ...

    def shutdown_send(self, sock: TcpReceiver) -> None: ...


class Waiter(Protocol):
    """Something armed on a socket's wait queue (an io_uring request)."""

    def wake(self) -> None:
        """The socket may have become ready: try again."""

    def cancel(self, res: int) -> None:
        """Complete now with ``res`` (e.g. ``-ECANCELED``) and disarm."""


# --------------------------------------------------------------------------------------------
# Sockets
# --------------------------------------------------------------------------------------------

_STATE_NEW = "new"
_STATE_BOUND = "bound"
_STATE_LISTEN = "listening"
_STATE_CONNECTED = "connected"
_STATE_CLOSED = "closed"


@dataclass(eq=False)
class SocketFile:
    """One socket file.  ``conn`` is set once connected (accepted), ``listener`` once listening.

    ``waiters`` is the socket's wait queue: io_uring requests armed for readiness, woken in
    order by :meth:`Sockets.wake` (an insertion-ordered dict: arming and disarming one of
    thousands of armed ACCEPTs is O(1)).
    """

    domain: int
    nonblock: bool = False
    protocol: int = 6  # IPPROTO_TCP; IPPROTO_UDP (17) for the datagram stand-in
    state: str = _STATE_NEW
    local_addr: bytes | None = None  # 16-byte form (IPv4-mapped for v4); None = any
    local_port: int = 0
    peer_addr: bytes | None = None
    peer_port: int = 0
    listener: Listener | None = None
    conn: TcpReceiver | None = None
    backlog: int = 0
    waiters: dict[Waiter, None] = field(default_factory=dict)
    #: the creating task's uid (SO_REUSEPORT groups only take sockets of one owner)
    uid: int | None = None
    #: SO_REUSEPORT was set
    reuseport: bool = False
    #: SO_ATTACH_REUSEPORT_CBPF before listen(): the program of the group it may start
    reuse_prog: Program | None = None

    @property
    def is_listening(self) -> bool:
        return self.state == _STATE_LISTEN

    @property
    def is_connected(self) -> bool:
        return self.state == _STATE_CONNECTED

    @property
    def closed(self) -> bool:
        return self.state == _STATE_CLOSED

    def addr_text(self, raw: bytes | None) -> str:
        """An address as the socket's family shows it (IPv4-mapped appears as ::ffff:a.b.c.d
        on an AF_INET6 socket, as a.b.c.d on an AF_INET one)."""
        if raw is None:
            return "0.0.0.0" if self.domain == AF_INET else "::"
        ip6 = ipaddress.IPv6Address(raw)
        if self.domain == AF_INET and ip6.ipv4_mapped is not None:
            return str(ip6.ipv4_mapped)
        return str(ip6)

    def __repr__(self) -> str:
        return (f"<SocketFile {self.state} {self.addr_text(self.local_addr)}:{self.local_port}"
                f" waiters={len(self.waiters)}>")


class Sockets:
    """The socket layer: verbs with Linux errnos over a :class:`SocketTable`."""

    def __init__(self, table: SocketTable, skbs: SkbStore) -> None:
        self.table = table
        self.skbs = skbs
        #: told of every connection closed by its app (TCP's transmit side sends FIN or RST):
        #: ``on_close(conn, unread_bytes)``, called after the table closed it
        self.on_close: Callable[[TcpReceiver, int], None] | None = None
        #: TCP's write side (IORING_OP_SEND); None: this kernel transmits no app data
        self.tx: Transmit | None = None
        #: bound sockets by (address, port): several only with SO_REUSEPORT, one owner
        self._bound: dict[tuple[bytes | None, int], list[SocketFile]] = {}
        self._by_conn: dict[int, SocketFile] = {}
        self._by_listener: dict[int, SocketFile] = {}
        self._next_ephemeral = EPHEMERAL_LO

    # -- creation ---------------------------------------------------------------------------

    def socket(self, domain: int, type_: int, protocol: int,
               uid: int | None = None) -> SocketFile:
        """``socket(2)``: only TCP over IPv4/IPv6; ``uid`` is the creating task's."""
        if domain not in (AF_INET, AF_INET6):
            raise Misuse(f"address family {domain} not supported", errno.EAFNOSUPPORT)
        base = type_ & SOCK_TYPE_MASK
        if type_ & ~(SOCK_TYPE_MASK | SOCK_NONBLOCK | SOCK_CLOEXEC):
            raise Misuse(f"bad socket type flags {type_:#x}", errno.EINVAL)
        if base <= 0 or base >= SOCK_MAX:
            raise Misuse(f"bad socket type {base}", errno.EINVAL)
        if base == SOCK_DGRAM:
            if protocol not in (0, IPPROTO_UDP):
                raise Misuse(f"protocol {protocol} not supported", errno.EPROTONOSUPPORT)
            return SocketFile(domain, nonblock=bool(type_ & SOCK_NONBLOCK),
                              protocol=IPPROTO_UDP, uid=uid)
        if base != SOCK_STREAM:
            raise Misuse(f"socket type {base} not emulated", errno.ESOCKTNOSUPPORT)
        if protocol not in (0, IPPROTO_TCP):
            raise Misuse(f"protocol {protocol} not supported", errno.EPROTONOSUPPORT)
        return SocketFile(domain, nonblock=bool(type_ & SOCK_NONBLOCK), uid=uid)

    def _parse_addr(self, sf: SocketFile, addr: str) -> bytes | None:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise Misuse(f"bad address {addr!r}", errno.EINVAL) from None
        if sf.domain == AF_INET and ip.version != 4:
            raise Misuse(f"{addr} is not an IPv4 address", errno.EAFNOSUPPORT)
        if sf.domain == AF_INET6 and ip.version != 6:
            # Linux: sockaddr_in on an AF_INET6 socket; v4 goes as ::ffff:a.b.c.d
            raise Misuse(f"{addr} is not an IPv6 address", errno.EAFNOSUPPORT)
        raw = ip_bytes(ip)
        if raw in _ANY_ADDRS:
            return None
        return raw

    def _port_taken(self, addr: bytes | None, port: int, sf: SocketFile | None = None) -> bool:
        """Is (addr, port) in use by a socket ``sf`` may not share it with?  Sharing needs
        SO_REUSEPORT on both and the same owner (Linux's ``inet_bind_conflict``)."""
        if addr is None:
            others = [o for (_a, p), lst in self._bound.items() if p == port for o in lst]
        else:
            others = [*self._bound.get((addr, port), ()), *self._bound.get((None, port), ())]
        return any(not (sf is not None and sf.reuseport and o.reuseport and o.uid == sf.uid)
                   for o in others)

    def _ephemeral(self, addr: bytes | None) -> int:
        span = EPHEMERAL_HI - EPHEMERAL_LO + 1
        for _ in range(span):
            port = self._next_ephemeral
            self._next_ephemeral = EPHEMERAL_LO + (port + 1 - EPHEMERAL_LO) % span
            if not self._port_taken(addr, port):
                return port
        raise Misuse("no ephemeral port left", errno.EADDRINUSE)

    def bind(self, sf: SocketFile, addr: str, port: int) -> None:
        """``bind(2)``.  Port 0 picks an ephemeral port."""
        if sf.protocol != IPPROTO_TCP:
            raise Misuse("UDP is not emulated on the wire: cannot bind", errno.EOPNOTSUPP)
        if sf.state != _STATE_NEW:
            raise Misuse("socket already bound", errno.EINVAL)
        if not 0 <= port <= 0xFFFF:
            raise Misuse(f"bad port {port}", errno.EINVAL)
        raw = self._parse_addr(sf, addr)
        if port == 0:
            port = self._ephemeral(raw)
        elif self._port_taken(raw, port, sf):
            raise Misuse(f"{addr}:{port} in use", errno.EADDRINUSE)
        sf.local_addr, sf.local_port = raw, port
        sf.state = _STATE_BOUND
        self._bound.setdefault((raw, port), []).append(sf)

    def listen(self, sf: SocketFile, backlog: int) -> None:
        """``listen(2)``: autobinds an unbound socket; a second listen updates the backlog."""
        if sf.protocol != IPPROTO_TCP:
            raise Misuse("listen on a datagram socket", errno.EOPNOTSUPP)
        if sf.state == _STATE_NEW:
            port = self._ephemeral(None)
            sf.local_addr, sf.local_port, sf.state = None, port, _STATE_BOUND
            self._bound.setdefault((None, port), []).append(sf)
        if backlog < 0 or backlog > SOMAXCONN:
            backlog = SOMAXCONN
        backlog = max(backlog, 1)  # Linux lets one connection in with backlog 0
        if sf.state == _STATE_LISTEN:
            assert sf.listener is not None
            sf.listener.backlog = backlog
            sf.backlog = backlog
            return
        if sf.state != _STATE_BOUND:
            raise Misuse(f"listen on a {sf.state} socket", errno.EINVAL)
        lst = self.table.listen(sf.local_port, sf.local_addr, backlog, reuseport=sf.reuseport,
                                uid=sf.uid, prog=sf.reuse_prog)
        sf.reuse_prog = None  # now the group's (or dropped: the group had its own)
        sf.listener = lst
        sf.backlog = backlog
        sf.state = _STATE_LISTEN
        self._by_listener[id(lst)] = sf

    def accept(self, sf: SocketFile) -> SocketFile | None:
        """Take one ready connection off a listener, as a new connected socket file.

        Returns None when none is ready (the caller waits or reports ``-EAGAIN``).
        Raises ``-EINVAL`` if ``sf`` is not listening.
        """
        if sf.state != _STATE_LISTEN or sf.listener is None:
            raise Misuse("accept on a socket that is not listening", errno.EINVAL)
        conn = sf.listener.accept()
        if conn is None:
            return None
        new = SocketFile(sf.domain, state=_STATE_CONNECTED, conn=conn)
        if conn.key is not None:
            saddr, sport, daddr, dport = split_flow_key(conn.key)
            new.peer_addr, new.peer_port = ip_bytes(saddr), sport
            new.local_addr, new.local_port = ip_bytes(daddr), dport
        self._by_conn[id(conn)] = new
        return new

    # -- SO_REUSEPORT (net/core/sock.c, net/core/sock_reuseport.c) ------------------------------

    @staticmethod
    def set_reuseport(sf: SocketFile, on: bool) -> None:
        """``SO_REUSEPORT``: takes effect at the next bind/listen, as on Linux."""
        sf.reuseport = on

    def attach_reuseport_cbpf(self, sf: SocketFile, prog: Program) -> None:
        """``SO_ATTACH_REUSEPORT_CBPF`` (``reuseport_attach_prog``): a listening socket's
        group gets the program (replacing any); a socket not yet listening keeps it for the
        group its listen() may start.  ``-EINVAL`` without SO_REUSEPORT (or, listening,
        outside a group)."""
        if sf.listener is not None:
            group = self.table.reuseport_group(sf.listener)
            if group is None:
                raise Misuse("socket is not in an SO_REUSEPORT group", errno.EINVAL)
            group.prog = prog
            return
        if not sf.reuseport:
            raise Misuse("SO_ATTACH_REUSEPORT_CBPF needs SO_REUSEPORT", errno.EINVAL)
        sf.reuse_prog = prog

    def detach_reuseport_bpf(self, sf: SocketFile) -> None:
        """``SO_DETACH_REUSEPORT_BPF``: ``-ENOENT`` when no program is attached (``-EINVAL``
        for a socket without SO_REUSEPORT)."""
        group = self.table.reuseport_group(sf.listener) if sf.listener is not None else None
        if group is not None and group.prog is not None:
            group.prog = None
        elif group is None and sf.reuse_prog is not None:
            sf.reuse_prog = None
        elif not sf.reuseport:
            raise Misuse("socket has no SO_REUSEPORT", errno.EINVAL)
        else:
            raise Misuse("no reuseport program attached", errno.ENOENT)

    def has_pending(self, sf: SocketFile) -> bool:
        """True if a listener has a connection ready to accept."""
        return sf.listener is not None and sf.listener.accept_queue_len > 0

    # -- readiness ----------------------------------------------------------------------------

    def file_of_conn(self, conn: TcpReceiver) -> SocketFile | None:
        return self._by_conn.get(id(conn))

    def file_of_listener(self, lst: Listener) -> SocketFile | None:
        return self._by_listener.get(id(lst))

    @staticmethod
    def wake(sf: SocketFile) -> None:
        """Run the socket's armed requests, oldest first (each may disarm itself).

        On a listener the wake is exclusive, as Linux's accept wait is: requests are woken
        only while connections wait in the accept queue, so one new connection runs one
        ACCEPT, not every ACCEPT armed on the socket."""
        lst = sf.listener
        for w in list(sf.waiters):
            if lst is not None and not lst.accept_queue_len:
                break
            if w in sf.waiters:
                w.wake()

    def shutdown(self, sf: SocketFile, how: int) -> None:
        """``shutdown(2)`` on a connected socket (``inet_shutdown``): SHUT_RD (0) ends
        reading after the queued data, SHUT_WR (1) sends a FIN behind the queued data
        (later sends ``-EPIPE``), SHUT_RDWR (2) both; a socket that is not connected (or
        whose connection is closed) is ``-ENOTCONN``, another ``how`` ``-EINVAL``.
        Departure: Linux's SHUT_RD on a listener closes it; here it is ``-ENOTCONN``."""
        if how not in (SHUT_RD, SHUT_WR, SHUT_RDWR):
            raise Misuse(f"shutdown: how {how}", errno.EINVAL)
        conn = sf.conn
        if conn is None or conn.state is TcpState.CLOSED:
            raise Misuse("shutdown: not connected", errno.ENOTCONN)
        if how != SHUT_WR:
            conn.shutdown_read()
        if how != SHUT_RD and self.tx is not None:
            self.tx.shutdown_send(conn)
        if sf.waiters:
            self.wake(sf)  # blocked reads see EOF, blocked sends EPIPE

    # -- close --------------------------------------------------------------------------------

    def close(self, sf: SocketFile, cancel_res: int = -errno.ECANCELED) -> None:
        """Release the socket: cancel armed requests, free every skb it still holds."""
        if sf.state == _STATE_CLOSED:
            return
        waiters, sf.waiters = list(sf.waiters), {}
        for w in waiters:
            w.cancel(cancel_res)
        if sf.conn is not None:
            self._by_conn.pop(id(sf.conn), None)
            unread = sf.conn.rxq.nbytes
            self.free(self.table.close(sf.conn))
            if self.on_close is not None:
                self.on_close(sf.conn, unread)
        if sf.listener is not None:
            self._by_listener.pop(id(sf.listener), None)
            lst = sf.listener
            children = [(c, c.rxq.nbytes) for c in [*lst._pending.values(), *lst._ready]]
            self.free(self.table.close_listener(lst))
            if self.on_close is not None:
                for c, unread in children:
                    self.on_close(c, unread)
        if sf.state in (_STATE_BOUND, _STATE_LISTEN):
            key = (sf.local_addr, sf.local_port)
            bound = self._bound.get(key, [])
            if sf in bound:
                bound.remove(sf)
                if not bound:
                    del self._bound[key]
        sf.state = _STATE_CLOSED

    def free(self, handles: NDArray[np.int64]) -> None:
        """Free skb handles handed back by the TCP layer (no call for an empty batch)."""
        if len(handles):
            self.skbs.free(handles)


def conn_established(sf: SocketFile) -> bool:
    """True while a connected socket's TCP state is not CLOSED."""
    return sf.conn is not None and sf.conn.state is not TcpState.CLOSED


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


class Task:
    """One attached process: identity, capability, mm and file table."""

    def __init__(self, tid: int, pid: int, name: str, *, cap_net_admin: bool = True,
                 mm: Mm | None = None, peer: Any = None, uid: int | None = None,
                 grants: CapGrants | None = None) -> None:
        self.tid = tid
        #: the process, as the OS named it (SO_PEERCRED of the control connection)
        self.pid = pid
        #: its uid (the owner its memory must have), None when unknown (direct construction)
        self.uid = uid
        self.name = name
        #: what the app asked for at attach (it may drop the capability, never add it)
        self.cap_requested = cap_net_admin
        self.grants = grants
        self.mm = mm if mm is not None else Mm()
        #: the control-plane identity that speaks for this task (zmq routing id)
        self.peer = peer
        self.files: dict[int, Any] = {}
        #: no descriptor below this is free (Linux's ``files->next_fd`` hint)
        self._next_fd = FIRST_FD
        self.nofile = NOFILE  # RLIMIT_NOFILE soft limit (setrlimit)
        self.dead = False
        #: the pidfd the kernel holds on the process (set by the kernel loop at attach;
        #: ``mm_map`` by descriptor checks it after opening ``/proc/<pid>/fd/<n>``)
        self.watch: PidWatch | None = None

    def __repr__(self) -> str:
        return f"<Task {self.tid} pid={self.pid} {self.name!r} fds={sorted(self.files)}>"

    @property
    def cap_net_admin(self) -> bool:
        """CAP_NET_ADMIN: asked for at attach and granted by the launcher (checked on every
        privileged call, so a grant that arrives after attach counts)."""
        if not self.cap_requested:
            return False
        return self.grants is None or self.grants.has(self.pid, self.uid)

    def install(self, obj: Any) -> int:
        """Put ``obj`` in the lowest free descriptor (>= 3); ``-EMFILE`` when full."""
        fd = self._next_fd
        while fd in self.files:
            fd += 1
        if fd >= self.nofile:
            raise Misuse("too many open files", errno.EMFILE)
        self.files[fd] = obj
        self._next_fd = fd + 1
        return fd

    def can_install(self) -> bool:
        return len(self.files) < self.nofile - FIRST_FD

    def get(self, fd: int) -> Any:
        """The file at ``fd``; ``-EBADF`` if none."""
        obj = self.files.get(fd)
        if obj is None:
            raise Misuse(f"bad file descriptor {fd}", errno.EBADF)
        return obj

    def get_socket(self, fd: int) -> SocketFile:
        """The socket at ``fd``; ``-EBADF`` if none, ``-ENOTSOCK`` if another kind of file."""
        obj = self.get(fd)
        if not isinstance(obj, SocketFile):
            raise Misuse(f"fd {fd} is not a socket", errno.ENOTSOCK)
        return obj

    def remove(self, fd: int) -> Any:
        """Take ``fd`` out of the table and return its file; ``-EBADF`` if none.  (A slot
        :meth:`install` reserved with ``None`` inside one syscall is released too.)"""
        if fd not in self.files:
            raise Misuse(f"bad file descriptor {fd}", errno.EBADF)
        obj = self.files.pop(fd)
        self._next_fd = min(self._next_fd, fd)
        return obj

    def fd_of(self, obj: Any) -> int | None:
        for fd, o in self.files.items():
            if o is obj:
                return fd
        return None


class CapGrants:
    """CAP_NET_ADMIN as the run's launcher granted it: to the pid of a process it started (and
    what that process runs), while that process lives (the kernel drops the grant when the
    pid dies, so a reused pid inherits nothing).  Kernel-process state; only the launcher's
    control connection adds to it (``cap_grant``)."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def has(self, pid: int, uid: int | None = None) -> bool:
        """True if ``pid`` or one of its ancestors was granted (a capability the launcher
        gives a process is inherited by what it runs, like an ambient capability)."""
        if not self.pids:
            return False
        for _ in range(64):
            if pid in self.pids:
                return True
            pid = parent_pid(pid)
            if pid <= 1:
                return False
        return False

    def grant(self, pid: int) -> None:
        self.pids.add(pid)

    def revoke_pid(self, pid: int) -> None:
        self.pids.discard(pid)


class Tasks:
    """Every attached task, by task id and by control-plane peer."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.grants = CapGrants()
        self._by_tid: dict[int, Task] = {}
        self._by_peer: dict[Any, Task] = {}
        self._next_tid = 1

    def __len__(self) -> int:
        return len(self._by_tid)

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._by_tid.values()))

    def owner(self, tid: int) -> str:
        """The region owner field of task ``tid``'s memory: ``app<tid>``."""
        return f"app{tid}"

    def attach(self, peer: Any, pid: int, name: str, cap_net_admin: bool = True,
               mm_factory: Callable[[str], Mm] | None = None, *,
               uid: int | None = None) -> Task:
        """Create the task of a new process; ``-EEXIST`` if this peer already attached.

        ``pid`` and ``uid`` must come from the OS (the connection's peer credentials)."""
        if peer in self._by_peer:
            raise Misuse("this peer is already attached", errno.EEXIST)
        if pid <= 0:
            raise Misuse(f"bad pid {pid}", errno.EINVAL)
        tid = self._next_tid
        self._next_tid += 1
        prefix = owner_prefix(self.run, self.owner(tid))
        mm = mm_factory(prefix) if mm_factory is not None else Mm(prefix, uid=uid)
        task = Task(tid, pid, name, cap_net_admin=cap_net_admin, mm=mm, peer=peer, uid=uid,
                    grants=self.grants)
        self._by_tid[tid] = task
        self._by_peer[peer] = task
        return task

    def by_peer(self, peer: Any) -> Task:
        """The task speaking through ``peer``; ``-ESRCH`` if it never attached (or the
        process now speaking with that routing identity is not the one that attached)."""
        task = self.find_peer(peer)
        if task is None:
            raise Misuse("process is not attached (call attach first)", errno.ESRCH)
        return task

    def find_peer(self, peer: Any) -> Task | None:
        task = self._by_peer.get(peer)
        cred = getattr(peer, "cred", None)
        if task is not None and cred is not None and cred.pid != task.pid:
            return None  # another process took over the identity (ROUTER_HANDOVER)
        return task

    def by_tid(self, tid: int) -> Task | None:
        return self._by_tid.get(tid)

    def by_pid(self, pid: int) -> list[Task]:
        return [t for t in self._by_tid.values() if t.pid == pid]

    def forget(self, task: Task) -> None:
        """Remove a task whose files were already closed (see syscalls.task_exit)."""
        self._by_tid.pop(task.tid, None)
        if self._by_peer.get(task.peer) is task:
            del self._by_peer[task.peer]
        task.dead = True
