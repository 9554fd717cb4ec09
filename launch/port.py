"""The run's peer network namespace, where the TAP ports of ``port=tap`` netdevs live.

A run with at least one ``port=tap`` netdev gets one network namespace,
:func:`netns_name` (``zcrx-<run id>-peer``), made by the launcher (root only) before the
NIC starts.  The NIC creates each TAP device (:func:`shared.nicif.tap_ifname`) in the
launcher's namespace; :func:`attach` then moves it into the peer namespace and configures
it as the emulated host's peer on that link (the defaults of
:class:`nic_proc.sources.WireInfo`): for netdev number ``d``, addresses ``10.0.d.2/24`` and
``fd00:0:0:d::2/64``, MAC ``02:00:00:00:dd:02``, the netdev's MTU.  The peer finds the
host's MAC with ARP / neighbour discovery, which the emulated kernel answers; with
``neigh=static`` the launcher writes permanent neighbour entries instead (``10.0.d.1``,
``fd00:0:0:d::1`` -> ``02:00:00:00:dd:01``).  So ``ip netns exec zcrx-<run id>-peer nc
10.0.0.1 PORT < file`` reaches the emulated host.

Everything is named after the run id, so :func:`teardown` (``zcrx down``, ``zcrx
cleanup``) finds it without the launcher's memory: the namespace by name, a TAP device
that never left the launcher's namespace by name.  The TAP devices are not persistent:
they vanish with the NIC's file descriptor, so a killed NIC leaves no device behind.
Uses the ``ip`` command (iproute2).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared.errors import Misuse
from shared.nicif import NetdevSpec, tap_ifname

__all__ = ["NETNS_PREFIX", "attach", "check_can", "create_netns", "list_netns", "netns_name",
           "peer_addresses", "reach_hint", "teardown"]

NETNS_PREFIX = "zcrx-"
NETNS_SUFFIX = "-peer"
_TIMEOUT = 20


def netns_name(run_id: str) -> str:
    """The run's peer network namespace."""
    return f"{NETNS_PREFIX}{run_id}{NETNS_SUFFIX}"


def check_can() -> None:
    """:class:`Misuse` (EPERM / ENOENT) unless this process can make namespaces and TAPs."""
    if os.geteuid() != 0:
        raise Misuse("port=tap needs root: the launcher makes a network namespace and the "
                     "NIC a TAP device (run zcrx as root, or drop port=tap)", errno=1)
    if shutil.which("ip") is None:
        raise Misuse("port=tap needs the ip command (install iproute2)", errno=2)
    if not os.path.exists("/dev/net/tun"):
        raise Misuse("port=tap needs /dev/net/tun (the tun module)", errno=19)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_TIMEOUT)
    if check and r.returncode != 0:
        raise Misuse(f"ip {' '.join(args)}: {r.stderr.strip() or 'failed'}", errno=5)
    return r


def create_netns(run_id: str) -> str:
    """Make the run's peer namespace (its loopback up); its name."""
    ns = netns_name(run_id)
    _ip("netns", "add", ns)
    _ip("-n", ns, "link", "set", "lo", "up")
    return ns


def peer_addresses(spec: NetdevSpec, index: int) -> dict[str, str]:
    """The peer's and the host's addresses on netdev ``index``'s link (host ones from the
    spec when it sets them)."""
    host4 = spec.addr or f"10.0.{index}.1"
    host6 = spec.addr6 or str(ipaddress.IPv6Address(f"fd00:0:0:{index:x}::1"))
    peer4 = str(ipaddress.IPv4Address(host4) + 1)
    peer6 = str(ipaddress.IPv6Address(host6) + 1)
    mac = spec.mac or f"02:00:00:00:{index & 0xFF:02x}:01"
    return {"host4": host4, "host6": host6, "peer4": peer4, "peer6": peer6, "host_mac": mac,
            "peer_mac": f"02:00:00:00:{index & 0xFF:02x}:02"}


def attach(run_id: str, specs: Sequence[NetdevSpec]) -> list[str]:
    """Move the TAP device of every ``port=tap`` netdev into the peer namespace and
    configure it (see the module docstring).  Returns one line per device."""
    ns = netns_name(run_id)
    lines = []
    for index, spec in enumerate(specs):
        if spec.port != "tap":
            continue
        ifname = tap_ifname(run_id, index)
        a = peer_addresses(spec, index)
        _ip("link", "set", "dev", ifname, "netns", ns)
        _ip("-n", ns, "link", "set", "dev", ifname, "address", a["peer_mac"], "mtu",
            str(spec.mtu))
        # No link-local address: the peer's autoconfiguration would only send router
        # solicitations the emulated host has no use for.
        _ip("-n", ns, "link", "set", "dev", ifname, "addrgenmode", "none", check=False)
        _ip("-n", ns, "addr", "add", f"{a['peer4']}/24", "dev", ifname)
        _ip("-n", ns, "addr", "add", f"{a['peer6']}/64", "dev", ifname, "nodad")
        _ip("-n", ns, "link", "set", "dev", ifname, "up")
        if spec.neigh == "static":
            for host in (a["host4"], a["host6"]):
                _ip("-n", ns, "neigh", "replace", host, "lladdr", a["host_mac"], "dev", ifname,
                    "nud", "permanent")
        lines.append(f"{spec.name}: TAP {ifname} in netns {ns} ({a['peer4']}, {a['peer6']}) "
                     f"-> host {a['host4']}, {a['host6']}")
    return lines


def list_netns() -> list[str]:
    """Every zcrx peer namespace on this host (``ip netns list``)."""
    if shutil.which("ip") is None:
        return []
    r = _ip("netns", "list", check=False)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(NETNS_PREFIX) and n.endswith(NETNS_SUFFIX)]


def run_id_of(ns: str) -> str:
    """The run id a peer namespace's name carries."""
    return ns[len(NETNS_PREFIX):-len(NETNS_SUFFIX)]


def teardown(run_ids: Iterable[str], max_netdevs: int = 8) -> list[str]:
    """Delete the peer namespace of each run and any TAP device of it still in ours
    (idempotent; nothing to do without root).  Returns what it removed."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return []
    removed = []
    present = set(list_netns())
    for rid in run_ids:
        ns = netns_name(rid)
        if ns in present and _ip("netns", "del", ns, check=False).returncode == 0:
            removed.append(f"netns {ns}")
        for i in range(max_netdevs):
            ifname = tap_ifname(rid, i)
            if os.path.exists(f"/sys/class/net/{ifname}") and \
                    _ip("link", "del", ifname, check=False).returncode == 0:
                removed.append(f"link {ifname}")
    return removed


def reach_hint(run_id: str, netdevs: Iterable[NetdevSpec | Mapping[str, Any]]) -> list[str]:
    """How to reach the emulated host through each port (``zcrx env`` / ``zcrx status``)."""
    ns = netns_name(run_id)
    out = []
    for index, d in enumerate(netdevs):
        spec = d if isinstance(d, NetdevSpec) else NetdevSpec.from_options(
            d["name"], {k: v for k, v in d.items() if k != "name"})
        if spec.port != "tap":
            continue
        a = peer_addresses(spec, index)
        out.append(f"{spec.name}: ip netns exec {ns} nc {a['host4']} PORT < FILE   "
                   f"(or nc {a['host6']}; TAP {tap_ifname(run_id, index)})")
    return out
