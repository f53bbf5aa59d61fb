"""slixmpp clients for the end-to-end tests: log in, chat, and move a file by XEP-0363 HTTP upload,
XEP-0047 in-band bytestreams and XEP-0065 SOCKS5 bytestreams.

Every wait has a timeout, so a test that goes wrong fails instead of hanging. The helpers report
what happened (what arrived, which error came back) and leave the judging to the test.

    async with Client.connected(endpoint, "alice@localhost/a", "alice-pw") as alice: ...
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import aiohttp
import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import CoroutineCallback
from slixmpp.xmlstream.matcher import StanzaPath

TIMEOUT = 10.0          # seconds for any single step
STARTTLS, DIRECT_TLS, PLAIN = "starttls", "directtls", "plain"
MODES = (STARTTLS, DIRECT_TLS, PLAIN)
IBB_NS = "http://jabber.org/protocol/ibb"
S5B_NS = "http://jabber.org/protocol/bytestreams"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


STANZA_ERRORS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def error_condition(stanza) -> str:
    """The RFC 6120 defined condition of an error stanza, read from the XML itself (slixmpp 1.17's
    Error stanza only knows the RFC 3920 list, which lacks e.g. policy-violation)."""
    for error in stanza.xml:
        if error.tag.endswith("}error"):
            for child in error:
                ns, _, name = child.tag[1:].partition("}")
                if ns == STANZA_ERRORS_NS and name != "text":
                    return name
    return ""


def error_text(stanza) -> str:
    for error in stanza.xml:
        if error.tag.endswith("}error"):
            for child in error:
                if child.tag == f"{{{STANZA_ERRORS_NS}}}text":
                    return child.text or ""
    return ""


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects and how: host and port of the c2s listener (Prosody itself or the
    gateway in front of it), the TLS mode, and the CA file that must verify the certificate the
    client is shown (Prosody's test CA directly, imguard's CA through the gateway)."""

    host: str
    port: int
    mode: str                       # STARTTLS, DIRECT_TLS or PLAIN
    ca_file: Path | None = None     # None only for PLAIN
    http_proxy: str | None = None   # an HTTP proxy for upload PUT/GET (e.g. a gateway's regular mode)
    http_ca_file: Path | None = None  # CA for https:// upload URLs

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass
class Received:
    """Everything a client was sent, in arrival order."""
    messages: list[slixmpp.Message] = field(default_factory=list)
    offers: list[dict] = field(default_factory=list)                 # XEP-0096 offers accepted
    ibb: dict[str, bytearray] = field(default_factory=dict)          # sid -> bytes
    ibb_closed: set[str] = field(default_factory=set)
    socks5: bytearray = field(default_factory=bytearray)
    streamhosts: list[tuple[str, int]] = field(default_factory=list)  # (host, port) offered to us
    socks5_closed: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def poke(self) -> None:
        self.changed.set()


class Client:
    """One logged-in XMPP account. Build with `Client.connected(...)`."""

    def __init__(self, endpoint: Endpoint, jid: str, password: str):
        self.endpoint = endpoint
        self.xmpp = xmpp = slixmpp.ClientXMPP(jid, password)
        xmpp.ssl_context = endpoint.ssl_context()
        xmpp.enable_direct_tls = endpoint.mode == DIRECT_TLS
        xmpp.enable_starttls = endpoint.mode == STARTTLS
        xmpp.enable_plaintext = endpoint.mode == PLAIN
        if endpoint.mode == PLAIN:
            mechanisms = xmpp.plugin["feature_mechanisms"]
            mechanisms.unencrypted_plain = True
            mechanisms.unencrypted_scram = True
        for plugin in ("xep_0030", "xep_0066", "xep_0363"):
            xmpp.register_plugin(plugin)
        xmpp.register_plugin("xep_0047", {"auto_accept": True})
        xmpp.register_plugin("xep_0065", {"auto_accept": True})
        xmpp.register_plugin("xep_0095")
        xmpp.register_plugin("xep_0096")
        self.received = Received()
        self._session = asyncio.get_running_loop().create_future()
        self._disconnected = asyncio.get_running_loop().create_future()
        xmpp.add_event_handler("session_start", self._on_session_start)
        xmpp.add_event_handler("failed_auth", lambda *_: self._fail("authentication failed"))
        xmpp.add_event_handler("connection_failed", lambda e: self._fail(f"connection failed: {e}"))
        xmpp.add_event_handler("disconnected", self._on_disconnected)
        xmpp.add_event_handler("ssl_invalid_chain", lambda e: self._fail(f"TLS certificate rejected: {e}"))
        xmpp.add_filter("in", self._watch_incoming)
        xmpp.add_event_handler("message", self._on_message)
        xmpp.add_event_handler("message_error", self._on_message)
        xmpp.add_event_handler("ibb_stream_data", self._on_ibb_data)
        xmpp.add_event_handler("ibb_stream_end", self._on_ibb_end)
        xmpp.add_event_handler("socks5_data", self._on_socks5_data)
        xmpp.add_event_handler("socks5_closed", self._on_socks5_closed)
        # slixmpp 1.17's xep_0095 registers its coroutine handler with a plain Callback, so it never
        # runs; answer offers with our own handler instead.
        xmpp.remove_handler("SI Request")
        xmpp.register_handler(CoroutineCallback("SI Request", StanzaPath("iq@type=set/si"), self._on_si_request))

    # --- connection -------------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def connected(cls, endpoint: Endpoint, jid: str, password: str,
                        timeout: float = TIMEOUT) -> AsyncIterator["Client"]:
        client = cls(endpoint, jid, password)
        try:
            await client.login(timeout)
            yield client
        finally:
            await client.close()

    async def login(self, timeout: float = TIMEOUT) -> None:
        self.xmpp.connect(self.endpoint.host, self.endpoint.port)
        try:
            await asyncio.wait_for(asyncio.shield(self._session), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.jid}: no session within {timeout:.0f} s "
                                 f"({self.endpoint.mode} to {self.endpoint.host}:{self.endpoint.port})") from None

    async def close(self) -> None:
        if not self._disconnected.done():
            self.xmpp.disconnect(wait=1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._disconnected), 3)
        if not self._disconnected.done():
            self.xmpp.abort()

    @property
    def jid(self) -> str:
        """The full JID the server bound."""
        return str(self.xmpp.boundjid)

    @property
    def alive(self) -> bool:
        return self._session.done() and not self._session.exception() and not self._disconnected.done()

    def peer_certificate(self) -> dict:
        """The certificate of whoever terminated the client's TLS (Prosody, or the gateway)."""
        transport = self.xmpp.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        return ssl_object.getpeercert() if ssl_object else {}

    def _fail(self, reason: str) -> None:
        if not self._session.done():
            self._session.set_exception(AssertionError(f"{self.xmpp.requested_jid}: {reason}"))

    def _on_session_start(self, _event) -> None:
        self.xmpp.send_presence()
        if not self._session.done():
            self._session.set_result(True)

    def _on_disconnected(self, reason) -> None:
        self._fail(f"disconnected before the session started: {reason}")
        if not self._disconnected.done():
            self._disconnected.set_result(reason)
        self.received.poke()

    # --- chat ---------------------------------------------------------------------------------------

    def _on_message(self, message: slixmpp.Message) -> None:
        if any(m is message for m in self.received.messages[-3:]):
            return      # an error message with a body fires both "message" and "message_error"
        self.received.messages.append(message)
        self.received.poke()

    def send_chat(self, to: str, body: str, **extra) -> str:
        message = self.xmpp.make_message(mto=to, mbody=body, mtype="chat")
        message["id"] = message_id = self.xmpp.new_id()
        if extra.get("oob_url"):
            message["oob"]["url"] = extra["oob_url"]
        message.send()
        return message_id

    def send_raw(self, data: str) -> None:
        self.xmpp.send_raw(data)

    async def wait_for(self, predicate: Callable[[Received], object], timeout: float = TIMEOUT,
                       what: str = "") -> object:
        """Wait until `predicate(self.received)` is truthy; return its value, or None on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = predicate(self.received)
            if value:
                return value
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return None
            self.received.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.received.changed.wait(), remaining)

    async def wait_message(self, body: str | None = None, *, id: str | None = None, type: str | None = None,
                           timeout: float = TIMEOUT) -> slixmpp.Message | None:
        """The first received message matching the given body, id and type (None after `timeout`)."""
        def match(received: Received):
            for message in received.messages:
                if body is not None and message["body"] != body:
                    continue
                if id is not None and message["id"] != id:
                    continue
                if type is not None and message["type"] != type:
                    continue
                return message
        return await self.wait_for(match, timeout)

    def bodies(self) -> list[str]:
        return [m["body"] for m in self.received.messages if m["type"] != "error"]

    # --- XEP-0363 HTTP upload ----------------------------------------------------------------------

    async def request_upload_slot(self, name: str, size: int, content_type: str,
                                  timeout: float = TIMEOUT) -> tuple[str, str, dict[str, str]]:
        """Ask the upload service for a slot: (put_url, get_url, put_headers)."""
        service = self.xmpp.boundjid.domain
        upload = self.xmpp.plugin["xep_0363"]
        info = await asyncio.wait_for(upload.find_upload_service(domain=service, timeout=timeout), timeout)
        assert info is not None, "no XEP-0363 upload service found by disco"
        iq = await asyncio.wait_for(upload.request_slot(info["from"], name, size, content_type, timeout=timeout),
                                    timeout)
        slot = iq["http_upload_slot"]
        headers = {h["name"]: h["value"] for h in slot["put"]["headers"]}
        return slot["put"]["url"], slot["get"]["url"], headers

    def _http_ssl(self) -> ssl.SSLContext | bool:
        if self.endpoint.http_ca_file:
            return ssl.create_default_context(cafile=str(self.endpoint.http_ca_file))
        return True

    async def http_put(self, url: str, data: bytes, headers: dict[str, str], content_type: str,
                       timeout: float = TIMEOUT) -> tuple[int, str]:
        headers = {"Content-Type": content_type, "Content-Length": str(len(data)), **headers}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.put(url, data=data, headers=headers, proxy=self.endpoint.http_proxy,
                                ssl=self._http_ssl()) as response:
                return response.status, await response.text(errors="replace")

    async def http_get(self, url: str, timeout: float = TIMEOUT, headers: dict[str, str] | None = None
                       ) -> tuple[int, bytes]:
        """GET `url` as the client downloads a shared file (through the endpoint's HTTP proxy, if any)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(url, proxy=self.endpoint.http_proxy, headers=headers,
                                ssl=self._http_ssl()) as response:
                return response.status, await response.read()

    async def upload(self, name: str, data: bytes, content_type: str = "application/octet-stream",
                     timeout: float = TIMEOUT) -> "UploadResult":
        """XEP-0363: slot request, then HTTP PUT. Never raises for a refused PUT: it is reported."""
        put_url, get_url, headers = await self.request_upload_slot(name, len(data), content_type, timeout)
        status, text = await self.http_put(put_url, data, headers, content_type, timeout)
        return UploadResult(put_url, get_url, status, text)

    # --- XEP-0096 SI file transfer offers (how a file gets its name before IBB or SOCKS5) ----------

    async def _on_si_request(self, iq) -> None:
        """Accept every file offer, as a user clicking "accept" would, with the first stream method."""
        options = iq["si"]["feature_neg"]["form"].get_fields()["stream-method"]["options"] or []
        methods = [o["value"] for o in options]
        self.received.offers.append({"sid": iq["si"]["id"], "name": iq["si"]["file"]["name"],
                                     "size": iq["si"]["file"]["size"], "from": str(iq["from"]),
                                     "methods": methods})
        self.received.poke()
        reply = iq.reply(clear=True)
        reply["si"]["feature_neg"]["form"]["type"] = "submit"
        reply["si"]["feature_neg"]["form"].add_field(var="stream-method", ftype="list-single",
                                                     value=methods[0] if methods else IBB_NS)
        reply.send()

    async def offer_file(self, to: str, sid: str, name: str, size: int, method: str,
                         timeout: float = TIMEOUT) -> None:
        """XEP-0096 offer of `name` to the full JID `to`, for the stream method `method` (IBB or S5B)."""
        await asyncio.wait_for(self.xmpp.plugin["xep_0096"].request_file_transfer(
            to, sid=sid, name=name, size=size, mime_type="application/octet-stream",
            methods=[{"value": method, "label": ""}],   # slixmpp 1.17 wants option dicts, not strings
            timeout=timeout), timeout)

    # --- XEP-0047 in-band bytestreams -------------------------------------------------------------

    def _on_ibb_data(self, stream) -> None:
        buffer = self.received.ibb.setdefault(stream.sid, bytearray())
        while not stream.recv_queue.empty():
            buffer.extend(stream.recv_queue.get_nowait())
        self.received.poke()

    def _on_ibb_end(self, stream) -> None:
        self.received.ibb_closed.add(stream.sid)
        self.received.poke()

    async def ibb_send(self, to: str, data: bytes, name: str | None = None, block_size: int = 4096,
                       timeout: float = TIMEOUT) -> "SendResult":
        """Offer `name` (XEP-0096, when given), open an IBB stream to the full JID `to`, send `data`,
        close. Errors are reported, not raised."""
        ibb = self.xmpp.plugin["xep_0047"]
        result = SendResult(sid=uuid.uuid4().hex)
        try:
            if name:
                await self.offer_file(to, result.sid, name, len(data), IBB_NS, timeout)
            stream = await asyncio.wait_for(ibb.open_stream(to, sid=result.sid, block_size=block_size,
                                                            timeout=timeout), timeout)
            result.sid = stream.sid
            await asyncio.wait_for(stream.sendall(data, timeout=timeout), timeout)
            await asyncio.wait_for(stream.close(timeout=timeout), timeout)
            result.completed = True
        except IqError as error:
            result.error = error.iq["error"]["condition"] or "error"
            result.error_text = error.iq["error"]["text"]
        except (IqTimeout, asyncio.TimeoutError):
            result.error = "timeout"
        return result

    # --- XEP-0065 SOCKS5 bytestreams via the server's proxy65 ---------------------------------------

    def _watch_incoming(self, stanza):
        """Remember the streamhosts of every bytestream offer this client is sent (before slixmpp
        handles it), so a test can see where the receiver was told to connect."""
        for host in stanza.xml.iterfind(f"{{{S5B_NS}}}query/{{{S5B_NS}}}streamhost"):
            if stanza.xml.get("type") == "set":
                self.received.streamhosts.append((host.get("host"), int(host.get("port") or 0)))
        return stanza

    def _on_socks5_data(self, data: bytes) -> None:
        self.received.socks5.extend(data)
        self.received.poke()

    def _on_socks5_closed(self, _exc) -> None:
        self.received.socks5_closed += 1
        self.received.poke()

    async def discover_socks5_proxies(self, timeout: float = TIMEOUT) -> dict:
        s5b = self.xmpp.plugin["xep_0065"]
        s5b._proxies = await asyncio.wait_for(s5b.discover_proxies(timeout=timeout), timeout)
        return dict(s5b._proxies)

    async def socks5_send(self, to: str, data: bytes, name: str | None = None,
                          timeout: float = TIMEOUT) -> "SendResult":
        """Offer `name` (XEP-0096, when given), negotiate a bytestream to the full JID `to` through
        the discovered proxy, write `data`, then close the socket (proxy65 keeps the tail of the
        data until the sender closes)."""
        s5b = self.xmpp.plugin["xep_0065"]
        result = SendResult(sid=uuid.uuid4().hex)
        try:
            if not s5b._proxies:
                await self.discover_socks5_proxies(timeout)
            result.proxies = dict(s5b._proxies)
            if name:
                await self.offer_file(to, result.sid, name, len(data), S5B_NS, timeout)
            sock = await asyncio.wait_for(s5b.handshake(to, sid=result.sid, timeout=timeout), timeout)
            if sock is None:
                result.error = "handshake failed"
                return result
            await asyncio.wait_for(sock.write(data), timeout)
            sock.transport.close()
            result.completed = True
        except IqError as error:
            result.error = error.iq["error"]["condition"] or "error"
            result.error_text = error.iq["error"]["text"]
        except (IqTimeout, asyncio.TimeoutError):
            result.error = "timeout"
        except OSError as error:
            result.error = f"socket: {error}"
        return result


@dataclass
class UploadResult:
    put_url: str
    get_url: str
    put_status: int
    put_text: str

    @property
    def accepted(self) -> bool:
        return 200 <= self.put_status < 300


@dataclass
class SendResult:
    completed: bool = False
    sid: str = ""
    error: str = ""
    error_text: str = ""
    proxies: dict = field(default_factory=dict)
