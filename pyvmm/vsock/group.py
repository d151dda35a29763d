"""VM-to-VM vsock: pyvmm processes that share a group directory carry packets between guests.

This module owns one member's part of a *group* (``--vsock CID,group=DIR``): its
membership, the crossing of guest packets between member processes, the packets other
members sent that wait for this guest's rx buffers, and the resets a leaving member
causes.  Compare vhost-device-vsock's "sibling groups"; Firecracker and cloud-hypervisor
have nothing like it.  Only the standard Socket Device (virtio 1.2 §5.10) joins groups.

Where the switch lives
    Nowhere central: each member routes its own guest's packets.  The muxer hands this
    module every guest packet whose ``dst_cid`` is neither the host (2) nor the guest's own
    CID (:meth:`VsockGroup.from_guest`); this module sends it to the process that owns that
    CID.  A member does not terminate the connection, parse the stream or keep per-byte
    state: the packet goes to the other guest as the first guest wrote it, so ``buf_alloc``
    and ``fwd_cnt`` pass through unchanged and flow control stays end to end between the two
    guest drivers (§5.10.6.3).

Membership (files in DIR, created mode 0700 if missing)
    ``<cid>.lock``  held with ``flock`` by the member with that CID while it lives: a second
                    process asking for the same CID finds it held and is refused
                    (:class:`~pyvmm.errors.ConfigError`, the CLI exits 2); the lock goes with
                    the process however it ends, SIGKILL included.
    ``<cid>.sock``  that member's listening Unix ``SOCK_SEQPACKET`` socket.  A stale one (its
                    owner died) is replaced by the next holder of the lock; connecting to it
                    before that fails (ECONNREFUSED), which is "no such member".

How packets cross
    Member A connects to B's socket the first time its guest sends B a packet, and says
    who it is (:data:`HELLO`: magic, version, A's CID); from then on A sends, B receives on
    that connection (B's packets for A go over B's own connection to A).  A crossing
    message is one or more packets back to back, each a 44-byte ``virtio_vsock_hdr``
    followed by ``hdr.len`` payload bytes, at most :data:`GROUP_MSG_MAX` bytes in all: the
    packets of one tx batch for one peer go in one ``sendmsg`` whose iovec points into guest
    RAM, so a packet costs one copy into the kernel, one out into the receiver's message,
    and one into the other guest's rx buffer, and a 64 KiB packet shares its system calls
    with its batch.  The receiver splits a packet over as many rx buffers as it needs
    (Linux <= 6.1 posts 4 KiB ones); each piece keeps the packet's credit fields, and of a
    SEQPACKET message only the last piece keeps ``SEQ_EOM``/``SEQ_EOR``.

    The receiver checks every packet it is sent, the sender being a local process it
    trusts no more than any other (SECURITY.md): ``src_cid`` must be the CID that member
    said hello with, ``dst_cid`` our guest's, the type STREAM or SEQPACKET, the op one of
    REQUEST .. CREDIT_REQUEST, ``len`` at most 64 KiB and within the message, and 0 unless
    the op is RW.  A bad packet is logged once, counted (``group_bad_packets``) and ends
    that connection (the rest of the message cannot be framed): the guest sees its flows
    with that member reset.

When the peer's guest does not take its packets
    Credit bounds what a well-behaved sender sends: at most the receiver's ``buf_alloc``
    per connection.  A receiver whose guest posts no rx buffers, or that advertised more
    than it takes, is bounded here, and nothing is dropped: packets for the guest wait in
    one queue of at most :data:`GROUP_RX_MAX_BYTES`; past it the member stops reading its
    crossings (``group_rx_paused``), their socket buffers fill, the sender's ``sendmsg``
    would block, and the sender keeps what it could not send, at most
    :data:`GROUP_TX_MAX_BYTES` per peer; past that its device stops taking its guest's tx
    chains (``group_tx_throttled``) until the peer drains below half.  So a slow guest
    slows the guest that sends to it, as a full rx queue does in one VM (§5.10.6.1: tx is
    processed "so long as there are additional resources available").

Resets
    A packet (not an RST) for a CID no member has gets an RST from that CID
    (``group_no_member``).  The member keeps a table of its guest's connections with other
    members (learned from REQUEST and RESPONSE, forgotten at RST; at most
    :data:`GROUP_MAX_FLOWS`, the oldest forgotten first: a forgotten one is reset by the
    guest's next packet to a member that has gone).  When a member leaves (its process
    exits, crashes or is killed: its sockets close, we read end-of-file), every connection
    with it gets an RST at once (``group_peers_left``, ``group_leave_rsts``); when our own
    guest resets the device or is sent TRANSPORT_RESET, the peers get an RST for every
    connection it had with them.  While the driver is not running (before DRIVER_OK, after
    a reset) a packet from a member gets an RST back, as if no guest listened.

Threads: everything runs on the device's I/O loop thread.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import socket
import struct
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..virtio.eventloop import EventLoop
from ..virtio.queue import GuestErrorLog
from .packet import RxBuffer, TxPacket
from .wire import (EOM, EOR, HDR, OP_CREDIT_REQUEST, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
                   SEQPACKET, STREAM, VIRTIO_VSOCK_HDR_LEN, VIRTIO_VSOCK_MAX_PKT_BUF_SIZE,
                   VMADDR_CID_HOST, VsockHeader)

__all__ = [
    "GROUP_MAX_FLOWS", "GROUP_MAX_INBOUND", "GROUP_MAX_PEERS", "GROUP_MSG_MAX",
    "GROUP_RX_MAX_BYTES", "GROUP_TX_MAX_BYTES", "HELLO", "VsockGroup",
]

#: one crossing message: packets back to back (fits the default Unix socket buffer, 208 KiB)
GROUP_MSG_MAX = 128 * 1024
#: bytes (headers and payload) from other members waiting for our guest's rx buffers; past
#: this the member stops reading its crossings until the guest has taken half
GROUP_RX_MAX_BYTES = 8 * 1024 * 1024
#: bytes one peer's socket would not take yet, kept for it; past this our guest's tx waits.
#: The tx batch that crosses it is kept whole (its chains are already taken): at most
#: GROUP_TX_MAX_BYTES + device.BATCH (256) chains of 64 KiB, 24 MiB, per peer
GROUP_TX_MAX_BYTES = 8 * 1024 * 1024
#: our guest's connections with other members that are remembered for resets
GROUP_MAX_FLOWS = 4096
#: members one member sends to at once (an open connection each)
GROUP_MAX_PEERS = 64
#: connections other processes may have open to us at once; more are closed at accept
GROUP_MAX_INBOUND = 256
#: crossing messages read per readable event before the loop serves others
_READS_PER_EVENT = 16
#: iovec entries in one sendmsg (below IOV_MAX, 1024)
_IOV_MAX = 512
#: the first message on a crossing: magic, version, the sender's CID
HELLO = struct.Struct("<8sIQ")
HELLO_MAGIC = b"pyvmm-vg"
HELLO_VERSION = 1
#: what a Unix datagram/seqpacket send buffer must hold beyond the message (af_unix.c:
#: ``len > sk->sk_sndbuf - 32`` is EMSGSIZE)
_SNDBUF_OVERHEAD = 32
#: the longest path a Unix socket address takes (sun_path, with its NUL)
_SUN_PATH_MAX = 107
_SEQ_FLAGS = EOM | EOR


class _Peer:
    """Our crossing to one member: the socket we send on, and what it did not take yet."""

    __slots__ = ("cid", "sock", "msg_max", "iov", "iov_bytes", "pending", "pending_bytes",
                 "writing")

    def __init__(self, cid: int, sock: socket.socket, msg_max: int) -> None:
        self.cid = cid
        self.sock = sock
        self.msg_max = msg_max               # GROUP_MSG_MAX, or less if the socket takes less
        self.iov: list = []                  # the message being built (views of guest RAM)
        self.iov_bytes = 0
        self.pending: collections.deque[bytes] = collections.deque()   # copies, in order
        self.pending_bytes = 0
        self.writing = False


class VsockGroup:
    """One member of a vsock group (module docstring).  The machine makes it from
    ``--vsock CID,group=DIR`` and gives it to the device, which attaches it."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.guest_cid = 0
        self.loop: EventLoop | None = None
        self.metrics: collections.Counter = collections.Counter()
        self.errors = GuestErrorLog("vsock group (guest)")
        self.host_errors = GuestErrorLog("vsock group (members)")
        #: called when packets for the guest appear (the muxer schedules an rx turn)
        self.on_rx_pending: Callable[[], None] = lambda: None
        #: called when our guest's tx may go on after a throttle
        self.on_tx_resume: Callable[[], None] = lambda: None
        #: True while a peer holds more than GROUP_TX_MAX_BYTES for us: the device waits
        self.tx_blocked = False
        #: whether our guest's driver runs (DRIVER_OK, no reset since): see set_live
        self.live = False
        self._lock_fd = -1
        self._listener: socket.socket | None = None
        self._sock_path: Path | None = None
        self._peers: dict[int, _Peer] = {}
        self._inbound: dict[int, list] = {}          # fd -> [socket, cid or None]
        self._rx: collections.deque[tuple[VsockHeader, memoryview]] = collections.deque()
        self._rx_off = 0                             # payload bytes of _rx[0] already given
        self._rx_bytes = 0
        self._rx_paused = False
        self._flows: collections.OrderedDict[tuple[int, int, int], int] = collections.OrderedDict()

    # -- life ---------------------------------------------------------------------------
    def attach(self, guest_cid: int, loop: EventLoop, metrics: collections.Counter,
               errors: GuestErrorLog, host_errors: GuestErrorLog) -> None:
        """Join: take the CID's lock and bind its socket (ConfigError if taken)."""
        self.guest_cid, self.loop, self.metrics = guest_cid, loop, metrics
        self.errors, self.host_errors = errors, host_errors
        sock_path = self.directory / f"{guest_cid}.sock"
        if len(os.fsencode(sock_path)) > _SUN_PATH_MAX:
            raise ConfigError(f"vsock group {self.directory}: the path {sock_path} is longer "
                              f"than a Unix socket address takes ({_SUN_PATH_MAX} bytes)")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory / f"{guest_cid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError(f"vsock group {self.directory}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise ConfigError(f"vsock group {self.directory}: CID {guest_cid} is already a "
                                  f"member (pid {holder})") from None
            raise ConfigError(f"vsock group {self.directory}: {e.strerror}") from e
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            sock_path.unlink(missing_ok=True)        # a dead member's: we hold its lock now
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK
                                     | socket.SOCK_CLOEXEC)
            try:
                listener.bind(str(sock_path))
                listener.listen(128)
            except OSError:
                listener.close()
                raise
        except OSError as e:
            self._release_lock()
            raise ConfigError(f"vsock group {self.directory}: cannot listen on {sock_path}: "
                              f"{e.strerror}") from e
        self._listener, self._sock_path = listener, sock_path

    def start(self) -> None:
        """Accept other members (loop thread)."""
        if self._listener is not None:
            self.loop.add_reader(self._listener.fileno(), self._on_accept)

    def stop(self) -> None:
        """Leave: close every crossing, remove our socket, drop the lock (idempotent)."""
        for peer in list(self._peers.values()):
            self._close_peer(peer)
        for fd in list(self._inbound):
            self._close_inbound(fd)
        if self._listener is not None:
            self._forget_fd(self._listener.fileno())
            self._listener.close()
            self._listener = None
            if self._sock_path is not None:
                try:
                    self._sock_path.unlink()
                except OSError:
                    pass
        self._release_lock()
        self._rx.clear()
        self._rx_off = self._rx_bytes = 0
        self._flows.clear()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)                 # releases the flock
            self._lock_fd = -1

    def set_live(self, live: bool) -> None:
        """The driver started (DRIVER_OK) or went away (device reset): see :meth:`guest_reset`."""
        if not live:
            self.guest_reset()
        self.live = live

    def guest_reset(self) -> None:
        """Our guest forgot its connections (device reset, TRANSPORT_RESET): each member it
        had one with gets an RST for it, and the packets waiting for it are dropped."""
        for (cid, our_port, peer_port), vtype in list(self._flows.items()):
            self._send_to(cid, VsockHeader(self.guest_cid, cid, our_port, peer_port, 0,
                                           vtype, OP_RST, 0, 0, 0))
        self._flows.clear()
        self._flush_all()
        self._rx.clear()
        self._rx_off = self._rx_bytes = 0
        self._resume_reading()

    # -- our guest -> members ---------------------------------------------------------------
    def from_guest(self, pkts: list[TxPacket]) -> None:
        """Our guest's packets for other CIDs (the muxer checked ``src_cid``), in order."""
        m = self.metrics
        for pkt in pkts:
            hdr = pkt.hdr
            m["tx_packets"] += 1
            if hdr.dst_cid == self.guest_cid or not VMADDR_CID_HOST < hdr.dst_cid < 0xFFFF_FFFF:
                self._guest_error("guest packet for its own or a reserved CID (dropped)", hdr)
                continue
            if hdr.type not in (STREAM, SEQPACKET) or not OP_REQUEST <= hdr.op <= OP_CREDIT_REQUEST:
                self._guest_error("guest packet of an unknown type or op for another guest", hdr)
                self._reply_rst(hdr)
                continue
            if not self._send_to(hdr.dst_cid, hdr, pkt.payload if hdr.op == OP_RW else None):
                m["group_no_member"] += 1
                self._reply_rst(hdr)
                continue
            self._track(hdr.dst_cid, hdr.src_port, hdr.dst_port, hdr)
            if hdr.op == OP_RW:
                m["tx_bytes"] += hdr.len
        self._flush_all()

    def bad_guest_packet(self, hdr: VsockHeader) -> None:
        """A malformed tx chain addressed to another CID: that connection's bytes are lost,
        so both ends get an RST."""
        if hdr.op == OP_RST or hdr.type not in (STREAM, SEQPACKET):
            return
        if hdr.dst_cid in self._peers:
            self._send_to(hdr.dst_cid, hdr._replace(len=0, op=OP_RST, flags=0))
            self._flush_all()
        self._flows.pop((hdr.dst_cid, hdr.src_port, hdr.dst_port), None)
        self._reply_rst(hdr)

    def _send_to(self, cid: int, hdr: VsockHeader, payload: list | None = None) -> bool:
        """Add one packet to ``cid``'s message; False if no member has that CID."""
        peer = self._peers.get(cid) or self._connect(cid)
        if peer is None:
            return False
        if payload is None and hdr.len:
            hdr = hdr._replace(len=0)           # only RW carries bytes across
        size = VIRTIO_VSOCK_HDR_LEN + hdr.len
        if peer.iov_bytes + size > peer.msg_max or len(peer.iov) + 1 + len(payload or ()) > _IOV_MAX:
            self._flush(peer)
        peer.iov.append(HDR.pack(*hdr))
        if payload:
            peer.iov.extend(payload)
        peer.iov_bytes += size
        return True

    def _flush_all(self) -> None:
        for peer in list(self._peers.values()):
            if peer.iov:
                self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        """Send the message being built (or keep a copy of it if the peer is full)."""
        iov, size = peer.iov, peer.iov_bytes
        peer.iov, peer.iov_bytes = [], 0
        if not iov:
            return
        self.metrics["group_messages_sent"] += 1
        if not peer.pending:
            try:
                peer.sock.sendmsg(iov)
                return
            except BlockingIOError:
                pass
            except OSError:
                self._peer_left(peer.cid)
                return
        peer.pending.append(b"".join(iov))     # guest RAM is given back after this batch
        peer.pending_bytes += size
        if not peer.writing:
            peer.writing = True
            self.loop.add_writer(peer.sock.fileno(), lambda: self._on_writable(peer))
        if peer.pending_bytes > GROUP_TX_MAX_BYTES and not self.tx_blocked:
            self.tx_blocked = True
            self.metrics["group_tx_throttled"] += 1

    def _on_writable(self, peer: _Peer) -> None:
        while peer.pending:
            try:
                peer.sock.sendmsg([peer.pending[0]])
            except BlockingIOError:
                break
            except OSError:
                self._peer_left(peer.cid)
                return
            peer.pending_bytes -= len(peer.pending.popleft())
        if not peer.pending and peer.writing:
            peer.writing = False
            self.loop.remove_writer(peer.sock.fileno())
        self._maybe_resume_tx()

    def _maybe_resume_tx(self) -> None:
        if self.tx_blocked and all(p.pending_bytes <= GROUP_TX_MAX_BYTES // 2
                                   for p in self._peers.values()):
            self.tx_blocked = False
            self.on_tx_resume()

    def _connect(self, cid: int) -> _Peer | None:
        """Open our crossing to the member with ``cid``; None if there is none (or no room)."""
        if len(self._peers) >= GROUP_MAX_PEERS:
            self.host_errors.report(f"more than {GROUP_MAX_PEERS} members to send to at once",
                                    f"CID {cid}")
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            # a message must fit the send buffer (Linux: EMSGSIZE beyond sk_sndbuf - 32); ask
            # for room for a few, and use what net.core.wmem_max grants
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * GROUP_MSG_MAX)
            msg_max = min(GROUP_MSG_MAX, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                          - _SNDBUF_OVERHEAD)
            if msg_max < VIRTIO_VSOCK_HDR_LEN + VIRTIO_VSOCK_MAX_PKT_BUF_SIZE:
                raise OSError(errno.EMSGSIZE, f"a Unix socket send buffer of {msg_max} bytes "
                              "cannot carry a 64 KiB packet (raise net.core.wmem_max)")
            sock.connect(str(self.directory / f"{cid}.sock"))
            sock.send(HELLO.pack(HELLO_MAGIC, HELLO_VERSION, self.guest_cid))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None                         # no member (or a dead one's socket)
        except OSError as e:                    # EAGAIN: its backlog is full; anything else
            sock.close()
            self.host_errors.report("cannot reach a group member", f"CID {cid}: {e.strerror}")
            self.metrics["host_errors"] += 1
            return None
        peer = self._peers[cid] = _Peer(cid, sock, msg_max)
        # the member never sends on this one: readable means it has gone
        self.loop.add_reader(sock.fileno(), lambda: self._on_peer_readable(peer))
        return peer

    def _on_peer_readable(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(1)
        except BlockingIOError:
            return
        except OSError:
            pass                        # a reset: gone as much as end of file or stray data
        if self._peers.get(peer.cid) is peer:
            self._peer_left(peer.cid)

    # -- members -> our guest ---------------------------------------------------------------
    def _on_accept(self) -> None:
        for _ in range(_READS_PER_EVENT):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:                # EMFILE and the like: try again on the next event
                self.host_errors.report("cannot accept a group member", e.strerror)
                self.metrics["host_errors"] += 1
                return
            if len(self._inbound) >= GROUP_MAX_INBOUND:
                self.host_errors.report(f"more than {GROUP_MAX_INBOUND} connections from "
                                        "group members (closed)", "")
                self.metrics["host_errors"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self._inbound[fd] = [sock, None]
            if not self._rx_paused:
                self.loop.add_reader(fd, lambda fd=fd: self._on_inbound(fd))

    def _on_inbound(self, fd: int) -> None:
        entry = self._inbound.get(fd)
        if entry is None:
            return
        sock = entry[0]
        got = False
        for _ in range(_READS_PER_EVENT):
            try:
                data, _anc, flags, _addr = sock.recvmsg(GROUP_MSG_MAX)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._inbound_ended(fd)
                return
            if not data:
                self._inbound_ended(fd)
                return
            if flags & socket.MSG_TRUNC:
                self._bad_member(fd, "crossing message longer than GROUP_MSG_MAX", len(data))
                return
            if entry[1] is None:
                if not self._hello(fd, data):
                    return
                continue
            if not self._take(fd, entry[1], memoryview(data)):
                return
            got = True
            if self._rx_paused:
                break
        if got:
            self.on_rx_pending()

    def _hello(self, fd: int, data: bytes) -> bool:
        if len(data) != HELLO.size:
            self._bad_member(fd, "crossing hello of the wrong size", len(data))
            return False
        magic, version, cid = HELLO.unpack(data)
        if magic != HELLO_MAGIC or version != HELLO_VERSION:
            self._bad_member(fd, "crossing hello with a wrong magic or version", version)
            return False
        if cid == self.guest_cid or not VMADDR_CID_HOST < cid < 0xFFFF_FFFF:
            self._bad_member(fd, "crossing hello from our own or a reserved CID", cid)
            return False
        self._inbound[fd][1] = cid
        return True

    def _take(self, fd: int, cid: int, msg: memoryview) -> bool:
        """Check and queue one message's packets for our guest; False if the crossing ended."""
        m = self.metrics
        off, end = 0, len(msg)
        m["group_messages_received"] += 1
        while off < end:
            if end - off < VIRTIO_VSOCK_HDR_LEN:
                self._bad_member(fd, "crossing message ends inside a header", end - off)
                return False
            hdr = VsockHeader._make(HDR.unpack_from(msg, off))
            n = hdr.len
            if (hdr.src_cid != cid or hdr.dst_cid != self.guest_cid
                    or hdr.type not in (STREAM, SEQPACKET)
                    or not OP_REQUEST <= hdr.op <= OP_CREDIT_REQUEST
                    or n > VIRTIO_VSOCK_MAX_PKT_BUF_SIZE or (n and hdr.op != OP_RW)
                    or off + VIRTIO_VSOCK_HDR_LEN + n > end):
                self._bad_member(fd, "bad packet from a group member", hdr.describe())
                return False
            off += VIRTIO_VSOCK_HDR_LEN
            if not self.live:                   # no driver to take it: as if nobody listened
                self._rst_to_member(cid, hdr)
                off += n
                continue
            self._rx.append((hdr, msg[off:off + n]))
            self._rx_bytes += VIRTIO_VSOCK_HDR_LEN + n
            self._track(cid, hdr.dst_port, hdr.src_port, hdr)
            off += n
        if not self.live:
            self._flush_all()
        elif self._rx_bytes > GROUP_RX_MAX_BYTES and not self._rx_paused:
            self._rx_paused = True
            m["group_rx_paused"] += 1
            for fd_ in self._inbound:
                self.loop.remove_reader(fd_)
        return True

    def _resume_reading(self) -> None:
        if self._rx_paused and self._rx_bytes <= GROUP_RX_MAX_BYTES // 2:
            self._rx_paused = False
            for fd in self._inbound:
                self.loop.add_reader(fd, lambda fd=fd: self._on_inbound(fd))

    def has_pending(self) -> bool:
        return bool(self._rx)

    def fill_rx_burst(self, bufs) -> list[VsockHeader]:
        """Write waiting packets into rx buffers from the front of ``bufs``; the headers
        written (a prefix of ``bufs``).  A packet larger than a buffer is split (module
        docstring); a data packet stops at a header-only buffer."""
        rx, m = self._rx, self.metrics
        filled: list[VsockHeader] = []
        for buf in bufs:
            if not rx:
                break
            hdr, payload = rx[0]
            if not hdr.len:
                buf.write_header(hdr)
                rx.popleft()
                self._rx_bytes -= VIRTIO_VSOCK_HDR_LEN
                filled.append(hdr)
                continue
            if not buf.capacity:
                break
            off = self._rx_off
            n = buf.write_payload(payload[off:off + buf.capacity])
            last = off + n == hdr.len
            piece = hdr._replace(len=n, flags=hdr.flags if last or hdr.type != SEQPACKET
                                 else hdr.flags & ~_SEQ_FLAGS)
            buf.write_header(piece)
            filled.append(piece)
            m["rx_bytes"] += n
            if last:
                rx.popleft()
                self._rx_off = 0
                self._rx_bytes -= VIRTIO_VSOCK_HDR_LEN + hdr.len
            else:
                self._rx_off = off + n
        m["rx_packets"] += len(filled)
        if self._rx_paused:
            self._resume_reading()
        return filled

    # -- the flow table and leaving members -------------------------------------------------
    def _track(self, cid: int, our_port: int, peer_port: int, hdr: VsockHeader) -> None:
        op = hdr.op
        if op == OP_RW:
            return
        key = (cid, our_port, peer_port)
        if op == OP_RST:
            self._flows.pop(key, None)
        elif op in (OP_REQUEST, OP_RESPONSE):
            self._flows[key] = hdr.type
            self._flows.move_to_end(key)
            if len(self._flows) > GROUP_MAX_FLOWS:
                self._flows.popitem(last=False)

    def _peer_left(self, cid: int) -> None:
        """Member ``cid`` has gone: close our crossings with it, reset our guest's
        connections with it."""
        self.metrics["group_peers_left"] += 1
        peer = self._peers.get(cid)
        if peer is not None:
            self._close_peer(peer)
        for fd, (_sock, fcid) in list(self._inbound.items()):
            if fcid == cid:
                self._close_inbound(fd)
        gone = [key for key in self._flows if key[0] == cid]
        for key in gone:
            vtype = self._flows.pop(key)
            if self.live:
                self._rx.append((VsockHeader(cid, self.guest_cid, key[2], key[1], 0, vtype,
                                             OP_RST, 0, 0, 0), memoryview(b"")))
                self._rx_bytes += VIRTIO_VSOCK_HDR_LEN
        self.metrics["group_leave_rsts"] += len(gone) if self.live else 0
        self._maybe_resume_tx()
        if gone and self.live:
            self.on_rx_pending()

    def _inbound_ended(self, fd: int) -> None:
        cid = self._inbound[fd][1]
        if cid is None:
            self._close_inbound(fd)
        else:
            self._peer_left(cid)
            self._close_inbound(fd)

    def _bad_member(self, fd: int, reason: str, detail) -> None:
        self.host_errors.report(reason, str(detail))
        self.metrics["group_bad_packets"] += 1
        self.metrics["host_errors"] += 1
        self._inbound_ended(fd)

    def _close_peer(self, peer: _Peer) -> None:
        self._peers.pop(peer.cid, None)
        self._forget_fd(peer.sock.fileno())
        peer.sock.close()
        peer.pending.clear()
        peer.pending_bytes = 0
        peer.iov = []

    def _close_inbound(self, fd: int) -> None:
        entry = self._inbound.pop(fd, None)
        if entry is not None:
            self._forget_fd(fd)
            entry[0].close()

    def _forget_fd(self, fd: int) -> None:
        if self.loop is not None and fd >= 0:
            self.loop.remove_fd(fd)

    def _rst_to_member(self, cid: int, hdr: VsockHeader) -> None:
        """Answer a member's packet with an RST (never an RST), unless that member already
        has more than GROUP_TX_MAX_BYTES waiting: then it is dropped and counted."""
        if hdr.op == OP_RST:
            return
        peer = self._peers.get(cid)
        if peer is not None and peer.pending_bytes > GROUP_TX_MAX_BYTES:
            self.metrics["control_dropped"] += 1
            return
        self._send_to(cid, VsockHeader(self.guest_cid, cid, hdr.dst_port, hdr.src_port, 0,
                                       hdr.type, OP_RST, 0, 0, 0))

    def _reply_rst(self, hdr: VsockHeader) -> None:
        """An RST to our guest from the CID it wrote to (never for an RST, as Linux's
        virtio_transport_reset_no_sock; dropped and counted while GROUP_RX_MAX_BYTES wait)."""
        if hdr.op == OP_RST:
            return
        if self._rx_bytes > GROUP_RX_MAX_BYTES:
            self.metrics["control_dropped"] += 1
            self.errors.report("group rx queue full: RST dropped", hdr.describe())
            return
        self._rx.append((VsockHeader(hdr.dst_cid, self.guest_cid, hdr.dst_port, hdr.src_port, 0,
                                     hdr.type, OP_RST, 0, 0, 0), memoryview(b"")))
        self._rx_bytes += VIRTIO_VSOCK_HDR_LEN
        self.metrics["rst_sent"] += 1
        self.on_rx_pending()

    def _guest_error(self, reason: str, hdr: VsockHeader) -> None:
        self.errors.report(reason, hdr.describe())
        self.metrics["guest_errors"] += 1

    def counters(self) -> dict:
        """What the group holds now (for ``VsockDevice.counters()``)."""
        return {"members_sent_to": len(self._peers), "members_heard": len(self._inbound),
                "flows": len(self._flows), "rx_waiting_bytes": self._rx_bytes,
                "tx_waiting_bytes": sum(p.pending_bytes for p in self._peers.values())}
