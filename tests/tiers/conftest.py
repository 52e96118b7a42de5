"""A real valkey-server (tools/valkey_server.py) for the remote tier's tests, one per session;
tests that break it on purpose start their own."""

from __future__ import annotations

import pytest

from tools.valkey_server import ValkeyServer


@pytest.fixture(scope="session")
def valkey():
    with ValkeyServer() as server:
        yield server
