"""SO_REUSEPORT groups: several listeners on one address and port, one chosen per SYN.

Linux counterpart: ``net/core/sock_reuseport.c`` (``struct sock_reuseport``,
``reuseport_add_sock``, ``reuseport_detach_sock``, ``reuseport_select_sock``,
``run_bpf_filter``, ``reuseport_select_sock_by_hash``, ``reuseport_attach_prog``).

Pure logic, kernel-process state.  A group keeps its members in ``socks`` in the order they
joined (``listen()`` order: index 0 is the first listener); a member that leaves is replaced
by the last one (Linux moves ``socks[num_socks - 1]`` into the hole), so indexes stay dense.
The group's classic BPF program (:mod:`shared.bpf`), if any, is the group's, not a member's:
attaching through any member replaces it, and it outlives the member that attached it.

Selection (:meth:`ReuseportGroup.select`), once per SYN: the program's return value indexes
``socks``; no program, or a value ``>= len(socks)``, falls back to the flow hash,
``socks[reciprocal_scale(hash, n)]``.  Departure: Linux's hash is ``inet_ehashfn`` (jhash of
the 4-tuple with a per-boot secret); here it is CRC-32 of the flow key, so runs are
reproducible.  Linux's skip of TCP_ESTABLISHED members (connected UDP sockets) does not apply
to TCP listeners and is not modelled, nor is ``SO_INCOMING_CPU`` matching or request
migration (``tcp_migrate_req``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shared.bpf import Program, SkbInfo

__all__ = ["BY_HASH", "BY_PROG", "PROG_FALLBACK", "ReuseportGroup", "flow_hash",
           "reciprocal_scale"]

#: How :meth:`ReuseportGroup.select` chose: the program, the hash after the program
#: returned an index past the group, or the hash with no program.
BY_PROG = "by_prog"
PROG_FALLBACK = "prog_fallback"
BY_HASH = "by_hash"

T = TypeVar("T")


def reciprocal_scale(val: int, ep_ro: int) -> int:
    """Linux's ``reciprocal_scale``: a u32 scaled into ``[0, ep_ro)`` without a division."""
    return ((val & 0xFFFFFFFF) * ep_ro) >> 32


def flow_hash(key: bytes) -> int:
    """The u32 hash a group falls back to (CRC-32 of the 36-byte flow key)."""
    return zlib.crc32(key) & 0xFFFFFFFF


@dataclass(eq=False)
class ReuseportGroup(Generic[T]):
    """One ``struct sock_reuseport``: members of one (address, port) with the same owner."""

    uid: int | None
    socks: list[T] = field(default_factory=list)
    prog: Program | None = None

    def __len__(self) -> int:
        return len(self.socks)

    def add(self, sk: T) -> int:
        """Join at the end (``reuseport_add_sock``); returns the member's index."""
        self.socks.append(sk)
        return len(self.socks) - 1

    def detach(self, sk: T) -> bool:
        """Leave (``reuseport_detach_sock``): the last member takes the hole.  Returns True
        when the group is now empty (the caller forgets it)."""
        for i, s in enumerate(self.socks):
            if s is sk:
                last = self.socks.pop()
                if i < len(self.socks):
                    self.socks[i] = last
                break
        return not self.socks

    def index(self, sk: T) -> int:
        """The member's current index (-1 when not a member)."""
        for i, s in enumerate(self.socks):
            if s is sk:
                return i
        return -1

    def select(self, hash32: int, skb: SkbInfo) -> tuple[T | None, str]:
        """The member a SYN reaches (None only for an empty group) and how it was chosen
        (:data:`BY_PROG`, :data:`PROG_FALLBACK` or :data:`BY_HASH`)."""
        n = len(self.socks)
        if not n:
            return None, BY_HASH
        how = BY_HASH
        if self.prog is not None:
            idx = self.prog.run(skb)
            if idx < n:
                return self.socks[idx], BY_PROG
            how = PROG_FALLBACK
        return self.socks[reciprocal_scale(hash32, n)], how
