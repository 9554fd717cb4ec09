"""The NIC process: ``python -m nic_proc --run RUN --rundir DIR [--netdev SPEC ...]``.

A thin loop around :class:`nic_proc.device.Nic`:

* serves the admin ROUTER at ``ipc_endpoint(rundir, "nic")``: every ``nic.*``
  request of :mod:`shared.nicif` (the kernel is the usual client; the launcher
  configures traffic sources directly);
* binds an :class:`~shared.control.EventReceiver` at ``ipc_endpoint(rundir,
  "nic-events")`` for ``nic.doorbell`` and ``nic.tx_doorbell``, and sends ``irq`` events with an
  :class:`~shared.control.EventSender` to ``ipc_endpoint(rundir, "kernel-events")``;
* drains the kernel's TX rings into each netdev's sink, runs the traffic sources,
  steering and DMA (:meth:`Nic.step`); before blocking it sets need-wakeup on every TX
  ring (:meth:`Nic.tx_arm`), so a kernel that queues frames meanwhile rings
  ``nic.tx_doorbell``;
* when there is nothing to move it spins, yields and sleeps (:class:`Backoff`);
  while sources wait for buffers it blocks in zmq poll for at most 1 ms (a doorbell
  wakes it at once; the bound covers a doorbell lost to the need-wakeup race); with
  no active source it blocks in zmq poll for up to 100 ms; while a queue holds coalesced
  completions (``ethtool -C rx-usecs``) it never blocks longer than the backoff's
  1 ms sleep, so the timer fires late by at most that.

Shared memory: the process creates one region, the stats block
``region_name(run, "nic", "stats")`` (its name is in the ``nic.probe`` reply), and
unlinks it on exit.  Everything else it maps belongs to the kernel or an app.

Lifetime: SIGTERM or SIGINT stop it cleanly (sources closed, mappings dropped,
stats region unlinked, sockets closed); it also exits by itself when its parent
(the launcher) dies, noticed as a change of ``os.getppid()``.  Logs go to stderr.

Kernel death (DESIGN §6): the kernel introduces itself with ``hello`` (role ``kernel``,
its pid) when it probes; the NIC keeps a pidfd on that pid (:mod:`shared.watch`) in its
``zmq.Poller`` and checks it between batches.  A kernel that exits in order says ``bye``
first (its devices closed, nothing mapped): then the watch is dropped and the NIC keeps
running until it is told to stop, as before.  A kernel whose loop dies of an exception (an
oops) says nothing, as a crashed Linux driver does not unbind (``driver_proc.main``): its
exit is a death here.  When the kernel dies the NIC can no longer
trust any mapping: it stops every queue and source (no more DMA), drops every mapping,
unlinks its stats region and exits with status 0 (an orderly exit; the log says why).

Netdev specs: see :class:`shared.nicif.NetdevSpec` (``eth0:queues=4,mtu=9000``);
without ``--netdev`` the NIC has one default ``eth0``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import numpy as np
import zmq

from nic_proc.device import Nic
from nic_proc.port import open_tap
from shared import nicif
from shared.control import (
    ControlServer,
    EventReceiver,
    EventSender,
    HandlerResult,
    Peer,
    ipc_endpoint,
    peer_cred,
)
from shared.errors import Misuse, ZcrxError
from shared.msg import PROTOCOL_VERSION, Message
from shared.nicif import NetdevSpec
from shared.ring import Backoff
from shared.shm import Region, region_name
from shared.watch import Watchlist

log = logging.getLogger("zcrx.nic")

#: zmq poll timeouts (ms): sources waiting for buffers / nothing to do.
WAIT_POLL_MS = 1
IDLE_POLL_MS = 100
#: Loop iterations between parent checks while busy.
_PPID_EVERY = 256


def _readable(sock: zmq.Socket[bytes]) -> bool:
    """True if a message is queued (cheaper than a zero-timeout poll)."""
    ev = sock.get(zmq.EVENTS)
    return isinstance(ev, int) and bool(ev & zmq.POLLIN)


def _guard(fn: Callable[[Message], HandlerResult]) -> Callable[[Message, bytes], HandlerResult]:
    """A handler that turns malformed-content errors into EINVAL replies."""
    def handler(msg: Message, peer: bytes) -> HandlerResult:
        try:
            return fn(msg)
        except ZcrxError:
            raise
        except (KeyError, ValueError, TypeError, OverflowError, IndexError) as e:
            raise Misuse(f"{msg.type}: {e!r}", errno.EINVAL) from None
    return handler


def _guard_peer(fn: Callable[[Message, bytes], HandlerResult]
                ) -> Callable[[Message, bytes], HandlerResult]:
    """:func:`_guard` for a handler that needs the caller (its OS credentials)."""
    def handler(msg: Message, peer: bytes) -> HandlerResult:
        return _guard(lambda m: fn(m, peer))(msg, peer)
    return handler


class NicProcess:
    """The NIC's sockets, stats region and loop around one :class:`Nic`."""

    def __init__(self, run: str, rundir: str | Path, specs: Sequence[NetdevSpec], *,
                 watch_parent: bool = True, launcher_uid: int | None = None) -> None:
        """Create the stats region, the device and the sockets (cleans up if any fails).

        The control socket serves only the kernel and the run's launcher: peers whose uid
        (what the OS says about the connection) is ``launcher_uid`` (default: ours, the
        uid the launcher started us with).  Anyone else gets EPERM: apps reach the NIC only
        through the kernel, as on Linux."""
        self.run_id = run
        self.launcher_uid = os.geteuid() if launcher_uid is None else launcher_uid
        self.stopping = False
        self.ppid = os.getppid() if watch_parent else None
        self._closers: list[Callable[[], None]] = []
        #: pidfd on the kernel, once it said hello
        self.watch: Watchlist[str] = Watchlist()
        self.kernel_gone = False
        self._kernel_peer: bytes | None = None
        self._closers.append(self.watch.close)
        try:
            shape = nicif.stats_block_shape()
            self.stats_region = Region.create(region_name(run, "nic", "stats"),
                                              nicif.stats_block_bytes())
            self._closers.append(self.stats_region.close)
            stats = self.stats_region.array(np.int64, 0, int(np.prod(shape))).reshape(shape)
            self.nic = Nic(specs, stats)
            self._closers.insert(0, self.nic.close)
            for d in self.nic.netdevs.values():
                if d.spec.port == "tap":
                    ifname = nicif.tap_ifname(run, d.index)
                    self.nic.add_port(d.name, open_tap(ifname), ifname)
                    log.info("%s: wire plugged into TAP device %s", d.name, ifname)
            self.server = ControlServer(ipc_endpoint(rundir, "nic"), self._handlers(),
                                        role="nic", admit=self._admit)
            self._closers.insert(0, self.server.close)
            self.events = EventReceiver(ipc_endpoint(rundir, "nic-events"))
            self._closers.insert(0, self.events.close)
            self.irq = EventSender(ipc_endpoint(rundir, "kernel-events"))
            self._closers.insert(0, self.irq.close)
        except BaseException:
            self.close()
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.server.socket, zmq.POLLIN)
        self.poller.register(self.events.socket, zmq.POLLIN)
        #: TAP fds in the poller: a frame from Linux wakes an idle loop
        self._port_fds: set[int] = set()

    # -- handlers --------------------------------------------------------------------

    def _handlers(self) -> dict[str, Callable[[Message, bytes], HandlerResult]]:
        nic = self.nic

        def probe(m: Message) -> HandlerResult:
            return {"netdevs": nic.probe(), "stats_region": self.stats_region.name}

        def dma_map(m: Message, peer: bytes) -> HandlerResult:
            """A descriptor is the caller's: its pid is what the OS says of the connection
            (the NIC serves only the kernel and the launcher), never a message field."""
            b = m.body
            cred = peer_cred(peer)
            inode = (b["dev"], b["ino"]) if b["fd"] >= 0 else None
            return {"map_id": nic.dma_map(b["name"], b["size"], fd=b["fd"], inode=inode,
                                          holder=cred.pid if cred is not None else 0)}

        def dma_unmap(m: Message) -> HandlerResult:
            more = m.body["more"]
            if any(not isinstance(i, int) or isinstance(i, bool) for i in more):
                raise Misuse("more: map ids are integers", errno.EINVAL)
            first: ZcrxError | None = None
            for map_id in (m.body["map_id"], *more):
                try:
                    nic.dma_unmap(map_id)
                except ZcrxError as e:
                    if not more:
                        raise
                    first = first or e
            if first is not None:
                raise first
            return None

        def queue_start(m: Message) -> HandlerResult:
            b = m.body
            for map_id in b["unmap"]:  # a restart's old page pool: one command, not two
                if not isinstance(map_id, int) or isinstance(map_id, bool):
                    raise Misuse(f"unmap: map id {map_id!r} is not an integer", errno.EINVAL)
                try:
                    nic.dma_unmap(map_id)
                except ZcrxError as e:
                    log.warning("queue_start: map %d not removed: %s", map_id, e)
            nic.queue_start(b["dev"], b["queue"], b["map_id"], b["ring_size"], b["slot_size"])
            log.info("%s queue %d started (map %d, ring %d, slot %d)", b["dev"], b["queue"],
                     b["map_id"], b["ring_size"], b["slot_size"])
            return None

        def queue_stop(m: Message) -> HandlerResult:
            done = nic.queue_stop(m.body["dev"], m.body["queue"])
            log.info("%s queue %d stopped after %d completions", m.body["dev"], m.body["queue"],
                     done)
            return {"completed": done}

        def ethtool(m: Message) -> HandlerResult:
            return nic.ethtool(m.body["dev"], m.body["request"])

        def tx_start(m: Message) -> HandlerResult:
            b = m.body
            nic.tx_start(b["dev"], b["map_id"], b["ring_size"], b["slot_size"])
            log.info("%s TX ring attached (map %d, ring %d, slot %d)", b["dev"], b["map_id"],
                     b["ring_size"], b["slot_size"])
            return None

        def tx_stop(m: Message) -> HandlerResult:
            return {"sent": nic.tx_stop(m.body["dev"])}

        def ctl_start(m: Message) -> HandlerResult:
            b = m.body
            nic.ctl_start(b["dev"], b["map_id"], b["ring_size"], b["slot_size"])
            return None

        def ctl_stop(m: Message) -> HandlerResult:
            nic.ctl_stop(m.body["dev"])
            return None

        def link(m: Message) -> HandlerResult:
            nic.set_link(m.body["dev"], m.body["up"])
            return None

        def traffic(m: Message) -> HandlerResult:
            sid = nic.add_traffic(m.body["dev"], m.body["spec"])
            log.info("generator %d on %s: %s", sid, m.body["dev"], m.body["spec"])
            return {"source": sid}

        def wire_gw(m: Message) -> HandlerResult:
            sid, port = nic.add_wire(m.body["dev"], m.body["port"], m.body["host"])
            log.info("wire gateway %d on %s listening on %s:%d", sid, m.body["dev"],
                     m.body["host"], port)
            return {"source": sid, "port": port}

        def pcap(m: Message) -> HandlerResult:
            src = nic.add_pcap(m.body["dev"], m.body)
            log.info("pcap replay %d on %s: %s (%d frames, %d flows)", src.id, m.body["dev"],
                     src.path, len(src.plan.lengths), src.plan.flows)
            return {"source": src.id, "frames": len(src.plan.lengths),
                    "flows": src.plan.flows}

        def capture_start(m: Message) -> HandlerResult:
            b = m.body
            cid = nic.capture_start(b["dev"], b["path"], queue=b["queue"], count=b["count"],
                                    snaplen=b["snaplen"])
            log.info("capture %d of %s (queue %d) to %s", cid, b["dev"], b["queue"], b["path"])
            return {"capture": cid}

        def capture_status(m: Message) -> HandlerResult:
            return nic.capture_status(m.body["capture"])

        def capture_stop(m: Message) -> HandlerResult:
            return nic.capture_stop(m.body["capture"])

        def sources(m: Message) -> HandlerResult:
            return {"sources": nic.sources_progress()}

        def source_stop(m: Message) -> HandlerResult:
            nic.source_stop(m.body["source"])
            return None

        table: dict[str, Callable[[Message], HandlerResult]] = {
            "nic.probe": probe, "nic.dma_unmap": dma_unmap,
            "nic.queue_start": queue_start, "nic.queue_stop": queue_stop,
            "nic.ethtool": ethtool, "nic.link": link, "nic.traffic": traffic,
            "nic.wire": wire_gw, "nic.sources": sources, "nic.source_stop": source_stop,
            "nic.pcap": pcap, "nic.capture_start": capture_start,
            "nic.capture_status": capture_status, "nic.capture_stop": capture_stop,
            "nic.tx_start": tx_start, "nic.tx_stop": tx_stop,
            "nic.ctl_start": ctl_start, "nic.ctl_stop": ctl_stop,
        }
        out = {name: _guard(fn) for name, fn in table.items()}
        out["nic.dma_map"] = _guard_peer(dma_map)
        out["hello"] = self._on_hello
        out["bye"] = self._on_bye
        return out

    def _admit(self, peer: Peer, mtype: str) -> bool:
        """Only the kernel and the launcher (the launcher's uid, by the OS's word)."""
        cred = peer.cred
        return cred is not None and cred.uid == self.launcher_uid

    def _on_hello(self, m: Message, peer: bytes) -> HandlerResult:
        """``hello`` (replaces the server's built-in one): a kernel introducing itself is
        watched through a pidfd from now on."""
        b = m.body
        if b["version"] != PROTOCOL_VERSION:
            raise Misuse(f"peer speaks protocol {b['version']}, server {PROTOCOL_VERSION}",
                         errno.EPROTO)
        cred = peer_cred(peer)
        pid = cred.pid if cred is not None else b["pid"]  # the OS's word over the message's
        if b["role"] == "kernel" and pid > 0:
            self._forget_kernel()
            fd = self.watch.add("kernel", pid)
            if fd >= 0:
                self.poller.register(fd, zmq.POLLIN)
            self._kernel_peer = peer
            log.info("kernel is pid %d (watched)", pid)
        return {"role": "nic", "pid": os.getpid(), "version": PROTOCOL_VERSION}

    def _on_bye(self, m: Message, peer: bytes) -> HandlerResult:
        """``bye`` from the kernel: an orderly exit (driver unbound), not a death: stop
        watching it; the NIC keeps running until told to stop."""
        if peer == self._kernel_peer:
            self._forget_kernel()
            log.info("kernel said bye")
        return None

    def _forget_kernel(self) -> None:
        fd = self.watch.discard("kernel")
        if fd >= 0:
            self.poller.unregister(fd)
        self._kernel_peer = None

    # -- loop ------------------------------------------------------------------------

    def _serve(self) -> bool:
        """Answer queued requests and doorbells without waiting; True if there were any."""
        did = False
        if _readable(self.server.socket):
            try:
                did = self.server.process_pending() > 0
            except Exception:  # a handler bug: already answered with EIO and logged
                did = True
        if _readable(self.events.socket):
            for ev in self.events.drain():
                did = True
                if ev.type == "nic.doorbell":
                    self.nic.doorbell(ev.body["dev"], ev.body["queue"])
                elif ev.type == "nic.tx_doorbell":
                    self.nic.tx_doorbell(ev.body["dev"])
        return did

    def _flush_irqs(self) -> None:
        for dev, queue in self.nic.take_irqs():
            self.irq.send("irq", {"dev": dev, "queue": queue})

    def _parent_gone(self) -> bool:
        if self.ppid is not None and os.getppid() != self.ppid:
            log.warning("parent %d is gone: exiting", self.ppid)
            return True
        return False

    def _kernel_died(self) -> bool:
        """Check the kernel's pidfd; on its death stop every queue and source (no DMA into
        mappings nobody vouches for anymore) and drop every mapping."""
        if not self.watch.reap():
            return False
        self.kernel_gone = True
        log.warning("kernel is gone: stopping all DMA and exiting")
        self.nic.close()
        return True

    def loop(self) -> None:
        """Run until SIGTERM/SIGINT, the parent's death or the kernel's."""
        backoff = Backoff()
        n = 0
        while not self.stopping:
            handled = self._serve()
            if self.nic.iommu.retired:  # unmapped by the commands just answered
                self.nic.iommu.reap()
            if self._kernel_died():
                break
            work = self.nic.step()
            self._flush_irqs()
            n += 1
            if work or handled:
                backoff.reset()
                if n % _PPID_EVERY == 0 and self._parent_gone():
                    break
                continue
            if self._parent_gone():
                break
            if self.nic.irq_timers:  # coalesced completions: the rx-usecs timer runs
                backoff.idle()
                continue
            active = self.nic.active
            if active and not backoff.sleeping and not self.nic.starved:
                backoff.idle()
                continue
            if self.nic.tx_arm():  # TX frames arrived while we decided to sleep
                continue
            self._watch_ports()
            self.poller.poll(WAIT_POLL_MS if active else IDLE_POLL_MS)
            self.nic.tx_disarm()

    def _watch_ports(self) -> None:
        """Poll the TAP fds of ports that would read (one holding MAX_PENDING frames for a
        paused queue does not: its fd stays readable and would spin the loop)."""
        want = set(self.nic.port_fds())
        for fd in self._port_fds - want:
            self.poller.unregister(fd)
        for fd in want - self._port_fds:
            self.poller.register(fd, zmq.POLLIN)
        self._port_fds = want

    def stop(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: finish the current iteration, then leave the loop."""
        self.stopping = True

    def close(self) -> None:
        """Close sockets, stop the device, unlink the stats region (idempotent)."""
        for fd in getattr(self, "_port_fds", ()):
            self.poller.unregister(fd)
        self._port_fds = set()
        closers, self._closers = self._closers, []
        for fn in closers:
            try:
                fn()
            except Exception:
                log.exception("cleanup step failed")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nic_proc", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run id (names the shm regions)")
    p.add_argument("--rundir", required=True, help="run directory (holds the ipc sockets)")
    p.add_argument("--netdev", action="append", default=[], metavar="SPEC",
                   help="netdev spec NAME[:key=value,...], repeatable (default eth0)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--tag", default="", help="zcrx:<run_id>:<role> (set by the launcher)")
    p.add_argument("--launcher-uid", type=int, default=None,
                   help="uid of the run's launcher: only it and the kernel may use the "
                        "control socket (default: ours)")
    p.add_argument("--detached", action="store_true",
                   help="keep running when the process that started us exits "
                        "(zcrx up --detach); by default the NIC exits with its parent")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format=f"%(asctime)s nic[{os.getpid()}] %(levelname)s %(message)s")
    try:
        specs = [NetdevSpec.parse(s) for s in args.netdev]
    except Misuse as e:
        log.error("%s", e)
        return 2
    try:
        proc = NicProcess(args.run, args.rundir, specs, watch_parent=not args.detached,
                          launcher_uid=args.launcher_uid)
    except (Misuse, zmq.ZMQError) as e:
        log.error("cannot start: %s", e)
        return 1
    signal.signal(signal.SIGTERM, proc.stop)
    signal.signal(signal.SIGINT, proc.stop)
    names = ", ".join(d.name for d in proc.nic.netdevs.values())
    log.info("up: netdevs %s; control %s; stats %s", names, proc.server.endpoint,
             proc.stats_region.name)
    status = 0
    try:
        proc.loop()
    except Exception:
        log.exception("NIC loop failed")
        status = 1
    finally:
        proc.close()
        log.info("down")
    return status
