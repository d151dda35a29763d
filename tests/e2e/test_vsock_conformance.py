"""The kernel's own vsock_test, 6.1 and 6.12, between two pyvmm Linux guests: our conformance judge.

For each generation, two guests boot on that generation's kernel (6.1: the default one;
6.12: ``make kernel-6.12``) with the default initramfs plus ``vsock-test.cpio`` (the static
``vsock_test-6.1`` / ``vsock_test-6.12``, guest/vsock_test), as members of one vsock group
(CIDs 3 and 4, pyvmm.vsock.group): every packet between them crosses pyvmm.  vsock_test runs
as server in one and client in the other, then the other way round; its TCP control channel
rides on vsock through ``vsock-tcp-relay`` in each guest (tests/vsock_test_run.py).

Every test id gets a verdict, and the verdicts are written to CONFORMANCE.md (generated, never
edited by hand).  The test fails if any vsock_test case fails, unless :data:`NOT_APPLICABLE`
names it with the reason (a feature the guest kernel lacks): a failure is a bug to fix in
pyvmm, not a test to skip.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

import vsock_test_run as vt
from harness import ShellGuest
from pyvmm import images
from pyvmm.machine import VsockConfig

pytestmark = [pytest.mark.e2e, pytest.mark.own_guests]

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE = ROOT / "CONFORMANCE.md"
RESULTS = ROOT / ".pytest-conformance.json"          # per generation, merged by each run
PROGRESS = ROOT / ".pytest-conformance.log"           # what is happening, to watch from outside
CIDS = (3, 4)
GUEST_MEM = 128 << 20
#: (generation, test name) -> why that vsock_test case cannot pass on our guest kernel
NOT_APPLICABLE: dict[tuple[str, str], str] = {}
#: generation -> the pyvmm.images function giving its guest kernel
GENERATIONS = {"6.1": "default_kernel", "6.12": "kernel_6_12"}


def _initrd(tmp: Path) -> Path:
    """The default initramfs with vsock-test.cpio after it (the kernel unpacks both)."""
    out = tmp / "initramfs+vsock-test.cpio"
    with open(out, "wb") as f:
        for part in (images.default_initramfs(), images.vsock_test_cpio()):
            f.write(part.read_bytes())
    return out


def _progress(text: str) -> None:
    """Append ``text`` to :data:`PROGRESS` with the time (the lab's output comes at its end)."""
    with open(PROGRESS, "a") as f:
        f.write(f"[{datetime.datetime.now():%H:%M:%S}] {text}\n")


@pytest.fixture(scope="module", params=sorted(GENERATIONS))
def pair(request, tmp_path_factory):
    """Two guests of one generation in one group, their relays' binaries checked."""
    gen = request.param
    tmp = tmp_path_factory.mktemp(f"conformance-{gen}")
    initrd = _initrd(tmp)
    kernel = getattr(images, GENERATIONS[gen])()
    # loglevel=4: no kernel info messages on the console while vsock_test prints its
    # verdicts (one, "clocksource: Long readout interval ...", once landed in the middle of
    # a server's "ok" line in the lab)
    guests = [ShellGuest(kernel, initrd=initrd, cmdline="loglevel=4", cpus=1, mem=GUEST_MEM,
                         timeout=3600,
                         vsock=VsockConfig(cid, None, group=str(tmp / "group")))
              for cid in CIDS]
    _progress(f"{gen}: booting two guests (CIDs {CIDS})")
    with guests[0], guests[1]:
        for g in guests:
            g.wait_ready()
            up = g.run("ip link set lo up")         # the control channel's TCP is loopback
            assert up.status == 0, up.output
        _progress(f"{gen}: both guests ready")
        yield gen, guests


@pytest.mark.parametrize("server_index", [0, 1], ids=["server-cid3", "server-cid4"])
def test_vsock_test(pair, server_index, record_property):
    gen, guests = pair
    server, client = guests[server_index], guests[1 - server_index]
    server_cid, client_cid = CIDS[server_index], CIDS[1 - server_index]
    binary = f"vsock_test-{gen}"
    tests = vt.merge_listings(*(g.run(f"{binary} --list").output for g in (server, client)))
    srv_relay, cli_relay = vt.relay_commands(server_cid)
    relays = [server.start_server(srv_relay, "vsock-tcp-relay: listening"),
              client.start_server(cli_relay, "vsock-tcp-relay: listening")]
    try:
        verdicts = vt.run_all(server, client, binary, server_cid, client_cid, tests,
                              log=lambda text: _progress(f"{gen} {server_cid}->{client_cid}: {text}"))
        direction = f"server CID {server_cid}, client CID {client_cid}"
        _record(gen, direction, tests, verdicts)
    finally:
        for g in (server, client):
            if not g.ended:                 # (a guest that crashed has said why already)
                g.run("killall vsock-tcp-relay")
        for r, g in zip(relays, (server, client)):
            if not g.ended:
                r.wait(60)
    counts = {o: sum(v.outcome == o for v in verdicts.values()) for o in ("pass", "fail", "skip")}
    record_property(f"vsock_test_{gen}_{server_cid}to{client_cid}", counts)
    failed = [v for v in verdicts.values()
              if v.outcome == "fail" and (gen, v.name) not in NOT_APPLICABLE]
    assert not failed, "\n".join(f"{v.id} - {v.name}: {v.detail}" for v in failed)


def _record(gen: str, direction: str, tests: dict[int, str], verdicts) -> None:
    """Merge this direction's verdicts into RESULTS and regenerate CONFORMANCE.md."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.setdefault(gen, {})[direction] = {
        str(n): {"name": tests[n], "outcome": verdicts[n].outcome,
                 "detail": verdicts[n].detail or NOT_APPLICABLE.get((gen, tests[n]), "")}
        for n in sorted(tests)}
    RESULTS.write_text(json.dumps(data, indent=1))
    CONFORMANCE.write_text(render(data))


def render(data: dict) -> str:
    """CONFORMANCE.md from the recorded verdicts."""
    out = ["# vsock conformance: the kernel's vsock_test between two pyvmm guests", "",
           "Generated by `tests/e2e/test_vsock_conformance.py` (do not edit): Linux's "
           "`tools/testing/vsock/vsock_test` from Debian's linux-source-6.1 and "
           "linux-source-6.12, each on a guest kernel of its own generation, between two pyvmm "
           "guests in one vsock group (VM-to-VM, every packet through pyvmm), both directions.",
           "", f"Last run: {datetime.date.today()}.", ""]
    for gen in sorted(data, key=lambda g: tuple(map(int, g.split(".")))):
        for direction, rows in data[gen].items():
            counts = {o: sum(r["outcome"] == o for r in rows.values()) for o in ("pass", "fail", "skip")}
            out += [f"## vsock_test {gen}, {direction}", "",
                    f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped", "",
                    "| id | test | result | reason |", "|---|---|---|---|"]
            for n, r in sorted(rows.items(), key=lambda kv: int(kv[0])):
                reason = r["detail"].replace("|", "\\|")
                out.append(f"| {n} | {r['name']} | {r['outcome']} | {reason} |")
            out.append("")
    return "\n".join(out)
