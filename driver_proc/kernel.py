"""The emulated kernel as one object: every subsystem the kernel process runs.

``Kernel`` owns all kernel state and is the single authority over buffers
(DESIGN §5 "buffer ledger").  It does no I/O of its own: the process loop in
:mod:`driver_proc.main` feeds it control messages and interrupts and calls
:meth:`Kernel.poll` to run NAPI and io_uring work; tests drive it directly.

Subsystems (one module each, kernel-style):

* ``netdevs``  - :mod:`driver_proc.netdev`: the NIC driver; RX queues with their
  rings, header slots and page pools; NAPI poll building skbs.
* ``skbs``     - :mod:`driver_proc.skb`: skb records (linear part + frags) and
  their buffer references; freeing an skb recycles its buffers.
* ``sockets``  - :mod:`driver_proc.tcp` behind :mod:`driver_proc.files`:
  listeners and connections; receive queues of (skb, offset, length) pieces.
* ``ctx.tasks`` - :mod:`driver_proc.files`: one per attached process: its file
  table (sockets, rings) and emulated mm (:mod:`driver_proc.mm`).
* ``ctx.rings`` - :mod:`driver_proc.io_uring`: io_uring instances and requests.
* ``zcrx``     - :mod:`driver_proc.zcrx`: zero-copy receive ifqs, their areas (memory
  providers of bound queues), RECV_ZC; its delayed destructions are reaped every poll.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from driver_proc import syscalls as sc
from driver_proc.netdev import NapiBatch, NetDevice
from driver_proc.skb import SkbStore
from driver_proc.tcp import SocketTable
from shared.control import ControlServer, Handler, HandlerResult, Message
from shared.errors import Misuse, ZcrxError

#: Frames one queue may complete per NAPI poll (the driver's budget).
NAPI_BUDGET = 1024
#: How long the idle loop sleeps while a queue waits for buffers to come home.
STARVED_POLL_MS = 1


class Kernel:
    """All kernel state plus the verbs the process loop drives."""

    def __init__(self, run: str, rundir: str, nic: Any, *,
                 log: logging.Logger | None = None) -> None:
        self.run = run
        self.rundir = rundir
        self.nic = nic
        self.log = log or logging.getLogger("kernel")
        self.skbs = SkbStore()
        self.table = SocketTable()
        self.ctx = sc.KernelContext.create(run, self.skbs, self.table)
        self.netdevs: dict[str, NetDevice] = {}
        assert self.ctx.zcrx is not None
        self.zcrx = self.ctx.zcrx
        self.zcrx.netdevs = self.netdevs
        self.stats: Counter[str] = Counter()
        self.shutdown_requested = False
        self.server: ControlServer | None = None
        self._doorbells: list[tuple[str, int]] = []
        self._starved = False
        self._started = time.monotonic()

    # -- setup ------------------------------------------------------------------------

    def attach_server(self, server: ControlServer) -> None:
        self.server = server

    def probe(self) -> None:
        """Probe the NIC and bring every netdev up (the driver's probe + ndo_open)."""
        info = self.nic.call("nic.probe", {})
        for nd in info["netdevs"]:
            dev = NetDevice(nd, self.nic, self.run, skbs=self.skbs)
            self.netdevs[dev.name] = dev
            dev.open()

    def handlers(self) -> dict[str, Handler]:
        h = dict(sc.handlers(self.ctx))
        h.update({"ethtool": self._sys_ethtool, "stats": self._sys_stats,
                  "status": self._sys_status, "shutdown": self._sys_shutdown})
        return h

    # -- the loop's verbs -------------------------------------------------------------

    def poll(self) -> int:
        """One pass of softirq + task work: NAPI on every queue, TCP, io_uring."""
        work = 0
        for dev in self.netdevs.values():
            for batch in dev.take_drained():
                work += self._deliver(batch)
            for q in list(dev.queues):
                if not dev.queues[q].started:
                    continue
                batch = dev.napi_poll(q, NAPI_BUDGET)
                if batch.doorbell:
                    self._doorbells.append((dev.name, q))
                if batch.completions:
                    work += batch.completions
                    self._deliver(batch)
        if self.server is not None:
            work += sc.service(self.ctx, self.server)
        work += self.zcrx.poll()  # requeued RECV_ZC passes, delayed ifq destruction
        return work

    def _deliver(self, batch: NapiBatch) -> int:
        """Hand a NAPI batch to TCP, free what TCP refused, run woken requests."""
        if not len(batch):
            return 0
        res = self.table.ingest_batch(batch.keys, batch.seq, batch.payload_len,
                                      batch.tcp_flags, batch.handles)
        if len(res.freed):
            self.skbs.free(res.freed)
        if res.sockets or res.listeners:
            self.ctx.rings.run(res.sockets, res.listeners)
        return len(batch)

    def take_doorbells(self) -> list[tuple[str, int]]:
        out, self._doorbells = self._doorbells, []
        return out

    def arm_interrupts(self) -> bool:
        """Before sleeping: refill starved queues, arm every started queue's interrupt.

        Returns True if work appeared meanwhile.  A queue whose pool came back
        short is refilled here too: buffers come home without any event (an app
        writing RQEs, a socket consuming skbs), and the NIC, paused for lack of
        buffers, waits for our doorbell.  While a queue stays starved the loop
        sleeps only briefly (:meth:`next_timer_ms`).
        """
        pending = False
        self._starved = False
        for dev in self.netdevs.values():
            for q, rq in dev.queues.items():
                if not rq.started:
                    continue
                if len(rq.posted) < rq.ring_size:
                    posted, bell = dev.refill(q)
                    if bell:
                        self._doorbells.append((dev.name, q))
                    if posted:
                        pending = True
                    elif len(rq.posted) < rq.ring_size:
                        self._starved = True
                if dev.napi_complete(q):
                    pending = True
        return pending

    def next_timer_ms(self) -> int:
        if self._starved:
            return STARVED_POLL_MS
        deadline = self.ctx.rings.next_deadline()
        if deadline is None:
            return 1_000
        return max(0, int((deadline - time.monotonic()) * 1000))

    def shutdown(self) -> None:
        """Close every task's files and rings, then every netdev (unlinking regions)."""
        for task in list(self.ctx.tasks):
            try:
                sc.task_exit(self.ctx, task)
            except ZcrxError as e:
                self.log.warning("task %s exit: %s", task.tid, e)
        for dev in self.netdevs.values():
            try:
                for batch in dev.close(nic_alive=True):
                    if len(batch):
                        self.skbs.free(batch.handles)
            except ZcrxError as e:
                self.log.warning("%s close: %s", dev.name, e)
                dev.close(nic_alive=False)
        self.zcrx.shutdown()

    # -- admin syscalls ---------------------------------------------------------------

    def _dev(self, name: str) -> NetDevice:
        dev = self.netdevs.get(name)
        if dev is None:
            raise Misuse(f"no such device {name!r}", errno=errno.ENODEV)
        return dev

    def _sys_ethtool(self, msg: Message, peer: bytes) -> HandlerResult:
        return self._dev(msg.body["dev"]).ethtool(msg.body["request"])

    def _sys_stats(self, msg: Message, peer: bytes) -> HandlerResult:
        out: dict[str, Any] = {"kernel": dict(self.stats)}
        out["netdevs"] = {}
        for name, dev in self.netdevs.items():
            out["netdevs"][name] = {f"rx-{q}": dev.queue_stats(q) for q in sorted(dev.queues)}
        out["tcp"] = dict(_as_dict(self.table.stats))
        out["io_uring"] = self.ctx.rings.stats()
        out["skbs"] = {"in_flight": len(self.skbs.live_handles())}
        out["zcrx"] = self.zcrx.stats()
        out["memory_traffic"] = out["zcrx"]["memory_traffic"]
        return out

    def _sys_status(self, msg: Message, peer: bytes) -> HandlerResult:
        return {"run": self.run, "uptime_s": round(time.monotonic() - self._started, 3),
                "netdevs": [dev.status() for dev in self.netdevs.values()],
                "tasks": [{"tid": t.tid, "pid": t.pid, "name": t.name}
                          for t in self.ctx.tasks],
                "zcrx": self.zcrx.status()}

    def _sys_shutdown(self, msg: Message, peer: bytes) -> HandlerResult:
        self.shutdown_requested = True
        return {}


def _as_dict(stats: Any) -> Mapping[str, Any]:
    if hasattr(stats, "as_dict"):
        return dict(stats.as_dict())
    if isinstance(stats, Mapping):
        return stats
    return {k: v for k, v in vars(stats).items() if not k.startswith("_")}
