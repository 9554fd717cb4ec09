"""Hostile apps against the kernel's mm (issue 11, findings 1 and 5): nothing an app does to
its own shm names takes the kernel down or reaches another app's memory.

The kernel is the real one over the fake NIC, serving syscalls in a thread (the harness of
``test_zcrx``); apps are ``app_proc`` clients in this process that also play with
``/dev/shm`` directly, as a malicious process would: symlinks and hard links under their own
prefix, and segments unlinked or replaced after ``mm_map``.  Each test checks that the
offender gets a Linux errno (at ``mm_map``, in a register call or in a CQE), that the kernel
loop is still alive and logged no traceback, and that a well-behaved neighbour's stream is
byte-exact.  The last test is about the kernel process itself: when its loop dies of an
exception it must not say ``bye`` to the NIC, so the NIC handles a kernel death.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_zcrx import (
    Bundle,
    KernelThread,
    accept_conn,
    reg_errno,
    stream,
    wait_cqes,
    zring,
)

from app_proc import liburing as L
from app_proc import syscall as S
from shared import abi
from shared.control import ControlClient, ipc_endpoint
from shared.errors import Timeout
from shared.msg import ControlError
from shared.shm import PAGE_SIZE, SHM_DIR, list_run_segments

pytestmark = pytest.mark.timeout(60)

UD = 0x5EC


@pytest.fixture
def neighbour(kt: KernelThread, run_id: str, tmp_path: Any) -> Iterator[S.Kernel]:
    a = S.Kernel(tmp_path, run=run_id, name="neighbour")
    a.attach()
    yield a
    a.close()


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name.lstrip("/"))


def _replace_with_symlink(victim: S.Memory, target: str) -> None:
    """Behind the kernel's back: the name of ``victim`` now points at ``target``."""
    os.unlink(_path(victim.name))
    os.symlink(_path(target), _path(victim.name))


def _map_errno(app: S.Kernel, name: str) -> int:
    try:
        app.mm_map(name, PAGE_SIZE)
    except ControlError as exc:
        return exc.errno or -1
    return 0


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert bad == [], [r.getMessage() for r in bad]


def _kernel_alive(kt: KernelThread) -> dict[str, int]:
    """The kernel loop still runs (a call round-trips) and nothing escaped it."""
    counters = kt.call(lambda k: k._sys_stats(None, b"")["mm"])  # type: ignore[arg-type]
    assert kt.error is None
    return dict(counters)


def _neighbour_stream_is_exact(kt: KernelThread, nb: S.Kernel, sport: int, port: int) -> None:
    ring = L.io_uring_queue_init(8, kernel=nb)
    mem = nb.alloc_memory(4 * PAGE_SIZE, tag="rx")
    _, fd = accept_conn(kt, nb, ring, sport=sport, port=port)
    data = stream(sport, 0, 3 * PAGE_SIZE + 123)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_recv(sqe, fd, mem.addr, 4 * PAGE_SIZE)
    L.io_uring_sqe_set_data64(sqe, UD)
    L.io_uring_submit(ring)
    kt.send(sport, data, dport=port)
    got = b""
    while len(got) < len(data):
        for c in wait_cqes(ring):
            assert c.ud == UD and c.res > 0, c
            got += mem.view[:c.res].tobytes()
            if len(got) < len(data):
                sqe = L.io_uring_get_sqe(ring)
                L.io_uring_prep_recv(sqe, fd, mem.addr, 4 * PAGE_SIZE)
                L.io_uring_sqe_set_data64(sqe, UD)
                L.io_uring_submit(ring)
    assert got == data
    L.io_uring_queue_exit(ring)
    mem.close()


def test_symlink_and_hard_link_under_the_own_prefix_are_refused(
        kt: KernelThread, app: S.Kernel, neighbour: S.Kernel,
        caplog: pytest.LogCaptureFixture) -> None:
    mine = app.alloc_memory(PAGE_SIZE, tag="mine", named=True)
    theirs = neighbour.alloc_memory(4 * PAGE_SIZE, tag="area", named=True)
    theirs.view[:] = 0x77
    link = f"/zcrx.{app.run}.{app.owner}.link"
    hard = f"/zcrx.{app.run}.{app.owner}.hard"
    os.symlink(_path(mine.name), _path(link))
    os.link(_path(theirs.name), _path(hard))
    try:
        assert _map_errno(app, link) == errno.ELOOP
        assert _map_errno(app, hard) == errno.EACCES  # the neighbour's inode: two links
        assert _map_errno(app, theirs.name) == errno.EACCES  # not its prefix
        counters = _kernel_alive(kt)
        assert counters["map_refused_symlink"] >= 1 and counters["map_refused_links"] >= 1
        assert counters["map_refused_foreign"] >= 1
    finally:
        os.unlink(_path(link))
        os.unlink(_path(hard))
    assert bool((theirs.view == 0x77).all())
    _neighbour_stream_is_exact(kt, neighbour, 41000, 8001)
    _no_tracebacks(caplog)
    mine.close()
    theirs.close()


def test_recv_into_a_segment_replaced_behind_the_kernels_back_is_efault(
        kt: KernelThread, app: S.Kernel, neighbour: S.Kernel,
        caplog: pytest.LogCaptureFixture) -> None:
    ring = L.io_uring_queue_init(8, kernel=app)
    other = app.alloc_memory(PAGE_SIZE, tag="other", named=True)
    buf = app.alloc_memory(PAGE_SIZE, tag="buf", named=True)
    _replace_with_symlink(buf, other.name)  # mm_map passed; the kernel never touched it
    _, fd = accept_conn(kt, app, ring, sport=40000, port=8000)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_recv(sqe, fd, buf.addr, PAGE_SIZE)
    L.io_uring_sqe_set_data64(sqe, UD)
    L.io_uring_submit(ring)
    kt.send(40000, stream(40000, 0, 1000))  # the NAPI path runs the armed RECV
    [c] = wait_cqes(ring)
    assert (c.ud, c.res) == (UD, -errno.EFAULT)
    assert other.view[:1000].tolist() == [0] * 1000  # nothing landed in the link's target
    _kernel_alive(kt)
    _neighbour_stream_is_exact(kt, neighbour, 41001, 8001)
    _no_tracebacks(caplog)
    L.io_uring_queue_exit(ring)
    buf.close()  # unlinks the symlink
    other.close()


def test_buffer_ring_and_zcrx_area_over_a_replaced_segment_are_efault(
        kt: KernelThread, app: S.Kernel, neighbour: S.Kernel,
        caplog: pytest.LogCaptureFixture) -> None:
    ring = L.io_uring_queue_init(8, kernel=app)
    other = app.alloc_memory(PAGE_SIZE, tag="other", named=True)
    pbuf = app.alloc_memory(PAGE_SIZE, tag="pbuf", named=True)
    _replace_with_symlink(pbuf, other.name)
    reg = np.zeros(1, dtype=abi.io_uring_buf_reg)
    reg["ring_entries"] = 8
    reg["bgid"] = 3
    reg["ring_addr"] = pbuf.addr
    with pytest.raises(ControlError) as ei:
        L.io_uring_register(ring, abi.IORING_REGISTER_PBUF_RING, 1, [reg])
    assert ei.value.errno == errno.EFAULT
    L.io_uring_queue_exit(ring)

    zr = zring(app)
    b = Bundle.make(app, named=True)
    _replace_with_symlink(b.area, other.name)
    assert reg_errno(zr, b.reg) == errno.EFAULT
    hard = Bundle.make(app, named=True)
    os.unlink(_path(hard.area.name))
    os.link(_path(other.name), _path(hard.area.name))  # a hard link in its place: the same
    assert reg_errno(zr, hard.reg) == errno.EFAULT
    assert kt.call(lambda k: len(k.zcrx.ifqs)) == 0
    _kernel_alive(kt)
    _neighbour_stream_is_exact(kt, neighbour, 41002, 8001)
    _no_tracebacks(caplog)
    L.io_uring_queue_exit(zr)
    for m in (pbuf, other):
        m.close()
    b.close()
    hard.close()


# -- the kernel process dying of an exception ----------------------------------------------------

_OOPS = """
import sys
from driver_proc import kernel as K, main as M
orig, n = K.Kernel.poll, [0]
def poll(self):
    n[0] += 1
    if n[0] == 200:
        raise RuntimeError("injected oops")
    return orig(self)
K.Kernel.poll = poll
sys.exit(M.main(sys.argv[1:]))
"""


def _wait_exit(p: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def test_a_kernel_that_oopses_says_no_bye_and_the_nic_exits(run_id: str,
                                                           tmp_path: Path) -> None:
    nic_log = tmp_path / "nic.log"
    k_log = tmp_path / "kernel.log"
    with open(nic_log, "wb") as nl, open(k_log, "wb") as kl:
        nic = subprocess.Popen([sys.executable, "-m", "nic_proc", "--run", run_id,
                                "--rundir", str(tmp_path)], stdout=nl, stderr=subprocess.STDOUT)
        kernel: subprocess.Popen[bytes] | None = None
        try:
            cli = ControlClient(ipc_endpoint(tmp_path, "nic"), timeout_ms=500)
            deadline = time.monotonic() + 30
            while True:
                try:
                    cli.ping()
                    break
                except Timeout:
                    assert time.monotonic() < deadline, "NIC did not come up"
            cli.close()
            kernel = subprocess.Popen([sys.executable, "-c", _OOPS, "--run", run_id,
                                       "--rundir", str(tmp_path)], stdout=kl,
                                      stderr=subprocess.STDOUT)
            assert _wait_exit(kernel, 30) == 1, k_log.read_text()
            code = _wait_exit(nic, 15)
            text = nic_log.read_text()
            assert code == 0, f"the NIC kept running after the kernel died:\n{text}"
            assert "kernel is gone" in text and "kernel said bye" not in text, text
            assert "kernel oops" in k_log.read_text()
            assert list_run_segments(run_id) == []  # kernel names unlinked, NIC stats too
        finally:
            for p in (kernel, nic):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait(5)
