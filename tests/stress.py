"""The seed's stress test, rebuilt: many connections moving data both ways at once, nothing lost.

The 2013 author downloaded a 512 MB file in guest and host simultaneously, 6000 times, over
vsock.  Here: ``conns`` host connections at once (the Firecracker host end, ``CONNECT``) to the
freestanding guest's echo server, each writing ``nbytes`` of pseudo-random data while reading
the echo back; SHA-256 of what went out and of what came back must match, byte counts too.
The echo covers both directions: a byte lost, duplicated or reordered either way changes the
digest.  pyvmm runs as its own process (``python -m pyvmm run``), as a user runs it.

``python tests/stress.py [--conns 64] [--mib 64] [--proto virtio|rfc2013] [--pairs N]
[--duration SECONDS]`` (``make soak DURATION=...``): one round, or rounds until the duration is
up (a fresh pyvmm each round); prints each round and the totals (connections, bytes each way,
errors), exit status 1 if any error.  ``tests/kvm/test_stress.py`` runs a short form in CI;
``tests/e2e/test_linux_stress.py`` runs :func:`echo_streams` against the Linux guest (in the lab).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import connect_unix  # noqa: E402  (tests/ is this script's directory)
from pyvmm import images  # noqa: E402

PORT = 1234
CHUNK = 64 * 1024
#: the guest's echo server serves at most this many connections at once (VSOCK_MAX_CONNS)
GUEST_MAX_CONNS = 64


def one_round(conns: int, nbytes: int, vsock_options: str = "") -> dict:
    """Boot pyvmm with the echo server, run ``conns`` echo streams of ``nbytes`` each at once;
    returns the round's figures (``errors`` lists what went wrong, empty if nothing)."""
    if not 1 <= conns <= GUEST_MAX_CONNS:
        raise ValueError(f"conns must be 1 .. {GUEST_MAX_CONNS}")
    with tempfile.TemporaryDirectory(prefix="pyvmm-stress-") as tmp:
        uds = os.path.join(tmp, "v.sock")
        argv = [sys.executable, "-m", "pyvmm", "-q", "run", "--kernel", str(images.freestanding_guest()),
                "--vsock", f"3,uds={uds}" + (f",{vsock_options}" if vsock_options else ""),
                "--timeout", "3600", "--cmdline", f"vsock-echo-server port={PORT} conns={conns}"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, cwd=ROOT)
        try:
            for line in proc.stdout:
                if f"vsock listening {PORT}".encode() in line:
                    break
            else:
                return {"errors": [f"pyvmm ended before the guest listened: {proc.stderr.read()[-2000:]!r}"]}
            t0 = time.monotonic()
            result = echo_streams(uds, conns, nbytes)
            result["seconds"] = time.monotonic() - t0
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                result["errors"].append(f"pyvmm exited {proc.returncode}")
            if f"vsock echo done {conns} {conns * nbytes}".encode() not in out:
                result["errors"].append("the guest did not report every byte echoed: "
                                        + out.decode(errors="replace")[-1000:])
            return result
        finally:
            proc.kill()
            proc.wait()


def echo_streams(uds: str, conns: int, nbytes: int, port: int = PORT) -> dict:
    """``conns`` host connections at once to the echo server on guest ``port`` (through the
    Firecracker host end ``uds``), each sending ``nbytes`` while reading the echo back; returns
    the figures, with ``errors`` listing any connection whose echo differs (bytes, SHA-256).
    Also used with the Linux guest's echo server (tests/e2e/test_linux_stress.py)."""
    block = os.urandom(1 << 20)                              # sent with a per-connection offset
    socks = [connect_unix(uds, port) for _ in range(conns)]
    for s in socks:
        s.setblocking(False)
    state = {s: {"sent": 0, "back": 0, "out": hashlib.sha256(), "in": hashlib.sha256(), "i": i}
             for i, s in enumerate(socks)}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    buf = memoryview(bytearray(1 << 20))
    left = conns
    errors: list[str] = []
    while left:
        events = sel.select(timeout=120)
        if not events:
            errors.append(f"no progress for 120 s ({left} streams unfinished)")
            break
        for key, mask in events:
            s, st = key.fileobj, state[key.fileobj]
            if mask & selectors.EVENT_READ:
                try:
                    n = s.recv_into(buf)
                except BlockingIOError:
                    n = -1
                if n == 0:
                    errors.append(f"connection {st['i']}: closed after {st['back']} of {nbytes} bytes")
                    sel.unregister(s)
                    left -= 1
                    continue
                if n > 0:
                    st["in"].update(buf[:n])
                    st["back"] += n
            if mask & selectors.EVENT_WRITE and st["sent"] < nbytes:
                off = (st["sent"] + st["i"] * 4099) % len(block)
                want = min(CHUNK, nbytes - st["sent"])
                chunk = block[off:off + want]
                if len(chunk) < want:                         # wrap around the block
                    chunk += block[:want - len(chunk)]
                try:
                    n = s.send(chunk)
                except BlockingIOError:
                    n = 0
                st["out"].update(chunk[:n])
                st["sent"] += n
                if st["sent"] >= nbytes:
                    s.shutdown(socket.SHUT_WR)
                    sel.modify(s, selectors.EVENT_READ)
            if st["back"] >= nbytes:
                sel.unregister(s)
                left -= 1
    lost = 0
    for s, st in state.items():
        if st["back"] != st["sent"] or st["in"].digest() != st["out"].digest():
            errors.append(f"connection {st['i']}: sent {st['sent']} bytes, got back {st['back']}, "
                          f"SHA-256 {'matches' if st['in'].digest() == st['out'].digest() else 'differs'}")
        lost += max(0, st["sent"] - st["back"])
        s.close()
    return {"conns": conns, "bytes_each_way": sum(st["sent"] for st in state.values()),
            "bytes_lost": lost, "errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=GUEST_MAX_CONNS)
    ap.add_argument("--mib", type=int, default=64, help="MiB each connection moves each way")
    ap.add_argument("--proto", default="virtio", choices=("virtio", "rfc2013"))
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--duration", type=float, default=0, help="repeat rounds for this many seconds")
    args = ap.parse_args()
    options = "" if args.proto == "virtio" else f"proto=rfc2013,pairs={args.pairs or 1}"
    end = time.monotonic() + args.duration
    totals = {"rounds": 0, "conns": 0, "bytes_each_way": 0, "bytes_lost": 0, "errors": 0}
    t0 = time.monotonic()
    while True:
        r = one_round(args.conns, args.mib << 20, options)
        totals["rounds"] += 1
        totals["conns"] += r.get("conns", 0)
        totals["bytes_each_way"] += r.get("bytes_each_way", 0)
        totals["bytes_lost"] += r.get("bytes_lost", 0)
        totals["errors"] += len(r["errors"])
        print(f"round {totals['rounds']}: {r.get('conns', 0)} connections x {args.mib} MiB each way "
              f"in {r.get('seconds', 0):.1f} s, lost {r.get('bytes_lost', 0)} bytes, "
              f"errors {len(r['errors'])}", flush=True)
        for e in r["errors"]:
            print(f"  error: {e}", flush=True)
        if time.monotonic() >= end:
            break
    print(f"totals: {totals['rounds']} rounds, {totals['conns']} connections, "
          f"{totals['bytes_each_way'] / 2**30:.2f} GiB each way, {totals['bytes_lost']} bytes lost, "
          f"{totals['errors']} errors, {time.monotonic() - t0:.0f} s ({args.proto})", flush=True)
    return 1 if totals["errors"] or totals["bytes_lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
