"""The copy path's twin of zcrx_receiver.py: one connection, RECV into provided buffers.

    zcrx up
    zcrx app run -- python examples/copy_receiver.py -p 8000 -o received.bin
    # or by hand:  eval "$(zcrx env)"; python examples/copy_receiver.py -o received.bin

The kernel copies each segment's payload into a buffer it picks from a ring of buffers this
process provided (a buffer group); the CQE names the buffer; we write it out and put it back
in the ring.  Compare with zcrx_receiver.py: there the NIC writes into our memory and nothing
is copied.  Exit status: 0 done, 1 failed (one line says why), 2 no run to join (the line
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

BGID, NBUFS, BUF_SIZE = 1, 64, 16384  # one buffer group of 64 buffers of 16 KiB


def get_sqe(ring: L.Ring) -> np.void:
    """The next free SQE (this program never has more than two in flight)."""
    sqe = L.io_uring_get_sqe(ring)
    assert sqe is not None, "SQ full"
    return sqe


def arm_recv(ring: L.Ring, fd: int) -> None:
    """A multishot RECV that takes its buffers from group BGID."""
    sqe = get_sqe(ring)
    L.io_uring_prep_recv_multishot(sqe, fd)
    L.io_uring_sqe_set_buf_group(sqe, BGID)


def receive(k: Kernel, port: int, out: IO[bytes]) -> int:
    """Serve one connection; returns the bytes received."""
    ring = L.io_uring_queue_init(64, kernel=k)  # 1. a plain ring
    mem = k.alloc_memory(NBUFS * BUF_SIZE, tag="bufs")  # 2. the buffers, and their ring
    br = L.io_uring_setup_buf_ring(ring, NBUFS, BGID)
    mask = L.io_uring_buf_ring_mask(NBUFS)
    for bid in range(NBUFS):
        L.io_uring_buf_ring_add(br, mem.addr + bid * BUF_SIZE, BUF_SIZE, bid, mask, bid)
    L.io_uring_buf_ring_advance(br, NBUFS)
    lfd = k.listen_tcp(port)  # 3. accept one connection
    notify_ready(f"listening on port {port}")
    L.io_uring_prep_accept(get_sqe(ring), lfd)
    L.io_uring_submit(ring)
    cqe = L.io_uring_wait_cqe(ring)
    fd = int(cqe["res"])
    L.io_uring_cqe_seen(ring, cqe)
    if fd < 0:
        raise ZcrxError(f"accept: {errno.errorcode.get(-fd, fd)}")
    total, done = 0, False
    arm_recv(ring, fd)  # 4. RECV from the buffer group
    while not done:
        L.io_uring_submit(ring)
        cqes = L.io_uring_wait_cqes(ring)  # every CQE ready (at least one)
        returned = 0
        for res, flags in zip(cqes["res"].tolist(), cqes["flags"].tolist(), strict=True):
            if flags & abi.IORING_CQE_F_BUFFER:  # 5. a filled buffer: write it, put it back
                bid = L.cqe_bid(flags)
                out.write(mem.view[bid * BUF_SIZE:bid * BUF_SIZE + max(res, 0)].data)
                L.io_uring_buf_ring_add(br, mem.addr + bid * BUF_SIZE, BUF_SIZE, bid, mask,
                                        returned)
                returned += 1
                total += max(res, 0)
            if flags & abi.IORING_CQE_F_MORE:
                continue
            # 6. the request is over: peer EOF, or re-arm, or the connection failed
            if res == 0:
                done = True
            elif res > 0 or res == -errno.ENOBUFS:  # -ENOBUFS: the group ran dry; go on
                arm_recv(ring, fd)
            else:
                raise ZcrxError(f"recv: {errno.errorcode.get(-res, res)} after {total} B")
        L.io_uring_buf_ring_advance(br, returned)
        L.io_uring_cq_advance(ring, len(cqes))
    k.close_fd(fd)  # 7. tear down: the socket, the listener, the ring, the buffers
    k.close_fd(lfd)
    L.io_uring_queue_exit(ring)
    mem.close()
    return total


def main() -> int:
    p = argparse.ArgumentParser(description="Copying receiver: write one TCP stream to FILE.")
    p.add_argument("-p", "--port", type=int, default=8000, help="port to listen on (8000)")
    p.add_argument("-o", "--output", default="-", help="where to write the stream (- : stdout)")
    a = p.parse_args()
    try:
        with Kernel(name="copy_receiver") as k, (
                contextlib.nullcontext(sys.stdout.buffer) if a.output == "-"
                else open(a.output, "wb")) as out:
            total = receive(k, a.port, out)
    except RunNotFound as exc:
        print(f"copy_receiver: {exc}", file=sys.stderr)
        return 2
    except ZcrxError as exc:
        print(f"copy_receiver: {exc}", file=sys.stderr)
        return 1
    print(f"copy_receiver: {total} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
