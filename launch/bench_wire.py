"""``zcrx bench wire``: a real Linux sender through a TAP port into a zero-copy queue.

One run (root only, :mod:`launch.port`): netdev ``eth0`` with ``port=tap``, MTU 4136 (4096
bytes of TCP payload per frame), ``nobuf`` and impairments as asked; port 8000 steered to
queue 1 (``-N eth0 flow-type tcp4 dst-port 8000 action 1``), where ``zcrx-server``
(CAP_NET_ADMIN granted) receives zero copy, hashing what it gets.  ``nc -N 10.0.0.1 8000``
in the run's peer namespace sends a file of random bytes through Linux's own TCP: its
window, its retransmissions, its congestion control.  The run is brought down afterwards
whatever happens.

Figures: GB/s = bytes / the time ``nc`` took (connect to the emulated host's close, so every
byte was acknowledged); the sender's retransmitted segments (``RetransSegs`` of the peer
namespace's ``/proc/net/snmp``, a namespace of its own, so nothing else counts there); the
NIC's ``rx_missed`` and the port's ``port_rx_lost``; sha256 of what the app received
against the file.  Needs the emulated kernel's transmit side (SYN-ACK, ACKs): without it
``nc`` never connects and the bench fails after its timeout, saying so.

``--client iperf3`` (or ``both``): ``iperf3 -c 10.0.0.1 -p 5201 -n BYTES -J`` against
``zcrx-server --iperf3`` on the same kind of run (port 5201 steered to queue 1); figures are
iperf3's own (the receiver's rate as the server reported its bytes and times, the sender's
``retransmits``) beside the server's zero-copy byte count; ok when iperf3 exits 0 without
an error and sent == received == zero-copied bytes (iperf3 sends whole blocks, so with
``-n`` it may send up to a block more than asked).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import Misuse, ZcrxError

if TYPE_CHECKING:
    from shared.nicif import NetdevSpec

__all__ = ["describe", "run_wire_bench", "run_wire_iperf3"]

PORT = 8000
QUEUE = 1
MTU = 4136


def _snmp_tcp(ns: str) -> dict[str, int]:
    """The Tcp counters of namespace ``ns`` (``/proc/net/snmp``)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
                         capture_output=True, text=True, timeout=10).stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("Tcp:")]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0], rows[1], strict=False)}


def _wire_spec(program: str, what: str, nobuf: str, loss: str, seed: int) -> NetdevSpec:
    """The TAP-port netdev a wire bench runs on, after checking this host can run it (root,
    ``ip``, ``program`` installed; :class:`Misuse` otherwise)."""
    from launch import port
    from shared.nicif import NetdevSpec

    port.check_can()
    if shutil.which(program) is None:
        raise Misuse(f"bench wire needs {what}", errno=2)
    return NetdevSpec.from_options("eth0", {"queues": 2, "mtu": MTU, "port": "tap",
                                           "pause": nobuf != "drop", "loss": loss,
                                           "seed": seed})


def run_wire_bench(total: int = 64 << 20, *, nobuf: str = "drop", loss: str = "",
                   seed: int = 1, timeout: float = 300.0,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Send ``total`` random bytes with ``nc`` from the peer namespace into a zero-copy
    queue; the figures (see the module docstring).  :class:`Misuse` if this host cannot."""
    from launch import port
    from launch.supervise import bring_up
    from launch.topology import AppSpec, NetdevConfig, Topology

    say = progress or (lambda _m: None)
    spec = _wire_spec("nc", "nc (netcat-openbsd) to send from the namespace", nobuf, loss,
                      seed)
    name = f"wire-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="zcrxwire") as tmp:
        src = Path(tmp) / "send.bin"
        data = np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8).tobytes()
        src.write_bytes(data)
        want = hashlib.sha256(data).hexdigest()
        del data
        report = Path(tmp) / "zcrx-server.json"
        app = AppSpec("zcrx-server", ["-p", str(PORT), "-i", "eth0", "-q", str(QUEUE),
                                      "-n", "1", "--json", str(report)], cap_net_admin=True)
        topo = Topology(name=name, netdevs=[NetdevConfig(
            spec, [f"-N eth0 flow-type tcp4 dst-port {PORT} action {QUEUE}"])], apps=[app])
        say("bringing the run up")
        run, _ = bring_up(topo, detach=False, launcher=False, config={"bench": "wire"})
        try:
            ns = port.netns_name(run.run_id)
            before = _snmp_tcp(ns)
            say(f"nc sends {total} bytes from {ns}")
            t0 = time.monotonic()
            with open(src, "rb") as f:
                try:
                    nc = subprocess.run(["ip", "netns", "exec", ns, "nc", "-N", "10.0.0.1",
                                         str(PORT)], stdin=f, capture_output=True,
                                        timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise Misuse(f"nc did not finish in {timeout:.0f} s (does the emulated "
                                 f"kernel answer SYNs? it needs the transmit side)",
                                 errno=110) from None
            secs = time.monotonic() - t0
            after = _snmp_tcp(ns)
            deadline = time.monotonic() + 30
            entry = run.m.procs["app:0"]
            while entry.process() is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            from launch import ethtool as et
            from shared.control import ControlClient

            with ControlClient(run.endpoint("kernel"), timeout_ms=10_000) as k:
                stats = dict(k.call("ethtool", {"dev": "eth0", "request": et.parse(
                    ["-S", "eth0"])}).get("stats", []))
            rep = json.loads(report.read_text()) if report.exists() else {}
        finally:
            run.down()
    conns = rep.get("connections", [])
    got = conns[0] if conns else {}
    return {"bytes": total, "seconds": secs, "gbps": total / secs / 1e9 if secs else None,
            "nc_status": nc.returncode,
            "retrans_segs": after.get("RetransSegs", 0) - before.get("RetransSegs", 0),
            "out_segs": after.get("OutSegs", 0) - before.get("OutSegs", 0),
            "rx_missed": int(stats.get("rx_missed", 0)),
            "port_rx_lost": int(stats.get("port_rx_lost", 0)),
            "port_rx_frames": int(stats.get("port_rx_frames", 0)),
            "received": got.get("bytes"), "sha256_ok": got.get("sha256") == want,
            "zc_bytes": rep.get("copy_fallback", {}).get("zc_bytes"),
            "nobuf": nobuf, "loss": loss or "0%", "seed": seed,
            "ok": bool(nc.returncode == 0 and got.get("bytes") == total
                       and got.get("sha256") == want)}


IPERF3_PORT = 5201


def run_wire_iperf3(total: int = 64 << 20, *, nobuf: str = "drop", loss: str = "",
                    seed: int = 1, timeout: float = 300.0,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``iperf3 -c 10.0.0.1 -n total -J`` from the peer namespace against ``zcrx-server
    --iperf3`` on the bound queue: iperf3's own figures (receiver rate, the sender's
    retransmits) beside what the server received zero copy.  :class:`Misuse` if this host
    cannot."""
    from launch import port
    from launch.supervise import bring_up
    from launch.topology import AppSpec, NetdevConfig, Topology

    say = progress or (lambda _m: None)
    spec = _wire_spec("iperf3", "iperf3", nobuf, loss, seed)
    name = f"wire-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="zcrxwire") as tmp:
        report = Path(tmp) / "zcrx-server.json"
        app = AppSpec("zcrx-server", ["--iperf3", "-p", str(IPERF3_PORT), "-i", "eth0",
                                      "-q", str(QUEUE), "-n", "1", "--json", str(report)],
                      cap_net_admin=True)
        topo = Topology(name=name, netdevs=[NetdevConfig(
            spec, [f"-N eth0 flow-type tcp4 dst-port {IPERF3_PORT} action {QUEUE}"])],
            apps=[app])
        say("bringing the run up")
        run, _ = bring_up(topo, detach=False, launcher=False, config={"bench": "wire"})
        try:
            ns = port.netns_name(run.run_id)
            say(f"iperf3 sends {total} bytes from {ns}")
            t0 = time.monotonic()
            try:
                ip3 = subprocess.run(["ip", "netns", "exec", ns, "iperf3", "-c", "10.0.0.1",
                                      "-p", str(IPERF3_PORT), "-n", str(total), "-J"],
                                     capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise Misuse(f"iperf3 did not finish in {timeout:.0f} s", errno=110) from None
            secs = time.monotonic() - t0
            deadline = time.monotonic() + 30
            entry = run.m.procs["app:0"]
            while entry.process() is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            rep = json.loads(report.read_text()) if report.exists() else {}
        finally:
            run.down()
    try:
        client = json.loads(ip3.stdout)
    except ValueError:
        client = {"error": (ip3.stdout + ip3.stderr).strip()[-500:] or "no output"}
    end = client.get("end", {})
    sent = end.get("sum_sent", {})
    recv = end.get("sum_received", {})
    tests = rep.get("iperf3", [])
    server_bytes = tests[0].get("bytes") if tests else None
    zc = rep.get("copy_fallback", {}).get("zc_bytes")
    bps = recv.get("bits_per_second")
    return {"client": "iperf3", "bytes": total, "seconds": secs,
            "gbps": bps / 8e9 if bps else None, "iperf3_status": ip3.returncode,
            "error": client.get("error"), "sent": sent.get("bytes"),
            "received": recv.get("bytes"), "retransmits": sent.get("retransmits"),
            "server_bytes": server_bytes, "zc_bytes": zc,
            "nobuf": nobuf, "loss": loss or "0%", "seed": seed,
            "ok": bool(ip3.returncode == 0 and "error" not in client
                       and sent.get("bytes") == recv.get("bytes") == server_bytes == zc
                       and (zc or 0) >= total)}


def describe(r: dict[str, Any]) -> str:
    """The one-line summary ``zcrx bench wire`` prints (one per client)."""
    gbps = "n/a" if r["gbps"] is None else f"{r['gbps']:.3f}"
    if r.get("client") == "iperf3":
        what = (f"error: {r['error']}" if r.get("error") else
                f"sent {r['sent']}, received {r['received']} (server {r['server_bytes']}, "
                f"zero copy {r['zc_bytes']})")
        return (f"wire: {r['bytes'] / (1 << 20):.0f} MiB from Linux iperf3 through a TAP "
                f"port (nobuf={r['nobuf']}, loss={r['loss']}): {gbps} GB/s (iperf3's "
                f"receiver rate); sender retransmits {r['retransmits']}; {what}")
    return (f"wire: {r['bytes'] / (1 << 20):.0f} MiB from Linux nc through a TAP port "
            f"(nobuf={r['nobuf']}, loss={r['loss']}) in {r['seconds']:.2f} s = {gbps} GB/s; "
            f"sender retransmitted {r['retrans_segs']} of {r['out_segs']} segments; NIC "
            f"rx_missed {r['rx_missed']}, port lost {r['port_rx_lost']}; received "
            f"{r['received']} bytes, sha256 {'ok' if r['sha256_ok'] else 'MISMATCH'}")


if __name__ == "__main__":  # pragma: no cover
    import sys

    try:
        print(describe(run_wire_bench(int(sys.argv[1]) if len(sys.argv) > 1 else 64 << 20)))
    except ZcrxError as e:
        print(f"bench wire: {e}", file=sys.stderr)
        sys.exit(1)
