"""skb store: building, copy_out (every path), resolve, freeing, handles, compaction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver_proc.page_pool import BufferSpace, KernelPagesProvider, PagePool
from driver_proc.skb import LINEAR, SkbStore
from shared.errors import InvariantBroken, Misuse

BUF = 512


def filled_pool(count: int = 64, buf_len: int = BUF, seed: int = 1) -> PagePool:
    data = np.random.default_rng(seed).integers(0, 256, count * buf_len, dtype=np.uint8)
    sp = BufferSpace(data, count, buf_len, name=f"s{seed}")
    return PagePool(KernelPagesProvider(sp))


def posted(pool: PagePool, n: int) -> np.ndarray:
    ids = pool.alloc(n)
    assert len(ids) == n
    pool.post(ids)
    return ids


def expected_payload(sp: BufferSpace, bufs: list[int], lens: list[int],
                     offs: list[int] | None = None, lin: bytes = b"") -> bytes:
    offs = offs or [0] * len(bufs)
    return lin + b"".join(sp.data[b, o:o + n].tobytes() for b, o, n in
                          zip(bufs, offs, lens, strict=True))


def test_one_frag_skbs_copy_out_whole_payloads() -> None:
    pool = filled_pool()
    sp = pool.space
    store = SkbStore(capacity=16)
    ids = posted(pool, 8)
    lens = np.full(8, BUF, dtype=np.int64)
    h = store.add_batch(8, space=sp, nr_frags=1, frag_bufs=ids, frag_lens=lens)
    assert store.in_flight == 8 and len(set(h.tolist())) == 8
    assert sp.check_ledger()["in_skb"] == 8
    assert store.payload_len(h).tolist() == [BUF] * 8
    dst = np.zeros(8 * BUF + 10, dtype=np.uint8)
    assert store.copy_out(h, 0, lens, dst) == 8 * BUF
    assert dst[:8 * BUF].tobytes() == sp.data[ids].tobytes()
    assert dst[8 * BUF:].tolist() == [0] * 10
    assert store.free(h) == 8
    led = sp.check_ledger()
    assert led["in_skb"] == 0 and led["pool_cache"] == 8 and store.in_flight == 0


def test_copy_out_partial_first_and_last_pieces() -> None:
    pool = filled_pool()
    sp = pool.space
    store = SkbStore()
    ids = posted(pool, 6)
    lens = np.array([500, 512, 512, 512, 512, 300], dtype=np.int64)
    h = store.add_batch(6, space=sp, nr_frags=1, frag_bufs=ids, frag_lens=lens)
    offs = np.array([123, 0, 0, 0, 0, 0], dtype=np.int64)
    plen = np.array([377, 512, 512, 512, 512, 17], dtype=np.int64)  # head read, tail cut
    dst = np.empty(int(plen.sum()), dtype=np.uint8)
    store.copy_out(h, offs, plen, dst)
    want = b"".join(sp.data[b, o:o + n].tobytes() for b, o, n in zip(ids, offs, plen,
                                                                      strict=True))
    assert dst.tobytes() == want
    assert store.stats["copy_general"] == 0       # first/middle/last path
    # Irregular middle lengths take the general path and give the same bytes.
    plen2 = np.array([1, 200, 512, 3, 512, 300], dtype=np.int64)
    dst2 = np.empty(int(plen2.sum()), dtype=np.uint8)
    store.copy_out(h, 0, plen2, dst2)
    assert dst2.tobytes() == b"".join(sp.data[b, :n].tobytes() for b, n in zip(ids, plen2,
                                                                              strict=True))
    assert store.stats["copy_general"] == 1
    store.free(h)
    sp.check_ledger()


def test_copy_out_near_the_end_of_the_space() -> None:
    pool = filled_pool(count=4)
    sp = pool.space
    store = SkbStore()
    ids = posted(pool, 4)   # the last buffer ends the space: windows must not run past it
    lens = np.array([100, 512, 7, 512], dtype=np.int64)
    h = store.add_batch(4, space=sp, nr_frags=1, frag_bufs=ids, frag_lens=lens)
    dst = np.empty(int(lens.sum()), dtype=np.uint8)
    store.copy_out(h, 0, lens, dst)
    assert dst.tobytes() == expected_payload(sp, ids.tolist(), lens.tolist())
    # A piece starting 400 bytes into the last buffer, in a general-path batch.
    offs, plen = [0, 0, 0, 400], [100, 512, 7, 112]
    dst = np.empty(sum(plen), dtype=np.uint8)
    store.copy_out(h, offs, plen, dst)
    assert dst.tobytes() == expected_payload(sp, ids.tolist(), plen, offs)
    assert store.stats["copy_general"] == 2
    store.free(h)


def test_multi_frag_and_linear_skbs_and_spanning_pieces() -> None:
    pool = filled_pool()
    sp = pool.space
    store = SkbStore()
    ids = posted(pool, 5)
    rows = np.random.default_rng(7).integers(0, 256, (3, 200), dtype=np.uint8)
    # skb0: linear 30 B + 2 frags (512, 100); skb1: 3 frags (512, 512, 64); skb2: linear only.
    h = store.add_batch(3, space=sp, nr_frags=[2, 3, 0], frag_bufs=ids,
                        frag_lens=[512, 100, 512, 512, 64], lin_src=rows,
                        lin_off=[54, 0, 74], lin_len=[30, 0, 120])
    want = [
        expected_payload(sp, ids[:2].tolist(), [512, 100], lin=rows[0, 54:84].tobytes()),
        expected_payload(sp, ids[2:5].tolist(), [512, 512, 64]),
        rows[2, 74:194].tobytes(),
    ]
    assert store.payload_len(h).tolist() == [len(w) for w in want]
    # Pieces crossing the linear/frag and frag/frag boundaries.
    offs = np.array([10, 500, 0], dtype=np.int64)
    plen = np.array([600, 530, 120], dtype=np.int64)
    dst = np.empty(int(plen.sum()), dtype=np.uint8)
    store.copy_out(h, offs, plen, dst)
    assert dst.tobytes() == b"".join(w[o:o + n] for w, o, n in zip(want, offs, plen,
                                                                   strict=True))
    ch = store.frags(h)
    assert ch.piece.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert ch.src.tolist() == [LINEAR] + [sp.space_id] * 5 + [LINEAR]
    assert ch.buf.tolist()[1:6] == ids.tolist()
    assert ch.length.tolist() == [30, 512, 100, 512, 512, 64, 120]
    r = store.resolve(h[1:2], [600], [100])       # inside the second frag of skb1
    assert r.buf.tolist() == [ids[3]] and r.off.tolist() == [88] and r.length.tolist() == [100]
    store.free(h)
    assert sp.check_ledger()["pool_cache"] == 5


def test_linear_parts_with_uniform_and_mixed_offsets() -> None:
    store = SkbStore(linear_capacity=4096)
    rows = np.random.default_rng(3).integers(0, 256, (4, 128), dtype=np.uint8)
    h1 = store.add_batch(4, lin_src=rows, lin_off=54, lin_len=[10, 74, 1, 0])
    h2 = store.add_batch(2, lin_src=rows, lin_row=[3, 1], lin_off=[0, 100], lin_len=[128, 28])
    dst = np.empty(85 + 156, dtype=np.uint8)
    n = store.copy_out(np.concatenate([h1, h2]), 0,
                       np.array([10, 74, 1, 0, 128, 28]), dst)
    assert n == 241
    want = (rows[0, 54:64].tobytes() + rows[1, 54:128].tobytes() + rows[2, 54:55].tobytes()
            + rows[3].tobytes() + rows[1, 100:128].tobytes())
    assert dst.tobytes() == want
    assert store.payload_len(h1).tolist() == [10, 74, 1, 0]
    store.free(h1)
    store.free(h2)
    assert store.in_flight == 0


def test_handles_are_checked() -> None:
    pool = filled_pool()
    store = SkbStore()
    h = store.add_batch(2, space=pool.space, nr_frags=1, frag_bufs=posted(pool, 2),
                        frag_lens=[5, 5])
    with pytest.raises(InvariantBroken, match="twice"):
        store.free(np.array([h[0], h[0]]))
    store.free(h[:1])
    with pytest.raises(InvariantBroken, match="stale"):
        store.free(h[:1])
    with pytest.raises(InvariantBroken, match="stale"):
        store.copy_out(h[:1], 0, 1, np.empty(1, np.uint8))
    with pytest.raises(InvariantBroken):
        store.free([0])
    with pytest.raises(InvariantBroken):
        store.free([1 << 40 | 5000])
    # A reused slot gets a new generation: the old handle stays dead.
    h2 = store.add_batch(1, space=pool.space, nr_frags=1, frag_bufs=posted(pool, 1),
                         frag_lens=[1])
    assert (h2[0] & 0xFFFFFFFF) == (h[0] & 0xFFFFFFFF) and h2[0] != h[0]
    with pytest.raises(InvariantBroken):
        store.free(h[:1])
    store.free(np.concatenate([h[1:], h2]))
    pool.space.check_ledger()


def test_bad_arguments_are_misuse_and_build_nothing() -> None:
    pool = filled_pool()
    sp = pool.space
    store = SkbStore()
    ids = posted(pool, 2)
    with pytest.raises(Misuse):
        store.add_batch(2, space=sp, nr_frags=1, frag_bufs=ids, frag_lens=[5])
    with pytest.raises(Misuse):
        store.add_batch(2, space=sp, nr_frags=1, frag_bufs=ids, frag_lens=[5, BUF + 1])
    with pytest.raises(Misuse):
        store.add_batch(1, lin_src=np.zeros((1, 8), np.uint8), lin_off=4, lin_len=5)
    assert store.in_flight == 0 and sp.check_ledger()["posted"] == 2
    h = store.add_batch(2, space=sp, nr_frags=1, frag_bufs=ids, frag_lens=[5, 6])
    with pytest.raises(Misuse):
        store.copy_out(h, [0, 2], [5, 5], np.empty(10, np.uint8))   # past skb1's payload
    with pytest.raises(Misuse):
        store.copy_out(h, 0, [5, 6], np.empty(10, np.uint8))        # dst too short
    with pytest.raises(Misuse):
        store.copy_out(h, 0, [5, 6], np.empty(30, np.uint8)[::2])   # not contiguous
    with pytest.raises(Misuse):
        store.copy_out(h, [-1, 0], [1, 1], np.empty(10, np.uint8))  # negative offset
    with pytest.raises(Misuse):
        store.copy_out(h, [0, 0], [-1, 1], np.empty(10, np.uint8))  # negative length
    with pytest.raises(Misuse):
        store.copy_out(h, [6, 0], [0, 1], np.empty(10, np.uint8))   # offset past the end
    store.free(h)


def test_churn_compacts_arenas_and_keeps_survivor_bytes() -> None:
    pool = filled_pool(count=256)
    sp = pool.space
    store = SkbStore(capacity=16, seg_capacity=32, linear_capacity=4096)
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, (8, 300), dtype=np.uint8)
    live: dict[int, bytes] = {}
    for rnd in range(60):
        n = 8
        ids = pool.alloc(n)
        pool.post(ids)
        lin = rng.integers(0, 200, n)
        lens = rng.integers(1, BUF + 1, n)
        h = store.add_batch(n, space=sp, nr_frags=1, frag_bufs=ids, frag_lens=lens,
                            lin_src=rows, lin_off=50, lin_len=lin)
        for i in range(n):
            live[int(h[i])] = (rows[i, 50:50 + lin[i]].tobytes()
                               + sp.data[ids[i], :lens[i]].tobytes())
        # Free most of them, in a scrambled order, keep a few across many compactions.
        order = list(live)
        rng.shuffle(order)
        drop = order[: len(order) - 6 - rnd % 3]
        store.free(np.array(drop, dtype=np.int64))
        for d in drop:
            del live[d]
        sp.check_ledger()
    assert store.stats["seg_compactions"] > 0 and store.stats["lin_compactions"] > 0
    hs = np.array(list(live), dtype=np.int64)
    total = sum(len(v) for v in live.values())
    dst = np.empty(total, dtype=np.uint8)
    store.copy_out(hs, 0, store.payload_len(hs), dst)
    assert dst.tobytes() == b"".join(live.values())
    assert store.refs_by_space() == {sp.space_id: len(live)}
    store.free(hs)
    assert store.refs_by_space() == {}
    assert sp.check_ledger()["in_skb"] == 0


def test_two_spaces_in_one_copy() -> None:
    p1, p2 = filled_pool(seed=1), filled_pool(seed=2)
    store = SkbStore()
    a = store.add_batch(2, space=p1.space, nr_frags=1, frag_bufs=posted(p1, 2),
                        frag_lens=[BUF, BUF])
    b = store.add_batch(2, space=p2.space, nr_frags=1, frag_bufs=posted(p2, 2),
                        frag_lens=[BUF, BUF])
    h = np.array([a[0], b[0], a[1], b[1]])
    dst = np.empty(4 * BUF, dtype=np.uint8)
    store.copy_out(h, 0, BUF, dst)
    want = (p1.space.data[0].tobytes() + p2.space.data[0].tobytes()
            + p1.space.data[1].tobytes() + p2.space.data[1].tobytes())
    assert dst.tobytes() == want
    assert store.refs_by_space() == {p1.space.space_id: 2, p2.space.space_id: 2}
    store.free(h)
    assert p1.space.check_ledger()["pool_cache"] == 2
    assert p2.space.check_ledger()["pool_cache"] == 2


SKB = st.tuples(st.integers(0, 40),                                   # linear bytes
                st.lists(st.integers(1, BUF), max_size=3))             # frag lengths


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(skbs=st.lists(SKB, min_size=1, max_size=12), data=st.data())
def test_copy_out_matches_a_byte_model(skbs: list[tuple[int, list[int]]],
                                       data: st.DataObject) -> None:
    pool = filled_pool(count=48)
    sp = pool.space
    store = SkbStore(capacity=16, seg_capacity=32, linear_capacity=4096)
    n = len(skbs)
    rows = np.random.default_rng(n).integers(0, 256, (n, 64), dtype=np.uint8)
    nf = [len(f) for _, f in skbs]
    flens = [x for _, f in skbs for x in f]
    ids = posted(pool, len(flens))
    h = store.add_batch(n, space=sp, nr_frags=nf, frag_bufs=ids, frag_lens=flens,
                        lin_src=rows, lin_off=10, lin_len=[lin for lin, _ in skbs])
    model, k = [], 0
    for i, (lin, f) in enumerate(skbs):
        model.append(rows[i, 10:10 + lin].tobytes()
                     + expected_payload(sp, ids[k:k + len(f)].tolist(), f))
        k += len(f)
    order = data.draw(st.permutations(range(n)))
    offs, lens = [], []
    for i in order:
        size = len(model[i])
        o = data.draw(st.integers(0, size))
        offs.append(o)
        lens.append(data.draw(st.integers(0, size - o)))
    hh = h[np.array(order)]
    dst = np.empty(sum(lens), dtype=np.uint8)
    assert store.copy_out(hh, offs, lens, dst) == sum(lens)
    assert dst.tobytes() == b"".join(model[i][o:o + n_] for i, o, n_ in
                                     zip(order, offs, lens, strict=True))
    ch = store.resolve(hh, offs, lens)
    assert int(ch.length.sum()) == sum(lens)
    store.free(h)
    led = sp.check_ledger()
    assert led["in_skb"] == 0 and led["pool_cache"] == len(flens)
