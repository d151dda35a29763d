"""The seed's stress test in its short form (tests/stress.py; ``make soak`` runs it for longer):
64 connections at once, each echoing 2 MiB both ways through the Firecracker host end, SHA-256
checked, nothing lost -- in both protocols (the draft with 4 queue pairs)."""

from __future__ import annotations

import pytest

import stress

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("options", ["", "proto=rfc2013,pairs=4"], ids=["virtio", "rfc2013-4pairs"])
def test_64_connections_both_ways_nothing_lost(options, record_property):
    r = stress.one_round(stress.GUEST_MAX_CONNS, 2 << 20, options)
    assert r["errors"] == [] and r["bytes_lost"] == 0, r["errors"]
    assert r["bytes_each_way"] == stress.GUEST_MAX_CONNS * (2 << 20)
    record_property("seconds", round(r["seconds"], 2))
