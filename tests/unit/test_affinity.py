"""Thread placement (pyvmm.affinity): CPU lists, their checks, thread names."""

from __future__ import annotations

import os
import threading

import pytest

from pyvmm import affinity
from pyvmm.errors import ConfigError


@pytest.mark.parametrize("text,cpus", [
    ("0", {0}), ("1", {1}), ("0-1", {0, 1}), ("0,2-3", {0, 2, 3}), ("3,1", {1, 3}),
    ("2-2", {2}), (" 0-1 ", {0, 1}), ("0,0", {0}),
])
def test_cpu_lists_parse(text, cpus):
    assert affinity.parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text,fragment", [
    ("", "expected CPU numbers"), ("x", "expected CPU numbers"), ("0,,1", "expected CPU numbers"),
    ("-1", "expected CPU numbers"), ("1-", "expected CPU numbers"), ("0 1", "expected CPU numbers"),
    ("0-1-2", "expected CPU numbers"), ("1-0", "range 1-0 ends before it starts"),
])
def test_bad_cpu_lists_say_what_is_wrong(text, fragment):
    with pytest.raises(ConfigError) as e:
        affinity.parse_cpu_list(text, "--vcpu-affinity")
    assert str(e.value).startswith("--vcpu-affinity ")
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cpus,text", [({0}, "0"), ({0, 1, 2, 5}, "0-2,5"), ({1, 3}, "1,3"),
                                       ({4, 5, 6, 7}, "4-7")])
def test_format_is_the_inverse(cpus, text):
    assert affinity.format_cpu_list(cpus) == text
    assert affinity.parse_cpu_list(text) == cpus


def test_cpu_set_checks_against_the_available_cpus():
    avail = frozenset({0, 1})
    assert affinity.cpu_set(None, "x", avail) is None
    assert affinity.cpu_set("1", "x", avail) == {1}
    assert affinity.cpu_set([0, 1], "x", avail) == {0, 1}
    with pytest.raises(ConfigError, match=r"--io-affinity 1-3: CPU 2-3 is not available "
                                          r"\(this process may use 0-1\)"):
        affinity.cpu_set("1-3", "--io-affinity", avail)
    for bad in ([], [-1], ["a"], 5):
        with pytest.raises(ConfigError, match="not a CPU list"):
            affinity.cpu_set(bad, "--io-affinity", avail)


def test_available_cpus_include_this_threads():
    # our own affinity mask lies inside the cpuset / the online CPUs
    assert set(os.sched_getaffinity(0)) <= affinity.available_cpus()


def test_a_thread_is_named_and_pinned_by_its_own_call():
    mine = sorted(os.sched_getaffinity(0))[-1]
    seen = {}

    def body():
        affinity.set_thread_name("pyvmm-vcpu7-and-more")
        affinity.pin_thread(0, {mine})
        tid = threading.get_native_id()
        with open(f"/proc/self/task/{tid}/comm") as f:
            seen["comm"] = f.read().strip()
        seen["cpus"] = os.sched_getaffinity(0)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"comm": "pyvmm-vcpu7-and", "cpus": {mine}}       # TASK_COMM_LEN - 1 bytes
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        assert f.read().strip() != "pyvmm-vcpu7-and"                  # only that thread
