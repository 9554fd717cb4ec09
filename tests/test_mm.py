"""The emulated mm: mappings, protections and address resolution with Linux's errnos."""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import socket
import tempfile

import numpy as np
import pytest

from driver_proc.mm import PROT_READ, PROT_WRITE, USER_BASE, Mm
from shared.errors import Misuse
from shared.shm import (
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    PAGE_SIZE,
    SHM_DIR,
    Region,
    region_name,
)

RW = PROT_READ | PROT_WRITE


@pytest.fixture
def regions(run_id):
    made: list[Region] = []

    def make(obj: str, size: int, owner: str = "app1") -> Region:
        r = Region.create(region_name(run_id, owner, obj), size)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def mm(run_id):
    m = Mm(f"/zcrx.{run_id}.app1.")
    yield m
    m.close()


def errno_of(fn, *args, **kw) -> int | None:
    with pytest.raises(Misuse) as ei:
        fn(*args, **kw)
    return ei.value.errno


def test_map_resolve_writes_through_to_the_region(mm, regions):
    r = regions("buf", 3 * PAGE_SIZE)
    addr = mm.map(r.name, 3 * PAGE_SIZE, RW)
    assert addr == USER_BASE and addr % PAGE_SIZE == 0
    view = mm.resolve(addr + 100, 50, write=True)
    view[:] = np.arange(50, dtype=np.uint8)
    assert r.array()[100:150].tolist() == list(range(50))
    assert mm.resolve(addr + 100, 50, write=False).tobytes() == bytes(range(50))


def test_addresses_do_not_overlap_and_reuse_holes(mm, regions):
    a = regions("a", PAGE_SIZE)
    b = regions("b", 2 * PAGE_SIZE)
    x = mm.map(a.name, PAGE_SIZE, RW)
    y = mm.map(b.name, 2 * PAGE_SIZE, RW)
    z = mm.map(a.name, 100, PROT_READ)  # rounded up to a page
    spans = sorted((v.start, v.end) for v in mm.vmas())
    assert all(e1 <= s2 for (_s1, e1), (s2, _e2) in itertools.pairwise(spans))
    assert {x, y, z} == {s for s, _ in spans}
    mm.unmap(y, 2 * PAGE_SIZE)
    assert mm.map(a.name, PAGE_SIZE, RW) == y  # the lowest hole is reused


def test_resolve_outside_any_mapping_is_efault(mm, regions):
    r = regions("buf", 2 * PAGE_SIZE)
    addr = mm.map(r.name, 2 * PAGE_SIZE, RW)
    assert errno_of(mm.resolve, addr - 1, 1, write=False) == errno.EFAULT
    assert errno_of(mm.resolve, addr + 2 * PAGE_SIZE, 1, write=True) == errno.EFAULT
    # one byte past the end of the mapping
    assert errno_of(mm.resolve, addr + 2 * PAGE_SIZE - 10, 11, write=True) == errno.EFAULT
    assert errno_of(mm.resolve, 0, 4, write=False) == errno.EFAULT
    assert mm.faults == 4
    assert len(mm.resolve(12345, 0, write=True)) == 0  # empty ranges never fault


def test_write_to_read_only_mapping_is_efault(mm, regions):
    r = regions("ro", PAGE_SIZE)
    addr = mm.map(r.name, PAGE_SIZE, PROT_READ)
    assert len(mm.resolve(addr, 16, write=False)) == 16
    assert errno_of(mm.resolve, addr, 16, write=True) == errno.EFAULT
    mm.protect(addr, PAGE_SIZE, RW)
    assert len(mm.resolve(addr, 16, write=True)) == 16
    mm.protect(addr, PAGE_SIZE, 0)
    assert errno_of(mm.resolve, addr, 1, write=False) == errno.EFAULT


def test_fixed_overlapping_map_is_refused(mm, regions):
    r = regions("buf", 4 * PAGE_SIZE)
    addr = mm.map(r.name, 2 * PAGE_SIZE, RW, fixed=USER_BASE + 4 * PAGE_SIZE)
    assert addr == USER_BASE + 4 * PAGE_SIZE
    assert errno_of(mm.map, r.name, PAGE_SIZE, RW, fixed=addr + PAGE_SIZE) == errno.EEXIST
    assert errno_of(mm.map, r.name, 2 * PAGE_SIZE, RW, fixed=addr - PAGE_SIZE) == errno.EEXIST
    assert errno_of(mm.map, r.name, PAGE_SIZE, RW, fixed=addr + 1) == errno.EINVAL
    assert mm.map(r.name, PAGE_SIZE, RW, fixed=addr + 2 * PAGE_SIZE) == addr + 2 * PAGE_SIZE
    assert errno_of(mm.map, r.name, PAGE_SIZE, RW, fixed=USER_BASE - PAGE_SIZE) == errno.EINVAL
    assert len(mm) == 2


def test_map_argument_errors(mm, regions, run_id):
    r = regions("buf", PAGE_SIZE)
    assert errno_of(mm.map, r.name, 0, RW) == errno.EINVAL
    assert errno_of(mm.map, r.name, PAGE_SIZE, 8) == errno.EINVAL
    assert errno_of(mm.map, r.name, 2 * PAGE_SIZE, RW) == errno.ENXIO  # past the segment
    assert errno_of(mm.map, region_name(run_id, "app1", "nope"), PAGE_SIZE, RW) == errno.ENOENT
    other = regions("theirs", PAGE_SIZE, owner="app2")
    assert errno_of(mm.map, other.name, PAGE_SIZE, RW) == errno.EACCES
    # the kernel may map its own regions into the app (mmap of a ring fd)
    assert mm.map(other.name, PAGE_SIZE, RW, kernel=True) >= USER_BASE


def test_partial_unmap_splits_and_keeps_the_rest(mm, regions):
    r = regions("buf", 4 * PAGE_SIZE)
    r.array()[:] = np.arange(4 * PAGE_SIZE, dtype=np.uint64).astype(np.uint8)
    addr = mm.map(r.name, 4 * PAGE_SIZE, RW)
    mm.unmap(addr + PAGE_SIZE, PAGE_SIZE)
    assert [(v.start - addr, v.end - addr, v.offset) for v in mm.vmas()] == [
        (0, PAGE_SIZE, 0), (2 * PAGE_SIZE, 4 * PAGE_SIZE, 2 * PAGE_SIZE)]
    assert errno_of(mm.resolve, addr + PAGE_SIZE, 1, write=False) == errno.EFAULT
    # the tail still resolves to the right offset of the region
    assert mm.resolve(addr + 2 * PAGE_SIZE + 7, 3, write=False).tolist() == [
        (2 * PAGE_SIZE + 7 + i) % 256 for i in range(3)]
    # a range over the hole faults
    assert errno_of(mm.resolve, addr + PAGE_SIZE - 1, 2, write=False) == errno.EFAULT
    mm.unmap(addr + 100 * PAGE_SIZE, PAGE_SIZE)  # unmapping a hole is fine
    assert errno_of(mm.unmap, addr + 1, PAGE_SIZE) == errno.EINVAL
    assert errno_of(mm.unmap, addr, 0) == errno.EINVAL


def test_protect_splits_and_range_crossing_split_mappings(mm, regions):
    r = regions("buf", 3 * PAGE_SIZE)
    addr = mm.map(r.name, 3 * PAGE_SIZE, RW)
    mm.protect(addr + PAGE_SIZE, PAGE_SIZE, PROT_READ)
    assert len(mm) == 3
    # reading across the three pieces is one contiguous view of the region
    view = mm.resolve(addr + PAGE_SIZE - 4, PAGE_SIZE + 8, write=False)
    r.array()[PAGE_SIZE - 4:2 * PAGE_SIZE + 4] = 0x5A
    assert len(view) == PAGE_SIZE + 8 and bool((view == 0x5A).all())
    # writing across the read-only piece faults
    assert errno_of(mm.resolve, addr + PAGE_SIZE - 4, 8, write=True) == errno.EFAULT
    assert errno_of(mm.protect, addr + 1, PAGE_SIZE, PROT_READ) == errno.EINVAL
    assert errno_of(mm.protect, addr, 5 * PAGE_SIZE, PROT_READ) == errno.ENOMEM


def test_ranges_over_two_regions_fault(mm, regions):
    a = regions("a", PAGE_SIZE)
    b = regions("b", PAGE_SIZE)
    x = mm.map(a.name, PAGE_SIZE, RW)
    y = mm.map(b.name, PAGE_SIZE, RW)
    assert y == x + PAGE_SIZE  # adjacent, but different regions
    assert errno_of(mm.resolve, x + PAGE_SIZE - 2, 4, write=False) == errno.EFAULT


def test_vanished_region_faults_instead_of_crashing(mm, run_id):
    r = Region.create(region_name(run_id, "app1", "gone"), PAGE_SIZE)
    addr = mm.map(r.name, PAGE_SIZE, RW)
    r.close()  # unlinked before the kernel ever attached it
    assert errno_of(mm.resolve, addr, 8, write=True) == errno.EFAULT


def test_regions_attach_lazily_and_detach_on_unmap(mm, regions):
    r = regions("buf", PAGE_SIZE)
    addr = mm.map(r.name, PAGE_SIZE, RW)
    backing = mm.find(addr).backing
    assert backing.region is None  # nothing attached until the kernel touches it
    mm.resolve(addr, 8, write=True)[:] = 7
    assert backing.region is not None
    mm.unmap(addr, PAGE_SIZE)
    assert backing.region is None and len(mm) == 0
    assert r.array()[:8].tolist() == [7] * 8


def test_names_that_are_not_shm_names_are_refused(mm, run_id):
    for bad in (f"/zcrx.{run_id}.app1./../../etc/passwd", "zcrx.x", "", "/a/b", "/x\0y"):
        assert errno_of(mm.map, bad, PAGE_SIZE, RW) == errno.EINVAL


# -- untrusted memory: the app owns the name and can change what it points to -----------------


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name.lstrip("/"))


def test_a_symlink_under_the_tasks_own_prefix_is_eloop(mm, regions, run_id):
    target = regions("real", PAGE_SIZE)
    link = region_name(run_id, "app1", "link")
    os.symlink(_path(target.name), _path(link))
    try:
        assert errno_of(mm.map, link, PAGE_SIZE, RW) == errno.ELOOP
        assert errno_of(mm.map, link, PAGE_SIZE, RW, kernel=True) == errno.ELOOP
    finally:
        os.unlink(_path(link))
    assert mm.refused["symlink"] == 2 and len(mm) == 0
    assert mm.map(target.name, PAGE_SIZE, RW) >= USER_BASE  # the real name still maps


def test_a_hard_link_to_another_tasks_memory_is_eacces(mm, regions, run_id):
    theirs = regions("area", PAGE_SIZE, owner="app2")
    link = region_name(run_id, "app1", "area")
    os.link(_path(theirs.name), _path(link))
    try:
        assert errno_of(mm.map, link, PAGE_SIZE, RW) == errno.EACCES
    finally:
        os.unlink(_path(link))
    assert mm.refused["links"] == 1 and len(mm) == 0


def test_a_segment_of_another_owner_or_kind_is_refused(regions, run_id):
    mine = regions("buf", PAGE_SIZE)
    stranger = Mm(f"/zcrx.{run_id}.app1.", uid=os.geteuid() + 1)
    try:
        assert errno_of(stranger.map, mine.name, PAGE_SIZE, RW) == errno.EACCES
        assert stranger.refused["owner"] == 1
    finally:
        stranger.close()
    m = Mm(f"/zcrx.{run_id}.app1.")
    d = region_name(run_id, "app1", "dir")
    f = region_name(run_id, "app1", "fifo")
    os.mkdir(_path(d))
    os.mkfifo(_path(f))
    try:
        assert errno_of(m.map, d, PAGE_SIZE, RW) == errno.EINVAL
        assert errno_of(m.map, f, PAGE_SIZE, RW) == errno.EINVAL
        assert m.refused["not_regular"] == 2
    finally:
        os.rmdir(_path(d))
        os.unlink(_path(f))
        m.close()


def test_swapping_the_name_after_mm_map_never_reaches_the_new_target(mm, regions, run_id):
    victim = regions("victim", PAGE_SIZE, owner="app2")
    victim.array()[:8] = 0x11
    # attached before the swap: the kernel keeps writing the inode it checked
    a = regions("a", PAGE_SIZE)
    addr_a = mm.map(a.name, PAGE_SIZE, RW)
    mm.resolve(addr_a, 8, write=True)[:] = 1
    # not touched before the swap: the checked inode lost its name, so -EFAULT
    b = Region.create(region_name(run_id, "app1", "b"), PAGE_SIZE)
    addr_b = mm.map(b.name, PAGE_SIZE, RW)
    for r in (a, b):
        os.unlink(_path(r.name))
        os.symlink(_path(victim.name), _path(r.name))
    try:
        mm.resolve(addr_a, 8, write=True)[:] = 2
        assert a.array()[:8].tolist() == [2] * 8
        assert errno_of(mm.resolve, addr_b, 8, write=True) == errno.EFAULT
        assert errno_of(mm.pin_region, mm.find(addr_b)) == errno.EFAULT
        # a hard link instead of a symlink: same answer (the checked inode has no name)
        os.unlink(_path(b.name))
        os.link(_path(victim.name), _path(b.name))
        assert errno_of(mm.resolve, addr_b, 8, write=True) == errno.EFAULT
        assert victim.array()[:8].tolist() == [0x11] * 8
    finally:
        os.unlink(_path(a.name))
        os.unlink(_path(b.name))
        b.detach()


def test_pin_region_maps_the_inode_mm_map_checked(mm, run_id):
    r = Region.memfd(region_name(run_id, "app1", "area"), 2 * PAGE_SIZE)
    try:
        addr = mm.map_fd(os.getpid(), r.fd, 2 * PAGE_SIZE, RW)
        pinned = mm.pin_region(mm.find(addr))
        try:
            assert pinned.size == 2 * PAGE_SIZE and pinned.fd >= 0  # the NIC is given this
            pinned.array()[PAGE_SIZE:PAGE_SIZE + 4] = 9
            assert r.array()[PAGE_SIZE:PAGE_SIZE + 4].tolist() == [9] * 4
        finally:
            pinned.detach()
    finally:
        r.close()


def test_a_named_segment_cannot_be_pinned(mm, regions):
    """tmpfs files opened by name cannot be sealed: resolvable, never pinnable (-EFAULT)."""
    r = regions("area", 2 * PAGE_SIZE)
    addr = mm.map(r.name, 2 * PAGE_SIZE, RW)
    mm.resolve(addr, 8, write=True)[:] = 1  # short accesses are fine
    assert errno_of(mm.pin_region, mm.find(addr)) == errno.EFAULT
    assert errno_of(mm.pin, addr, PAGE_SIZE, write=True) == errno.EFAULT
    assert mm.refused["pin_unsealed"] == 2


def _memfd(size: int, seals: int = 0) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_unsealed_memfd_maps_but_pins_only_once_sealed(mm):
    fd = _memfd(2 * PAGE_SIZE)
    try:
        addr = mm.map_fd(os.getpid(), fd, 2 * PAGE_SIZE, RW)
        assert mm.find(addr).name == "memfd:t"
        mm.resolve(addr, 4, write=True)[:] = 3
        assert errno_of(mm.pin, addr, PAGE_SIZE, write=True) == errno.EFAULT
        os.ftruncate(fd, PAGE_SIZE)  # unsealed: shorter than the mapping, every access checks
        assert errno_of(mm.resolve, addr + PAGE_SIZE, 4, write=True) == errno.EFAULT
        os.ftruncate(fd, 2 * PAGE_SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_SHRINK)
        assert errno_of(mm.pin, addr, PAGE_SIZE, write=True) == errno.EFAULT  # no SEAL yet
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_SEAL)
        assert len(mm.pin(addr, 2 * PAGE_SIZE, write=True)) == 2 * PAGE_SIZE
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # the seal: nobody shrinks it now
    finally:
        os.close(fd)


def test_map_fd_keeps_the_inode_whatever_the_task_does_with_its_descriptor(mm, run_id):
    a = Region.memfd(region_name(run_id, "app1", "a"), PAGE_SIZE)
    b = Region.memfd(region_name(run_id, "app1", "b"), PAGE_SIZE)
    try:
        addr = mm.map_fd(os.getpid(), a.fd, PAGE_SIZE, RW)
        os.dup2(b.fd, a.fd)  # the number now names b
        mm.resolve(addr, 4, write=True)[:] = 7
        assert b.array()[:4].tolist() == [0] * 4
        assert mm.pin(addr, PAGE_SIZE, write=False)[:4].tolist() == [7] * 4
    finally:
        a.close()
        b.close()


def test_map_fd_refuses_what_is_not_the_tasks_shared_memory(mm, tmp_path):
    pid = os.getpid()
    fd = _memfd(PAGE_SIZE)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    sock = socket.socket()
    disk = tempfile.TemporaryFile(dir=os.path.dirname(__file__))  # noqa: SIM115 (closed below)
    try:
        closed = _memfd(PAGE_SIZE)
        os.close(closed)
        assert errno_of(mm.map_fd, pid, closed, PAGE_SIZE, RW) == errno.EBADF
        assert errno_of(mm.map_fd, pid, -1, PAGE_SIZE, RW) == errno.EBADF
        assert errno_of(mm.map_fd, pid, 1 << 40, PAGE_SIZE, RW) == errno.EBADF
        assert errno_of(mm.map_fd, 1 << 22, fd, PAGE_SIZE, RW) == errno.EBADF  # no such pid
        for other in (dfd, r, w, sock.fileno()):
            assert errno_of(mm.map_fd, pid, other, PAGE_SIZE, RW) == errno.ENODEV
        if fcntl_seals(disk.fileno()) is None:  # a file on disk is not shared memory
            assert errno_of(mm.map_fd, pid, disk.fileno(), PAGE_SIZE, RW) == errno.ENODEV
        assert errno_of(mm.map_fd, pid, fd, 2 * PAGE_SIZE, RW) == errno.ENXIO
        assert errno_of(mm.map_fd, pid, fd, PAGE_SIZE, RW, alive=lambda: False) == errno.ESRCH
        if os.geteuid() == 0:
            os.fchown(fd, mm.uid + 1, -1)  # another owner's memory
            assert errno_of(mm.map_fd, pid, fd, PAGE_SIZE, RW) == errno.EACCES
            assert mm.refused["owner"] == 1
        wfd = _memfd(PAGE_SIZE, F_SEAL_WRITE)
        assert errno_of(mm.map_fd, pid, wfd, PAGE_SIZE, RW) == errno.EPERM
        mm.map_fd(pid, wfd, PAGE_SIZE, PROT_READ)  # reading write-sealed memory is fine
        os.close(wfd)
        assert mm.refused["not_regular"] == 4
        assert len(mm) == 1
    finally:
        for x in (fd, dfd, r, w):
            os.close(x)
        sock.close()
        disk.close()


def fcntl_seals(fd: int) -> int | None:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return None


def test_kernel_regions_stay_valid_after_the_kernel_unlinks_them(mm, run_id):
    k = Region.create(region_name(run_id, "kernel", "t1.ring3.rings"), PAGE_SIZE)
    addr = mm.map(k.name, PAGE_SIZE, RW, kernel=True)
    k.unlink()  # the ring closed before the app touched its mapping
    try:
        mm.resolve(addr, 4, write=True)[:] = 5
        assert k.array()[:4].tolist() == [5] * 4
    finally:
        k.detach()


def test_the_mm_holds_one_descriptor_per_inode_and_closes_it(mm, regions):
    r = regions("buf", PAGE_SIZE)
    fds = len(os.listdir("/proc/self/fd"))
    x = mm.map(r.name, PAGE_SIZE, RW)
    y = mm.map(r.name, PAGE_SIZE, PROT_READ)
    assert mm.find(x).backing is mm.find(y).backing
    assert len(os.listdir("/proc/self/fd")) == fds + 1
    mm.unmap(x, PAGE_SIZE)
    mm.unmap(y, PAGE_SIZE)
    assert len(os.listdir("/proc/self/fd")) == fds
