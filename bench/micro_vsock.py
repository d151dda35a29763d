"""The vsock data path without KVM: Python CPU per packet, and where it goes.

``python -m bench.micro_vsock [--profile]`` drives pyvmm's :class:`VsockDevice` behind a
real :class:`MmioTransport` from a lean driver written here (preallocated buffers, the
descriptor table and rings written directly, as a guest driver would), with the machine's
device I/O loop run on this thread (no I/O thread, no guest, no KVM): what it measures is
pyvmm's own per-packet cost, the part a batched and vectorised path can shrink.

* **tx** (guest -> host): one guest-initiated STREAM connection to ``<uds>_5000``, where a
  Unix socket of this process reads everything; the guest posts ``batch`` packets of
  ``size`` payload bytes, kicks, and takes the used entries back.
* **rx** (host -> guest): one host-initiated connection (``CONNECT``); the host writes
  ``size`` bytes at a time, the guest keeps 128 rx buffers of 4 KiB posted and returns
  credit as Linux does.

Each row is microseconds of CPU (``time.process_time``) spent inside pyvmm (the kicks and
loop turns; not this driver's own work nor the host socket's reader) per packet and per
4 KiB, the minimum of three runs, and the rate that CPU alone would allow.  ``--profile`` adds a cProfile of one run of each direction (top
functions by own time).  It is an instrument, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import socket
import struct
import tempfile
import time

from pyvmm.memory import GuestMemory
from pyvmm.virtio.eventloop import EventLoop
from pyvmm.virtio.mmio import MmioTransport
from pyvmm.virtio.mock import MockDriver
from pyvmm.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvmm.vsock import UnixBackend, VsockDevice
from pyvmm.vsock.wire import HDR, VIRTIO_VSOCK_HDR_LEN

GUEST_CID, HOST_CID = 3, 2
GUEST_BUF = 256 * 1024            # Linux VSOCK_DEFAULT_BUFFER_SIZE
RX_BUFS, RX_PAYLOAD = 128, 4096   # what Linux <= 6.1 posts: 44-byte header + 4 KiB descriptors
OP_REQUEST, OP_RESPONSE, OP_RW, OP_CREDIT_UPDATE = 1, 2, 5, 6
STREAM = 1


class LeanGuest:
    """A vsock guest driver that reuses its buffers (MockDriver allocates per chain)."""

    def __init__(self, uds: str) -> None:
        self.memory = GuestMemory(64 << 20)
        self.loop = EventLoop()
        self.dev = VsockDevice(GUEST_CID, [UnixBackend(uds)])
        self.dev.attach_loop(self.loop)
        self.dev.start()
        self.transport = MmioTransport(self.dev, self.memory, lambda: None)
        self.drv = MockDriver(self.memory, self.transport)
        if not self.drv.probe(3):
            raise RuntimeError("vsock probe failed")
        self.rxq, self.txq, self.evq = self.drv.queues
        alloc = self.drv.allocator.alloc
        size = self.txq.size
        # tx: descriptor 2i = header, 2i+1 = payload (up to 64 KiB), for i < size/2
        self.tx_hdr = [alloc(VIRTIO_VSOCK_HDR_LEN, 8) for _ in range(size // 2)]
        self.tx_data = [alloc(64 * 1024, 64) for _ in range(size // 2)]
        self.tx_free = list(range(size // 2))
        # rx: descriptor 2i = header (written), 2i+1 = 4 KiB payload
        self.rx_hdr = [alloc(VIRTIO_VSOCK_HDR_LEN, 8) for _ in range(RX_BUFS)]
        self.rx_data = [alloc(RX_PAYLOAD, 64) for _ in range(RX_BUFS)]
        for i in range(RX_BUFS):
            self._post_rx(i)
        self.rxq.kick(force=True)
        self.fwd_cnt = 0            # guest bytes "read by the application"
        self.tx_cnt = 0             # guest payload bytes sent
        self.peer_buf_alloc = self.peer_fwd_cnt = 0    # the device's credit, from its packets
        #: CPU seconds spent inside pyvmm (kicks and loop turns), not in this driver
        self.device_cpu = 0.0

    def credit(self) -> int:
        """Bytes the guest may send now (§5.10.6.3), as Linux computes it."""
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFF_FFFF)

    def _post_rx(self, i: int) -> None:
        q = self.rxq
        q.write_descriptor(2 * i, self.rx_hdr[i], VIRTIO_VSOCK_HDR_LEN,
                           VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2 * i + 1)
        q.write_descriptor(2 * i + 1, self.rx_data[i], RX_PAYLOAD, VIRTQ_DESC_F_WRITE)
        q.publish(2 * i)

    def send(self, op: int, src_port: int, dst_port: int, length: int = 0) -> None:
        """Post one tx packet (payload: whatever is in the slot's buffer); no kick."""
        i = self.tx_free.pop()
        q = self.txq
        self.memory.write(self.tx_hdr[i], HDR.pack(GUEST_CID, HOST_CID, src_port, dst_port, length,
                                                   STREAM, op, 0, GUEST_BUF, self.fwd_cnt))
        if length:
            q.write_descriptor(2 * i, self.tx_hdr[i], VIRTIO_VSOCK_HDR_LEN, VIRTQ_DESC_F_NEXT, 2 * i + 1)
            q.write_descriptor(2 * i + 1, self.tx_data[i], length, 0)
        else:
            q.write_descriptor(2 * i, self.tx_hdr[i], VIRTIO_VSOCK_HDR_LEN, 0)
        q.publish(2 * i)
        self.tx_cnt = (self.tx_cnt + length) & 0xFFFF_FFFF

    def kick_tx(self) -> None:
        t = time.process_time()
        self.txq.kick(force=True)   # the device processes tx right here (no I/O thread)
        self.device_cpu += time.process_time() - t

    def reap_tx(self) -> int:
        q, n = self.txq, 0
        used_idx = int(q.used_idx_view[0])
        while q.last_used_idx != used_idx:
            head = int(q.used_ring[q.last_used_idx % q.size]["id"])
            self.tx_free.append(head // 2)
            q.last_used_idx = (q.last_used_idx + 1) & 0xFFFF
            n += 1
        q.set_used_event(q.last_used_idx)
        return n

    def recv(self) -> list[tuple[tuple, int]]:
        """(header fields, payload length) of every completed rx buffer; reposts them."""
        q, out = self.rxq, []
        used_idx = int(q.used_idx_view[0])
        while q.last_used_idx != used_idx:
            head, _length = q.used_ring[q.last_used_idx % q.size].item()
            i = head // 2
            fields = HDR.unpack(self.memory.read(self.rx_hdr[i], VIRTIO_VSOCK_HDR_LEN))
            self.peer_buf_alloc, self.peer_fwd_cnt = fields[8], fields[9]
            out.append(fields)
            self._post_rx(i)
            q.last_used_idx = (q.last_used_idx + 1) & 0xFFFF
        if out:
            q.set_used_event(q.last_used_idx)
            t = time.process_time()
            q.kick()
            self.device_cpu += time.process_time() - t
        return out

    def pump(self) -> None:
        t = time.process_time()
        while self.loop.run_once(0):
            pass
        self.device_cpu += time.process_time() - t


def _drain(sock: socket.socket, buf: bytearray) -> int:
    total = 0
    while True:
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            return total
        if n == 0:
            return total
        total += n


def run_tx(size: int, batch: int, packets: int) -> float:
    """CPU seconds for ``packets`` guest->host packets of ``size`` bytes in batches."""
    with tempfile.TemporaryDirectory(prefix="pyvmm-micro-") as tmp:
        uds = os.path.join(tmp, "v.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(uds + "_5000")
        listener.listen(1)
        g = LeanGuest(uds)
        g.send(OP_REQUEST, 1000, 5000)
        g.kick_tx()
        g.pump()
        host, _ = listener.accept()
        host.setblocking(False)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        buf = bytearray(1 << 20)
        if not any(f[6] == OP_RESPONSE for f in g.recv()):
            raise RuntimeError("no RESPONSE")
        g.reap_tx()
        sent = received = 0
        g.device_cpu = 0.0
        while sent < packets:
            for _ in range(min(batch, packets - sent, len(g.tx_free))):
                if g.credit() < size:
                    break               # wait for the device's CREDIT_UPDATE
                g.send(OP_RW, 1000, 5000, size)
                sent += 1
            g.kick_tx()
            g.pump()
            g.reap_tx()
            received += _drain(host, buf)
            g.pump()
            g.recv()                    # credit updates from the device
        while received < sent * size:
            g.pump()
            got = _drain(host, buf)
            received += got
            if not got:
                break
        elapsed = g.device_cpu
        if received != sent * size:
            raise RuntimeError(f"tx: host got {received} of {sent * size} bytes")
        host.close()
        listener.close()
        g.dev.close()
        g.loop.close()
        return elapsed


def run_rx(size: int, total: int) -> tuple[float, int]:
    """CPU seconds (and rx packets) to move ``total`` host->guest bytes written ``size`` at a time."""
    with tempfile.TemporaryDirectory(prefix="pyvmm-micro-") as tmp:
        uds = os.path.join(tmp, "v.sock")
        g = LeanGuest(uds)
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.connect(uds)
        host.sendall(b"CONNECT 1234\n")
        g.pump()
        local = next(f for f in g.recv() if f[6] == OP_REQUEST)
        g.send(OP_RESPONSE, 1234, local[2])
        g.kick_tx()
        g.pump()
        g.reap_tx()
        host.setblocking(False)
        ok = host.recv(64)
        if not ok.startswith(b"OK "):
            raise RuntimeError(f"no OK line: {ok!r}")
        chunk = bytes(size)
        written = got = packets = 0
        g.device_cpu = 0.0
        while got < total:
            while written < total:
                try:
                    written += host.send(chunk[:min(size, total - written)])
                except BlockingIOError:
                    break
            g.pump()
            fresh = g.recv()
            packets += len(fresh)
            got += sum(f[4] for f in fresh if f[6] == OP_RW)
            g.fwd_cnt = (g.fwd_cnt + sum(f[4] for f in fresh if f[6] == OP_RW)) & 0xFFFF_FFFF
            if fresh:                   # Linux: a CREDIT_UPDATE once the window runs low
                g.send(OP_CREDIT_UPDATE, 1234, local[2])
                g.kick_tx()
                g.reap_tx()
        elapsed = g.device_cpu
        host.close()
        g.dev.close()
        g.loop.close()
        return elapsed, packets


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_vsock", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true", help="cProfile one run of each direction")
    parser.add_argument("--mib", type=int, default=32, help="MiB moved per row (default 32)")
    args = parser.parse_args()
    total = args.mib << 20
    print(f"vsock data path, no KVM: CPU us per packet / per 4 KiB, min of 3 runs, {args.mib} MiB each")
    for size, batch in ((4096, 1), (4096, 64), (65536, 1), (65536, 16)):
        packets = total // size
        best = min(run_tx(size, batch, packets) for _ in range(3))
        print(f"  tx  {size // 1024:>3} KiB packets, batch {batch:>3}: {best / packets * 1e6:8.1f} us/packet"
              f"  {best / (total / 4096) * 1e6:6.1f} us/4KiB  {total / best / 1e9 * 8:6.2f} Gb/s")
    for size in (4096, 65536):
        runs = [run_rx(size, total) for _ in range(3)]
        best, packets = min(runs)
        print(f"  rx  host writes of {size // 1024:>3} KiB, 4 KiB rx buffers: "
              f"{best / packets * 1e6:8.1f} us/packet  {best / (total / 4096) * 1e6:6.1f} us/4KiB"
              f"  {total / best / 1e9 * 8:6.2f} Gb/s")
    if args.profile:
        for label, fn in (("tx 4 KiB batch 64", lambda: run_tx(4096, 64, total // 4096)),
                          ("rx 64 KiB writes", lambda: run_rx(65536, total))):
            prof = cProfile.Profile()
            prof.runcall(fn)
            print(f"\n--- profile: {label} (top 15 by own time)")
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
