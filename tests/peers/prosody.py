"""A real Prosody for the end-to-end tests, started and stopped by the test run itself.

    with Prosody.start(workdir) as server:       # fresh dir, certificates, config, accounts, process
        server.c2s_port, server.tls_port, server.http_port, server.proxy65_port, server.ca_file
        server.password("alice")

Every port is free at the time it is chosen; the process runs in its own session (setsid) in
the foreground and is killed, with its whole process group, when the block ends, even after a
failure. Its logs stay in the working directory and `server.logs()` returns their tails for a
failure report.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).parent
DOMAIN = "localhost"
UPLOAD_DOMAIN = "upload.localhost"
PROXY_DOMAIN = "proxy.localhost"
# Accounts every server gets: name -> password.
ACCOUNTS = {name: f"{name}-pw" for name in ("alice", "bob", "carol", "dave", "eve", "bench1", "bench2")}


class PeerError(RuntimeError):
    """A test peer could not be set up or stopped; the message says which and why."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that were free a moment ago (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None,
                  host: str = "127.0.0.1", what: str = "") -> None:
    """Return once something accepts TCP connections on host:port; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise PeerError(f"{what or 'process'} exited with status {process.returncode} "
                            f"before it listened on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise PeerError(f"{what or 'process'} did not listen on {host}:{port} within {timeout:.0f} s") from e
            time.sleep(0.05)


def stop_process(process: subprocess.Popen, grace: float = 5.0) -> int:
    """SIGTERM the process group of a setsid-started process, then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(grace)
    return process.returncode


@dataclass(frozen=True)
class Certificates:
    ca_file: Path       # the test CA (PEM): what a client or the gateway trusts to verify Prosody
    cert_file: Path     # Prosody's leaf certificate, signed by the CA
    key_file: Path


def make_certificates(directory: Path, names: tuple[str, ...] = (DOMAIN, UPLOAD_DOMAIN, PROXY_DOMAIN),
                      ips: tuple[str, ...] = ("127.0.0.1",)) -> Certificates:
    """A throwaway CA and a server certificate it signs, valid for `names` and `ips` (RFC 5280
    compliant enough for Python 3.13's strict verification)."""
    import ipaddress

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imguard test peers CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    certs = Certificates(directory / "ca.crt", directory / "localhost.crt", directory / "localhost.key")
    certs.ca_file.write_bytes(ca_cert.public_bytes(pem))
    certs.cert_file.write_bytes(cert.public_bytes(pem))
    certs.key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                 serialization.NoEncryption()))
    certs.key_file.chmod(0o644)     # Prosody may drop privileges before it reads the key
    return certs


@dataclass
class Prosody:
    """One running Prosody. Build it with Prosody.start(); stop() is idempotent."""

    directory: Path
    c2s_port: int
    tls_port: int
    http_port: int
    proxy65_port: int
    certs: Certificates
    process: subprocess.Popen | None = None
    accounts: dict[str, str] = field(default_factory=lambda: dict(ACCOUNTS))
    host: str = "127.0.0.1"
    domain: str = DOMAIN
    upload_domain: str = UPLOAD_DOMAIN
    proxy_domain: str = PROXY_DOMAIN

    @property
    def ca_file(self) -> Path:
        return self.certs.ca_file

    @property
    def config_file(self) -> Path:
        return self.directory / "prosody.cfg.lua"

    def jid(self, user: str) -> str:
        return f"{user}@{self.domain}"

    def password(self, user: str) -> str:
        return self.accounts[user]

    @classmethod
    def start(cls, directory: Path, timeout: float = 20.0, http_external_url: str | None = None,
              log_level: str = "debug") -> "Prosody":
        """Set up `directory` (created, must be empty or absent) and start Prosody in it. Tests keep
        the debug log (every stanza, for failure reports); a benchmark wants "warn"."""
        for tool in ("prosody", "prosodyctl"):
            if shutil.which(tool) is None:
                raise PeerError(f"`{tool}` is not installed: run `tools/setup.sh test` (installs Debian's prosody)")
        directory = Path(directory)
        (directory / "data").mkdir(parents=True, exist_ok=True)
        certs = make_certificates(directory / "certs")
        c2s, tls, http, proxy65 = free_ports(4)
        server = cls(directory, c2s, tls, http, proxy65, certs)
        template = string.Template((HERE / "prosody.cfg.lua.in").read_text())
        server.config_file.write_text(template.substitute(
            run_as_root="true" if os.geteuid() == 0 else "false", dir=str(directory), log_level=log_level,
            c2s_port=c2s, tls_port=tls, http_port=http, proxy65_port=proxy65,
            http_external_url=http_external_url or f"http://127.0.0.1:{http}/"))
        for user, password in list(server.accounts.items()):
            server.add_account(user, password)
        out = open(directory / "stdout.log", "wb")
        server.process = subprocess.Popen(["prosody", "--config", str(server.config_file), "-F"],
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=directory)
        out.close()
        try:
            for port in (c2s, tls, http, proxy65):
                wait_for_port(port, timeout, server.process, what="prosody")
        except BaseException as e:
            server.stop()
            raise PeerError(f"prosody did not start:\n{server.logs()}") from e
        return server

    def add_account(self, user: str, password: str | None = None) -> str:
        """Register `user` (also while the server runs); return its password."""
        password = password or f"{user}-pw"
        result = subprocess.run(["prosodyctl", "--config", str(self.config_file), "register",
                                 user, self.domain, password], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise PeerError(f"prosodyctl register {user} failed ({result.returncode}):\n"
                            f"{result.stdout}\n{result.stderr}")
        self.accounts[user] = password
        return password

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return stop_process(self.process)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self, lines: int = 60) -> str:
        parts = []
        for name in ("stdout.log", "prosody.err", "prosody.log"):
            path = self.directory / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def __enter__(self) -> "Prosody":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
