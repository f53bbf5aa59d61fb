"""IRC DCC in the gateway and notices routed between connections, on loopback with the embedded mitmproxy:
the relay port pool, a connection to a relay port carried to the offer's real listener and held until the
verdict, a blocked file's notice delivered on the offerer's IRC connection, DCC caught by destination when
offers are not rewritten, and the session limits on the `imguard run` command line."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from imguard.files.expected import ExpectedTransfers
from imguard.gateway.dcc import DccRelayPorts, parse_port_range
from imguard.gateway.master import Gateway, GatewayError
from imguard.gateway.settings import GatewaySettings
from imguard.model import ALLOW, ChatContext, Decision
from imguard.protocols.irc.dcc import SEND, DccOffer, remember_offer

from test_gateway import TIMEOUT, StubPipeline, closed_by_peer, free_port, readline, run


class ChatPipeline(StubPipeline):
    """StubPipeline (files with b"EVIL" blocked) that allows every message."""

    def check_message(self, text, ctx):
        return Decision(action=ALLOW)


def offer_for(port: int, real_port: int, connection_id: str = "", relay_port: int = 0,
              payload: bytes = b"") -> DccOffer:
    return DccOffer(offer_id="o1", kind=SEND, name="report.bin", size=len(payload), sender="alice", receiver="bob",
                    host="127.0.0.1", port=real_port, relay_host="127.0.0.1" if relay_port else "",
                    relay_port=relay_port, context=ChatContext(protocol="irc", sender="alice", recipients=("bob",),
                                                               connection_id=connection_id))


async def start_sender(payload: bytes):
    """The DCC sender's listener (active DCC): sends the file, reads ACKs until the peer closes."""
    acks = []

    async def handle(reader, writer):
        writer.write(payload)
        await writer.drain()
        while data := await reader.read(4096):
            acks.append(data)
        writer.close()
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], acks


async def start_irc_server():
    """Welcomes whoever registers as alice; otherwise silent."""
    async def handle(reader, writer):
        while line := await reader.readline():
            if line.startswith(b"USER"):
                writer.write(b":irc.test 001 alice :Welcome alice!a@127.0.0.1\r\n")
                await writer.drain()
        writer.close()
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def test_port_range_and_allocation():
    """FIRST-LAST parses; a port with a waiting offer is skipped (round robin); a full pool refuses."""
    assert parse_port_range("40000-40002") == range(40000, 40003)
    assert parse_port_range("5000") == range(5000, 5001)
    for bad in ("", "a-b", "40002-40000", "0-5", "1-70000"):
        with pytest.raises(ValueError):
            parse_port_range(bad)
    transfers = ExpectedTransfers()
    ports = DccRelayPorts("127.0.0.1", range(40000, 40003), transfers)
    first = ports.allocate(None)
    remember_offer(transfers, offer_for(0, 1, relay_port=first), 60)
    second = ports.allocate(None)
    assert second != first
    remember_offer(transfers, offer_for(0, 1, relay_port=second), 60)
    third = ports.allocate(None)
    remember_offer(transfers, offer_for(0, 1, relay_port=third), 60)
    assert {first, second, third} == {40000, 40001, 40002}
    with pytest.raises(RuntimeError):
        ports.allocate(None)
    protocol, taken = ports.take(second)
    assert (protocol, taken.relay_port) == ("dcc", second)
    assert ports.allocate(None) == second          # free again once its connection took the offer
    with pytest.raises(ValueError):
        DccRelayPorts("irc.example.com", range(1, 2), transfers)     # an offer carries an IP, not a name


def test_bad_dcc_settings_are_refused(tmp_path):
    for relay, ports in (("irc.example.com", "40000-40001"), ("127.0.0.1", "4-3")):
        s = GatewaySettings(mode=["socks5@127.0.0.1:0"], dcc_relay=relay, dcc_relay_ports=ports)
        with pytest.raises(GatewayError):
            Gateway(s, ChatPipeline(), data_dir=tmp_path / "data")


async def relay_gateway(tmp_path, pipeline, irc_port: int, mode: str = ""):
    first = free_port()
    transfers = ExpectedTransfers()
    s = GatewaySettings(mode=[mode or f"reverse:tcp://127.0.0.1:{irc_port}@127.0.0.1:0"], ports=[f"{irc_port}=irc"],
                        dcc_relay="127.0.0.1", dcc_relay_ports=f"{first}", listen_host="127.0.0.1")
    gw = Gateway(s, pipeline, data_dir=tmp_path / "data", transfers=transfers)
    await gw.start()
    return gw, transfers, first


def test_relay_port_carries_an_allowed_file_to_the_receiver(tmp_path):
    """A connection to the relay port goes on to the offer's real listener; the file is held, inspected in a
    worker thread and then released byte for byte; the sender got the session's ACKs."""
    async def main():
        payload = b"clean bytes " * 500
        pipeline = ChatPipeline()
        irc, irc_port = await start_irc_server()
        sender, sender_port, acks = await start_sender(payload)
        gw, transfers, relay_port = await relay_gateway(tmp_path, pipeline, irc_port)
        try:
            remember_offer(transfers, offer_for(0, sender_port, relay_port=relay_port, payload=payload), 60)
            reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
            received = await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
            assert received == payload and pipeline.scanned == ["report.bin"]
            writer.close()
            await asyncio.sleep(0.1)
            assert b"".join(acks)[-4:] == len(payload).to_bytes(4, "big")
        finally:
            await gw.stop()
            irc.close()
            sender.close()
    run(main())


@pytest.mark.parametrize("via", ["reverse", "connect"])
def test_blocked_file_notice_reaches_the_offerers_irc_connection(tmp_path, via):
    """A blocked DCC file: the receiver's connection closes with nothing; the notify record is delivered as
    imguard's NOTICE on alice's IRC connection (another connection, injected into its layer), whether that
    connection came in reverse mode or through an HTTP proxy CONNECT tunnel (under mitmproxy's HttpLayer)."""
    async def main():
        payload = b"EVIL" * 100
        pipeline = ChatPipeline()
        irc, irc_port = await start_irc_server()
        sender, sender_port, _ = await start_sender(payload)
        gw, transfers, relay_port = await relay_gateway(tmp_path, pipeline, irc_port,
                                                        "regular@127.0.0.1:0" if via == "connect" else "")
        try:
            if via == "connect":
                ir, iw = await asyncio.open_connection("127.0.0.1", gw.port_of("regular"))
                iw.write(f"CONNECT 127.0.0.1:{irc_port} HTTP/1.1\r\nHost: 127.0.0.1:{irc_port}\r\n\r\n".encode())
                assert (await readline(ir)).startswith(b"HTTP/1.1 200")
                while (await readline(ir)) not in (b"\r\n", b""):
                    pass
            else:
                ir, iw = await asyncio.open_connection("127.0.0.1", gw.port_of("reverse"))
            iw.write(b"NICK alice\r\nUSER a 0 * :Alice\r\n")
            assert (await readline(ir)).startswith(b":irc.test 001 alice")
            [irc_id] = list(gw.addon.notices.sessions)
            remember_offer(transfers, offer_for(0, sender_port, irc_id, relay_port, payload), 60)
            reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
            assert await closed_by_peer(reader)
            notice = await readline(ir)
            assert notice.startswith(b":imguard NOTICE alice :") and b"report.bin" in notice, notice
            assert [r for r in pipeline.records if r.get("imguard", {}).get("notify")]
            assert gw.addon.stats["notices"] == 1
            iw.close()
        finally:
            await gw.stop()
            irc.close()
            sender.close()
    run(main())


def test_unannounced_relay_connection_is_refused(tmp_path):
    async def main():
        pipeline = ChatPipeline()
        irc, irc_port = await start_irc_server()
        gw, transfers, relay_port = await relay_gateway(tmp_path, pipeline, irc_port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
            writer.write(b"hello")
            assert await closed_by_peer(reader)
            kinds = [r["imguard"]["anomaly"]["kind"] for r in pipeline.records if "anomaly" in r.get("imguard", {})]
            assert kinds == ["dcc_unannounced"]
        finally:
            await gw.stop()
            irc.close()
    run(main())


def test_without_relay_dcc_is_caught_by_destination(tmp_path):
    """Offers not rewritten (no --dcc-relay): a proxied connection (socks5 here, transparent in production) to an
    announced DCC address gets a DCC session before protocol detection, so a blocked file never arrives; the
    next connection to that address (offer used) is relayed as usual (with --proxy-destinations any: by default
    the explicit proxy refuses a destination no offer announces, tests/test_open_relay.py)."""
    async def main():
        payload = b"EVIL" * 100
        pipeline = ChatPipeline()
        transfers = ExpectedTransfers()
        sender, sender_port, _ = await start_sender(payload)
        s = GatewaySettings(mode=["socks5@127.0.0.1:0"], proxy_destinations="any")
        gw = Gateway(s, pipeline, data_dir=tmp_path / "data", transfers=transfers)
        await gw.start()
        try:
            remember_offer(transfers, offer_for(0, sender_port, payload=payload), 60)

            async def via_socks():
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port_of("socks5"))
                writer.write(b"\x05\x01\x00")
                assert await reader.readexactly(2) == b"\x05\x00"
                writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + sender_port.to_bytes(2, "big"))
                assert (await reader.readexactly(10))[:2] == b"\x05\x00"
                return reader, writer
            reader, _ = await via_socks()
            assert await closed_by_peer(reader)
            assert pipeline.scanned == ["report.bin"]
            reader, writer = await via_socks()
            data = await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
            assert data == payload and pipeline.scanned == ["report.bin"], "an unannounced connection was held"
            writer.close()
        finally:
            await gw.stop()
            sender.close()
    run(main())


def test_session_and_inspection_limits_on_the_command_line():
    """IrcLimits, XmppLimits and InspectLimits appear in `imguard run`; the shared name max_held_bytes is
    prefixed per protocol; unset options keep their defaults."""
    from imguard.gateway.cli import add_run_arguments, limits_from_args
    from imguard.inspect import InspectLimits
    from imguard.protocols.irc import IrcLimits
    from imguard.protocols.xmpp.decoder import XmppLimits

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    text = parser.format_help()
    for option in ("--irc-max-held-bytes", "--xmpp-max-held-bytes", "--irc-dcc-offer-ttl", "--max-file-size",
                   "--dcc-relay", "--dcc-relay-ports"):
        assert option in text, option
    limits = limits_from_args(parser.parse_args(["--irc-max-held-bytes", "1000", "--xmpp-max-held-bytes", "2000",
                                                 "--max-file-size", "3000"]))
    assert limits["irc"] == IrcLimits(max_held_bytes=1000)
    assert limits["xmpp"] == XmppLimits(max_held_bytes=2000)
    assert limits["inspect"] == InspectLimits(max_file_size=3000)
    defaults = limits_from_args(parser.parse_args([]))
    assert (defaults["irc"], defaults["xmpp"], defaults["inspect"]) == (IrcLimits(), XmppLimits(), InspectLimits())


def test_one_pool_for_every_relayed_mechanism():
    """DCC, MSNFTP and OFT offers share the pool: a port with any kind of offer waiting is skipped, and a
    connection to a port gets the offer of whichever kind waits there (once)."""
    from imguard.protocols.msnp import MSNFTP_KIND
    from imguard.protocols.msnp.session import MsnftpOffer
    from imguard.protocols.oscar import OFT_KIND, OftOffer

    transfers = ExpectedTransfers()
    ports = DccRelayPorts("127.0.0.1", range(40000, 40003), transfers)
    msn = MsnftpOffer("m1", "3141", "a.txt", 3, "alice@x", "bob@y", "10.0.0.5", 6891, relay_host="127.0.0.1",
                      relay_port=ports.allocate(None))
    transfers.expect(msn.key, msn, kind=MSNFTP_KIND, ttl=60)
    oft = OftOffer("o1", "ab" * 8, "b.txt", 3, 1, "Alice", "Bob", addresses=(("10.0.0.6", 5000),),
                   relay_host="127.0.0.1", relay_port=ports.allocate(None))
    transfers.expect(("127.0.0.1", oft.relay_port), oft, kind=OFT_KIND, ttl=60)
    dcc_port = ports.allocate(None)
    assert {msn.relay_port, oft.relay_port, dcc_port} == {40000, 40001, 40002}
    remember_offer(transfers, offer_for(0, 1, relay_port=dcc_port), 60)
    with pytest.raises(RuntimeError):
        ports.allocate(None)
    protocol, taken = ports.take(oft.relay_port)
    assert (protocol, taken.real_address) == ("oft", ("10.0.0.6", 5000))
    protocol, taken = ports.take(msn.relay_port)
    assert (protocol, taken.real_address) == ("msnftp", ("10.0.0.5", 6891))
    assert ports.take(msn.relay_port) is None                      # used once
    assert ports.allocate(None) in (msn.relay_port, oft.relay_port)
