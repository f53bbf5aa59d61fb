"""HTTP uploads in a capture: the offline counterpart of imguard.gateway.http_uploads.

The gateway scans uploads inside mitmproxy's HTTP flow hooks; a capture has no mitmproxy, so this is
a small sans-io HTTP/1.x request reader with the same decisions (a StreamSession, like the chat
sessions):

  * a PUT/POST whose URL a chat session announced (XEP-0363 slot: ExpectedTransfers.take_upload) or
    that matches an `upload_paths` expression is held whole and inspected (InspectFile, mechanism
    "xep-0363" or "upload"); blocked: the client would have had a 403 and the download URL is marked
    blocked, so a chat message that shares it later is stopped as well;
  * a GET of a URL marked blocked would have had a 403;
  * everything else crosses untouched.

Responses are relayed as they are (this reader does not parse them).
Requests are bounded: a header block over `max_header_bytes` or a body over `max_upload_size` ends
decoding with an anomaly (a body too large to hold is inspected as what was held, marked truncated,
so policy sees an unscannable file rather than nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from imguard import alerts
from imguard.model import ChatContext, Decision, FileReport
from imguard.protocols.base import Command, InspectFile, Record, Send
from imguard.settings import KiB, MiB, setting


@dataclass(frozen=True)
class HttpLimits:
    """HTTP uploads in captures."""

    max_header_bytes: int = setting(64 * KiB, "Longest request head (request line and headers); a longer one "
                                    "stops decoding that connection with an anomaly")
    max_upload_size: int = setting(64 * MiB, "Largest upload body held for inspection, as the gateway's "
                                   "max_upload_size; a larger one is inspected as held, marked truncated")
    upload_paths: tuple = setting((), "URL regular expressions of upload endpoints scanned even when no chat "
                                  "session announced them, as the gateway's upload_paths")


_METHODS_WITH_BODY = (b"PUT", b"POST", b"PATCH")
HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, CHUNK_TRAILER, DONE = range(7)


class HttpUploadSession:
    """One HTTP/1.x connection seen in a capture: client requests decoded, server bytes relayed."""

    def __init__(self, transfers: Any, context: ChatContext, limits: HttpLimits = HttpLimits()):
        self.transfers = transfers
        self.context = context.with_(protocol=context.protocol or "http")
        self.limits = limits
        self._paths = [re.compile(p) for p in limits.upload_paths]
        self._buf = bytearray()
        self._state = HEAD
        self._raw_request = bytearray()  # every byte of the request being held, for its release
        self._body = bytearray()         # its body, de-chunked
        self._remaining = 0
        self._chunked = False
        self._hold: dict[str, Any] | None = None   # the request being held: url, expected, method
        self._counter = 0
        self._pending: dict[str, tuple[bytes, dict]] = {}

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if not from_client or self._state == DONE:
            return [Send(to_client=not from_client, data=data)]
        self._buf += data
        out: list[Command] = []
        while self._buf and self._state != DONE:
            before = (self._state, len(self._buf))
            if self._state == HEAD:
                out += self._read_head()
            elif self._state == BODY:
                take = bytes(self._buf[:self._remaining])
                del self._buf[:len(take)]
                self._remaining -= len(take)
                out += self._body_bytes(take)
                if self._remaining == 0:
                    out += self._request_done()
            else:
                out += self._read_chunked()
            if (self._state, len(self._buf)) == before:
                break
        return out

    def tls_started(self) -> list[Command]:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        held = self._pending.pop(transfer_id, None)
        if held is None:
            return []
        raw, meta = held
        if not decision.blocked:
            return [Send(to_client=False, data=raw)]
        reason = decision.notice or (", ".join(decision.rule_ids) if decision.rule_ids else decision.action)
        get_url = getattr(meta["expected"], "get_url", "") if meta["expected"] is not None else ""
        if self.transfers is not None:
            self.transfers.mark_blocked_url(get_url or meta["url"], reason)
        return [Send(to_client=True, data=_response(403, f"imguard: upload blocked ({reason})"))]

    def connection_closed(self, from_client: bool) -> list[Command]:
        if self._hold is not None and self._state in (BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, CHUNK_TRAILER):
            # The request ended before its body did: inspect what came, marked truncated.
            return self._inspect(truncated=True)
        return []

    # --- requests -----------------------------------------------------------------------------------

    def _read_head(self) -> list[Command]:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > self.limits.max_header_bytes:
                return self._give_up("http_header_too_long", f"a request head over {self.limits.max_header_bytes} "
                                     "bytes")
            return []
        head = bytes(self._buf[:end + 4])
        del self._buf[:end + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._buf[:0] = head
            return self._give_up("http_bad_request", f"not an HTTP/1.x request line: {lines[0][:80]!r}")
        method, target = parts[0], parts[1].decode("latin-1")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        self._raw_request = bytearray()
        self._body = bytearray()
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length", "0").strip()
        self._remaining = int(length) if length.isdigit() else 0
        urls = self._urls(target, headers)
        out: list[Command] = []
        self._hold = None
        if method == b"GET" and self.transfers is not None:
            reason = next((r for r in (self.transfers.blocked_url_reason(u) for u in urls) if r), None)
            if reason:
                out.append(Record(alerts.anomaly_event(self.context, "blocked_download",
                                                       "a download of a file that was blocked", url=urls[0],
                                                       reason=reason)))
                out.append(Send(to_client=True, data=_response(403, f"imguard: blocked ({reason})")))
                head = b""
        elif method in _METHODS_WITH_BODY:
            expected, url = None, urls[0]
            for candidate in urls:
                expected = self.transfers.take_upload(candidate) if self.transfers is not None else None
                if expected is not None:
                    url = candidate
                    break
            if expected is not None or any(p.search(u) for p in self._paths for u in urls):
                self._hold = {"url": url, "expected": expected, "content_type": headers.get("content-type", "")}
        out += self._raw(head)
        if self._chunked:
            self._state = CHUNK_SIZE
        elif self._remaining:
            self._state = BODY
        else:
            out += self._request_done()
        return out

    def _urls(self, target: str, headers: dict[str, str]) -> list[str]:
        if "://" in target:
            return [target]
        host = headers.get("host", "") or self.context.server_address
        urls = [f"http://{host}{target}"]
        if self.context.server_address and self.context.server_address != host:
            urls.append(f"http://{self.context.server_address}{target}")
        return urls

    def _body_bytes(self, data: bytes) -> list[Command]:
        if self._hold is None:
            return [Send(to_client=False, data=data)] if data else []
        self._raw_request += data
        self._body += data
        if len(self._body) > self.limits.max_upload_size:
            out = self._inspect(truncated=True)
            self._state = DONE
            return out + [Record(alerts.anomaly_event(self.context, "http_upload_too_large",
                                                      f"an upload over max_upload_size "
                                                      f"({self.limits.max_upload_size}); the rest is not decoded"))]
        return []

    def _read_chunked(self) -> list[Command]:
        out: list[Command] = []
        if self._state == CHUNK_SIZE:
            end = self._buf.find(b"\r\n")
            if end < 0:
                return []
            line = bytes(self._buf[:end + 2])
            del self._buf[:end + 2]
            out += self._raw(line)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                return out + self._give_up("http_bad_chunk", f"a bad chunk size line {line[:40]!r}")
            self._remaining = size
            self._state = CHUNK_DATA if size else CHUNK_TRAILER
        elif self._state == CHUNK_DATA:
            data = bytes(self._buf[:self._remaining])
            del self._buf[:len(data)]
            self._remaining -= len(data)
            out += self._body_bytes(data)
            if self._remaining == 0:
                self._state, self._remaining = CHUNK_CRLF, 2
        elif self._state == CHUNK_CRLF:                                 # the CRLF after a chunk's data
            crlf = bytes(self._buf[:self._remaining])
            del self._buf[:len(crlf)]
            self._remaining -= len(crlf)
            out += self._raw(crlf)
            if self._remaining == 0:
                self._state = CHUNK_SIZE
        else:                                                           # trailer: lines until an empty one
            end = self._buf.find(b"\r\n")
            if end < 0:
                return []
            line = bytes(self._buf[:end + 2])
            del self._buf[:end + 2]
            out += self._raw(line)
            if line == b"\r\n":
                out += self._request_done()
        return out

    def _raw(self, data: bytes) -> list[Command]:
        """Framing bytes (chunk sizes, CRLFs): kept with a held request, else forwarded."""
        if self._hold is not None:
            self._raw_request += data
            return []
        return [Send(to_client=False, data=data)] if data else []

    def _request_done(self) -> list[Command]:
        self._state = HEAD
        if self._hold is None:
            return []
        return self._inspect(truncated=False)

    def _inspect(self, truncated: bool) -> list[Command]:
        meta, self._hold = self._hold, None
        expected = meta["expected"]
        ctx = getattr(expected, "context", None) if expected is not None else None
        base = dict(client_address=self.context.client_address, server_address=self.context.server_address,
                    connection_id=self.context.connection_id,
                    transfer_mechanism="xep-0363" if expected is not None else "upload")
        if isinstance(ctx, ChatContext):
            ctx = ctx.with_(**{k: v for k, v in base.items() if not getattr(ctx, k)})
        else:
            ctx = ChatContext(protocol="http", **base)
        name = (getattr(expected, "name", "") if expected is not None else "") or \
            unquote(urlsplit(meta["url"]).path.rsplit("/", 1)[-1])
        claimed = (getattr(expected, "content_type", "") if expected is not None else "") or meta["content_type"]
        self._counter += 1
        transfer_id = f"http:{self.context.connection_id}:{self._counter}"
        data = bytes(self._body)
        self._pending[transfer_id] = (bytes(self._raw_request), meta)
        self._raw_request, self._body = bytearray(), bytearray()
        return [InspectFile(transfer_id, data, ctx, name=name, claimed_mime=claimed, truncated=truncated)]

    def _give_up(self, kind: str, detail: str) -> list[Command]:
        """Not HTTP as this reader knows it: record why and relay the rest untouched."""
        self._state = DONE
        rest, self._buf = bytes(self._buf), bytearray()
        out: list[Command] = [Record(alerts.anomaly_event(self.context, kind, detail))]
        return out + ([Send(to_client=False, data=rest)] if rest else [])


def _response(status: int, text: str) -> bytes:
    reason = {403: "Forbidden", 413: "Payload Too Large"}.get(status, "")
    body = (text + "\n").encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body
