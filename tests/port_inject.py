"""Send a file as one TCP connection's segments out of a Linux interface (AF_PACKET).

Run inside a run's peer namespace (``ip netns exec zcrx-<run id>-peer python
tests/port_inject.py ...``): it writes raw Ethernet frames to the TAP device there, so they
reach the emulated NIC through its port exactly as a Linux sender's would, without a
Linux TCP on this side (the emulated host does not answer before the kernel's transmit
side exists).  A SYN, the file in MSS-sized segments with correct TCP checksums, a FIN.
All frames are paced in bursts; keep a connection under the TAP's queue (``txqueuelen``
frames, 1000 by default) and a slow NIC delays frames but never loses one.  Prints the frames
sent and the TAP's ``tx_dropped`` (frames Linux dropped because the NIC did not read).

    python tests/port_inject.py IFNAME SRC DST SPORT DPORT FILE [MTU]
"""

from __future__ import annotations

import socket
import sys
import time

import numpy as np

from shared import wire

#: Frames per burst, and the pause between bursts (seconds).
BURST = 32
GAP = 0.002


def frames(src: str, dst: str, sport: int, dport: int, data: bytes, mtu: int,
           src_mac: bytes, dst_mac: bytes) -> list[bytes]:
    """SYN, data segments, FIN of one connection (isn 1000), as Ethernet frames."""
    fs = wire.FlowSpec.from_addresses([src], [dst], [sport], [dport], isn=[1000],
                                      src_mac=np.frombuffer(src_mac, np.uint8),
                                      dst_mac=np.frombuffer(dst_mac, np.uint8))
    fam = int(fs.family[0])
    seg = wire.mss(fam, mtu)
    hlen = wire.FRAME6_HLEN if fam == wire.FAMILY_V6 else wire.FRAME4_HLEN
    n = -(-len(data) // seg)
    offs = np.arange(n, dtype=np.int64) * seg
    lens = np.minimum(seg, len(data) - offs)
    off = np.concatenate(([0], offs, [len(data)]))
    ln = np.concatenate(([0], lens, [0]))
    fl = np.concatenate(([wire.TCP_SYN], np.full(n, wire.TCP_ACK),
                         [wire.TCP_FIN | wire.TCP_ACK]))
    k = n + 2
    out = np.zeros((k, max(hlen + seg, wire.ETH_ZLEN)), np.uint8)
    buf = np.frombuffer(data, np.uint8)
    for i in range(n):  # payload first: the checksum covers it
        out[i + 1, hlen:hlen + lens[i]] = buf[offs[i]:offs[i] + lens[i]]
    flen = wire.build_frames(fs, out, np.zeros(k, np.intp), off, ln, fl, fill_payload=False,
                             tcp_csum=True)
    return [out[i, :int(flen[i])].tobytes() for i in range(k)]


def main(argv: list[str]) -> int:
    ifname, src, dst, sport, dport, path = argv[:6]
    mtu = int(argv[6]) if len(argv) > 6 else 4096
    with open(f"/sys/class/net/{ifname}/address") as f:
        src_mac = bytes.fromhex(f.read().strip().replace(":", ""))
    dst_mac = bytes([2, 0, 0, 0, src_mac[4], 1])
    with open(path, "rb") as f:
        data = f.read()
    all_frames = frames(src, dst, int(sport), int(dport), data, mtu, src_mac, dst_mac)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        for i in range(0, len(all_frames), BURST):
            for fr in all_frames[i:i + BURST]:
                s.send(fr)
            time.sleep(GAP)
    with open(f"/sys/class/net/{ifname}/statistics/tx_dropped") as f:
        dropped = int(f.read())
    print(len(all_frames), dropped)  # frames sent, and frames Linux dropped at the TAP
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
