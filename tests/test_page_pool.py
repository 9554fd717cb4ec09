"""Page pool, buffer space and ledger: every transition, delayed destruction, providers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver_proc.page_pool import (
    BufferSpace,
    BufState,
    IdFifo,
    KernelPagesProvider,
    MemoryProvider,
    PagePool,
    SpaceSet,
)
from driver_proc.skb import SkbStore
from shared.errors import InvariantBroken, Misuse
from shared.shm import region_name


def make_space(count: int = 16, buf_len: int = 256) -> BufferSpace:
    return BufferSpace(np.zeros(count * buf_len, dtype=np.uint8), count, buf_len, name="t")


def make_pool(count: int = 16, buf_len: int = 256) -> PagePool:
    return PagePool(KernelPagesProvider(make_space(count, buf_len)), name="t")


def ledger_total(sp: BufferSpace) -> int:
    return sum(sp.check_ledger().values())


# -- IdFifo ------------------------------------------------------------------------------------

def test_id_fifo_wraps_and_keeps_order() -> None:
    f = IdFifo(5)
    f.push(np.array([1, 2, 3], dtype=np.int64))
    assert f.pop(2).tolist() == [1, 2]
    f.push(np.array([4, 5, 6, 7], dtype=np.int64))  # wraps
    assert len(f) == 5
    assert f.peek_all().tolist() == [3, 4, 5, 6, 7]
    with pytest.raises(InvariantBroken):
        f.push(np.array([8], dtype=np.int64))
    assert f.pop(10).tolist() == [3, 4, 5, 6, 7]
    assert len(f.pop(1)) == 0


# -- freelist and allocation -------------------------------------------------------------------

def test_fresh_space_is_all_free_and_hands_out_contiguous_ids() -> None:
    pool = make_pool(8)
    sp = pool.space
    assert sp.check_ledger() == {"free": 8, "pool_cache": 0, "driver": 0, "posted": 0,
                                 "in_skb": 0, "user": 0}
    ids = pool.alloc(5)
    assert ids.tolist() == [0, 1, 2, 3, 4]
    assert (sp.state[ids] == BufState.DRIVER).all()
    assert (sp.pp_ref[ids] == 1).all() and (sp.pp[ids] == pool.id).all()
    assert pool.inflight == 5
    assert sp.check_ledger()["driver"] == 5


def test_alloc_may_return_fewer_and_counts_it() -> None:
    pool = make_pool(4)
    assert len(pool.alloc(3)) == 3
    got = pool.alloc(3)
    assert got.tolist() == [3]
    assert pool.alloc_short == 1
    assert len(pool.alloc(1)) == 0
    assert ledger_total(pool.space) == 4


def test_full_cycle_post_skb_free_recycles_into_cache_in_order() -> None:
    pool = make_pool(8)
    sp = pool.space
    ids = pool.alloc(4)
    pool.post(ids)
    assert sp.check_ledger()["posted"] == 4
    sp.to_skb(ids[:3])
    assert sp.check_ledger()["in_skb"] == 3
    assert sp.put_ref(ids[:3]) == 3          # skbs freed: last reference each
    led = sp.check_ledger()
    assert led["pool_cache"] == 3 and led["posted"] == 1 and led["free"] == 4
    assert pool.inflight == 1
    # The cache is used before the freelist, oldest first.
    again = pool.alloc(4)
    assert again.tolist() == [0, 1, 2, 4]
    assert ledger_total(sp) == 8


def test_put_ref_without_reference_is_an_invariant_error() -> None:
    pool = make_pool(4)
    sp = pool.space
    with pytest.raises(InvariantBroken):
        sp.put_ref(np.array([0], dtype=np.int64))
    ids = pool.alloc(1)
    with pytest.raises(InvariantBroken):
        sp.put_ref(np.array([0, 0], dtype=np.int64))  # two drops, one reference
    assert sp.pp_ref[ids].tolist() == [1]                # nothing changed
    sp.check_ledger()


def test_duplicate_ids_drop_several_references() -> None:
    pool = make_pool(4)
    sp = pool.space
    ids = pool.alloc(2)
    pool.post(ids)
    sp.to_skb(ids)
    sp.pp_ref[0] += 1  # pretend a second skb frag references buffer 0 (no ledger check here)
    assert sp.put_ref(np.array([0, 0, 1], dtype=np.int64)) == 2
    assert sp.check_ledger()["pool_cache"] == 2


# -- user references (the zcrx path of the next issue) ---------------------------------------

def test_user_refs_keep_buffer_after_skb_free_and_bad_returns_are_ignored() -> None:
    pool = make_pool(4)
    sp = pool.space
    ids = pool.alloc(2)
    pool.post(ids)
    sp.to_skb(ids)
    sp.get_user(np.array([0, 0, 1], dtype=np.int64))  # buffer 0 in two CQEs
    assert sp.user_refs.tolist()[:2] == [2, 1]
    assert sp.check_ledger()["user"] == 2
    assert sp.put_ref(ids) == 0                      # skb freed: the user still holds them
    assert sp.check_ledger()["user"] == 2
    # Returns: buffer 1 twice (one too many), buffer 3 never lent, -1 and 99 out of range.
    accepted = sp.put_user(np.array([1, 1, 3, -1, 99], dtype=np.int64))
    assert accepted == 1
    assert sp.bad_user_returns == 4
    led = sp.check_ledger()
    assert led["user"] == 1 and led["pool_cache"] == 1
    assert sp.put_user([0]) == 1 and sp.check_ledger()["user"] == 1
    assert sp.put_user([0]) == 1
    assert sp.check_ledger()["pool_cache"] == 2
    assert pool.inflight == 0


def test_lend_free_hands_a_fresh_buffer_to_the_user_outside_any_pool() -> None:
    sp = make_space(4)
    ids = sp.take_free(3)
    sp.lend_free(ids[:2])                       # the copy fallback: two CQEs went out
    sp.put_free(ids[2:])                        # the third did not
    assert [int(sp.pp_ref[i]) for i in ids[:2]] == [1, 1]
    assert sp.check_ledger() == {"free": 2, "pool_cache": 0, "driver": 0, "posted": 0,
                                 "in_skb": 0, "user": 2}
    with pytest.raises(InvariantBroken, match="not FREE"):
        sp.lend_free(ids[:1])                   # already the user's
    sp.lend_free(ids[:0])
    assert sp.put_user(ids[:2]) == 2            # last reference: back to the freelist
    assert sp.check_ledger()["free"] == 4 and sp.free_count == 4


def test_scrub_revokes_user_references() -> None:
    pool = make_pool(4)
    sp = pool.space
    ids = pool.alloc(3)
    pool.post(ids)
    sp.to_skb(ids)
    sp.get_user(ids)
    sp.put_ref(ids[:2])            # two skbs freed, third still in an skb
    assert sp.scrub() == 3
    led = sp.check_ledger()
    assert led["user"] == 0 and led["in_skb"] == 1 and led["pool_cache"] == 2
    assert sp.put_user(ids) == 0   # later returns find no reference
    assert sp.bad_user_returns == 3


# -- destruction -------------------------------------------------------------------------------

def test_destroy_is_delayed_until_in_flight_buffers_return() -> None:
    done: list[PagePool] = []
    sp = make_space(8)
    pool = PagePool(KernelPagesProvider(sp), on_destroyed=done.append)
    ids = pool.alloc(6)
    pool.post(ids)
    sp.to_skb(ids[:2])
    sp.put_ref(ids[2:])            # reclaimed posted buffers -> cache
    assert not pool.destroy()      # two buffers still in skbs
    assert pool.destroying and not pool.destroyed and not done
    assert sp.check_ledger()["free"] == 6
    with pytest.raises(Misuse):
        pool.alloc(1)
    sp.put_ref(ids[:1])
    assert not pool.destroyed
    sp.put_ref(ids[1:2])
    assert pool.destroyed and done == [pool]
    assert sp.check_ledger()["free"] == 8
    assert pool.id not in sp.pools
    assert pool.destroy()          # idempotent


def test_buffers_of_a_gone_pool_go_to_the_freelist() -> None:
    sp = make_space(8)
    old = PagePool(KernelPagesProvider(sp))
    ids = old.alloc(2)
    old.post(ids)
    sp.to_skb(ids)
    old.destroy()
    new = PagePool(KernelPagesProvider(sp))   # same space, next generation (zcrx restart)
    fresh = new.alloc(2)
    assert set(fresh.tolist()).isdisjoint(ids.tolist())
    sp.put_ref(ids)
    assert old.destroyed
    led = sp.check_ledger()
    assert led["free"] == 6 and led["driver"] == 2


def test_check_ledger_catches_corruption() -> None:
    pool = make_pool(4)
    sp = pool.space
    ids = pool.alloc(2)
    pool.post(ids)
    sp.check_ledger()
    sp.pp_ref[ids[0]] = 2
    with pytest.raises(InvariantBroken, match="pp_ref != 1"):
        sp.check_ledger()
    sp.pp_ref[ids[0]] = 1
    sp.state[3] = BufState.POOL_CACHE  # claims to be cached, but is on the freelist
    with pytest.raises(InvariantBroken):
        sp.check_ledger()
    sp.state[3] = BufState.FREE
    pool.inflight += 1
    with pytest.raises(InvariantBroken, match="inflight"):
        sp.check_ledger()


# -- regions -----------------------------------------------------------------------------------

def test_kernel_space_region_is_created_and_unlinked(run_id: str) -> None:
    name = region_name(run_id, "kernel", "eth0.q0.pp1")
    sp = BufferSpace.create(name, 8, 4096)
    try:
        assert os.path.exists("/dev/shm" + name)
        assert sp.region_size == 8 * 4096
        sp.data[3, :4] = [1, 2, 3, 4]
        assert sp.flat[3 * 4096:3 * 4096 + 4].tolist() == [1, 2, 3, 4]
        assert sp.window(4)[3 * 4096].tolist() == [1, 2, 3, 4]
    finally:
        sp.close()
    assert not os.path.exists("/dev/shm" + name)
    sp.close()  # idempotent


def test_bad_space_shapes_are_refused() -> None:
    with pytest.raises(Misuse):
        BufferSpace(bytearray(16), 0, 16)
    sp = make_space(4)
    with pytest.raises(Misuse):
        sp.check_ids([4])


# -- a plugged-in provider ---------------------------------------------------------------------

class RefillFirstProvider(MemoryProvider):
    """Shape of the zcrx provider: returned buffers first (recycled into the pool cache as
    a side effect of put_user), then the freelist."""

    kind = "io-uring"

    def __init__(self, space: BufferSpace) -> None:
        super().__init__(space)
        self.returned: list[int] = []
        self.inits = self.destroys = 0

    def alloc(self, pool: PagePool, n: int) -> np.ndarray:
        if self.returned:
            self.space.put_user(np.array(self.returned, dtype=np.int64))
            self.returned = []
        return self.space.take_free(n - len(pool.cache))

    def release(self, pool: PagePool, ids: np.ndarray) -> None:
        self.space.put_free(ids)

    def init(self, pool: PagePool) -> None:
        self.inits += 1

    def destroy(self, pool: PagePool) -> None:
        self.destroys += 1


def test_provider_refill_queue_feeds_the_cache_before_the_freelist() -> None:
    sp = make_space(6)
    prov = RefillFirstProvider(sp)
    pool = PagePool(prov)
    assert prov.inits == 1
    ids = pool.alloc(4)
    pool.post(ids)
    sp.to_skb(ids)
    sp.get_user(ids)
    sp.put_ref(ids)                     # skbs gone, user holds all four
    prov.returned = [2, 0]              # the app wrote two RQEs
    got = pool.alloc(3)
    # Recycled 2 and 0 came through the cache first, then one from the freelist.
    assert got.tolist() == [2, 0, 4]
    led = sp.check_ledger()
    assert led["user"] == 2 and led["driver"] == 3 and led["free"] == 1
    assert pool.destroy() is False
    sp.put_ref(got)
    sp.scrub()
    assert pool.destroyed and prov.destroys == 1
    assert sp.check_ledger()["free"] == 6


# -- property: random operation sequences keep the ledger --------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["alloc", "post", "skb", "free_skb", "reclaim",
                                          "lend", "return", "scrub"]),
                         st.integers(0, 12)), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, count=st.integers(1, 24))
def test_random_operations_keep_the_ledger(ops: list[tuple[str, int]], count: int) -> None:
    sp = make_space(count, 64)
    pool = PagePool(KernelPagesProvider(sp))
    driver: list[int] = []
    posted: list[int] = []
    skb: list[int] = []
    lent: list[int] = []
    for op, k in ops:
        if op == "alloc":
            driver += pool.alloc(k).tolist()
        elif op == "post" and driver:
            ids, driver = driver[:k], driver[k:]
            pool.post(np.array(ids, dtype=np.int64))
            posted += ids
        elif op == "skb" and posted:
            ids, posted = posted[:k], posted[k:]
            sp.to_skb(np.array(ids, dtype=np.int64))
            skb += ids
        elif op == "free_skb" and skb:
            ids, skb = skb[:k], skb[k:]
            sp.put_ref(np.array(ids, dtype=np.int64))
        elif op == "reclaim" and posted:
            ids, posted = posted[:k], posted[k:]
            sp.put_ref(np.array(ids, dtype=np.int64))
        elif op == "lend" and skb:
            ids = skb[:k]
            sp.get_user(np.array(ids, dtype=np.int64))
            lent += ids
        elif op == "return" and lent:
            ids, lent = lent[:k], lent[k:]
            sp.put_user(np.array(ids, dtype=np.int64))
        elif op == "scrub":
            sp.scrub()
            lent = []
        led = sp.check_ledger()
        assert sum(led.values()) == count
        assert led["driver"] == len(driver) and led["posted"] == len(posted)
        assert led["in_skb"] + led["user"] == len(set(skb) | set(lent))
    # Tear down: everything comes home, the pool is destroyed, all buffers FREE.
    sp.put_ref(np.array(driver + posted + skb, dtype=np.int64))
    sp.scrub()
    assert pool.destroy()
    assert sp.check_ledger()["free"] == count


# -- a pool over several spaces (a zcrx ifq's areas, Linux 7.3) ---------------------------------

class AreasProvider(MemoryProvider):
    """Shape of the zcrx provider over several areas: the freelists walked in order."""

    kind = "io-uring"

    def alloc(self, pool: PagePool, n: int) -> np.ndarray:
        return self.spaces.take_free(n)

    def release(self, pool: PagePool, ids: np.ndarray) -> None:
        self.spaces.put_free(ids)


def test_pool_over_several_spaces_uses_keys_and_each_space_keeps_its_ledger() -> None:
    a0, a1 = make_space(4), make_space(6)
    ss = SpaceSet([a0])
    prov = AreasProvider(a0, ss)
    pool = PagePool(prov)
    assert pool.alloc(4).tolist() == [0, 1, 2, 3] and len(pool.alloc(1)) == 0   # dry
    ss.add(a1)                                            # an area added while the pool runs
    pool.attach(a1)
    assert a1.index == 1 and ss.total == 10 and ss.counts.tolist() == [4, 6]
    keys = pool.alloc(3)
    assert keys.tolist() == [(1 << 32) | 0, (1 << 32) | 1, (1 << 32) | 2]
    pool.post(keys)
    assert a1.ledger()["posted"] == 3 and a0.ledger()["driver"] == 4
    store = SkbStore()
    mixed = np.array([2, keys[0], 3, keys[1]], dtype=np.int64)  # frags of both in one batch
    pool.post(mixed[[0, 2]])
    h = store.add_batch(4, space=ss, nr_frags=1, frag_bufs=mixed, frag_lens=[10, 20, 30, 40])
    fr = store.frags(h)
    assert fr.src.tolist() == [a0.space_id, a1.space_id, a0.space_id, a1.space_id]
    assert fr.buf.tolist() == [2, 0, 3, 1]
    assert store.refs_by_space() == {a0.space_id: 2, a1.space_id: 2}
    with pytest.raises(Misuse):
        store.add_batch(1, space=ss, nr_frags=1, frag_bufs=[(1 << 32) | 6], frag_lens=[1])
    with pytest.raises(Misuse):
        store.add_batch(1, space=ss, nr_frags=1, frag_bufs=[2 << 32], frag_lens=[1])
    store.free(h)                                         # each back into the one pool
    assert sorted(pool.cache.peek_all().tolist()) == sorted(mixed.tolist())
    for sp in (a0, a1):
        sp.check_ledger()
    assert pool.inflight == 3                              # 0 and 1 of a0, key 2 of a1
    assert pool.put_ref(keys[2:]) == 1 and a1.ledger()["pool_cache"] == 3
    assert pool.put_ref(np.array([0, 1], dtype=np.int64)) == 2
    assert pool.inflight == 0
    assert pool.destroy() is True                          # nothing in flight: at once
    assert pool.destroyed and a0.free_count == 4 and a1.free_count == 6
    assert not a0.pools and not a1.pools
    for sp in (a0, a1):
        assert sp.check_ledger()["free"] == sp.count


def test_space_set_groups_keys_by_space_in_order() -> None:
    a0, a1, a2 = make_space(4), make_space(4), make_space(4)
    ss = SpaceSet([a0, a1, a2])
    keys = np.array([(2 << 32) | 1, 3, (1 << 32) | 0, (2 << 32) | 2, 1], dtype=np.int64)
    g = [(sp.index, ids.tolist()) for sp, ids in ss.groups(keys)]
    assert g == [(0, [3, 1]), (1, [0]), (2, [1, 2])]
    assert ss.groups(keys[:1])[0][1].tolist() == [1]
    taken = ss.take_free(6)                              # areas walked in order
    assert (taken >> 32).tolist() == [0, 0, 0, 0, 1, 1]
    ss.put_free(taken)
    assert ss.free_count() == 12
    zc, k = ss.find(np.array([a1.space_id, 99, a2.space_id, -1]), np.array([3, 1, 0, 2]))
    assert zc.tolist() == [True, False, True, False]
    assert k[zc].tolist() == [(1 << 32) | 3, 2 << 32]
    with pytest.raises(Misuse):
        SpaceSet([a0]).add(make_space(4, 512))           # one buffer size per set


def _allocated_kib(path: str) -> int:
    """KiB of pages tmpfs holds for the segment at ``path`` (allocated, mapped or not)."""
    return os.stat(path).st_blocks * 512 // 1024


def test_a_space_allocates_only_the_buffers_it_is_told_to_touch() -> None:
    """A queue's kernel-page pool gets pages for the ring's first fill at once, the rest on
    first use (as a page pool allocates on demand): a zcrx ifq bound to the queue soon never
    pays for them."""
    name = region_name(f"t{os.getpid()}", "kernel", "touch")
    sp = BufferSpace.create(name, 256, 4096, touch=64)
    try:
        assert _allocated_kib(f"/dev/shm{name}") == 64 * 4
        sp.data[200, :1] = 1  # a later buffer gets its page when first written
        assert _allocated_kib(f"/dev/shm{name}") == 65 * 4
    finally:
        sp.close()
    whole = BufferSpace.create(name, 16, 4096)
    try:
        assert _allocated_kib(f"/dev/shm{name}") == 16 * 4
    finally:
        whole.close()
