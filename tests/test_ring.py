"""The SPSC ring: model-checked in memory, hammered across processes, abused on purpose."""

from __future__ import annotations

import multiprocessing as mp
import struct
from collections import deque

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shared.errors import InvariantBroken
from shared.ring import U32, RingConsumer, RingLayout, RingProducer
from shared.shm import Region, region_name

ENTRY = np.dtype([("off", "<u8"), ("len", "<u4"), ("pad", "<u4")])


def make_ring(nentries: int, *, start: int = 0, untrusted: bool = False,
              layout: RingLayout | None = None):
    layout = layout or RingLayout.default(nentries, ENTRY)
    buf = bytearray(layout.size)
    words = memoryview(buf).cast("I")
    words[layout.head // 4] = start & U32
    words[layout.tail // 4] = start & U32
    return buf, RingProducer(buf, layout), RingConsumer(buf, layout, untrusted=untrusted)


class RingVsDeque(RuleBasedStateMachine):
    """Any interleaving of batch operations behaves like a bounded FIFO."""

    def __init__(self) -> None:
        super().__init__()
        self.model: deque[int] = deque()
        self.next_value = 0
        self.prod: RingProducer | None = None
        self.cons: RingConsumer | None = None
        self.size = 0

    @precondition(lambda self: self.prod is None)
    @rule(log2=st.integers(0, 5), start=st.sampled_from([0, 5, U32 - 3, U32]))
    def setup(self, log2: int, start: int) -> None:
        # Starting near 2**32 makes the free-running counters wrap during the run.
        self.size = 1 << log2
        self.buf, self.prod, self.cons = make_ring(self.size, start=start)

    def _values(self, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=ENTRY)
        out["off"] = np.arange(self.next_value, self.next_value + n)
        out["len"] = out["off"] & 0xFFFF
        self.next_value += n
        return out

    @precondition(lambda self: self.prod is not None)
    @rule(n=st.integers(0, 40))
    def push(self, n: int) -> None:
        assert self.prod is not None
        vals = self._values(n)
        pushed = self.prod.push(vals)
        assert pushed == min(n, self.size - len(self.model))
        self.model.extend(int(v) for v in vals["off"][:pushed])
        self.next_value -= n - pushed

    @precondition(lambda self: self.prod is not None)
    @rule(n=st.integers(0, 40), keep=st.integers(0, 40))
    def reserve_submit(self, n: int, keep: int) -> None:
        assert self.prod is not None
        view = self.prod.reserve(n)
        free = self.size - len(self.model)
        assert len(view) <= min(n, free)
        # Contiguous: only the wrap point may shorten it.
        slot = self.prod.tail & (self.size - 1)
        assert len(view) == min(n, free, self.size - slot)
        k = min(keep, len(view))
        vals = self._values(k)
        view[:k] = vals
        self.prod.submit(k)
        self.model.extend(int(v) for v in vals["off"])

    @precondition(lambda self: self.cons is not None)
    @rule(n=st.integers(0, 40), take=st.integers(0, 40))
    def peek_release(self, n: int, take: int) -> None:
        assert self.cons is not None
        view = self.cons.peek(n)
        assert len(view) <= min(n, len(self.model))
        expected = [self.model[i] for i in range(len(view))]
        assert [int(v) for v in view["off"]] == expected
        k = min(take, len(view))
        self.cons.release(k)
        for _ in range(k):
            self.model.popleft()

    @precondition(lambda self: self.cons is not None)
    @rule(n=st.integers(0, 40))
    def pop(self, n: int) -> None:
        assert self.cons is not None
        out = self.cons.pop(n)
        k = min(n, len(self.model))
        assert [int(v) for v in out["off"]] == [self.model.popleft() for _ in range(k)]
        assert np.array_equal(out["len"], out["off"] & 0xFFFF)

    @invariant()
    def counts_agree(self) -> None:
        if self.prod is None or self.cons is None:
            return
        assert self.cons.ready() == len(self.model)
        assert self.prod.space() == self.size - len(self.model)
        assert self.prod.faults == 0 and self.cons.faults == 0


TestRingVsDeque = RingVsDeque.TestCase
TestRingVsDeque.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_uapi_rq_layout_is_an_instance() -> None:
    """The zcrx RQ (6.18+: head 0, tail 4, rqes 64) read as a kernel would read it."""
    layout = RingLayout(nentries=8, dtype=ENTRY, head=0, tail=4, entries=64)
    buf = bytearray(64 + 8 * 16)
    kernel = RingConsumer(buf, layout, untrusted=True)
    # The "app" writes raw bytes at the documented offsets, like liburing does.
    for i in range(3):
        struct.pack_into("<QII", buf, 64 + 16 * i, (i << 12) | 7, 4096, 0)
    struct.pack_into("<I", buf, 4, 3)
    got = kernel.pop(8)
    assert [int(x) for x in got["off"]] == [7, 4096 | 7, 8192 | 7]
    assert struct.unpack_from("<I", buf, 0)[0] == 3  # head published at offset 0
    assert kernel.faults == 0


def test_separate_entries_buffer() -> None:
    """io_uring's SQE array lives in its own region: words in one buffer, entries in another."""
    layout = RingLayout(nentries=4, dtype=ENTRY, head=0, tail=4, entries=0, flags=36)
    words, entries = bytearray(64), bytearray(4 * 16)
    p = RingProducer(words, layout, entries_buf=entries)
    c = RingConsumer(words, layout, entries_buf=entries)
    vals = np.zeros(3, dtype=ENTRY)
    vals["off"] = [10, 11, 12]
    assert p.push(vals) == 3
    assert struct.unpack_from("<Q", entries, 16)[0] == 11
    assert list(c.pop(4)["off"]) == [10, 11, 12]


def test_need_wakeup_flag() -> None:
    _, p, c = make_ring(4)
    assert not p.needs_wakeup()
    c.set_need_wakeup()
    assert p.needs_wakeup()
    c.clear_need_wakeup()
    assert not p.needs_wakeup()


def test_garbage_tail_far_ahead_is_clamped_and_counted() -> None:
    buf, p, c = make_ring(16, untrusted=True)
    vals = np.zeros(5, dtype=ENTRY)
    vals["off"] = np.arange(5)
    p.push(vals)
    # The producer (an app) scribbles a tail a billion entries ahead.
    words = memoryview(buf).cast("I")
    words[c.layout.tail // 4] = 1_000_000_000
    assert c.ready() == 16  # one ring's worth at most, never more
    assert c.faults == 1
    out = c.pop(1000)
    assert len(out) == 16  # in bounds: exactly the ring, garbage entries included
    assert c.faults >= 1


def test_garbage_tail_behind_head_is_clamped_and_counted() -> None:
    buf, p, c = make_ring(8, untrusted=True)
    vals = np.zeros(6, dtype=ENTRY)
    p.push(vals)
    c.pop(6)
    words = memoryview(buf).cast("I")
    words[c.layout.tail // 4] = 2  # tail moved back behind head (6)
    assert c.ready() == 8
    assert c.faults == 1


def test_head_moved_backwards_cannot_make_producer_overrun() -> None:
    """A consumer that moves head back (or far forward) cannot get us to overwrite."""
    buf, p, c = make_ring(8)
    p.untrusted = True
    vals = np.zeros(8, dtype=ENTRY)
    vals["off"] = np.arange(8)
    assert p.push(vals) == 8
    c.pop(3)
    words = memoryview(buf).cast("I")
    for bogus in (0xFFFFFF00, 100, (p.tail + 1) & U32):
        words[p.layout.head // 4] = bogus
        assert p.space() <= 8
        assert len(p.reserve(8)) <= 8
    assert p.faults == 6  # every load of an impossible head is counted (space + reserve)
    # A sane head restores normal service.
    words[p.layout.head // 4] = 3
    assert p.space() == 3


def test_consumer_ignores_scribbled_head() -> None:
    """Linux keeps the RQ's cached head private: a user writing head changes nothing."""
    buf, p, c = make_ring(8, untrusted=True)
    vals = np.zeros(4, dtype=ENTRY)
    vals["off"] = np.arange(4)
    p.push(vals)
    assert list(c.pop(2)["off"]) == [0, 1]
    words = memoryview(buf).cast("I")
    words[c.layout.head // 4] = 0  # "give me those two again"
    assert not c.check_own()
    assert c.faults == 1
    assert list(c.pop(8)["off"]) == [2, 3]
    assert words[c.layout.head // 4] == 4


def test_trusted_ring_raises_on_impossible_index() -> None:
    buf, _, c = make_ring(8)
    words = memoryview(buf).cast("I")
    words[c.layout.tail // 4] = 1000
    with pytest.raises(InvariantBroken):
        c.ready()


def test_layout_validation() -> None:
    with pytest.raises(ValueError):
        RingLayout.default(12, ENTRY)
    with pytest.raises(ValueError):
        RingLayout(nentries=4, dtype=ENTRY, head=2, tail=8, entries=64)
    with pytest.raises(ValueError):
        RingProducer(bytearray(16), RingLayout.default(4, ENTRY))


# -- two processes -------------------------------------------------------------------

BATCH = 509  # not a divisor of the ring size, so batches straddle the wrap point
TOTAL = 10_000_000


def _producer(name: str, nentries: int, total: int) -> None:
    from shared.ring import Backoff

    region = Region.attach(name)
    layout = RingLayout.default(nentries, ENTRY)
    p = RingProducer(region.buf, layout)
    sent = 0
    wait = Backoff()
    ramp = np.arange(BATCH, dtype=np.uint64)
    while sent < total:
        view = p.reserve(min(BATCH, total - sent))
        k = len(view)
        if k == 0:
            wait.idle()
            continue
        wait.reset()
        view["off"] = ramp[:k] + np.uint64(sent)
        view["len"] = k
        p.submit(k)
        sent += k
    p.detach()
    region.detach()


def _batch_in_order(offs: np.ndarray, start: int) -> bool:
    """Every entry of a consumed batch is the next one: ``start, start + 1, ...``."""
    want = np.arange(start, start + len(offs), dtype=np.uint64)
    return bool(np.array_equal(offs.astype(np.uint64, copy=False), want))


def test_batch_check_catches_a_swap_inside_a_batch() -> None:
    offs = np.arange(100, 110, dtype=np.uint64)
    assert _batch_in_order(offs, 100)
    offs[[3, 4]] = offs[[4, 3]]          # first and last still right, the checksum too
    assert not _batch_in_order(offs, 100)
    assert int(offs[0]) == 100 and int(offs[-1]) == 109


@pytest.mark.timeout(120)
def test_two_processes_move_ten_million_entries_with_checksum(run_id: str) -> None:
    from shared.ring import Backoff

    nentries = 4096
    layout = RingLayout.default(nentries, ENTRY)
    region = Region.create(region_name(run_id, "test", "ring"), layout.size)
    try:
        c = RingConsumer(region.buf, layout)
        c.init_words()
        proc = mp.get_context("fork").Process(target=_producer,
                                              args=(region.name, nentries, TOTAL))
        proc.start()
        got = 0
        checksum = 0
        in_order = True
        wait = Backoff()
        while got < TOTAL:
            view = c.peek(4096)
            k = len(view)
            if k == 0:
                if not proc.is_alive() and c.ready() == 0:
                    break
                wait.idle()
                continue
            wait.reset()
            offs = view["off"]
            # Every entry of every batch is the next one (a swap inside a batch fails it).
            in_order &= _batch_in_order(offs, got)
            checksum += int(offs.sum(dtype=np.uint64))
            c.release(k)
            got += k
        proc.join(30)
        assert proc.exitcode == 0
        assert got == TOTAL
        assert in_order
        assert checksum == TOTAL * (TOTAL - 1) // 2
        assert c.faults == 0
        c.detach()
    finally:
        region.close()
