"""The inline gateway: mitmproxy 12 embedded in imguard's process, carrying chat sessions.

    settings.py      GatewaySettings (every knob, its default and why)
    master.py        Gateway / GatewayMaster: the minimal addon chain, imguard's addons first; session factories
    addon.py         GatewayAddon: next_layer (which layer for which connection), server_connect (self-connect
                     guard, bytestream relay redirect), inspect_file (scans in worker threads); LateTlsAddon
    detect.py        pure protocol detection: destination port map, then first bytes
    layer.py         SessionLayer: a StreamSession (imguard.protocols.base) on one connection; STARTTLS by
                     pushing ServerTLSLayer -> ClientTLSLayer children
    inspection.py    bounded thread pool around Pipeline.check_file
    http_uploads.py  HTTP(S) uploads (XEP-0363 PUT, upload paths) buffered, scanned, 403/413
    ca.py            the interception CA in data_dir/ca, named for imguard
    cli.py           `imguard run` / `imguard ca`

How a connection is handled (GatewayAddon.next_layer, called by mitmproxy until a layer is chosen):
    socks5 listener that is the bytestream relay  -> SessionLayer(Socks5BytestreamSession), server = streamhost
    destination port in the port map, or first bytes recognised (detect.detect):
        chat protocol with a session factory      -> SessionLayer(factory(ConnectionInfo)), or
                                                     ServerTLS -> ClientTLS -> SessionLayer when TLS comes first
        HTTP                                      -> mitmproxy's HttpLayer (HttpUploads scans uploads)
        TLS to an HTTP port, or in reverse:tcp     -> intercepted; the decrypted first bytes decide again
        anything else                             -> TCPLayer(ignore=True): relayed untouched, no flow, no hooks
"""
