"""The app-side liburing API against a real control server running the kernel handlers.

The kernel runs in a thread of this process: a ControlServer bound in a temporary run
directory, serving driver_proc.syscalls and calling its service() between requests.  The app
side talks to it exactly as an app process would (ControlClient over ipc://, shared memory for
rings and buffers).  Socket traffic is injected by running functions in the kernel thread
(the only thread that touches kernel state).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from app_proc import copy_server, server
from app_proc import liburing as L
from app_proc import syscall as S
from driver_proc.syscalls import KernelContext, handlers, service, task_exit
from driver_proc.tcp import ACK, FIN, SYN, flow_key
from shared import abi, pattern
from shared.control import ControlServer, ipc_endpoint
from shared.errors import PeerGone
from shared.msg import ControlError
from shared.shm import list_run_segments
from tests.test_io_uring import FakeSkbs

pytestmark = pytest.mark.timeout(60)




class KernelThread:
    """The kernel's syscall loop in a thread; :meth:`call` runs code in it."""

    def __init__(self, run_id: str, rundir) -> None:
        self.skbs = FakeSkbs()
        self.ctx = KernelContext.create(run_id, self.skbs)
        self.ctx.tasks.grants.grant(os.getpid())  # the launcher's CAP_NET_ADMIN grant
        self.endpoint = ipc_endpoint(rundir, "kernel")
        self._cmds: queue.Queue[tuple[Callable[[KernelContext], Any], Future[Any]]] = \
            queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._main, name="kernel", daemon=True)
        self._t.start()
        assert self._ready.wait(10)

    def _main(self) -> None:
        server = ControlServer(self.endpoint, handlers(self.ctx), role="kernel")
        self._ready.set()
        try:
            while not self._stop.is_set():
                server.poll_once(2)
                server.process_pending()
                service(self.ctx, server)
                while True:
                    try:
                        fn, fut = self._cmds.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        fut.set_result(fn(self.ctx))
                    except BaseException as exc:
                        fut.set_exception(exc)
        except BaseException as exc:
            self.error = exc
        finally:
            for t in self.ctx.tasks:
                task_exit(self.ctx, t)
            server.close()

    def call(self, fn: Callable[[KernelContext], Any]) -> Any:
        fut: Future[Any] = Future()
        self._cmds.put((fn, fut))
        return fut.result(timeout=10)

    def wait_for(self, cond: Callable[[KernelContext], bool]) -> None:
        """Block until ``cond(ctx)`` holds in the kernel thread (checked every loop)."""
        ev = threading.Event()
        while not ev.is_set():
            if self.call(cond):
                return
            ev.wait(0.002)

    def close(self) -> None:
        self._stop.set()
        self._t.join(10)
        assert not self._t.is_alive()
        if self.error is not None:
            raise self.error


def feed(ctx: KernelContext, skbs: FakeSkbs, key: bytes, seqs, lens, flags, payloads) -> None:
    handles = [skbs.add(p) for p in payloads]
    res = ctx.sockets.table.ingest_flow(key, np.array(seqs, dtype=np.uint32), np.array(lens),
                                        np.array(flags, dtype=np.uint8),
                                        np.array(handles, dtype=np.int64))
    ctx.sockets.free(res.freed)
    ctx.rings.run(res.sockets, res.listeners)


def tcp_stream(kt: KernelThread, sport: int, data: bytes, dport: int = 8000,
               seg: int = 1448, isn: int = 777, fin: bool = True) -> None:
    """A whole connection from 10.0.0.2:sport, run in the kernel thread."""
    key = flow_key("10.0.0.2", sport, "10.0.0.1", dport)

    def go(ctx: KernelContext) -> None:
        feed(ctx, kt.skbs, key, [isn, isn + 1], [0, 0], [SYN, ACK], [b"", b""])
        for off in range(0, len(data), 64 * seg):  # NAPI-sized batches
            chunk = data[off:off + 64 * seg]
            offs = list(range(0, len(chunk), seg))
            feed(ctx, kt.skbs, key, [isn + 1 + off + o for o in offs],
                 [len(chunk[o:o + seg]) for o in offs], [ACK] * len(offs),
                 [chunk[o:o + seg] for o in offs])
        if fin:
            feed(ctx, kt.skbs, key, [isn + 1 + len(data)], [0], [FIN | ACK], [b""])

    kt.call(go)


@pytest.fixture
def kt(run_id, tmp_path):
    k = KernelThread(run_id, tmp_path)
    yield k
    k.close()
    assert k.skbs.data == {}


@pytest.fixture
def app(kt, run_id, tmp_path):
    k = S.Kernel(tmp_path, run=run_id, name="test-app")
    yield k
    k.close()


def test_queue_init_maps_rings_and_exit_cleans_up(kt, app, run_id):
    ring = L.io_uring_queue_init(16, abi.IORING_SETUP_CQE32, kernel=app)
    assert app.task == 1
    names = list_run_segments(run_id)
    assert any(n.endswith(".rings") for n in names) and any(n.endswith(".sqes") for n in names)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_nop(sqe)
    L.io_uring_sqe_set_data64(sqe, 42)
    assert L.io_uring_submit_and_wait(ring, 1) == 1
    cqe = L.io_uring_wait_cqe(ring)
    assert (int(cqe["user_data"]), int(cqe["res"])) == (42, 0)
    L.io_uring_cqe_seen(ring, cqe)
    mem = app.alloc_memory(10000)
    assert mem.length == 12288 and mem.addr % 4096 == 0
    L.io_uring_queue_exit(ring)
    mem.close()
    assert list_run_segments(run_id) == []
    task_vmas = kt.call(lambda ctx: len(ctx.tasks.by_tid(app.task).mm))
    assert task_vmas == 0  # every mapping was undone
    with pytest.raises(ControlError) as ei:
        L.io_uring_enter(ring, 0, 0, 0)
    assert ei.value.errno == errno.EBADF


def test_get_sqe_returns_none_when_the_sq_is_full(kt, app):
    ring = L.io_uring_queue_init(4, kernel=app)
    sqes = [L.io_uring_get_sqe(ring) for _ in range(4)]
    assert all(s is not None for s in sqes)
    assert L.io_uring_get_sqe(ring) is None and L.io_uring_sq_space_left(ring) == 0
    for i, s in enumerate(sqes):
        L.io_uring_prep_nop(s)
        L.io_uring_sqe_set_data64(s, i)
    assert L.io_uring_submit_and_wait(ring, 4) == 4
    v = L.io_uring_wait_cqes(ring, 4)
    assert v["user_data"].tolist() == [0, 1, 2, 3]
    L.io_uring_cq_advance(ring, 4)
    assert L.io_uring_get_sqe(ring) is not None
    L.io_uring_queue_exit(ring)


def test_wait_sleeps_in_the_kernel_until_a_connection_arrives(kt, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    lfd = app.listen_tcp(8000)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_multishot_accept(sqe, lfd)
    L.io_uring_sqe_set_data64(sqe, 1)
    L.io_uring_submit(ring)

    def connect_when_waiting() -> None:
        # the app must be parked in io_uring_enter(GETEVENTS) before the connection comes
        kt.wait_for(lambda ctx: any(r.waits for r in ctx.rings.rings))
        tcp_stream(kt, 45000, b"", fin=False)

    t = threading.Thread(target=connect_when_waiting)
    t.start()
    cqe = L.io_uring_wait_cqe(ring, timeout_ms=20_000)
    t.join(10)
    assert int(cqe["user_data"]) == 1 and int(cqe["res"]) == lfd + 1
    assert int(cqe["flags"]) & abi.IORING_CQE_F_MORE
    L.io_uring_cqe_seen(ring)
    assert kt.call(lambda ctx: ctx.rings.rings[0].stats.waits) >= 1
    assert app.getpeername(lfd + 1) == ("10.0.0.2", 45000)
    L.io_uring_queue_exit(ring)


def test_wait_times_out_with_etime(kt, app):
    ring = L.io_uring_queue_init(4, kernel=app)
    with pytest.raises(ControlError) as ei:
        L.io_uring_wait_cqes(ring, 1, timeout_ms=30)
    assert ei.value.errno == errno.ETIME
    L.io_uring_queue_exit(ring)


def test_syscall_errors_carry_linux_errnos(kt, app):
    with pytest.raises(ControlError) as ei:
        L.io_uring_queue_init(0, kernel=app)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(ControlError) as ei:
        app.mm_map("/zcrx.nope.app9.x", 4096)
    assert ei.value.errno == errno.EACCES


def test_kernel_gone_is_peer_gone(tmp_path, run_id):
    k = S.Kernel(tmp_path, run=run_id, timeout_ms=100)
    with pytest.raises(PeerGone):
        k.attach()
    k.close()


def test_buf_ring_add_is_batched_and_wraps(kt, app):
    ring = L.io_uring_queue_init(4, kernel=app)
    br = L.io_uring_setup_buf_ring(ring, 8, 5)
    br.advance(6)  # pretend 6 were consumed and re-added: the cursor is near the wrap
    br.add(np.arange(4) * 100 + 4096, 64, [10, 11, 12, 13])
    slots = [(6 + i) & 7 for i in range(4)]
    assert br.bufs["bid"][slots].tolist() == [10, 11, 12, 13]
    assert br.bufs["addr"][slots].tolist() == [4096, 4196, 4296, 4396]
    assert int(br._ktail[0]) == 6  # not published yet
    br.advance(4)
    assert int(br._ktail[0]) == 10
    L.io_uring_free_buf_ring(ring, br)
    L.io_uring_queue_exit(ring)


def run_server(kt: KernelThread, app: S.Kernel, argv: list[str]) -> tuple[threading.Thread,
                                                                           dict[str, Any]]:
    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result["code"] = copy_server.main(argv, kernel=app)
        except BaseException as exc:  # surfaced by the test
            result["exc"] = exc

    t = threading.Thread(target=go, name="copy_server")
    t.start()
    kt.wait_for(lambda ctx: any(sf.is_listening for t in ctx.tasks for sf in t.files.values()
                                if hasattr(sf, "is_listening")))
    return t, result


def test_copy_server_receives_and_verifies_two_connections(kt, app, tmp_path, capsys):
    summary = tmp_path / "summary.json"
    out = tmp_path / "conn{n}.bin"
    sizes = {30001: 300_000, 30002: 123_457}
    t, result = run_server(kt, app, ["-p", "8000", "-v", "-n", "2", "-b", "4096",
                                     "--nbufs", "16", "-o", str(out), "--json", str(summary),
                                     "--seconds", "30", "-q"])
    for sport, size in sizes.items():
        tcp_stream(kt, sport, pattern.pattern_bytes(sport, 0, size))
    t.join(30)
    assert not t.is_alive()
    assert result == {"code": 0}
    s = json.loads(summary.read_text())
    assert s["ok"] and s["errors"] == []
    by_stream = {c["stream"]: c for c in s["connections"]}
    assert set(by_stream) == set(sizes)
    for sport, size in sizes.items():
        c = by_stream[sport]
        assert c["bytes"] == size and c["ok"] and c["bad_offset"] is None
        assert c["sha256"] == pattern.expected_sha256(sport, size)
        data = (tmp_path / f"conn{c['index']}.bin").read_bytes()
        assert hashlib.sha256(data).hexdigest() == c["sha256"]
    stats = kt.call(lambda ctx: [r.stats_dict() for r in ctx.rings.rings])
    assert stats == []  # the server exited its ring


def test_copy_server_reports_corruption_and_short_streams(kt, app, tmp_path):
    summary = tmp_path / "s.json"
    t, result = run_server(kt, app, ["-p", "8000", "-v", "-s", "50000", "-n", "2",
                                     "--json", str(summary), "--seconds", "30", "-q"])
    good = bytearray(pattern.pattern_bytes(31000, 0, 50_000))
    good[40_000] ^= 0xFF
    tcp_stream(kt, 31000, bytes(good))  # one flipped byte
    tcp_stream(kt, 31001, pattern.pattern_bytes(31001, 0, 20_000))  # short
    t.join(30)
    assert result == {"code": server.EXIT_CHECK_FAILED}
    s = json.loads(summary.read_text())
    by_stream = {c["stream"]: c for c in s["connections"]}
    assert by_stream[31000]["bad_offset"] == 40_000
    assert by_stream[31000]["checks"] == {"error": True, "verify": False, "size": True}
    assert by_stream[31001]["checks"] == {"error": True, "verify": True, "size": False}
    assert not s["ok"]


def test_copy_server_timing_adds_first_last_byte_and_kernel_ring(kt, app, tmp_path):
    summary = tmp_path / "t.json"
    t, result = run_server(kt, app, ["-p", "8000", "-v", "-n", "1", "--timing",
                                     "--json", str(summary), "--seconds", "30", "-q"])
    tcp_stream(kt, 32000, pattern.pattern_bytes(32000, 0, 100_000))
    t.join(30)
    assert result == {"code": 0}
    s = json.loads(summary.read_text())
    assert s["ok"] and s["mode"] == "copy"
    assert 0 < s["first_ns"] <= s["last_ns"]
    # None here: this in-process kernel has no "stats" syscall (bench copy uses the real one)
    assert s["kernel_ring"] is None or s["kernel_ring"]["recv_bytes"] == 100_000
    opts, _ = copy_server.parse_args([])
    assert not opts.timing  # off by default: the summary keeps its usual keys


def test_copy_server_parse_args():
    opts, _ = copy_server.parse_args(["-p", "9000", "--stream-id", "7", "-b", "8192"])
    assert (opts.port, opts.stream_id, opts.buf_size, opts.connections) == (9000, 7, 8192, 0)
    opts, _ = copy_server.parse_args([])
    assert opts.stream_id is None and opts.port == 8000
    with pytest.raises(SystemExit):
        copy_server.parse_args(["--nbufs", "3"])
    with pytest.raises(SystemExit), io.StringIO() as _:
        copy_server.parse_args(["--stream-id", "x"])
