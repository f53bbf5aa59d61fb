"""`imguard content-scanner`: the Matrix content scanner API (MSC1453), served with imguard's inspection and policy.

Matrix clients configured for a content scanner (Element's `content_scanner` setting, and the clients of the
reference matrix-content-scanner-python) ask it before they show a file: for a file in clear by its MXC URI, for
an end-to-end encrypted attachment with the attachment's key (the `EncryptedFile` of the event), optionally
encrypted to the scanner's public key so that no proxy between them reads it. The gateway at the network edge
sees only the ciphertext of such a file; this is where the company's inspection sees into it, with the client's
consent. Every route lives under `/_matrix/media_proxy/unstable/`:

    GET  download/{server}/{media}    the file, if policy lets it through; else 403 MCS_MEDIA_NOT_CLEAN
    GET  scan/{server}/{media}        {"clean": bool, "info": str}
    POST download_encrypted           {"file": EncryptedFile} or {"encrypted_body": {ciphertext, mac, ephemeral}}:
                                      the encrypted file as the homeserver holds it, if its plaintext is let through
    POST scan_encrypted               the same body; {"clean": bool, "info": str}
    GET  public_key                   {"public_key": base64}: the Curve25519 key of `encrypted_body`

What happens to one request, in order (`ContentScanner.check`):
1. the body is read: `encrypted_body` is opened with the scanner's key (libolm's PkDecryption scheme, through
   vodozemac; failing: 403 MCS_BAD_DECRYPTION, and the client fetches the key again), `file` is checked
   (`parse_encrypted_file`: v2, A256CTR, 32-byte key, 16-byte iv, a SHA-256);
2. the media is fetched from the homeserver the settings name (`content_scanner_homeserver`): with the client's
   `Authorization` header, from the authenticated media API (`/_matrix/client/v1/media/download`), else from
   `/_matrix/media/v3/download`; the homeserver's 404 is the client's M_NOT_FOUND, any other failure
   502 MCS_MEDIA_REQUEST_FAILED. Larger than `content_scanner_max_bytes`: not read on, decided as unscannable;
3. an encrypted file is checked against its SHA-256 and decrypted (AES-256-CTR, `decrypt_attachment`); a
   mismatch is 400 MCS_MEDIA_FAILED_TO_DECRYPT;
4. the plaintext goes through the gateway's Pipeline.check_file (the same Inspector and policy, the same
   `imguard.file` event, the quarantine for a blocked file), in a worker thread, with a chat context of its own:
   protocol `matrix`, transfer mechanism `content-scanner`, inbound (a user of ours is about to open it), the
   requesting user (the homeserver's whoami for the token) as its recipient, the MXC URI as its conversation;
5. clean is what policy lets through (allow, or an alert); block and quarantine are not clean.

Errors are JSON `{"reason": CODE, "info": text}` with the codes and statuses of the reference implementation.
The scanner keeps no media and no result cache: the inspector's own verdict cache (by SHA-256 and rule versions)
spares a second scan of the same bytes, and every request is an event.

Why a command of its own rather than a listener of `imguard run`: it is an HTTP service beside the chat, not traffic
through the proxy; as a separate process (like the console) it has its own event loop and memory, can run on
another host next to the homeserver, and a gateway that does not serve Matrix clients carries none of it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imguard import settings
from imguard.model import FROM_SERVER, INBOUND, REASON_TOO_LARGE, ChatContext, Decision, FileReport
from imguard.settings import MiB, setting

logger = logging.getLogger("imguard.content_scanner")

PREFIX = "/_matrix/media_proxy/unstable"
MECHANISM = "content-scanner"
EXIT_OK, EXIT_USAGE = 0, 2

# A Matrix server name (host, IPv4, [IPv6], optional port) and a media id (the spec's [A-Za-z0-9_-]).
SERVER_NAME = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
MEDIA_ID = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclasses.dataclass(frozen=True)
class ContentScannerSettings:
    """Matrix content scanner"""

    content_scanner_host: str = setting("127.0.0.1", "Address `imguard content-scanner` listens on.")
    content_scanner_port: int = setting(8449, "Port of the content scanner API.")
    content_scanner_homeserver: str = setting("", "Base URL of the homeserver the media is fetched from "
                                                  "(e.g. https://matrix.example.com); required.")
    content_scanner_tls: bool = setting(True, "Serve HTTPS (a certificate from imguard's CA in DATA_DIR/ca, or "
                                              "--content-scanner-cert); off only behind a reverse proxy that "
                                              "terminates TLS on the same host (keys of attachments cross it).")
    content_scanner_cert: str = setting("", "PEM certificate (chain) of the scanner's HTTPS; '' issues one from "
                                            "imguard's CA for --content-scanner-host.")
    content_scanner_key: str = setting("", "PEM private key of --content-scanner-cert.")
    content_scanner_max_bytes: int = setting(100 * MiB, "Largest media the scanner fetches and inspects; a larger "
                                                        "file is decided as unscannable (too large), never clean.")
    content_scanner_fetch_timeout: float = setting(30.0, "Seconds one request to the homeserver may take; then the "
                                                         "client gets 502 MCS_MEDIA_REQUEST_FAILED.")
    content_scanner_workers: int = setting(4, "Requests fetched and inspected at once; more wait their turn (so "
                                              "a burst holds at most this many files in memory).")


class ScannerError(Exception):
    """An answer other than the scan's: the reference implementation's error code, HTTP status and info."""

    def __init__(self, status: int, reason: str, info: str):
        super().__init__(info)
        self.status, self.reason, self.info = status, reason, info

    def body(self) -> dict[str, str]:
        return {"reason": self.reason, "info": self.info}


def malformed(info: str) -> ScannerError:
    return ScannerError(400, "MCS_MALFORMED_JSON", info)


def not_found(info: str = "media not found") -> ScannerError:
    return ScannerError(404, "M_NOT_FOUND", info)


# --- encrypted attachments (the Matrix spec's EncryptedFile): pure -------------------------------------------

@dataclass(frozen=True)
class EncryptedFile:
    """The part of an `EncryptedFile` the scanner needs: where the ciphertext is, its key, iv and SHA-256."""
    server: str
    media_id: str
    key: bytes          # 32 bytes, AES-256
    iv: bytes           # 16 bytes, the CTR counter block
    sha256: bytes       # of the ciphertext

    @property
    def mxc(self) -> str:
        return f"mxc://{self.server}/{self.media_id}"


def unpadded_b64decode(text: Any, urlsafe: bool = False) -> bytes:
    """Matrix's unpadded base64 (and JWK's base64url); padded input is accepted too. ValueError when it is not."""
    if not isinstance(text, str):
        raise ValueError("not a string")
    text = text.strip().rstrip("=")
    text += "=" * (-len(text) % 4)
    try:
        return (base64.urlsafe_b64decode if urlsafe else base64.b64decode)(text.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError(str(e)) from None


def split_mxc(url: Any) -> tuple[str, str]:
    """(server, media id) of an `mxc://server/media` URI; ScannerError (malformed) otherwise."""
    if not isinstance(url, str) or not url.startswith("mxc://"):
        raise malformed("file.url is not an mxc:// URI")
    server, _, media = url[len("mxc://"):].partition("/")
    if not SERVER_NAME.match(server) or not MEDIA_ID.match(media):
        raise malformed("file.url is not an mxc://server/media URI")
    return server, media


def parse_encrypted_file(body: Any) -> EncryptedFile:
    """The request's `file` (the spec's EncryptedFile, v2, JWK key A256CTR), checked; ScannerError when it is not
    one the scanner can decrypt."""
    if not isinstance(body, dict) or not isinstance(body.get("file"), dict):
        raise malformed("the body has no 'file' object")
    f = body["file"]
    server, media = split_mxc(f.get("url"))
    key = f.get("key")
    if f.get("v") not in ("v2", None) or not isinstance(key, dict):
        raise malformed("file.v must be 'v2' with a 'key' object")
    if key.get("alg") != "A256CTR" or key.get("kty") != "oct":
        raise malformed("file.key must be an A256CTR 'oct' JWK")
    hashes = f.get("hashes")
    try:
        raw_key = unpadded_b64decode(key.get("k"), urlsafe=True)
        iv = unpadded_b64decode(f.get("iv"))
        digest = unpadded_b64decode(hashes.get("sha256") if isinstance(hashes, dict) else None)
    except ValueError as e:
        raise malformed(f"file: bad base64 ({e})") from None
    if len(raw_key) != 32 or len(iv) != 16 or len(digest) != 32:
        raise malformed("file: the key must be 32 bytes, the iv 16, the sha256 32")
    return EncryptedFile(server, media, raw_key, iv, digest)


def decrypt_attachment(ciphertext: bytes, f: EncryptedFile) -> bytes:
    """The plaintext of an encrypted attachment: its SHA-256 checked first, then AES-256-CTR (the spec's
    encrypted attachments). A mismatch is 400 MCS_MEDIA_FAILED_TO_DECRYPT: the media is not the one the key
    was made for."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if hashlib.sha256(ciphertext).digest() != f.sha256:
        raise ScannerError(400, "MCS_MEDIA_FAILED_TO_DECRYPT", "the media does not match the file's sha256")
    # The counter is the iv's low 64 bits and wraps within them (WebCrypto's `length: 64`, as Element encrypts);
    # the high 64 bits are a nonce that never changes. cryptography's CTR counts over all 128 bits, so the part
    # after a wrap is decrypted again from the nonce with a zero counter.
    nonce, counter = f.iv[:8], int.from_bytes(f.iv[8:], "big")
    split = ((1 << 64) - counter) * 16
    out = b""
    for iv, part in ((f.iv, ciphertext[:split]), (nonce + bytes(8), ciphertext[split:])):
        if part:
            decryptor = Cipher(algorithms.AES(f.key), modes.CTR(iv)).decryptor()
            out += decryptor.update(part) + decryptor.finalize()
    return out


# --- the scanner's key pair (encrypted_body) ----------------------------------------------------------------

class ScannerKey:
    """The scanner's Curve25519 key pair for `encrypted_body` (libolm's PkEncryption scheme, vodozemac's
    PkDecryption), kept in DATA_DIR/content-scanner/pk.key (0600, in a 0700 folder) so that clients that cached
    the public key keep working after a restart."""

    def __init__(self, path: Path):
        import vodozemac

        self._vodozemac = vodozemac
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            self._pk = vodozemac.PkDecryption.from_key(vodozemac.Curve25519SecretKey.from_bytes(path.read_bytes()))
        else:
            self._pk = vodozemac.PkDecryption()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(self._pk.key.to_bytes())

    @property
    def public_key(self) -> str:
        return self._pk.public_key.to_base64()

    def open(self, encrypted_body: Any) -> dict:
        """The request body that `encrypted_body` carries; 403 MCS_BAD_DECRYPTION when it cannot be opened (the
        client should fetch the public key again and retry once), 400 when it opens to something not JSON."""
        if not isinstance(encrypted_body, dict) or not all(
                isinstance(encrypted_body.get(k), str) for k in ("ciphertext", "mac", "ephemeral")):
            raise malformed("encrypted_body needs 'ciphertext', 'mac' and 'ephemeral'")
        try:
            message = self._vodozemac.Message.from_base64(encrypted_body["ciphertext"], encrypted_body["mac"],
                                                          encrypted_body["ephemeral"])
            plaintext = self._pk.decrypt(message)
        except Exception as e:      # vodozemac's decode, key-size and MAC exceptions have no common base
            raise ScannerError(403, "MCS_BAD_DECRYPTION", f"encrypted_body could not be decrypted ({type(e).__name__})"
                               ) from None
        try:
            body = json.loads(plaintext)
        except ValueError:
            raise malformed("encrypted_body does not hold JSON") from None
        if not isinstance(body, dict):
            raise malformed("encrypted_body does not hold a JSON object")
        return body


# --- the homeserver -----------------------------------------------------------------------------------------

@dataclass
class Media:
    content: bytes
    content_type: str
    too_large: int = 0          # the size announced or read when it passed content_scanner_max_bytes


class Homeserver:
    """Fetches media and the requesting user's identity from the homeserver (blocking: run in a thread)."""

    def __init__(self, base_url: str, max_bytes: int, timeout: float):
        self.base = base_url.rstrip("/")
        self.max_bytes, self.timeout = max_bytes, timeout

    def _open(self, path: str, authorization: str):
        request = urllib.request.Request(self.base + path, headers={"Authorization": authorization}
                                         if authorization else {})
        return urllib.request.urlopen(request, timeout=self.timeout)

    def download(self, server: str, media_id: str, authorization: str) -> Media:
        quoted = f"{urllib.parse.quote(server, safe='')}/{urllib.parse.quote(media_id, safe='')}"
        path = (f"/_matrix/client/v1/media/download/{quoted}" if authorization
                else f"/_matrix/media/v3/download/{quoted}")
        try:
            with self._open(path, authorization) as response:
                announced = int(response.headers.get("Content-Length") or 0)
                kind = response.headers.get("Content-Type") or "application/octet-stream"
                if announced > self.max_bytes:
                    return Media(b"", kind, too_large=announced)
                content = response.read(self.max_bytes + 1)
                if len(content) > self.max_bytes:
                    return Media(b"", kind, too_large=len(content))
                return Media(content, kind)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise not_found("the homeserver has no such media") from None
            raise ScannerError(502, "MCS_MEDIA_REQUEST_FAILED", f"the homeserver answered {e.code}") from None
        except (OSError, ValueError) as e:
            raise ScannerError(502, "MCS_MEDIA_REQUEST_FAILED", f"the homeserver could not be reached ({e})"
                               ) from None

    def whoami(self, authorization: str) -> str:
        """The user the access token belongs to, or '' (no token, or the homeserver does not say)."""
        if not authorization:
            return ""
        try:
            with self._open("/_matrix/client/v3/account/whoami", authorization) as response:
                return str(json.loads(response.read(65536)).get("user_id", ""))
        except (OSError, ValueError, AttributeError):
            return ""


# --- the scanner --------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    decision: Decision
    report: FileReport
    media: Media

    @property
    def clean(self) -> bool:
        return not self.decision.blocked

    @property
    def info(self) -> str:
        if self.clean:
            return "File is clean"
        from imguard.protocols.base import block_words
        action, why = block_words(self.decision)
        return f"File is not clean: {action} by imguard ({why})"


class ContentScanner:
    """The routes' common part: fetch, decrypt, inspect and decide (see the module docstring)."""

    def __init__(self, pipeline: Any, homeserver: Homeserver, key: ScannerKey, workers: int = 4):
        self.pipeline, self.homeserver, self.key = pipeline, homeserver, key
        self.workers = max(1, workers)
        self._turns: asyncio.Semaphore | None = None    # made on the server's event loop

    async def check(self, server: str, media_id: str, authorization: str, encrypted: EncryptedFile | None = None,
                    client_address: str = "") -> Verdict:
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.workers)
        async with self._turns:
            return await self._check(server, media_id, authorization, encrypted, client_address)

    async def _check(self, server: str, media_id: str, authorization: str, encrypted: EncryptedFile | None,
                     client_address: str) -> Verdict:
        if not SERVER_NAME.match(server) or not MEDIA_ID.match(media_id):
            raise not_found("not an mxc://server/media id")
        media, user = await asyncio.gather(
            asyncio.to_thread(self.homeserver.download, server, media_id, authorization),
            asyncio.to_thread(self.homeserver.whoami, authorization))
        ctx = ChatContext(protocol="matrix", direction=INBOUND, recipients=(user,) if user else (),
                          conversation=f"mxc://{server}/{media_id}", client_address=client_address,
                          server_address=urllib.parse.urlsplit(self.homeserver.base).netloc,
                          transfer_mechanism=MECHANISM, origin=FROM_SERVER)
        name = media_id
        if media.too_large:
            report, decision = await asyncio.to_thread(
                self.pipeline.check_unscannable, b"", ctx, name, media.content_type, REASON_TOO_LARGE,
                f"the media ({media.too_large} bytes) is larger than content_scanner_max_bytes "
                f"({self.homeserver.max_bytes})", size=media.too_large)
            return Verdict(decision, report, media)
        data, mime = media.content, media.content_type
        if encrypted is not None:
            data, mime = decrypt_attachment(data, encrypted), ""     # the homeserver's type is the ciphertext's
        report, decision = await asyncio.to_thread(self.pipeline.check_file, data, ctx, name, mime)
        return Verdict(decision, report, media)

    def encrypted_request(self, body: Any) -> EncryptedFile:
        """The EncryptedFile of a download_encrypted / scan_encrypted body (opened first if it is encrypted)."""
        if not isinstance(body, dict):
            raise malformed("the body is not a JSON object")
        if "encrypted_body" in body:
            body = self.key.open(body["encrypted_body"])
        return parse_encrypted_file(body)


def build_app(scanner: ContentScanner):
    """The Starlette application of the API."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def error(e: ScannerError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def peer(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else ""

    async def answer(request: Request, download: bool, encrypted: bool) -> Response:
        try:
            if encrypted:
                try:
                    body = json.loads(await request.body())
                except ValueError:
                    raise malformed("the body is not JSON") from None
                f = scanner.encrypted_request(body)
                server, media_id = f.server, f.media_id
            else:
                f, server, media_id = None, request.path_params["server"], request.path_params["media"]
            verdict = await scanner.check(server, media_id, request.headers.get("authorization", ""), f,
                                          peer(request))
        except ScannerError as e:
            return error(e)
        except Exception:
            logger.exception("content scanner: request failed")
            return error(ScannerError(500, "M_UNKNOWN", "the scanner failed"))
        if not download:
            return JSONResponse({"clean": verdict.clean, "info": verdict.info})
        if not verdict.clean:
            return error(ScannerError(403, "MCS_MEDIA_NOT_CLEAN", verdict.info))
        return Response(verdict.media.content, media_type=verdict.media.content_type)

    async def download(request: Request) -> Response:
        return await answer(request, download=True, encrypted=False)

    async def scan(request: Request) -> Response:
        return await answer(request, download=False, encrypted=False)

    async def download_encrypted(request: Request) -> Response:
        return await answer(request, download=True, encrypted=True)

    async def scan_encrypted(request: Request) -> Response:
        return await answer(request, download=False, encrypted=True)

    async def public_key(request: Request) -> Response:
        return JSONResponse({"public_key": scanner.key.public_key})

    async def unknown(request: Request) -> Response:
        return error(not_found("no such route"))

    routes = [
        Route(PREFIX + "/download/{server}/{media}", download, methods=["GET"]),
        Route(PREFIX + "/scan/{server}/{media}", scan, methods=["GET"]),
        Route(PREFIX + "/download_encrypted", download_encrypted, methods=["POST"]),
        Route(PREFIX + "/scan_encrypted", scan_encrypted, methods=["POST"]),
        Route(PREFIX + "/public_key", public_key, methods=["GET"]),
        Route("/{rest:path}", unknown, methods=["GET", "POST"]),
    ]
    return Starlette(routes=routes)


# --- the command ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from imguard.inspect import InspectLimits
    from imguard.inspect.signatures import SignatureSettings
    from imguard.quarantine import QuarantineSettings
    from imguard.runtime import add_config_arguments

    add_config_arguments(parser, "the scanner's key, alerts, quarantine, signature cache, CA (the gateway's)")
    settings.add_arguments(parser, ContentScannerSettings)
    settings.add_arguments(parser, InspectLimits, "inspection limits")
    settings.add_arguments(parser, SignatureSettings)
    settings.add_arguments(parser, QuarantineSettings)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from imguard.inspect import InspectLimits
    from imguard.inspect.signatures import SignatureSettings
    from imguard.quarantine import QuarantineSettings
    from imguard.runtime import ConfigError, build_pipeline, default_data_dir

    chosen = settings.from_arguments(ContentScannerSettings, args)
    data_dir = Path(args.data_dir or default_data_dir())
    if not chosen.content_scanner_homeserver.startswith(("http://", "https://")):
        print("imguard: --content-scanner-homeserver must name the homeserver's URL (http:// or https://)",
              file=sys.stderr)
        return EXIT_USAGE
    if bool(chosen.content_scanner_cert) != bool(chosen.content_scanner_key):
        print("imguard: --content-scanner-cert and --content-scanner-key go together", file=sys.stderr)
        return EXIT_USAGE
    try:
        pipeline = build_pipeline(args.rules, args.signatures, data_dir,
                                  limits=settings.from_arguments(InspectLimits, args),
                                  quarantine_settings=settings.from_arguments(QuarantineSettings, args),
                                  signature_settings=settings.from_arguments(SignatureSettings, args))
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return EXIT_USAGE
    tls: dict[str, str] = {}
    if chosen.content_scanner_tls:
        if chosen.content_scanner_cert:
            tls = {"ssl_certfile": chosen.content_scanner_cert, "ssl_keyfile": chosen.content_scanner_key}
        else:
            from imguard.console.serve import TlsError, issue_certificate
            try:
                cert, key = issue_certificate(data_dir, [chosen.content_scanner_host, "localhost"],
                                              data_dir / "content-scanner" / "tls")
            except TlsError as e:
                print(f"imguard: {e}", file=sys.stderr)
                return EXIT_USAGE
            tls = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    scanner = ContentScanner(pipeline, Homeserver(chosen.content_scanner_homeserver,
                                                  chosen.content_scanner_max_bytes,
                                                  chosen.content_scanner_fetch_timeout),
                             ScannerKey(data_dir / "content-scanner" / "pk.key"), chosen.content_scanner_workers)
    host = chosen.content_scanner_host
    shown = f"[{host}]" if ":" in host else host
    print(f"imguard content scanner on {'https' if tls else 'http'}://{shown}:{chosen.content_scanner_port}"
          f"{PREFIX}/ for {chosen.content_scanner_homeserver}; public key {scanner.key.public_key}", flush=True)
    try:
        uvicorn.run(build_app(scanner), host=host, port=chosen.content_scanner_port, log_level="warning", **tls)
    finally:
        pipeline.close()
    return EXIT_OK
