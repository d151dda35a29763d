"""Running the kernel's ``vsock_test`` between two guests, and reading what it says.

``tools/testing/vsock/vsock_test`` (Linux; built from Debian's linux-source-6.1 and
linux-source-6.12 by guest/vsock_test/build.sh) runs as a server on one side and a client on
the other, its test cases in lock step over a TCP control connection.  Each side prints, per
test, ``<id> - <name>...`` and then ``ok`` or ``skipped``; a test that fails ends the whole
process with a message (``perror``/``fprintf``), so the tests after it do not run.  This
module parses that output (:func:`parse`) and drives a whole run (:func:`run_all`): after a
failure both sides are started again with ``--skip`` for every test already decided, so
every test gets its own verdict; a failed test is never run twice.

The control connection is TCP and the guests have no network: in each guest
``vsock-tcp-relay`` (guest/progs) carries it over vsock on :data:`RELAY_PORT`, a port no
vsock_test case uses (guest/vsock_test/README.md lists theirs).  Used by
tests/e2e/test_vsock_conformance.py; the parser is tested without guests in
tests/unit/test_vsock_test_run.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: the relay's vsock port, and the control port vsock_test listens on inside the server guest
RELAY_PORT = 9999
CONTROL_PORT = 5555
#: one vsock_test process: the longest it may run (in the lab, under TCG)
RUN_TIMEOUT = 600

_STARTED = re.compile(r"^(\d+) - (.*?)\.\.\.(.*)$")
#: a kernel console message that landed inside a line of the program's output (the
#: kernel writes to the console directly, between the program's writes): its text from the
#: timestamp to the end of the line is not the program's
_KERNEL_MESSAGE = re.compile(r"\[\s*\d+\.\d{6}\] .*$")


@dataclass
class Verdict:
    id: int
    name: str
    outcome: str                    # "pass", "fail", "skip"
    detail: str = ""


@dataclass
class Parsed:
    verdicts: dict[int, Verdict] = field(default_factory=dict)
    #: the test that was running when the process ended without finishing it, if any
    died_in: Verdict | None = None


def parse(output: str) -> Parsed:
    """Verdicts from one vsock_test process's output (stdout and stderr merged).

    A test's output runs from its ``<id> - <name>...`` to the next test's: the first line
    that is just ``ok`` or ``skipped`` is the verdict, anything it printed before that a note
    (6.12's SIOCOUTQ tests say "Test skipped, SIOCOUTQ not supported." and then ``ok``), and
    what follows the last test's verdict the run's trailer (Debian's 6.1.192: "All tests have
    been executed. Waiting other peer...ok").  The last test without a verdict is the one the
    process died in.  A kernel message written into the middle of a line is cut off it."""
    out = Parsed()
    lines = [_KERNEL_MESSAGE.sub("", line) for line in output.splitlines()]
    starts = [(i, m) for i, line in enumerate(lines) if (m := _STARTED.match(line))]
    for k, (i, m) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(lines)
        segment = [x.strip() for x in [m.group(3)] + lines[i + 1:end] if x.strip()]
        n, name = int(m.group(1)), m.group(2)
        ends = [j for j, x in enumerate(segment) if x in ("ok", "skipped")]
        if ends:                    # its verdict; after it only the run's own trailer
            j = ends[0]
            out.verdicts[n] = Verdict(n, name, "pass" if segment[j] == "ok" else "skip",
                                      " / ".join(segment[:j]))
        elif k + 1 == len(starts):
            out.died_in = Verdict(n, name, "fail", " / ".join(segment))
        else:                       # went on to the next test without a word: cannot happen
            out.verdicts[n] = Verdict(n, name, "fail", " / ".join(segment) or "no verdict")
    return out


def list_tests(output: str) -> dict[int, str]:
    """``vsock_test --list`` output -> {id: name}."""
    tests = {}
    for line in output.splitlines():                 # "ID\tTest name", then "<id>\t<name>"
        m = re.match(r"^(\d+)\t(.+?)\s*$", line)
        if m:
            tests[int(m.group(1))] = m.group(2)
    return tests


def merge_listings(*outputs: str) -> dict[int, str]:
    """The test list from several guests' ``vsock_test --list`` (the same binary): their
    union, which must number the tests 0, 1, ... without a gap and agree on every name.
    Asking more than one guest means a line lost on one console (a kernel message
    written into the middle of it, say) cannot drop a test from the judgement unseen;
    anything still missing or contradictory fails loudly."""
    tests: dict[int, str] = {}
    for output in outputs:
        for n, name in list_tests(output).items():
            if tests.setdefault(n, name) != name:
                raise AssertionError(f"vsock_test --list disagrees on test {n}: "
                                     f"{tests[n]!r} and {name!r}")
    if not tests or sorted(tests) != list(range(len(tests))):
        raise AssertionError(f"vsock_test --list: ids {sorted(tests)} are not 0..N-1:\n"
                             + "\n---\n".join(outputs))
    return tests


def relay_commands(server_cid: int) -> tuple[str, str]:
    """The relay in the server guest (vsock -> its control port) and in the client guest."""
    return (f"vsock-tcp-relay --from-vsock {RELAY_PORT} --to-tcp 127.0.0.1:{CONTROL_PORT}",
            f"vsock-tcp-relay --from-tcp 127.0.0.1:{CONTROL_PORT} --to-vsock {server_cid}:{RELAY_PORT}")


def vsock_test_commands(binary: str, server_cid: int, client_cid: int,
                        skip: list[int]) -> tuple[str, str]:
    """The server's and the client's vsock_test command lines (skipping ``skip``)."""
    skips = "".join(f" --skip={n}" for n in skip)
    return (f"timeout {RUN_TIMEOUT} {binary} --mode=server --control-port={CONTROL_PORT} "
            f"--peer-cid={client_cid}{skips}",
            f"timeout {RUN_TIMEOUT} {binary} --mode=client --control-host=127.0.0.1 "
            f"--control-port={CONTROL_PORT} --peer-cid={server_cid}{skips}")


def wait_listening_command(port: int = CONTROL_PORT, seconds: int = 120) -> str:
    """A guest command that ends once something listens on TCP ``port`` (or fails after
    ``seconds``): vsock_test's stdout is a pipe, so its own "listening" line comes late."""
    return (f"timeout {seconds} sh -c 'until netstat -ltn | grep -q \":{port} \"; "
            f"do sleep 0.1; done'")


def run_all(server, client, binary: str, server_cid: int, client_cid: int,
            tests: dict[int, str], log=lambda text: None) -> dict[int, Verdict]:
    """Every test of ``tests`` with a verdict: run vsock_test on ``server`` and ``client``
    (:class:`harness.ShellGuest`), again after each failure with the decided tests skipped.
    The relays must be running already (:func:`relay_commands`).  ``log`` gets each round's
    command lines and, when it ends, both sides' output (a progress file to watch)."""
    verdicts: dict[int, Verdict] = {}
    while len(verdicts) < len(tests):
        skip = sorted(verdicts)
        srv_cmd, cli_cmd = vsock_test_commands(binary, server_cid, client_cid, skip)
        log(f"round: server `{srv_cmd}`, client `{cli_cmd}`")
        srv = server.start(srv_cmd)
        ready = server.run(wait_listening_command())
        if ready.status != 0:
            raise AssertionError(f"vsock_test server did not listen:\n{srv.output}")
        cli = client.start(cli_cmd)
        cli.wait(RUN_TIMEOUT + 60)
        try:
            srv.wait(120)
        except AssertionError:          # blocked in a test whose client is gone: end it
            server.run(f"killall {binary}")
            srv.wait(60)
        log(f"round ended: client status {cli.status}, server status {srv.status}\n"
            f"--- client ---\n{cli.output}\n--- server ---\n{srv.output}")
        c, s = parse(cli.output), parse(srv.output)
        progressed = False
        # judge each test by both sides, in order: the first that is not ok on both failed
        # (the server may fail test N after the client said N ok and died in N + 1), and the
        # tests after it wait for the next round
        for n in sorted(set(tests) - set(skip)):
            cv, sv = c.verdicts.get(n), s.verdicts.get(n)
            if cv is not None and sv is not None and cv.outcome == sv.outcome != "fail":
                verdicts[n] = Verdict(n, tests[n], cv.outcome,
                                      " / ".join(x for x in (cv.detail, sv.detail) if x))
                progressed = True
                continue
            if cv is None and sv is None and (c.died_in is None or c.died_in.id != n) \
                    and (s.died_in is None or s.died_in.id != n):
                break                       # neither side got here
            why = []
            for side, v, parsed in (("client", cv, c), ("server", sv, s)):
                if v is not None:
                    why.append(f"{side}: {v.outcome}" + (f" ({v.detail})" if v.detail else ""))
                elif parsed.died_in is not None and parsed.died_in.id == n:
                    why.append(f"{side}: {parsed.died_in.detail or 'ended'}")
                else:
                    why.append(f"{side}: ended before it")
            verdicts[n] = Verdict(n, tests[n], "fail", "; ".join(why))
            progressed = True
            break
        if not progressed:
            raise AssertionError(f"vsock_test made no progress (skipping {skip}):\n--- client "
                                 f"(status {cli.status}) ---\n{cli.output}\n--- server "
                                 f"(status {srv.status}) ---\n{srv.output}")
    return verdicts
