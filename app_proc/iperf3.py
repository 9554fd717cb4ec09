"""zcrx-server's iperf3 mode: an unmodified ``iperf3 -c`` tests against a zero-copy queue.

    python -m app_proc.zcrx_server --iperf3 -p PORT -i IFNAME -q RXQ [-n TESTS] [--json PATH]

The server speaks iperf3's control protocol (facts from esnet/iperf's ``iperf_api.c``,
``iperf_server_api.c``, ``iperf_api.h``; no code of it): a client connects its control
connection and writes a 37-byte cookie; the server answers with one-byte states
(:data:`PARAM_EXCHANGE`, :data:`CREATE_STREAMS`, :data:`TEST_START`, :data:`TEST_RUNNING`,
:data:`EXCHANGE_RESULTS`, :data:`DISPLAY_RESULTS`); JSON travels as a 4-byte big-endian
length and the text.  The client's parameters say how many streams come (``parallel``);
each data connection first writes the same cookie, then the data.  When the client says
:data:`TEST_END`, the server asks for results: the client's JSON names each stream by id
(1, 3, 4, ...: the numbering ``iperf_add_stream`` gives them, in connect order) with the
bytes it sent; the server waits until its streams received that many (or ended), then
writes its own results (per stream ``bytes`` received, ``start_time``/``end_time``, the
process's CPU use), then DISPLAY_RESULTS; the client prints and answers IPERF_DONE.

What travels where: every connection's cookie, and all of the control connection, is read
with a copying IORING_OP_RECV (``MSG_WAITALL``) into a small buffer of this process's memory
and written with IORING_OP_SEND (the kernel's TCP transmits it: :mod:`driver_proc.tcp_output`);
the data streams are received by the zero-copy path of :class:`app_proc.zcrx_server.
ZcrxServer` (multishot RECV_ZC on the ifq of the queue the flow is steered to, hashed in
place, buffers returned through the RQ), so a stream's byte count in the results is what was
zero-copied.  Differences from ``iperf3 -s``: the real server stops reading its streams at
TEST_END (bytes still in flight are not counted); this one counts every byte the client
says it sent, so ``end.sum_received.bytes`` equals ``end.sum_sent.bytes``.

Supported: TCP, ``-P N`` streams, ``-n BYTES``, ``-t SECS``, ``-k``, ``-l``, ``-b`` and the
other client-side options.  Refused with SERVER_ERROR and iperf3's "not implemented" error
(the client prints "an option you are trying to set is not implemented yet"; this server
says which on its log): UDP (``-u``), SCTP, reverse (``-R``), bidirectional (``--bidir``)
and ``-O`` (the server would have to leave the omitted bytes out of its count).  A test
whose data connections do not all come within 30 s, or whose streams do not receive what
the client says it sent within 60 s of TEST_END, fails (its connections are closed).
A control connection while a test runs gets ACCESS_DENIED ("the server is busy"), as from
``iperf3 -s``.  One test at a time; ``-n`` counts tests (0: until SIGTERM).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from app_proc import liburing as L
from app_proc.server import KIND_CLOSE
from app_proc.zcrx_server import Conn, ZcrxServer
from shared import abi

__all__ = [
    "ACCESS_DENIED",
    "COOKIE_SIZE",
    "CREATE_STREAMS",
    "DISPLAY_RESULTS",
    "EXCHANGE_RESULTS",
    "IPERF_DONE",
    "PARAM_EXCHANGE",
    "SERVER_ERROR",
    "TEST_END",
    "TEST_RUNNING",
    "TEST_START",
    "Iperf3Server",
    "refuse_reason",
    "stream_id",
]

#: iperf3's control states (``iperf_api.h``), one signed byte on the control connection
TEST_START = 1
TEST_RUNNING = 2
TEST_END = 4
PARAM_EXCHANGE = 9
CREATE_STREAMS = 10
SERVER_TERMINATE = 11
CLIENT_TERMINATE = 12
EXCHANGE_RESULTS = 13
DISPLAY_RESULTS = 14
IPERF_DONE = 16
ACCESS_DENIED = -1
SERVER_ERROR = -2
#: an ASCII uuid and its NUL (``COOKIE_SIZE``)
COOKIE_SIZE = 37
#: iperf3's ``IEUNIMP``: "an option you are trying to set is not implemented yet"
IEUNIMP = 13
#: largest control JSON accepted
MAX_JSON = 64 * 1024
#: how long the results wait for stream bytes the client says it sent
DRAIN_TIMEOUT_S = 60.0
#: how long a test waits for its data connections after CREATE_STREAMS
STREAMS_TIMEOUT_S = 30.0

#: user_data kinds of this mode's requests (zcrx_server uses 1-4)
KIND_COOKIE = 5
KIND_CTL_RECV = 6
KIND_CTL_SEND = 7
KIND_DENY = 8

_SLOT = 64  # cookie buffer per fd
_SLOTS = 1024
_CTL_RECV_OFF = _SLOT * _SLOTS
_CTL_SEND_OFF = _CTL_RECV_OFF + MAX_JSON + 64
_CTL_SEND_LEN = 4 * MAX_JSON
_MEM_LEN = _CTL_SEND_OFF + _CTL_SEND_LEN


def stream_id(k: int) -> int:
    """The id iperf3 gives the k-th stream (from 0) of a test: 1, then 3, 4, 5, ...
    (``iperf_add_stream`` starts counting the second at 3)."""
    return 1 if k == 0 else k + 2


def refuse_reason(params: dict[str, Any]) -> str | None:
    """Why this server cannot run a test with the client's parameters, or None."""
    if params.get("udp"):
        return "UDP tests (-u) are not supported: TCP only"
    if params.get("sctp"):
        return "SCTP tests are not supported: TCP only"
    if not params.get("tcp"):
        return "only TCP tests are supported"
    if params.get("reverse"):
        return "reverse mode (-R) is not supported: the server only receives"
    if params.get("bidirectional"):
        return "bidirectional mode (--bidir) is not supported: the server only receives"
    if params.get("omit"):
        return ("omitting the first seconds (-O) is not supported: every byte the client "
                "sends is counted")
    n = params.get("parallel", 1)
    if not isinstance(n, int) or not 1 <= n <= 128:
        return f"parallel streams {n!r}: 1..128 supported"
    return None


@dataclass
class _Recv:
    n: int


@dataclass
class _Send:
    data: bytes


@dataclass
class _WaitStreams:
    pass


@dataclass
class _WaitBytes:
    pass


_Step = _Recv | _Send | _WaitStreams | _WaitBytes


class ControlClosed(Exception):
    """The control connection ended (EOF or an error) before the protocol did."""


@dataclass
class Test:
    """One iperf3 test: its control connection, cookie, streams (fds in connect order)."""

    fd: int
    cookie: bytes
    index: int
    gen: Generator[_Step, bytes | None, str] | None = None
    waiting: _Step | None = None
    params: dict[str, Any] = field(default_factory=dict)
    nstreams: int = 0
    streams: list[int] = field(default_factory=list)
    stream_conns: list[Conn] = field(default_factory=list)
    client_sent: dict[int, int] = field(default_factory=dict)  # id -> bytes, from the client
    drain_deadline: float = 0.0
    streams_deadline: float = 0.0
    cpu0: tuple[float, float, float] = (0.0, 0.0, 0.0)
    started: float = 0.0
    status: str = "running"
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        streams = [{"id": stream_id(k), "fd": c.fd, "bytes": c.nbytes,
                    "client_sent": self.client_sent.get(stream_id(k)),
                    "sha256": c.sha.hexdigest() if c.sha is not None else None}
                   for k, c in enumerate(self.stream_conns)]
        return {"index": self.index, "status": self.status, "error": self.error,
                "params": self.params, "streams": streams,
                "bytes": sum(s["bytes"] for s in streams),
                "client_sent": sum(v for v in self.client_sent.values())}


class Iperf3Server(ZcrxServer):
    """:class:`ZcrxServer` whose connections are iperf3 control and data connections."""

    def __init__(self, *args: Any, tests: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_tests = tests
        self.test: Test | None = None
        self.tests: list[Test] = []
        self.pending: dict[int, tuple[str, int]] = {}  # fd -> peer, cookie not read yet
        self.mem: Any = None
        self._send_at = 0
        self._sends_inflight = 0

    # -- accept: every connection writes its cookie first ---------------------------------

    def accepted_total(self) -> int:
        return 0  # -n counts tests here; the listener closes when they are done

    def on_accepts(self, cqes: Sequence[tuple[int, int]]) -> None:
        for res, flags in cqes:  # each reads its cookie first: no batch to make
            self.on_accept(res, flags)

    def on_accept(self, res: int, flags: int) -> None:
        if res < 0:
            super().on_accepts([(res, flags)])
            return
        self.accepted += 1
        self.pending[res] = self.k.getpeername(res)
        slot = self._slot(res)
        sqe = self._sqe()
        L.io_uring_prep_recv(sqe, res, slot, COOKIE_SIZE, socket.MSG_WAITALL)
        L.io_uring_sqe_set_data64(sqe, (res << 8) | KIND_COOKIE)
        if not flags & abi.IORING_CQE_F_MORE and not self.stop.is_set() and self.lfd >= 0:
            self.arm_accept()

    def _slot(self, fd: int) -> int:
        return int(self.mem.addr) + (fd % _SLOTS) * _SLOT

    def on_other(self, kind: int, fd: int, res: int, flags: int) -> None:
        if kind == KIND_COOKIE:
            self._on_cookie(fd, res)
        elif kind == KIND_CTL_RECV:
            self._on_ctl_recv(fd, res)
        elif kind == KIND_CTL_SEND:
            self._sends_inflight -= 1
            if res < 0 and self.test is not None and self.test.fd == fd:
                self._end_test(f"control send: {errno.errorcode.get(-res, res)}")
        elif kind == KIND_DENY:
            self._close_fd(fd)

    def _on_cookie(self, fd: int, res: int) -> None:
        peer = self.pending.pop(fd, ("?", 0))
        if res != COOKIE_SIZE:
            self._close_fd(fd)  # went away before its cookie
            return
        cookie = bytes(self.mem.at(self._slot(fd), COOKIE_SIZE))
        t = self.test
        if t is None:
            if self.max_tests and len(self.tests) >= self.max_tests:
                self._deny(fd)
                return
            self._start_test(fd, cookie, peer)
            return
        if (cookie == t.cookie and isinstance(t.waiting, _WaitStreams)
                and len(t.streams) < t.nstreams):
            t.streams.append(fd)
            k = len(t.streams) - 1
            self.open_conn(fd, peer, stream_id(k))
            t.stream_conns.append(self.conns[fd])
            self.say(f"iperf3 test {t.index}: stream {stream_id(k)} from {peer[0]}:{peer[1]}")
            if len(t.streams) == t.nstreams:
                self._resume(t, None)
            return
        self._deny(fd)  # busy (another test), or a stream we did not ask for

    def _deny(self, fd: int) -> None:
        self.say(f"iperf3: connection {fd} refused (ACCESS_DENIED: a test is running)")
        self._send(fd, bytes([ACCESS_DENIED & 0xFF]), KIND_DENY)

    def _close_fd(self, fd: int) -> None:
        sqe = self._sqe()
        L.io_uring_prep_close(sqe, fd)
        L.io_uring_sqe_set_data64(sqe, (fd << 8) | KIND_CLOSE)

    # -- the control connection -----------------------------------------------------------

    def _start_test(self, fd: int, cookie: bytes, peer: tuple[str, int]) -> None:
        t = Test(fd, cookie, len(self.tests) + 1)
        self.tests.append(t)
        self.test = t
        self.say(f"iperf3 test {t.index}: control connection from {peer[0]}:{peer[1]}, "
                 f"cookie {cookie.rstrip(bytes(1)).decode('ascii', 'replace')}")
        t.gen = self._control(t)
        self._resume(t, None)

    def _resume(self, t: Test, value: bytes | None) -> None:
        """Run the test's protocol until it waits for something."""
        assert t.gen is not None
        try:
            step = t.gen.send(value)
            while isinstance(step, _Send):
                self._send(t.fd, step.data, KIND_CTL_SEND)
                step = t.gen.send(None)
        except StopIteration as stop:
            t.waiting = None
            self._finish_test(t, str(stop.value))
            return
        except ControlClosed as exc:
            self._end_test(str(exc))
            return
        t.waiting = step
        if isinstance(step, _Recv):
            sqe = self._sqe()
            L.io_uring_prep_recv(sqe, t.fd, int(self.mem.addr) + _CTL_RECV_OFF, step.n,
                                 socket.MSG_WAITALL)
            L.io_uring_sqe_set_data64(sqe, (t.fd << 8) | KIND_CTL_RECV)
        elif isinstance(step, _WaitBytes):
            self.after_batch()

    def _on_ctl_recv(self, fd: int, res: int) -> None:
        t = self.test
        if t is None or t.fd != fd or not isinstance(t.waiting, _Recv):
            return
        if res != t.waiting.n:
            why = "closed" if res >= 0 else errno.errorcode.get(-res, str(res))
            assert t.gen is not None
            try:
                t.gen.throw(ControlClosed(f"control connection {why} (got {res} of "
                                          f"{t.waiting.n} bytes)"))
            except (ControlClosed, StopIteration) as exc:
                self._end_test(str(exc) or "control connection ended")
            return
        data = bytes(self.mem.at(int(self.mem.addr) + _CTL_RECV_OFF, res))
        self._resume(t, data)

    def _send(self, fd: int, data: bytes, kind: int) -> None:
        """SEND ``data`` (copied into this process's send buffer, a ring of slots: several
        sends may be in flight) with MSG_WAITALL."""
        if len(data) > _CTL_SEND_LEN // 2:
            raise ValueError("control message too long")
        if self._send_at + len(data) > _CTL_SEND_LEN:
            self._send_at = 0
        off = _CTL_SEND_OFF + self._send_at
        self._send_at += (len(data) + 63) & ~63
        addr = int(self.mem.addr) + off
        self.mem.at(addr, len(data))[:] = memoryview(data)
        sqe = self._sqe()
        L.io_uring_prep_send(sqe, fd, addr, len(data), socket.MSG_WAITALL)
        L.io_uring_sqe_set_data64(sqe, (fd << 8) | kind)
        if kind == KIND_CTL_SEND:
            self._sends_inflight += 1

    def _control(self, t: Test) -> Generator[_Step, bytes | None, str]:
        """The server side of one test, as a generator of what it waits for."""
        yield _Send(bytes([PARAM_EXCHANGE]))
        params = yield from self._recv_json()
        t.params = params
        why = refuse_reason(params)
        if why is not None:
            self.say(f"iperf3 test {t.index}: refused: {why}")
            t.error = why
            yield _Send(struct.pack("!bii", SERVER_ERROR, IEUNIMP, 0))
            return "refused"
        t.nstreams = int(params.get("parallel", 1))
        yield _Send(bytes([CREATE_STREAMS]))
        t.streams_deadline = time.monotonic() + STREAMS_TIMEOUT_S
        yield _WaitStreams()
        t.started = time.monotonic()
        cpu = os.times()
        t.cpu0 = (t.started, cpu.user, cpu.system)
        yield _Send(bytes([TEST_START, TEST_RUNNING]))
        while True:
            state = struct.unpack("!b", (yield _Recv(1)) or b"\0")[0]
            if state == TEST_END:
                break
            if state in (CLIENT_TERMINATE, IPERF_DONE):
                raise ControlClosed(f"the client ended the test (state {state})")
            raise ControlClosed(f"unexpected state {state} from the client")
        yield _Send(bytes([EXCHANGE_RESULTS]))
        theirs = yield from self._recv_json()
        for s in theirs.get("streams", []):
            if isinstance(s, dict) and isinstance(s.get("id"), int):
                t.client_sent[s["id"]] = int(s.get("bytes", 0))
        ours = {stream_id(k) for k in range(len(t.stream_conns))}
        if set(t.client_sent) != ours:
            self.errors.append(f"iperf3 test {t.index}: the client's stream ids "
                               f"{sorted(t.client_sent)} are not ours {sorted(ours)}")
        t.drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S
        yield _WaitBytes()
        body = json.dumps(self._results(t), separators=(",", ":")).encode()
        yield _Send(struct.pack("!I", len(body)) + body + bytes([DISPLAY_RESULTS]))
        state = struct.unpack("!b", (yield _Recv(1)) or b"\0")[0]
        if state != IPERF_DONE:
            raise ControlClosed(f"expected IPERF_DONE, got state {state}")
        return "done"

    def _recv_json(self) -> Generator[_Step, bytes | None, dict[str, Any]]:
        raw = yield _Recv(4)
        assert raw is not None
        (n,) = struct.unpack("!I", raw)
        if not 0 < n <= MAX_JSON:
            raise ControlClosed(f"JSON of {n} bytes")
        text = yield _Recv(n)
        assert text is not None
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ControlClosed(f"bad JSON from the client: {exc}") from None
        if not isinstance(obj, dict):
            raise ControlClosed("the client's JSON is not an object")
        return obj

    def _results(self, t: Test) -> dict[str, Any]:
        """The server's results as ``send_results`` shapes them (the fields ``get_results``
        requires: cpu_util_*, sender_has_retransmits, per stream id, bytes, retransmits,
        jitter, errors, packets, start_time, end_time)."""
        now = time.monotonic()
        cpu = os.times()
        wall = max(now - t.cpu0[0], 1e-9)
        user = (cpu.user - t.cpu0[1]) / wall * 100
        system = (cpu.system - t.cpu0[2]) / wall * 100
        streams = []
        for k, c in enumerate(t.stream_conns):
            end = ((c.last_ns - c.first_ns) / 1e9 if c.first_ns is not None
                   and c.last_ns is not None else 0.0)
            streams.append({"id": stream_id(k), "bytes": c.nbytes, "retransmits": -1,
                            "jitter": 0, "errors": 0, "packets": 0, "start_time": 0,
                            "end_time": end})
        return {"cpu_util_total": user + system, "cpu_util_user": user,
                "cpu_util_system": system, "sender_has_retransmits": -1, "streams": streams}

    def _drained(self, t: Test) -> bool:
        if time.monotonic() > t.drain_deadline:
            self.errors.append(f"iperf3 test {t.index}: streams did not receive what the "
                               f"client sent within {DRAIN_TIMEOUT_S:.0f} s")
            return True
        for k, c in enumerate(t.stream_conns):
            if not c.done and c.nbytes < t.client_sent.get(stream_id(k), 0):
                return False
        return True

    def after_batch(self) -> None:
        t = self.test
        if t is None:
            return
        if isinstance(t.waiting, _WaitBytes) and self._drained(t):
            self._resume(t, None)
        elif isinstance(t.waiting, _WaitStreams) and time.monotonic() > t.streams_deadline:
            self._end_test(f"{t.nstreams - len(t.streams)} of {t.nstreams} data connections "
                           f"did not come within {STREAMS_TIMEOUT_S:.0f} s")

    def _end_test(self, why: str) -> None:
        t = self.test
        if t is None:
            return
        t.error = why
        self.errors.append(f"iperf3 test {t.index}: {why}")
        self._finish_test(t, "failed")

    def _finish_test(self, t: Test, status: str) -> None:
        t.status = status
        t.gen = None
        self.test = None
        total = sum(c.nbytes for c in t.stream_conns)
        self.say(f"iperf3 test {t.index}: {status}, {len(t.stream_conns)} streams, "
                 f"{total} bytes received zero copy (client sent "
                 f"{sum(t.client_sent.values())})")
        self._close_fd(t.fd)
        if status == "failed":  # as iperf3 -s at the end of a test: close its streams too
            for c in t.stream_conns:
                if not c.done:
                    self.close_conn(c)
        if self.max_tests and len(self.tests) >= self.max_tests and self.lfd >= 0:
            self.k.close_fd(self.lfd)  # enough tests: stop listening
            self.lfd = -1

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.mem = self.k.alloc_memory(_MEM_LEN, tag="iperf3")
        try:
            code = super().run()
        finally:
            self.mem.close()
        if any(t.status != "done" and t.status != "refused" for t in self.tests):
            code = max(code, 1)
        return code

    def done(self) -> bool:
        return (bool(self.max_tests) and len(self.tests) >= self.max_tests
                and self.test is None and not self.conns and not self.pending
                and not self._sends_inflight)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["mode"] = "iperf3"
        out["iperf3"] = [t.summary() for t in self.tests]
        return out
