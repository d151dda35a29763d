"""Fixtures shared by the vsock unit tests: a Unix socket path and a fake Linux-like guest."""

import pytest

from vsock_guest import Guest


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


@pytest.fixture
def guest(uds):
    g = Guest(uds)
    yield g
    g.close()
