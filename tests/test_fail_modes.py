"""Fail modes (imguard/gateway/failmode.py) and --exclude, on the real embedded gateway with line-protocol sessions
(the stand-ins of tests/test_gateway.py): overload, inspection timeout, a session that cannot parse, a client
that refuses the gateway's certificate; each `closed` (block and alert) by default, `open` (relay and alert)
when the operator says so.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest

from imguard.gateway.failmode import CLOSED, OPEN, FailModes, apply_to_decision
from imguard.gateway.master import Gateway, GatewayError
from imguard.gateway.settings import GatewaySettings
from imguard.model import ALERT, ALLOW, BLOCK, ChatContext, Decision
from tests.peers.prosody import make_certificates
from tests.test_gateway import StubPipeline, closed_by_peer, readline, run, start_gateway, start_line_server


class AllowPolicy:
    def decide_file(self, report, ctx):
        return Decision(action=ALLOW, policy_version="v-test")


def fail_events(pipeline) -> list[dict]:
    return [r for r in pipeline.records if "fail_mode" in r.get("imguard", {})]


# --- the setting ---------------------------------------------------------------------------------------------

def test_keys_and_precedence():
    modes = FailModes.parse(["open", "xmpp=closed", "parse=closed", "irc:parse=open", "http:overload=open,tls=open"])
    assert modes.mode("xmpp", "overload") == CLOSED            # protocol beats the bare default
    assert modes.mode("socks5", "overload") == OPEN             # bare default
    assert modes.mode("socks5", "parse") == CLOSED              # situation beats the bare default
    assert modes.mode("irc", "parse") == OPEN                   # protocol:situation beats everything
    assert modes.mode("xmpp", "parse") == CLOSED
    assert modes.mode("http", "overload") == OPEN and modes.mode("socks5", "tls") == OPEN
    assert modes.mode("xmpp", "tls") == CLOSED                  # PROTO=MODE beats SITUATION=MODE
    default = FailModes.parse(GatewaySettings().fail_mode)
    assert all(default.mode(p, s) == CLOSED for p in ("xmpp", "irc", "http") for s in ("overload", "tls", "parse"))


@pytest.mark.parametrize("bad", ["xmpp=maybe", "xmpp:flood=open", "ajar"])
def test_a_bad_fail_mode_stops_the_gateway_with_a_message(tmp_path, bad):
    settings = GatewaySettings(mode=["regular@0"], fail_mode=[bad])
    with pytest.raises(GatewayError, match="fail mode"):
        Gateway(settings, StubPipeline(), data_dir=tmp_path, factories={}, transfers=None)


def test_decision_after_the_fail_mode():
    ctx = ChatContext(protocol="xmpp")
    allow, block = Decision(action=ALLOW, policy_version="p1"), Decision(action=BLOCK, policy_version="p1")
    closed = FailModes.parse([])
    decision, mode = apply_to_decision(closed, "overload", ctx, allow)
    assert (decision.action, mode, decision.policy_version) == (BLOCK, CLOSED, "p1") and decision.notice
    opened = FailModes.parse(["xmpp:timeout=open"])
    assert apply_to_decision(opened, "timeout", ctx, block)[0].action == ALERT
    assert apply_to_decision(opened, "overload", ctx, allow)[0].action == BLOCK


# --- overload and timeout --------------------------------------------------------------------------------------

async def _two_files(tmp_path, pipeline, **settings):
    """A slow scan holds the only queue slot; a second file arrives meanwhile. Returns what each client read."""
    srv, port = await start_line_server()
    gw, gport = await start_gateway(tmp_path, port, pipeline, inspect_queue=1, **settings)
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", gport)
        r2, w2 = await asyncio.open_connection("127.0.0.1", gport)
        w1.write(b"FILE slow.txt fine\n")
        await w1.drain()
        await asyncio.sleep(0.3)
        w2.write(b"FILE second.txt fine\n")
        second = await readline(r2)
        first = await readline(r1)
        return first, second
    finally:
        await gw.stop()
        srv.close()


def test_overload_closed_blocks_even_when_policy_would_allow(tmp_path):
    pipeline = StubPipeline(delay=1.5, policy=AllowPolicy())
    first, second = run(_two_files(tmp_path, pipeline))
    assert second == b"BLOCKED second.txt\n" and first == b"echo:FILE slow.txt fine\n"
    (event,) = fail_events(pipeline)
    assert event["imguard"]["fail_mode"] == {"situation": "overload", "mode": "closed"}
    assert event["event"]["kind"] == "alert" and event["event"]["action"] == BLOCK
    assert event["file"]["name"] == "second.txt"


def test_an_uninspected_file_is_archived_and_quarantined_like_any_other(tmp_path):
    """The verdict on a file the gateway could not inspect (overload, timeout, scanner error) goes through the
    Pipeline: it is in the archive, a blocked one in the quarantine, and its alert says the fail mode."""
    from imguard.archive import Archive, Query
    from imguard.pipeline import Pipeline
    from imguard.quarantine import QuarantineStore

    records = []

    class Log:
        def write(self, event):
            records.append(event)

    store = Archive(tmp_path / "archive.sqlite3")
    pipeline = Pipeline(inspector=None, policy=AllowPolicy(), alert_log=Log(), archive=store,
                        quarantine=QuarantineStore(tmp_path / "quarantine"))
    ctx = ChatContext(protocol="xmpp", sender="alice@corp.example", recipients=("bob@ext.example",),
                      transfer_mechanism="ibb")

    def closed(decision):
        return apply_to_decision(FailModes.parse([]), "overload", ctx, decision)[0], {"situation": "overload",
                                                                                        "mode": CLOSED}
    report, decision = pipeline.check_unscannable(b"MZ payload", ctx, "a.exe", "", "limit", "the queue was full",
                                                  adjust=closed)
    assert decision.action == BLOCK and report.findings[0].kind == "unscannable"
    [row] = store.search(Query(person="bob@ext"))
    assert row["file_name"] == "a.exe" and row["action"] == BLOCK and row["mechanism"] == "ibb"
    (event,) = records
    assert event["imguard"]["fail_mode"] == {"situation": "overload", "mode": "closed"}
    assert (tmp_path / "quarantine").exists() and event["imguard"]["quarantine_path"]


def test_overload_open_relays_the_file_and_alerts(tmp_path):
    pipeline = StubPipeline(delay=1.5)          # its policy blocks unscannable files: the fail mode wins
    first, second = run(_two_files(tmp_path, pipeline, fail_mode=["line:overload=open"]))
    assert second == b"echo:FILE second.txt fine\n"
    assert pipeline.scanned == ["slow.txt"], "the second file was scanned after all"
    (event,) = fail_events(pipeline)
    assert event["imguard"]["fail_mode"] == {"situation": "overload", "mode": "open"}
    assert event["event"]["kind"] == "alert" and event["event"]["action"] == ALERT


@pytest.mark.parametrize("mode, expected", [("closed", b"BLOCKED slow.txt\n"), ("open", b"echo:FILE slow.txt fine\n")])
def test_inspection_timeout(tmp_path, mode, expected):
    async def main():
        srv, port = await start_line_server()
        pipeline = StubPipeline(delay=1.5, policy=AllowPolicy())
        gw, gport = await start_gateway(tmp_path, port, pipeline, inspect_timeout=0.3, fail_mode=[f"timeout={mode}"])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"FILE slow.txt fine\n")
            assert await readline(reader) == expected
            # The verdict came from the timeout, not from the scan: when it arrives the scan is still running (its
            # file not yet recorded as scanned, its queue slot still held). No clock in the assertion: a slow
            # machine can make this fail, never pass by itself.
            assert pipeline.scanned == [], "the verdict waited for the slow scan"
            assert gw.inspection.pending == 1, "a timed-out scan still holds its queue slot until it ends"
            for _ in range(200):                    # the scan ends on its own (1.5 s) and frees its slot
                if gw.inspection.pending == 0:
                    break
                await asyncio.sleep(0.05)
            assert gw.inspection.pending == 0
            (event,) = fail_events(pipeline)
            assert event["imguard"]["fail_mode"] == {"situation": "timeout", "mode": mode}
            assert event["imguard"]["report"]["findings"][0]["data"]["reason"] == "timeout"
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_queues_of_all_connections_together_are_bounded(tmp_path):
    """Bytes that arrive while files are inspected are queued per connection (each under --max-queued-bytes);
    --max-total-queued-bytes bounds them all together: the connection that goes past it is closed ('overload')."""
    async def main():
        srv, port = await start_line_server()
        pipeline = StubPipeline(delay=1.5)
        gw, gport = await start_gateway(tmp_path, port, pipeline, inspect_queue=8, max_queued_bytes=4 * 2**20,
                                        max_total_queued_bytes=2**20)
        try:
            conns = [await asyncio.open_connection("127.0.0.1", gport) for _ in range(3)]
            for _, writer in conns:
                writer.write(b"FILE slow.txt fine\n")
                await writer.drain()
            await asyncio.sleep(0.3)                    # all three held by their scans
            for _, writer in conns[:2]:
                writer.write(b"x" * 400_000 + b"\n")    # 800 kB queued in all: under the budget
                await writer.drain()
            await asyncio.sleep(0.2)
            conns[2][1].write(b"y" * 400_000 + b"\n")  # 1.2 MB in all: over it
            assert await closed_by_peer(conns[2][0])
            for reader, _ in conns[:2]:
                assert await readline(reader) == b"echo:FILE slow.txt fine\n"
            kinds = [r["imguard"]["anomaly"] for r in pipeline.records if "anomaly" in r.get("imguard", {})]
            assert [k["kind"] for k in kinds] == ["overload"], kinds
            assert kinds[0]["total_queued_bytes"] > 2**20
            assert len(gw.addon.queued_layers) == 0, "queued bytes still counted after the scans"
        finally:
            await gw.stop()
            srv.close()
    run(main())


# --- parse ---------------------------------------------------------------------------------------------------------

def test_parse_failure_open_relays_the_rest_of_the_connection(tmp_path):
    async def main():
        srv, port = await start_line_server()
        pipeline = StubPipeline()
        gw, gport = await start_gateway(tmp_path, port, pipeline, fail_mode=["line:parse=open"])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"CRASH\n")
            assert await readline(reader) == b"echo:CRASH\n"
            writer.write(b"FILE evil.txt EVIL\n")        # no session any more: relayed uninspected
            assert await readline(reader) == b"echo:FILE evil.txt EVIL\n"
            assert pipeline.scanned == []
            (anomaly,) = [r for r in pipeline.records if "anomaly" in r.get("imguard", {})]
            assert anomaly["imguard"]["anomaly"]["kind"] == "session_error"
            assert anomaly["imguard"]["anomaly"]["fail_mode"] == "open"
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_parse_failure_closed_is_the_default(tmp_path):
    async def main():
        srv, port = await start_line_server()
        gw, gport = await start_gateway(tmp_path, port, StubPipeline())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"CRASH\n")
            assert await closed_by_peer(reader)
        finally:
            await gw.stop()
            srv.close()
    run(main())


# --- exclusions and TLS pinning ------------------------------------------------------------------------------------

def test_excluded_destination_is_relayed_untouched(tmp_path):
    async def main():
        srv, port = await start_line_server()
        pipeline = StubPipeline()
        gw, gport = await start_gateway(tmp_path, port, pipeline, exclude=["127.0.0.0/8"])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(b"FILE evil.txt EVIL\n")
            assert await readline(reader) == b"echo:FILE evil.txt EVIL\n"
            assert pipeline.scanned == [] and gw.passthrough.stats["excluded"] == 1
        finally:
            await gw.stop()
            srv.close()
    run(main())


def test_excluded_host_name_through_the_explicit_proxy(tmp_path):
    """In regular (HTTP proxy) mode the client names the host: a CONNECT to an excluded name is a raw tunnel."""
    async def main():
        srv, port = await start_line_server()
        pipeline = StubPipeline()
        gw, _ = await start_gateway(tmp_path, port, pipeline, mode=["regular@127.0.0.1:0"], exclude=["localhost"])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port_of("regular"))
            writer.write(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
            assert (await readline(reader)).startswith(b"HTTP/1.1 200")
            while await readline(reader) != b"\r\n":
                pass
            writer.write(b"FILE x.exe EVIL\n")
            assert await readline(reader) == b"echo:FILE x.exe EVIL\n"
            assert pipeline.scanned == [] and gw.addon.stats["sessions"] == 0
            assert gw.passthrough.stats["excluded"] == 1
        finally:
            await gw.stop()
            srv.close()
    run(main())


async def start_tls_line_server(cert, key):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def handle(reader, writer):
        try:
            while line := await reader.readline():
                writer.write(b"echo:" + line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_client_refusing_the_gateway_certificate(tmp_path, mode):
    """A client that trusts only the real server's CA (pinning, or imguard's CA not installed) refuses the
    gateway: an alert either way; with tls=open its next connection is relayed untouched and reaches the real
    server's certificate; with closed it keeps failing."""
    async def main():
        certs = make_certificates(tmp_path / "certs")       # RFC 5280 strict enough for Python 3.13 clients
        ca, cert, key = certs.ca_file, certs.cert_file, certs.key_file
        srv, port = await start_tls_line_server(cert, key)
        pipeline = StubPipeline()
        gw, gport = await start_gateway(tmp_path, port, pipeline, ports=[f"{port}=line+tls"], upstream_ca=str(ca),
                                        fail_mode=[f"line:tls={mode}"])
        pinned = ssl.create_default_context(cafile=str(ca))
        try:
            with pytest.raises(ssl.SSLError):
                await asyncio.open_connection("127.0.0.1", gport, ssl=pinned, server_hostname="localhost")
            await asyncio.sleep(0.2)
            alerts = [r for r in pipeline.records if r.get("event", {}).get("action") == "tls_interception_failed"]
            assert len(alerts) == 1, pipeline.records
            assert alerts[0]["imguard"]["tls"]["fail_mode"] == mode and alerts[0]["network"]["protocol"] == "line"
            if mode == "open":
                reader, writer = await asyncio.open_connection("127.0.0.1", gport, ssl=pinned,
                                                               server_hostname="localhost")
                writer.write(b"FILE evil.txt EVIL\n")
                assert await readline(reader) == b"echo:FILE evil.txt EVIL\n"
                assert pipeline.scanned == [] and gw.passthrough.stats["tls_passthrough"] == 1
                writer.close()
            else:
                with pytest.raises(ssl.SSLError):
                    await asyncio.open_connection("127.0.0.1", gport, ssl=pinned, server_hostname="localhost")
        finally:
            await gw.stop()
            srv.close()
    run(main())
