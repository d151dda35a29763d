"""tests/vsock_test_run.py: reading vsock_test's output (no guests)."""

from __future__ import annotations

import pytest

import vsock_test_run as vt


def test_list_output():
    out = "ID\tTest name\n0\tSOCK_STREAM connection reset\n1\tSOCK_STREAM bind only\n"
    assert vt.list_tests(out) == {0: "SOCK_STREAM connection reset", 1: "SOCK_STREAM bind only"}


def test_passes_skips_and_the_test_a_process_died_in():
    out = ("Control socket connected to 127.0.0.1:5555.\n"
           "0 - SOCK_STREAM connection reset...ok\n"
           "1 - SOCK_STREAM bind only...skipped\n"
           "2 - SOCK_STREAM client close...recv: Connection reset by peer\n"
           "extra line\n")
    p = vt.parse(out)
    assert {n: v.outcome for n, v in p.verdicts.items()} == {0: "pass", 1: "skip"}
    assert (p.died_in.id, p.died_in.name, p.died_in.outcome) == (2, "SOCK_STREAM client close", "fail")
    assert p.died_in.detail == "recv: Connection reset by peer / extra line"


def test_a_finished_run_died_in_nothing():
    p = vt.parse("0 - a...ok\n1 - b...ok\n")
    assert p.died_in is None and len(p.verdicts) == 2


def test_commands_skip_what_is_decided():
    srv, cli = vt.vsock_test_commands("vsock_test-6.12", 3, 4, [0, 2])
    assert srv.endswith("--mode=server --control-port=5555 --peer-cid=4 --skip=0 --skip=2")
    assert "--mode=client --control-host=127.0.0.1 --control-port=5555 --peer-cid=3" in cli


def test_a_note_before_ok_is_a_pass_with_the_note():
    out = ("24 - SOCK_STREAM ioctl(SIOCOUTQ) 0 unsent bytes...Test skipped, SIOCOUTQ not supported.\n"
           "ok\n25 - next...ok\n")
    p = vt.parse(out)
    assert p.died_in is None
    assert (p.verdicts[24].outcome, p.verdicts[24].detail) == ("pass", "Test skipped, SIOCOUTQ not supported.")


class _Cmd:
    def __init__(self, output, status=0):
        self.output, self.status = output, status

    def wait(self, timeout):
        return self.status


class _Guest:
    """Plays one side: each vsock_test start returns the next scripted output."""

    def __init__(self, outputs):
        self.outputs, self.commands = list(outputs), []

    def start(self, command):
        self.commands.append(command)
        return _Cmd(self.outputs.pop(0) if "vsock_test" in command else "")

    def run(self, command):
        self.commands.append(command)
        return _Cmd("")


def test_a_server_side_failure_is_blamed_on_its_own_test_and_the_rest_runs_again():
    """The server fails test 1 after the client said 1 ok and died in 2: test 1 failed, and
    the next round skips 0 and 1 and decides 2."""
    tests = {0: "a", 1: "b", 2: "c"}
    server = _Guest(["0 - a...ok\n1 - b...send: Broken pipe\n", "2 - c...ok\n"])
    client = _Guest(["0 - a...ok\n1 - b...ok\n2 - c...unexpected EOF on control socket\n",
                     "2 - c...ok\n"])
    verdicts = vt.run_all(server, client, "vsock_test-6.12", 3, 4, tests)
    assert {n: v.outcome for n, v in verdicts.items()} == {0: "pass", 1: "fail", 2: "pass"}
    assert "server: send: Broken pipe" in verdicts[1].detail
    assert client.commands[-1].endswith("--skip=0 --skip=1")


def test_the_runs_trailer_after_the_last_verdict_is_not_a_failure():
    out = "10 - SOCK_STREAM poll() + SO_RCVLOWAT...ok\nAll tests have been executed. Waiting other peer...ok\n"
    p = vt.parse(out)
    assert p.died_in is None and (p.verdicts[10].outcome, p.verdicts[10].detail) == ("pass", "")


def test_a_line_lost_on_one_console_is_taken_from_the_other_and_a_gap_fails():
    full = "ID\tTest name\n0\tSOCK_STREAM connection reset\n1\tSOCK_STREAM bind only\n2\tSOCK_STREAM client close\n"
    torn = full.replace("1\tSOCK_STREAM bind only\n", "[  9.1] hrtimer: ...\n")   # line lost
    assert vt.merge_listings(torn, full) == vt.list_tests(full)
    with pytest.raises(AssertionError, match="not 0..N-1"):
        vt.merge_listings(full.replace("1\tSOCK_STREAM bind only\n", ""))
    with pytest.raises(AssertionError, match="disagrees on test 2"):
        vt.merge_listings(full, full.replace("client close", "server close"))


def test_a_kernel_message_inside_a_verdict_line_is_cut_off():
    """Seen in the lab: the kernel's console message landed between "ok" and its newline."""
    out = ("10 - SOCK_STREAM poll() + SO_RCVLOWAT...ok[  157.726539] clocksource: Long readout "
           "interval, skipping watchdog check: cs_nsec: 1111061396 wd_nsec: 1111060895\n"
           "11 - SOCK_SEQPACKET big message...ok\n")
    parsed = vt.parse(out)
    assert [(v.id, v.outcome) for v in parsed.verdicts.values()] == [(10, "pass"), (11, "pass")]
    assert parsed.died_in is None
