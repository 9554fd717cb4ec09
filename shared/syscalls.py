"""The emulated syscall surface: what an application (or the CLI) asks the kernel.

Each message type is one syscall, named after it, served by the kernel process
on its ROUTER socket (``kernel.sock`` in the run directory).  Return values
follow the kernel convention: a successful reply body carries ``res`` (>= 0);
a failing syscall gets an ``error`` reply whose errno is the one Linux returns.
Arguments that Linux passes as pointers to uapi structs travel as blobs holding
the exact struct bytes, and the reply carries the written-back struct.

Who owns what (DESIGN §2):

* ``io_uring_setup`` creates the SQ/CQ ring region and the SQE region in
  *kernel* memory; the app maps them with ``mmap`` on the ring fd at
  ``IORING_OFF_SQ_RING`` / ``IORING_OFF_CQ_RING`` / ``IORING_OFF_SQES``, or a
  zcrx RQ at ``region.mmap_offset``.  The reply names the shm segment to attach.
* App memory (receive buffers, zcrx areas, provided-buffer rings, a user-memory
  RQ) is created by the app (a sealed memfd, or a named ``/zcrx.<run>.app<N>.<obj>``)
  and entered into its emulated mm with ``mm_map`` (by descriptor or by name), which
  returns the virtual address the app passes in SQEs and uapi structs.  The kernel
  resolves addresses through that table; an address outside every mapping is
  -EFAULT, a write to a read-only mapping is -EFAULT, an unaligned one -EINVAL, as
  on Linux.
"""

from __future__ import annotations

from typing import Any

from shared import abi
from shared.msg import Schema, register_type

_RES = Schema.make({"res": int})

register_type("attach", {"name": str}, optional={"pid": (int, 0), "cap_net_admin": (bool, True)},
              reply=Schema.make({"task": int}),
              doc="A new process announces itself (the emulated task); first call of an app. "
                  "The kernel takes its pid and uid from the connection (SO_PEERCRED): "
                  "``pid`` is ignored; ``cap_net_admin`` false drops a granted capability.")

# -- memory -----------------------------------------------------------------------------
def _one_source(body: dict[str, Any], _blobs: tuple[bytes, ...]) -> None:
    if bool(body["name"]) == (body["fd"] >= 0):
        raise ValueError("mm_map takes a shm name or a descriptor (fd >= 0), not both")


register_type("mm_map", {"length": int, "prot": int},
              optional={"name": (str, ""), "fd": (int, -1)}, validator=_one_source,
              reply=Schema.make({"addr": int}),
              doc="Enter app-owned memory into the caller's mm; returns its address.  By "
                  "descriptor (``fd``: the caller's own descriptor number of a memfd, what "
                  "the library uses; sealed memory can be pinned) or by shm ``name`` (short "
                  "accesses only: a named segment cannot be sealed).")
register_type("mm_unmap", {"addr": int, "length": int}, reply=_RES)
register_type("mm_protect", {"addr": int, "length": int, "prot": int}, reply=_RES)
register_type("mmap", {"fd": int, "offset": int, "length": int},
              reply=Schema.make({"name": str, "offset": int, "length": int, "addr": int}),
              doc="Map a kernel region of a ring fd (ring, SQEs, zcrx RQ, pbuf ring).")

# -- sockets ----------------------------------------------------------------------------
register_type("socket", {"domain": int, "type": int, "protocol": int}, reply=_RES)
register_type("bind", {"fd": int, "addr": str, "port": int}, reply=_RES)
register_type("listen", {"fd": int, "backlog": int}, reply=_RES)
register_type("close", {"fd": int}, reply=_RES)
register_type("getsockname", {"fd": int}, reply=Schema.make({"addr": str, "port": int}))
register_type("getpeername", {"fd": int}, reply=Schema.make({"addr": str, "port": int}))
#: ``getsockopt(fd, SOL_SOCKET, SO_INCOMING_NAPI_ID)``: the NAPI id of the queue the socket's
#: last skb came from (0 before any); Linux numbers NAPI instances from ``MIN_NAPI_ID``.
SOL_SOCKET = 1
SO_INCOMING_NAPI_ID = 56
MIN_NAPI_ID = 8193
#: ``setrlimit(RLIMIT_NOFILE)``: a server expecting thousands of connections raises its
#: descriptor limit (soft limit; above ``NOFILE_MAX`` is -EPERM).
RLIMIT_NOFILE = 7
register_type("setrlimit", {"resource": int, "cur": int}, reply=_RES)
register_type("setsockopt", {"fd": int, "level": int, "optname": int}, blobs=1,
              max_blob_size=256, reply=_RES,
              doc="setsockopt(fd, level, optname, optval, optlen): the blob is the optval "
                  "bytes (its length is optlen).  SOL_SOCKET SO_REUSEPORT (an int), "
                  "SO_ATTACH_REUSEPORT_CBPF (a 16-byte struct sock_fprog whose filter "
                  "pointer names the instructions in the caller's mm) and "
                  "SO_DETACH_REUSEPORT_BPF; anything else -ENOPROTOOPT.")
register_type("getsockopt", {"fd": int, "level": int, "optname": int},
              reply=Schema.make({"res": int, "value": int}),
              doc="An integer socket option; only SOL_SOCKET/SO_INCOMING_NAPI_ID is known "
                  "(anything else -ENOPROTOOPT).")

# -- io_uring ---------------------------------------------------------------------------
PARAMS_SIZE = abi.io_uring_params.itemsize
register_type("io_uring_setup", {"entries": int}, blobs=1, blob_sizes=(PARAMS_SIZE,),
              reply=Schema.make({"res": int}, blobs=1, blob_sizes=(PARAMS_SIZE,)),
              doc="Create a ring; blob = io_uring_params in and out; res = ring fd.")
register_type("io_uring_enter", {"fd": int, "to_submit": int, "min_complete": int,
                                 "flags": int},
              optional={"timeout_ms": (int, -1), "min_wait_usec": (int, 0)}, reply=_RES,
              doc="Submit SQEs and/or wait for CQEs (the reply is deferred while waiting); "
                  "timeout_ms and min_wait_usec stand for io_uring_getevents_arg's ts and "
                  "min_wait_usec.")
register_type("io_uring_register", {"fd": int, "opcode": int, "nr_args": int},
              blobs=(0, 4), max_blob_size=1 << 16,
              reply=Schema.make({"res": int}, blobs=(0, 4), max_blob_size=1 << 16),
              doc="Register; blobs = the argument structs (ifq_reg, area_reg, region_desc, "
                  "ctrl, buf_reg ...), written back in the reply.")

# -- administration (the CLI) -----------------------------------------------------------
register_type("ethtool", {"dev": str, "request": dict}, reply=Schema.make(open=True),
              doc="An ethtool request (launch.ethtool); configuration reaches the NIC "
                  "through the driver, as on Linux.")
register_type("stats", optional={"what": (str, "all")}, reply=Schema.make(open=True),
              doc="Counters of every layer (netdev queues, page pools, sockets, rings).")
register_type("if_nametoindex", {"name": str}, reply=Schema.make({"ifindex": int}),
              doc="The ifindex of a netdev by name (SIOCGIFINDEX); ENODEV if there is none.")
register_type("status", reply=Schema.make(open=True),
              doc="Netdevs, queues and their bindings, page pools, ifqs, tasks.")
register_type("shutdown", reply=Schema.make(open=True),
              doc="Stop the kernel process (the run's launcher only: EPERM otherwise).")
register_type("cap_grant", {"pid": int},
              doc="launcher -> kernel: the process ``pid`` (one it started) has "
                  "CAP_NET_ADMIN while it lives.  The launcher only (EPERM otherwise).")

# -- events -----------------------------------------------------------------------------
register_type("cq_wake", {"fd": int}, doc="kernel -> app: CQEs posted on a ring whose "
              "waiter set need-wakeup (not used by apps waiting in io_uring_enter).")

#: Protection bits for mm_map / mm_protect (as <sys/mman.h>).
PROT_READ = 1
PROT_WRITE = 2

#: Socket constants used by the emulator (Linux values).
AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2
IPPROTO_TCP = 6
