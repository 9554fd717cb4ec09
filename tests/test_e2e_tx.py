"""The emulated host transmits: frames off the wire make the kernel answer through the TX ring.

* In-process: ARP and ICMPv6 frames from a RawSource are diverted by the NIC onto the
  kernel's control-frame ring (they never reach TCP's RX path), counted on queue 0.
* Processes: a replayed connection (handshake, data, FIN; the pcap source is the NIC's raw
  frame path) into a zero-copy server: the bytes arrive exact, and the NIC's ``tx_packets``
  and the kernel's ``TcpOutSegs`` show the SYN-ACK, ACKs and FIN the kernel sent.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

import dpkt
import pytest

from nic_proc.device import Nic
from nic_proc.sources import RawSource
from shared.nicif import QC, NetdevSpec
from shared.shm import Region, region_name
from shared.txring import TxConsumer, TxLayout, tx_slot_size
from tests.e2e import nic_stats, stats, topology, zcrx
from tests.test_own_receiver import finish, program, sha256_file, zero_copy_bytes

HOST_MAC = bytes([2, 0, 0, 0, 0, 1])
PEER_MAC = bytes([2, 0, 0, 0, 0, 2])
PORT = 7450
ZC_QUEUE = 1


def _arp_request() -> bytes:
    return bytes(dpkt.ethernet.Ethernet(
        dst=b"\xff" * 6, src=PEER_MAC, type=dpkt.ethernet.ETH_TYPE_ARP,
        data=dpkt.arp.ARP(sha=PEER_MAC, spa=bytes([10, 0, 0, 2]), tha=b"\0" * 6,
                          tpa=bytes([10, 0, 0, 1]), op=dpkt.arp.ARP_OP_REQUEST)))


def test_arp_and_icmpv6_go_to_the_kernels_control_ring(run_id: str) -> None:
    nic = Nic([NetdevSpec("eth0", queues=1, rx=16, mtu=1500)])
    d = nic.dev("eth0")
    layout = TxLayout(8, tx_slot_size(1500))
    region = Region.create(region_name(run_id, "kernel", "eth0.rxctl"), layout.size)
    try:
        assert region.buf is not None
        cons = TxConsumer(region.buf, layout)
        nic.ctl_start("eth0", nic.dma_map(region.name, layout.size), 8, layout.slot_size)
        icmp6 = bytes(dpkt.ethernet.Ethernet(
            dst=b"\x33\x33\xff\0\0\1", src=PEER_MAC, type=dpkt.ethernet.ETH_TYPE_IP6,
            data=dpkt.ip6.IP6(nxt=58, hlim=255, src=b"\xfd" + bytes(14) + b"\2",
                              dst=b"\xff\2" + bytes(13) + b"\1", data=bytes(32))))
        garbage = b"\x00" * 13  # too short for anything: a bad frame, not a control frame
        src = RawSource(1, d.info, [_arp_request(), garbage, icmp6])
        nic.add_source(lambda sid: src)
        nic.step()
        assert src.done
        batch = cons.peek(8)
        assert batch.frames() == [_arp_request(), icmp6]
        cons.release()
        assert int(d.stats[0, QC["rx_packets"]]) == 2
        assert int(d.stats[0, QC["rx_bad_frame"]]) == 1
        assert nic.take_irqs() == [("eth0", 0)]
        cons.detach()
    finally:
        nic.close()
        region.close()


def _tcp(seq: int, flags: int, payload: bytes = b"", opts: bytes = b"") -> dpkt.ethernet.Ethernet:
    tcp = dpkt.tcp.TCP(sport=40000, dport=PORT, seq=seq, ack=1, flags=flags, win=65535,
                       opts=opts, data=payload)
    tcp.off = (20 + len(opts)) // 4
    ip = dpkt.ip.IP(src=bytes([10, 0, 0, 2]), dst=bytes([10, 0, 0, 1]), p=6, ttl=64, data=tcp)
    ip.len = 20 + len(bytes(tcp))
    return dpkt.ethernet.Ethernet(dst=HOST_MAC, src=PEER_MAC, type=dpkt.ethernet.ETH_TYPE_IP,
                                  data=ip)


@pytest.mark.timeout(240)
def test_a_replayed_connection_makes_the_kernel_transmit(tmp_path: Path) -> None:
    payload = hashlib.shake_256(b"tx").digest(30_000)
    isn = 5000
    opts = struct.pack("!BBHBBBB", 2, 4, 1460, 1, 3, 3, 7)
    frames = [_tcp(isn, dpkt.tcp.TH_SYN, opts=opts), _tcp(isn + 1, dpkt.tcp.TH_ACK)]
    for off in range(0, len(payload), 1000):
        frames.append(_tcp(isn + 1 + off, dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH,
                           payload[off:off + 1000]))
    frames.append(_tcp(isn + 1 + len(payload), dpkt.tcp.TH_ACK | dpkt.tcp.TH_FIN))
    pcap = tmp_path / "conn.pcap"
    with open(pcap, "wb") as f:
        w = dpkt.pcap.Writer(f)
        for i, fr in enumerate(frames):
            w.writepkt(bytes(fr), ts=1.0 + i * 1e-3)
    out = tmp_path / "tx.bin"
    tag = "tx1"
    with topology(tag, "--netdev", "eth0:queues=2,mtu=1500") as run:
        zcrx("ethtool", "--name", tag, "-N", "eth0", "flow-type", "tcp4", "dst-port", str(PORT),
             "action", str(ZC_QUEUE))
        with program([sys.executable, "-m", "app_proc.zcrx_server", "-p", str(PORT), "-q",
                      str(ZC_QUEUE), "-n", "1", "-o", str(out)],
                     run.dir, tmp_path, tag, cap_net_admin=True) as app:
            zcrx("traffic", "--name", tag, "--pcap", str(pcap))
            finish(app, tmp_path, tag)
        assert sha256_file(out) == hashlib.sha256(payload).hexdigest()
        zc, copied = zero_copy_bytes(tag)
        assert zc == len(payload) and copied == 0
        st = stats(tag)
        mib = st["tcp_mib"]
        # the SYN-ACK, at least one ACK (one per batch: data and FIN may share it), our FIN
        assert mib["TcpPassiveOpens"] == 1 and mib["TcpOutSegs"] >= 3
        assert st["tx"]["eth0"]["tx_packets"] == mib["TcpOutSegs"] \
            + mib.get("ArpOutReplies", 0) + mib.get("Icmp6OutNeighborAdvertisements", 0)
        nic = nic_stats(tag)
        assert nic["tx_packets"] == st["tx"]["eth0"]["tx_packets"]
        assert nic["tx_dropped"] == 0 and nic["tx_bytes"] >= 60 * nic["tx_packets"]
