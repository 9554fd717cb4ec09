"""A zero-copy TCP receiver: one connection, RECV_ZC, every chunk written out and returned.

    zcrx up --netdev eth0:queues=2
    zcrx ethtool -N eth0 flow-type tcp4 dst-port 8000 action 1     # the flow -> queue 1
    zcrx app run -- python examples/zcrx_receiver.py -q 1 -o received.bin
    # or by hand:  eval "$(zcrx env)"; python examples/zcrx_receiver.py -q 1 -o received.bin

The NIC writes payload straight into an area of this process's memory; the kernel names each
chunk in a CQE; we read it in place, write it to the file and hand the buffer back through the
refill queue.  docs/tutorial.md goes through it step by step; copy_receiver.py is the copy
path's twin.  Exit status: 0 done, 1 failed (one line says why), 2 no run to join (the line
says what to set).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from typing import IO

import numpy as np

from app_proc import liburing as L
from app_proc.syscall import Kernel, RunNotFound
from shared import abi
from shared.errors import ZcrxError
from shared.proc import notify_ready

OFF_MASK = (1 << abi.IORING_ZCRX_AREA_SHIFT) - 1  # a CQE's offset inside the area


def get_sqe(ring: L.Ring) -> np.void:
    """The next free SQE (this program never has more than two in flight)."""
    sqe = L.io_uring_get_sqe(ring)
    assert sqe is not None, "SQ full"
    return sqe


def receive(k: Kernel, port: int, ifname: str, queue: int, out: IO[bytes]) -> int:
    """Serve one connection; returns the bytes received."""
    params = np.zeros(1, dtype=abi.io_uring_params)  # 1. the ring zcrx needs
    params["cq_entries"] = 4096
    ring = L.io_uring_queue_init(64, L.ZCRX_RING_FLAGS | abi.IORING_SETUP_CQSIZE, params,
                                 kernel=k)
    ifq = L.io_uring_register_ifq(ring, L.if_nametoindex(k, ifname), queue,  # 2. the ifq
                                  rq_entries=4096, area_size=16 << 20)
    lfd = k.listen_tcp(port)  # 3. accept one connection
    notify_ready(f"listening on port {port}")
    L.io_uring_prep_accept(get_sqe(ring), lfd)
    L.io_uring_submit(ring)
    cqe = L.io_uring_wait_cqe(ring)
    fd = int(cqe["res"])
    L.io_uring_cqe_seen(ring, cqe)
    if fd < 0:
        raise ZcrxError(f"accept: {errno.errorcode.get(-fd, fd)}")
    total, at_enomem, done = 0, -1, False
    L.io_uring_prep_recv_zc(get_sqe(ring), fd, 0, ifq.zcrx_id)  # 4. RECV_ZC
    while not done:
        L.io_uring_submit(ring)
        cqes = L.io_uring_wait_cqes(ring)  # every CQE ready (at least one)
        offs, lens = [], []
        for res, flags, off in zip(cqes["res"].tolist(), cqes["flags"].tolist(),
                                   cqes["zcrx_off"].tolist(), strict=True):
            if res > 0:  # 5. a chunk of the area: read it in place, then give it back
                out.write(ifq.data(off & OFF_MASK, res).data)  # (a view: no copy)
                offs.append(off)
                lens.append(res)
                total += res
            if flags & abi.IORING_CQE_F_MORE:
                continue
            # 6. the request is over: peer EOF, or re-arm, or the connection failed
            if res == 0:
                done = True
                continue
            if res == -errno.ENOMEM and total > at_enomem:  # no free buffer for a copy:
                at_enomem = total  # let the kernel take the returned ones now, then go on
                L.io_uring_zcrx_flush_rq(ifq)
            elif res < 0 and res != -errno.ENOSPC:  # -ENOSPC: the CQ was full; go on
                raise ZcrxError(f"recv_zc: {errno.errorcode.get(-res, res)} after {total} B")
            L.io_uring_prep_recv_zc(get_sqe(ring), fd, 0, ifq.zcrx_id)
        L.io_uring_zcrx_return(ifq, np.array(offs, dtype=np.uint64), lens)
        L.io_uring_cq_advance(ring, len(cqes))
    k.close_fd(fd)  # 7. tear down: the socket, the listener, the ring (and the ifq with it)
    k.close_fd(lfd)
    L.io_uring_queue_exit(ring)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description="Zero-copy receiver: write one TCP stream to FILE.")
    p.add_argument("-p", "--port", type=int, default=8000, help="port to listen on (8000)")
    p.add_argument("-i", "--ifname", default="eth0", help="netdev (eth0)")
    p.add_argument("-q", "--queue", type=int, required=True, help="RX queue to bind")
    p.add_argument("-o", "--output", default="-", help="where to write the stream (- : stdout)")
    a = p.parse_args()
    try:
        with Kernel(name="zcrx_receiver") as k, (
                contextlib.nullcontext(sys.stdout.buffer) if a.output == "-"
                else open(a.output, "wb")) as out:
            total = receive(k, a.port, a.ifname, a.queue, out)
    except RunNotFound as exc:
        print(f"zcrx_receiver: {exc}", file=sys.stderr)
        return 2
    except ZcrxError as exc:
        print(f"zcrx_receiver: {exc}", file=sys.stderr)
        return 1
    print(f"zcrx_receiver: {total} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
