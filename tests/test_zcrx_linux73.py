"""Linux 7.2 / 7.3 zcrx in the emulated kernel (issue 12): kernel versions as a setting, events.

Each test drives a real ``Kernel`` acting as one release (``driver_proc --kernel X.Y``, here the
``kt`` fixture of ``test_zcrx`` parametrized indirectly) through its syscall handlers, from an
app that builds the uapi structs raw with ``shared.abi`` dtypes.  liburing's ``area_add*`` cases
are named ``test_conformance_area_add_*`` so that ``-k conformance`` runs them with the checklist
of ``test_conformance``.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from typing import Any

import numpy as np
import pytest
import test_netdev as tn
from test_zcrx import (
    PAGE,
    RQ_ENTRIES,
    Bundle,
    Cqe,
    KernelThread,
    Zq,
    accept_conn,
    check_data,
    ctrl,
    ctrl_errno,
    hw_flow_conn,
    reap,
    reg_errno,
    register_raw,
    stream,
    submit_recvzc,
    wait_cqes,
    zring,
)

from app_proc import liburing as L
from app_proc import syscall as S
from app_proc import zcrx_server
from driver_proc.main import main as driver_main
from shared import abi, wire
from shared.ring import RingLayout, RingProducer

pytestmark = pytest.mark.timeout(60)

EV_UD = 0xE7E7
ALLOC_FAIL, COPY = abi.ZCRX_EVENT_ALLOC_FAIL, abi.ZCRX_EVENT_COPY
BOTH = (1 << ALLOC_FAIL) | (1 << COPY)
V71, V72, V73 = abi.KERNEL_VERSIONS


def on(*versions: tuple[int, int]) -> pytest.MarkDecorator:
    """Run the test on a kernel acting as each of ``versions``."""
    return pytest.mark.parametrize("kt", versions, indirect=True,
                                   ids=[abi.kernel_version_name(v) for v in versions])


def event_bundle(app: S.Kernel, *, type_mask: int = BOTH, stats: bool = True,
                 stats_offset: int | None = None, **kw: Any) -> Bundle:
    """The default registration plus a ``zcrx_event_desc`` at +128 of the parameter page; with
    ``stats`` the RQ region gets room for ``zcrx_stats`` right after the RQEs."""
    entries = kw.get("rq_entries", RQ_ENTRIES)
    b = Bundle.make(app, rq_mem_entries=2 * entries, **kw)
    ev = b.params.view[128:224].view(abi.zcrx_event_desc)
    ev["user_data"] = EV_UD
    ev["type_mask"] = type_mask
    if stats:
        ev["flags"] = abi.ZCRX_EVENT_DESC_FLAG_STATS
        ev["stats_offset"] = (abi.zcrx_rq_layout(entries)[3] if stats_offset is None
                              else stats_offset)
    b.reg["event_desc"] = b.params.addr + 128
    return b


def event_desc(b: Bundle) -> np.ndarray:
    out: np.ndarray = b.params.view[128:224].view(abi.zcrx_event_desc)
    return out


def stats_of(zq: Zq) -> tuple[int, int]:
    off = int(event_desc(zq.b)["stats_offset"][0])
    s = zq.mem[off:off + 16].view(abi.zcrx_stats)[0]
    return int(s["copy_count"]), int(s["copy_bytes"])


def events(cqes: list[Cqe]) -> list[int]:
    """The event types among ``cqes`` (each checked to be a plain event CQE)."""
    out = []
    for c in cqes:
        if c.ud == EV_UD:
            assert c.flags == 0 and c.off == 0, c   # 16-byte CQE, upper half of CQE32 zeroed
            out.append(c.res)
    return out


# ============================================================================================
# Kernel versions as a setting
# ============================================================================================

@on(V71, V72, V73)
def test_status_reports_the_kernel_release(kt: KernelThread, app: S.Kernel) -> None:
    assert app.syscall("status").body["kernel"] == abi.kernel_version_name(kt.kernel.zcrx.kernel)


def test_driver_proc_refuses_an_unknown_release(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("7.0", "7.4", "seven"):
        with pytest.raises(SystemExit) as ei:
            driver_main(["--kernel", bad])
        assert ei.value.code == 2
    assert "is not" in capsys.readouterr().err


@on(V71, V72)
def test_older_kernels_refuse_newer_ctrl_ops(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    b = Bundle.make(app)
    zid = int(register_raw(ring, b.reg)["zcrx_id"][0])
    newer = [abi.ZCRX_CTRL_ADD_AREA] + ([abi.ZCRX_CTRL_ARM_EVENT]
                                        if kt.kernel.zcrx.kernel < V72 else [])
    for op in newer:
        assert ctrl_errno(ring, zid, op) == errno.EOPNOTSUPP, op
    L.io_uring_queue_exit(ring)
    b.close()


@on(V71)
def test_7_1_refuses_an_event_desc_as_a_reserved_word(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    b = event_bundle(app)
    assert reg_errno(ring, b.reg) == errno.EINVAL
    assert kt.call(lambda k: k.zcrx.ifqs) == []
    L.io_uring_queue_exit(ring)
    b.close()


def _hw_starve(kt: KernelThread, app: S.Kernel, *, hard_coded: bool
               ) -> tuple[Zq, L.Ring, list[Cqe], int, Any]:
    """A hardware-queue ifq of 80 niovs with events, starved by 80 received frames, then 30
    buffers returned: through the reported offsets, or an RQ hard-coded as 0 / 4 / 64."""
    ring = zring(app)
    hw: dict[str, Any] = {"nodev": False, "if_idx": 2, "if_rxq": 1, "area_pages": 80}
    with_events = kt.kernel.zcrx.kernel >= V72
    b = event_bundle(app, stats=False, **hw) if with_events else Bundle.make(app, **hw)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    flow, fd = hw_flow_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    fr, fl, _ = flow.frames([1460] * 100)
    sent = kt.deliver(1, fr, fl)
    got: list[Cqe] = []
    while sum(c.res for c in got if c.ud != EV_UD) < sent * 1460:
        got += wait_cqes(ring)
    sent += kt.deliver(1, fr[sent:], fl[sent:])
    while sum(c.res for c in got if c.ud != EV_UD) < sent * 1460:
        got += wait_cqes(ring)
    assert sent == 80 and kt.deliver(1, fr[sent:], fl[sent:]) == 0     # starved
    got += reap(ring)
    # the provider found nothing: the event fires once (7.2+)
    assert events(got) == ([ALLOC_FAIL] if with_events else [])
    data = [c for c in got if c.ud != EV_UD]
    assert check_data(zq, data, flow.stream) == 80 * 1460
    back = sorted(c.off for c in data)[:30]             # niov 0 (offset 0) goes first
    if hard_coded:
        # What an app written for <= 7.2 does: head 0, tail 4, RQEs at 64, never looking.
        old = RingProducer(zq.mem, RingLayout(zq.entries, abi.io_uring_zcrx_rqe, head=0,
                                              tail=4, entries=64))
        e = np.zeros(len(back), dtype=abi.io_uring_zcrx_rqe)
        e["off"] = back
        assert old.push(e) == len(back)
    else:
        assert zq.give_back(back) == len(back)
    kt.call(lambda k: k.netdevs["eth0"].refill(1))
    return zq, ring, data, kt.deliver(1, fr[sent:], fl[sent:]), flow


@on(V71, V72, V73)
def test_an_app_that_reads_the_offsets_works_on_every_release(kt: KernelThread,
                                                                app: S.Kernel) -> None:
    zq, ring, _, more, flow = _hw_starve(kt, app, hard_coded=False)
    assert more == 20                                   # the returns unblocked the queue
    got: list[Cqe] = []
    while len(got) < 20:
        got += wait_cqes(ring)
    assert check_data(zq, got, flow.stream, 80 * 1460) == 20 * 1460
    assert kt.counters()["rq_returned"] >= 20
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


@on(V72, V73)
def test_an_app_hard_coding_0_4_64_breaks_on_7_3(kt: KernelThread, app: S.Kernel) -> None:
    """The bug this setting catches: on 7.2 the hard-coded RQ is the real one; on 7.3 the
    kernel reads the tail at 64 (where the app put RQE 0: niov 0, offset 0), never sees the
    returns, and the queue stays starved."""
    zq, ring, _, more, _ = _hw_starve(kt, app, hard_coded=True)
    c = kt.counters()
    if kt.kernel.zcrx.kernel < V73:
        assert more == 20 and c["rq_returned"] >= 20
    else:
        assert more == 0 and c["rq_consumed"] == 0 and c["rq_returned"] == 0
        assert c["alloc_fail"] >= 2 and c["events"] == 1   # ALLOC_FAIL stays off: not re-armed
        assert kt.ledger()["user"] == 80
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


# ============================================================================================
# Events (7.2)
# ============================================================================================

@on(V72, V73)
def test_event_desc_checks(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    rq_end = abi.zcrx_rq_layout(RQ_ENTRIES, kt.kernel.zcrx.kernel)[3]
    cases: list[tuple[dict[str, Any], int]] = [
        ({"type_mask": 1 << 2}, errno.EINVAL),                 # unknown event type
        ({"flags": 2}, errno.EINVAL),                          # unknown flag
        ({"flags": 0, "stats_offset": rq_end}, errno.EINVAL),  # offset without FLAG_STATS
        ({"__resv2": [0] * 8 + [1]}, errno.EINVAL),
        ({"stats_offset": rq_end + 4}, errno.EINVAL),          # not 8-byte aligned
        ({"stats_offset": rq_end - 16}, errno.ERANGE),         # over the RQEs
        ({"stats_offset": 1 << 20}, errno.ERANGE),             # past the region
    ]
    for fields, want in cases:
        b = event_bundle(app)
        for k, v in fields.items():
            event_desc(b)[k] = v
        assert reg_errno(ring, b.reg) == want, fields
        b.close()
    b = event_bundle(app)
    b.reg["event_desc"] = 0x1000                               # unmapped
    assert reg_errno(ring, b.reg) == errno.EFAULT
    b.close()
    assert kt.call(lambda k: k.zcrx.ifqs) == []
    L.io_uring_queue_exit(ring)


@on(V72, V73)
def test_copy_event_fires_once_until_armed_and_stats_count(kt: KernelThread,
                                                          app: S.Kernel) -> None:
    ring = zring(app)
    b = event_bundle(app)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    assert stats_of(zq) == (0, 0)
    _, fd = accept_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    # arming a type that has not fired, or an unknown type, is -EINVAL
    assert ctrl_errno(ring, zq.id, abi.ZCRX_CTRL_ARM_EVENT, arm_event_type=COPY) == errno.EINVAL
    assert ctrl_errno(ring, zq.id, abi.ZCRX_CTRL_ARM_EVENT, arm_event_type=2) == errno.EINVAL
    got: list[Cqe] = []
    sent = 0
    for rnd in range(3):
        data = stream(40000, sent, 3 * PAGE)
        kt.send(40000, data)
        sent += len(data)
        while sum(c.res for c in got if c.ud != EV_UD) < sent:
            got += wait_cqes(ring)
        got += reap(ring)
        assert events(got) == [COPY] * (1 if rnd < 2 else 2), rnd
        if rnd == 1:                                   # re-arm: the next copy fires again
            ctrl(ring, zq.id, abi.ZCRX_CTRL_ARM_EVENT, arm_event_type=COPY)
    assert ctrl_errno(ring, zq.id, abi.ZCRX_CTRL_ARM_EVENT,
                      arm_event_type=ALLOC_FAIL) == errno.EINVAL
    c = kt.counters()
    assert stats_of(zq) == (c["copy_count"], c["copy_bytes"]) and c["copy_bytes"] == sent
    assert c["events"] == 2
    data_cqes = [x for x in got if x.ud != EV_UD]
    assert check_data(zq, data_cqes, 40000) == sent
    zq.close()
    L.io_uring_queue_exit(ring)
    b.close()


@on(V73)
def test_events_on_a_cqe_mixed_ring_are_16_bytes(kt: KernelThread, app: S.Kernel) -> None:
    flags = (abi.IORING_SETUP_DEFER_TASKRUN | abi.IORING_SETUP_SINGLE_ISSUER
             | abi.IORING_SETUP_CQE_MIXED | abi.IORING_SETUP_SUBMIT_ALL)
    ring = zring(app, flags=flags)
    b = event_bundle(app, type_mask=1 << COPY, stats=False)
    zid = int(register_raw(ring, b.reg)["zcrx_id"][0])
    assert kt.call(lambda k: k.zcrx.ifqs[-1].event(COPY)) is True
    assert kt.call(lambda k: k.zcrx.ifqs[-1].event(COPY)) is False       # off until armed
    assert kt.call(lambda k: k.zcrx.ifqs[-1].event(ALLOC_FAIL)) is False  # not in the mask
    v = L.peek_cqes(ring)
    assert len(v) == 1 and int(v[0]["user_data"]) == EV_UD and int(v[0]["res"]) == COPY
    assert int(v[0]["flags"]) == 0                                # no IORING_CQE_F_32
    L.io_uring_cq_advance(ring, 1)
    ctrl(ring, zid, abi.ZCRX_CTRL_ARM_EVENT, arm_event_type=COPY)
    L.io_uring_queue_exit(ring)
    b.close()


@on(V72, V73)
def test_import_with_an_event_desc_is_einval_and_events_stay_on_the_registering_ring(
        kt: KernelThread, app: S.Kernel) -> None:
    r1, r2 = zring(app), zring(app)
    b = event_bundle(app, type_mask=1 << COPY)
    zq = Zq(r1, b, register_raw(r1, b.reg))
    box = int(ctrl(r1, zq.id, abi.ZCRX_CTRL_EXPORT)["export_zcrx_fd"][0])
    imp = np.zeros(1, dtype=abi.io_uring_zcrx_ifq_reg)
    imp["flags"] = abi.ZCRX_REG_IMPORT
    imp["if_idx"] = box
    imp["event_desc"] = b.params.addr + 128
    assert reg_errno(r2, imp) == errno.EINVAL
    imp["event_desc"] = 0
    zid2 = int(register_raw(r2, imp)["zcrx_id"][0])
    _, fd = accept_conn(kt, app, r2)
    submit_recvzc(r2, fd, zid2)
    kt.send(40000, stream(40000, 0, PAGE))
    got = wait_cqes(r2)
    assert events(got) == [] and sum(c.res for c in got) == PAGE
    assert events(wait_cqes(r1)) == [COPY]                  # on the ring that registered it
    L.io_uring_queue_exit(r1)                               # events have nowhere to go now
    ctrl(r2, zid2, abi.ZCRX_CTRL_ARM_EVENT, arm_event_type=COPY)
    kt.send(40000, stream(40000, PAGE, PAGE))
    assert sum(c.res for c in wait_cqes(r2)) == PAGE
    assert kt.counters()["events"] == 1
    app.close_fd(box)
    zq.close()
    L.io_uring_queue_exit(r2)
    b.close()


@on(V72, V73)
def test_liburing_helpers_for_events_and_stats(kt: KernelThread, app: S.Kernel) -> None:
    q = L.io_uring_query_zcrx_event(app)
    assert q is not None and int(q["event_flags"][0]) == BOTH
    ring = L.io_uring_queue_init(64, L.ZCRX_RING_FLAGS, kernel=app)
    ifq = L.io_uring_register_ifq(ring, 0, 0, rq_entries=128, area_size=64 * PAGE,
                                  flags=abi.ZCRX_REG_NODEV, events=BOTH,
                                  event_user_data=EV_UD, stats=True)
    assert ifq.stats_off is not None and ifq.stats_off >= ifq.offsets["rqes"] + 128 * 16
    assert L.io_uring_zcrx_copy_stats(ifq) == (0, 0)
    _, fd = accept_conn(kt, app, ring)
    sqe = L.io_uring_get_sqe(ring)
    assert sqe is not None
    L.io_uring_prep_recv_zc(sqe, fd, 0, ifq.zcrx_id)
    L.io_uring_submit(ring)
    kt.send(40000, stream(40000, 0, 2 * PAGE))
    seen: list[int] = []
    nbytes = 0
    while nbytes < 2 * PAGE or not seen:
        L.io_uring_wait_cqes(ring, 1, 10_000)
        v = L.peek_cqes(ring)
        seen += L.io_uring_zcrx_events(ifq, v).tolist()
        nbytes += int(v["res"][v["user_data"] != EV_UD].sum())
        L.io_uring_cq_advance(ring, len(v))
    assert seen == [COPY] and L.io_uring_zcrx_copy_stats(ifq) == (2, 2 * PAGE)
    assert L.io_uring_zcrx_arm_event(ifq, COPY) == 0
    L.io_uring_queue_exit(ring)
    assert L.io_uring_zcrx_copy_stats(ifq) is None       # unmapped with the ring


@on(V71)
def test_liburing_event_query_is_none_before_7_2(kt: KernelThread, app: S.Kernel) -> None:
    assert L.io_uring_query_zcrx_event(app) is None


# ============================================================================================
# Refill as 7.3 does it
# ============================================================================================

def _lend(k: Any, refs: list[int]) -> list[int]:
    """White box, in the kernel thread: niovs lent to the user with ``refs`` references each
    (as a copy hands one over and zero-copy frags of the same niov add more)."""
    sp = k.zcrx.ifqs[-1].space
    ids = sp.take_free(len(refs))
    sp.lend_free(ids)
    extra = np.repeat(ids, np.asarray(refs) - 1)
    sp.get_user(extra)
    out: list[int] = ids.tolist()
    return out


@on(V71, V73)
def test_refill_coalesces_runs_and_ignores_a_run_longer_than_its_refs(kt: KernelThread,
                                                                      app: S.Kernel) -> None:
    ring = zring(app)
    b = Bundle.make(app)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    a, bb, c = kt.call(lambda k: _lend(k, [2, 1, 1]))
    # A A (bad pad) B B C: a run of A within its refs, a run of B longer than its refs
    zq.give_back([a * PAGE, a * PAGE])
    zq.give_back([0], pad=1)
    zq.give_back([bb * PAGE, bb * PAGE, c * PAGE])
    n, stopped = kt.call(lambda k: k.zcrx.ifqs[-1].consume_rq(100, flush=False))
    assert (n, stopped) == (6, False)
    refs = kt.call(lambda k: k.zcrx.ifqs[-1].space.user_refs[[a, bb, c]].tolist())
    ctr = kt.counters()
    if kt.kernel.zcrx.kernel >= V73:
        assert refs == [0, 1, 0]                         # B's run was ignored whole
        assert (ctr["rq_runs_ignored"], ctr["rq_invalid_noref"], ctr["rq_returned"]) \
            == (1, 2, 3)
    else:
        assert refs == [0, 0, 0]                         # one return per RQE while refs last
        assert (ctr["rq_runs_ignored"], ctr["rq_invalid_noref"], ctr["rq_returned"]) \
            == (0, 1, 4)
    assert ctr["rq_invalid_pad"] == 1
    kt.ledger()
    zq.close()
    L.io_uring_queue_exit(ring)
    b.close()


@on(V71, V73)
def test_refill_is_capped_on_7_3(kt: KernelThread, app: S.Kernel) -> None:
    """7.3: one refill (per 64 buffers the pool needs) walks RQEs until it has its buffers or
    consumed ZCRX_REFILL_CAP RQEs, so malformed RQEs do not use up the buffers it wants but
    cannot make it walk a whole ring either.  7.1 consumes exactly as many RQEs as buffers
    are needed."""
    from driver_proc.zcrx import PP_ALLOC_CACHE_REFILL, REFILL_CAP
    assert (REFILL_CAP, PP_ALLOC_CACHE_REFILL) == (256, 64)
    ring = zring(app)
    b = Bundle.make(app, rq_entries=512)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    lent = kt.call(lambda k: _lend(k, [1] * 10))
    zq.raw_rqes([abi.area_token(1)] * 300)               # 300 RQEs of an unknown area
    zq.give_back([i * PAGE for i in lent])               # then 10 real returns
    call = lambda k: k.zcrx.ifqs[-1].consume_rq(64, flush=False)  # noqa: E731
    n, _ = kt.call(call)
    capped = kt.kernel.zcrx.kernel >= V73
    assert n == (REFILL_CAP if capped else 64)
    assert kt.counters()["refill_capped"] == int(capped)
    n2, _ = kt.call(call)
    assert n2 == (310 - REFILL_CAP if capped else 64)
    if capped:                                           # the real returns made it
        assert zq.queued() == 0 and kt.counters()["rq_returned"] == 10
    # walking on stops at the RQE that gave the last buffer wanted
    lent = kt.call(lambda k: _lend(k, [1] * 4))
    zq.raw_rqes([abi.area_token(1)] * 5)
    zq.give_back([i * PAGE for i in lent])
    n3, _ = kt.call(lambda k: k.zcrx.ifqs[-1].consume_rq(2, flush=False))
    assert n3 == (7 if capped else 2)
    zq.close()
    L.io_uring_queue_exit(ring)
    b.close()


# ============================================================================================
# CVE-2026-43121: returns racing the ring's close
# ============================================================================================

def _audit(k: Any) -> int:
    """In the kernel thread: every ledger sums and every invariant holds (a niov on the
    freelist twice, or FREE while referenced, raises); returns the live ifqs."""
    k.zcrx.check_ledger()
    for dev in k.netdevs.values():
        dev.check_ledger()
    for ifq in k.zcrx.ifqs:
        assert sum(ifq.ledger().values()) == ifq.area.count
    return len(k.zcrx.ifqs)


@pytest.mark.parametrize("seed", range(8))
def test_returns_racing_ring_close_never_free_a_niov_twice(kt: KernelThread, app: S.Kernel,
                                                          seed: int) -> None:
    """The scrub (ring close) and the refill both drop user references; CVE-2026-43121 was a
    check-then-decrement race between them that freed one niov twice.  Our kernel is one
    thread, so the interleaving is of whole steps, seeded: frames, reaps, returns (fresh,
    stale and duplicated ones, and returns written after the close), refills, and the ring's
    close at a random step.  After every step the ledgers sum and no niov is free twice."""
    rng = np.random.default_rng(seed)
    ring = zring(app)
    b = Bundle.make(app, nodev=False, if_idx=2, if_rxq=1, area_pages=80)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    flow, fd = hw_flow_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    fr, fl, _ = flow.frames([1460] * 600)
    sent, held, stale = 0, [], []
    close_at = int(rng.integers(3, 25))
    closed = False
    for step in range(30):
        if step == close_at:
            L.io_uring_queue_exit(ring)                  # scrub: every user reference revoked
            closed = True
        op = int(rng.integers(4))
        if op == 0 and sent < len(fr):
            k = int(rng.integers(1, 40))
            sent += kt.deliver(1, fr[sent:sent + k], fl[sent:sent + k])
        elif op == 1 and not closed:
            held += [c.off for c in reap(ring) if c.res > 0 and c.ud != EV_UD]
        elif op == 2 and (held or stale):
            pick = [held.pop(int(rng.integers(len(held))))
                    for _ in range(min(len(held), int(rng.integers(1, 20))))]
            again = [stale[int(i)] for i in rng.integers(0, len(stale), 3)] if stale else []
            offs = pick + again + pick[:2]               # stale and duplicated returns too
            room = zq.entries - zq.queued()
            zq.give_back(offs[:room])
            stale += pick
        elif op == 3:
            kt.call(lambda k: k.netdevs["eth0"].refill(1))
        kt.call(_audit)
    if not closed:
        L.io_uring_queue_exit(ring)
    zq.give_back(held[:zq.entries - zq.queued()])       # after the close: nobody reads them
    kt.call(_audit)
    zq.close()
    app.close_fd(fd)
    kt.wait_for(lambda k: _audit(k) == 0)               # the area came home and was released
    # every user reference a CQE handed out came back exactly once: returned or scrubbed
    r = kt.call(lambda k: dict(k.zcrx.retired))
    assert r["zc_cqes"] + r["copy_count"] == r["rq_returned"] + r["scrubbed_refs"] > 0
    b.close()


# ============================================================================================
# Several areas per ifq (7.3)
# ============================================================================================

F_MORE = abi.IORING_CQE_F_MORE


def add_area(ring: L.Ring, zid: int, app: S.Kernel, pages: int = 16, *,
             mem: S.Memory | None = None, **area: Any) -> tuple[int, S.Memory, S.Memory]:
    """ZCRX_CTRL_ADD_AREA of ``pages`` pages of fresh app memory (or ``mem``); ``area``
    overrides area_reg fields.  Returns ``(errno or 0, area memory, param page)``; the token
    is in the param page's ``rq_area_token``."""
    mem = mem if mem is not None else app.alloc_memory(pages * PAGE, tag="area2")
    params = app.alloc_memory(PAGE, tag="addarea")
    reg = params.view[:48].view(abi.io_uring_zcrx_area_reg)
    reg["addr"] = mem.addr
    reg["len"] = pages * PAGE
    for k, v in area.items():
        reg[k] = v
    return ctrl_errno(ring, zid, abi.ZCRX_CTRL_ADD_AREA, add_area_ptr=params.addr), mem, params


def token_of(params: S.Memory) -> int:
    return int(params.view[16:24].view("<u8")[0])


def area_of(zq: Zq, areas: dict[int, Any], off: int, n: int) -> bytes:
    """The ``n`` bytes a CQE ``off`` points at, in whichever area its token names."""
    a = off >> abi.IORING_ZCRX_AREA_SHIFT
    start = off & ((1 << abi.IORING_ZCRX_AREA_SHIFT) - 1)
    mem = zq.b.area if a == 0 else areas[a]
    return mem.view[start:start + n].tobytes()


@on(V73)
def test_conformance_area_add_invalid(kt: KernelThread, app: S.Kernel,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ring = zring(app)
    b = Bundle.make(app)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    bad: list[tuple[dict[str, Any], int]] = [
        ({"addr": 0}, errno.EFAULT),                        # NULL address
        ({"len": 0}, errno.EFAULT),
        ({"len": 1}, errno.EINVAL),
        ({"len": (1 << 64) - 1}, errno.EFAULT),
        ({"rq_area_token": 1 << 48}, errno.EINVAL),         # an input token
        ({"flags": abi.IORING_ZCRX_AREA_DMABUF}, errno.EINVAL),   # dmabuf with user memory
        ({"__resv2": [0, 1]}, errno.EINVAL),
    ]
    for fields, want in bad:
        err, mem, params = add_area(ring, zq.id, app, **fields)
        assert err == want, fields
        mem.close()
        params.close()
    assert ctrl_errno(ring, zq.id, abi.ZCRX_CTRL_ADD_AREA, add_area_ptr=0x1000) == errno.EFAULT
    assert ctrl_errno(ring, zq.id, abi.ZCRX_CTRL_ADD_AREA, add_area_ptr=0,
                      add_area_resv=[0, 0, 0, 0, 1]) == errno.EINVAL
    # a read-only area_reg: the token cannot be written back, nothing is made
    mem = app.alloc_memory(4 * PAGE, tag="a")
    params = app.alloc_memory(PAGE, tag="p")
    reg = params.view[:48].view(abi.io_uring_zcrx_area_reg)
    reg["addr"], reg["len"] = mem.addr, 4 * PAGE
    app.mm_protect(params.addr, PAGE, L.PROT_READ)
    assert ctrl_errno(ring, zq.id, abi.ZCRX_CTRL_ADD_AREA,
                      add_area_ptr=params.addr) == errno.EFAULT
    assert kt.call(lambda k: len(k.zcrx.ifqs[-1].areas)) == 1
    # at most ZCRX_MAX_AREAS areas (1024; 3 here to keep the test small)
    monkeypatch.setattr(abi, "ZCRX_MAX_AREAS", 3)
    for _ in range(2):
        assert add_area(ring, zq.id, app, 4)[0] == 0
    assert add_area(ring, zq.id, app, 4)[0] == errno.EINVAL
    assert kt.call(lambda k: len(k.zcrx.ifqs[-1].areas)) == 3
    kt.ledger()
    zq.close()
    L.io_uring_queue_exit(ring)
    assert kt.call(lambda k: k.zcrx.ifqs) == []
    b.close()


@on(V73)
def test_conformance_area_add_doubles_what_can_be_received_without_returns(
        kt: KernelThread, app: S.Kernel) -> None:
    """liburing's area_add: the second area's token differs from the first; twice the area
    can be received without returns; once more ends with -ENOMEM."""
    pages = 32
    ring = zring(app)
    b = Bundle.make(app, area_pages=pages)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    err, mem2, params = add_area(ring, zq.id, app, pages)
    assert err == 0 and token_of(params) == 1 << 48 != int(b.area_reg["rq_area_token"][0])
    _, fd = accept_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    kt.send(40000, stream(40000, 0, 2 * pages * PAGE))
    got: list[Cqe] = []
    while sum(c.res for c in got) < 2 * pages * PAGE:
        got += wait_cqes(ring)
    pos = 0
    for c in got:
        assert c.flags & F_MORE
        assert area_of(zq, {1: mem2}, c.off, c.res) == stream(40000, pos, c.res)
        pos += c.res
    assert {c.off >> 48 for c in got} == {0, 1}
    st = kt.call(lambda k: k.zcrx.stats()["ifqs"][0])
    assert st["areas"] == 2 and st["niovs"] == 2 * pages
    assert [a["ledger"]["user"] for a in st["area_ledgers"]] == [pages, pages]
    kt.send(40000, stream(40000, pos, PAGE))              # once more: no niov anywhere
    [final] = wait_cqes(ring)
    assert (final.res, final.flags) == (-errno.ENOMEM, 0)
    zq.close()
    L.io_uring_queue_exit(ring)                          # teardown scrubs every area
    assert kt.call(lambda k: k.zcrx.ifqs) == []
    assert kt.call(lambda k: k.zcrx.retired["scrubbed_refs"]) == 2 * pages
    b.close()
    mem2.close()


@on(V73)
def test_conformance_area_add_refill_returns_niovs_to_their_area(kt: KernelThread,
                                                                 app: S.Kernel) -> None:
    pages = 8
    ring = zring(app)
    b = Bundle.make(app, area_pages=pages)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    assert add_area(ring, zq.id, app, pages)[0] == 0
    _, fd = accept_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    sent = 0
    for _ in range(5):                                   # 5 x 12 pages through 16 niovs
        kt.send(40000, stream(40000, sent, 12 * PAGE))
        sent += 12 * PAGE
        got: list[Cqe] = []
        while sum(c.res for c in got) < 12 * PAGE:
            got += wait_cqes(ring)
        zq.rq.push(_rqes([c.off for c in got]))          # tokens as the CQEs gave them
        zq.flush()
        led = kt.call(lambda k: [a["ledger"] for a in k.zcrx.ifqs[0].area_ledgers()])
        assert [x["free"] for x in led] == [pages, pages]
    c = kt.counters()
    assert c["rq_returned"] == 60 and c["rq_invalid_area"] == 0 and c["copy_bytes"] == sent
    zq.raw_rqes([2 << 48])                               # an area that does not exist
    zq.flush()
    assert kt.counters()["rq_invalid_area"] == 1
    zq.close()
    L.io_uring_queue_exit(ring)
    b.close()


def _rqes(offs: list[int]) -> np.ndarray:
    e = np.zeros(len(offs), dtype=abi.io_uring_zcrx_rqe)
    e["off"] = offs
    return e


@on(V73)
def test_conformance_area_add_concurrent_from_an_importing_process(
        kt: KernelThread, app: S.Kernel, run_id: str, tmp_path: Any) -> None:
    """liburing's area_add_concurrent: while traffic flows on one process's ring, another
    process that imported the ifq adds 128 areas of its own memory from its own thread; the
    data stays intact (some of it lands in the added areas) and the ledgers sum.  The
    export box goes to the importer as SCM_RIGHTS would move it (out of one file table,
    into the other), which the test does in the kernel thread."""
    ring = zring(app)
    b = Bundle.make(app, area_pages=4)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    box = int(ctrl(ring, zq.id, abi.ZCRX_CTRL_EXPORT)["export_zcrx_fd"][0])
    imp_app = S.Kernel(tmp_path, run=run_id, name="zcrx-importer")
    imp_app.attach()
    t1, t2 = app.task, imp_app.task
    box2 = kt.call(lambda k: k.ctx.tasks.by_tid(t2).install(k.ctx.tasks.by_tid(t1).remove(box)))
    r2 = zring(imp_app)
    imp = np.zeros(1, dtype=abi.io_uring_zcrx_ifq_reg)
    imp["flags"] = abi.ZCRX_REG_IMPORT
    imp["if_idx"] = box2
    zid2 = int(register_raw(r2, imp)["zcrx_id"][0])
    big = imp_app.alloc_memory(128 * 2 * PAGE, tag="areas")   # the importer's memory
    added: list[int] = []
    failed: list[BaseException] = []

    def importer() -> None:                  # the importing process's thread
        try:
            params = imp_app.alloc_memory(PAGE, tag="p")
            reg = params.view[:48].view(abi.io_uring_zcrx_area_reg)
            for i in range(128):
                reg["addr"], reg["len"], reg["rq_area_token"] = big.addr + i * 2 * PAGE, \
                    2 * PAGE, 0
                assert ctrl_errno(r2, zid2, abi.ZCRX_CTRL_ADD_AREA,
                                  add_area_ptr=params.addr) == 0
                added.append(token_of(params) >> 48)
                time.sleep(0.001)
            params.close()
        except BaseException as exc:  # surfaced by the test
            failed.append(exc)

    th = threading.Thread(target=importer, name="importer")
    th.start()
    _, fd = accept_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    areas = {a: _Slice(big, (a - 1) * 2 * PAGE) for a in range(1, 129)}
    kt.wait_for(lambda k: k.zcrx.ifqs[0].niovs > 4)        # an area to spill into
    sent = pos = 0
    held: list[Cqe] = []
    in_added = 0
    while th.is_alive() or sent < 64 * PAGE:
        kt.send(40000, stream(40000, sent, 3 * PAGE))        # 3 pages while 3 are held
        sent += 3 * PAGE
        got: list[Cqe] = []
        while pos + sum(c.res for c in got) < sent:
            got += wait_cqes(ring)
        for c in got:
            assert c.flags & F_MORE, c
            assert area_of(zq, areas, c.off, c.res) == stream(40000, pos, c.res)
            pos += c.res
            in_added += c.off >> 48 != 0
        zq.rq.push(_rqes([c.off for c in held]))            # give back the round before
        zq.flush()
        held = got
        kt.ledger()
    th.join(20)
    assert not failed, failed
    assert added == list(range(1, 129)) and in_added > 0
    assert kt.call(lambda k: k.zcrx.ifqs[0].niovs) == 4 + 128 * 2
    kt.ledger()
    app.close_fd(fd)
    zq.close()
    L.io_uring_queue_exit(ring)
    L.io_uring_queue_exit(r2)                                # the box's hold goes with it
    imp_app.close_fd(box2)
    kt.wait_for(lambda k: k.zcrx.ifqs == [])
    big.close()
    imp_app.close()
    b.close()


class _Slice:
    """A window of app memory standing in for an area's own mapping (``view`` from ``off``)."""

    def __init__(self, mem: S.Memory, off: int) -> None:
        self.view = mem.view[off:]


@on(V73)
def test_conformance_area_add_on_a_hardware_queue_is_dma_mapped_and_unmapped(
        kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    b = Bundle.make(app, nodev=False, if_idx=2, if_rxq=1)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    err, mem2, params = add_area(ring, zq.id, app, 8)
    assert err == 0 and token_of(params) == 1 << 48
    maps = [c for t, c in kt.nic.calls if t == "nic.dma_map"]
    assert maps[-1]["name"] == mem2.name
    ids = kt.call(lambda k: [a.map_id for a in k.zcrx.ifqs[0].areas])
    assert None not in ids and len(set(ids)) == 2
    zq.close()
    L.io_uring_queue_exit(ring)
    kt.wait_for(lambda k: k.zcrx.ifqs == [])
    unmapped = {c.get("map_id", c.get("id")) for t, c in kt.nic.calls if t == "nic.dma_unmap"}
    assert set(ids) <= unmapped                            # every area unmapped at teardown
    b.close()
    mem2.close()


def _area_ledgers(kt: KernelThread) -> list[dict[str, int]]:
    """Each area's ledger, after every ledger check (zcrx and the netdev) passed."""
    kt.ledger()
    return kt.call(lambda k: [a["ledger"] for a in k.zcrx.ifqs[0].area_ledgers()])


@on(V73)
def test_hardware_queue_receives_into_an_added_area(kt: KernelThread, app: S.Kernel) -> None:
    """Linux 7.3's page pool walks every area: a hardware queue that starved on its first
    area (80 niovs, none returned) is fed by an area added while it runs, the NIC writes
    into it through that area's own DMA mapping, the CQEs carry its token, returns go back
    to each niov's own area, and teardown scrubs both."""
    ring = zring(app)
    b = Bundle.make(app, nodev=False, if_idx=2, if_rxq=1, area_pages=80)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    flow, fd = hw_flow_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    seg = 1460
    fr, fl, _ = flow.frames([seg] * 300)
    got: list[Cqe] = []
    areas: dict[int, Any] = {}

    def receive(upto: int) -> None:
        """Take CQEs until ``upto`` frames arrived, each read in place (in whichever area
        its token names) before anything is given back: byte-exact."""
        pos = sum(c.res for c in got)
        while pos < upto * seg:
            for c in wait_cqes(ring):
                assert c.flags & F_MORE and c.res == seg and c.off % PAGE == 0
                assert area_of(zq, areas, c.off, c.res) == stream(flow.stream, pos, c.res)
                pos += c.res
                got.append(c)

    sent = kt.deliver(1, fr, fl)                          # the 64 posted niovs of area 0
    receive(sent)
    sent += kt.deliver(1, fr[sent:], fl[sent:])           # the 16 refilled ones
    receive(sent)
    assert sent == 80 and kt.deliver(1, fr[sent:], fl[sent:]) == 0   # starved
    err, mem2, params = add_area(ring, zq.id, app, 96)
    assert err == 0 and token_of(params) == 1 << 48
    areas[1] = mem2
    kt.call(lambda k: k.netdevs["eth0"].refill(1))        # the pool draws from area 1 now
    a0, a1 = _area_ledgers(kt)
    assert a0["user"] == 80 and a1["posted"] == 64 and a1["free"] == 32
    desc = kt.call(lambda k: k.netdevs["eth0"].queues[1].desc[:64].copy())
    area1_map = kt.call(lambda k: k.zcrx.ifqs[0].areas[1].map_id)
    assert {abi.iova_map_id(int(i)) for i in desc["iova"]} == {area1_map}
    sent += kt.deliver(1, fr[sent:], fl[sent:])
    receive(sent)
    sent += kt.deliver(1, fr[sent:], fl[sent:])
    receive(sent)
    assert sent == 80 + 96                                # every niov of both areas
    a0, a1 = _area_ledgers(kt)
    assert (a0["user"], a1["user"]) == (80, 96)           # area 1's niovs given to the user
    assert [c.off >> 48 for c in got] == [0] * 80 + [1] * 96
    # return 40 niovs of area 0 then 48 of area 1 (tokens as the CQEs gave them): the
    # refill takes the 64 it needs, each back into its own area's ledger, through the pool
    back = [c.off for c in got[:40]] + [c.off for c in got[80:128]]
    zq.rq.push(_rqes(back))
    kt.call(lambda k: k.netdevs["eth0"].refill(1))
    a0, a1 = _area_ledgers(kt)
    assert (a0["user"], a1["user"]) == (40, 96 - 24)
    assert (a0["posted"], a1["posted"]) == (40, 24) and a0["free"] == a1["free"] == 0
    c = kt.counters()
    assert c["rq_returned"] == 64 and c["rq_invalid_area"] == 0 and c["copy_count"] == 0
    sent += kt.deliver(1, fr[sent:], fl[sent:])
    receive(sent)
    while sent < 300:                                     # the rest, returning as we go
        new = got[-20:]
        zq.rq.push(_rqes([x.off for x in new]))
        kt.call(lambda k: k.netdevs["eth0"].refill(1))
        took = kt.deliver(1, fr[sent:], fl[sent:])
        sent += took
        receive(sent)
    assert sum(x.res for x in got) == 300 * seg and len({x.off >> 48 for x in got[176:]}) == 2
    held = sum(led["user"] for led in _area_ledgers(kt))
    zq.close()
    L.io_uring_queue_exit(ring)                           # teardown scrubs every area
    kt.wait_for(lambda k: k.zcrx.ifqs == [] and k.zcrx.bound == {})
    r = kt.call(lambda k: dict(k.zcrx.retired))
    assert r["scrubbed_refs"] == held > 0
    assert r["zc_cqes"] == 300 and r["zc_cqes"] == r["rq_returned"] + r["scrubbed_refs"]
    st = kt.call(lambda k: k.netdevs["eth0"].status()["rx_queues"][1])
    assert st["binding"] == "none" and st["posted"] == 64
    kt.call(lambda k: k.netdevs["eth0"].check_ledger())
    b.close()
    mem2.close()
    params.close()


# ============================================================================================
# zcrx-server --grow: events and several areas together (7.3)
# ============================================================================================

def _server(app: S.Kernel, argv: list[str]) -> tuple[threading.Thread, dict[str, Any]]:
    """``zcrx_server.main(argv)`` in a thread of this app; returns once it listens."""
    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result["code"] = zcrx_server.main(argv, kernel=app)
        except BaseException as exc:  # surfaced by the test
            result["exc"] = exc

    t = threading.Thread(target=go, name="zcrx_server")
    t.start()
    return t, result


@on(V73)
def test_server_grows_its_area_on_alloc_fail(kt: KernelThread, app: S.Kernel,
                                            tmp_path: Any) -> None:
    """``--grow``: a server on hardware queue 1 with an 80-niov area gets ALLOC_FAIL while a
    600-frame stream arrives, adds areas (ZCRX_CTRL_ADD_AREA) up to MAX and re-arms; the
    queue's page pool draws from the added areas (their niovs reach the server), the
    stream arrives byte-exact and the ledger shows the niovs of every area."""
    n, seg = 600, 1460
    out = tmp_path / "zc.json"
    t, result = _server(app, ["-p", str(tn.DPORT), "-q", "1", "-S", "320K", "--grow", "1M",
                              "-R", "128", "-C", "512", "-v", "--stream-id", "3",
                              "-s", str(n * seg), "-n", "1", "--json", str(out),
                              "--seconds", "40"])
    kt.wait_for(lambda k: any(q.provider is not None for q in k.zcrx.ifqs)
                and any(getattr(sf, "is_listening", False)
                        for task in k.ctx.tasks for sf in task.files.values()))
    flow = tn.Flow()
    for flags in (wire.TCP_SYN, wire.TCP_ACK):
        fr, fl, _ = flow.frames([0], flags)
        assert kt.deliver(1, fr, fl) == 1
    fr, fl, _ = flow.frames([seg] * n)

    def burst(k: Any) -> int:
        """Deliver and poll three times in one go: the server cannot return anything in
        between (its wait for CQEs is a syscall this thread answers later), so the pool
        runs dry for sure and ALLOC_FAIL fires."""
        took = 0
        for _ in range(3):
            took += kt.nic.deliver(1, fr[took:], fl[took:])
            k.poll()
        return took

    sent, ledgers, added_user = kt.call(burst), [], 0
    deadline = time.monotonic() + 40
    while sent < n and time.monotonic() < deadline:
        took = kt.deliver(1, fr[sent:], fl[sent:])
        sent += took
        if not took:                                      # starved: wait for returns
            time.sleep(0.002)
            kt.call(lambda k: k.netdevs["eth0"].refill(1))
        led = kt.call(lambda k: k.zcrx.ifqs[0].area_ledgers() if k.zcrx.ifqs else [])
        if len(led) > len(ledgers):
            ledgers = led
        # the queue receives into the added areas: their niovs are handed to the server
        added_user = max(added_user, sum(a["ledger"]["user"] for a in led[1:]))
    t.join(40)
    assert not t.is_alive() and result == {"code": 0}, result
    rep = json.loads(out.read_text())
    z = rep["zcrx"]
    assert rep["ok"] and rep["bytes"] == n * seg          # byte-exact (-v and the total)
    assert z["events"]["ALLOC_FAIL"] >= 1 and z["areas"] >= 2
    assert z["area_bytes"] == (80 + 80 * (z["areas"] - 1)) * PAGE or z["area_bytes"] == 1 << 20
    assert len(ledgers) >= 2 and ledgers[0]["niovs"] == 80 and added_user > 0
    for a in ledgers:                                     # niovs per area, each ledger sums
        assert sum(a["ledger"].values()) == a["niovs"] > 0
    kt.wait_for(lambda k: k.zcrx.ifqs == [])


@on(V73)
def test_stats_ledger_prints_a_row_per_area(kt: KernelThread, app: S.Kernel,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``zcrx stats --ledger`` (what the kernel's ``stats`` reply says): an ifq with several
    areas gets one row per area under it, with that area's niovs."""
    from launch import cli
    ring = zring(app)
    b = Bundle.make(app, area_pages=8)
    zq = Zq(ring, b, register_raw(ring, b.reg))
    cli._ledger({"zcrx": kt.call(lambda k: k.zcrx.stats())}, False)
    assert ".a0" not in capsys.readouterr().out           # one area: the ifq row says it
    err, mem2, _ = add_area(ring, zq.id, app, 4)
    assert err == 0
    cli._ledger({"zcrx": kt.call(lambda k: k.zcrx.stats())}, False)
    text = capsys.readouterr().out
    rows = [ln.split() for ln in text.splitlines() if ".a" in ln]
    serial = kt.call(lambda k: k.zcrx.ifqs[0].serial)
    assert [r[1] for r in rows] == [f"{serial}.a0", f"{serial}.a1"], text
    assert [r[-2] for r in rows] == ["8", "4"], text       # niovs of each area
    zq.close()
    L.io_uring_queue_exit(ring)
    b.close()
    mem2.close()
