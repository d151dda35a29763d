"""tests/vsock_test_run.py: reading vsock_test's output (no guests)."""

from __future__ import annotations

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
