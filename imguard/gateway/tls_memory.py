"""TLS interception's per-connection memory and its late per-host choices: LateTlsAddon runs after mitmproxy's
TlsConfig, turns off upstream verification for the named hosts only, makes a session's STARTTLS talk TLS to the
server before the client (so the forged certificate copies the real one), and trims what each TLS connection
holds (release idle buffers; one certificate and key object per forged certificate)."""

from __future__ import annotations

import collections
import logging
from typing import Any

from mitmproxy import ctx as mitm_ctx
from mitmproxy import tls
from OpenSSL import SSL, crypto

from imguard.gateway.layer import SessionLayer

logger = logging.getLogger("imguard.gateway")

def _release_idle_buffers(data: tls.TlsData) -> None:
    """SSL_MODE_RELEASE_BUFFERS on a connection TlsConfig just made: OpenSSL frees a connection's read and
    write buffers (about 34 KB each) while nothing is pending, instead of holding them for its life. An
    intercepted chat connection is two TLS connections that are idle almost all the time, so this is most
    of what one costs in memory. (pyOpenSSL has no Connection.set_mode; the binding's SSL_set_mode is the
    same call on the same SSL object.)"""
    conn = data.ssl_conn
    if conn is None or _SSL_MODE_RELEASE_BUFFERS is None:
        return
    try:
        _openssl_lib.SSL_set_mode(conn._ssl, _SSL_MODE_RELEASE_BUFFERS)
    except Exception:            # a pyOpenSSL without the private handle: only memory is at stake
        logger.debug("SSL_MODE_RELEASE_BUFFERS not set", exc_info=True)


try:
    from OpenSSL._util import lib as _openssl_lib
    _SSL_MODE_RELEASE_BUFFERS = _openssl_lib.SSL_MODE_RELEASE_BUFFERS
except (ImportError, AttributeError):
    _openssl_lib, _SSL_MODE_RELEASE_BUFFERS = None, None


class SharedCertificates:
    """One pyOpenSSL certificate and key object per certificate TlsConfig hands out, put on every client-facing
    TLS connection in place of the copies TlsConfig makes for each one (its use_certificate and use_privatekey
    take cryptography objects, which pyOpenSSL converts by a DER round trip every time). OpenSSL counts
    references, so a thousand connections to one server then hold one parsed certificate and one key, not a
    thousand: 12.5 KB less per intercepted connection, measured on real handshakes."""

    LIMIT = 128         # certificates remembered (mitmproxy's CertStore keeps 100)

    def __init__(self):
        self._certs: collections.OrderedDict[int, tuple[Any, Any]] = collections.OrderedDict()
        self._keys: dict[int, tuple[Any, Any]] = {}

    def install(self, data: tls.TlsData) -> bool:
        """Swap the copies on `data.ssl_conn` for the shared objects; False (nothing changed) when TlsConfig is
        not there or OpenSSL refuses."""
        master = getattr(mitm_ctx, "master", None)
        tlsconfig = master.addons.get("tlsconfig") if master is not None else None
        if tlsconfig is None or data.ssl_conn is None or _openssl_lib is None:
            return False
        entry = tlsconfig.get_cert(data.context)       # the same cached entry TlsConfig just used
        cert, key = self._shared(entry.cert), self._shared_key(entry.privatekey)
        ssl = data.ssl_conn._ssl
        if (_openssl_lib.SSL_use_certificate(ssl, cert._x509) != 1
                or _openssl_lib.SSL_use_PrivateKey(ssl, key._pkey) != 1):
            _openssl_lib.ERR_clear_error()
            return False
        return True

    def _shared(self, cert) -> Any:
        # Keyed by identity, the entry's Cert held alongside so the id cannot be reused while remembered.
        found = self._certs.get(id(cert))
        if found is not None:
            self._certs.move_to_end(id(cert))
            return found[1]
        shared = crypto.X509.from_cryptography(cert.to_cryptography())
        self._certs[id(cert)] = (cert, shared)
        if len(self._certs) > self.LIMIT:
            self._certs.popitem(last=False)
        return shared

    def _shared_key(self, privatekey) -> Any:
        # mitmproxy signs every forged certificate with one key; a configured --certs file brings its own
        found = self._keys.get(id(privatekey))
        if found is None:
            if len(self._keys) >= self.LIMIT:
                self._keys.clear()
            found = self._keys[id(privatekey)] = (privatekey, crypto.PKey.from_cryptography_key(privatekey))
        return found[1]


class LateTlsAddon:
    """Runs after TlsConfig: turns off upstream verification for the named hosts only, makes sure a session's
    STARTTLS talks TLS to the server before the client (so the forged certificate copies the real one), and
    trims what each TLS connection holds (release buffers; shared certificate objects)."""

    def __init__(self, no_verify_hosts: list[str] | tuple[str, ...] = ()):
        self.no_verify = {h.lower().rstrip(".") for h in no_verify_hosts}
        self.certificates = SharedCertificates()

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if any(isinstance(layer, SessionLayer) for layer in data.context.layers):
            data.establish_server_tls_first = True

    def tls_start_client(self, data: tls.TlsData) -> None:
        _release_idle_buffers(data)
        try:
            self.certificates.install(data)
        except Exception:           # only memory is at stake: the connection keeps TlsConfig's own copies
            logger.debug("certificate objects not shared", exc_info=True)

    def tls_start_server(self, data: tls.TlsData) -> None:
        _release_idle_buffers(data)
        if not self.no_verify or data.ssl_conn is None:
            return
        server = data.conn
        names = {str(n).lower().rstrip(".") for n in (server.sni, server.address[0] if server.address else None) if n}
        if names & self.no_verify:
            data.ssl_conn.set_verify(SSL.VERIFY_NONE, None)
            logger.info("upstream certificate of %s not verified (no_verify_upstream)", "/".join(sorted(names)))
