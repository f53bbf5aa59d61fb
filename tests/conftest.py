"""Fixtures shared by the end-to-end tests: a real Prosody and the real `imguard run` in front of it.

Both are started once per test session, in temp dirs, on free ports, and stopped at the end even
after a failure. When any test failed, the tails of their logs are printed in the summary.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The peers are imported inside the fixtures, so unit tests that never use them don't load slixmpp.

_peers: list = []   # everything started this session, for the failure summary


@pytest.fixture(scope="session")
def peers_dir(request) -> Path:
    """Our own folder for the peers' files and logs (pytest's basetemp is shared with other runs,
    which prune it); removed at the end when every test passed (unless IMGUARD_E2E_KEEP=1), kept
    for reading otherwise."""
    directory = Path(tempfile.mkdtemp(prefix="imguard-e2e-"))
    yield directory
    if request.session.testsfailed == 0 and os.environ.get("IMGUARD_E2E_KEEP") != "1":
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def prosody(peers_dir):
    """A real Prosody (c2s STARTTLS, direct TLS, HTTP upload, proxy65) with accounts alice, bob, ..."""
    from tests.peers.prosody import Prosody
    server = Prosody.start(peers_dir / "prosody")
    _peers.append(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gateway(peers_dir, prosody):
    """The real `imguard run` in reverse mode in front of `prosody`: c2s STARTTLS, direct TLS, the
    HTTP upload host and a SOCKS5 bytestream relay. Fails the session if it crashed."""
    from tests.peers.gateway import Gateway
    gw = Gateway.start(peers_dir / "imguard", prosody)
    _peers.append(gw)
    try:
        yield gw
    finally:
        status = gw.stop()
        if gw.crashed:
            pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if exitstatus == 0 or not _peers:
        return
    terminalreporter.section("test peer logs")
    for peer in _peers:
        terminalreporter.write_line(peer.logs())
