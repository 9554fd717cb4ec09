"""Memory an app cannot shrink under the kernel (issue 11, "Nothing an app does takes the kernel
down"): the app memory the kernel keeps long-lived mappings of (a zcrx area, a user-memory RQ,
a provided-buffer ring) is sealed against shrinking, so truncating it cannot SIGBUS the kernel
or the NIC.

The first tests run the ``test_zcrx`` harness (the real kernel over the fake NIC, in a thread)
in a **child process**, because what they guard against is a process dying of SIGBUS: the app
makes the memory it registered as short as it can (``ftruncate`` to 0 or a page, or
``truncate`` of the name when the library still made named segments), tries to grow it and
to add a seal, then swaps another memfd under its descriptor number, and only then lets data
flow.  Before the fix the child died of SIGBUS (the kernel's copy into the area, the kernel
reading the RQ or the buffer ring, the NIC's DMA into the area); now every attempt is refused
(``EPERM``), the kernel and the NIC live, the stream arrives byte-exact, every buffer ledger
is whole and a neighbour app's stream is byte-exact too.

The other tests run in-process: memory that is not sealed is refused for a pin with
``-EFAULT`` (counted as ``pin_refused_unsealed``), a neighbour stays byte-exact, and the NIC
maps the inode behind the kernel's descriptor, never a name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
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
from nic_proc.iommu import Iommu
from shared import abi
from shared.errors import Misuse
from shared.msg import ControlError
from shared.shm import PAGE_SIZE, Region, region_name

pytestmark = pytest.mark.timeout(120)

TESTS = Path(__file__).parent

#: The child: one case against the kernel thread harness, a JSON line on stdout at the end.
_CHILD = r"""
import errno, fcntl, json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import numpy as np
import test_zcrx as tz
from app_proc import liburing as L, syscall as S
from shared import abi
from shared.shm import PAGE_SIZE as PAGE, SHM_DIR

case, run_id, tmp = sys.argv[1:4]
LOW48 = (1 << 48) - 1


def shrink(mem):
    # every way the app has to make its memory shorter than what the kernel keeps mapped
    fd = getattr(mem, "fd", -1)
    tried = {}
    if fd < 0:  # a named segment (what the library made before sealing)
        os.truncate(os.path.join(SHM_DIR, mem.name.lstrip("/")), 0)
        return {"truncate": 0}
    for what, fn in (("ftruncate0", lambda: os.ftruncate(fd, 0)),
                     ("ftruncate1", lambda: os.ftruncate(fd, mem.length // 2)),
                     ("grow", lambda: os.ftruncate(fd, mem.length + PAGE)),
                     ("add_seal", lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 8))):
        try:
            fn()
            tried[what] = 0
        except OSError as e:
            tried[what] = e.errno
    other = os.memfd_create("swap", os.MFD_CLOEXEC)  # the number now names an empty memfd
    os.dup2(other, fd)
    os.close(other)
    return tried


def check(data, view, cqes, pos):
    for c in cqes:
        assert c.res > 0, c
        off = c.off & LOW48
        assert view[off:off + c.res].tobytes() == data[pos:pos + c.res], (pos, c)
        pos += c.res
    return pos


gen = tz.kernel_fixture(run_id, Path(tmp))
kt = next(gen)
app = S.Kernel(tmp, run=run_id, name="shrinker")
app.attach()
ring = L.io_uring_queue_init(64, L.ZCRX_RING_FLAGS, kernel=app)
out = {}
if case in ("area", "rq", "area-hw"):
    hw = case == "area-hw"
    ifq = L.io_uring_register_ifq(ring, 2 if hw else 0, 1 if hw else 0, rq_entries=64,
                                  area_size=128 * PAGE,
                                  flags=0 if hw else abi.ZCRX_REG_NODEV)
    if hw:
        flow, fd = tz.hw_flow_conn(kt, app, ring)
    else:
        _, fd = tz.accept_conn(kt, app, ring, sport=40000, port=8000)
    tz.submit_recvzc(ring, fd, ifq.zcrx_id)
    out["tried"] = shrink(ifq.area if case != "rq" else ifq.rq_mem)
    if case == "rq":
        L.io_uring_zcrx_flush_rq(ifq)  # the kernel reads the RQ now
    pos = 0
    for rnd in range(3):
        if hw:
            data = tz.stream(flow.stream, 0, 3 * 40 * 1460)
            fr, fl, _ = flow.frames([1460] * 40)
            sent = 0
            while sent < 40:
                sent += kt.deliver(1, fr[sent:], fl[sent:])
                cqes = tz.wait_cqes(ring)
                pos = check(data, ifq.area_view, cqes, pos)
                L.io_uring_zcrx_return(ifq, np.array([c.off for c in cqes], np.uint64),
                                       [c.res for c in cqes])
            want = (rnd + 1) * 40 * 1460
        else:
            data = tz.stream(40000, 0, 3 * 20000)
            kt.send(40000, data[rnd * 20000:(rnd + 1) * 20000])
            want = (rnd + 1) * 20000
        while pos < want:
            cqes = tz.wait_cqes(ring)
            pos = check(data, ifq.area_view, cqes, pos)
            L.io_uring_zcrx_return(ifq, np.array([c.off for c in cqes], np.uint64),
                                   [c.res for c in cqes])
    out["bytes"] = pos
elif case == "pbuf":
    br = L.io_uring_setup_buf_ring(ring, 8, 3)
    bufs = app.alloc_memory(8 * PAGE, tag="bufs")
    br.add(bufs.addr + PAGE * np.arange(8), PAGE, np.arange(8))
    br.advance(8)
    _, fd = tz.accept_conn(kt, app, ring, sport=40000, port=8000)
    out["tried"] = shrink(br.mem)
    data = tz.stream(40000, 0, 3 * PAGE)
    got = b""
    for i in range(3):
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_recv(sqe, fd, 0, PAGE)
        L.io_uring_sqe_set_flags(sqe, abi.IOSQE_BUFFER_SELECT)
        L.io_uring_sqe_set_buf_group(sqe, 3)
        L.io_uring_submit(ring)
        kt.send(40000, data[i * PAGE:(i + 1) * PAGE])
        [c] = tz.wait_cqes(ring)
        assert c.res == PAGE and c.flags & abi.IORING_CQE_F_BUFFER, c
        bid = int(L.cqe_bid(c.flags))
        got += bufs.view[bid * PAGE:(bid + 1) * PAGE].tobytes()
    assert got == data
    out["bytes"] = len(got)


def ledgers(k):
    k.zcrx.check_ledger()  # raises InvariantBroken if a buffer is lost
    for dev in k.netdevs.values():
        dev.check_ledger()


kt.call(ledgers)
# a well-behaved neighbour: its stream byte-exact after all that
nb = S.Kernel(tmp, run=run_id, name="neighbour")
nb.attach()
nring = L.io_uring_queue_init(8, kernel=nb)
nmem = nb.alloc_memory(4 * PAGE, tag="rx")
_, nfd = tz.accept_conn(kt, nb, nring, sport=41000, port=8001)
ndata = tz.stream(41000, 0, 3 * PAGE + 123)
kt.send(41000, ndata, dport=8001)
got = b""
while len(got) < len(ndata):
    sqe = L.io_uring_get_sqe(nring)
    L.io_uring_prep_recv(sqe, nfd, nmem.addr, 4 * PAGE)
    L.io_uring_submit(nring)
    for c in tz.wait_cqes(nring):
        assert c.res > 0, c
        got += nmem.view[:c.res].tobytes()
out["neighbour_exact"] = got == ndata
L.io_uring_queue_exit(nring)
nb.close()
out["mm"] = dict(kt.call(lambda k: k._sys_stats(None, b"")["mm"]))
out["kernel_error"] = repr(kt.error) if kt.error is not None else None
L.io_uring_queue_exit(ring)
app.close()
try:
    next(gen)
except StopIteration:
    pass
print(json.dumps(out))
"""


def _child(case: str, run_id: str, tmp: Path) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-c", _CHILD, case, run_id, str(tmp), str(TESTS)],
                       capture_output=True, text=True, timeout=90,
                       cwd=str(TESTS.parent))
    assert p.returncode == 0, (f"the process holding kernel and NIC exited {p.returncode}"
                               f"{' (SIGBUS)' if p.returncode == -7 else ''}:\n"
                               f"{p.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


_REFUSED = {"ftruncate0": errno.EPERM, "ftruncate1": errno.EPERM, "grow": errno.EPERM,
            "add_seal": errno.EPERM}


@pytest.mark.parametrize("case", ["area", "rq", "pbuf", "area-hw"])
def test_shrinking_pinned_memory_cannot_kill_the_kernel_or_the_nic(case: str, run_id: str,
                                                                  tmp_path: Path) -> None:
    """``area``: the kernel's copy fallback into a NODEV area; ``rq``: the kernel reading a
    user-memory refill queue; ``pbuf``: the kernel reading a provided-buffer ring;
    ``area-hw``: the (fake) NIC's DMA into an area bound to a hardware queue."""
    out = _child(case, f"{run_id}-{case.replace('-', '')}", tmp_path)
    assert out["tried"] == _REFUSED, out["tried"]  # sealed: every attempt refused
    assert out["bytes"] == {"area": 60000, "rq": 60000, "pbuf": 3 * PAGE_SIZE,
                            "area-hw": 3 * 40 * 1460}[case]
    assert out["kernel_error"] is None and out["neighbour_exact"]
    assert out["mm"].get("access_shrunk", 0) == 0


# -- in-process: what may be pinned --------------------------------------------------------------


def _unsealed(app: S.Kernel, size: int) -> tuple[Region, int]:
    """A memfd the app never sealed, entered by descriptor: ``(region, address)``."""
    r = Region.memfd(region_name(app.run, app.owner, f"unsealed{size}"), size, seals=0)
    return r, app.mm_map_fd(r.fd, size)


def _pin_refusals(kt: KernelThread) -> int:
    return int(kt.call(lambda k: k._sys_stats(None, b"")["mm"]).get("pin_refused_unsealed", 0))


def test_unsealed_memory_is_refused_for_every_pin_with_efault(kt: KernelThread,
                                                              app: S.Kernel) -> None:
    before = _pin_refusals(kt)
    zr = zring(app)
    # a named segment (cannot be sealed) as the area, then as the RQ
    b = Bundle.make(app, named=True)
    assert reg_errno(zr, b.reg) == errno.EFAULT
    rq, rq_addr = _unsealed(app, int(b.rd["size"][0]))
    b2 = Bundle.make(app)
    b2.rd["user_addr"] = rq_addr
    assert reg_errno(zr, b2.reg) == errno.EFAULT
    # an unsealed memfd as the area
    area, area_addr = _unsealed(app, 16 * PAGE_SIZE)
    b3 = Bundle.make(app)
    b3.area_reg["addr"] = area_addr
    b3.area_reg["len"] = 16 * PAGE_SIZE
    assert reg_errno(zr, b3.reg) == errno.EFAULT
    # an unsealed buffer ring
    ring = L.io_uring_queue_init(8, kernel=app)
    pb, pb_addr = _unsealed(app, PAGE_SIZE)
    reg = np.zeros(1, dtype=abi.io_uring_buf_reg)
    reg["ring_entries"] = 8
    reg["bgid"] = 1
    reg["ring_addr"] = pb_addr
    with pytest.raises(ControlError) as ei:
        L.io_uring_register(ring, abi.IORING_REGISTER_PBUF_RING, 1, [reg])
    assert ei.value.errno == errno.EFAULT
    assert _pin_refusals(kt) == before + 4
    # sealed afterwards (seals only grow): now it may be pinned
    fcntl.fcntl(pb.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    L.io_uring_register(ring, abi.IORING_REGISTER_PBUF_RING, 1, [reg])
    assert kt.call(lambda k: len(k.zcrx.ifqs)) == 0
    assert kt.error is None
    L.io_uring_queue_exit(ring)
    L.io_uring_queue_exit(zr)
    for bb in (b, b2, b3):
        bb.close()
    for r in (rq, area, pb):
        r.close()


def test_the_library_makes_sealed_memory_that_leaves_nothing_in_dev_shm(
        kt: KernelThread, app: S.Kernel, run_id: str) -> None:
    from shared.shm import list_run_segments

    segs = set(list_run_segments(run_id))
    mem = app.alloc_memory(3 * PAGE_SIZE, tag="rx")
    assert mem.fd >= 0 and mem.name.startswith("memfd:")
    seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
    want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    assert seals & want == want
    assert set(list_run_segments(run_id)) == segs  # no name in /dev/shm
    mem.close()
    assert mem.region.fd == -1


def test_a_neighbour_stays_byte_exact_while_an_app_fights_its_seals(
        kt: KernelThread, app: S.Kernel, run_id: str, tmp_path: Path) -> None:
    nb = S.Kernel(tmp_path, run=run_id, name="neighbour")
    nb.attach()
    ring = L.io_uring_queue_init(8, kernel=nb)
    mem = nb.alloc_memory(4 * PAGE_SIZE, tag="rx")
    _, fd = accept_conn(kt, nb, ring, sport=41000, port=8001)
    hostile = L.io_uring_queue_init(8, kernel=app)
    br = L.io_uring_setup_buf_ring(hostile, 8, 1)
    for what in (lambda: os.ftruncate(br.mem.fd, 0),
                 lambda: fcntl.fcntl(br.mem.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)):
        with pytest.raises(PermissionError):
            what()
    data = stream(41000, 0, 3 * PAGE_SIZE + 123)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_recv(sqe, fd, mem.addr, 4 * PAGE_SIZE)
    L.io_uring_submit(ring)
    kt.send(41000, data, dport=8001)
    got = b""
    while len(got) < len(data):
        for c in wait_cqes(ring):
            assert c.res > 0, c
            got += mem.view[:c.res].tobytes()
            if len(got) < len(data):
                sqe = L.io_uring_get_sqe(ring)
                L.io_uring_prep_recv(sqe, fd, mem.addr, 4 * PAGE_SIZE)
                L.io_uring_submit(ring)
    assert got == data
    assert kt.error is None
    L.io_uring_queue_exit(hostile)
    L.io_uring_queue_exit(ring)
    nb.close()


# -- the NIC maps the kernel's descriptor, not a name ----------------------------------------


def test_the_nic_maps_the_inode_behind_the_kernels_descriptor_not_the_name(run_id: str
                                                                         ) -> None:
    named = Region.create(region_name(run_id, "app1", "area"), 2 * PAGE_SIZE)
    sealed = Region.memfd(region_name(run_id, "app1", "area"), 2 * PAGE_SIZE)
    io = Iommu()
    try:
        st = os.fstat(sealed.fd)
        # the name is only a label: the mapping is the memfd, whatever the name points to
        mid = io.dma_map(named.name, PAGE_SIZE, holder=os.getpid(), fd=sealed.fd,
                         inode=(st.st_dev, st.st_ino))
        io.get(mid).view[:4] = 0xAB
        assert sealed.array()[:4].tolist() == [0xAB] * 4
        assert named.array()[:4].tolist() == [0] * 4
        # another inode at that number: refused
        nst = os.stat(f"/dev/shm/{named.name.lstrip('/')}")
        with pytest.raises(Misuse) as ei:
            io.dma_map(named.name, PAGE_SIZE, holder=os.getpid(), fd=sealed.fd,
                       inode=(nst.st_dev, nst.st_ino))
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(Misuse) as ei:
            io.dma_map(named.name, PAGE_SIZE, fd=sealed.fd)  # whose descriptor?
        assert ei.value.errno == errno.EPERM
        with pytest.raises(Misuse) as ei:
            io.dma_map(named.name, PAGE_SIZE, holder=os.getpid(), fd=(1 << 20) - 1)
        assert ei.value.errno == errno.ENOENT
        assert len(io) == 1
    finally:
        io.unmap_all()
        named.close()
        sealed.close()


def test_the_nic_process_opens_the_callers_descriptor_by_its_credentials(run_id: str,
                                                                         tmp_path: Path) -> None:
    """The real NIC: ``nic.dma_map`` with a descriptor of this process (playing the kernel)
    is mapped through ``/proc/<pid the OS gave the connection>/fd/<fd>``, inode checked."""
    from test_nic_proc import NicRun

    sealed = Region.memfd(region_name(run_id, "app1", "area"), 4 * PAGE_SIZE)
    nr = NicRun(run_id, tmp_path)
    try:
        st = os.fstat(sealed.fd)
        mid = nr.call("nic.dma_map", name=sealed.name, size=4 * PAGE_SIZE, fd=sealed.fd,
                      dev=st.st_dev, ino=st.st_ino)["map_id"]
        assert mid > 0
        nr.call("nic.dma_unmap", map_id=mid)
        for body, want in (({"fd": sealed.fd, "dev": st.st_dev, "ino": st.st_ino + 1},
                            errno.EINVAL),                    # another inode at that number
                           ({"fd": (1 << 20) - 1, "dev": 0, "ino": 0}, errno.ENOENT)):
            with pytest.raises(ControlError) as ei:
                nr.call("nic.dma_map", name=sealed.name, size=PAGE_SIZE, **body)
            assert ei.value.errno == want
        assert nr.proc.poll() is None
    finally:
        assert nr.stop() == 0, nr.logtext()
        sealed.close()
