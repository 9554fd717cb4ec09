"""``zcrx bench copy`` and ``zcrx bench zcrx``: what the receive paths deliver, side by side.

Each bench brings up its own run (:class:`launch.run.Run`, a unique ``bench-<hex>`` name):
the NIC and kernel processes with one netdev ``eth0`` whose MTU makes the TCP payload of a
frame exactly 4096 bytes (``mtu 4136`` for IPv4: :func:`shared.wire.mss`) and ``rx-buf-len
4096``.  For every measurement it starts the receiving app, waits until it listens, starts the
NIC's generator (pattern streams: stream id = source port), and waits for the app to exit by
itself after its connections.  Throughput is the app's own figure: delivered bytes divided by
the time between the app's first data completion and the end of its last data batch
(``time.monotonic_ns()`` in the app, a system-wide clock).  The run is torn down afterwards
whatever happens (exception, Ctrl-C, SIGTERM): ``Run.down`` stops every process and removes
every segment; the loopback processes are killed if they outlive their measurement.

Modes (each a separate process receiving the same kind of stream):

* ``zcrx``: :mod:`app_proc.zcrx_server` on queue 1, the flow steered there by an ntuple rule
  (``-N eth0 flow-type tcp4 dst-port 8000 action 1``) while RSS keeps every other flow on
  queue 0 (``-X eth0 equal 1``): payload is DMA'd by the NIC into the app's area and read in
  place.
* ``copy``: :mod:`app_proc.copy_server` (multishot RECV from a provided-buffer ring: the
  kernel copies every byte from its pages into the app's buffers), with ``--timing``, which
  adds the first/last-byte timestamps and the kernel's per-ring copy counter to its JSON
  summary.
* ``loopback``: plain Python TCP over the host's loopback between two processes
  (``python -m launch.bench_rx lb-send`` / ``lb-recv``): the sender sends pattern bytes until
  all are out, the receiver ``recv_into``-s one preallocated buffer (``--copy-buf``).

The touch is the same in all three: **every delivered byte is compared with the pattern
(``shared.pattern``)**, read where it landed (area chunk, copy buffer, recv buffer), and
each connection's byte count is checked.  No hash: SHA-256 runs at about 1.3 GB/s here and
would set every mode's speed by itself.  A mode whose bytes do not verify is reported as
such and never counts as a result.

Figures per mode:

* **GB/s**: delivered bytes / (last byte - first byte), the app's clock.
* **kernel CPU s/GB**: CPU seconds (user + system) the kernel process spent between the app's
  first and last byte (``psutil`` samples of the kernel pid every few ms, interpolated at the
  app's timestamps), per 10^9 delivered bytes.  For loopback it is the real kernel's work:
  the system time of the sender and the receiver over their transfer.  The JSON also has the
  app's CPU seconds per GB over the same interval (``app_cpu_s_per_gb``; for loopback the
  receiver's user + system time, which includes its recv copies).
* **payload bytes moved per delivered byte**, from the roles' own counters::

      moved = NIC DMA writes + kernel copy reads + kernel copy writes + app reads + app copies
      moved per byte = moved / delivered bytes

  NIC DMA writes: the NIC's counters (``zcrx ethtool -S eth0``) before and after, ``rx_bytes
  - 54 * rx_hds_split - 60 * rx_hds_linear`` (split frames put 54 header bytes in a header
  slot, the rest is payload; payload-less SYN/FIN frames are 60-byte linear frames).  Kernel
  copy reads and writes: the kernel process's own ``memory_traffic`` counters (``zcrx
  stats``: every skb copy by source and destination, plus payload NAPI copied into linear
  parts) before and after; a kernel without them falls back to the ring's RECV
  ``recv_bytes`` (copy path) or the ifq's ``copy_bytes`` (zcrx), counted once read and once
  written.  App reads and copies: the app's own counters (each delivered byte is read once;
  neither app copies payload).  Copy path: about 4; zero copy: about 2 (plus twice what the
  copy fallback copied).  Not measured for loopback: the host kernel's copies are nobody's
  counter here.

``zcrx bench zcrx`` checks three targets: zero copy >= 1.5x the copy path's GB/s, >= 2x
loopback TCP's, and bytes moved <= 0.55x the copy path's; with segments below 4 KiB
(``--payload``, ``--mtu 1500``) a fourth, zero copy >= 1 M segments/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from launch.topology import NetdevConfig, Topology
from shared import pattern, wire
from shared.errors import Misuse, PeerGone, Timeout, ZcrxError
from shared.nicif import NetdevSpec

PAYLOAD = 4096
#: IPv4 MTU whose MSS is exactly :data:`PAYLOAD`.
MTU = PAYLOAD + wire.IPV4_HLEN + wire.TCP_HLEN
#: Header bytes of a generated IPv4 frame (Ethernet + IPv4 + TCP, no options): not payload.
FRAME_HDR = wire.FRAME4_HLEN
RX_BUF_LEN = 4096
ZC_QUEUE = 1
#: NIC RX ring entries for every mode (the device maximum): with three processes on two
#: cores the pipeline is latency bound, and a deeper ring lets each stage work on larger
#: batches while the others run (0.51 -> 0.72 GB/s zero copy going from 512 to 2048 here).
RX_RING = 4096
#: Bytes per send() of the loopback sender when no --payload is asked (its best case, as
#: before --payload existed); with --payload it sends messages of that size.
LOOPBACK_CHUNK = 1 << 16
#: Entries per batch of the bare-ring baseline at 4 KiB: the batch the generator hands the
#: NIC (``nic_proc.sources.default_batch``), so the ring moves what the NIC moves per step.
RING_BATCH = 512
ZC_PORT = 8000
COPY_PORT = 8001
TOUCH = "every byte compared with the pattern, read in place where it landed"
#: Segments a measurement moves by default: at 4 KiB that is 1 GiB, about 0.7 s of zero copy
#: on a 2-core host.  At the old default of 128 MiB a zero-copy measurement lasted 0.1 s and
#: runs of one tree differed by up to 40 % (docs/performance.md §8).
DEFAULT_SEGMENTS = 1 << 18
DEFAULT_BYTES = DEFAULT_SEGMENTS * PAYLOAD
#: copy_server's buffer size (its default): the copy path's own choice.
DEFAULT_COPY_BUF = 16384
_SAMPLE_S = 0.005
_READY_S = 30.0

Progress = Callable[[str], None]


@dataclass
class ModeResult:
    """One measurement of one mode."""

    mode: str
    flows: int
    bytes: int
    seconds: float
    verified: bool
    kernel_cpu_s: float | None = None
    app_cpu_s: float | None = None
    moved: dict[str, int | None] | None = None
    copy_fallback: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    #: payload bytes per segment (per send() for loopback): the unit of ``mpps``
    segment: int = PAYLOAD

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def mpps(self) -> float:
        """Million segments (loopback: messages of the same size) delivered per second."""
        return self.bytes / self.segment / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def cpu_s_per_gb(self) -> float | None:
        if self.kernel_cpu_s is None or not self.bytes:
            return None
        return self.kernel_cpu_s / (self.bytes / 1e9)

    @property
    def moved_per_byte(self) -> float | None:
        if not self.moved or not self.bytes or any(v is None for v in self.moved.values()):
            return None
        return sum(int(v or 0) for v in self.moved.values()) / self.bytes

    @property
    def app_cpu_s_per_gb(self) -> float | None:
        if self.app_cpu_s is None or not self.bytes:
            return None
        return self.app_cpu_s / (self.bytes / 1e9)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(gbps=self.gbps, mpps=self.mpps, kernel_cpu_s_per_gb=self.cpu_s_per_gb,
                 app_cpu_s_per_gb=self.app_cpu_s_per_gb, moved_per_byte=self.moved_per_byte)
        return d


class BenchFailed(ZcrxError):
    """A measurement could not be made (an app failed to start, a timeout...)."""


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while benchmarking, so the teardown still runs."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM are ignored inside (main thread only): cleanup must finish."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def bench_topology(name: str, queues: int, rx: int = RX_RING,
                   ethtool: Sequence[str] = (), mtu: int = MTU,
                   rx_buf_len: int = RX_BUF_LEN) -> Topology:
    """The bench's run as data: one netdev ``eth0`` with ``queues`` RX queues of ``rx``
    entries, the MTU whose MSS is :data:`PAYLOAD`, ``rx-buf-len`` :data:`RX_BUF_LEN`, and
    ``ethtool`` settings applied once it is up; no apps (each measurement starts its own)."""
    spec = NetdevSpec(name="eth0", queues=queues, mtu=mtu, rx_buf_len=rx_buf_len, rx=rx)
    return Topology(name=name, netdevs=[NetdevConfig(spec, list(ethtool))])


class BenchRun:
    """A run with NIC + kernel for the bench (``queues`` RX queues on eth0), brought up
    through :func:`launch.supervise.bring_up` from :func:`bench_topology`."""

    def __init__(self, queues: int, rx: int = RX_RING, kind: str = "bench",
                 ethtool: Sequence[str] = (), fork_server: bool = True,
                 mtu: int = MTU, rx_buf_len: int = RX_BUF_LEN) -> None:
        from launch.supervise import bring_up

        topo = bench_topology(f"{kind}-{secrets.token_hex(3)}", queues, rx, ethtool, mtu,
                              rx_buf_len)
        self._seq = 0
        # Not detached: NIC and kernel exit with the bench if it dies.
        self.run, _ = bring_up(topo, detach=False, launcher=False, config={"bench": kind},
                               fork_server=fork_server)
        try:
            kernel = self.run.m.procs["kernel"].process()
            if kernel is None:
                raise BenchFailed("the kernel process died at start")
            self.kernel_proc = kernel
        except BaseException:
            self.down()
            raise

    def call(self, endpoint: str, type_: str, body: dict[str, Any] | None = None,
             timeout_ms: int = 20_000) -> dict[str, Any]:
        from shared.control import ControlClient

        with ControlClient(self.run.endpoint(endpoint), timeout_ms=timeout_ms) as c:
            return c.call(type_, body or {})

    def call_many(self, endpoint: str, requests: Sequence[tuple[str, dict[str, Any]]],
                  timeout_ms: int = 20_000) -> list[dict[str, Any]]:
        """Several requests to one role in one pipelined round trip (``call_many``): the role
        answers them back to back, so e.g. every flow of a point starts at once.  The first
        refusal is raised (after every answer is in)."""
        from shared.control import ControlClient
        from shared.msg import all_ok

        with ControlClient(self.run.endpoint(endpoint), timeout_ms=timeout_ms) as c:
            return all_ok(c.call_many(requests))

    def ethtool(self, *argv: str) -> dict[str, Any]:
        from launch import ethtool as et

        req = et.parse(list(argv))
        return self.call("kernel", "ethtool", {"dev": req["dev"], "request": req})

    def nic_rx(self) -> dict[str, int]:
        """eth0's receive counters as the NIC counts them (``ethtool -S``)."""
        stats = self.ethtool("-S", "eth0").get("stats", [])
        d = dict(stats)  # [[name, value], ...] or {name: value}
        return {k: int(d.get(k, 0)) for k in ("rx_packets", "rx_bytes", "rx_hds_split",
                                               "rx_hds_linear")}

    def kernel_copied(self) -> tuple[int, int] | None:
        """``(read, written)``: payload bytes the kernel process has copied so far, from its
        own ``memory_traffic`` counters (skb copies by source and destination, plus what NAPI
        copied into linear parts), or None when it does not report them."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                mt = self.call("kernel", "stats").get("memory_traffic")
                break
            except ZcrxError:  # e.g. a stats reply the kernel cannot encode: try again
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.02)
        if not isinstance(mt, dict):
            return None
        lin = int(mt.get("napi_linear", 0))
        return (sum(int(v) for v in mt.get("read", {}).values()) + lin,
                sum(int(v) for v in mt.get("written", {}).values()) + lin)

    def next_role(self, mode: str) -> str:
        self._seq += 1
        return f"app:{mode}{self._seq}"

    def down(self) -> None:
        """Stop everything and remove the run; a second Ctrl-C (or SIGTERM) meanwhile is
        ignored, so the teardown always completes."""
        with _signals_ignored():
            self.run.down(timeout=5.0)


def _tail(path: str, n: int = 400) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:].strip().replace("\n", " | ")
    except OSError:
        return "(no log)"


def _alive(p: psutil.Process | None) -> bool:
    try:
        return p is not None and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cpu(p: psutil.Process | None) -> float:
    if p is None:
        return 0.0
    try:
        t = p.cpu_times()
    except psutil.Error:
        return float("nan")
    return float(t.user + t.system)


def _interp(samples: list[tuple[int, float, float]], t_ns: int, col: int) -> float:
    """Column ``col`` (1: kernel, 2: app CPU seconds) of the samples at time ``t_ns``."""
    good = [s for s in samples if s[col] == s[col]]  # drop NaN (process already gone)
    ts = np.array([s[0] for s in good], dtype=np.float64)
    cs = np.array([s[col] for s in good], dtype=np.float64)
    return float(np.interp(float(t_ns), ts, cs))


def nic_dma_payload(before: dict[str, int], after: dict[str, int]) -> int:
    """Payload bytes the NIC DMA-wrote between two snapshots of its counters.

    With tcp-data-split on and hds-thresh 0 every frame with payload is split: its 54 header
    bytes go to a header slot and the rest is payload; a frame without payload (SYN, FIN) is
    placed linear, a 60-byte minimum frame (``ETH_ZLEN``, zero padded) of headers only.
    """
    d = {k: after[k] - before[k] for k in after}
    if d["rx_hds_split"] + d["rx_hds_linear"] != d["rx_packets"]:
        return d["rx_bytes"] - FRAME_HDR * d["rx_packets"]  # not all frames accounted for
    return d["rx_bytes"] - FRAME_HDR * d["rx_hds_split"] - wire.ETH_ZLEN * d["rx_hds_linear"]


def _expected(conns: list[dict[str, Any]], per_flow: int, sports: list[int]) -> list[str]:
    """Problems with what an app reports against what the generator sent."""
    problems = []
    if sorted(int(c["stream"]) for c in conns) != sorted(sports):
        problems.append(f"streams {sorted(c['stream'] for c in conns)} != sent {sports}")
    for c in conns:
        if int(c["bytes"]) != per_flow:
            problems.append(f"stream {c['stream']}: {c['bytes']} bytes, sent {per_flow}")
        elif c.get("bad_offset") is not None:
            problems.append(f"stream {c['stream']}: bad byte at {c['bad_offset']}")
        if not c.get("ok", False):
            problems.append(f"stream {c['stream']}: the app's checks failed {c.get('checks')}")
    return problems


def measure_emulated(br: BenchRun, mode: str, flows: int, total: int, sport: int, *,
                     copy_buf: int = DEFAULT_COPY_BUF, timeout: float = 120.0,
                     extra: list[str] | None = None, segment: int = PAYLOAD) -> ModeResult:
    """One measurement of ``zcrx`` or ``copy`` in ``br`` (its queues configured already),
    the generator sending ``segment`` payload bytes per frame."""
    per_flow = max(1, total // flows)
    run = br.run
    role = br.next_role(mode)
    out = run.dir / f"{role.replace(':', '-')}.json"
    common = ["-v", "--no-hash", "-n", str(flows), "-s", str(per_flow), "--json", str(out),
              "--seconds", str(timeout)]
    if mode == "zcrx":
        module, port = "app_proc.zcrx_server", ZC_PORT
        args = ["-p", str(port), "-i", "eth0", "-q", str(ZC_QUEUE), *common, *(extra or [])]
    elif mode == "copy":
        module, port = "app_proc.copy_server", COPY_PORT
        args = ["-p", str(port), "-b", str(copy_buf), "--nbufs", "512", "--timing", *common,
                *(extra or [])]
    else:
        raise Misuse(f"unknown mode {mode!r}")
    # Counters before the app exists (a live ifq may keep the kernel's stats busy).
    nic0 = br.nic_rx()
    copied0 = br.kernel_copied()
    entry = None
    for attempt in range(5):
        try:
            entry = run.spawn(role, module, args, detach=False, notify=True,
                              ready_timeout=_READY_S,  # the app says when it listens
                              cap_net_admin=mode == "zcrx")
            break
        except (PeerGone, Timeout) as e:
            failed = run.m.procs.get(role)
            log = _tail(failed.log) if failed is not None else str(e)
            run.stop(role)
            if "EEXIST" in log and attempt < 4:  # the last ifq of the queue still draining
                time.sleep(0.2 * (attempt + 1))
                role = br.next_role(mode)
                continue
            raise BenchFailed(f"{mode} app did not start: {log}") from None
    assert entry is not None
    kproc = br.kernel_proc
    proc = entry.process()
    samples = [(time.monotonic_ns(), _cpu(kproc), _cpu(proc))]
    sports = list(range(sport, sport + flows))
    br.call("nic", "nic.traffic", {"dev": "eth0", "spec": {
        "dport": port, "flows": flows, "bytes": per_flow, "sport": sport,
        "payload": segment}})
    deadline = time.monotonic() + timeout + 10
    while proc is not None and _alive(proc):
        if time.monotonic() > deadline:
            run.stop(role)
            raise BenchFailed(f"{mode}: no result after {timeout:.0f} s: {_tail(entry.log)}")
        try:
            proc.wait(_SAMPLE_S)
        except psutil.TimeoutExpired:
            pass
        samples.append((time.monotonic_ns(), _cpu(kproc), _cpu(proc)))
    samples.append((time.monotonic_ns(), _cpu(kproc), float("nan")))
    run.stop(role)
    nic1 = br.nic_rx()
    copied1 = br.kernel_copied()
    try:
        s = json.loads(out.read_text())
    except (OSError, ValueError) as e:
        raise BenchFailed(f"{mode}: no summary ({e}): {_tail(entry.log)}") from None
    conns = s.get("connections", [])
    delivered = sum(int(c["bytes"]) for c in conns)
    problems = list(s.get("errors", [])) + _expected(conns, per_flow, sports)
    first, last = s.get("first_ns"), s.get("last_ns")
    secs = (last - first) / 1e9 if first is not None and last is not None else 0.0
    kcpu = acpu = None
    if first is not None and last is not None and len(samples) >= 2:
        kcpu = _interp(samples, last, 1) - _interp(samples, first, 1)
        acpu = _interp(samples, last, 2) - _interp(samples, first, 2)
    nic_dma = nic_dma_payload(nic0, nic1)
    if mode == "zcrx":
        fb = s.get("copy_fallback")
        kcopy = int(fb["bytes"]) if fb else None  # the ifq's own counter, if no global one
        app = s.get("app", {})
        app_read, app_copy = int(app.get("read_bytes", 0)), int(app.get("copy_bytes", 0))
    else:
        fb = None
        kring = s.get("kernel_ring") or {}
        kcopy = int(kring["recv_bytes"]) if "recv_bytes" in kring else None
        app_read, app_copy = delivered, 0
    kread = kwrite = kcopy
    if copied0 is not None and copied1 is not None:
        kread, kwrite = copied1[0] - copied0[0], copied1[1] - copied0[1]
    moved: dict[str, int | None] = {"nic_dma_write": nic_dma, "kernel_copy_read": kread,
                                    "kernel_copy_write": kwrite, "app_read": app_read,
                                    "app_copy": app_copy}
    return ModeResult(mode, flows, delivered, secs, not problems and bool(s.get("ok")),
                      kcpu, acpu, moved, fb, problems, segment)


# --------------------------------------------------------------------------------------------
# Loopback TCP between two processes
# --------------------------------------------------------------------------------------------


def _sys_s() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _user_s() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _emit(tag: str, obj: Any) -> None:
    print(f"{tag} {json.dumps(obj)}", flush=True)


def lb_recv_main(flows: int, bufsize: int) -> int:
    """Loopback receiver: accept ``flows`` connections on 127.0.0.1 (the port goes to stdout
    first), ``recv_into`` one preallocated buffer, check and hash every byte; the result is
    the last stdout line."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(flows)
    _emit("PORT", ls.getsockname()[1])
    sel = selectors.DefaultSelector()
    state: dict[int, dict[str, Any]] = {}
    for _ in range(flows):
        s, peer = ls.accept()
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        state[s.fileno()] = {"stream": peer[1], "bytes": 0, "bad": None}
    ls.close()
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    arr = np.frombuffer(buf, dtype=np.uint8)
    first_ns = last_ns = None
    sys0 = sys1 = user0 = user1 = 0.0
    open_ = flows
    while open_:
        for key, _ in sel.select(5.0):
            rs = key.fileobj
            assert isinstance(rs, socket.socket)
            n = rs.recv_into(mv)
            st = state[rs.fileno()]
            if n == 0:
                sel.unregister(rs)
                rs.close()
                open_ -= 1
                continue
            if first_ns is None:
                first_ns, sys0, user0 = time.monotonic_ns(), _sys_s(), _user_s()
            if st["bad"] is None:
                bad = pattern.verify(st["stream"], st["bytes"], arr[:n])
                if bad >= 0:
                    st["bad"] = st["bytes"] + bad
            st["bytes"] += n
            last_ns, sys1, user1 = time.monotonic_ns(), _sys_s(), _user_s()
    conns = [{"stream": st["stream"], "bytes": st["bytes"], "bad_offset": st["bad"]}
             for st in state.values()]
    _emit("RESULT", {"connections": conns, "first_ns": first_ns, "last_ns": last_ns,
                     "sys_s": sys1 - sys0, "cpu_s": (sys1 - sys0) + (user1 - user0)})
    return 0


def lb_send_main(port: int, flows: int, per_flow: int, chunk: int = 1 << 16) -> int:
    """Loopback sender: ``flows`` connections, ``per_flow`` pattern bytes each (stream id =
    the socket's own port, as the generator does), then FIN; its system time goes to stdout.
    """
    ext = np.concatenate([pattern.BASE] * 3)
    sel = selectors.DefaultSelector()
    state: dict[int, list[int]] = {}
    socks = []
    for _ in range(flows):
        s = socket.create_connection(("127.0.0.1", port))
        socks.append(s)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_WRITE)
        state[s.fileno()] = [s.getsockname()[1], 0]
    sys0 = _sys_s()
    left = flows
    while left:
        for key, _ in sel.select(5.0):
            ws = key.fileobj
            assert isinstance(ws, socket.socket)
            st = state[ws.fileno()]
            n = min(chunk, per_flow - st[1])
            p = (st[1] + pattern.phase(st[0])) % pattern.PERIOD
            try:
                st[1] += ws.send(ext[p:p + n].data)
            except BlockingIOError:
                continue
            if st[1] >= per_flow:
                sel.unregister(ws)
                ws.shutdown(socket.SHUT_WR)
                left -= 1
    _emit("RESULT", {"sys_s": _sys_s() - sys0})
    for s in socks:
        s.close()
    return 0


def _result_line(out: str) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            r: dict[str, Any] = json.loads(line[7:])
            return r
    raise BenchFailed(f"loopback: no result in {out[-200:]!r}")


def measure_loopback(flows: int, total: int, *, bufsize: int = DEFAULT_COPY_BUF,
                     timeout: float = 120.0, chunk: int = 1 << 16) -> ModeResult:
    """Loopback TCP between two fresh processes (receiver, sender), the same touch; the
    sender writes ``chunk`` bytes per send()."""
    per_flow = max(1, total // flows)
    me = [sys.executable, "-m", "launch.bench_rx"]
    procs: list[subprocess.Popen[str]] = []
    try:
        rx = subprocess.Popen([*me, "lb-recv", "--flows", str(flows), "--bufsize",
                               str(bufsize)], stdout=subprocess.PIPE, text=True)
        procs.append(rx)
        assert rx.stdout is not None
        first = rx.stdout.readline()
        if not first.startswith("PORT "):
            raise BenchFailed(f"loopback receiver did not start ({first!r})")
        tx = subprocess.Popen([*me, "lb-send", "--port", first.split()[1], "--flows",
                               str(flows), "--bytes", str(per_flow), "--chunk", str(chunk)],
                              stdout=subprocess.PIPE,
                              text=True)
        procs.append(tx)
        try:
            r = _result_line(rx.communicate(timeout=timeout)[0])
            sent = _result_line(tx.communicate(timeout=10)[0])
        except subprocess.TimeoutExpired:
            raise BenchFailed(f"loopback: no result after {timeout:.0f} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)
            if p.stdout is not None:
                p.stdout.close()
    conns = r["connections"]
    delivered = sum(int(c["bytes"]) for c in conns)
    problems = []
    for c in conns:
        if c["bytes"] != per_flow:
            problems.append(f"stream {c['stream']}: {c['bytes']} bytes, sent {per_flow}")
        if c["bad_offset"] is not None:
            problems.append(f"stream {c['stream']}: bad byte at {c['bad_offset']}")
    if len(conns) != flows:
        problems.append(f"{len(conns)} connections, expected {flows}")
    secs = ((r["last_ns"] - r["first_ns"]) / 1e9
            if r["first_ns"] is not None and r["last_ns"] is not None else 0.0)
    kcpu = float(r["sys_s"]) + float(sent["sys_s"])
    return ModeResult("loopback", flows, delivered, secs, not problems, kcpu,
                      float(r["cpu_s"]), None, None, problems,
                      min(chunk, bufsize, PAYLOAD))


# --------------------------------------------------------------------------------------------
# The two benches
# --------------------------------------------------------------------------------------------


def _best(results: list[ModeResult]) -> ModeResult:
    """The best verified result (highest GB/s), else the first."""
    good = [r for r in results if r.verified]
    return max(good, key=lambda r: r.gbps) if good else results[0]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_copy_bench(total: int = DEFAULT_BYTES, flows: tuple[int, ...] = (1, 4),
                   repeat: int = 1, copy_buf: int = DEFAULT_COPY_BUF,
                   timeout: float = 120.0, progress: Progress | None = None
                   ) -> dict[str, Any]:
    """Issue 3: the copy path at 1 and 4 flows next to loopback TCP, in one run."""
    say = progress or (lambda m: None)
    every: dict[str, list[ModeResult]] = {}
    with _terminate_as_interrupt():
        say("starting the run")
        br = BenchRun(queues=max(flows))
        try:
            sport = 30000
            for rep in range(repeat):
                for k in flows:
                    say(f"copy path, {k} flow(s), round {rep + 1}")
                    every.setdefault(f"copy/{k}", []).append(measure_emulated(
                        br, "copy", k, total, sport, copy_buf=copy_buf, timeout=timeout))
                    sport += 64  # fresh 4-tuples for every measurement (flows <= 64)
                    say(f"loopback TCP, {k} flow(s), round {rep + 1}")
                    every.setdefault(f"loopback/{k}", []).append(measure_loopback(
                        k, total, bufsize=copy_buf, timeout=timeout))
        finally:
            say("tearing down")
            br.down()
    rows = {key: _best(v) for key, v in every.items()}
    ratios = {f"copy/loopback {k} flow(s)": _ratio(rows[f"copy/{k}"].gbps,
                                                    rows[f"loopback/{k}"].gbps)
              for k in flows}
    return {
        "bench": "copy", "payload": PAYLOAD, "mtu": MTU, "rx_buf_len": RX_BUF_LEN,
        "bytes": total, "repeat": repeat, "copy_buf": copy_buf, "touch": TOUCH,
        "rows": [r.to_dict() for r in rows.values()],
        "all_runs": {k: [r.to_dict() for r in v] for k, v in every.items()},
        "ratios": ratios, "checks": [],
        "all_verified": all(r.verified for v in every.values() for r in v),
    }


def segment_size(payload: int | None, mtu: int = MTU) -> int:
    """Payload bytes per segment of ``bench zcrx``: ``payload``, at most the IPv4 MSS of
    ``mtu`` (the MSS when None)."""
    mss = wire.mss(wire.FAMILY_V4, mtu)
    return mss if payload is None else min(payload, mss)


def run_zcrx_bench(total: int = DEFAULT_BYTES, flows: int = 1, repeat: int = 1,
                   copy_buf: int = DEFAULT_COPY_BUF, timeout: float = 120.0,
                   zcrx_args: list[str] | None = None, progress: Progress | None = None,
                   payload: int | None = None, mtu: int = MTU, gro_hw: bool = False,
                   rx_buf_len: int = RX_BUF_LEN) -> dict[str, Any]:
    """Issue 4: zero copy, the copy path and loopback TCP in one run, with the targets.

    ``mtu`` is the netdev's (default: the one whose MSS is 4 KiB); ``payload`` the bytes per
    segment (default and at most the MSS).  Loopback TCP sends messages of the same size.
    With a ``payload`` below 4 KiB the bare shared-memory ring's rate for entries of that
    size at the generator's batch (``default_batch``) is measured in the same run: the
    ceiling of any design that moves those bytes through a shm ring in Python.  ``gro_hw``: the NIC
    coalesces segments (``ethtool -K eth0 rx-gro-hw on``) for both emulated modes.
    ``rx_buf_len``: the netdev's buffer length, and the zero-copy ifq's niov size (Linux
    6.18's ``rx_buf_len``).
    """
    if rx_buf_len != RX_BUF_LEN:
        zcrx_args = [*(zcrx_args or []), "--rx-buf-len", str(rx_buf_len)]
    say = progress or (lambda m: None)
    segment = segment_size(payload, mtu)
    every: dict[str, list[ModeResult]] = {"zcrx": [], "copy": [], "loopback": []}
    ring: dict[str, Any] | None = None
    with _terminate_as_interrupt():
        say("starting the run")
        # RSS: everything else on queue 0; the zero-copy flow steered to ZC_QUEUE.
        br = BenchRun(queues=2, ethtool=[
            "-X eth0 equal 1", f"-N eth0 flow-type tcp4 dst-port {ZC_PORT} action {ZC_QUEUE}",
            *(["-K eth0 rx-gro-hw on"] if gro_hw else [])], mtu=mtu, rx_buf_len=rx_buf_len)
        try:
            sport = 40000
            for rep in range(repeat):
                for mode in ("zcrx", "copy"):
                    say(f"{mode}, {flows} flow(s), round {rep + 1}")
                    every[mode].append(measure_emulated(
                        br, mode, flows, total, sport, copy_buf=copy_buf, timeout=timeout,
                        extra=zcrx_args if mode == "zcrx" else None, segment=segment))
                    sport += 64  # fresh 4-tuples for every measurement (flows <= 64)
                say(f"loopback TCP, {flows} flow(s), round {rep + 1}")
                every["loopback"].append(measure_loopback(
                    flows, total, bufsize=copy_buf, timeout=timeout,
                    chunk=segment if payload is not None else LOOPBACK_CHUNK))
            if payload is not None and segment < PAYLOAD:
                from launch.bench_ring import bench_payload
                from nic_proc.sources import default_batch

                batch = default_batch(segment, rx_buf_len if gro_hw else 0)
                say(f"bare ring, {segment} B entries, batch {batch}")
                rr = bench_payload(br.run.run_id, batch, 0.8, payload=segment,
                                   nslots=max(4096, 2 * batch))
                ring = {"batch": batch, "payload": segment, "mpps": rr.rate / 1e6,
                        "gbps": rr.rate * segment / 1e9, "verified": rr.verified}
        finally:
            say("tearing down")
            br.down()
    rows = {k: _best(v) for k, v in every.items()}
    zc, cp, lb = rows["zcrx"], rows["copy"], rows["loopback"]
    vs_copy = _ratio(zc.gbps, cp.gbps)
    vs_lb = _ratio(zc.gbps, lb.gbps)
    moved = _ratio(zc.moved_per_byte, cp.moved_per_byte)
    checks = [
        {"target": "zero copy >= 1.5 x copy path (GB/s)", "value": vs_copy,
         "ok": vs_copy is not None and vs_copy >= 1.5 and zc.verified and cp.verified},
        {"target": "zero copy >= 2 x loopback TCP (GB/s)", "value": vs_lb,
         "ok": vs_lb is not None and vs_lb >= 2.0 and zc.verified and lb.verified},
        {"target": "bytes moved <= 0.55 x copy path", "value": moved,
         "ok": moved is not None and moved <= 0.55},
    ]
    if segment < PAYLOAD:  # issue 9: small segments and the usual MTU
        checks.append({"target": "zero copy >= 1 M segments/s", "value": zc.mpps,
                       "ok": zc.mpps >= 1.0 and zc.verified})
    ratios = {"zcrx/copy": vs_copy, "zcrx/loopback": vs_lb, "moved zcrx/copy": moved}
    if ring is not None:
        ratios["zcrx/bare ring (Mpps)"] = _ratio(zc.mpps, ring["mpps"])
    return {
        "bench": "zcrx", "payload": segment, "mtu": mtu, "rx_buf_len": rx_buf_len,
        "gro_hw": gro_hw,
        "bytes": total, "flows": flows, "repeat": repeat, "copy_buf": copy_buf,
        "touch": TOUCH, "rows": [r.to_dict() for r in rows.values()],
        "all_runs": {k: [r.to_dict() for r in v] for k, v in every.items()},
        "ratios": ratios, "checks": checks, "ring": ring,
        "all_verified": (all(r.verified for v in every.values() for r in v)
                         and (ring is None or bool(ring["verified"]))),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench_rx",
                                description="Helper processes of zcrx bench copy / zcrx.")
    p.add_argument("--tag", default="", help="zcrx:<run_id>:<role> (set by the launcher)")
    p.add_argument("what", choices=("lb-recv", "lb-send"))
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    q = argparse.ArgumentParser(prog=f"python -m launch.bench_rx {a.what}")
    q.add_argument("--flows", type=int, default=1)
    q.add_argument("--bufsize", type=int, default=DEFAULT_COPY_BUF)
    q.add_argument("--port", type=int, default=0)
    q.add_argument("--bytes", type=int, default=0)
    q.add_argument("--chunk", type=int, default=1 << 16)
    b = q.parse_args(a.args)
    if a.what == "lb-recv":
        return lb_recv_main(b.flows, b.bufsize)
    return lb_send_main(b.port, b.flows, b.bytes, b.chunk)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
