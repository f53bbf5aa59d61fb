"""The Matrix content scanner API (`imguard content-scanner`, imguard/matrix_scanner.py) with real parts only:
a real Synapse (tests/peers/synapse.py), matrix-nio clients that upload a file in clear and an end-to-end
encrypted attachment (nio's `upload(..., encrypt=True)` encrypts it and gives the decryption dict, as Element
does), the real `imguard content-scanner` process over HTTPS with a certificate from imguard's CA, and the
client's side of `encrypted_body` done with vodozemac's PkEncryption (libolm's scheme) against `/public_key`.

What is checked against an independent source: Synapse's media store holds only the ciphertext of the encrypted
EICAR (so only the key the client gave lets imguard see it); a clean encrypted download is what Synapse stored,
byte for byte, and nio's own decrypt_attachment opens it; the attachment decryption itself is held against the
published test vectors of matrix-org/browser-encrypt-attachment (test/decrypt.Spec.js, Apache-2.0), the 64-bit
counter wrap included. Each scan is an `imguard.file` event (mechanism content-scanner, the requesting user as
recipient), and the blocked file is in the quarantine.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nio          # matrix-nio: in the test extras of setup.cfg
import pytest
import vodozemac

from imguard.matrix_scanner import (PREFIX, EncryptedFile, ScannerError, ScannerKey, decrypt_attachment,
                                    parse_encrypted_file, unpadded_b64decode)
from tests.peers.gateway import PYTHON
from tests.peers.prosody import free_ports, stop_process, wait_for_port
from tests.peers.synapse import Synapse

pytestmark = pytest.mark.timeout(240)

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
CLEAN = b"minutes of the planning meeting\n" * 200 + bytes(range(256)) * 3

# matrix-org/browser-encrypt-attachment, test/decrypt.Spec.js (Apache-2.0): (ciphertext, k, iv, sha256, plaintext),
# base64 as published. The last one starts its counter at 2^64 - 1: it wraps within the low 64 bits.
VECTORS = [
    ("", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAAAA",
     "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU", ""),
    ("5xJZTt5cQicm+9f4", "__________________________________________8", "//////////8AAAAAAAAAAA",
     "YzF08lARDdOCzJpzuSwsjTNlQc4pHxpdHcXiD/wpK6k", "SGVsbG8sIFdvcmxk"),
    ("zhtFStAeFx0s+9L/sSQO+WQMtldqYEHqTxMduJrCIpnkyer09kxJJuA4K+adQE4w+7jZe/vR9kIcqj9rOhDR8Q",
     "__________________________________________8", "//////////8AAAAAAAAAAA",
     "IOq7/dHHB+mfHfxlRY5XMeCWEwTPmlf4cJcgrkf6fVU",
     "YWxwaGFudW1lcmljYWxseWFscGhhbnVtZXJpY2FsbHlhbHBoYW51bWVyaWNhbGx5YWxwaGFudW1lcmljYWxseQ"),
    ("tJVNBVJ/vl36UQt4Y5e5m84bRUrQHhcdLPvS/7EkDvlkDLZXamBB6k8THbiawiKZ5Mnq9PZMSSbgOCvmnUBOMA",
     "__________________________________________8", "/////////////////////w",
     "LYG/orOViuFwovJpv2YMLSsmVKwLt7pY3f8SYM7KU5E",
     "YWxwaGFudW1lcmljYWxseWFscGhhbnVtZXJpY2FsbHlhbHBoYW51bWVyaWNhbGx5YWxwaGFudW1lcmljYWxseQ"),
]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{len(v[0])}b64")
def test_attachment_decryption_matches_the_published_vectors(vector):
    """AES-256-CTR with the spec's 64-bit counter, the SHA-256 of the ciphertext checked first."""
    ciphertext, k, iv, sha256, plaintext = vector
    f = EncryptedFile("example.org", "m", unpadded_b64decode(k, urlsafe=True), unpadded_b64decode(iv),
                      unpadded_b64decode(sha256))
    assert decrypt_attachment(unpadded_b64decode(ciphertext), f) == unpadded_b64decode(plaintext)
    with pytest.raises(ScannerError) as e:
        decrypt_attachment(unpadded_b64decode(ciphertext) + b"x", f)
    assert (e.value.status, e.value.reason) == (400, "MCS_MEDIA_FAILED_TO_DECRYPT")


@pytest.mark.parametrize("bad", [None, [], {"file": "x"}, {"file": {"url": "https://x/y"}},
                                 {"file": {"url": "mxc://a/b", "v": "v2", "key": {"alg": "A128CTR", "kty": "oct"}}},
                                 {"file": {"url": "mxc://a/../b", "v": "v2", "key": {}}},
                                 {"file": {"url": "mxc://a/b", "v": "v2", "iv": "!!", "hashes": {"sha256": 1},
                                           "key": {"alg": "A256CTR", "kty": "oct", "k": "AAAA"}}}])
def test_a_file_object_it_cannot_use_is_malformed_not_a_crash(bad):
    with pytest.raises(ScannerError) as e:
        parse_encrypted_file(bad)
    assert (e.value.status, e.value.reason) == (400, "MCS_MALFORMED_JSON")


def test_the_key_pair_survives_a_restart_and_is_private(tmp_path):
    """Clients cache the public key: a restarted scanner keeps it; the secret is 0600 in a 0700 folder."""
    path = tmp_path / "content-scanner" / "pk.key"
    first = ScannerKey(path)
    assert ScannerKey(path).public_key == first.public_key
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    with pytest.raises(ScannerError) as e:
        first.open({"ciphertext": "AAAA", "mac": "AAAAAAAAAAA", "ephemeral": "AAAA"})
    assert (e.value.status, e.value.reason) == (403, "MCS_BAD_DECRYPTION")


# --- against a real Synapse and a real `imguard content-scanner` -------------------------------------------

class ContentScanner:
    """`imguard content-scanner` in its own process, on a data folder with imguard's CA."""

    def __init__(self, directory: Path, homeserver: str):
        self.directory = directory
        self.data_dir = directory / "data"
        subprocess.run([str(PYTHON), "-m", "imguard", "ca", "--data-dir", str(self.data_dir), "--export",
                        str(directory / "ca.pem")], check=True, capture_output=True, timeout=60)
        (self.port,) = free_ports(1)
        self.log = open(directory / "scanner.log", "wb")
        self.process = subprocess.Popen(
            [str(PYTHON), "-m", "imguard", "content-scanner", "--data-dir", str(self.data_dir),
             "--content-scanner-port", str(self.port), "--content-scanner-homeserver", homeserver],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.ssl = ssl.create_default_context(cafile=str(directory / "ca.pem"))
        wait_for_port(self.port, 60, self.process, what="imguard content-scanner")

    def request(self, method: str, route: str, body: dict | bytes | None = None, token: str = ""
                ) -> tuple[int, bytes]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(f"https://localhost:{self.port}{PREFIX}/{route}", data=data,
                                         headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, context=self.ssl, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, method: str, route: str, body=None, token: str = "") -> tuple[int, dict]:
        status, content = self.request(method, route, body, token)
        return status, json.loads(content)

    def events(self) -> list[dict]:
        path = self.data_dir / "alerts.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def file_events(self, sha256: str) -> list[dict]:
        return [e for e in self.events() if e.get("event", {}).get("dataset") == "imguard.file"
                and e.get("file", {}).get("hash", {}).get("sha256") == sha256]

    def logs(self) -> str:
        return (self.directory / "scanner.log").read_text(errors="replace")

    def stop(self) -> int | None:
        status = stop_process(self.process)
        self.log.close()
        return status


@pytest.fixture(scope="module")
def synapse(tmp_path_factory):
    server = Synapse.start(tmp_path_factory.mktemp("synapse"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def scanner(tmp_path_factory, synapse):
    running = ContentScanner(tmp_path_factory.mktemp("content-scanner"), synapse.url)
    try:
        yield running
    finally:
        crashed = running.process.poll() is not None
        running.stop()
        assert not crashed, f"imguard content-scanner exited by itself:\n{running.logs()}"
        assert "Traceback" not in running.logs(), running.logs()


class Uploaded:
    """What the sender (alice) shared, and the receiver (bob) who asks the scanner before opening it."""

    def __init__(self):
        self.plain: dict[bytes, str] = {}           # content -> mxc
        self.encrypted: dict[bytes, dict] = {}      # content -> the EncryptedFile of the event (keys and url)
        self.receiver_token = self.receiver_id = ""


@pytest.fixture(scope="module")
def uploaded(synapse) -> Uploaded:
    async def share() -> Uploaded:
        out = Uploaded()
        clients = []
        for name in ("alice", "bob"):
            user = f"{name}-{uuid.uuid4().hex[:6]}"
            client = nio.AsyncClient(synapse.url, user)
            resp = await client.register(user, f"{user}-password-1")
            assert isinstance(resp, nio.RegisterResponse), f"register failed: {resp}"
            clients.append(client)
        alice, bob = clients
        try:
            for content in (EICAR, CLEAN):
                resp, _ = await alice.upload(io.BytesIO(content), content_type="application/octet-stream",
                                             filename="plain.bin", filesize=len(content))
                assert isinstance(resp, nio.UploadResponse), resp
                out.plain[content] = resp.content_uri
                resp, keys = await alice.upload(io.BytesIO(content), content_type="application/octet-stream",
                                                filename="secret.bin", encrypt=True, filesize=len(content))
                assert isinstance(resp, nio.UploadResponse) and keys, resp
                out.encrypted[content] = dict(keys, url=resp.content_uri)
            out.receiver_token, out.receiver_id = bob.access_token, bob.user_id
        finally:
            for client in clients:
                await client.close()
        return out
    return asyncio.run(share())


def media_path(mxc: str) -> str:
    return mxc[len("mxc://"):]


def from_synapse(synapse: Synapse, mxc: str, token: str) -> bytes:
    """The media as Synapse itself serves it (asked on its own port, not through the scanner)."""
    request = urllib.request.Request(f"{synapse.url}/_matrix/client/v1/media/download/{media_path(mxc)}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def test_a_file_in_clear_is_scanned_and_an_infected_one_is_not_served(scanner, uploaded, synapse):
    """scan: EICAR not clean, the clean file clean; download: EICAR refused with 403 MCS_MEDIA_NOT_CLEAN (not a
    byte of it), the clean file served as Synapse holds it. Each is an event naming the requesting user; EICAR
    is in the quarantine."""
    token = uploaded.receiver_token
    status, answer = scanner.json("GET", "scan/" + media_path(uploaded.plain[EICAR]), token=token)
    assert status == 200 and answer["clean"] is False and "malware" in answer["info"].lower(), answer
    status, answer = scanner.json("GET", "scan/" + media_path(uploaded.plain[CLEAN]), token=token)
    assert (status, answer["clean"]) == (200, True), answer
    status, content = scanner.request("GET", "download/" + media_path(uploaded.plain[EICAR]), token=token)
    assert status == 403 and EICAR not in content
    assert json.loads(content)["reason"] == "MCS_MEDIA_NOT_CLEAN"
    status, content = scanner.request("GET", "download/" + media_path(uploaded.plain[CLEAN]), token=token)
    assert (status, content) == (200, CLEAN)

    blocked = scanner.file_events(hashlib.sha256(EICAR).hexdigest())
    assert len(blocked) >= 2, scanner.events()
    event = blocked[0]
    assert event["event"]["action"] == "block" and event["event"]["kind"] == "alert"
    context = event["imguard"]["context"]
    assert context["transfer_mechanism"] == "content-scanner" and context["protocol"] == "matrix"
    assert context["recipients"] == [uploaded.receiver_id] and context["direction"] == "inbound"
    quarantined = Path(event["imguard"]["quarantine_path"])
    assert quarantined.read_bytes() == EICAR
    allowed = scanner.file_events(hashlib.sha256(CLEAN).hexdigest())
    assert allowed and all(e["event"]["action"] == "allow" for e in allowed)


def test_an_encrypted_attachment_is_opened_with_the_clients_key(scanner, uploaded, synapse):
    """scan_encrypted / download_encrypted with the `file` in clear: Synapse holds only ciphertext (EICAR is not
    in its media store), yet the scanner, given the key, finds EICAR; the clean file's download is the stored
    ciphertext, byte for byte, and nio's own decrypt_attachment opens it to the original."""
    token = uploaded.receiver_token
    held = from_synapse(synapse, uploaded.encrypted[EICAR]["url"], token)
    assert held and EICAR not in held, "the encrypted upload reached Synapse in clear"
    status, answer = scanner.json("POST", "scan_encrypted", {"file": uploaded.encrypted[EICAR]}, token=token)
    assert (status, answer["clean"]) == (200, False), answer
    status, answer = scanner.json("POST", "scan_encrypted", {"file": uploaded.encrypted[CLEAN]}, token=token)
    assert (status, answer["clean"]) == (200, True), answer
    status, content = scanner.request("POST", "download_encrypted", {"file": uploaded.encrypted[EICAR]},
                                      token=token)
    assert status == 403 and json.loads(content)["reason"] == "MCS_MEDIA_NOT_CLEAN"
    keys = uploaded.encrypted[CLEAN]
    status, content = scanner.request("POST", "download_encrypted", {"file": keys}, token=token)
    assert status == 200 and content == from_synapse(synapse, keys["url"], token)
    assert nio.crypto.decrypt_attachment(content, keys["key"]["k"], keys["hashes"]["sha256"], keys["iv"]) == CLEAN


def test_encrypted_body_sent_to_the_public_key(scanner, uploaded):
    """The client's request encrypted with PkEncryption to `/public_key`: EICAR refused, the clean file served;
    a body encrypted to another key is 403 MCS_BAD_DECRYPTION (the client fetches the key again)."""
    token = uploaded.receiver_token
    status, answer = scanner.json("GET", "public_key")
    assert status == 200

    def sealed(body: dict, key: str) -> dict:
        pk = vodozemac.PkEncryption.from_key(vodozemac.Curve25519PublicKey.from_base64(key))
        message = pk.encrypt(json.dumps(body).encode())

        def enc(raw: bytes) -> str:
            return base64.b64encode(raw).decode().rstrip("=")
        return {"encrypted_body": {"ciphertext": enc(message.ciphertext), "mac": enc(message.mac),
                                   "ephemeral": enc(message.ephemeral_key)}}

    key = answer["public_key"]
    status, content = scanner.request("POST", "download_encrypted", sealed({"file": uploaded.encrypted[EICAR]}, key),
                                      token=token)
    assert status == 403 and json.loads(content)["reason"] == "MCS_MEDIA_NOT_CLEAN"
    status, answer = scanner.json("POST", "scan_encrypted", sealed({"file": uploaded.encrypted[CLEAN]}, key),
                                  token=token)
    assert (status, answer["clean"]) == (200, True), answer
    status, content = scanner.request("POST", "download_encrypted", sealed({"file": uploaded.encrypted[CLEAN]}, key),
                                      token=token)
    assert status == 200 and content
    other = vodozemac.PkDecryption().public_key.to_base64()
    status, answer = scanner.json("POST", "download_encrypted", sealed({"file": uploaded.encrypted[CLEAN]}, other),
                                  token=token)
    assert (status, answer["reason"]) == (403, "MCS_BAD_DECRYPTION"), answer


def test_errors_carry_the_reference_codes(scanner, uploaded):
    """Malformed JSON 400 MCS_MALFORMED_JSON; a file object whose sha256 is not the media's 400
    MCS_MEDIA_FAILED_TO_DECRYPT; media the homeserver does not have 404 M_NOT_FOUND, as an unknown route."""
    token = uploaded.receiver_token
    status, answer = scanner.json("POST", "scan_encrypted", b"{not json", token=token)
    assert (status, answer["reason"]) == (400, "MCS_MALFORMED_JSON")
    wrong = dict(uploaded.encrypted[CLEAN], hashes=uploaded.encrypted[EICAR]["hashes"])
    status, answer = scanner.json("POST", "scan_encrypted", {"file": wrong}, token=token)
    assert (status, answer["reason"]) == (400, "MCS_MEDIA_FAILED_TO_DECRYPT")
    server = media_path(uploaded.plain[CLEAN]).split("/")[0]
    status, answer = scanner.json("GET", f"scan/{server}/NoSuchMediaHere", token=token)
    assert (status, answer["reason"]) == (404, "M_NOT_FOUND")
    status, answer = scanner.json("GET", "nothing/here")
    assert (status, answer["reason"]) == (404, "M_NOT_FOUND")
