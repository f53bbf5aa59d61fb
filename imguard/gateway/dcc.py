"""Side connections through the gateway: the relay port pool that rewritten "connect to this address" offers
point at (IRC DCC, MSN's MSNFTP invitations, OSCAR's OFT rendezvous), and finding the offer behind a new data
connection to a pool port.

    ports = SideRelayPorts("192.0.2.1", parse_port_range("40000-40099"), transfers)
    relay = DccRelay(ports.host, ports.allocate)    # IrcSession(dcc_relay=), MsnpSession/OscarSession(side_relay=)
    ports.specs()          # one mitmproxy listener per pool port, added to the gateway's --mode list
    ports.take(port)       # (side protocol, offer) a connection to that pool port is for (None: unannounced)

Each session stores its offer in the shared table under (relay host, pool port) with its own kind (relay_kinds());
the offer knows the real listener (`offer.real_address`). One pool serves every mechanism: a port is free when no
kind has an offer waiting on it.

Why a pool of mitmproxy listeners opened at start (and not one listener opened per offer): `allocate(offer)`
is called synchronously inside an IrcSession, which must write the port into the offer it forwards at once;
binding a socket is asynchronous in mitmproxy (`options.update(mode=...)` re-validates every mode and binds
in a background task), so an on-demand listener could still be unbound when the receiver connects, and every
offer would churn the option that also carries the operator's listeners. A fixed range is bound (or fails)
at start like every other listener, is what a firewall rule can name, and costs one idle socket per port.
Each pool port is a `reverse:tcp` listener whose placeholder destination is the pool port itself (refused
by the self-connect guard if it were ever used): the gateway's server_connect hook replaces it with the
offer's real address, or refuses the connection when no offer announced it. A port carries one pending
offer at a time (the table key is (relay host, port)); it is free again once its connection arrives or
the offer expires, so the range bounds the number of offers waiting at once, not the number of transfers.
"""

from __future__ import annotations

import ipaddress

from mitmproxy.proxy import mode_specs


def parse_port_range(value: str) -> range:
    """"40000-40099" -> range(40000, 40100); "40000" -> one port. ValueError says what is wrong."""
    first, sep, last = str(value).strip().partition("-")
    if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
        raise ValueError(f"dcc_relay_ports {value!r}: expected FIRST-LAST, e.g. 40000-40099")
    lo, hi = int(first), int(last) if sep else int(first)
    if not 0 < lo <= hi < 65536:
        raise ValueError(f"dcc_relay_ports {value!r}: ports must be 1-65535 and FIRST <= LAST")
    return range(lo, hi + 1)


def normalize_host(host: str) -> str:
    """The relay address as an IP literal (DCC offers carry a number, so a name cannot be written into them)."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        raise ValueError(f"dcc_relay {host!r}: expected the gateway's IP address as clients reach it") from None


def relay_kinds() -> dict[str, str]:
    """ExpectedTransfers kind -> side protocol (registry.SIDES) of the offers that may wait on a pool port."""
    from imguard.protocols.irc.dcc import DCC_KIND
    from imguard.protocols.msnp.session import MSNFTP_KIND
    from imguard.protocols.oscar.session import OFT_KIND

    return {DCC_KIND: "dcc", MSNFTP_KIND: "msnftp", OFT_KIND: "oft"}


class SideRelayPorts:
    """The pool of relay ports and the offers waiting on them (in the shared ExpectedTransfers table)."""

    def __init__(self, host: str, ports: range, transfers):
        if transfers is None:
            raise ValueError("dcc_relay needs the expected-transfers table (imguard.files.expected)")
        self.host = normalize_host(host)
        self.ports = ports
        self.transfers = transfers
        self._next = 0
        self.kinds = relay_kinds()
        self.modes = {mode_specs.ProxyMode.parse(spec) for spec in self.specs()}

    def specs(self) -> list[str]:
        """The listeners to add to the gateway's modes: one reverse:tcp per port, listening on --listen-host."""
        return [f"reverse:tcp://127.0.0.1:{port}@{port}" for port in self.ports]

    def is_relay(self, mode: mode_specs.ProxyMode | None) -> bool:
        return mode in self.modes

    def allocate(self, offer) -> int:
        """For DccRelay: the next pool port with no offer of any kind waiting on it (round robin). Raises when
        all are taken: the session then refuses the offer with a notice (a file is never let around the gateway)."""
        n = len(self.ports)
        for i in range(n):
            port = self.ports[(self._next + i) % n]
            if all(self.transfers.get((self.host, port), kind=kind) is None for kind in self.kinds):
                self._next = (self._next + i + 1) % n
                return port
        raise RuntimeError(f"all {n} side relay ports have an offer waiting")

    def take(self, port: int) -> tuple[str, object] | None:
        """(side protocol, offer) a connection to pool port `port` is for, removed from the table (a relay port
        carries one connection per offer); None: unannounced. The offer's `real_address` is where to go on."""
        for kind, protocol in self.kinds.items():
            offer = self.transfers.take((self.host, port), kind=kind)
            if offer is not None:
                return protocol, offer
        return None


DccRelayPorts = SideRelayPorts     # the name it had when it served DCC only
