"""An intercepted TLS connection gives its idle buffers back (SSL_MODE_RELEASE_BUFFERS) and shares one
certificate and key object with every other connection that presents the same certificate.

Both legs of every intercepted chat connection get the mode from LateTlsAddon, after mitmproxy's
TlsConfig made the SSL objects. Checked on real pyOpenSSL connections: SSL_set_mode(ssl, 0) changes
nothing and returns the connection's modes."""

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL._util import lib
from mitmproxy import connection, tls
from mitmproxy.addons import tlsconfig
from mitmproxy.test import taddons
from mitmproxy.proxy.context import Context
from mitmproxy.options import Options

from imguard.gateway.tls_memory import LateTlsAddon


def _tls_data(method) -> tls.TlsData:
    client = connection.Client(peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 5222), timestamp_start=0)
    data = tls.TlsData(conn=client, context=Context(client, Options()))
    data.ssl_conn = SSL.Connection(SSL.Context(method))
    return data


def _modes(conn: SSL.Connection) -> int:
    return lib.SSL_set_mode(conn._ssl, 0)


def test_both_legs_release_idle_buffers():
    addon = LateTlsAddon()
    client_leg, server_leg = _tls_data(SSL.TLS_SERVER_METHOD), _tls_data(SSL.TLS_CLIENT_METHOD)
    assert not _modes(client_leg.ssl_conn) & lib.SSL_MODE_RELEASE_BUFFERS
    addon.tls_start_client(client_leg)
    addon.tls_start_server(server_leg)
    assert _modes(client_leg.ssl_conn) & lib.SSL_MODE_RELEASE_BUFFERS
    assert _modes(server_leg.ssl_conn) & lib.SSL_MODE_RELEASE_BUFFERS


def test_no_ssl_object_yet_is_left_alone():
    data = _tls_data(SSL.TLS_SERVER_METHOD)
    data.ssl_conn = None          # another addon answered the hook without TLS
    LateTlsAddon().tls_start_client(data)
    assert data.ssl_conn is None


# --- one certificate object for every connection that presents it --------------------------------------------

def _client_leg(tlsconfig_addon, sni: str) -> tls.TlsData:
    """What TlsConfig makes for a client connecting with `sni`: the SSL object with the forged certificate."""
    client = connection.Client(peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 5223), timestamp_start=0,
                               sni=sni)
    data = tls.TlsData(conn=client, context=Context(client, Options()))
    tlsconfig_addon.tls_start_client(data)
    return data


def _handshake(server: SSL.Connection, ca_file: str, sni: str) -> bytes:
    """A real client handshake over memory BIOs, verifying the gateway's certificate; the DER it was shown."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.load_verify_locations(ca_file)
    context.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
    client = SSL.Connection(context)
    client.set_tlsext_host_name(sni.encode())
    client.set_connect_state()
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        for sender, receiver in ((client, server), (server, client)):
            try:
                receiver.bio_write(sender.bio_read(65536))
            except SSL.WantReadError:
                pass
        if client.get_peer_certificate() is not None and server.get_cipher_name() and client.get_cipher_name():
            break
    assert client.get_cipher_name(), "handshake did not complete"
    return client.get_peer_certificate().to_cryptography().public_bytes(serialization.Encoding.DER)


def test_connections_to_one_server_share_one_certificate_object(tmp_path):
    """TlsConfig gives every connection its own copy of the forged certificate and key; LateTlsAddon puts one
    shared object on all of them (OpenSSL counts references). The client still sees the same certificate,
    signed by imguard's CA, and completes its handshake."""
    ta = tlsconfig.TlsConfig()
    with taddons.context(ta) as tctx:
        tctx.configure(ta, confdir=str(tmp_path))
        late = LateTlsAddon()
        first, second = _client_leg(ta, "chat.example"), _client_leg(ta, "chat.example")
        other = _client_leg(ta, "other.example")
        assert lib.SSL_get_certificate(first.ssl_conn._ssl) != lib.SSL_get_certificate(second.ssl_conn._ssl)
        forged = ta.get_cert(first.context).cert.to_cryptography().public_bytes(serialization.Encoding.DER)

        for data in (first, second, other):
            late.tls_start_client(data)

        assert lib.SSL_get_certificate(first.ssl_conn._ssl) == lib.SSL_get_certificate(second.ssl_conn._ssl)
        assert lib.SSL_get_certificate(other.ssl_conn._ssl) != lib.SSL_get_certificate(first.ssl_conn._ssl)
        # the key is the shared one too: a handshake signs with it, so a mismatch would fail below
        ca_file = str(tmp_path / "mitmproxy-ca-cert.pem")
        assert _handshake(first.ssl_conn, ca_file, "chat.example") == forged
        assert _handshake(second.ssl_conn, ca_file, "chat.example") == forged
