"""RECV_ZC rounds taken as one numpy batch give what turn-by-turn processing gives.

``Zcrx.poll`` runs rounds of requeued RECV_ZC requests, each taking a turn of up to 20 skbs
(``IO_SKBS_PER_CALL_LIMIT``).  With ``Zcrx.batch_rounds`` the plain turns of a round are taken
together (``Zcrx._turns``); these tests run the same traffic through two fresh kernels, one
batching and one taking every turn by itself, and compare the CQE streams byte for byte (user
data, res, flags, zcrx off), every ifq counter and the bytes read in place.  Traffic comes in
through the fake NIC on hardware queues (zero copy); data is all queued on the sockets before
the requests are submitted and the app reaps only once the kernel has nothing requeued, so
the kernel's work does not depend on thread timing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_netdev as tn
import test_zcrx as tz
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app_proc import liburing as L
from app_proc import syscall as S
from driver_proc.kernel import Kernel
from driver_proc.tcp import flow_key
from shared import abi, pattern, wire

pytestmark = pytest.mark.timeout(300)

#: ifq counters that count the kernel loop's refill attempts while the queue is starved (the
#: area is smaller than the data queued): they follow the loop's timing, not RECV_ZC
LOOP_TIMED = {"alloc_calls", "alloc_fail"}
#: niovs per ifq: room for every frame of a queue's flows (at most MAX_FRAMES) plus the
#: buffers posted to the NIC
AREA_PAGES = 320
MAX_FRAMES = 240
#: frames per NIC delivery (the fake NIC's rings hold 64)
BURST = 24


@dataclass
class Flow:
    queue: int            # hardware queue its frames arrive on
    lens: list[int]       # payload bytes of each segment
    limit: int = 0        # the RECV_ZC's len (0: unlimited)


@dataclass
class Outcome:
    cqes: list[tuple[int, int, int, int]]
    counters: list[dict[str, int]]
    batched: int          # turns taken batched
    ahead: int            # rounds taken several at once


def _scenario(tmp: Path, flows: list[Flow], order: list[int], cq_entries: int,
              two_rings: bool, batch: bool) -> Outcome:
    """One fresh kernel and app: connect ``flows``, queue all their data on the sockets,
    submit one RECV_ZC per flow (in ``order``, one submission per ring), let the kernel run
    until nothing is requeued, reap."""
    run_id = f"t-{secrets.token_hex(4)}"
    rundir = tmp / ("batch" if batch else "turns")
    rundir.mkdir()
    kt = tz.KernelThread(run_id, rundir)
    app = S.Kernel(rundir, run=run_id, name="rounds")
    app.attach()
    try:
        kt.call(lambda k: setattr(k.zcrx, "batch_rounds", batch))
        rings = [tz.zring(app, 8, cq_entries=cq_entries)]
        if two_rings:
            rings.append(tz.zring(app, 8, cq_entries=cq_entries))
        ring_of_q = {0: rings[0], 1: rings[-1]}
        zqs = {q: tz.setup_zcrx(app, ring_of_q[q], nodev=False, if_idx=2, if_rxq=q,
                                area_pages=AREA_PAGES) for q in (0, 1)}
        lfd = app.listen_tcp(tn.DPORT)
        wflows = [tn.Flow(sport=40000 + i, stream=7 + i) for i in range(len(flows))]
        fds = []
        for f, wf in zip(flows, wflows, strict=True):
            sqe = L.io_uring_get_sqe(rings[0])
            assert sqe is not None
            L.io_uring_prep_accept(sqe, lfd)
            sqe["user_data"] = tz.UD_ACCEPT
            L.io_uring_submit(rings[0])
            for flags in (wire.TCP_SYN, wire.TCP_ACK):
                fr, fl, _ = wf.frames([0], flags)
                assert kt.deliver(f.queue, fr, fl) == 1
            [c] = tz.wait_cqes(rings[0])
            assert c.ud == tz.UD_ACCEPT and c.res > 0
            fds.append(c.res)
        keys = [flow_key(tn.SENDER, 40000 + i, tn.LOCAL, tn.DPORT) for i in range(len(flows))]
        total = [sum(f.lens) for f in flows]

        def queued(k: Kernel) -> list[int]:
            out = []
            for key in keys:
                conn = k.table.lookup(key)
                out.append(conn.rxq.nbytes if conn is not None else -1)
            return out

        # the data, a burst at a time per queue, each taken by NAPI before the next
        for i, (f, wf) in enumerate(zip(flows, wflows, strict=True)):
            for s in range(0, len(f.lens), BURST):
                fr, fl, _ = wf.frames(f.lens[s:s + BURST])
                assert kt.deliver(f.queue, fr, fl) == len(fl)
                want = sum(f.lens[:s + BURST])
                kt.wait_for(lambda k, i=i, want=want: queued(k)[i] == want)
        assert kt.call(queued) == total
        # one RECV_ZC per flow, one submission per ring
        for i in order:
            ring = ring_of_q[flows[i].queue]
            sqe = L.io_uring_get_sqe(ring)
            assert sqe is not None
            sqe["opcode"] = abi.IORING_OP_RECV_ZC
            sqe["fd"] = fds[i]
            sqe["ioprio"] = abi.IORING_RECV_MULTISHOT
            sqe["zcrx_ifq_idx"] = zqs[flows[i].queue].id
            sqe["user_data"] = 0x100 + i
            sqe["len"] = flows[i].limit
        for ring in rings:
            L.io_uring_submit(ring)
        kt.wait_for(lambda k: not k.zcrx._requeued)
        cqes = []
        for ring in rings:
            cqes += [(c.ud, c.res, c.flags, c.off) for c in tz.reap(ring)]
        # every byte read in place is the flow's stream, in order
        for i, f in enumerate(flows):
            pos = 0
            for ud, res, _, off in cqes:
                if ud == 0x100 + i and res > 0:
                    assert zqs[f.queue].area_bytes(off, res) == pattern.pattern_bytes(
                        7 + i, pos, res)
                    pos += res
        counters = [kt.counters(kt.call(lambda k, q=q: k.zcrx.ifqs[q].serial))
                    for q in (0, 1)]
        batched = int(kt.call(lambda k: k.zcrx.batched_turns))
        ahead = int(kt.call(lambda k: k.zcrx.batched_rounds))
        for zq in zqs.values():
            zq.close()
        for ring in rings:
            L.io_uring_queue_exit(ring)
        for zq in zqs.values():
            zq.b.close()
        return Outcome(cqes, counters, batched, ahead)
    finally:
        app.close()
        kt.close()


def _compare(tmp: Path, flows: list[Flow], order: list[int], cq_entries: int,
             two_rings: bool) -> Outcome:
    turns = _scenario(tmp, flows, order, cq_entries, two_rings, batch=False)
    batched = _scenario(tmp, flows, order, cq_entries, two_rings, batch=True)
    assert turns.batched == 0 and turns.ahead == 0
    assert batched.cqes == turns.cqes
    diff = [(q, c, t[c], b[c]) for q, (t, b) in enumerate(zip(turns.counters, batched.counters,
                                                              strict=True)) for c in t
            if t[c] != b.get(c) and c not in LOOP_TIMED]
    assert not diff
    return batched


def _fresh(tmp_path: Path) -> Path:
    d = tmp_path / secrets.token_hex(4)
    d.mkdir()
    return d


def test_round_of_many_sockets_is_one_batch_with_the_same_cqes(tmp_path: Path) -> None:
    """Four flows on two queues, one ring: turns of 20 interleave exactly as turn by turn,
    and most of the turns were taken batched."""
    flows = [Flow(1, [1000] * 70), Flow(0, [1448] * 45), Flow(1, [700] * 25),
             Flow(0, [100 + i for i in range(52)])]
    out = _compare(tmp_path, flows, [0, 1, 2, 3], 1024, False)
    uds = [c[0] for c in out.cqes]
    runs = [uds[0]]
    for u in uds[1:]:
        if u != runs[-1]:
            runs.append(u)
    # issue: 20 each; then rounds of 20 while data lasts
    assert runs[:8] == [0x100, 0x101, 0x102, 0x103] * 2
    assert out.batched >= 4
    assert sum(c[1] for c in out.cqes) == sum(sum(f.lens) for f in flows)
    assert sum(c["recv_requeues"] for c in out.counters) == 3 + 2 + 1 + 2


def test_several_rounds_in_one_batch_give_the_same_cqes(tmp_path: Path) -> None:
    """Four long flows on one ring: whole rounds are taken several at once (Zcrx._rounds),
    the last flow standing folds its remaining turns, and the stream is turn-by-turn's."""
    flows = [Flow(1, [1000] * 110), Flow(0, [1448] * 100), Flow(1, [300] * 90, 300 * 85),
             Flow(0, [64 + i for i in range(105)])]
    out = _compare(tmp_path, flows, [3, 1, 0, 2], 4096, False)
    assert out.ahead >= 2
    assert sum(c[1] for c in out.cqes if c[1] > 0) == sum(
        f.limit or sum(f.lens) for f in flows)


def test_cq_full_mid_round_ends_that_request_with_enospc_as_turn_by_turn(
        tmp_path: Path) -> None:
    """A CQ too small for the round: the member that does not fit takes its own turn and
    ends with -ENOSPC; the streams match."""
    flows = [Flow(1, [500] * 60), Flow(0, [500] * 60), Flow(1, [500] * 60)]
    out = _compare(tmp_path, flows, [2, 0, 1], 64, False)
    assert any(c[1] == -28 for c in out.cqes)  # ENOSPC


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@example(data=None)
def test_batched_rounds_match_turn_by_turn(tmp_path: Path, data: Any) -> None:
    if data is None:  # a fixed case: two rings, uneven flows
        flows = [Flow(0, [1448] * 41, 1448 * 30), Flow(1, [64] * 90, 64 * 200),
                 Flow(0, [1] * 21)]
        order, cq, two = [1, 0, 2], 256, True
    else:
        nflows = data.draw(st.integers(2, 6), label="flows")
        flows = []
        used = {0: 0, 1: 0}
        for _ in range(nflows):
            q = data.draw(st.integers(0, 1))
            room = MAX_FRAMES - used[q]
            if room < 1:
                q = 1 - q
                room = MAX_FRAMES - used[q]
            n = data.draw(st.integers(1, min(room, 120)))
            used[q] += n
            size = st.integers(1, 1448)
            lens = data.draw(st.one_of(size.map(lambda v, n=n: [v] * n),
                                       st.lists(size, min_size=n, max_size=n)))
            limit = data.draw(st.one_of(st.just(0), st.integers(1, sum(lens) + 10)))
            flows.append(Flow(q, lens, limit))
        order = data.draw(st.permutations(list(range(nflows))))
        cq = data.draw(st.sampled_from([32, 128, 2048]))
        two = data.draw(st.booleans())
    _compare(_fresh(tmp_path), flows, list(order), cq, two)
