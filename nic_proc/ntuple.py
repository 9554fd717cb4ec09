"""ntuple flow rules (``ethtool -N``) and the combined steering decision: rules first, else RSS.

Pure logic, no I/O.  The NIC process keeps one :class:`Steering` per device, applies the
ethtool requests the kernel forwards (:meth:`Steering.handle`, dict shapes in
``launch/ethtool.py``) and asks :meth:`Steering.steer` for the queue of a batch of flows.

**Rules.**  ``flow-type tcp4|tcp6`` with optional ``src-ip``, ``dst-ip``, ``src-port``,
``dst-port``, each with an optional mask.  Masks have ethtool's command-line meaning: **a
set mask bit means "ignore this bit"**; a field given without a mask must match exactly;
a field not given is ignored entirely (mask all ones).  This is also how ``ethtool -n``
prints them.  The action is a queue, ``-1`` (drop), or ``context C`` with an optional
queue offset added to the queue RSS context C picks (the NIC "adds them together").

**Locations.**  A rule lives at a location of a 1024-entry table.  ``loc N`` places it
there, replacing any rule already at N (ethtool(8): "This will overwrite any rule present
in that location").  Without ``loc`` the table allocates the highest free location,
counting down from 1023, as many drivers do; a full table is ``ENOSPC``.

**Precedence: the lowest location wins.**  Source: the uapi header
``include/uapi/linux/ethtool.h``, ``struct ethtool_rx_flow_spec``, field ``location``:
locations must be numbered such that a flow matching several rules is classified by the
first (lowest-numbered) one -- the order a TCAM searches in.  So of two overlapping rules
the one with the smaller id steers, and deleting it lets the next one match.

**Validation** (``EINVAL`` as Linux returns it): a queue action must be below the number
of RX queues; a context rule needs an existing context and ``offset + max(indir) <
n_queues``; a channel-count reduction below what a rule or a configured indirection table
uses is refused (with the kernel's wording: "requested channel counts are too low for
existing ntuple filter settings").  Deleting or reading an unknown rule is ``ENOENT``;
deleting an RSS context that a rule still uses is ``EBUSY`` (recent kernels refuse this
too; older ones let the rule dangle -- the emulator takes the safe, newer behaviour).

**Generation.**  :attr:`Steering.generation` grows on every successful configuration
change (never on a refused one), so the data path may cache flow -> queue and drop the
cache when the number moves.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from nic_proc.rss import (
    DEFAULT_INDIR_SIZE,
    DEFAULT_RSS_KEY,
    MAX_RSS_CONTEXTS,
    Flows,
    RssConfig,
    SteeringError,
)

__all__ = [
    "ACTION_DROP",
    "FLOW_TYPES",
    "RULE_TABLE_SIZE",
    "NtupleMatch",
    "NtupleRule",
    "NtupleTable",
    "SteerResult",
    "Steering",
    "SteeringError",
]

RULE_TABLE_SIZE = 1024
#: ``action -1``: drop the frame (RX_CLS_FLOW_DISC).
ACTION_DROP = -1
#: Flow types the emulated NIC classifies.
FLOW_TYPES = ("tcp4", "tcp6")
#: Flow types ethtool knows but this NIC does not classify (EOPNOTSUPP).
OTHER_FLOW_TYPES = ("udp4", "sctp4", "ah4", "esp4", "ip4", "udp6", "sctp6", "ah6", "esp6",
                    "ip6", "ether")

I32Array = npt.NDArray[np.int32]


def _ip_int(value: object, v6: bool, what: str) -> int:
    """An address given as text, bytes or int, checked against the rule's family."""
    bits = 128 if v6 else 32
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < (1 << bits):
            raise SteeringError(f"{what} {value} out of range", errno.EINVAL)
        return value
    try:
        if isinstance(value, bytes):
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(value)
        else:
            addr = ipaddress.ip_address(str(value))
    except ValueError:
        raise SteeringError(f"invalid {what} {value!r}", errno.EINVAL) from None
    if addr.version != (6 if v6 else 4):
        raise SteeringError(
            f"{what} {value} is not an IPv{6 if v6 else 4} address", errno.EINVAL)
    return int(addr)


def _port(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
        raise SteeringError(f"invalid {what} {value!r}", errno.EINVAL)
    return value


@dataclass(frozen=True)
class NtupleRule:
    """One classification rule.  Masks: a set bit = ignore that bit (ethtool semantics)."""

    loc: int
    flow_type: str
    src_ip: int = 0
    src_ip_mask: int = -1
    dst_ip: int = 0
    dst_ip_mask: int = -1
    src_port: int = 0
    src_port_mask: int = 0xFFFF
    dst_port: int = 0
    dst_port_mask: int = 0xFFFF
    #: Queue; ACTION_DROP; or the queue offset when ``context`` is not None.
    action: int = 0
    context: int | None = None

    def __post_init__(self) -> None:
        """Canonicalise "all ones" IP masks to the family width."""
        full = (1 << (128 if self.is_v6 else 32)) - 1
        for name in ("src_ip_mask", "dst_ip_mask"):
            if getattr(self, name) == -1:
                object.__setattr__(self, name, full)

    @property
    def is_v6(self) -> bool:
        """True for ``tcp6``."""
        return self.flow_type == "tcp6"

    @property
    def is_drop(self) -> bool:
        """True for ``action -1``."""
        return self.context is None and self.action == ACTION_DROP

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], loc: int) -> NtupleRule:
        """A rule from an ``ntuple-add`` request (keys as in ``launch/ethtool.py``).

        A field with a value but no mask matches exactly; a field absent is ignored; a mask
        given without a value applies to value 0.
        """
        ft = spec.get("flow_type")
        if ft in OTHER_FLOW_TYPES:
            raise SteeringError(f"flow-type {ft} is not supported (tcp4 and tcp6 only)",
                                errno.EOPNOTSUPP)
        if ft not in FLOW_TYPES:
            raise SteeringError(f"unknown flow-type {ft!r}", errno.EINVAL)
        v6 = ft == "tcp6"
        ip_full = (1 << (128 if v6 else 32)) - 1
        fields: dict[str, int] = {}
        for name in ("src_ip", "dst_ip"):
            val, mask = spec.get(name), spec.get(name + "_mask")
            what = name.replace("_", "-")
            fields[name] = 0 if val is None else _ip_int(val, v6, what)
            if mask is not None:
                fields[name + "_mask"] = _ip_int(mask, v6, what + " mask")
            else:
                fields[name + "_mask"] = ip_full if val is None else 0
        for name in ("src_port", "dst_port"):
            val, mask = spec.get(name), spec.get(name + "_mask")
            what = name.replace("_", "-")
            fields[name] = 0 if val is None else _port(val, what)
            if mask is not None:
                fields[name + "_mask"] = _port(mask, what + " mask")
            else:
                fields[name + "_mask"] = 0xFFFF if val is None else 0
        context = spec.get("context")
        action = spec.get("action")
        if context is not None and (not isinstance(context, int) or context < 0):
            raise SteeringError(f"invalid RSS context {context!r}", errno.EINVAL)
        if action is None:
            action = 0
        if not isinstance(action, int) or isinstance(action, bool) or action < ACTION_DROP:
            raise SteeringError(f"unsupported action {action!r}", errno.EINVAL)
        if context is not None and action == ACTION_DROP:
            raise SteeringError("a rule cannot both drop and use an RSS context", errno.EINVAL)
        return cls(loc=loc, flow_type=ft, action=action, context=context, **fields)

    def to_dict(self) -> dict[str, Any]:
        """The rule dict of ``ntuple-get`` replies (see ``launch/ethtool.py``)."""
        fam = ipaddress.IPv6Address if self.is_v6 else ipaddress.IPv4Address
        return {
            "loc": self.loc,
            "flow_type": self.flow_type,
            "src_ip": str(fam(self.src_ip)),
            "src_ip_mask": str(fam(self.src_ip_mask)),
            "dst_ip": str(fam(self.dst_ip)),
            "dst_ip_mask": str(fam(self.dst_ip_mask)),
            "src_port": self.src_port,
            "src_port_mask": self.src_port_mask,
            "dst_port": self.dst_port,
            "dst_port_mask": self.dst_port_mask,
            "action": self.action,
            "context": self.context,
        }


def _ip_words(value: int) -> tuple[int, int]:
    """A 16-byte address field as the two native u64 words of :attr:`Flows.match_words`."""
    w = np.frombuffer(value.to_bytes(16, "big"), dtype=np.uint64)
    return int(w[0]), int(w[1])


def _ip_field(value: int, v6: bool) -> int:
    """Place a 32-bit IPv4 value in bytes 0-3 of the 16-byte field, as :class:`Flows` does."""
    return value if v6 else value << 96


def _rule_words(rule: NtupleRule) -> tuple[list[int], list[int]]:
    """(value, care) words of a rule, laid out like :attr:`Flows.match_words`."""
    full = (1 << (128 if rule.is_v6 else 32)) - 1
    value = [*_ip_words(_ip_field(rule.src_ip, rule.is_v6)),
             *_ip_words(_ip_field(rule.dst_ip, rule.is_v6)),
             (int(rule.is_v6) << 32) | (rule.src_port << 16) | rule.dst_port]
    care = [*_ip_words(_ip_field(~rule.src_ip_mask & full, rule.is_v6)),
            *_ip_words(_ip_field(~rule.dst_ip_mask & full, rule.is_v6)),
            (1 << 32) | ((~rule.src_port_mask & 0xFFFF) << 16) | (~rule.dst_port_mask & 0xFFFF)]
    return value, care


class NtupleMatch(NamedTuple):
    """Per-flow result of :meth:`NtupleTable.match` (all ``int32 [N]``).

    ``loc``: matching rule location, -1 for no match.  ``action``: the rule's queue, -1 for
    drop, or the queue offset of a context rule (-1 where no rule matched).  ``context``:
    the rule's RSS context, -1 when the rule has none or nothing matched.
    """

    loc: I32Array
    action: I32Array
    context: I32Array


class NtupleTable:
    """The rule table: add, delete, list and a vectorised first-match lookup."""

    def __init__(self, size: int = RULE_TABLE_SIZE) -> None:
        """An empty table with ``size`` locations."""
        self.size = size
        self._rules: dict[int, NtupleRule] = {}
        #: Bumped on every successful change.
        self.generation = 0
        self._compiled: dict[str, npt.NDArray[Any]] | None = None

    def __len__(self) -> int:
        """Number of rules."""
        return len(self._rules)

    def copy(self) -> NtupleTable:
        """An independent copy (rules are immutable, so a shallow dict copy suffices)."""
        other = NtupleTable(self.size)
        other._rules = dict(self._rules)
        other.generation = self.generation
        return other

    def rules(self) -> list[NtupleRule]:
        """All rules, lowest location (highest precedence) first."""
        return [self._rules[k] for k in sorted(self._rules)]

    def get(self, loc: int) -> NtupleRule:
        """The rule at ``loc``, or ``ENOENT``."""
        rule = self._rules.get(loc)
        if rule is None:
            raise SteeringError(f"no rule at location {loc}", errno.ENOENT)
        return rule

    def _alloc(self) -> int:
        for loc in range(self.size - 1, -1, -1):
            if loc not in self._rules:
                return loc
        raise SteeringError("rule table is full", errno.ENOSPC)

    def add(self, spec: Mapping[str, Any], n_rx_queues: int | None = None) -> int:
        """Insert a rule from an ``ntuple-add`` spec; return its location.

        With ``n_rx_queues``, a queue action must be below it (``EINVAL``).
        """
        loc = spec.get("loc")
        if loc is None:
            loc = self._alloc()
        elif not isinstance(loc, int) or not 0 <= loc < self.size:
            raise SteeringError(
                f"location {loc} is out of range (the table has {self.size} entries)",
                errno.EINVAL)
        rule = NtupleRule.from_spec(spec, loc)
        if (n_rx_queues is not None and rule.context is None and not rule.is_drop
                and rule.action >= n_rx_queues):
            raise SteeringError(
                f"queue {rule.action} out of range (the device has {n_rx_queues} RX queues)",
                errno.EINVAL)
        self.insert(rule)
        return loc

    def insert(self, rule: NtupleRule) -> None:
        """Place a built rule at its location, replacing whatever was there."""
        if not 0 <= rule.loc < self.size:
            raise SteeringError(f"location {rule.loc} is out of range", errno.EINVAL)
        self._rules[rule.loc] = rule
        self._changed()

    def delete(self, loc: int) -> None:
        """Remove the rule at ``loc`` (``ENOENT`` if there is none)."""
        self.get(loc)
        del self._rules[loc]
        self._changed()

    def _changed(self) -> None:
        self.generation += 1
        self._compiled = None

    def _compile(self) -> dict[str, npt.NDArray[Any]]:
        if self._compiled is None:
            rules = self.rules()
            value = np.zeros((5, len(rules)), dtype=np.uint64)
            care = np.zeros((5, len(rules)), dtype=np.uint64)
            for i, r in enumerate(rules):
                value[:, i], care[:, i] = _rule_words(r)
            self._compiled = {
                "loc": np.array([r.loc for r in rules], dtype=np.int32),
                "value": value, "care": care,
                "action": np.array([r.action for r in rules], dtype=np.int32),
                "context": np.array([-1 if r.context is None else r.context for r in rules],
                                    dtype=np.int32),
            }
        return self._compiled

    def match(self, flows: Flows) -> NtupleMatch:
        """First matching rule (lowest location) per flow, vectorised over flows x rules."""
        n = len(flows)
        none = np.full(n, -1, dtype=np.int32)
        if not self._rules or n == 0:
            return NtupleMatch(none, none.copy(), none.copy())
        c = self._compile()
        words = flows.match_words
        value, care = c["value"], c["care"]
        # A flow matches a rule when no cared-for bit differs in any of the five words.
        diff = (words[0][:, None] ^ value[0][None, :]) & care[0][None, :]
        for w in range(1, 5):
            diff |= (words[w][:, None] ^ value[w][None, :]) & care[w][None, :]
        ok = diff == 0
        first = ok.argmax(axis=1)
        hit = ok[np.arange(n), first]
        return NtupleMatch(np.where(hit, c["loc"][first], -1).astype(np.int32),
                           np.where(hit, c["action"][first], -1).astype(np.int32),
                           np.where(hit, c["context"][first], -1).astype(np.int32))


class SteerResult(NamedTuple):
    """Per-flow steering decision (arrays of length N).

    ``queue``: RX queue, or -1 = drop.  ``loc``: the ntuple rule that decided, -1 = RSS.
    ``context``: RSS context used, -1 when a rule sent the flow to a fixed queue or dropped
    it.  ``hash``: the Toeplitz hash (0 where RSS was not consulted).
    """

    queue: I32Array
    loc: I32Array
    context: I32Array
    hash: npt.NDArray[np.uint32]


class Steering:
    """One device's flow steering: ntuple rules first, else RSS, with a generation counter."""

    def __init__(self, n_rx_queues: int, indir_size: int = DEFAULT_INDIR_SIZE,
                 key: bytes | str = DEFAULT_RSS_KEY, table_size: int = RULE_TABLE_SIZE,
                 max_contexts: int = MAX_RSS_CONTEXTS) -> None:
        """Default state: context 0 with the default table, no rules."""
        self.rss = RssConfig(n_rx_queues, indir_size, key, max_contexts)
        self.ntuple = NtupleTable(table_size)
        self._own_generation = 0

    @property
    def n_rx_queues(self) -> int:
        """Current number of RX queues."""
        return self.rss.n_rx_queues

    @property
    def generation(self) -> int:
        """Grows on every successful configuration change (never on a refused one)."""
        return self._own_generation + self.rss.generation + self.ntuple.generation

    # -- validation ------------------------------------------------------------------------

    @staticmethod
    def _check(rss: RssConfig, table: NtupleTable, what: str = "") -> None:
        n = rss.n_rx_queues
        for rule in table.rules():
            if rule.context is None:
                if not rule.is_drop and rule.action >= n:
                    raise SteeringError(
                        what or f"rule {rule.loc}: queue {rule.action} out of range "
                        f"(the device has {n} RX queues)", errno.EINVAL)
                continue
            if rule.context not in rss.contexts:
                raise SteeringError(
                    f"rule {rule.loc}: RSS context {rule.context} does not exist",
                    errno.EINVAL)
            top = rule.action + rss.max_queue(rule.context)
            if top >= n:
                raise SteeringError(
                    what or f"rule {rule.loc}: RSS context {rule.context} plus offset "
                    f"{rule.action} reaches queue {top}, but the device has {n} RX queues",
                    errno.EINVAL)

    def _commit(self, rss: RssConfig | None = None, table: NtupleTable | None = None,
                what: str = "") -> None:
        new_rss = rss if rss is not None else self.rss
        new_table = table if table is not None else self.ntuple
        self._check(new_rss, new_table, what)
        self.rss = new_rss
        self.ntuple = new_table

    # -- configuration ---------------------------------------------------------------------

    def set_n_rx_queues(self, n: int) -> None:
        """A channel-count change (``ethtool -L``); refused if rules or tables need more."""
        if n < 1:
            raise SteeringError("device needs at least one RX queue", errno.EINVAL)
        for rule in self.ntuple.rules():
            if rule.context is None and not rule.is_drop and rule.action >= n:
                raise SteeringError(
                    "requested channel counts are too low for existing ntuple filter "
                    "settings", errno.EINVAL)
        rss = self.rss.copy()
        rss.set_n_rx_queues(n)
        self._commit(rss=rss, what="requested channel counts are too low for existing "
                     "ntuple filter settings")

    def rss_set(self, context: int = 0, **kwargs: Any) -> None:
        """Change an RSS context (keywords of :meth:`RssConfig.set_rxfh`)."""
        rss = self.rss.copy()
        rss.set_rxfh(context, **kwargs)
        self._commit(rss=rss)

    def rss_create(self, **kwargs: Any) -> int:
        """``context new`` (keywords of :meth:`RssConfig.create_context`); returns the id."""
        rss = self.rss.copy()
        cid = rss.create_context(**kwargs)
        self._commit(rss=rss)
        return cid

    def rss_delete(self, context: int) -> None:
        """Delete an RSS context; ``EBUSY`` while a rule steers into it."""
        self.rss.context(context)
        users = [r.loc for r in self.ntuple.rules() if r.context == context]
        if users and context != 0:
            raise SteeringError(
                f"RSS context {context} is in use by ntuple rule {users[0]}", errno.EBUSY)
        rss = self.rss.copy()
        rss.delete_context(context)
        self._commit(rss=rss)

    def rule_add(self, spec: Mapping[str, Any]) -> int:
        """Add an ntuple rule (``ntuple-add`` keys); returns its location."""
        table = self.ntuple.copy()
        loc = table.add(spec, self.n_rx_queues)
        self._commit(table=table)
        return loc

    def rule_delete(self, loc: int) -> None:
        """Delete the rule at ``loc`` (``ENOENT`` if none)."""
        table = self.ntuple.copy()
        table.delete(loc)
        self._commit(table=table)

    # -- ethtool requests ------------------------------------------------------------------

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Apply one steering request dict from ``launch.ethtool.parse`` and build its reply.

        Handles ``rss-get``, ``rss-set``, ``ntuple-get``, ``ntuple-add`` and
        ``ntuple-delete``; raises :class:`SteeringError` (with the errno) on refusal.
        """
        cmd = request.get("cmd")
        if cmd == "rss-get":
            ctx = self.rss.context(int(request.get("context", 0)))
            return ctx.to_dict(self.n_rx_queues)
        if cmd == "rss-set":
            return self._handle_rss_set(request)
        if cmd == "ntuple-get":
            if request.get("rule") is not None:
                return {"rule": self.ntuple.get(int(request["rule"])).to_dict()}
            return {"n_rx_rings": self.n_rx_queues, "table_size": self.ntuple.size,
                    "rules": [r.to_dict() for r in self.ntuple.rules()]}
        if cmd == "ntuple-add":
            return {"loc": self.rule_add(request)}
        if cmd == "ntuple-delete":
            self.rule_delete(int(request["loc"]))
            return {}
        raise SteeringError(f"not a steering request: {cmd!r}", errno.EOPNOTSUPP)

    def _handle_rss_set(self, request: Mapping[str, Any]) -> dict[str, Any]:
        context = request.get("context", 0)
        if request.get("delete"):
            if context == "new" or context == 0:
                raise SteeringError("delete needs a non-zero context id", errno.EINVAL)
            self.rss_delete(int(context))
            return {}
        kwargs: dict[str, Any] = {
            "key": request.get("hkey"), "hfunc": request.get("hfunc"),
            "equal": request.get("equal"), "weight": request.get("weight"),
            "start": int(request.get("start", 0)),
        }
        if context == "new":
            if request.get("default"):
                raise SteeringError("Default and context options are mutually exclusive",
                                    errno.EINVAL)
            return {"context": self.rss_create(**kwargs)}
        self.rss_set(int(context), default=bool(request.get("default")), **kwargs)
        return {}

    # -- the data path ---------------------------------------------------------------------

    def steer(self, flows: Flows) -> SteerResult:
        """Queue (or drop) for every flow of the batch: ntuple first, else RSS."""
        n = len(flows)
        if len(self.ntuple) == 0:  # the common case: RSS on context 0 for everything
            h = self.rss.hash(flows)
            none = np.full(n, -1, dtype=np.int32)
            return SteerResult(self.rss.queue_for(h, 0), none, np.zeros(n, dtype=np.int32), h)
        m = self.ntuple.match(flows)
        hit = m.loc >= 0
        via_rss = ~hit | (m.context >= 0)
        ctx = np.where(hit, m.context, 0).astype(np.int32)
        queue = np.where(hit, m.action, -1).astype(np.int32)
        hashes = np.zeros(n, dtype=np.uint32)
        idx = np.flatnonzero(via_rss)
        if idx.size:
            sub = flows if idx.size == n else flows.take(idx)
            c = ctx[idx]
            one_ctx: int | I32Array = int(c[0]) if bool((c == c[0]).all()) else c
            h = self.rss.hash(sub, one_ctx)
            hashes[idx] = h
            offset = np.where(hit[idx], m.action[idx], 0)
            queue[idx] = self.rss.queue_for(h, one_ctx) + offset
        return SteerResult(queue, m.loc, np.where(via_rss, ctx, -1).astype(np.int32), hashes)

    def queue_for(self, flows: Flows) -> I32Array:
        """Just the queues of :meth:`steer` (-1 = drop)."""
        return self.steer(flows).queue
