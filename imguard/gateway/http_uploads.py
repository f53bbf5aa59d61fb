"""HTTP(S) uploads held until inspection and policy decide (XEP-0363 PUT, later other chat APIs).

requestheaders: a PUT/POST whose URL a chat session announced (ExpectedTransfers.take_upload, else a Yahoo
                file transfer's relay token or URL: ymsg.find_ymsg_transfer) or that
                matches a configured upload path is buffered whole (never streamed), up to
                max_upload_size. A larger one is not scanned: policy decides on an UNSCANNABLE
                ("too_large") report, and unless policy explicitly allows that, the client gets 413.
request:        the body is inspected in a worker thread; block -> 403 with a short reason, and the
                download URL is marked blocked (ExpectedTransfers.mark_blocked_url) so the chat message
                that would share it can be stopped too; allow -> forwarded unchanged.
A GET of a URL already marked blocked is answered 403 as well. A GET of a file a chat session announced as
coming to our user has its response held and scanned the same way (inbound: from the party who shared it to our
user): a link the server delivered to an XMPP client (ExpectedTransfers.expected_download: an XEP-0066 OOB URL, an
XEP-0363 GET URL in a Jingle offer; mechanism "xep-0363-get"), or a Yahoo relay or peer-to-peer download
(find_ymsg_transfer; mechanism "download"). Its Range headers are dropped, so the response is the whole file
(a 206 piece would cross unscanned). block -> 403 to the receiver, a notice on the chat connection that announced
it, and an XMPP link is marked blocked (a later GET or a message passing it on is refused too). Everything else
(other requests, other responses) is streamed, not buffered: mitmproxy would otherwise hold every body in memory.
An upload without Content-Length (chunked) is buffered whole before its size can be checked.

The table may be shared by several workers or gateways (transfer_store): a lookup that fails is never read as
"not announced" (that would pass an announced upload unscanned). It follows the `store` fail mode: closed (the
default), the request is answered 503 with a notice and an anomaly is recorded; open, it goes on as if nothing
had been announced, with the same anomaly.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from mitmproxy import http

from imguard.files import downloads
from imguard.files.expected import ExpectedDownload, ExpectedUpload, normalize_url
from imguard import alerts
from imguard.gateway.inspection import Inspection
from imguard.model import ALERT, ALLOW, FROM_CLIENT, REASON_TOO_LARGE, ChatContext
from imguard.protocols.ymsg import find_ymsg_transfer
from imguard.protocols.base import Notify

logger = logging.getLogger("imguard.gateway")

META = "imguard_upload"


def _attr(obj: Any, *names: str, default: Any = "") -> Any:
    for name in names:
        if isinstance(obj, dict) and name in obj:
            return obj[name]
        if hasattr(obj, name):
            return getattr(obj, name)
    return default


def flow_context(flow: http.HTTPFlow, mechanism: str, ctx: ChatContext | None = None,
                 protocol: str = "http", origin: str = FROM_CLIENT) -> ChatContext:
    """The addresses and connection of `flow`, filled into `ctx` where it has none (or a new context). `origin`:
    a request's body comes from the client behind the gateway (an upload), a response's from the server (a
    download to that client). Shared with the chat-API addon (chat_apis.py)."""
    client = flow.client_conn.peername
    server = flow.server_conn.address or (flow.request.host, flow.request.port)
    base = dict(client_address=f"{client[0]}:{client[1]}" if client else "",
                server_address=f"{server[0]}:{server[1]}",
                connection_id=flow.client_conn.id,
                transfer_mechanism=mechanism, origin=origin)
    if ctx is not None:
        return ctx.with_(**{k: v for k, v in base.items() if not getattr(ctx, k)})
    return ChatContext(protocol=protocol, **base)


def too_large(inspection: Inspection, ctx: ChatContext, name: str, claimed_mime: str, size: int,
              limit: int, setting: str = "max_upload_size"):
    """Policy's decision on an upload over `limit` bytes, which is not scanned (UNSCANNABLE "too_large"):
    (passes, decision). It passes only when policy explicitly allows or merely alerts."""
    report, decision = inspection.unscannable(
        b"", ctx, name, claimed_mime, REASON_TOO_LARGE,
        f"the upload ({size} bytes) is larger than {setting} ({limit})", size=size)
    return decision.action in (ALLOW, ALERT), decision


DOWNLOAD_META = "imguard_download"


class StoreFailed(Exception):
    """A lookup in the expected-transfers table failed (its shared store is down or too slow)."""


class HttpUploads:
    def __init__(self, inspection: Inspection, transfers=None, upload_paths: list[str] | tuple = (),
                 max_upload_size: int = 64 * 1024 * 1024, notify=None, record=None,
                 store_fail_open: Any = None):
        self.inspection = inspection
        self.transfers = transfers
        self.record = record            # writes an event (the store anomaly)
        self.store_fail_open = store_fail_open      # () -> bool: fail mode `store` is open for http
        self.paths = [re.compile(p) for p in upload_paths]
        self.max_upload_size = max_upload_size
        self.notify = notify            # carries out a Notify: recorded, and told on the chat connection

    def _context(self, flow: http.HTTPFlow, expected: Any) -> ChatContext:
        ctx = _attr(expected, "context", default=None) if expected is not None else None
        return flow_context(flow, "xep-0363" if expected is not None else "upload",
                            ctx if isinstance(ctx, ChatContext) else None)

    def _lookup(self, what: str, call, *args) -> Any:
        """One table lookup; any failure is StoreFailed (never None: that would mean "not announced")."""
        try:
            return call(*args)
        except Exception as e:
            raise StoreFailed(f"{what}: {e}") from e

    def _take_expected(self, url: str) -> Any:
        if self.transfers is None:
            return None
        expected = self._lookup("take_upload", self.transfers.take_upload, url)
        if expected is None and callable(getattr(self.transfers, "get", None)):
            # a Yahoo relay or peer-to-peer POST
            expected = self._lookup("find_ymsg_transfer", lambda: find_ymsg_transfer(self.transfers, url=url))
        return expected

    def _store_failed(self, flow: http.HTTPFlow, error: StoreFailed) -> bool:
        """Fail mode `store`: True when the request may go on as unannounced (open); else it is refused."""
        fail_open = bool(self.store_fail_open and self.store_fail_open())
        logger.error("expected-transfers table unavailable for %s %s (%s): %s", flow.request.method,
                     flow.request.pretty_url, "relayed unscanned: fail mode store=open" if fail_open else "refused",
                     error)
        if self.record is not None:
            self.record(alerts.anomaly_event(flow_context(flow, "upload"), "transfer_store_failed", str(error)[:300],
                                             severity="high", action="allow" if fail_open else "block"))
        if not fail_open:
            flow.response = http.Response.make(
                503, b"imguard: this transfer cannot be checked right now (the gateway's table of announced "
                     b"files is unavailable); it was refused, try again later\n", {"content-type": "text/plain"})
        return fail_open

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self._requestheaders(flow)
        except StoreFailed as e:
            if self._store_failed(flow, e):
                flow.request.stream = True
            flow.metadata.pop(META, None)
            flow.metadata.pop(DOWNLOAD_META, None)

    def _requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        # The URL as the client addressed it (Host header) and as it goes upstream (reverse mode target):
        # a chat server announces one of the two.
        urls = list(dict.fromkeys((req.pretty_url, req.url)))
        url = urls[0]
        if req.method == "GET" and self.transfers is not None:
            reason = None
            for candidate in urls:
                reason = reason or self._lookup("blocked_url_reason", self.transfers.blocked_url_reason, candidate)
            if reason:
                flow.response = http.Response.make(403, f"imguard: blocked ({reason})\n".encode(),
                                                   {"content-type": "text/plain"})
                return
            expected = self._expected_download(urls)
            if expected is not None:
                if isinstance(expected, ExpectedDownload):
                    self._to_upload_service(flow, expected.url)     # a link rewritten to the upload relay
                flow.metadata[DOWNLOAD_META] = {"expected": expected, "url": url}
                for header in ("range", "if-range"):        # the whole file, or none of it: never a piece
                    req.headers.pop(header, None)
            return
        if req.method not in ("PUT", "POST"):
            req.stream = True                           # not ours: never buffered
            return
        expected = None
        for candidate in urls:
            expected = self._take_expected(candidate)
            if expected is not None:
                url = candidate
                break
        if expected is None and not any(p.search(u) for p in self.paths for u in urls):
            req.stream = True                           # not an upload we inspect: relayed as it comes
            return
        if isinstance(expected, ExpectedUpload):
            self._to_upload_service(flow, expected.put_url)
        flow.metadata[META] = {"expected": expected, "url": url}
        req.stream = False                          # buffer: nothing reaches the server before the verdict
        length = req.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_upload_size:
            self._too_large(flow, int(length))

    @staticmethod
    def _to_upload_service(flow: http.HTTPFlow, put_url: str) -> None:
        """An announced PUT (or the GET of a link shared with our user) goes to the URL the upload service granted,
        with its Host: the client may have been given the gateway's upload relay instead (XmppLimits.upload_relay,
        upload_relay_links). Through the relay listener the request already goes there (reverse mode) but carries
        the relay's Host; a proxied client's request to the relay URL goes straight to the service, not through
        the gateway's own listener a second time (it would be held twice)."""
        req = flow.request
        if normalize_url(put_url) != normalize_url(req.url):
            req.url = put_url
        netloc = urlsplit(put_url).netloc
        if netloc and req.headers.get("host", netloc) != netloc:
            req.headers["host"] = netloc

    def _too_large(self, flow: http.HTTPFlow, size: int) -> None:
        meta = flow.metadata[META]
        ctx = self._context(flow, meta["expected"])
        name = self._name(flow, meta["expected"])
        passes, decision = too_large(self.inspection, ctx, name, flow.request.headers.get("content-type", ""), size,
                                     self.max_upload_size)
        meta["done"] = True
        if passes:
            logger.warning("upload %s (%d bytes) too large to scan; policy allows it unscanned", meta["url"], size)
            flow.request.stream = True
            return
        reason = f"upload larger than {self.max_upload_size} bytes"
        flow.response = http.Response.make(413, f"imguard: {reason}\n".encode(), {"content-type": "text/plain"})
        self._mark_blocked(meta, reason)

    @staticmethod
    def _name(flow: http.HTTPFlow, expected: Any) -> str:
        name = _attr(expected, "name", "filename", default="") if expected is not None else ""
        return name or unquote(urlsplit(flow.request.pretty_url).path.rsplit("/", 1)[-1])

    def _mark_blocked(self, meta: dict, reason: str) -> None:
        if self.transfers is None:
            return
        get_url = _attr(meta["expected"], "get_url", default="") if meta["expected"] is not None else ""
        try:
            self.transfers.mark_blocked_url(get_url or meta["url"], reason)
        except Exception:
            logger.exception("ExpectedTransfers.mark_blocked_url failed")

    def _expected_download(self, urls: list[str]) -> Any:
        """A file a chat session announced as coming *to* our user over HTTP (a link the server delivered to an
        XMPP client, a Yahoo relay or peer-to-peer GET): its response is the file, held and scanned like an
        upload."""
        if callable(getattr(self.transfers, "expected_download", None)):
            for candidate in urls:
                found = self._lookup("expected_download", self.transfers.expected_download, candidate)
                if found is not None:
                    return found
        if not callable(getattr(self.transfers, "get", None)):
            return None
        for candidate in urls:
            found = self._lookup("find_ymsg_transfer", lambda c=candidate: find_ymsg_transfer(self.transfers, url=c))
            if found is not None and not getattr(found, "outbound", True):
                return found
        return None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """An announced download is held for its verdict; every other response is streamed, not held."""
        meta = flow.metadata.get(DOWNLOAD_META)
        if meta is None or flow.response.status_code != 200:
            flow.response.stream = True
            return
        length = flow.response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_upload_size:
            expected = meta["expected"]
            passes, _ = too_large(self.inspection, self._download_context(flow, expected), expected.name,
                                  flow.response.headers.get("content-type", ""), int(length), self.max_upload_size)
            meta["done"] = True
            if passes:
                flow.response.stream = True
            else:
                flow.kill()                     # the receiver gets no byte of a file too large to inspect
            return
        flow.response.stream = False

    @staticmethod
    def _download_context(flow: http.HTTPFlow, expected: Any) -> ChatContext:
        """A file coming to the client behind the gateway, with this flow's addresses."""
        return flow_context(flow, downloads.mechanism(expected),
                            downloads.context(expected, client_address="", server_address=""))

    async def response(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(DOWNLOAD_META)
        if meta is None or meta.get("done") or flow.response is None or flow.response.stream:
            return
        meta["done"] = True
        expected = meta["expected"]
        ctx = self._download_context(flow, expected)
        data = flow.response.get_content(strict=False) or b""
        report, decision = await self.inspection.check(data, ctx, expected.name or self._name(flow, None),
                                                       flow.response.headers.get("content-type", ""))
        if not decision.blocked:
            return
        reason = decision.refusal
        flow.response = http.Response.make(403, f"imguard: download blocked ({reason})\n".encode(),
                                           {"content-type": "text/plain"})
        logger.info("download %s blocked: %s", meta["url"], reason)
        name = expected.name or self._name(flow, None)
        if isinstance(expected, ExpectedDownload) and self.transfers is not None:
            try:                # the link stays blocked: a later GET, or a message passing it on, is refused
                self.transfers.mark_blocked_url(expected.url, reason)
            except Exception:
                logger.exception("ExpectedTransfers.mark_blocked_url failed")
        if self.notify is not None and expected.context.connection_id:
            self.notify(Notify(expected.context.connection_id, expected.context.protocol or "ymsg",
                               downloads.receiver_notice(expected, name, decision), ctx, decision))

    async def request(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if not meta or meta.get("done") or flow.response is not None:
            return
        meta["done"] = True
        data = flow.request.get_content(strict=False) or b""
        ctx = self._context(flow, meta["expected"])
        if len(data) > self.max_upload_size:         # chunked, no content-length: caught after buffering
            self._too_large(flow, len(data))
            return
        claimed = (_attr(meta["expected"], "content_type", "mime", default="") if meta["expected"] is not None
                   else "") or flow.request.headers.get("content-type", "")
        report, decision = await self.inspection.check(data, ctx, self._name(flow, meta["expected"]), claimed)
        if decision.blocked:
            reason = decision.refusal
            flow.response = http.Response.make(403, f"imguard: upload blocked ({reason})\n".encode(),
                                               {"content-type": "text/plain"})
            self._mark_blocked(meta, reason)
            logger.info("upload %s blocked: %s", meta["url"], reason)
