"""Topology as data: what a run is made of, read from TOML and validated before anything starts.

A topology file describes one emulated host::

    name = "zc"                                   # run name (``zcrx up --name`` overrides)
    kernel = "7.3"                                # Linux release emulated (7.1, 7.2, 7.3)

    [[netdev]]                                    # started first, by the NIC process
    name = "eth0"
    queues = 2
    mtu = 4136
    ethtool = ["-N eth0 flow-type tcp4 dst-port 8000 action 1"]   # applied in order

    # port = "tap"                               # the wire is a TAP device in the run's
    # nobuf = "drop"                              # netns (root); drop when out of buffers;
    # loss = "1%"                                 # impairments: loss, dup, reorder, delay, tx_loss

    [[app]]                                       # started detached, after the netdevs
    program = "zcrx-server"
    args = ["-p", "8000", "-q", "1", "--json", "{rundir}/zc.json"]
    cap_net_admin = true                          # granted by the launcher (default false)

    [[traffic]]                                   # started last
    kind = "generator"                            # or "wire"
    dev = "eth0"
    flows = 1
    port = 8000
    bytes = 67108864

``{rundir}`` and ``{name}`` in app arguments are replaced by the run directory and the run
name when the app starts.  :meth:`Topology.from_toml` rejects unknown keys, bad types, apps
that do not exist, ethtool strings that do not parse, and references to undeclared netdevs,
each with one clear line (:class:`TopologyError`, ``EINVAL``).  This module is plain data:
no processes, no shared memory (the launcher owns only the run directory; the topology is
stored in its manifest as :meth:`Topology.to_dict`).  Netdevs use the one netdev grammar,
:class:`shared.nicif.NetdevSpec` (ranges are checked here, before anything starts), which
the NIC parses too.
"""

from __future__ import annotations

import errno
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import abi
from shared.errors import Misuse
from shared.nicif import NetdevSpec

#: The sample programs ``zcrx app run`` and topology files can start (program -> module).
APPS = {"copy-server": "app_proc.copy_server", "zcrx-server": "app_proc.zcrx_server"}

#: Netdev keys of a topology file (every :class:`shared.nicif.NetdevSpec` option) and the
#: TOML types each accepts (booleans may also be written as their on/off words).
NETDEV_OPTIONS: dict[str, tuple[type, ...]] = {
    k: (bool, str) if t is bool else (t,) for k, t in NetdevSpec.option_types().items()}
NETDEV_OPTIONS["nobuf"] = (str,)  # nobuf = "drop" is pause = false
TRAFFIC_KINDS = ("generator", "wire")


#: ``zcrx up``'s kernel release when nothing says: the newest the emulator knows.
DEFAULT_KERNEL = abi.kernel_version_name(abi.LINUX_VERSION)

class TopologyError(Misuse):
    """A topology file that cannot be realised (EINVAL), found before anything starts."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, errno=errno.EINVAL)


def _type_name(types: tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", str: "a string", float: "a number",
             list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


class _Table:
    """Checked access to one TOML table; every key must be consumed or it is unknown."""

    def __init__(self, where: str, d: Any) -> None:
        if not isinstance(d, dict):
            raise TopologyError(f"{where}: must be a table, not {type(d).__name__}")
        self.where = where
        self.d = d
        self.used: set[str] = set()

    def get(self, key: str, types: tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.d:
            if required:
                raise TopologyError(f"{self.where}: missing key {key!r}")
            return default
        v = self.d[key]
        # bool is an int subclass: only accept it where a boolean is meant.
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if float in types and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise TopologyError(f"{self.where}: {key} must be {_type_name(types)}, "
                                f"not {type(v).__name__} {v!r}")
        return v

    def str_list(self, key: str) -> list[str]:
        v = self.get(key, (list,), [])
        if not all(isinstance(s, str) for s in v):
            raise TopologyError(f"{self.where}: {key} must be a list of strings")
        return list(v)

    def done(self, extra: set[str] | None = None) -> None:
        allowed = self.used | (extra or set())
        unknown = sorted(set(self.d) - allowed)
        if unknown:
            raise TopologyError(f"{self.where}: unknown key {unknown[0]!r} "
                                f"(allowed: {', '.join(sorted(allowed))})")


@dataclass
class NetdevConfig:
    """One netdev of the topology: the NIC's spec (:class:`shared.nicif.NetdevSpec`, the
    one netdev grammar) and the ethtool settings applied in order through the kernel once
    the NIC and kernel are up."""

    spec: NetdevSpec = field(default_factory=NetdevSpec)
    ethtool: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        d = self.spec.to_dict()
        if self.ethtool:
            d["ethtool"] = list(self.ethtool)
        return d


@dataclass
class AppSpec:
    """A sample program started detached (as ``app:N``, N in file order) after the netdevs."""

    program: str
    args: list[str] = field(default_factory=list)
    #: CAP_NET_ADMIN granted by the launcher (zcrx-server binding a hardware queue needs it)
    cap_net_admin: bool = False

    @property
    def module(self) -> str:
        return APPS[self.program]

    def argv(self, rundir: str, name: str) -> list[str]:
        """The arguments with ``{rundir}`` and ``{name}`` filled in."""
        return [a.replace("{rundir}", rundir).replace("{name}", name) for a in self.args]

    def to_dict(self) -> dict[str, Any]:
        return {"program": self.program, "args": list(self.args),
                "cap_net_admin": self.cap_net_admin}


@dataclass
class TrafficSpec:
    """A traffic source started last: the generator (TCP flows of the verifiable pattern)
    or the wire gateway (a loopback TCP listener whose connections become flows)."""

    kind: str = "generator"
    dev: str = "eth0"
    flows: int = 1
    port: int = 8000
    sport: int | None = None
    bytes: int = 64 << 20
    seconds: float = 0.0
    rate: float = 0.0
    payload: int = 0
    ipv6: bool = False

    def request(self) -> tuple[str, dict[str, Any]]:
        """The NIC control message that starts this source: (type, body)."""
        if self.kind == "wire":
            return "nic.wire", {"dev": self.dev, "port": self.port}
        spec: dict[str, Any] = {"dport": self.port, "flows": self.flows,
                                "family": 6 if self.ipv6 else 4}
        # bytes = 0 is "unbounded, until seconds" here, as in `zcrx traffic --help`; to the
        # NIC an absent length is unbounded and 0 an empty flow (SYN then FIN).
        for key, val in (("bytes", self.bytes), ("duration", self.seconds), ("rate", self.rate),
                         ("payload", self.payload), ("sport", self.sport)):
            if val:
                spec[key] = val
        return "nic.traffic", {"dev": self.dev, "spec": spec}

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "wire":
            return {"kind": "wire", "dev": self.dev, "port": self.port}
        d: dict[str, Any] = {"kind": self.kind, "dev": self.dev, "flows": self.flows,
                             "port": self.port, "bytes": self.bytes}
        for key in ("sport", "seconds", "rate", "payload", "ipv6"):
            v = getattr(self, key)
            if v:
                d[key] = v
        return d


@dataclass
class Topology:
    """A whole host: netdevs (NIC + kernel), then apps, then traffic sources."""

    name: str = "zcrx"
    netdevs: list[NetdevConfig] = field(default_factory=list)
    apps: list[AppSpec] = field(default_factory=list)
    traffic: list[TrafficSpec] = field(default_factory=list)
    #: The Linux release the emulated kernel behaves as (``kernel = "7.1"``; docs/design.md
    #: "Kernel versions"): RQ layout, query results, which ctrl ops exist.
    kernel: str = DEFAULT_KERNEL

    # -- reading ------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, source: str | Path, *, text: str | None = None) -> Topology:
        """Parse and validate a topology file (or ``text``, with ``source`` naming it in
        errors).  Raises :class:`TopologyError` with one line on any problem."""
        where = str(source)
        if text is None:
            try:
                text = Path(source).read_text()
            except OSError as e:
                raise TopologyError(f"{where}: {e.strerror or e}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TopologyError(f"{where}: not valid TOML: {e}") from None
        return cls.from_dict(data, where=where)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "topology") -> Topology:
        """Validate a plain dict (the TOML document, or :meth:`to_dict` output)."""
        top = _Table(where, data)
        name = top.get("name", (str,), "zcrx")
        _check_run_name(where, name)
        kernel = top.get("kernel", (str,), DEFAULT_KERNEL)
        netdevs = [_netdev(f"{where}: netdev[{i}]", d)
                   for i, d in enumerate(_array(top, "netdev"))]
        apps = [_app(f"{where}: app[{i}]", d) for i, d in enumerate(_array(top, "app"))]
        traffic = [_traffic(f"{where}: traffic[{i}]", d)
                   for i, d in enumerate(_array(top, "traffic"))]
        top.done()
        topo = cls(name=name, netdevs=netdevs or [NetdevConfig()], apps=apps,
                   traffic=traffic, kernel=kernel)
        topo.validate(where)
        return topo

    def validate(self, where: str = "topology") -> None:
        """Cross-checks: unique netdev names, ethtool strings that parse and name a declared
        netdev, traffic on declared netdevs."""
        from launch import ethtool as et

        try:
            abi.parse_kernel_version(self.kernel)
        except ValueError as e:
            raise TopologyError(f"{where}: {e}") from None
        for i, nd in enumerate(self.netdevs):
            try:
                nd.spec.validate()
            except Misuse as e:
                raise TopologyError(f"{where}: netdev[{i}]: {e}") from None
        names = [n.name for n in self.netdevs]
        if len(set(names)) != len(names):
            raise TopologyError(f"{where}: netdev names repeat: {', '.join(names)}")
        for i, nd in enumerate(self.netdevs):
            for s in nd.ethtool:
                try:
                    req = et.parse(shlex.split(s))
                except (et.EthtoolUsageError, ValueError) as e:
                    raise TopologyError(f"{where}: netdev[{i}] ethtool {s!r}: {e}") from None
                if req.get("dev") not in names:
                    raise TopologyError(f"{where}: netdev[{i}] ethtool {s!r}: no netdev "
                                        f"{req.get('dev')!r} in this topology")
        for i, t in enumerate(self.traffic):
            if t.dev not in names:
                raise TopologyError(f"{where}: traffic[{i}]: no netdev {t.dev!r} in this "
                                    "topology")

    # -- writing ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data (TOML/JSON-able) that :meth:`from_dict` reads back to an equal object."""
        d: dict[str, Any] = {"name": self.name,
                             "netdev": [n.to_dict() for n in self.netdevs]}
        if self.kernel != DEFAULT_KERNEL:
            d["kernel"] = self.kernel
        if self.apps:
            d["app"] = [a.to_dict() for a in self.apps]
        if self.traffic:
            d["traffic"] = [t.to_dict() for t in self.traffic]
        return d

    def netdev_specs(self) -> list[str]:
        """The NIC's ``--netdev`` strings, one per netdev."""
        return [n.spec.format() for n in self.netdevs]


def _check_run_name(where: str, name: str) -> None:
    if not name or len(name) > 32 or not all(c.isalnum() or c in "_-" for c in name):
        raise TopologyError(f"{where}: bad name {name!r}: up to 32 letters, digits, '_' or '-'")


def _array(top: _Table, key: str) -> list[Any]:
    v = top.get(key, (list,), [])
    return list(v)


def _netdev(where: str, d: Any) -> NetdevConfig:
    t = _Table(where, d)
    name = t.get("name", (str,), required=True)
    opts: dict[str, Any] = {}
    for key, types in NETDEV_OPTIONS.items():
        v = t.get(key, types)
        if v is not None:
            opts[key] = v
    ethtool = t.str_list("ethtool")
    t.done()
    try:
        spec = NetdevSpec.from_options(name, opts)
    except Misuse as e:
        raise TopologyError(f"{where}: {e}") from None
    return NetdevConfig(spec=spec, ethtool=ethtool)


def _app(where: str, d: Any) -> AppSpec:
    t = _Table(where, d)
    program = t.get("program", (str,), required=True)
    if program not in APPS:
        raise TopologyError(f"{where}: unknown program {program!r} "
                            f"(one of {', '.join(sorted(APPS))})")
    args = t.str_list("args")
    cap = t.get("cap_net_admin", (bool,), False)
    t.done()
    return AppSpec(program=program, args=args, cap_net_admin=bool(cap))


def _traffic(where: str, d: Any) -> TrafficSpec:
    t = _Table(where, d)
    kind = t.get("kind", (str,), "generator")
    if kind not in TRAFFIC_KINDS:
        raise TopologyError(f"{where}: kind must be one of {', '.join(TRAFFIC_KINDS)}, "
                            f"not {kind!r}")
    spec = TrafficSpec(kind=kind, dev=t.get("dev", (str,), "eth0"))
    if kind == "wire":
        spec.port = t.get("port", (int,), 0)
        if not 0 <= spec.port <= 65535:
            raise TopologyError(f"{where}: port {spec.port} not in [0, 65535]")
        t.done()
        return spec
    spec.flows = t.get("flows", (int,), 1)
    spec.port = t.get("port", (int,), 8000)
    spec.sport = t.get("sport", (int,), None)
    spec.bytes = t.get("bytes", (int,), 64 << 20)
    spec.seconds = float(t.get("seconds", (float,), 0.0))
    spec.rate = float(t.get("rate", (float,), 0.0))
    spec.payload = t.get("payload", (int,), 0)
    spec.ipv6 = t.get("ipv6", (bool,), False)
    t.done()
    if not 1 <= spec.flows <= 4096:
        raise TopologyError(f"{where}: flows {spec.flows} not in [1, 4096]")
    for key in ("port", "sport"):
        v = getattr(spec, key)
        if v is not None and not 1 <= v <= 65535:
            raise TopologyError(f"{where}: {key} {v} not in [1, 65535]")
    if spec.bytes < 0 or spec.seconds < 0 or spec.rate < 0 or spec.payload < 0:
        raise TopologyError(f"{where}: bytes, seconds, rate and payload must not be negative")
    if spec.bytes == 0 and spec.seconds == 0:
        raise TopologyError(f"{where}: bytes = 0 needs seconds")
    return spec
