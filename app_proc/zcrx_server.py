"""A zero-copy TCP receiver on io_uring zcrx, shaped like liburing's ``examples/zcrx.c``.

    python -m app_proc.zcrx_server [-p PORT] [-i IFNAME] (-q RXQS | --nodev) [-s BYTES] [-v]
                                   [--stream-id ID|sport] [-r 0|1] [-S AREA] [-C CQ] [-R RQ]
                                   [-n CONNS] [-o FILE|-] [--json PATH] [--seconds S]
                                   [-E] [--grow MAX] [-w N] [--iperf3]

The flow of the liburing example: one ring set up with ``SINGLE_ISSUER | DEFER_TASKRUN |
CQE32 | CQSIZE | SUBMIT_ALL``; an interface queue registered on ``IFNAME``/``RXQ``
(:func:`~app_proc.liburing.io_uring_register_ifq`, ``-r`` says where the refill queue lives);
a multishot ACCEPT on the listener; per connection one multishot RECV_ZC whose ``len`` is the
byte budget ``-s``.  Every data CQE names a chunk of the area; the chunks of a CQE batch are
read IN PLACE (numpy views of the area: never copied by the app), hashed (SHA-256 per
connection), verified against :mod:`shared.pattern` with ``-v`` (the stream id is the peer's
source port, which the NIC generator uses, or a fixed ``--stream-id``), then returned with one
RQE each and a single store of the RQ tail (:func:`~app_proc.liburing.io_uring_zcrx_return`).
The batch work is a fixed number of numpy operations plus one hash update per *run* (chunks
lying back to back in the area).  ``-o`` writes each connection's stream from the same runs of
the area (one ``write`` per run, in place, before the chunks are returned; see
:mod:`app_proc.server` for the file names).  A final CQE ends the request: ``res 0`` is the
end (peer EOF, or the budget used: the total is checked against ``-s``), ``-ENOSPC`` (CQ
full) re-arms with the remaining budget, ``-ENOMEM`` (no free buffer for a copy) flushes the RQ
and re-arms once per progress, anything else is the connection's error.

Several queues (``-q 1-16``, ``-q 1,3,5``): one ifq per queue, all on the one ring (Linux
allows several ifqs per ring since 6.16), each with its own area (``-S`` each) and RQ.  A
connection is served by the ifq of the queue its flow is steered to, learned as a Linux server
does: ``getsockopt(SO_INCOMING_NAPI_ID)`` on the accepted socket, matched against each queue's
``napi-id`` in the netdev queue view (``ynl netdev queue-get``: the kernel's ``status``).  A
socket whose NAPI id names none of our queues (steered elsewhere) is served by the first ifq
(its bytes then come through the copy fallback).  The data CQEs of one CQE view are split by
connection into one batch per ifq; each batch's chunks go back through that ifq's RQ.

Several processes (``-w N``, with ``-q``): the queues are spread over N worker processes
(:mod:`app_proc.workers`), forked by this one after it parsed its arguments, each its own app
(task, pidfd, identity, ring holding the ifqs of its queues).  A connection must reach the
worker that has its queue's ifq, and the way Linux servers arrange that is used: every worker
listens on the port with ``SO_REUSEPORT``, in turn (worker w becomes member w of the port's
group), and attaches the group's classic BPF program ``SO_ATTACH_REUSEPORT_CBPF``: load
``SKF_AD_QUEUE`` (the SYN's RX queue + 1), subtract 1, modulo N, return A
(:func:`shared.bpf.queue_modulo`).  Queue q is therefore served by worker ``q mod N``; the
spread is computed by running that very program on each queue of ``-q``, and a ``-q``/``-w``
pair that leaves a worker without a queue is refused.  ``-n`` counts connections over all
workers.  The parent says it is ready once every worker listens, forwards SIGTERM/SIGINT,
waits for all of them and prints and writes (``--json``) the merged summary: connections,
per-queue rows and the kernel's counters of every worker, each tagged with its ``worker``, and
``workers`` (pid, queues, exit status).  Its exit status is the worst of the workers' (a worker
killed by a signal counts as a failed check).  When a worker dies, the kernel tears its ring
down (its niovs go home) and the others keep serving their connections to the end.
``-o`` is not available with ``-w``.

``--nodev`` registers with ``ZCRX_REG_NODEV`` (no device: every byte comes through the copy
fallback, for any TCP socket); the kernel then never consumes the RQ by itself, so the server
flushes it (``ZCRX_CTRL_FLUSH_RQ``) when it is half full and whenever the CQ runs dry.

Copy-fallback counts come from the kernel's own counters: before leaving (its ring still
open), the server reads the ``stats`` syscall and reports what the kernel says about its ifq
(``zcrx.ifqs[*].counters``: ``copy_count``/``copy_bytes`` and ``zc_cqes``/``zc_bytes``).  CQE
analysis cannot tell: a copied chunk and a zero-copy one both start at a buffer.  When the
kernel gives no such counters the summary says ``null``.

Timing: ``first_ns``/``last_ns`` are this process's ``time.monotonic_ns()`` when it saw the
first data CQE and when it finished the last data batch (first byte -> last byte); the
benchmarks divide by that.  Memory traffic, app side: ``app.read_bytes`` counts payload bytes
read in place (each delivered byte once: the hash and the compare read the same chunk while it
is in cache); ``app.copy_bytes`` is 0 by construction.  ``app.hash_staged_bytes``: bytes the
hash read from a private scratch copy instead of in place (short runs, e.g. 64-byte segments
each in its own buffer, are gathered and hashed with one update: :func:`app_proc.verify.
zcrx_hash_runs`); the compare still reads them in place.

Exit status: 0 only if every connection passed every check (no error, ``-s`` total, ``-v``
bytes) and ``-n`` connections were served; 1 if a check failed; 3 for a setup error or a
kernel that went away (with a one-line reason).  The server exits by itself after ``-n``
connections, on SIGTERM/SIGINT, after ``--seconds``, or when the kernel is gone.

Memory: the area, the RQ (``-r 0``) and the parameter page are this process's regions
(``app<task>.zcrx_*``), created and unlinked here (by the liburing layer); the rings and a
kernel-memory RQ (``-r 1``) are the kernel's, attached and detached here.

Area size: the default is 64 MiB, not liburing's 256 MiB.  Every region's pages are allocated
at creation (``fallocate``, about 25 ms per 64 MiB here) and sit in ``/dev/shm`` of a small machine;
64 MiB is 16384 buffers of 4 KiB, more than the CQ (8192) and the RQ (8192) can hold lent out
at once, so the area never runs dry because of its size.

``--iperf3``: an iperf3 server (:mod:`app_proc.iperf3`): iperf3's control protocol over a
connection read with RECV and written with SEND, each test's data streams received zero copy
as above; ``-n`` counts tests.

``--grow MAX`` (Linux 7.3; implies ``-E``): the two new features working together.  MAX bytes
are mapped at start and the first ``-S`` registered; on each ALLOC_FAIL event (the queue's page
pool found no buffer) the next ``-S`` bytes (or what is left) are added as one more area
(``ZCRX_CTRL_ADD_AREA``) before the event is re-armed, until MAX bytes are registered.  Every
area is a slice of the one mapping, so chunks of any area are read in place the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from app_proc import liburing as L
from app_proc import syscall as S
from app_proc import verify as V
from app_proc import workers as W
from app_proc.server import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    KIND_ACCEPT,
    KIND_CLOSE,
    AcceptingServer,
    ServerOptions,
    add_common_args,
    close_output,
    common_options,
    open_output,
    serve,
    user_data,
    write_json,
)
from shared import abi, bpf
from shared.errors import PeerGone, ZcrxError
from shared.msg import ControlError
from shared.proc import notify_ready
from shared.shm import PAGE_SIZE

KIND_ZC = 2
#: ``user_data`` kind of zcrx event CQEs (``-E``, Linux 7.2+)
KIND_EVENT = 4
_EVENT_NAMES = {abi.ZCRX_EVENT_ALLOC_FAIL: "ALLOC_FAIL", abi.ZCRX_EVENT_COPY: "COPY"}
#: RECV_ZC ``len`` is a u32 and UINT_MAX is refused: larger budgets run unlimited.
_MAX_BUDGET = 0xFFFFFFFE
_F_MORE = abi.IORING_CQE_F_MORE
#: The descriptor limit a task starts with, and what the server keeps besides connections.
_NOFILE = 1024
_SPARE_FDS = 64
#: -w: how long a worker waits for the one before it to listen (and the parent for all)
_READY_TIMEOUT_S = 120.0


def _tee(*sinks: Any) -> Any:
    """One callable that hands the same bytes to every sink (the hash and the -o file)."""
    def feed(data: Any) -> None:
        for f in sinks:
            f(data)
    return feed


@dataclass
class Options(ServerOptions):
    """``size`` is also the RECV_ZC budget of each connection (0: unlimited)."""

    ifname: str = "eth0"
    rxq: int | None = None
    rxqs: list[int] = field(default_factory=list)  # -q 1-16 / 1,3,5: one ifq each
    nodev: bool = False
    rq_kernel: bool = False  # -r 1: RQ in kernel memory
    area_size: int = 64 << 20
    cq_entries: int = 8192
    rq_entries: int = 8192
    sq_entries: int = 256
    rx_buf_len: int = 0
    backlog: int = 128  # listen(2) backlog (-b; the kernel caps it at SOMAXCONN 4096)
    events: bool = False  # -E: zcrx events (ALLOC_FAIL re-armed each time, COPY once)
    grow: int = 0  # --grow MAX: add an area on ALLOC_FAIL until MAX bytes are registered
    napi_busy_poll: int = 0  # --napi-busy-poll US: IORING_REGISTER_NAPI (0: not registered)
    wait_nr: int = 1         # --wait-nr N: CQEs a wait asks for
    min_wait: int = 0        # --min-wait US: min_wait_usec of the wait (0: none)
    workers: int = 1  # -w N: worker processes, the queues spread over them
    worker: int | None = None  # in a worker: its index (its listener's place in the group)
    worker_queues: list[list[int]] = field(default_factory=list)  # per worker, from -q
    iperf3: bool = False  # --iperf3: serve iperf3 clients (app_proc/iperf3.py)
    iperf3_tests: int = 0  # --iperf3 -n: tests to serve (0: until SIGTERM)


@dataclass
class Conn:
    fd: int
    index: int
    peer: tuple[str, int]
    stream: int
    nbytes: int = 0
    cqes: int = 0
    rearms: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    bad_offset: int | None = None
    error: int | None = None
    done: bool = False
    first_ns: int | None = None
    last_ns: int | None = None
    enomem_at: int = -1  # nbytes at the last -ENOMEM re-arm
    out: IO[bytes] | None = None  # -o: where the stream is written
    ifq: L.ZcrxIfq | None = None  # the ifq of the queue the flow is steered to
    queue: int | None = None
    napi_id: int = 0

    def summary(self, opts: Options) -> dict[str, Any]:
        checks: dict[str, bool] = {"error": self.error is None, "complete": self.done}
        if opts.verify:
            checks["verify"] = self.bad_offset is None
        if opts.size:
            checks["size"] = self.nbytes == opts.size
        secs = ((self.last_ns - self.first_ns) / 1e9
                if self.first_ns is not None and self.last_ns is not None else 0.0)
        return {
            "index": self.index, "peer": f"{self.peer[0]}:{self.peer[1]}",
            "stream": self.stream, "bytes": self.nbytes,
            "sha256": self.sha.hexdigest() if self.sha is not None else None,
            "bad_offset": self.bad_offset, "error": self.error, "cqes": self.cqes,
            "rearms": self.rearms, "first_ns": self.first_ns, "last_ns": self.last_ns,
            "queue": self.queue, "napi_id": self.napi_id,
            "seconds": secs, "ok": all(checks.values()), "checks": checks,
        }


class _AreaMaker:
    """The areas of a server on several queues, made one ahead by a helper thread: each is
    a sealed memfd whose pages (``fallocate``) take about 2 ms per 8 MiB here, while the
    registration of the previous queue is a kernel round trip.  The main thread enters each
    into the mm with its ifq (``io_uring_register_ifq(area=...)``).  One queue: None, the
    library makes the area itself."""

    def __init__(self, k: S.Kernel, size: int, n: int) -> None:
        self._futures: list[Any] = []
        self._pool = None
        if n > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="area")
            names = [k.memory_name("zcrx_area") for _ in range(n)]
            self._futures = [self._pool.submit(k.new_memory, size, name=nm) for nm in names]
        self._next = 0

    def next(self) -> Any:
        """The next area (a :class:`~shared.shm.Region`), or None."""
        if not self._futures:
            return None
        fut = self._futures[self._next]
        self._next += 1
        return fut.result()

    def close(self) -> None:
        """Free the areas nobody took (a registration failed) and end the thread."""
        if self._pool is None:
            return
        for fut in self._futures[self._next:]:
            fut.cancel()
        self._pool.shutdown(wait=True)
        for fut in self._futures[self._next:]:
            if not fut.cancelled() and fut.exception() is None:
                fut.result().close()
        self._pool = None


class ZcrxServer(AcceptingServer):
    """The server's state; :meth:`run` is the loop."""

    def __init__(self, kernel: S.Kernel, opts: Options, stop: threading.Event | None = None,
                 log: IO[str] | None = None, coord: W.Coord | None = None) -> None:
        super().__init__(kernel, opts, stop, log)
        self.opts: Options = opts
        self.coord = coord  # -w: the workers' shared counters (None: a server on its own)
        self.conns: dict[int, Conn] = {}
        self.positions: dict[int, int] = {}  # fd -> next stream offset (Conn.nbytes)
        self.finished: list[dict[str, Any]] = []
        self.ifq: L.ZcrxIfq | None = None  # the first (or only) ifq
        self.ifqs: list[L.ZcrxIfq] = []  # one per queue of -q, in -q order
        self.by_napi: dict[int, int] = {}  # napi-id -> index in ifqs
        self.fd_ifq: dict[int, int] = {}  # fd -> index in ifqs (kept after close: stray CQEs)
        self.per_queue: list[dict[str, int]] = []  # app counters per ifq
        self.events = 0  # zcrx event CQEs seen (-E)
        self.event_counts: dict[str, int] = {}  # per event name
        self.grow_error: str | None = None  # why --grow stopped adding areas, if it did
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.read_bytes = 0
        self.hash_staged_bytes = 0  # bytes gathered into scratch for the hash (short runs)
        self.data_cqes = 0
        self.batches = 0
        self.stray_chunks = 0
        self.copy_fallback: dict[str, Any] | None = None

    # -- requests -----------------------------------------------------------------------------

    def arm_recv_zc(self, conn: Conn) -> None:
        assert conn.ifq is not None
        budget = 0
        if self.opts.size:
            left = self.opts.size - conn.nbytes
            budget = left if 0 < left <= _MAX_BUDGET else 0
        sqe = self._sqe()
        L.io_uring_prep_recv_zc(sqe, conn.fd, budget, conn.ifq.zcrx_id)
        L.io_uring_sqe_set_data64(sqe, user_data(KIND_ZC, conn.fd))

    # -- completions --------------------------------------------------------------------------

    def _needs_napi_id(self) -> bool:
        """Several ifqs (or a worker's share of them): a connection's queue must be learned."""
        return len(self.ifqs) > 1 or (self.coord is not None and not self.opts.nodev)

    def accept_calls(self, fd: int) -> list[tuple[str, dict[str, Any]]]:
        if not self._needs_napi_id():
            return []
        # which queue is the flow steered to? (SO_INCOMING_NAPI_ID)
        return [("getsockopt", {"fd": fd, "level": S.SOL_SOCKET,
                                "optname": S.SO_INCOMING_NAPI_ID})]

    def open_conn(self, fd: int, peer: tuple[str, int], stream: int,
                  info: Sequence[dict[str, Any]] = ()) -> None:
        conn = Conn(fd, self.accepted, peer, stream)
        if not self.opts.hash:
            conn.sha = None
        conn.out = open_output(self.opts.output, conn.index, self.opts.connections)
        i = 0
        if self._needs_napi_id():
            conn.napi_id = int(info[0]["value"]) if info else self.k.incoming_napi_id(fd)
            i = self.by_napi.get(conn.napi_id, 0)
        conn.ifq = self.ifqs[i]
        conn.queue = None if conn.ifq.nodev else conn.ifq.if_rxq
        self.fd_ifq[fd] = i
        self.per_queue[i]["connections"] += 1
        self.conns[fd] = conn
        self.positions[fd] = 0
        self.arm_recv_zc(conn)

    def on_data(self, cqes: np.ndarray, batch: L.ZcrxBatch, now_ns: int, slot: int = 0) -> None:
        """Read one batch of chunks of ifq ``slot`` in place: hash, verify, then return them
        all (through that ifq's RQ)."""
        ifq = self.ifqs[slot]
        area = ifq.area_view
        keys = cqes["user_data"][batch.index] >> np.uint64(8)
        k0 = int(keys[0])
        single = not np.count_nonzero(keys != k0)  # one connection: the common case
        uniq = [k0] if single else np.unique(keys).tolist()
        stray = [k for k in uniq if k not in self.conns or self.conns[k].done]
        if stray:  # chunks of a connection we do not know: give them back unread
            known = ~np.isin(keys, np.array(stray, dtype=keys.dtype))
            self.stray_chunks += int((~known).sum())
            L.io_uring_zcrx_return(ifq, batch.off[~known], batch.length[~known])
            for name in ("index", "off", "start", "length"):
                setattr(batch, name, getattr(batch, name)[known])
            keys = keys[known]
            uniq = [k for k in uniq if k not in stray]
            single = len(uniq) == 1
            if not len(keys):
                return
        start, length = batch.start, batch.length
        so = V.zcrx_stream_offsets(keys, length, self.positions)
        if self.opts.verify:
            if single:
                ids = np.full(len(keys), self.conns[uniq[0]].stream, dtype=np.int64)
            else:
                table = np.array([self.conns[k].stream for k in uniq], dtype=np.int64)
                ids = table[np.searchsorted(np.array(uniq, dtype=keys.dtype), keys)]
            bad = V.zcrx_verify(area, start, length, ids, so)
            wrong = np.flatnonzero(bad >= 0)
            for i in wrong.tolist():
                conn = self.conns[int(keys[i])]
                pos = int(so[i] + bad[i])
                if conn.bad_offset is None or pos < conn.bad_offset:
                    conn.bad_offset = pos
        heads = V.zcrx_runs(start, length, keys, so)
        ends = np.append(heads[1:], len(keys)) - 1
        for k in uniq:  # one pass per connection, its runs in order (no call per chunk)
            conn = self.conns[k]
            sinks = [f for f in (conn.sha.update if conn.sha is not None else None,
                                 conn.out.write if conn.out is not None else None) if f]
            if not sinks:
                continue
            if single:
                hk, ek = heads, ends
            else:
                mine = keys[heads] == k
                hk, ek = heads[mine], ends[mine]
            feed = sinks[0] if len(sinks) == 1 else _tee(*sinks)
            self.hash_staged_bytes += V.zcrx_hash_runs(feed, area, start, length, hk, ek)
        if single:
            counts = [len(keys)]
        else:
            counts = np.bincount(np.searchsorted(np.array(uniq, dtype=keys.dtype), keys),
                                 minlength=len(uniq)).tolist()
        for k, c in zip(uniq, counts, strict=True):
            conn = self.conns[k]
            conn.nbytes = self.positions[k]
            conn.cqes += c
            if conn.first_ns is None:
                conn.first_ns = now_ns
        nbytes = batch.nbytes
        self.read_bytes += nbytes
        self.data_cqes += len(keys)
        self.batches += 1
        pq = self.per_queue[slot]
        pq["bytes"] += nbytes
        pq["data_cqes"] += len(keys)
        L.io_uring_zcrx_return(ifq, batch.off, batch.length)
        end_ns = time.monotonic_ns()
        for k in uniq:
            self.conns[k].last_ns = end_ns
        if self.first_ns is None:
            self.first_ns = now_ns
        self.last_ns = end_ns
        if ifq.nodev and L.io_uring_zcrx_rq_queued(ifq) >= ifq.rq_entries // 2:
            L.io_uring_zcrx_flush_rq(ifq)

    def on_zc_end(self, fd: int, res: int, flags: int) -> None:
        """A RECV_ZC CQE that is not plain data-with-F_MORE."""
        conn = self.conns.get(fd)
        if conn is None or conn.done:
            return
        if flags & _F_MORE:
            if res < 0:  # not expected from the kernel: report, keep going
                self.errors.append(f"conn {conn.index}: CQE res {res} with F_MORE")
            return
        # The request is over.
        if res > 0 or res == -errno.ENOSPC:
            self._rearm(conn)
            return
        if res == -errno.ENOMEM and conn.nbytes > conn.enomem_at:
            conn.enomem_at = conn.nbytes
            assert conn.ifq is not None
            L.io_uring_zcrx_flush_rq(conn.ifq)
            self._rearm(conn)
            return
        if res < 0:
            conn.error = -res
        self.close_conn(conn)

    def _rearm(self, conn: Conn) -> None:
        if self.opts.size and conn.nbytes >= self.opts.size:
            self.close_conn(conn)  # budget used up (the kernel would say res 0)
            return
        conn.rearms += 1
        self.arm_recv_zc(conn)

    def close_conn(self, conn: Conn) -> None:
        conn.done = True
        close_output(conn.out)
        conn.out = None
        s = conn.summary(self.opts)
        self.finished.append(s)
        verdict = "ok" if s["ok"] else "FAILED " + ",".join(
            k for k, v in s["checks"].items() if not v)
        extra = ""
        if conn.error is not None:
            extra = f" error {errno.errorcode.get(conn.error, conn.error)}"
        if conn.bad_offset is not None:
            extra += f" first bad byte at {conn.bad_offset}"
        self.say(f"conn {conn.index} {s['peer']} bytes {conn.nbytes} cqes {conn.cqes} "
                 f"sha256 {s['sha256']} {verdict}{extra}")
        del self.conns[conn.fd]
        self.positions.pop(conn.fd, None)
        sqe = self._sqe()
        L.io_uring_prep_close(sqe, conn.fd)
        L.io_uring_sqe_set_data64(sqe, user_data(KIND_CLOSE, conn.fd))

    # -- the loop -----------------------------------------------------------------------------

    def accepted_total(self) -> int:
        if self.coord is None or self.opts.worker is None:
            return self.accepted
        self.coord.set_accepted(self.opts.worker, self.accepted)
        return self.coord.accepted()

    def done(self) -> bool:
        n = self.opts.connections
        if self.coord is not None:  # -n counts every worker's; a dead worker's never come
            return bool(n) and not self.conns and (
                self.accepted_total() >= n or self.coord.dead)
        return bool(n) and len(self.finished) >= n and not self.conns

    def run(self) -> int:
        o = self.opts
        k = self.k
        params = np.zeros(1, dtype=abi.io_uring_params)
        params["cq_entries"] = o.cq_entries
        flags = (L.ZCRX_RING_FLAGS | abi.IORING_SETUP_CQSIZE | abi.IORING_SETUP_SUBMIT_ALL)
        sq = min(o.sq_entries, o.cq_entries)  # the kernel wants cq_entries >= sq_entries
        self.ring = L.io_uring_queue_init(sq, flags, params, kernel=k)
        try:
            if o.nodev:
                if_idx, rxqs, reg_flags = 0, [0], abi.ZCRX_REG_NODEV
            else:
                if_idx, reg_flags = L.if_nametoindex(k, o.ifname), 0
                rxqs = o.rxqs or [o.rxq or 0]
            rxq = rxqs[0]
            areas = _AreaMaker(k, max(o.area_size, o.grow), len(rxqs))
            try:
                for i, q in enumerate(rxqs):
                    self.ifqs.append(L.io_uring_register_ifq(
                        self.ring, if_idx, q, rq_entries=o.rq_entries, area_size=o.area_size,
                        area=areas.next(), rq_kernel=o.rq_kernel, flags=reg_flags,
                        rx_buf_len=o.rx_buf_len,
                        events=((1 << abi.ZCRX_EVENT_TYPE_LAST) - 1) if o.events else 0,
                        event_user_data=KIND_EVENT | (i << 8), stats=o.events,
                        area_reserve=o.grow))
                    self.per_queue.append({"queue": q, "connections": 0, "bytes": 0,
                                           "data_cqes": 0})
            finally:
                areas.close()
            self.ifq = self.ifqs[0]
            if len(rxqs) > 1 or (self.coord is not None and not o.nodev):
                # the netdev queue view: napi-id of each of our queues
                napi: dict[int, int] = {
                    int(row["id"]): int(row["napi-id"]) for row in k.queues()
                    if row.get("ifindex") == if_idx and row.get("type") == "rx"
                    and row.get("napi-id")}
                self.by_napi = {napi[q]: i for i, q in enumerate(rxqs) if q in napi}
            if o.connections + _SPARE_FDS > _NOFILE:  # as servers do: room for every conn
                k.setrlimit_nofile(o.connections + _SPARE_FDS)
            if self.coord is not None and o.worker is not None:
                self._listen_in_turn(o.worker)
            else:
                self.lfd = k.listen_tcp(o.port, o.addr, o.backlog)
            if o.napi_busy_poll:
                napi_reg = np.zeros(1, dtype=abi.io_uring_napi)
                napi_reg["busy_poll_to"] = o.napi_busy_poll
                L.io_uring_register_napi(self.ring, napi_reg)
            self.arm_accept()
            L.io_uring_submit(self.ring)
            where = ("no device" if o.nodev else f"{o.ifname} queue {rxq}" if len(rxqs) == 1
                     else f"{o.ifname} queues {','.join(map(str, rxqs))}")
            who = "" if o.worker is None else f" worker {o.worker} (pid {os.getpid()})"
            self.say(f"zcrx_server{who} listening on {o.addr}:{o.port}; zcrx id "
                     f"{','.join(str(q.zcrx_id) for q in self.ifqs)} on {where}, area "
                     f"{self.ifq.area_len >> 20} MiB, "
                     f"rq {self.ifq.rq_entries} ({'kernel' if o.rq_kernel else 'user'} "
                     f"memory), cq {self.ring.cq_entries}")
            notify_ready(f"listening {o.addr}:{o.port}")
            self._loop()
            self.copy_fallback = fb = self._kernel_copy_stats()
            copied = ("unknown (the kernel's stats did not say)" if fb is None else
                      f"{fb['count']} chunks, {fb['bytes']} bytes (zero copy: "
                      f"{fb['zc_cqes']} chunks, {fb['zc_bytes']} bytes)")
            self.say(f"zcrx: {self.data_cqes} data CQEs in {self.batches} batches, "
                     f"{self.read_bytes} bytes read in place; copy fallback: {copied}")
        finally:
            self._teardown()
        ok = not self.errors and all(s["ok"] for s in self.finished)
        if o.connections and len(self.finished) < o.connections and self.coord is None:
            ok = False
            self.errors.append(f"served {len(self.finished)} of {o.connections} connections")
        return EXIT_OK if ok else EXIT_CHECK_FAILED

    def _listen_in_turn(self, worker: int) -> None:
        """``-w``: listen with SO_REUSEPORT after worker ``worker - 1`` did (so this listener
        is member ``worker`` of the port's group) and attach the group's program, the SYN's
        RX queue modulo the number of workers (:func:`shared.bpf.queue_modulo`): queue q's
        connections come to the worker that registered q's ifq."""
        assert self.coord is not None
        o = self.opts
        if not self.coord.wait_turn(worker, o.seconds or _READY_TIMEOUT_S):
            raise ZcrxError(f"worker {worker}: worker {self.coord.turn} did not listen")
        self.lfd = self.k.listen_tcp(o.port, o.addr, o.backlog, reuseport=True)
        self.k.attach_reuseport_cbpf(self.lfd, bpf.queue_modulo(o.workers))
        self.coord.pass_turn(worker)

    def _teardown(self) -> None:
        for conn in list(self.conns.values()):
            close_output(conn.out)
            conn.out = None
            self.finished.append(conn.summary(self.opts))  # cut short: "complete" fails
        self.conns.clear()
        try:
            if self.lfd >= 0:
                try:
                    self.k.close_fd(self.lfd)
                except ControlError:
                    pass
                self.lfd = -1
            L.io_uring_queue_exit(self.ring)
        except PeerGone:
            self.ring._detach()
            raise

    def _loop(self) -> None:
        o = self.opts
        deadline = time.monotonic() + o.seconds if o.seconds else None
        ring = self.ring
        ifq = self.ifqs[0]
        while not self.done() and not self.stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                self.errors.append("timed out")
                break
            if L.io_uring_cq_ready(ring) == 0 and ifq.nodev and L.io_uring_zcrx_rq_queued(ifq):
                L.io_uring_zcrx_flush_rq(ifq)  # about to wait: let the kernel have them all
            try:
                L.io_uring_wait_cqes_min_timeout(ring, o.wait_nr, 200, o.min_wait)
            except ControlError as exc:
                if exc.errno == errno.ETIME:
                    continue
                raise
            while True:
                cqes = L.peek_cqes(ring)
                n = len(cqes)
                if not n:
                    break
                self._batch(cqes)
                L.io_uring_cq_advance(ring, n)
            self.after_batch()
            L.io_uring_submit(ring)

    def _batch(self, cqes: np.ndarray) -> None:
        """One CQE view: data chunks vectorised, every other CQE one by one (in CQ order)."""
        ud = cqes["user_data"]
        kind = ud & np.uint64(0xFF)
        zc = kind == KIND_ZC
        res = cqes["res"]
        flags = cqes["flags"]
        now = time.monotonic_ns()
        if len(self.ifqs) == 1:
            batch = L.zcrx_batch(self.ifqs[0], cqes, zc)
            if len(batch):
                self.on_data(cqes, batch, now)
        else:
            self._split_batch(cqes, zc, now)
        plain = zc & (res > 0) & ((flags & _F_MORE) != 0)
        rest = np.flatnonzero(~plain)
        if not len(rest):
            return
        accepts = []
        for u, r, f in zip(ud[rest].tolist(), res[rest].tolist(), flags[rest].tolist(),
                           strict=True):
            kd, fd = u & 0xFF, u >> 8
            if kd == KIND_ZC:
                self.on_zc_end(fd, r, f)
            elif kd == KIND_ACCEPT:
                accepts.append((r, f))  # together below: one round trip for all of them
            elif kd == KIND_EVENT:
                self.on_event(r, fd)
            elif kd == KIND_CLOSE:
                if r < 0:
                    self.errors.append(f"close({fd}): {errno.errorcode.get(-r, r)}")
            else:
                self.on_other(kd, fd, r, f)
        if accepts:
            self.on_accepts(accepts)

    def on_other(self, kind: int, fd: int, res: int, flags: int) -> None:
        """A CQE of a request kind this class does not make (subclasses: --iperf3)."""

    def after_batch(self) -> None:
        """Once per loop pass, after the CQEs (subclasses: --iperf3)."""

    def _split_batch(self, cqes: np.ndarray, zc: NDArray[np.bool_], now: int) -> None:
        """Several ifqs: the data CQEs of the view split by connection into one batch per
        ifq (a connection's CQEs all name its ifq's area)."""
        fds = (cqes["user_data"] >> np.uint64(8))[zc]
        if not len(fds):
            return
        uniq, inv = np.unique(fds, return_inverse=True)
        slot_of = np.array([self.fd_ifq.get(int(f), 0) for f in uniq.tolist()], dtype=np.int64)
        slots = slot_of[inv]
        where = np.flatnonzero(zc)
        for i in np.unique(slot_of).tolist():
            sel = np.zeros(len(zc), dtype=bool)
            sel[where[slots == i]] = True
            batch = L.zcrx_batch(self.ifqs[i], cqes, sel)
            if len(batch):
                self.on_data(cqes, batch, now, i)

    def on_event(self, etype: int, slot: int = 0) -> None:
        """A zcrx event CQE (``-E``) of ifq ``slot``: say it; ALLOC_FAIL is re-armed (each
        starvation episode shows), COPY stays off after the first (it would fire on every
        copy)."""
        ifq = self.ifqs[slot] if slot < len(self.ifqs) else self.ifq
        assert ifq is not None
        stats = L.io_uring_zcrx_copy_stats(ifq)
        self.say(f"zcrx event {_EVENT_NAMES.get(etype, etype)}"
                 + ("" if stats is None else f" (copy stats: {stats[0]} chunks, "
                                             f"{stats[1]} bytes)"))
        self.events += 1
        name = _EVENT_NAMES.get(etype, str(etype))
        self.event_counts[name] = self.event_counts.get(name, 0) + 1
        if etype == abi.ZCRX_EVENT_ALLOC_FAIL:
            if self.opts.grow:
                self._grow(ifq)
            L.io_uring_zcrx_arm_event(ifq, etype)

    def _grow(self, ifq: L.ZcrxIfq) -> None:
        """``--grow``: one more area of ``-S`` bytes (or what is left of MAX) for ``ifq``
        (the one whose ALLOC_FAIL fired)."""
        length = min(self.opts.area_size, self.opts.grow - ifq.area_len)
        length -= length % PAGE_SIZE
        if length <= 0 or self.grow_error is not None:
            return
        try:
            area_id = L.io_uring_zcrx_add_area(ifq, length)
        except ControlError as exc:  # e.g. a kernel before 7.3: stop trying
            self.grow_error = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.say(f"zcrx: cannot add an area ({self.grow_error}); not growing")
            return
        self.say(f"zcrx: added area {area_id} ({length >> 10} KiB): "
                 f"{len(ifq.area_bases)} areas, {ifq.area_len >> 10} KiB")

    def _kernel_copy_stats(self) -> dict[str, Any] | None:
        """The kernel's copy-fallback counters for our ifqs, summed (read while the ring is
        alive); each ifq's own are kept in ``per_queue[i]["kernel"]``."""
        if not self.ifqs:
            return None
        try:
            body = self.k.syscall("stats").body
        except (ControlError, PeerGone):
            return None
        found = [find_ifq_stats(body, self.k.task, ifq.area_addr) for ifq in self.ifqs]
        for pq, f in zip(self.per_queue, found, strict=True):
            if f is not None:
                pq["kernel"] = f["counters"]
        if len(found) == 1 or any(f is None for f in found):
            return found[0]
        total: dict[str, Any] = {"source": "kernel", "count": 0, "bytes": 0, "zc_cqes": 0,
                                 "zc_bytes": 0}
        for f in found:
            assert f is not None
            for key in ("count", "bytes", "zc_cqes", "zc_bytes"):
                total[key] += f[key]
        total["counters"] = found[0]["counters"] if found[0] else {}
        return total

    def summary(self) -> dict[str, Any]:
        ifq = self.ifq
        secs = ((self.last_ns - self.first_ns) / 1e9
                if self.first_ns is not None and self.last_ns is not None else 0.0)
        total = sum(s["bytes"] for s in self.finished)
        return {
            "mode": "zcrx",
            "connections": self.finished, "errors": self.errors, "bytes": total,
            "ok": not self.errors and all(s["ok"] for s in self.finished),
            "first_ns": self.first_ns, "last_ns": self.last_ns, "seconds": secs,
            "gbps": total / secs / 1e9 if secs > 0 else 0.0,
            "app": {"read_bytes": self.read_bytes, "copy_bytes": 0,
                    "data_cqes": self.data_cqes, "batches": self.batches,
                    "stray_chunks": self.stray_chunks,
                    "hash_staged_bytes": self.hash_staged_bytes},
            "zcrx": None if ifq is None else {
                "zcrx_id": ifq.zcrx_id, "if_idx": ifq.if_idx, "if_rxq": ifq.if_rxq,
                "nodev": ifq.nodev, "area_bytes": ifq.area_len, "areas": len(ifq.area_bases),
                "events": dict(self.event_counts), "grow_error": self.grow_error,
                "rq_entries": ifq.rq_entries,
                "rq_memory": "user" if ifq.rq_user else "kernel", **ifq.stats()},
            "copy_fallback": self.copy_fallback,
            "queues": self.per_queue,
        }


def find_ifq_stats(body: Any, task: int | None, area_addr: int) -> dict[str, Any] | None:
    """The copy-fallback counters of our ifq in a ``stats`` reply (``zcrx.ifqs[*]``: the one
    of this task whose area starts at ``area_addr``, which is unique in our mm).  Returns
    ``{"source": "kernel", "count", "bytes", "zc_cqes", "zc_bytes", "counters"}``, or None when
    the kernel reports no such ifq."""
    zcrx = body.get("zcrx") if isinstance(body, dict) else None
    for d in (zcrx or {}).get("ifqs", []):
        area = d.get("area") or {}
        if d.get("task") != task or area.get("addr") != area_addr:
            continue
        c = d.get("counters") or {}
        if "copy_count" not in c or "copy_bytes" not in c:
            return None
        return {"source": "kernel", "count": int(c["copy_count"]),
                "bytes": int(c["copy_bytes"]), "zc_cqes": int(c.get("zc_cqes", 0)),
                "zc_bytes": int(c.get("zc_bytes", 0)), "counters": dict(c)}
    return None


def _size(text: str) -> int:
    """``123``, ``64K``, ``64M``, ``1G`` (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        value = int(t, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return value


def _queues(text: str) -> list[int]:
    """``3``, ``1-16``, ``1,3,5`` or a mix (``0,4-7``): queue numbers, in order, no repeats."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            first = int(lo)
            last = int(hi) if sep else first
            if last < first:
                raise ValueError
            out.extend(q for q in range(first, last + 1) if q not in out)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad queue list {text!r}") from None
    return out


#: CQ entries per queue of a server's ring when ``-C`` is not given.
CQ_PER_QUEUE = 8192


def cq_entries_for(queues: int, per_queue: int = CQ_PER_QUEUE) -> int:
    """CQ entries for a ring serving ``queues`` queues: ``per_queue`` each, rounded up to a
    power of two (as ``io_uring_setup`` rounds ``cq_entries``) and at most
    ``IORING_MAX_CQ_ENTRIES``.  Every queue's ifq can have its whole area out at once: with
    one CQ of 4096 for 64 of them the CQ ran full and each RECV_ZC ended with ``-ENOSPC``
    (then a re-arm, a syscall) about 30 times per connection."""
    n = max(1, per_queue * max(1, queues))
    return min(abi.IORING_MAX_CQ_ENTRIES, 1 << (n - 1).bit_length())


def _pow2(text: str) -> int:
    n = _size(text)
    if n <= 0 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"{text} is not a power of two")
    return n


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m app_proc.zcrx_server",
                                description="Zero-copy io_uring TCP receiver (RECV_ZC into a "
                                            "registered area, buffers returned through the "
                                            "refill queue), as liburing's examples/zcrx.")
    add_common_args(p, quiet_short=False)
    p.add_argument("-i", "--ifname", default="eth0", help="netdev of the queue (eth0)")
    p.add_argument("-q", "--rxq", type=_queues, help="hardware RX queue(s) to bind, one ifq "
                                                     "each: 3, 1-16 or 1,3,5 (mandatory "
                                                     "unless --nodev)")
    p.add_argument("--nodev", action="store_true",
                   help="ZCRX_REG_NODEV: no device, every byte through the copy fallback")
    p.add_argument("-s", "--size", type=_size, default=0,
                   help="bytes per connection: the RECV_ZC budget, checked at the end "
                        "(0: unlimited, not checked)")
    p.add_argument("-r", "--rq-mem", type=int, choices=(0, 1), default=0,
                   help="refill queue in user memory (0, default) or kernel memory (1)")
    p.add_argument("-S", "--area-size", type=_size, default=64 << 20,
                   help="area size (64M; liburing's example uses 256M)")
    p.add_argument("-C", "--cq-entries", type=_pow2, default=0,
                   help=f"CQ entries (default: {CQ_PER_QUEUE} per queue this process serves, "
                        f"up to {abi.IORING_MAX_CQ_ENTRIES})")
    p.add_argument("-R", "--rq-entries", type=_pow2, default=8192, help="RQ entries (8192)")
    p.add_argument("--sq-entries", type=_pow2, default=256, help="SQ entries (256)")
    p.add_argument("--rx-buf-len", type=_size, default=0,
                   help="ifq_reg.rx_buf_len (0: the kernel's default)")
    p.add_argument("-b", "--backlog", type=int, default=128,
                   help="listen backlog (128; SYNs beyond it are dropped, as on Linux: "
                        "raise it for many flows starting at once)")
    p.add_argument("-E", "--events", action="store_true",
                   help="ask for zcrx events (Linux 7.2+) and print each one")
    p.add_argument("--grow", type=_size, default=0, metavar="MAX",
                   help="on ALLOC_FAIL add an area of -S bytes (Linux 7.3) until MAX bytes "
                        "are registered (implies -E)")
    p.add_argument("-w", "--workers", type=int, default=1, metavar="N",
                   help="spread the -q queues over N worker processes, each with its own ring "
                        "and the ifqs of its queues; each worker listens on the port with "
                        "SO_REUSEPORT and the group's classic BPF program sends a SYN to "
                        "worker (rx queue mod N), so queue q is served by worker q mod N "
                        "(1: one process)")
    p.add_argument("--napi-busy-poll", type=int, default=0, metavar="US",
                   help="register io_uring NAPI busy polling: a wait for CQEs polls the RX "
                        "queues for up to US microseconds before sleeping (0: off)")
    p.add_argument("--wait-nr", type=int, default=1, metavar="N",
                   help="each wait asks for N CQEs (1); above 1 it needs --min-wait")
    p.add_argument("--min-wait", type=int, default=0, metavar="US",
                   help="batch waits (IORING_FEAT_MIN_TIMEOUT, io_uring_getevents_arg's "
                        "min_wait_usec): a wait for --wait-nr CQEs ends after US "
                        "microseconds if any CQE is ready, so a server on many quiet queues "
                        "wakes once per batch, not once per CQE (0: off)")
    p.add_argument("--iperf3", action="store_true",
                   help="be an iperf3 server (TCP only): speak iperf3's control protocol on "
                        "the port (read with RECV, written with SEND), receive each test's "
                        "data streams zero copy and report what they received, so "
                        "'iperf3 -c HOST -p PORT [-P N] [-n BYTES | -t SECS]' runs against "
                        "it; -u, -R, --bidir and -O are refused; -n counts tests, not "
                        "connections (app_proc/iperf3.py)")
    a = p.parse_args(argv)
    if a.iperf3:
        for bad, name in ((a.verify, "-v"), (a.output, "-o"), (a.size, "-s"),
                          (a.workers != 1, "-w")):
            if bad:
                p.error(f"--iperf3 cannot be used with {name}")
    common = common_options(p, a)
    tests = 0
    if a.iperf3:
        tests, common["connections"] = common["connections"], 0
    rxqs: list[int] = a.rxq or []
    if a.nodev and rxqs not in ([], [0]):
        p.error("--nodev takes no queue (if_rxq must be 0)")
    if not a.nodev and not rxqs:
        p.error("-q RXQ is required (or --nodev)")
    if any(q < 0 for q in rxqs):
        p.error("-q must be >= 0")
    if a.area_size <= 0:
        p.error("-S must be positive")
    if a.grow and a.grow < a.area_size:
        p.error("--grow MAX must be at least -S")
    if not 0 <= a.napi_busy_poll <= 0xFFFFFFFF:
        p.error("--napi-busy-poll must be in [0, 2^32)")
    if not 0 <= a.min_wait <= 0xFFFFFFFF:
        p.error("--min-wait must be in [0, 2^32)")
    if a.wait_nr < 1:
        p.error("--wait-nr must be at least 1")
    if a.wait_nr > 1 and not a.min_wait:
        p.error("--wait-nr above 1 needs --min-wait (or the last CQEs of a stream would wait "
                "for a batch that never fills)")
    spread = _spread(p, a.workers, rxqs, a.nodev, a.output)
    if not a.cq_entries:  # each worker serves its share of the queues on its own ring
        a.cq_entries = cq_entries_for(-(-max(1, len(rxqs)) // max(1, a.workers)))
    opts = Options(**common, ifname=a.ifname, rxq=rxqs[0] if rxqs else None,
                   rxqs=rxqs if len(rxqs) > 1 else [], nodev=a.nodev,
                   rq_kernel=a.rq_mem == 1, area_size=a.area_size, cq_entries=a.cq_entries,
                   rq_entries=a.rq_entries, sq_entries=a.sq_entries, rx_buf_len=a.rx_buf_len,
                   events=a.events or bool(a.grow), grow=a.grow,
                   napi_busy_poll=a.napi_busy_poll, wait_nr=a.wait_nr, min_wait=a.min_wait,
                   backlog=a.backlog, workers=a.workers,
                   worker_queues=spread, iperf3=a.iperf3, iperf3_tests=tests)
    return opts, a


def _spread(p: argparse.ArgumentParser, n: int, rxqs: list[int], nodev: bool,
            output: str | None) -> list[list[int]]:
    """``-w N``: the queues of each worker, as the reuseport program will place their SYNs
    (worker ``prog(queue)``, computed by running the very program the workers attach)."""
    if n < 1:
        p.error("-w must be at least 1")
    if n == 1:
        return []
    if nodev:
        p.error("-w needs hardware queues (-q), not --nodev")
    if output is not None:
        p.error("-o cannot be used with -w (each worker numbers its own connections)")
    prog = bpf.check(bpf.queue_modulo(n))
    spread: list[list[int]] = [[] for _ in range(n)]
    for q in rxqs:
        spread[prog.run(bpf.SkbInfo(queue_mapping=q + 1))].append(q)
    idle = [w for w, qs in enumerate(spread) if not qs]
    if idle:
        p.error(f"-w {n}: worker {idle[0]} would serve no queue of -q "
                f"{','.join(map(str, rxqs))} (queue q goes to worker q mod {n}); use fewer "
                f"workers or more queues")
    return spread


def main(argv: list[str] | None = None, kernel: S.Kernel | None = None,
         stop: threading.Event | None = None) -> int:
    opts, a = parse_args(argv)
    if opts.workers > 1:
        return _main_workers(opts, a)
    if opts.iperf3:
        from app_proc.iperf3 import Iperf3Server
        return serve("zcrx_server", lambda k, ev, log: Iperf3Server(
                         k, opts, ev, log=log, tests=opts.iperf3_tests),
                     rundir=a.rundir, run=a.run, json_path=opts.json_path, kernel=kernel,
                     stop=stop)
    return serve("zcrx_server", lambda k, ev, log: ZcrxServer(k, opts, ev, log=log),
                 rundir=a.rundir, run=a.run, json_path=opts.json_path, kernel=kernel, stop=stop,
                 output=opts.output)


def _main_workers(opts: Options, a: argparse.Namespace) -> int:
    """``-w N``: fork the workers (before any kernel connection), wait, merge their reports
    (:mod:`app_proc.workers`), print the verified summary, write ``--json``."""
    json_stdout = opts.json_path == "-"
    log = sys.stderr if json_stdout else sys.stdout
    if a.run is None:  # one clear line rather than one per worker
        try:
            S.locate_run(a.rundir)
        except S.RunNotFound as exc:
            print(f"zcrx_server: {exc}", file=sys.stderr)
            return EXIT_USAGE

    def work(i: int, coord: W.Coord, json_path: str) -> int:
        qs = opts.worker_queues[i]
        mine = dataclasses.replace(opts, rxq=qs[0], rxqs=qs if len(qs) > 1 else [],
                                   worker=i, json_path=json_path, worker_queues=[])
        return serve(f"zcrx_server.w{i}",
                     lambda k, ev, _log: ZcrxServer(k, mine, ev, log=log, coord=coord),
                     rundir=a.rundir, run=a.run, json_path=json_path)

    code, merged = W.run(opts.workers, work, what=f"listening {opts.addr}:{opts.port}",
                         ready_timeout=opts.seconds or _READY_TIMEOUT_S,
                         json_path=opts.json_path, log=log)
    n = opts.connections
    if n and len(merged["connections"]) < n:
        merged["errors"].append(f"served {len(merged['connections'])} of {n} connections")
        merged["ok"] = False
    if not merged["ok"] and code == 0:
        code = EXIT_CHECK_FAILED
    if not opts.quiet:
        verdict = "ok" if merged["ok"] else "FAILED"
        fb = merged["copy_fallback"]
        copied = "unknown" if fb is None else f"{fb['count']} chunks, {fb['bytes']} bytes"
        print(f"zcrx_server: {opts.workers} workers, {len(merged['connections'])} connections, "
              f"{merged['bytes']} bytes, copy fallback {copied}: {verdict}", file=log,
              flush=True)
    for e in merged["errors"]:
        print(f"zcrx_server: {e}", file=sys.stderr)
    if opts.json_path:
        write_json(opts.json_path, merged)
    return code


if __name__ == "__main__":
    sys.exit(main())
