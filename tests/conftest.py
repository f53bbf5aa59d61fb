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

# Every event the suite's gateways and pipelines wrote is checked against ECS and docs/events.md (tests/ecs_schema.py).
from tests.ecs_schema import pytest_runtest_teardown, pytest_sessionfinish, pytest_sessionstart  # noqa: F401

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
    HTTP upload host and a SOCKS5 bytestream relay. Fails the session if it crashed. With fail mode xmpp:downgrade=open:
    the PLAIN routes log in without the STARTTLS Prosody offers (closed, the default, refuses that login:
    tests/test_starttls_injection.py)."""
    from tests.peers.gateway import Gateway
    gw = Gateway.start(peers_dir / "imguard", prosody, extra=["--fail-mode", "xmpp:downgrade=open"])
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


# --- under CI a skip is a failure -----------------------------------------------------------------------------
# A missing peer, tool or capture skips a test on a developer's machine, and fails it when env CI is set: the suite
# cannot pass by skipping. The one exception is a test marked `platform_skip`, declared for a platform that cannot run
# it at all (not a setup step left out). An expected failure (xfail) is left alone.

def pytest_configure(config):
    config.addinivalue_line("markers", "platform_skip: the test's skip is for a platform that cannot run it; "
                                       "it stays a skip under CI (every other skip fails there)")


def _skip_fails(report) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped, and CI is set (a skip fails there; tools/setup.sh test installs the peers): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if (report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail")
            and item.get_closest_marker("platform_skip") is None):
        _skip_fails(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if report.skipped and os.environ.get("CI"):      # a whole module skipped (importorskip, allow_module_level)
        _skip_fails(report)
