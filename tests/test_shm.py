"""Shared-memory regions: naming, ownership, and what survives a SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shared.errors import Misuse
from shared.shm import (
    PAGE_SIZE,
    SHM_DIR,
    Region,
    list_all_runs,
    list_run_segments,
    owner_prefix,
    page_align,
    region_name,
    remove_prefix_segments,
    remove_run_segments,
)


def test_owner_prefix_names_one_owner_and_removes_only_its_segments(run_id: str) -> None:
    assert owner_prefix(run_id, "app3") == f"/zcrx.{run_id}.app3."
    assert region_name(run_id, "app3", "area0").startswith(owner_prefix(run_id, "app3"))
    with pytest.raises(Misuse):
        owner_prefix(run_id, "app.3")
    mine = Region.create(region_name(run_id, "app3", "area0"), PAGE_SIZE)
    other = Region.create(region_name(run_id, "app31", "area0"), PAGE_SIZE)
    try:
        assert remove_prefix_segments("/zcrx.") == []  # never a broad pattern
        assert remove_prefix_segments(f"/zcrx.{run_id}.") == []
        assert remove_prefix_segments(owner_prefix(run_id, "app3")) == [mine.name]
        assert list_run_segments(run_id) == [other.name]
    finally:
        mine.close()
        other.close()


def test_names_follow_the_run_owner_object_scheme(run_id: str) -> None:
    assert region_name(run_id, "kernel", "q0.rxring") == f"/zcrx.{run_id}.kernel.q0.rxring"
    for bad in [("a.b", "kernel", "x"), ("r", "ker/nel", "x"), ("r", "k", "x..y"),
                ("", "k", "x"), ("r", "k", "a" * 300)]:
        with pytest.raises(Misuse):
            region_name(*bad)


def test_create_is_exclusive_private_aligned_and_pretouched(run_id: str) -> None:
    name = region_name(run_id, "app0", "area0")
    with Region.create(name, 10_000) as r:
        assert r.size == page_align(10_000) == 3 * PAGE_SIZE
        st = os.stat(os.path.join(SHM_DIR, name[1:]))
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == r.size
        # Pre-touched: every page is resident (tmpfs allocated blocks for all of it).
        assert st.st_blocks * 512 >= r.size
        with pytest.raises(Misuse) as exc:
            Region.create(name, 4096)
        assert exc.value.errno == 17  # EEXIST
    assert not os.path.exists(os.path.join(SHM_DIR, name[1:]))


def test_allocate_gives_a_prefix_its_pages_and_memfd_all_of_them(run_id: str) -> None:
    # A page pool's region: only the first fill's pages now, the rest on first use.
    name = region_name(run_id, "kernel", "pp1")
    with Region.create(name, 16 * PAGE_SIZE, allocate=4 * PAGE_SIZE) as r:
        st = os.stat(os.path.join(SHM_DIR, name[1:]))
        assert st.st_size == r.size == 16 * PAGE_SIZE
        assert 4 * PAGE_SIZE <= st.st_blocks * 512 < 16 * PAGE_SIZE
        r.array()[-1] = 7  # a page beyond the prefix appears on first store
        assert os.stat(os.path.join(SHM_DIR, name[1:])).st_blocks * 512 > st.st_blocks * 512
    with Region.create(region_name(run_id, "kernel", "lazy"), 8 * PAGE_SIZE,
                       pretouch=False) as r:
        assert os.stat(os.path.join(SHM_DIR, r.name[1:])).st_blocks == 0
    with Region.memfd(region_name(run_id, "app0", "area1"), 5 * PAGE_SIZE) as m:
        assert os.fstat(m.fd).st_blocks * 512 >= 5 * PAGE_SIZE


def test_a_lazy_tail_that_cannot_fit_is_refused_at_creation(run_id: str) -> None:
    """Pages left to first touch must fit in /dev/shm now: refused with ENOMEM at creation
    (nothing left behind) instead of a SIGBUS in whoever first writes there."""
    free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
    name = region_name(run_id, "kernel", "huge")
    with pytest.raises(Misuse) as ei:
        Region.create(name, free + (64 << 20), allocate=PAGE_SIZE)
    assert ei.value.errno == errno.ENOMEM and "first touch" in str(ei.value)
    assert not os.path.exists(os.path.join(SHM_DIR, name[1:]))


def test_attach_sees_the_same_bytes_and_only_the_creator_unlinks(run_id: str) -> None:
    name = region_name(run_id, "kernel", "hdr")
    owner = Region.create(name, PAGE_SIZE)
    try:
        other = Region.attach(name)
        owner.array(np.uint32)[:4] = [1, 2, 3, 4]
        assert list(other.array(np.uint32)[:4]) == [1, 2, 3, 4]
        with pytest.raises(Misuse):
            other.unlink()
        with pytest.raises(Misuse):
            Region.attach(name, size=2 * PAGE_SIZE)
        view = other.array(np.uint8)  # a live view: detach must not fail
        other.detach()
        assert view[0] == 1
        del view
        with pytest.raises(Misuse):
            other.array()
    finally:
        owner.close()
    with pytest.raises(Misuse) as exc:
        Region.attach(name)
    assert exc.value.errno == 2  # ENOENT


def test_list_and_remove_run_segments(run_id: str) -> None:
    names = [region_name(run_id, "nic", f"obj{i}") for i in range(3)]
    regions = [Region.create(n, PAGE_SIZE) for n in names]
    try:
        assert list_run_segments(run_id) == sorted(names)
        assert run_id in list_all_runs()
        # A run whose id is a prefix of ours is not confused with it.
        assert list_run_segments(run_id[:-1]) == []
    finally:
        for r in regions:
            r.detach()
    assert remove_run_segments(run_id) == sorted(names)
    assert remove_run_segments(run_id) == []  # idempotent
    assert list_run_segments(run_id) == []


@pytest.mark.timeout(30)
def test_segment_survives_sigkill_and_run_cleanup_removes_it(run_id: str) -> None:
    """A process that holds a region dies by SIGKILL: the segment and its bytes
    stay (tmpfs keeps them), and the run cleanup removes them."""
    name = region_name(run_id, "app0", "area0")
    child = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from shared.shm import Region
        r = Region.create({name!r}, 1 << 20)
        r.array(np.uint8)[:5] = list(b"alive")
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list_run_segments(run_id) == [name]
    survivor = Region.attach(name)
    assert bytes(survivor.array(np.uint8)[:5]) == b"alive"
    survivor.detach()
    assert remove_run_segments(run_id) == [name]
    assert list_run_segments(run_id) == []
