"""What every console page stands on: sessions, CSRF tokens, the access log, security headers, inert chat text.

- Sessions live in the console's memory (a restart logs everyone out), named by 32 random bytes in a cookie
  `__Host-imguard-session`: Secure, HttpOnly, SameSite=Strict, Path=/ (the `__Host-` prefix makes browsers refuse
  it without Secure or with a Domain). A login replaces the session (no fixation). Idle and absolute lifetimes.
- CSRF: every session, the anonymous one of the login page too, has a token; every form carries it in a hidden
  field and every POST without the session's token is refused (403) before its handler runs.
- The access log, DATA_DIR/console/access.jsonl (0600, one O_APPEND write per line): who looked at which alert,
  conversation, search or export, and every login. Its own file rather than the gateway's alert pipeline: the
  console may run on another host, and `alerts.jsonl` is the gateway's (its rotation, its sinks).
- Chat text and file names are hostile: templates autoescape, and `chat_text` also turns bidi controls into
  visible marks so a name like `invoice<U+202E>fdp.exe` cannot show itself as `invoiceexe.pdf`.
"""

from __future__ import annotations

import datetime
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from markupsafe import Markup, escape

from imguard.console.accounts import Role

COOKIE = "__Host-imguard-session"
IDLE_SECONDS = 30 * 60
MAX_SECONDS = 12 * 3600

# Controls that reorder or hide text: the bidi embeddings, overrides and isolates, the marks, ALM.
BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def chat_text(value: object) -> Markup:
    """Escaped text with every bidi control shown as a mark ([U+202E]) instead of acting."""
    text = "" if value is None else str(value)
    out, last = [], 0
    for m in BIDI.finditer(text):
        out.append(escape(text[last:m.start()]))
        out.append(Markup(f'<span class="bidi" title="bidirectional control">[U+{ord(m.group()):04X}]</span>'))
        last = m.end()
    out.append(escape(text[last:]))
    return Markup("").join(out)


@dataclass
class Session:
    token: str
    csrf: str
    user: str = ""              # "" before login
    role: Role | None = None
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)


class Sessions:
    def __init__(self, idle: float = IDLE_SECONDS, lifetime: float = MAX_SECONDS, clock=time.monotonic):
        self.idle, self.lifetime, self.clock = idle, lifetime, clock
        self._by_token: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self, user: str = "", role: Role | None = None) -> Session:
        now = self.clock()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), user, role, now, now)
        with self._lock:
            self._expire(now)
            self._by_token[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        now = self.clock()
        with self._lock:
            session = self._by_token.get(token)
            if session is None:
                return None
            if now - session.seen > self.idle or now - session.created > self.lifetime:
                del self._by_token[token]
                return None
            session.seen = now
            return session

    def end(self, token: str) -> None:
        with self._lock:
            self._by_token.pop(token, None)

    def _expire(self, now: float) -> None:
        if len(self._by_token) < 10_000:
            return
        for token, s in list(self._by_token.items()):
            if now - s.seen > self.idle or now - s.created > self.lifetime or not s.user:
                del self._by_token[token]


def csrf_ok(session: Session | None, submitted: str | None) -> bool:
    return bool(session and submitted and hmac.compare_digest(session.csrf.encode(), submitted.encode()))


class AccessLog:
    """DATA_DIR/console/access.jsonl: one JSON object per line, ECS-shaped (`event.dataset` imguard.console)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def write(self, action: str, user: str, address: str, outcome: str = "success", **facts: object) -> None:
        now = datetime.datetime.now(datetime.UTC)
        event = {"@timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "event": {"kind": "event", "module": "imguard", "dataset": "imguard.console", "action": action,
                           "outcome": outcome},
                 "user": {"name": user}, "source": {"address": address},
                 "imguard": {"console": facts}}
        line = json.dumps(event, ensure_ascii=True, default=str) + "\n"     # ASCII: no text can split a line
        with self._lock:
            os.write(self._fd, line.encode())

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


# No script at all: the pages need none, and a script that escaping missed still cannot run.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
    "strict-transport-security": "max-age=31536000",
}
