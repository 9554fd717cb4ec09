"""io_uring NAPI busy polling: IORING_(UN)REGISTER_NAPI through liburing, errnos, semantics.

The kernel runs in a thread (:class:`tests.test_liburing.KernelThread`); its NAPI pass
(``IoUring.napi_poll``) is replaced by a fake that delivers a connection when polled, so the
test sees whether ``io_uring_enter(GETEVENTS)`` polled before putting the wait to sleep.
"""

from __future__ import annotations

import errno
import json
import time
from typing import Any

import numpy as np
import pytest

from app_proc import liburing as L
from driver_proc.syscalls import KernelContext
from driver_proc.tcp import ACK, SYN, flow_key
from shared import abi
from shared.msg import ControlError
from tests.e2e import topology, wait_app, zcrx
from tests.test_liburing import app, feed, kt  # noqa: F401  (fixtures)


def napi_arg(busy_poll_to: int = 0, prefer: int = 0, opcode: int = 0, op_param: int = 0,
             **raw: Any) -> np.ndarray:
    a = np.zeros(1, dtype=abi.io_uring_napi)
    a["busy_poll_to"], a["prefer_busy_poll"] = busy_poll_to, prefer
    a["opcode"], a["op_param"] = opcode, op_param
    for k, v in raw.items():
        a[k] = v
    return a


def test_io_uring_napi_layout() -> None:
    dt = abi.io_uring_napi
    assert dt.itemsize == 16
    assert [(n, dt.fields[n][1]) for n in dt.names] == [
        ("busy_poll_to", 0), ("prefer_busy_poll", 4), ("opcode", 5), ("pad", 6),
        ("op_param", 8), ("resv", 12)]


def test_register_unregister_write_back_and_errnos(kt, app):  # noqa: F811
    ring = L.io_uring_queue_init(8, kernel=app)
    a = napi_arg(50, 1)
    assert L.io_uring_register_napi(ring, a) == 0
    # written back: what was in force before (nothing: inactive)
    assert int(a["busy_poll_to"][0]) == 0 and int(a["op_param"][0]) == 255
    b = napi_arg(100, 0, op_param=abi.IO_URING_NAPI_TRACKING_STATIC)
    assert L.io_uring_register_napi(ring, b) == 0
    assert (int(b["busy_poll_to"][0]), int(b["prefer_busy_poll"][0]),
            int(b["op_param"][0])) == (50, 1, abi.IO_URING_NAPI_TRACKING_DYNAMIC)
    add = napi_arg(opcode=abi.IO_URING_NAPI_STATIC_ADD_ID, op_param=8193)
    assert L.io_uring_register_napi(ring, add) == 0
    napi = kt.call(lambda ctx: ctx.rings.rings[0].stats_dict()["napi"])
    assert napi["ids"] == [8193] and napi["busy_poll_to"] == 100

    def refused(arg: np.ndarray | bytes, code: int, nr_args: int = 1,
                opcode: int = abi.IORING_REGISTER_NAPI) -> None:
        with pytest.raises(ControlError) as ei:
            L.io_uring_register(ring, opcode, nr_args, [arg])
        assert ei.value.errno == code

    refused(napi_arg(opcode=abi.IO_URING_NAPI_STATIC_ADD_ID, op_param=8193), errno.EEXIST)
    refused(napi_arg(opcode=abi.IO_URING_NAPI_STATIC_DEL_ID, op_param=7), errno.ENOENT)
    refused(napi_arg(opcode=abi.IO_URING_NAPI_STATIC_ADD_ID, op_param=0), errno.EINVAL)
    refused(napi_arg(opcode=3), errno.EINVAL)
    refused(napi_arg(op_param=2), errno.EINVAL)  # no such tracking strategy
    refused(napi_arg(resv=1), errno.EINVAL)
    refused(napi_arg(pad=[0, 1]), errno.EINVAL)
    refused(napi_arg(), errno.EINVAL, nr_args=2)
    refused(b"\0" * 8, errno.EFAULT)
    refused(b"\0" * 8, errno.EFAULT, opcode=abi.IORING_UNREGISTER_NAPI)
    refused(napi_arg(), errno.EINVAL, nr_args=0, opcode=abi.IORING_UNREGISTER_NAPI)
    assert L.io_uring_register_napi(
        ring, napi_arg(opcode=abi.IO_URING_NAPI_STATIC_DEL_ID, op_param=8193)) == 0
    old = napi_arg()
    assert L.io_uring_unregister_napi(ring, old) == 0
    assert (int(old["busy_poll_to"][0]), int(old["op_param"][0])) == (
        100, abi.IO_URING_NAPI_TRACKING_STATIC)
    assert L.io_uring_unregister_napi(ring) == 0  # no argument: nothing written back
    # ADD_ID needs static tracking
    refused(napi_arg(opcode=abi.IO_URING_NAPI_STATIC_ADD_ID, op_param=9), errno.EINVAL)
    L.io_uring_queue_exit(ring)


def _accept_on(ring: L.Ring, lfd: int) -> None:
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_multishot_accept(sqe, lfd)
    L.io_uring_sqe_set_data64(sqe, 1)
    L.io_uring_submit(ring)


def _napi_delivers_a_connection(kt, calls: list[int]) -> None:  # noqa: F811
    """The kernel's NAPI pass, faked: the third pass brings a connection (SYN) in."""
    def install(ctx: KernelContext) -> None:
        def napi_poll() -> int:
            calls.append(1)
            if len(calls) == 3:
                key = flow_key("10.0.0.2", 45000, "10.0.0.1", 8000)
                feed(ctx, kt.skbs, key, [777, 778], [0, 0], [SYN, ACK], [b"", b""])
                return 2
            return 0
        ctx.rings.napi_poll = napi_poll
    kt.call(install)


def test_busy_poll_gets_the_completion_inside_the_syscall(kt, app):  # noqa: F811
    ring = L.io_uring_queue_init(8, kernel=app)
    lfd = app.listen_tcp(8000)
    calls: list[int] = []
    _napi_delivers_a_connection(kt, calls)
    assert L.io_uring_register_napi(ring, napi_arg(200_000)) == 0
    _accept_on(ring, lfd)
    cqe = L.io_uring_wait_cqe(ring, timeout_ms=10_000)
    assert int(cqe["user_data"]) == 1 and int(cqe["res"]) == lfd + 1
    L.io_uring_cqe_seen(ring)
    st = kt.call(lambda ctx: ctx.rings.rings[0].stats_dict())
    assert len(calls) == 3  # polled until the CQE was there, then returned
    assert st["waits"] == 0  # never went to sleep
    assert st["napi"]["busy_polls"] == 1 and st["napi"]["busy_poll_hits"] == 1
    L.io_uring_queue_exit(ring)


def test_busy_poll_gives_up_after_busy_poll_to_and_the_wait_sleeps(kt, app):  # noqa: F811
    ring = L.io_uring_queue_init(8, kernel=app)
    calls: list[int] = []

    def install(ctx: KernelContext) -> None:
        def napi_poll() -> int:
            calls.append(1)
            return 0
        ctx.rings.napi_poll = napi_poll
    kt.call(install)
    assert L.io_uring_register_napi(ring, napi_arg(20_000)) == 0  # 20 ms
    t0 = time.monotonic()
    with pytest.raises(ControlError) as ei:
        L.io_uring_wait_cqes(ring, 1, timeout_ms=50)
    assert ei.value.errno == errno.ETIME
    assert time.monotonic() - t0 >= 0.02 and len(calls) > 1
    st = kt.call(lambda ctx: ctx.rings.rings[0].stats_dict())
    assert st["waits"] >= 1 and st["napi"]["busy_polls"] >= 1
    assert st["napi"]["busy_poll_hits"] == 0
    # unregistered: the wait sleeps at once, NAPI is not polled from the syscall
    assert L.io_uring_unregister_napi(ring) == 0
    n = len(calls)
    with pytest.raises(ControlError):
        L.io_uring_wait_cqes(ring, 1, timeout_ms=20)
    assert len(calls) == n
    L.io_uring_queue_exit(ring)


@pytest.mark.timeout(120)
def test_zcrx_server_with_napi_busy_poll_verifies_every_byte(tmp_path) -> None:
    size = 8 << 20
    out = tmp_path / "app.json"
    with topology("napi", "--netdev", "eth0:queues=2"):
        zcrx("ethtool", "--name", "napi", "-N", "eth0", "flow-type", "tcp4", "dst-port", "8000",
             "action", "1")
        zcrx("app", "run", "--name", "napi", "--detach", "--cap-net-admin", "zcrx-server", "--",
             "-p", "8000", "-i", "eth0", "-q", "1", "-v", "-n", "1", "-s", str(size),
             "--json", str(out), "--napi-busy-poll", "200")
        zcrx("traffic", "--name", "napi", "--port", "8000", "--bytes", str(size))
        wait_app("napi", "app:0", 90)
    rep = json.loads(out.read_text())
    assert rep["ok"], rep
    assert rep["connections"][0]["bytes"] == size
