"""imguard's interception CA: generated once in data_dir/ca (mitmproxy's confdir), named for imguard."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import certs
from mitmproxy.options import CONF_BASENAME

CA_ORGANIZATION = "imguard"
CA_COMMON_NAME = "imguard inspection CA"


def ca_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "ca"


def ensure_ca(directory: Path, key_size: int = 2048) -> Path:
    """Create the CA in `directory` unless it exists; return the path of the public certificate (PEM).
    mitmproxy finds it there by its file names (confdir), so it never generates its own 'mitmproxy' CA."""
    directory = Path(directory)
    if not (directory / f"{CONF_BASENAME}-ca.pem").exists():
        certs.CertStore.create_store(directory, CONF_BASENAME, key_size, organization=CA_ORGANIZATION,
                                     cn=CA_COMMON_NAME)
    return directory / f"{CONF_BASENAME}-ca-cert.pem"


def ca_certificate(directory: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ensure_ca(directory).read_bytes())


def export(directory: Path, path: Path) -> Path:
    """Write the CA certificate to `path`: DER for .der/.cer, PEM otherwise (.pem, .crt)."""
    cert = ca_certificate(directory)
    path = Path(path)
    encoding = serialization.Encoding.DER if path.suffix.lower() in (".der", ".cer") else serialization.Encoding.PEM
    path.write_bytes(cert.public_bytes(encoding))
    return path
