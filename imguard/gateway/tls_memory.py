"""TLS interception's per-connection memory and its late per-host choices: LateTlsAddon runs after mitmproxy's
TlsConfig, turns off upstream verification for the named hosts only, makes a session's STARTTLS talk TLS to the
server before the client (so the forged certificate copies the real one), and trims what each TLS connection
holds (release idle buffers; fresh memory BIOs after the handshake and after a large read, renewed by
SessionLayer; one certificate and key object per forged certificate)."""

from __future__ import annotations

import collections
import logging
from typing import Any

from mitmproxy import ctx as mitm_ctx
from mitmproxy import tls
from OpenSSL import SSL, crypto

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


TRIM_AFTER = 2048       # a read this large (decrypted) grew the connection's memory BIOs: renew them after it


def renew_bios(conn: Any) -> bool:
    """Give a TLS connection two new, empty memory BIOs. A memory BIO never shrinks: the pair pyOpenSSL made
    keeps the largest chunk that ever passed (the handshake's certificate flight; a 64 KB read) allocated for
    the connection's life: about 3 KB a connection after a handshake, 5.7 KB for the two of an intercepted
    one (bench/bench_idle.py). Only when both are empty (nothing received and not yet read, nothing to send),
    so no byte is lost; SSL_set_bio frees the old pair. False when nothing changed."""
    if _openssl_lib is None or getattr(conn, "_into_ssl", None) is None:
        return False
    if _pending(conn._into_ssl) or _pending(conn._from_ssl):
        return False
    into, out = _openssl_lib.BIO_new(_openssl_lib.BIO_s_mem()), _openssl_lib.BIO_new(_openssl_lib.BIO_s_mem())
    if into == _ffi.NULL or out == _ffi.NULL:
        for bio in (into, out):
            if bio != _ffi.NULL:
                _openssl_lib.BIO_free(bio)
        return False
    _openssl_lib.SSL_set_bio(conn._ssl, into, out)
    conn._into_ssl, conn._from_ssl = into, out     # pyOpenSSL reads and writes through these (SSL_free frees them)
    return True


def trim_tls_buffers(context: Any) -> bool:
    """Renew the memory BIOs of every TLS layer of a connection (SessionLayer calls it between events, when
    mitmproxy's TLS layers have read all they were given and sent all they wrote). True when all were renewed."""
    done = True
    for found in context.layers:
        conn = getattr(found, "tls", None)
        if isinstance(conn, SSL.Connection):
            try:
                done = renew_bios(conn) and done
            except Exception:       # only memory is at stake: the connection keeps its BIOs
                logger.debug("memory BIOs not renewed", exc_info=True)
                return True
    return done


def _pending(bio) -> int:
    return _openssl_lib.BIO_get_mem_data(bio, _ffi.new("char **"))


try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _openssl_lib
    _SSL_MODE_RELEASE_BUFFERS = _openssl_lib.SSL_MODE_RELEASE_BUFFERS
except (ImportError, AttributeError):
    _ffi, _openssl_lib, _SSL_MODE_RELEASE_BUFFERS = None, None, None


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
        from imguard.gateway.layer import SessionLayer     # here: layer.py imports this module
        if any(isinstance(layer, SessionLayer) for layer in data.context.layers):
            data.establish_server_tls_first = True

    def tls_start_client(self, data: tls.TlsData) -> None:
        _release_idle_buffers(data)
        try:
            self.certificates.install(data)
        except Exception:           # only memory is at stake: the connection keeps TlsConfig's own copies
            logger.debug("certificate objects not shared", exc_info=True)

    def tls_established_client(self, data: tls.TlsData) -> None:
        """A session's client leg is up, so its forged certificate is made: the server's certificates, parsed
        by mitmproxy for that (about 5 KB each: Rust and Python objects), are not read again; drop them.
        Sessions only (an HTTP flow shows its server's certificates)."""
        from imguard.gateway.layer import SessionLayer     # here: layer.py imports this module
        server = data.context.server
        if server.certificate_list and any(isinstance(layer, SessionLayer) for layer in data.context.layers):
            server.certificate_list = []

    def tls_start_server(self, data: tls.TlsData) -> None:
        _release_idle_buffers(data)
        if not self.no_verify or data.ssl_conn is None:
            return
        server = data.conn
        names = {str(n).lower().rstrip(".") for n in (server.sni, server.address[0] if server.address else None) if n}
        if names & self.no_verify:
            data.ssl_conn.set_verify(SSL.VERIFY_NONE, None)
            logger.info("upstream certificate of %s not verified (no_verify_upstream)", "/".join(sorted(names)))
