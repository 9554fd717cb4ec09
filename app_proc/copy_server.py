"""A copying TCP receiver on io_uring: the baseline the zero-copy server is compared with.

    python -m app_proc.copy_server [-p PORT] [-v] [-s BYTES] [-o FILE|-] [-b SIZE] [-n CONNS]
                                   [--stream-id ID|sport] [--json PATH] [--timing]

Written like liburing's examples: one ring; a multishot ACCEPT on the listener; per
connection a multishot RECV that picks buffers from a provided-buffer ring (so steady-state
receive costs no syscall and no SQE per chunk); every CQE batch is read, then its buffers go
back to the ring with one :meth:`~app_proc.liburing.BufRing.add` and one tail store.

Per connection the server counts bytes, hashes them (SHA-256), optionally verifies them
against :mod:`shared.pattern` (``-v``; the stream id is the peer's TCP source port, which is
what the NIC's generator uses, see ``nic_proc/sources.py``, or a fixed ``--stream-id``),
optionally checks the total (``-s``) and writes them to a file or stdout (``-o``, see
:mod:`app_proc.server`).  At the close of each
connection it prints one line; ``--json`` writes a summary.  Exit status 0 only if every
connection passed every check; 1 if one failed; 3 for a setup error.

``--timing`` (for benchmarks) adds to the JSON summary what :mod:`app_proc.zcrx_server` always
reports: ``first_ns``/``last_ns``, this process's ``time.monotonic_ns()`` at its first data CQE
and at the end of the last one it handled (first byte -> last byte), and ``kernel_ring``, its
ring's counters from the kernel's ``stats`` read before the ring is closed (RECV's
``recv_bytes`` is what the kernel copied).

Memory: the buffer ring and the buffers are this process's regions (``app<task>.*``), created
and unlinked here; the ring regions are the kernel's, attached and detached here.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from app_proc import liburing as L
from app_proc import syscall as S
from app_proc import verify as V
from app_proc.server import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
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
)
from shared import abi
from shared.errors import ZcrxError
from shared.msg import ControlError
from shared.proc import notify_ready

BGID = 1
KIND_RECV = 2


@dataclass
class Options(ServerOptions):
    buf_size: int = 16384
    nbufs: int = 64
    entries: int = 64
    timing: bool = False  # --timing: first/last data CQE times and the kernel's ring counters


@dataclass
class Conn:
    fd: int
    index: int
    peer: tuple[str, int]
    stream: int
    nbytes: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    bad_offset: int | None = None
    error: int | None = None
    out: IO[bytes] | None = None
    done: bool = False

    def summary(self, opts: Options) -> dict[str, Any]:
        checks: dict[str, bool] = {"error": self.error is None}
        if opts.verify:
            checks["verify"] = self.bad_offset is None
        if opts.size:
            checks["size"] = self.nbytes == opts.size
        return {
            "index": self.index, "peer": f"{self.peer[0]}:{self.peer[1]}",
            "stream": self.stream, "bytes": self.nbytes,
            "sha256": self.sha.hexdigest() if self.sha is not None else None,
            "bad_offset": self.bad_offset, "error": self.error,
            "ok": all(checks.values()), "checks": checks,
        }



class CopyServer(AcceptingServer):
    """The server's state; :meth:`run` is the loop."""

    def __init__(self, kernel: S.Kernel, opts: Options, stop: threading.Event | None = None,
                 log: IO[str] | None = None) -> None:
        super().__init__(kernel, opts, stop, log)
        self.opts: Options = opts
        self.conns: dict[int, Conn] = {}
        self.finished: list[dict[str, Any]] = []
        # --timing only
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.kernel_ring: dict[str, Any] | None = None

    def arm_recv(self, fd: int) -> None:
        sqe = self._sqe()
        L.io_uring_prep_recv_multishot(sqe, fd, 0, 0)
        L.io_uring_sqe_set_buf_group(sqe, BGID)
        L.io_uring_sqe_set_data64(sqe, user_data(KIND_RECV, fd))

    # -- completions --------------------------------------------------------------------------

    def open_conn(self, fd: int, peer: tuple[str, int], stream: int,
                  info: Sequence[dict[str, Any]] = ()) -> None:
        conn = Conn(fd, self.accepted, peer, stream)
        if not self.opts.hash:
            conn.sha = None
        conn.out = open_output(self.opts.output, conn.index, self.opts.connections)
        self.conns[fd] = conn
        self.arm_recv(fd)

    def on_recv(self, fd: int, res: int, flags: int, data: np.ndarray | None,
                rearm: list[int]) -> None:
        conn = self.conns.get(fd)
        if conn is None or conn.done:
            return
        if res > 0 and data is not None:
            if self.opts.verify and conn.bad_offset is None:
                conn.bad_offset = V.first_bad_offset(conn.stream, conn.nbytes, data)
            if conn.sha is not None:
                conn.sha.update(data)
            if conn.out is not None:
                conn.out.write(data.tobytes())
            conn.nbytes += res
            if not flags & abi.IORING_CQE_F_MORE:
                rearm.append(fd)
            return
        if res == -errno.ENOBUFS:
            rearm.append(fd)  # after this batch's buffers are back
            return
        if res < 0:
            conn.error = -res
        self.close_conn(conn)

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
        self.say(f"conn {conn.index} {s['peer']} bytes {conn.nbytes} sha256 {s['sha256']}"
                 f" {verdict}{extra}")
        del self.conns[conn.fd]
        sqe = self._sqe()
        L.io_uring_prep_close(sqe, conn.fd)
        L.io_uring_sqe_set_data64(sqe, user_data(KIND_CLOSE, conn.fd))

    # -- the loop -----------------------------------------------------------------------------

    def done(self) -> bool:
        n = self.opts.connections
        return bool(n) and len(self.finished) >= n and not self.conns

    def run(self) -> int:
        o = self.opts
        k = self.k
        self.ring = L.io_uring_queue_init(o.entries, kernel=k)
        try:
            self.lfd = k.listen_tcp(o.port, o.addr)
            self.br = L.io_uring_setup_buf_ring(self.ring, o.nbufs, BGID)
            self.mem = k.alloc_memory(o.nbufs * o.buf_size, tag="bufs")
            bs = o.buf_size
            self.addrs = self.mem.addr + bs * np.arange(o.nbufs, dtype=np.int64)
            self.br.add(self.addrs, bs, np.arange(o.nbufs))
            self.br.advance(o.nbufs)
            self.arm_accept()
            L.io_uring_submit(self.ring)
            self.say(f"copy_server listening on {o.addr}:{o.port}")
            notify_ready(f"listening {o.addr}:{o.port}")
            self._loop()
            if o.timing:
                self.kernel_ring = self._kernel_ring_stats()
        finally:
            for conn in list(self.conns.values()):
                close_output(conn.out)
                conn.out = None
            if getattr(self, "lfd", -1) >= 0:
                try:
                    k.close_fd(self.lfd)
                except ControlError:
                    pass
            L.io_uring_queue_exit(self.ring)
            if hasattr(self, "mem"):
                self.mem.close()
        ok = not self.errors and all(s["ok"] for s in self.finished)
        if o.connections and len(self.finished) < o.connections:
            ok = False
            self.errors.append(f"served {len(self.finished)} of {o.connections} connections")
        return EXIT_OK if ok else EXIT_CHECK_FAILED

    def _loop(self) -> None:
        o = self.opts
        bs = o.buf_size
        deadline = time.monotonic() + o.seconds if o.seconds else None
        ring = self.ring
        timing = o.timing
        while not self.done() and not self.stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                self.errors.append("timed out")
                break
            try:
                L.io_uring_wait_cqes(ring, 1, timeout_ms=200)
            except ControlError as exc:
                if exc.errno == errno.ETIME:
                    continue
                raise
            rearm: list[int] = []
            bids: list[int] = []
            while True:
                cqes = L.peek_cqes(ring)
                n = len(cqes)
                if not n:
                    break
                uds = cqes["user_data"].tolist()
                res = cqes["res"].tolist()
                flags = cqes["flags"].tolist()
                for ud, r, fl in zip(uds, res, flags, strict=True):
                    kind, fd = ud & 0xFF, ud >> 8
                    if kind == KIND_RECV:
                        data = None
                        if fl & abi.IORING_CQE_F_BUFFER:
                            bid = fl >> abi.IORING_CQE_BUFFER_SHIFT
                            bids.append(bid)
                            if r > 0:
                                data = self.mem.view[bid * bs:bid * bs + r]
                        if timing and r > 0 and self.first_ns is None:
                            self.first_ns = time.monotonic_ns()
                        self.on_recv(fd, r, fl, data, rearm)
                        if timing and r > 0:
                            self.last_ns = time.monotonic_ns()
                    elif kind == KIND_ACCEPT:
                        self.on_accept(r, fl)
                    elif kind == KIND_CLOSE and r < 0:
                        self.errors.append(f"close({fd}): {errno.errorcode.get(-r, r)}")
                L.io_uring_cq_advance(ring, n)
            if bids:
                b = np.array(bids, dtype=np.int64)
                self.br.add(self.addrs[b], bs, b)
                self.br.advance(len(b))
            for fd in rearm:
                if fd in self.conns:
                    self.arm_recv(fd)
            L.io_uring_submit(ring)

    def _kernel_ring_stats(self) -> dict[str, Any] | None:
        """Our ring's entry in the kernel's ``stats`` (read while the ring is open), or None
        when the kernel does not answer or does not list it."""
        found = None
        with contextlib.suppress(ZcrxError):
            body = self.k.syscall("stats").body
            for ring in body.get("io_uring", {}).get("rings", []):
                if ring.get("fd") == self.ring.fd and ring.get("task") == self.k.task:
                    found = ring
        return found

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "connections": self.finished, "errors": self.errors,
            "bytes": sum(s["bytes"] for s in self.finished),
            "ok": not self.errors and all(s["ok"] for s in self.finished)}
        if self.opts.timing:
            out.update(mode="copy", first_ns=self.first_ns, last_ns=self.last_ns,
                       kernel_ring=self.kernel_ring)
        return out


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m app_proc.copy_server",
                                description="Copying io_uring TCP receiver (multishot accept + "
                                            "multishot recv from a provided-buffer ring).")
    add_common_args(p, quiet_short=True)
    p.add_argument("-s", "--size", type=int, default=0,
                   help="expected bytes per connection (checked at EOF; 0: not checked)")
    p.add_argument("-b", "--buf-size", type=int, default=16384, help="buffer size (16384)")
    p.add_argument("--nbufs", type=int, default=64, help="provided buffers (64, power of 2)")
    p.add_argument("-e", "--entries", type=int, default=64, help="SQ entries (64)")
    p.add_argument("--timing", action="store_true",
                   help="add first_ns/last_ns (first and last data CQE) and the kernel's "
                        "counters of this ring (kernel_ring) to the JSON summary")
    a = p.parse_args(argv)
    common = common_options(p, a)
    if a.nbufs <= 0 or a.nbufs & (a.nbufs - 1) or a.nbufs > 32768:
        p.error("--nbufs must be a power of two up to 32768")
    if a.buf_size <= 0:
        p.error("--buf-size must be positive")
    opts = Options(**common, buf_size=a.buf_size, nbufs=a.nbufs,
                   entries=a.entries, timing=a.timing)
    return opts, a


def main(argv: list[str] | None = None, kernel: S.Kernel | None = None,
         stop: threading.Event | None = None) -> int:
    opts, a = parse_args(argv)
    return serve("copy_server", lambda k, ev, log: CopyServer(k, opts, ev, log=log),
                 rundir=a.rundir, run=a.run, json_path=opts.json_path, kernel=kernel, stop=stop,
                 output=opts.output)


if __name__ == "__main__":
    sys.exit(main())
