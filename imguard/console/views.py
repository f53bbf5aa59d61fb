"""The console's pages: Starlette routes rendering Jinja2 templates (autoescape on for every template).

Every page asks for a `Permission`; a POST is served only with its session's CSRF token (`post`). Reading an
alert, a conversation, a search or an export is written to the access log with who and what."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from imguard import archive
from imguard.console import chart, data
from imguard.console.accounts import Accounts, Permission, Throttle
from imguard.console.cli import ConsoleSettings
from imguard.console.web import COOKIE, SECURITY_HEADERS, AccessLog, Session, Sessions, chat_text, csrf_ok

HERE = Path(__file__).parent
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\d(T\d\d(:\d\d(:\d\d(\.\d+)?)?)?)?$")


class Console:
    """The application and what its pages share."""

    def __init__(self, data_dir: Path, settings: ConsoleSettings | None = None, archive_dsn: str = "",
                 clock: Callable[[], float] = time.monotonic):
        self.data_dir = Path(data_dir)
        self.settings = settings = settings or ConsoleSettings()
        folder = self.data_dir / "console"
        self.accounts = Accounts(folder / "users.json")
        self.alerts = data.AlertIndex(self.data_dir, folder / "alerts-index.sqlite3")
        self.archive = data.ArchiveReader(self.data_dir / "archive.sqlite3", archive_dsn)
        self.access = AccessLog(folder / "access.jsonl")
        self.sessions = Sessions(idle=settings.console_session_idle_seconds, clock=clock)
        # Per account name, and per client address with five times the allowance: a guesser spraying many names
        # from one address is slowed without one person's typos locking out a whole office behind one NAT.
        self.throttle_names = Throttle(free=settings.console_login_failures,
                                       base=settings.console_login_lock_seconds, clock=clock)
        self.throttle_addresses = Throttle(free=5 * settings.console_login_failures,
                                           base=settings.console_login_lock_seconds, clock=clock)
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                            autoescape=True, undefined=jinja2.ChainableUndefined)
        self.templates.filters["chat"] = chat_text
        self.templates.globals["Permission"] = Permission
        self.templates.globals["bare"] = data.bare
        get, post = self.page, self.post
        self.app = Starlette(routes=[
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", post(self.login), methods=["POST"]),
            Route("/logout", post(self.logout, Permission.READ_ALERTS), methods=["POST"]),
            Route("/", get(self.overview, Permission.READ_ALERTS)),
            Route("/alerts", get(self.alert_list, Permission.READ_ALERTS)),
            Route("/alerts/{event_id}", get(self.alert_page, Permission.READ_ALERTS)),
            Route("/conversations", get(self.conversation_search, Permission.READ_CONVERSATIONS)),
            Route("/conversations/view", get(self.conversation_page, Permission.READ_CONVERSATIONS)),
            Route("/conversations/export", get(self.export, Permission.READ_CONVERSATIONS)),
            Route("/quarantine", get(self.quarantine, Permission.READ_QUARANTINE)),
            Route("/users", get(self.users, Permission.MANAGE_USERS)),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ])
        self.app.add_middleware(_Headers)

    def close(self) -> None:
        self.alerts.close()
        self.archive.close()
        self.access.close()

    # --- plumbing ---------------------------------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def render(self, request: Request, template: str, session: Session | None, status: int = 200,
               **context: Any) -> HTMLResponse:
        html = self.templates.get_template(template).render(request=request, session=session, user=session,
                                                            can=_can(session), **context)
        return HTMLResponse(html, status_code=status)

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(COOKIE, session.token, path="/", secure=True, httponly=True,
                            samesite="strict")

    def page(self, handler: Callable[[Request, Session], Response], permission: Permission):
        """A page: the login page for a visitor without a session, 403 without `permission`; the handler runs in
        a worker thread (its queries and rendering are blocking calls)."""
        async def endpoint(request: Request) -> Response:
            session = self.session(request)
            if session is None or not session.user:
                return RedirectResponse("/login", status_code=303)
            if not _can(session)(permission):
                self.access.write("console_denied", session.user, _address(request), "failure",
                                  path=request.url.path, permission=permission.value)
                return self.render(request, "error.html", session, 403,
                                   message=f"Your role ({session.role.value}) may not {permission.value}.")
            return await run_in_threadpool(self._refreshed, handler, request, session)
        return endpoint

    def _refreshed(self, handler: Callable[[Request, Session], Response], request: Request,
                   session: Session) -> Response:
        self.alerts.refresh()
        return handler(request, session)

    def post(self, handler: Callable[..., Awaitable[Response]], permission: Permission | None = None):
        """A form handler: refused (403) unless the form carries its session's CSRF token."""
        async def endpoint(request: Request) -> Response:
            session = self.session(request)
            form = await request.form()
            token = form.get("csrf")
            if not csrf_ok(session, token if isinstance(token, str) else None):
                self.access.write("console_csrf_refused", session.user if session else "", _address(request),
                                  "failure", path=request.url.path)
                return PlainTextResponse("refused: this form has no valid CSRF token (reload the page)",
                                         status_code=403)
            if permission is not None and not (session.user and _can(session)(permission)):
                return RedirectResponse("/login", status_code=303)
            return await handler(request, session, form)
        return endpoint

    # --- login ------------------------------------------------------------------------------------

    async def login_form(self, request: Request, message: str = "", status: int = 200) -> Response:
        session = self.session(request)
        if session is None:
            session = self.sessions.new()
        response = self.render(request, "login.html", None, status, csrf=session.csrf, message=message)
        self._set_cookie(response, session)
        return response

    async def login(self, request: Request, session: Session, form) -> Response:
        name, password = str(form.get("name", ""))[:64], str(form.get("password", ""))[:1024]
        address = _address(request)
        wait = max(self.throttle_names.wait(name), self.throttle_addresses.wait(address))
        if wait > 0:
            self.access.write("console_login", name, address, "failure", reason="throttled")
            return await self.login_form(request, f"Too many failed logins: try again in {int(wait) + 1} s.", 429)
        user = await run_in_threadpool(self.accounts.verify, name, password)     # Argon2: ~50 ms of CPU
        if user is None:
            self.throttle_names.failed(name)
            self.throttle_addresses.failed(address)
            self.access.write("console_login", name, address, "failure", reason="wrong name or password")
            return await self.login_form(request, "Wrong name or password.", 401)
        self.throttle_names.succeeded(name)
        self.sessions.end(session.token)
        fresh = self.sessions.new(user.name, user.role)
        self.access.write("console_login", user.name, address, role=user.role.value)
        response = RedirectResponse("/", status_code=303)
        self._set_cookie(response, fresh)
        return response

    async def logout(self, request: Request, session: Session, form) -> Response:
        self.sessions.end(session.token)
        self.access.write("console_logout", session.user, _address(request))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", secure=True, httponly=True,
                               samesite="strict")
        return response

    # --- pages ------------------------------------------------------------------------------------

    def overview(self, request: Request, session: Session) -> Response:
        days = _int(request.query_params.get("days"), 7, 1, 3650)
        now = datetime.now(UTC).replace(tzinfo=None, minute=0, second=0, microsecond=0)
        if days <= 7:
            end, step, fmt, unit, count = now, timedelta(hours=1), "%Y-%m-%dT%H", "hour", days * 24
        else:
            end, step, fmt, unit, count = now.replace(hour=0), timedelta(days=1), "%Y-%m-%d", "day", days
        start = end - step * (count - 1)
        o = self.alerts.overview(start.strftime(fmt), bucket=len(start.strftime(fmt)))
        svg = chart.bar_chart(chart.buckets_filled(o.over_time, start, end, step, fmt),
                              f"Alerts per {unit}, last {days} days (UTC)")
        return self.render(request, "overview.html", session, o=o, chart=svg, days=days)

    def alert_list(self, request: Request, session: Session) -> Response:
        q = request.query_params
        f = data.AlertFilter(since=_time(q.get("since")), until=_time(q.get("until")),
                             severity=q.get("severity", "") if q.get("severity") in data.SEVERITIES else "",
                             rule=q.get("rule", "")[:200], protocol=q.get("protocol", "")[:50],
                             direction=q.get("direction", "")[:20], person=q.get("person", "").strip()[:300],
                             sha256=q.get("sha256", "").strip() if SHA256_RE.match(q.get("sha256", "").strip())
                             else "", page=_int(q.get("page"), 1, 1, 100_000))
        result = self.alerts.alerts(f)
        if any((f.person, f.sha256, f.rule)):
            self.access.write("console_alert_search", session.user, _address(request), filter=_nonempty(f))
        return self.render(request, "alerts.html", session, f=f, result=result, choices=self.alerts.choices(),
                           severities=data.SEVERITIES, prev_url=_page_url(request, result.page - 1),
                           next_url=_page_url(request, result.page + 1))

    def alert_page(self, request: Request, session: Session) -> Response:
        event_id = request.path_params["event_id"]
        event = self.alerts.alert(event_id)
        if event is None:
            return self.render(request, "error.html", session, 404, message="No such alert.")
        self.access.write("console_view_alert", session.user, _address(request), alert=event_id)
        context = _get(event, "imguard", "context") or {}
        decision = _get(event, "imguard", "decision") or {}
        recipients = context.get("recipients") or []
        conversation_url = ""
        if context.get("sender") and (recipients or context.get("conversation")):
            params = {"protocol": context.get("protocol", ""), "a": data.bare(context["sender"]),
                      "b": data.bare(recipients[0]) if recipients else "", "room": context.get("conversation", ""),
                      "around": str(event.get("@timestamp", ""))}
            conversation_url = "/conversations/view?" + urlencode({k: v for k, v in params.items() if v})
        report = _get(event, "imguard", "report") or {}
        return self.render(request, "alert.html", session, e=event, context=context, decision=decision,
                           report=report, file=event.get("file") or {}, rule=event.get("rule") or {},
                           conversation_url=conversation_url,
                           members=list(_members(report.get("members") or [], 0)))

    def _record_query(self, request: Request) -> data.RecordQuery:
        q = request.query_params
        return data.RecordQuery(person=q.get("person", "").strip()[:300], text=q.get("text", "")[:300],
                                since=_time(q.get("since")), until=_time(q.get("until")),
                                protocol=q.get("protocol", "")[:50],
                                sha256=q.get("sha256", "").strip() if SHA256_RE.match(q.get("sha256", "").strip())
                                else "", page=_int(q.get("page"), 1, 1, 100_000))

    def conversation_search(self, request: Request, session: Session) -> Response:
        query = self._record_query(request)
        searched = any((query.person, query.text, query.since, query.until, query.protocol, query.sha256))
        records = self.archive.search(query) if searched else []
        if searched:
            self.access.write("console_archive_search", session.user, _address(request), query=_nonempty(query))
        has_next = len(records) > query.per_page
        records = records[:query.per_page]
        for record in records:
            record["conversation_url"] = _conversation_url(record)
        export = urlencode({k: v for k, v in request.query_params.items() if k != "page"})
        return self.render(request, "conversations.html", session, q=query, records=records, searched=searched,
                           export_query=export, prev_url=_page_url(request, query.page - 1),
                           next_url=_page_url(request, query.page + 1) if has_next else "")

    def conversation_page(self, request: Request, session: Session) -> Response:
        q = request.query_params
        protocol, a, b, room = (q.get("protocol", "")[:50], q.get("a", "")[:300], q.get("b", "")[:300],
                                q.get("room", "")[:300])
        around = _time(q.get("around"))
        since = _shift(around, hours=-24) if around else ""
        if not (room or (a and b)):
            return self.render(request, "error.html", session, 400, message="A conversation needs two people or "
                                                                           "a room.")
        records = self.archive.conversation(protocol, a, b, room, since)
        self.access.write("console_view_conversation", session.user, _address(request), protocol=protocol,
                          people=[a, b] if not room else [], room=room, around=around)
        rows = data.merge_sides(records)
        return self.render(request, "conversation.html", session, rows=rows, a=a, b=b, room=room,
                           protocol=protocol, around=around)

    def export(self, request: Request, session: Session) -> Response:
        query = self._record_query(request)
        limit = self.settings.console_export_max_records
        query.page, query.per_page = 1, limit
        fmt = "csv" if request.query_params.get("format") == "csv" else "jsonl"
        records = self.archive.search(query)[:limit]
        self.access.write("console_export", session.user, _address(request), format=fmt, records=len(records),
                          query=_nonempty(query))
        body = archive.to_csv(records) if fmt == "csv" else archive.to_jsonl(records)
        media = "text/csv" if fmt == "csv" else "application/x-ndjson"
        return Response(body, media_type=f"{media}; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="imguard-archive.{fmt}"'})

    def quarantine(self, request: Request, session: Session) -> Response:
        entries = data.quarantine_entries(self.data_dir)
        self.access.write("console_view_quarantine", session.user, _address(request))
        return self.render(request, "quarantine.html", session, entries=entries)

    def users(self, request: Request, session: Session) -> Response:
        return self.render(request, "users.html", session, users=self.accounts.users())


class _Headers:
    """Security headers on every response (ASGI middleware)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present]
                message = {**message, "headers": headers}
            await send(message)
        await self.app(scope, receive, send_with_headers)


def _can(session: Session | None) -> Callable[[Permission], bool]:
    from imguard.console.accounts import ROLE_PERMISSIONS

    def can(permission: Permission) -> bool:
        return bool(session and session.user and session.role and permission in ROLE_PERMISSIONS[session.role])
    return can


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def _get(event: dict, *path: str) -> Any:
    for key in path:
        if not isinstance(event, dict):
            return None
        event = event.get(key)
    return event


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        return min(high, max(low, int(value or default)))
    except ValueError:
        return default


def _time(value: str | None) -> str:
    """A time from a form (`datetime-local` gives 2026-12-06T05:13), taken as UTC; '' when it is not one."""
    value = (value or "").strip().replace(" ", "T").removesuffix("Z")
    return value if TIME_RE.match(value) else ""


def _shift(value: str, hours: int) -> str:
    try:
        when = datetime.fromisoformat(value[:19])
    except ValueError:
        return ""
    return (when + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S")


def _nonempty(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if v and k not in ("page", "per_page")}


def _page_url(request: Request, page: int) -> str:
    if page < 1:
        return ""
    params = dict(request.query_params)
    params["page"] = str(page)
    return f"{request.url.path}?{urlencode(params)}"


def _conversation_url(record: dict[str, Any]) -> str:
    recipients = (record.get("recipients") or "").split()
    params = {"protocol": record.get("protocol") or "", "a": data.bare(record.get("sender") or ""),
              "b": data.bare(recipients[0]) if recipients else "", "room": record.get("conversation") or "",
              "around": record.get("time") or ""}
    return "/conversations/view?" + urlencode({k: v for k, v in params.items() if v})


def _members(members: list[dict], depth: int):
    """An archive's tree, flattened with depth for indentation."""
    for member in members:
        if isinstance(member, dict):
            yield depth, member
            yield from _members(member.get("members") or [], depth + 1)
