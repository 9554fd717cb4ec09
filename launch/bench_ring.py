"""``zcrx bench ring``: what the shared ring moves between two processes.

Two measurements, each between two freshly forked processes sharing one region:

* **descriptors** - 16-byte entries (the RQE shape) pushed in batches of 1, 64
  and 512; the consumer checks order and a checksum of every entry.
* **payload** - the NIC's job in miniature: the producer takes free 4 KiB slots
  from a *fill* ring, copies payloads into them in the area, and posts
  ``(offset, len)`` on a *completion* ring; the consumer reads each payload in
  place (a u64 sum, checked against the expected total) and returns the slot
  through the fill ring.

Next to them, in the same run, the single-process numpy copy bandwidth over an
area-sized buffer is the baseline the payload path is compared with.

Region layout (owned by the parent, which creates and unlinks it; the children
attach): page 0 holds the control words below, then the rings, then the area.
"""

from __future__ import annotations

import multiprocessing as mp
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.ring import Backoff, RingConsumer, RingLayout, RingProducer
from shared.shm import PAGE_SIZE, Region, region_name

ENTRY = np.dtype([("off", "<u8"), ("len", "<u4"), ("pad", "<u4")])
U64_MASK = (1 << 64) - 1

# Control words (u64 index into page 0).
_C_START_NS = 0  # producer: monotonic ns when it started producing
_C_DONE = 1  # producer: 1 when it stopped producing
_C_SENT = 2  # producer: entries produced
_C_END_NS = 8  # consumer: monotonic ns of its last consumed batch
_C_GOT = 9  # consumer: entries consumed
_C_OK = 10  # consumer: 1 if every check passed
_C_SUM = 11  # consumer: checksum (mod 2**64)


@dataclass
class BenchResult:
    name: str
    batch: int
    entries: int
    seconds: float
    verified: bool

    @property
    def rate(self) -> float:
        return self.entries / self.seconds if self.seconds > 0 else 0.0


def _control(region: Region) -> np.ndarray:
    return region.array(np.uint64, 0, PAGE_SIZE // 8)


def _backoff(spin: int) -> Backoff:
    return Backoff(spin=spin, yields=spin, max_sleep=200e-6)


# -- descriptors ---------------------------------------------------------------------

def _desc_producer(name: str, nentries: int, batch: int, seconds: float, spin: int) -> None:
    region = Region.attach(name)
    ctl = _control(region)
    prod = RingProducer(region.buf, RingLayout.default(nentries, ENTRY, base=PAGE_SIZE))
    # Entry i carries sequence number i.  They come from a precomputed run of
    # sequence numbers (seq[pos] == sent), re-based once per len(seq) entries, so a
    # batch costs one slice copy and no per-batch scalar conversion.
    seq = np.arange(1 << 16, dtype=np.uint64)
    pos = 0
    wait = _backoff(spin)
    sent = 0
    start = time.monotonic_ns()
    ctl[_C_START_NS] = start
    deadline = start + int(seconds * 1e9)
    n = 0
    while True:
        view = prod.reserve(batch)
        k = len(view)
        if k:
            if pos + k > len(seq):
                seq += np.uint64(pos)
                pos = 0
            np.copyto(view["off"], seq[pos:pos + k])
            prod.submit(k)
            pos += k
            sent += k
            wait.reset()
        else:
            wait.idle()
        n += 1
        if n & 63 == 0 and time.monotonic_ns() >= deadline:
            break
    ctl[_C_SENT] = sent
    ctl[_C_DONE] = 1
    del ctl
    prod.detach()
    region.detach()


def _desc_consumer(name: str, nentries: int, batch: int, spin: int) -> None:
    region = Region.attach(name)
    ctl = _control(region)
    cons = RingConsumer(region.buf, RingLayout.default(nentries, ENTRY, base=PAGE_SIZE))
    wait = _backoff(spin)
    got = 0
    ok = True
    last = 0
    # Every entry is checked: batches are copied into a window (one cheap copy per
    # batch) and each full window is compared with the expected ramp at once.
    window = np.empty(1 << 20, dtype=np.uint64)
    ramp = np.arange(len(window), dtype=np.uint64)
    filled = 0
    base = 0
    give_up = time.monotonic() + 600
    while True:
        view = cons.peek(min(max(batch, 512), len(window) - filled))
        k = len(view)
        if k:
            wait.reset()
            window[filled:filled + k] = view["off"]
            cons.release(k)
            filled += k
            got += k
            last = time.monotonic_ns()
            if filled == len(window):
                ok &= bool(np.array_equal(window - np.uint64(base), ramp))
                base += filled
                filled = 0
            continue
        if ctl[_C_DONE] and cons.ready() == 0:
            break
        if time.monotonic() > give_up:
            ok = False
            break
        wait.idle()
    ok &= bool(np.array_equal(window[:filled] - np.uint64(base), ramp[:filled]))
    ok &= got == int(ctl[_C_SENT])
    ctl[_C_END_NS], ctl[_C_GOT], ctl[_C_OK] = last, got, int(ok)
    del ctl
    cons.detach()
    region.detach()


# -- payload -------------------------------------------------------------------------

def _source_pool(payload: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(1234)
    return rng.integers(0, 256, size=(count, payload), dtype=np.uint8)


def _payload_layout(nslots: int) -> tuple[RingLayout, RingLayout, int]:
    comp = RingLayout.default(nslots, ENTRY, base=PAGE_SIZE)
    fill = RingLayout.default(nslots, np.uint64, base=PAGE_SIZE + comp.size)
    area_off = (fill.entries + fill.entries_bytes + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    return comp, fill, area_off


def _payload_producer(name: str, nslots: int, payload: int, batch: int, seconds: float,
                      spin: int, pool_count: int) -> None:
    region = Region.attach(name)
    ctl = _control(region)
    comp_l, fill_l, area_off = _payload_layout(nslots)
    comp = RingProducer(region.buf, comp_l)
    fill = RingConsumer(region.buf, fill_l)
    area = region.array(np.uint8, area_off, nslots * payload).reshape(nslots, payload)
    src = _source_pool(payload, pool_count)
    wait = _backoff(spin)
    sent = 0
    start = time.monotonic_ns()
    ctl[_C_START_NS] = start
    deadline = start + int(seconds * 1e9)
    n = 0
    while True:
        offs = fill.peek(batch)
        k = len(offs)
        if k:
            out = comp.reserve(k)
            k = len(out)
        if k:
            wait.reset()
            offs = offs[:k]
            o0 = int(offs[0])
            p0 = sent % pool_count
            if int(offs[k - 1]) - o0 == (k - 1) * payload and p0 + k <= pool_count:
                s0 = o0 // payload
                area[s0:s0 + k] = src[p0:p0 + k]  # the common case: one copy
            else:
                area[offs // payload] = src[(np.arange(k) + p0) % pool_count]
            out["off"] = offs  # "len" was written once for every slot at setup
            fill.release(k)
            comp.submit(k)
            sent += k
        else:
            wait.idle()
        n += 1
        if n & 15 == 0 and time.monotonic_ns() >= deadline:
            break
    ctl[_C_SENT] = sent
    ctl[_C_DONE] = 1
    del ctl, area, offs
    comp.detach()
    fill.detach()
    region.detach()


def _payload_consumer(name: str, nslots: int, payload: int, batch: int, spin: int,
                      pool_count: int) -> None:
    region = Region.attach(name)
    ctl = _control(region)
    comp_l, fill_l, area_off = _payload_layout(nslots)
    comp = RingConsumer(region.buf, comp_l)
    fill = RingProducer(region.buf, fill_l)
    area = region.array(np.uint64, area_off, nslots * payload // 8).reshape(nslots, -1)
    wait = _backoff(spin)
    got = 0
    total = 0
    last = 0
    give_up = time.monotonic() + 600
    while True:
        descs = comp.peek(max(batch, 512))
        k = len(descs)
        if k:
            wait.reset()
            offs = descs["off"]
            o0 = int(offs[0])
            if int(offs[-1]) - o0 == (k - 1) * payload:
                s0 = o0 // payload
                total += int(area[s0:s0 + k].sum(dtype=np.uint64))  # read in place
            else:
                total += int(area[offs // payload].sum(dtype=np.uint64))
            fill.push(offs)  # never short: the fill ring holds every slot
            comp.release(k)
            got += k
            last = time.monotonic_ns()
            continue
        if ctl[_C_DONE] and comp.ready() == 0:
            break
        if time.monotonic() > give_up:
            break
        wait.idle()
    ctl[_C_END_NS], ctl[_C_GOT], ctl[_C_SUM] = last, got, total & U64_MASK
    del ctl, area
    comp.detach()
    fill.detach()
    region.detach()


def _run_pair(region: Region, producer: Any, pargs: tuple[Any, ...], consumer: Any,
              cargs: tuple[Any, ...], timeout: float) -> None:
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=consumer, args=cargs, daemon=True),
             ctx.Process(target=producer, args=pargs, daemon=True)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"benchmark process failed with exit code {bad[0]}")


def bench_descriptors(run: str, batch: int, seconds: float, nentries: int = 4096,
                      spin: int = 2000) -> BenchResult:
    layout = RingLayout.default(nentries, ENTRY, base=PAGE_SIZE)
    with Region.create(region_name(run, "bench", f"desc{batch}"), layout.size) as region:
        ctl = _control(region)
        RingConsumer(region.buf, layout).init_words()
        _run_pair(region, _desc_producer, (region.name, nentries, batch, seconds, spin),
                  _desc_consumer, (region.name, nentries, batch, spin), seconds + 60)
        elapsed = (int(ctl[_C_END_NS]) - int(ctl[_C_START_NS])) / 1e9
        res = BenchResult("descriptors 16 B", batch, int(ctl[_C_GOT]), elapsed,
                          bool(ctl[_C_OK]))
        del ctl
    return res


def bench_payload(run: str, batch: int, seconds: float, payload: int = 4096,
                  nslots: int = 4096, spin: int = 2000, pool_count: int = 1024) -> BenchResult:
    comp_l, fill_l, area_off = _payload_layout(nslots)
    size = area_off + nslots * payload
    with Region.create(region_name(run, "bench", f"payload{batch}"), size) as region:
        ctl = _control(region)
        comp = RingConsumer(region.buf, comp_l)
        comp.init_words()
        comp.ring["len"] = payload  # every payload has the same length: set it once
        comp.detach()
        fill = RingProducer(region.buf, fill_l)
        fill.push(np.arange(nslots, dtype=np.uint64) * payload)  # every slot starts free
        fill.detach()
        _run_pair(region, _payload_producer,
                  (region.name, nslots, payload, batch, seconds, spin, pool_count),
                  _payload_consumer, (region.name, nslots, payload, batch, spin, pool_count),
                  seconds + 60)
        got = int(ctl[_C_GOT])
        sums = _source_pool(payload, pool_count).view(np.uint64).sum(axis=1, dtype=np.uint64)
        full, rem = divmod(got, pool_count)
        expected = (full * int(sums.sum(dtype=np.uint64)) + int(sums[:rem].sum(dtype=np.uint64)))
        verified = got == int(ctl[_C_SENT]) and int(ctl[_C_SUM]) == expected & U64_MASK
        elapsed = (int(ctl[_C_END_NS]) - int(ctl[_C_START_NS])) / 1e9
        res = BenchResult(f"payload {payload} B", batch, got, elapsed, verified)
        del ctl
    return res


def copy_bandwidth(nbytes: int = 16 << 20, seconds: float = 0.5) -> float:
    """Single-process ``np.copyto`` bandwidth in bytes/s over area-sized buffers.

    The median of repeated whole-buffer copies (both buffers pre-faulted), so one
    lucky or unlucky sample does not set the baseline.
    """
    a = np.ones(nbytes, dtype=np.uint8)
    b = np.zeros(nbytes, dtype=np.uint8)
    np.copyto(b, a)  # fault both in
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 5:
        t0 = time.perf_counter()
        np.copyto(b, a)
        samples.append(nbytes / (time.perf_counter() - t0))
    return float(np.median(samples))


def run_ring_bench(seconds: float = 0.8, batches: tuple[int, ...] = (1, 64, 512),
                   payload_batches: tuple[int, ...] = (64, 512), spin: int = 2000,
                   progress: Any = None) -> dict[str, Any]:
    """Run every measurement once, in one run, and return the figures."""
    run = f"bench-{secrets.token_hex(3)}"
    say = progress or (lambda msg: None)
    rows: list[dict[str, Any]] = []
    for b in batches:
        say(f"descriptors, batch {b}")
        r = bench_descriptors(run, b, seconds, spin=spin)
        rows.append({"bench": r.name, "batch": b, "entries": r.entries, "seconds": r.seconds,
                     "mpps": r.rate / 1e6, "gbps": r.rate * 16 / 1e9, "verified": r.verified})
    say("single-process copy bandwidth")
    copy_bw = copy_bandwidth(16 << 20)
    for b in payload_batches:
        say(f"payload, batch {b}")
        r = bench_payload(run, b, seconds, spin=spin)
        rows.append({"bench": r.name, "batch": b, "entries": r.entries, "seconds": r.seconds,
                     "mpps": r.rate / 1e6, "gbps": r.rate * 4096 / 1e9, "verified": r.verified,
                     "vs_copy": r.rate * 4096 / copy_bw})
    by = {(row["bench"], row["batch"]): row for row in rows}
    checks = []
    d512 = by.get(("descriptors 16 B", 512))
    if d512:
        checks.append({"target": "descriptors batch 512 >= 50 Mpps",
                       "value": d512["mpps"], "ok": d512["mpps"] >= 50})
    p64 = by.get(("payload 4096 B", 64))
    if p64:
        checks.append({"target": "payload 4 KiB batch 64 >= 0.5 x copy bandwidth",
                       "value": p64["vs_copy"], "ok": p64["vs_copy"] >= 0.5})
    return {"rows": rows, "copy_gbps": copy_bw / 1e9, "seconds_per_point": seconds,
            "checks": checks, "all_verified": all(r["verified"] for r in rows)}
