"""The gateway's settings: where it listens, what it intercepts, how hard it works and for how long.

Declared with `imguard.settings.setting()` so `imguard run --help` and docs/settings.md are built
from the same text. Every field is frozen: a running gateway is rebuilt, not mutated.
"""

from __future__ import annotations

from dataclasses import dataclass

from imguard.protocols import registry
from imguard.settings import MiB, setting


@dataclass(frozen=True)
class GatewaySettings:
    """Gateway: listeners, interception and limits"""

    mode: list = setting(
        ["regular@8080", "socks5@1080"],
        "A listener in mitmproxy mode syntax; repeat for several: transparent@8080 (needs NAT REDIRECT rules), "
        "regular@8080 (explicit HTTP proxy, CONNECT to chat ports works), socks5@1080, "
        "reverse:tcp://server:5222@5222. The default works on a fresh machine without root or redirect rules: "
        "point a chat client's proxy setting at it")
    listen_host: str = setting(
        "127.0.0.1", "Address the listeners bind to when a --mode names none. Loopback by default, so a first "
        "run is not an open proxy; give the gateway's LAN address (or '' for all) to serve other machines, "
        "and a dedicated address in transparent deployments so a direct connection cannot loop back. In "
        "transparent mode it is also the address the side-channel relays are announced at (--bytestream-relay "
        "and --dcc-relay 'auto'): the gateway's address on the users' network")
    data_dir: str = setting(
        "", "Folder for ca/ (the interception CA), alerts.jsonl, cache/ and quarantine/ "
        "('' = $IMGUARD_DATA_DIR, else $XDG_DATA_HOME/imguard, else ~/.local/share/imguard)")
    ports: list = setting(
        registry.default_ports(),
        "Destination port to protocol, PORT=PROTO; '+tls' means TLS from the first byte (XMPP direct TLS, "
        "IRC over TLS, SIP over TLS). --ports adds to the defaults port by port; PORT=none relays that port "
        "untouched. Unknown ports are recognised by their first bytes. 5269 (XMPP server-to-server) is left out: "
        "it is relayed untouched")
    http_ports: list = setting(
        [80, 443, 5280, 5281, 8080, 8443],
        "Destination ports whose TLS is intercepted as HTTPS so uploads (XEP-0363 PUT, chat APIs) can be "
        "scanned; TLS to any other unknown port is relayed untouched")
    upload_paths: list = setting(
        [], "Extra URL regular expressions of HTTP upload endpoints to buffer and scan (besides the uploads "
            "announced by chat sessions, which are always scanned)")
    max_upload_size: int = setting(
        64 * MiB, "Largest HTTP upload buffered for inspection; a larger one is blocked with 413 and an alert "
                  "(never passed unscanned)")
    upstream_ca: str = setting(
        "", "PEM bundle of extra CAs trusted for upstream servers (a private chat server's CA); "
            "'' = the system trust store only")
    no_verify_upstream: list = setting(
        [], "Host names whose upstream certificate is NOT verified (a lab server with a self-signed "
            "certificate). Every other upstream is verified")
    bytestream_relay: str = setting(
        "auto", "HOST:PORT chat sessions rewrite SOCKS5 file-transfer streamhosts to (XEP-0065), so the file "
                "crosses the gateway and is held until inspection decides; reachable by the clients. 'auto': "
                "in transparent mode --listen-host:1080 (the gateway's own address), elsewhere off. In "
                "transparent mode a socks5 listener is opened on its port (on --listen-host) unless --mode has "
                "one there; in the other modes it must be one of the --mode socks5 listeners. ''/'none' = "
                "streamhosts are not rewritten (the data connection goes around the gateway)")
    dcc_relay: str = setting(
        "auto", "Address (IP) written into IRC DCC offers, MSN MSNFTP invitations and OSCAR OFT proposals in "
                "place of the offerer's, so every such file and chat connection crosses the gateway and a file "
                "is held until inspection decides; it must reach this gateway's --dcc-relay-ports, which listen on "
                "--listen-host. 'auto': in transparent mode --listen-host, elsewhere off. ''/'none' = offers are "
                "not rewritten: they go around the gateway "
                "(unless the redirect rules send the DCC port to a transparent listener: then the connection is "
                "caught by its address)")
    dcc_relay_ports: str = setting(
        "20000-20099", "Port range FIRST-LAST the gateway listens on for DCC, MSNFTP and OFT connections when "
                       "the relay is on (opened at start, so a firewall can allow exactly this range; outside Linux's "
                       "ephemeral range 32768-60999, where outgoing connections could hold a port). One port "
                       "carries one pending offer at a time: this many offers may wait at once; another is "
                       "refused with a notice to its sender")
    transfer_store: str = setting(
        "memory", "Where the expected-transfers table lives (announced uploads, bytestream hashes, DCC offers, "
                  "blocked URLs): 'memory' for one worker; 'sqlite' (DATA_DIR/transfers.sqlite3) for several "
                  "workers on one host sharing the data folder; a PostgreSQL connection string (the archive_dsn) "
                  "for several gateway hosts. A side connection may land on any worker or host: with 'memory' "
                  "and several, an upload announced through one worker crosses another unscanned")
    transfer_store_timeout: float = setting(
        2.0, "Seconds a read or write of a shared transfer_store may take (the event loop waits for it); past "
             "it, or with the store down, the side transfer follows the 'store' fail mode (closed: refused)")
    tcp_timeout: int = setting(
        6 * 3600, "Seconds an idle connection is kept open. Chat connections idle for long periods; mitmproxy's "
                  "own default (600 s) would cut them")
    quick_ack: bool = setting(
        True, "Acknowledge every read of an inspected chat connection at once (TCP_QUICKACK), on both legs. A "
              "chat server or client that leaves Nagle's algorithm on (Prosody does) holds its next small write "
              "until the gateway's kernel acknowledges the last one, which it may delay by 40 ms: with this off, a "
              "burst of chat messages crosses in 40 ms steps")
    inspect_workers: int = setting(
        2, "Threads that inspect files (libmagic, YARA, archives) off the event loop")
    inspect_queue: int = setting(
        32, "Files waiting for or in inspection at once; a file beyond this is not scanned and is treated as "
            "unscannable (reason 'limit'), so policy decides and it never passes silently")
    max_queued_bytes: int = setting(
        16 * MiB, "Bytes a connection may receive while it waits for a file verdict (mitmproxy keeps reading "
                  "and has no backpressure); beyond this the connection is closed with an anomaly")
    rules: list = setting([], "Folder of policy rules; repeat to combine folders (their rule files are loaded "
                              "together). None given = the bundled rules/ folder")
    signatures: str = setting("", "Folder of YARA signatures ('' = the bundled signatures/ folder)")
    max_total_queued_bytes: int = setting(
        256 * MiB, "Bytes all connections together may hold while they wait (for their server connection or a "
                   "file verdict); a connection that adds more beyond this is closed with an 'overload' anomaly. "
                   "Bounds memory under a flood of many connections, each under --max-queued-bytes")
    exclude: list = setting(
        [], "Destinations never intercepted, relayed byte for byte (no TLS interception, no inspection): IP "
            "addresses, networks (CIDR) or host names (a name matches itself and its subdomains; names are only "
            "known in regular/socks5 mode, transparent mode sees addresses). For banks, health services and apps "
            "that pin their certificates. Repeat or comma-separate. Excluding in the redirect rules too "
            "(deploy/nftables/imguard.nft, set `exclude`) keeps such traffic away from the gateway altogether")
    fail_mode: list = setting(
        ["closed"], "What happens when the gateway cannot do its job, per protocol and situation: KEY=open (relay and "
                    "alert) or KEY=closed (block and alert). KEY is PROTO, SITUATION or PROTO:SITUATION (most specific "
                    "wins); a bare 'open'/'closed' sets the default. Situations: overload (inspection queue full), "
                    "timeout (--inspect-timeout exceeded), tls (a client refused the gateway's certificate: open = "
                    "its next connections to that server are relayed untouched for an hour), downgrade (an XMPP "
                    "client logs in without the STARTTLS its server offers: closed = its credentials are refused, "
                    "open = forwarded with the alert), parse (the protocol "
                    "session failed: open = the rest of the connection is relayed uninspected). Protocols: xmpp, "
                    "irc, socks5, http, dcc. Example: --fail-mode closed --fail-mode irc:parse=open")
    inspect_timeout: float = setting(
        30.0, "Seconds one file may spend in inspection before the fail mode 'timeout' decides it (0 = no limit)")
    scan_notice_after_seconds: float = setting(
        2.0, "Seconds a held file's scan may take before the people of ours who wait for it (its inside sender or "
             "receiver) are told in their chat that it is being scanned; files on a connection of their own (DCC, "
             "MSNFTP, OFT, SOCKS5) and in-band ones (XMPP IBB, MSNSLP, Sametime file channels). 0 = never")
    reload_interval: float = setting(
        5.0, "Seconds between checks of the rules and signatures folders for changed *.yaml/*.yar files; a change "
             "reloads them (validated first: a broken file leaves the running policy in force and raises an "
             "alert). SIGHUP reloads at once. 0 = only on SIGHUP")
    proxy_destinations: str = setting(
        "chat", "Where a client of the explicit proxy listeners (regular@, socks5@) may connect: 'chat' = a port of "
                "the port map (--ports, not PORT=none), an HTTP port (--http-ports: chat APIs and uploads), a side "
                "transfer a chat session announced (DCC, MSNFTP, OFT, MSRP), or a URL one announced (an upload "
                "slot, a shared file); anything else is refused (403 to a CONNECT, a SOCKS5 failure reply) with a "
                "'proxy_destination_refused' anomaly. 'any' = no restriction: an open relay for whoever reaches "
                "the listener. The bytestream relay is separate: it only ever accepts announced stream hashes")
    proxy_auth: str = setting(
        "", "Credentials clients of the explicit proxy listeners must give: USER:PASS, or @FILE for an Apache "
            "htpasswd file (bcrypt or SHA1 entries). HTTP CONNECT and proxy requests without them get 407, a "
            "SOCKS5 client must use username/password authentication (RFC 1929). The bytestream relay and the "
            "DCC relay ports are not affected (their peers cannot authenticate; they only accept announced "
            "transfers). '' = no authentication: keep the listeners on loopback, or on a LAN set this")
