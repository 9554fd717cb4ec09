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
             "--json", str(out), "--napi-busy-poll", "200", "--wait-nr", "64",
             "--min-wait", "300")
        zcrx("traffic", "--name", "napi", "--port", "8000", "--bytes", str(size))
        wait_app("napi", "app:0", 90)
    rep = json.loads(out.read_text())
    assert rep["ok"], rep
    assert rep["connections"][0]["bytes"] == size


class _Batch:
    def __init__(self, completions: int) -> None:
        self.completions = completions
        self.doorbell = False

    def __len__(self) -> int:
        return self.completions


class _Dev:
    """A netdev whose queues each hold ``pending[q]`` completions, all on the poll list."""

    def __init__(self, name: str, pending: dict[int, int]) -> None:
        self.name = name
        self.pending = dict(pending)
        self.queues = list(pending)
        self.poll_list: dict[int, None] = dict.fromkeys(pending)
        self.polled: list[int] = []

    def take_drained(self) -> list[Any]:
        return []

    def napi_pending(self, q: int) -> bool:
        return self.pending[q] > 0

    def napi_complete(self, q: int) -> bool:
        return False  # idle: leaves the list

    def napi_poll(self, q: int, budget: int) -> _Batch:
        n = min(budget, self.pending[q])
        self.pending[q] -= n
        self.polled.append(q)
        return _Batch(n)


def _softirq(devs: list[_Dev]) -> Any:
    from collections import Counter
    from types import SimpleNamespace

    from driver_proc.kernel import Kernel

    k = SimpleNamespace(netdevs={d.name: d for d in devs}, stats=Counter(), _doorbells=[],
                        _napi_next_dev=0, napi_id=lambda dev, q: 0,
                        delivered=[], _deliver=None)
    k._deliver = lambda batch, napi_id=0, dev=None: k.delivered.append(len(batch))
    return k, lambda: Kernel.napi_pass(k)  # type: ignore[arg-type]


def test_a_napi_pass_stops_at_netdev_budget_and_the_next_one_resumes_fairly(monkeypatch) -> None:
    """``net_rx_action``: a pass ends once it has handled ``netdev_budget`` completions
    (``time_squeeze``), polled queues go to the tail of the list, and a netdev the last pass
    stopped in is where the next one starts: every queue of both netdevs gets its turn and
    everything is delivered."""
    import driver_proc.kernel as K

    monkeypatch.setattr(K, "NAPI_BUDGET", 100)
    monkeypatch.setattr(K, "NETDEV_BUDGET", 250)
    monkeypatch.setattr(K, "NETDEV_BUDGET_USECS", 10**9)  # only the packet budget here
    a, b = _Dev("eth0", {0: 1000, 1: 1000, 2: 1000, 3: 1000}), _Dev("eth1", {0: 300})
    k, napi_pass = _softirq([a, b])
    assert napi_pass() == 300 and a.polled == [0, 1, 2] and k.stats["time_squeeze"] == 1
    assert list(a.poll_list) == [3, 0, 1, 2]  # list_move_tail
    assert napi_pass() == 300 and a.polled[3:] == [3, 0, 1]
    passes = 2
    while any(d.poll_list for d in (a, b)):
        napi_pass()
        passes += 1
        assert passes < 100
    assert sum(k.delivered) == 4300 and not any(a.pending.values()) and b.pending[0] == 0
    assert 0 in b.polled and b.polled.count(0) == 3
    # A busy poll is not a softirq round: no budget across queues.
    c = _Dev("eth2", {0: 500, 1: 500})
    k2, _ = _softirq([c])
    assert K.Kernel.napi_pass(k2, busy_poll=True) == 200  # type: ignore[arg-type]
    assert k2.stats["time_squeeze"] == 0


def test_a_napi_pass_stops_after_netdev_budget_usecs(monkeypatch) -> None:
    """The time bound: with ``netdev_budget_usecs`` 0 every pass polls one queue (at least
    one, so the loop always moves) and the queues take turns."""
    import driver_proc.kernel as K

    monkeypatch.setattr(K, "NETDEV_BUDGET_USECS", 0)
    a = _Dev("eth0", {0: 10, 1: 10, 2: 10})
    k, napi_pass = _softirq([a])
    for _ in range(3):
        assert napi_pass() == 10
    assert a.polled == [0, 1, 2] and k.stats["time_squeeze"] == 3
