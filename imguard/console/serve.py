"""HTTPS for the console: a certificate the admin gives (--cert/--key), else one issued for the listen host by
imguard's own CA (DATA_DIR/ca, the one the gateway's users already trust), kept in DATA_DIR/console/tls (0600)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


class TlsError(RuntimeError):
    """No certificate can be had; the message says what to do."""


def issue_certificate(data_dir: Path, hosts: list[str], folder: Path) -> tuple[Path, Path]:
    """A server certificate for `hosts` from imguard's CA in DATA_DIR/ca; returns (certificate chain, key)."""
    from mitmproxy import certs
    from mitmproxy.options import CONF_BASENAME

    from imguard.gateway.ca import ca_dir

    directory = ca_dir(data_dir)
    if not (directory / f"{CONF_BASENAME}-ca.pem").exists():
        raise TlsError(f"no imguard CA in {directory} (run the gateway once, or `imguard ca --data-dir`), "
                       "or give the console a certificate with --console-cert and --console-key")
    store = certs.CertStore.from_store(directory, CONF_BASENAME, 2048)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    entry = store.get_cert(hosts[0], sans, organization="imguard console")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = folder / "console-cert.pem", folder / "console-key.pem"
    key_pem = entry.privatekey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
    _write_private(key_path, key_pem)
    _write_private(cert_path, entry.cert.to_pem() + store.default_ca.to_pem())
    return cert_path, key_path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
