"""The NIC's transmit side: the TX queue it drains and the sinks frames leave through.

Per netdev the kernel owns one TX ring (:mod:`shared.txring`); the NIC attaches it on
``nic.tx_start`` (:meth:`nic_proc.device.Nic.tx_start`) and, every loop step, drains it a
batch at a time into the netdev's :class:`TxSink` (:meth:`nic_proc.device.Nic.tx_poll`).

A sink is whatever the wire on the far side of the port is.  The default
(:class:`DiscardSink`) counts and discards: the generator, the wire gateway and pcap
replays model their senders themselves and ignore what the host answers, so their runs
behave exactly as before (the host's ACKs are simply counted in ``tx_packets``).  A source
that is also a :class:`TxSink` (a port backed by a real device, such as a TAP) becomes the
netdev's sink when it is added (:meth:`nic_proc.device.Nic.add_source`) and stops being it
when it is stopped; at most one such source per netdev (EBUSY otherwise).

Counters (the netdev's, in queue 0's row of the stats block, ``ethtool -S``):
``tx_packets`` / ``tx_bytes`` (frames the sink took, Ethernet header included, no FCS),
``tx_dropped`` (frames the sink refused, or slots with an impossible length).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from shared.txring import TxBatch

__all__ = ["DiscardSink", "TxSink"]


@runtime_checkable
class TxSink(Protocol):
    """Where a netdev's transmitted frames go."""

    def transmit(self, batch: TxBatch) -> int:
        """Send the frames of ``batch`` (``buf[offsets[i]:offsets[i] + lengths[i]]``, a
        ``RawBatch``-like view valid only during the call: copy what you keep).

        Returns how many were sent: they are a prefix of the batch; the rest are counted
        ``tx_dropped`` (never offered again: a NIC does not retry a frame the wire lost).
        """
        ...


class DiscardSink:
    """The default sink: every frame is 'sent' into a wire nobody listens on."""

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0

    def transmit(self, batch: TxBatch) -> int:
        self.frames += len(batch)
        self.bytes += int(batch.lengths.sum())
        return len(batch)
