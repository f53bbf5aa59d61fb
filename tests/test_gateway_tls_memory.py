"""An intercepted TLS connection gives its idle buffers back (SSL_MODE_RELEASE_BUFFERS).

Both legs of every intercepted chat connection get the mode from LateTlsAddon, after mitmproxy's
TlsConfig made the SSL objects. Checked on real pyOpenSSL connections: SSL_set_mode(ssl, 0) changes
nothing and returns the connection's modes."""

from OpenSSL import SSL
from OpenSSL._util import lib
from mitmproxy import connection, tls
from mitmproxy.proxy.context import Context
from mitmproxy.options import Options

from imguard.gateway.addon import LateTlsAddon


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
