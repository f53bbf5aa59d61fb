"""The protocol registry (imguard/protocols/registry.py): one table both carriers build from. Every protocol has
ports, a signature the gateway's detector recognises on the stored transcripts, limits on the command line, and
builds a session; side connections are found by their destination."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from imguard.files.expected import ExpectedTransfers
from imguard.protocols import detect as det
from imguard.protocols.detect import parse_port_map
from imguard.gateway.settings import GatewaySettings
from imguard.model import ChatContext
from imguard.protocols import registry
from imguard.protocols.registry import PROTOCOLS, SessionRequest, build, find_side
from imguard.replay.replay import DEFAULT_PORTS
from tests.test_irc_support import Checker
from tests.test_sip_support import load

LEGACY = Path(__file__).parent / "data" / "legacy"
MAIN = [p for p in PROTOCOLS.values() if p.ports]

# Stored transcript -> the protocol its first bytes announce (client first; OSCAR: the server's FLAP hello).
OPENINGS = {"msnms_sb2.json": "msnp", "msnms_sb3.json": "msnp", "msnms_sb4.json": "msnp", "msnms_sb5.json": "msnp",
            "oscar_login.json": "oscar", "oscar_bos.json": "oscar", "ymsg_session.json": "ymsg",
            "ymsg_filetransfer.json": "ymsg"}
# Picked up mid-session (the capture started late, or a switchboard after its start): only the port says.
MIDSTREAM = {"msnms_sb0.json": "msnp", "msnms_ns.json": "msnp", "msnslp_inband.json": "msnp"}
# Side connections (their first bytes are the file transfer's own): found by destination, see below.
SIDE = {"msnftp_direct.json", "oscar_oft.json"}
SIP_FILES = {"rfc3428_message.sip": "sip", "rfc5547_invite.sip": "sip", "rfc5547_200ok.sip": "sip",
             "rfc4975_send.msrp": "msrp"}


def first_bytes(name: str) -> tuple[bytes, bytes]:
    """(client's first segment, server's bytes before it) of a stored transcript."""
    server = b""
    for side, text in json.loads((LEGACY / name).read_text())["segments"]:
        if side == "c":
            return text.encode("latin-1"), server
        server += text.encode("latin-1")
    return b"", server


def test_every_transcript_is_classified():
    """Each file in tests/data/legacy is listed above, so a new transcript gets a detection check."""
    assert {p.name for p in LEGACY.glob("*.json")} == set(OPENINGS) | set(MIDSTREAM) | SIDE


@pytest.mark.parametrize("name", sorted(OPENINGS))
def test_first_bytes_recognised_without_a_port(name):
    """On an unmapped port, the registry's signatures recognise the protocol from the first bytes: the client's,
    or for OSCAR the server's hello, byte by byte waiting (NEED_MORE) and never guessing another protocol."""
    client, server = first_bytes(name)
    want = OPENINGS[name]
    if want == "oscar":
        for i in range(1, 10):
            assert det.detect(None, b"", server[:i], {}) is det.NEED_MORE, server[:i]
        assert det.detect(None, b"", server, {}).protocol == want
        assert det.detect(None, b"", b"*\x01\x00\x01\x00\x05\x00\x00\x00\x01", {}).protocol == det.UNKNOWN
        return
    assert det.detect(None, client, server, {}).protocol == want
    for i in range(1, 16):
        assert det.sniff(client[:i]) in (det.NEED_MORE, want), client[:i]


@pytest.mark.parametrize("name", sorted(MIDSTREAM))
def test_midstream_transcripts_by_the_default_port(name):
    """A connection picked up mid-session has no opening: the default port map decides (1863 = MSNP)."""
    client, server = first_bytes(name)
    assert det.detect(None, client, server, {}).protocol == det.UNKNOWN
    assert det.detect(1863, client, server, parse_port_map(registry.default_ports())).protocol == MIDSTREAM[name]


@pytest.mark.parametrize("name", sorted(SIP_FILES))
def test_sip_and_msrp_messages_recognised(name):
    """The RFC-derived SIP requests and responses and the MSRP SEND are recognised by their first line."""
    data = load(name)
    assert det.detect(None, data, b"", {}).protocol == SIP_FILES[name]
    for i in range(1, 16):
        assert det.sniff(data[:i]) in (det.NEED_MORE, SIP_FILES[name]), data[:i]


def test_sip_options_is_not_http():
    assert det.sniff(b"OPTIONS sip:bob@b.example SIP/2.0\r\n") == det.SIP
    assert det.sniff(b"OPTIONS /upload HTTP/1.1\r\n") == det.HTTP


def test_every_main_protocol_has_ports_in_both_carriers():
    """Each main protocol's default ports are in the gateway's default --ports and the replay's port map."""
    gateway, replay = parse_port_map(GatewaySettings().ports), parse_port_map(DEFAULT_PORTS)
    assert {p.name for p in MAIN} == {"xmpp", "irc", "msnp", "oscar", "ymsg", "sip", "msrp", "sametime"}
    for spec in MAIN:
        for entry in spec.ports:
            port = int(entry.split("=")[0])
            assert gateway[port][0] == replay[port][0] == spec.name, entry
    assert gateway[1863] == ("msnp", False) and gateway[5190] == ("oscar", False) and gateway[5061] == ("sip", True)
    assert all(p.client_openers or p.server_hello or p.client_hello for p in MAIN)


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_every_protocol_builds_a_session(name):
    """build() gives a StreamSession for each protocol, with the limits the carrier passed by class."""
    spec = PROTOCOLS[name]
    limits = {}
    if spec.limits is not None:
        first = dataclasses.fields(spec.limits)[0]
        limits = {spec.limits: dataclasses.replace(spec.limits(), **{first.name: 12345})}
    session = build(SessionRequest(name, ChatContext(connection_id="c1"), checker=Checker(),
                                   transfers=ExpectedTransfers(), limits=limits))
    for method in ("data_received", "tls_started", "file_verdict", "connection_closed"):
        assert callable(getattr(session, method)), method
    if spec.limits is not None and hasattr(session, "limits"):
        assert session.limits == limits[spec.limits]
    assert session.data_received(True, b"") is not None


def test_side_connections_found_by_destination():
    """The offers the sessions register (MSNFTP ACCEPT, OSCAR SendFile, SDP MSRP, DCC) are found by the address
    a new connection goes to; DCC's is taken (used once), the others stay for a retry."""
    from tests.test_msnp import msnftp_setup
    from tests.test_oscar import offer_file

    transfers = ExpectedTransfers()
    msnftp_setup(transfers)
    side, offer = find_side(transfers, "192.168.1.14", 6891)
    assert (side.protocol, offer.name) == ("msnftp", "report.exe")
    assert find_side(transfers, "192.168.1.14", 6891) is not None

    offer_file(transfers)
    side, offer = find_side(transfers, "192.168.1.20", 5190)
    assert (side.protocol, offer.name) == ("oft", "setup.exe")
    assert find_side(transfers, "192.168.1.20", 5190, protocols={"msnftp"}) is None

    from imguard.protocols.sip import SipSession
    SipSession(Checker(), transfers, ChatContext(connection_id="sip1")).data_received(True, load("rfc5547_invite.sip"))
    entries = [key for (kind, key) in transfers._entries if kind == "msrp" and isinstance(key, tuple)]
    assert entries
    side, offer = find_side(transfers, *entries[0])
    assert side.protocol == "msrp" and side.tls_first(offer) is False

    from imguard.protocols.irc.dcc import SEND, DccOffer, remember_offer
    remember_offer(transfers, DccOffer(offer_id="o1", kind=SEND, name="a.bin", size=1, sender="a", receiver="b",
                                       host="10.0.0.1", port=5000, context=ChatContext()), 60)
    side, offer = find_side(transfers, "10.0.0.1", 5000)
    assert side.protocol == "dcc" and find_side(transfers, "10.0.0.1", 5000) is None
    assert find_side(None, "10.0.0.1", 5000) is None


def test_limits_on_the_command_line_reach_the_sessions():
    """Every protocol's limits class is in `imguard run`; its options (already prefixed: --msnp-max-line) build
    the instance the gateway's factories give the sessions."""
    from imguard.gateway.cli import add_run_arguments, limits_from_args
    from imguard.gateway.master import default_factories
    from imguard.gateway.addon import ConnectionInfo
    from imguard.protocols.msnp import MsnpLimits
    from imguard.protocols.sip import SipLimits

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    options = set(parser._option_string_actions)
    for protocol, cls, _ in registry.limits_classes():
        # the one prefix rule
        prefix = "" if protocol in ("msnp", "oscar", "ymsg", "sip", "msrp", "sametime") else f"{protocol}-"
        for f in dataclasses.fields(cls):
            assert f"--{prefix}{f.name.replace('_', '-')}" in options, f.name
    assert "MSNP (MSN Messenger) limits" in parser.format_help()
    args = parser.parse_args(["--msnp-max-line", "321", "--sip-max-message-size", "4321"])
    limits = limits_from_args(args)
    assert limits["msnp"] == MsnpLimits(msnp_max_line=321) and limits["sip"].sip_max_message_size == 4321
    factories = default_factories(Checker(), ExpectedTransfers(), limits=[limits["msnp"], limits["sip"]])
    assert set(factories) == set(PROTOCOLS)
    info = ConnectionInfo("msnp", False, ChatContext(connection_id="c1"))
    assert factories["msnp"](info).limits == MsnpLimits(msnp_max_line=321)
    assert factories["sip"](ConnectionInfo("sip", True, ChatContext())).limits == SipLimits(sip_max_message_size=4321)
