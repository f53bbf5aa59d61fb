"""The inline gateway: mitmproxy 12 embedded in imguard's process, carrying chat sessions.

    settings.py      GatewaySettings (every knob, its default and why)
    master.py        Gateway / GatewayMaster: the minimal addon chain, imguard's addons first; session factories
    addon.py         GatewayAddon: next_layer (which layer for which connection), server_connect (self-connect
                     guard, bytestream and DCC relay redirects), the SessionLayer's Carrier (record, notify_command,
                     commit)
    notices.py       NoticeRouter: a Notify delivered as session.notice(text) on the connection it names
    tls_memory.py    LateTlsAddon: per-host no-verify, server TLS first for sessions, idle buffers released and
                     one certificate object per forged certificate
    dcc.py           SideRelayPorts: the side-relay port pool shared by IRC DCC, MSNFTP and OFT (allocate for the
                     chat session that rewrites an offer, take for the connection that arrives on the port)
    layer.py         SessionLayer: a StreamSession (imguard.protocols.base) on one connection; STARTTLS by
                     pushing ServerTLSLayer -> ClientTLSLayer children; NoticeInjected -> session.notice(text)
    inspection.py    Inspection: the addon that answers InspectFileHook, a bounded thread pool around
                     Pipeline.check_file
    http_uploads.py  HTTP(S) uploads (XEP-0363 PUT, upload paths) buffered, scanned, 403/413
    chat_apis.py     ChatApis: the mitmproxy adapter of the chat-over-HTTP(S) carrier (imguard/chatapi.py: Matrix,
                     Slack, Mattermost, Rocket.Chat, Discord, Teams, RVP), shared with the offline replay
    ca.py            the interception CA in data_dir/ca, named for imguard
    cli.py           `imguard run` / `imguard ca`

How a connection is handled (GatewayAddon.next_layer, called by mitmproxy until a layer is chosen):
    UDP to a port mapped to sip (reverse:udp, ...)  -> SessionLayer(SipDatagramHandler): one datagram, one event;
                                                     other UDP: mitmproxy's own layers
    socks5 listener that is the bytestream relay  -> SessionLayer(Socks5BytestreamSession), server = streamhost
    a side relay port (--dcc-relay)               -> SessionLayer(DCC send/chat, DirectMsnftpSession or OftSession,
                                                     as the offer says), server = the offer's real listener; no
                                                     offer for that port: refused
    not reverse mode, and the destination is an announced side connection (before detection; the registry's
    find_side: a DCC offer when there is no --dcc-relay, an MSNFTP invitation, an OSCAR SendFile rendezvous,
    an SDP MSRP offer)                            -> SessionLayer(dcc/msnftp/oft/msrp session) on that
                                                     connection (ServerTLS -> ClientTLS first for TCP/TLS/MSRP)
    destination port in the port map, or first bytes recognised (detect.detect, the registry's signatures):
        chat protocol with a session factory      -> SessionLayer(factory(ConnectionInfo)) (master.default_factories:
                                                     registry.build for every protocol), or
                                                     ServerTLS -> ClientTLS -> SessionLayer when TLS comes first
        HTTP                                      -> mitmproxy's HttpLayer (HttpUploads scans uploads)
        TLS to an HTTP port, or in reverse:tcp     -> intercepted; the decrypted first bytes decide again
        anything else                             -> TCPLayer(ignore=True): relayed untouched, no flow, no hooks

Side relay (--dcc-relay HOST --dcc-relay-ports FIRST-LAST; `auto` in transparent mode): a pool of mitmproxy
`reverse:tcp` listeners, one per port, added to the modes at start (imguard/gateway/dcc.py says why a pool and not
a listener per offer: the session needs the port synchronously, and mitmproxy binds listeners asynchronously when
the mode option changes). The IRC session rewrites a DCC offer, the MSNP session an MSNFTP ACCEPT and the OSCAR
session a SendFile proposal to HOST:<free pool port>, and stores the offer in ExpectedTransfers under that address;
server_connect on a pool port takes the offer and points the server leg at offer.real_address, or refuses the
connection with a dcc_unannounced anomaly; next_layer puts the offer's session on it.

Notices across connections: GatewayAddon.notify_command() records a session's Notify command (connection_id,
protocol, text) and hands it to its NoticeRouter (notices.py), which knows each live session by its connection
id (ChatContext.connection_id = mitmproxy's client id) and sends a NoticeInjected event into that connection's
handler (as mitmproxy's inject.tcp does, scheduled on the loop, never inside the caller's layer); the
SessionLayer there, however deep under TLS layers, returns session.notice(text)'s commands. A session without
notice() gets none: logged.
"""
