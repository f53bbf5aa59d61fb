"""Several `imguard run` workers on one host (docs/deploy.md §9), sharing one data folder and the expected-transfers
table (`--transfer-store sqlite`): a side connection lands on the other worker than the chat connection that
announced it, and is still found, scanned and decided.

Two real workers in front of one real Prosody, real slixmpp clients. The chat connections go through worker 1; the
upload's PUT/GET through worker 2's HTTP proxy listener; worker 1 rewrites bytestream offers to a SOCKS5 listener of
worker 2 (as a load balancer in front of several relays would). The control (`transfer_store memory`, the per-process
table) shows the crossing is real: there the EICAR upload announced on worker 1 is accepted unscanned by worker 2.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tests.peers.gateway import Gateway, alert_names_file
from tests.peers.prosody import free_ports
from tests.test_e2e_xmpp import CLEAN, EICAR, sentinel_after
from tests.xmpp_clients import STARTTLS, Client, Endpoint, error_text, sha256

pytestmark = pytest.mark.timeout(180)


class Worker(Gateway):
    """A Gateway whose data folder is its parent's `data`: the folder every worker of the host shares."""

    @property
    def data_dir(self) -> Path:
        return self.directory.parent / "data"


class Pair:
    """Worker 1 carries the chat, worker 2 the side connections."""

    def __init__(self, first: Worker, second: Worker, relay_port: int):
        self.first, self.second, self.relay_port = first, second, relay_port

    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.first.c2s_port, STARTTLS, ca_file=self.first.ca_file,
                        http_proxy=f"http://127.0.0.1:{self.second.http_port}")

    def get_endpoint(self) -> Endpoint:
        """The receiver fetches through worker 1: a URL blocked on worker 2 must be refused there too."""
        return Endpoint("127.0.0.1", self.first.c2s_port, STARTTLS, ca_file=self.first.ca_file,
                        http_proxy=f"http://127.0.0.1:{self.first.http_port}")

    def client(self, prosody, role: str, endpoint: Endpoint | None = None) -> Client:
        user = f"{role}-{uuid.uuid4().hex[:6]}"
        prosody.add_account(user)
        return Client.connected(endpoint or self.endpoint(), f"{prosody.jid(user)}/{role}", prosody.password(user))

    def stop(self) -> None:
        self.second.stop()
        self.first.stop()


def start_pair(directory: Path, prosody, store: str) -> Pair:
    (relay_port,) = free_ports(1)
    # The upload host is an HTTP destination, as 443/5281 are in a deployment (Prosody's test port is random). The
    # clients' HTTP goes through worker 2's proxy listener, so the slots are kept as granted (no upload relay, `never`).
    extra = ["--transfer-store", store, "--http-ports", str(prosody.http_port),
             "--xmpp-upload-refuse-unrelayed", "never"]
    first = Worker.start(directory / "w1", prosody, extra=extra + ["--bytestream-relay", f"127.0.0.1:{relay_port}"],
                         upload_relay=False)
    try:
        second = Worker.start(directory / "w2", prosody, upload_relay=False, extra=extra + [
            "--mode", f"socks5@{relay_port}", "--bytestream-relay", f"127.0.0.1:{relay_port}"])
    except BaseException:
        first.stop()
        raise
    return Pair(first, second, relay_port)


@pytest.fixture(scope="module")
def workers(peers_dir, prosody):
    pair = start_pair(peers_dir / "workers-sqlite", prosody, "sqlite")
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture
def pair(workers):
    offsets = (workers.first.log_size(), workers.second.log_size())
    yield workers
    for worker, offset in zip((workers.first, workers.second), offsets, strict=True):
        worker.check_alive()
        errors = worker.errors_since(offset)
        assert not errors, "a worker logged errors:\n" + "\n".join(errors) + "\n" + worker.logs()


def run(coro):
    return asyncio.run(coro)


def file_event(name: str, actions: tuple[str, ...]):
    return lambda e: alert_names_file(e, name) and e["event"].get("action") in actions


def test_eicar_upload_announced_on_one_worker_is_blocked_on_the_other(pair, prosody):
    """The slot is granted through worker 1, the PUT crosses worker 2: 403, a block event, and the link is refused
    on worker 1 both as a GET and in a chat message (the blocked URL learned on worker 2)."""
    async def scenario():
        async with pair.client(prosody, "alice") as alice, \
                pair.client(prosody, "bob", pair.get_endpoint()) as bob:
            since = pair.first.mark()
            name = f"eicar-{uuid.uuid4().hex[:6]}.com"
            up = await alice.upload(name, EICAR)
            assert up.put_status == 403, f"the PUT through worker 2 was not refused: {up.put_status} {up.put_text}"
            alert = await pair.first.wait_alert(file_event(name, ("block", "quarantine")), since=since)
            assert alert, f"no block event for {name} in {pair.first.alerts_file}"
            # The sender comes from the slot worker 1 saw: worker 2 knows it only through the shared table.
            assert alert["imguard"]["context"]["sender"].split("/")[0] == alice.jid.split("/")[0], alert["imguard"]
            status, body = await bob.http_get(up.get_url)
            assert status == 403 and EICAR not in body, (status, body[:200])
            sent = alice.send_chat(bob.jid, f"look {up.get_url}", oob_url=up.get_url)
            await sentinel_after(alice, bob, "after the blocked link")
            assert not any(up.get_url in b for b in bob.bodies()), f"the blocked link reached bob: {bob.bodies()}"
            error = await alice.wait_message(id=sent, type="error")
            assert error is not None and error_text(error), "alice was not told her link was refused"
    run(scenario())


def test_clean_upload_announced_on_one_worker_arrives_through_the_other(pair, prosody):
    """A harmless file: PUT through worker 2 is scanned (an allow event with the sender from worker 1's slot) and
    stored, and the receiver fetches it byte-identical."""
    async def scenario():
        async with pair.client(prosody, "alice") as alice, \
                pair.client(prosody, "bob", pair.get_endpoint()) as bob:
            since = pair.first.mark()
            name = f"numbers-{uuid.uuid4().hex[:6]}.bin"
            up = await alice.upload(name, CLEAN)
            assert up.accepted, (up.put_status, up.put_text)
            alert = await pair.first.wait_alert(file_event(name, ("allow", "alert")), since=since)
            assert alert, f"no file event for {name}: the PUT crossed unscanned"
            assert alert["imguard"]["context"]["transfer_mechanism"] == "xep-0363"
            assert alert["imguard"]["context"]["sender"].split("/")[0] == alice.jid.split("/")[0]
            status, body = await bob.http_get(up.get_url)
            assert status == 200 and sha256(body) == sha256(CLEAN)
    run(scenario())


async def socks5(alice: Client, bob: Client, name: str, data: bytes) -> tuple[bytes, list, str]:
    start, closed = len(bob.received.socks5), bob.received.socks5_closed
    result = await alice.socks5_send(bob.jid, data, name=name)
    if result.error == "not-allowed":
        # Known race, not this test's subject (see tests/test_gateways_shared.py): the relay answers alice's CONNECT
        # before it has replayed it to proxy65, so her <activate/> (through worker 1) can arrive first. Once more.
        result = await alice.socks5_send(bob.jid, data, name=name)
    await bob.wait_for(lambda r: len(r.socks5) - start >= len(data) or r.socks5_closed > closed, timeout=5)
    return bytes(bob.received.socks5[start:]), list(bob.received.streamhosts), result.error


def test_bytestream_offered_on_one_worker_is_relayed_and_scanned_by_the_other(pair, prosody):
    """Worker 1 rewrites the offer to worker 2's SOCKS5 listener: worker 2 finds the hash worker 1 announced, holds
    EICAR (nothing arrives, the sender is told, a block event) and relays a clean file byte-identical."""
    async def scenario():
        async with pair.client(prosody, "alice") as alice, pair.client(prosody, "bob") as bob:
            since = pair.first.mark()
            name = f"eicar-s5b-{uuid.uuid4().hex[:6]}.com"
            received, hosts, _ = await socks5(alice, bob, name, EICAR)
            await sentinel_after(alice, bob, "after the blocked bytestream")
            assert set(hosts) == {("127.0.0.1", pair.relay_port)}, hosts
            assert EICAR not in received and EICAR not in bytes(bob.received.socks5)
            assert await pair.first.wait_alert(file_event(name, ("block", "quarantine")), since=since), \
                f"no block event for {name}"
            told = await alice.wait_for(lambda r: [m for m in r.messages if name in (m["body"] or "") + error_text(m)],
                                        timeout=5)
            assert told, f"alice got no notice naming {name}"
            name = f"numbers-s5b-{uuid.uuid4().hex[:6]}.bin"
            received, hosts, error = await socks5(alice, bob, name, CLEAN)
            assert not error and sha256(received) == sha256(CLEAN), (error, len(received))
            assert await pair.first.wait_alert(file_event(name, ("allow", "alert")), since=since)
    run(scenario())


def test_control_a_per_process_table_lets_the_crossing_upload_through(peers_dir, prosody):
    """The same crossing with `--transfer-store memory` (one table per worker): worker 2 has never heard of the
    slot, so the EICAR PUT is accepted unscanned (201, no event). This is the failure the shared table removes, and
    what proves the tests above really cross workers."""
    pair = start_pair(peers_dir / "workers-memory", prosody, "memory")
    try:
        async def scenario():
            async with pair.client(prosody, "alice") as alice:
                since = pair.first.mark()
                name = f"eicar-control-{uuid.uuid4().hex[:6]}.com"
                up = await alice.upload(name, EICAR)
                assert up.accepted, f"control: expected the unscanned 201, got {up.put_status}"
                assert await pair.first.wait_alert(file_event(name, ("block", "quarantine", "allow", "alert")),
                                                   since=since, timeout=3) is None
        run(scenario())
    finally:
        pair.stop()


# --- the shared table down: the `store` fail mode (HttpUploads, no sockets) -------------------------------------

class DownTable:
    """A shared table whose store is unreachable: every call raises, as SharedTransfers does."""

    def __getattr__(self, name):
        from imguard.files.expected import TransferStoreError

        def fail(*args, **kwargs):
            raise TransferStoreError("connection refused")
        return fail


def http_flow(method: str, url: str):
    from mitmproxy import http
    from mitmproxy.test import tflow
    flow = tflow.tflow()
    flow.request = http.Request.make(method, url, b"", {"content-length": "68"})
    return flow


@pytest.mark.parametrize("method", ["PUT", "GET"])
def test_store_down_fail_closed_refuses_with_a_notice_and_an_anomaly(method):
    """Closed (the default): a PUT that may be an announced upload, or a GET that may be a blocked or announced
    file, is answered 503 with a notice, never relayed as "not announced"; an anomaly is recorded."""
    from imguard.gateway.http_uploads import HttpUploads
    events = []
    uploads = HttpUploads(None, DownTable(), record=events.append, store_fail_open=lambda: False)
    flow = http_flow(method, "https://upload.example.org/f/abc/eicar.com")
    uploads.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 503
    assert b"cannot be checked" in flow.response.content
    [event] = events
    assert event["imguard"]["anomaly"]["kind"] == "transfer_store_failed"
    assert event["imguard"]["anomaly"]["action"] == "block"


def test_store_down_fail_open_relays_with_an_anomaly():
    """Open (`--fail-mode http:store=open`): the request goes on unannounced (streamed), and the anomaly says so."""
    from imguard.gateway.http_uploads import HttpUploads
    events = []
    uploads = HttpUploads(None, DownTable(), record=events.append, store_fail_open=lambda: True)
    flow = http_flow("PUT", "https://upload.example.org/f/abc/eicar.com")
    uploads.requestheaders(flow)
    assert flow.response is None and flow.request.stream
    assert events[0]["imguard"]["anomaly"]["action"] == "allow"


def test_store_fail_mode_is_a_named_situation():
    """`store` is parsed like the other situations, closed unless said otherwise."""
    from imguard.gateway.failmode import STORE, FailModes
    assert not FailModes.parse([]).is_open("http", STORE)
    assert FailModes.parse(["http:store=open"]).is_open("http", STORE)
    assert not FailModes.parse(["http:store=open"]).is_open("xmpp", STORE)
