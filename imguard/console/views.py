"""The console's pages: Starlette routes rendering Jinja2 templates (autoescape on for every template).

Every page asks for a `Permission`; a POST is served only with its session's CSRF token (`post`). Reading an
alert, a conversation, a search or an export is written to the access log with who and what; so is every
quarantine download and every step of a release (release.py), which also go to the quarantine's ledger.
Two pages need no account: the blocked person's release request (`/release`, the page a notice names) and
the receiver's one-time download (`/released/{token}`, the token being the credential); their forms carry an
anonymous session's CSRF token as the login form does."""

from __future__ import annotations

import dataclasses
import re
import threading
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
from imguard.console import chart, data, health, release, review
from imguard.console.accounts import Accounts, Permission, Throttle
from imguard.console.cli import ConsoleSettings
from imguard.console.web import COOKIE, SECURITY_HEADERS, AccessLog, Session, Sessions, chat_text, csrf_ok

HERE = Path(__file__).parent
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\d(T\d\d(:\d\d(:\d\d(\.\d+)?)?)?)?$")


class Console:
    """The application and what its pages share."""

    def __init__(self, data_dir: Path, settings: ConsoleSettings | None = None, archive_dsn: str = "",
                 clock: Callable[[], float] = time.monotonic, rules: Path | None = None,
                 signatures: Path | None = None):
        from imguard.runtime import BUNDLED_RULES, BUNDLED_SIGNATURES

        self.data_dir = Path(data_dir)
        self.rules_dir, self.signatures_dir = Path(rules or BUNDLED_RULES), Path(signatures or BUNDLED_SIGNATURES)
        self._playground: Any = None          # the playground's pipeline, built on first use (signatures compile)
        self._playground_lock = threading.Lock()
        self._quarantine: Any = None
        self.settings = settings = settings or ConsoleSettings()
        folder = self.data_dir / "console"
        self.accounts = Accounts(folder / "users.json")
        self.alerts = data.AlertIndex(self.data_dir, folder / "alerts-index.sqlite3")
        self.archive = data.ArchiveReader(self.data_dir / "archive.sqlite3", archive_dsn)
        self.archive.start_indexing()       # the search index of a SQLite archive, made and kept by a thread
        self.access = AccessLog(folder / "access.jsonl")
        self.review = review.ReviewQueue(folder / "review.jsonl", settings.console_review_sample_percent,
                                         settings.console_review_sample_seed, settings.console_review_sample_days)
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
            Route("/quarantine/{sha256}", get(self.quarantine_item, Permission.READ_QUARANTINE)),
            Route("/quarantine/{sha256}/zip", get(self.quarantine_zip, Permission.DOWNLOAD_QUARANTINE)),
            Route("/quarantine/requests/{request_id:int}/approve",
                  post(self.release_approve, Permission.DECIDE_RELEASE), methods=["POST"]),
            Route("/quarantine/requests/{request_id:int}/refuse",
                  post(self.release_refuse, Permission.DECIDE_RELEASE), methods=["POST"]),
            Route("/release", self.release_form, methods=["GET"]),
            Route("/release", post(self.release_ask), methods=["POST"]),
            Route("/released/{token}", self.released_form, methods=["GET"]),
            Route("/released/{token}", post(self.released_download), methods=["POST"]),
            Route("/playground", get(self.playground_form, Permission.USE_PLAYGROUND)),
            Route("/playground", post(self.playground, Permission.USE_PLAYGROUND,
                                      max_bytes=settings.console_playground_max_bytes + 65536), methods=["POST"]),
            Route("/review", get(self.review_list, Permission.REVIEW)),
            Route("/review/export", get(self.review_export, Permission.REVIEW)),
            Route("/review/sample", post(self.review_sample, Permission.MANAGE_SUPERVISION), methods=["POST"]),
            Route("/review/{item:int}", get(self.review_item, Permission.REVIEW)),
            Route("/review/{item:int}", post(self.review_dispose, Permission.REVIEW), methods=["POST"]),
            Route("/retrohunt", get(self.retrohunt, Permission.READ_ALERTS)),
            Route("/users", get(self.users, Permission.MANAGE_USERS)),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ])
        self.app.add_middleware(_Headers)

    def close(self) -> None:
        self.alerts.close()
        self.archive.close()
        self.access.close()
        self.review.close()

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

    def post(self, handler: Callable[..., Awaitable[Response]], permission: Permission | None = None,
             max_bytes: int = 1 << 20):
        """A form handler: refused (403) unless the form carries its session's CSRF token; a body larger than
        `max_bytes` is refused (413) before it is read, by its Content-Length, which a form must have (browsers
        always send it; HTTP/1.1 framing holds the body to it), so no upload is spooled without a bound."""
        async def endpoint(request: Request) -> Response:
            session = self.session(request)
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return PlainTextResponse("refused: a form needs a Content-Length", status_code=411)
            if int(length) > max_bytes:
                return PlainTextResponse("refused: the form is too large", status_code=413)
            form = await request.form(max_part_size=max_bytes)
            token = form.get("csrf")
            if not csrf_ok(session, token if isinstance(token, str) else None):
                self.access.write("console_csrf_refused", session.user if session else "", _address(request),
                                  "failure", path=request.url.path)
                return PlainTextResponse("refused: this form has no valid CSRF token (reload the page)",
                                         status_code=403)
            if permission is not None and not session.user:
                return RedirectResponse("/login", status_code=303)
            if permission is not None and not _can(session)(permission):
                self.access.write("console_denied", session.user, _address(request), "failure",
                                  path=request.url.path, permission=permission.value)
                return self.render(request, "error.html", session, 403,
                                   message=f"Your role ({session.role.value}) may not {permission.value}.")
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
        return self.render(request, "overview.html", session, o=o, chart=svg, days=days,
                           gateways=health.gateways(self.data_dir), sinks=health.sinks(self.data_dir),
                           now=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def alert_list(self, request: Request, session: Session) -> Response:
        q = request.query_params
        f = data.AlertFilter(since=_time(q.get("since")), until=_time(q.get("until")),
                             severity=q.get("severity", "") if q.get("severity") in data.SEVERITIES else "",
                             rule=q.get("rule", "")[:200], protocol=q.get("protocol", "")[:50],
                             direction=q.get("direction", "")[:20], person=q.get("person", "").strip()[:300],
                             sha256=q.get("sha256", "").strip() if SHA256_RE.match(q.get("sha256", "").strip())
                             else "", page=_int(q.get("page"), 1, 1, 100_000),
                             before=_cursor(q.get("before")), after=_cursor(q.get("after")))
        result = self.alerts.alerts(f)
        if any((f.person, f.sha256, f.rule)):
            self.access.write("console_alert_search", session.user, _address(request), filter=_nonempty(f))
        # pages follow each other by cursor (keyset): page 5,000 of a rule costs what its first page does
        return self.render(request, "alerts.html", session, f=f, result=result, choices=self.alerts.choices(),
                           severities=data.SEVERITIES,
                           prev_url=_page_url(request, max(1, result.page - 1), after=result.newer)
                           if result.newer else "",
                           next_url=_page_url(request, result.page + 1, before=result.older))

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
                                else "", page=_int(q.get("page"), 1, 1, 100_000),
                                before=_cursor(q.get("before")), after=_cursor(q.get("after")))

    def conversation_search(self, request: Request, session: Session) -> Response:
        """A search's pages follow each other by cursor (keyset: the (time, id) of the last or first row shown), so
        page 50 costs what page 1 does; `page` is only shown (or, without a cursor, the OFFSET of an old link)."""
        query = self._record_query(request)
        searched = any((query.person, query.text, query.since, query.until, query.protocol, query.sha256))
        result = self.archive.search_page(query) if searched else data.RecordPage([], None, None)
        if searched:
            self.access.write("console_archive_search", session.user, _address(request), query=_nonempty(query))
        for record in result.rows:
            record["conversation_url"] = _conversation_url(record)
        export = urlencode({k: v for k, v in request.query_params.items() if k not in ("page", "before", "after")})
        return self.render(request, "conversations.html", session, q=query, records=result.rows, searched=searched,
                           export_query=export, index=self.archive.index_progress() if searched else None,
                           prev_url=_page_url(request, max(1, query.page - 1), after=result.newer)
                           if result.newer else "",
                           next_url=_page_url(request, query.page + 1, before=result.older) if result.older else "")

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
        query.page, query.per_page, query.before, query.after = 1, limit, None, None
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
        releases = self.releases()
        pending = [r for r in releases.requests() if r.state in release.OPEN] if releases else []
        return self.render(request, "quarantine.html", session, entries=entries, pending=pending)

    # --- quarantine: the analysis download and the release workflow -----------------------------------

    def releases(self) -> release.Releases | None:
        """The release workflow on DATA_DIR/quarantine (None while the gateway has quarantined nothing)."""
        if self._quarantine is None:
            from imguard.quarantine import QuarantineStore
            from imguard.releases import Outbox
            if not (self.data_dir / "quarantine").is_dir():
                return None
            self._quarantine = release.Releases(QuarantineStore(self.data_dir / "quarantine"),
                                                self.settings.console_release_link_hours * 3600,
                                                outbox=Outbox(self.data_dir / "releases"))
        return self._quarantine

    def quarantine_item(self, request: Request, session: Session, token: str = "", problem: str = "",
                        status: int = 200, released: release.Request | None = None) -> Response:
        sha256 = request.path_params["sha256"].lower()
        releases = self.releases()
        sidecar = releases.store.show(sha256) if releases and SHA256_RE.match(sha256) else None
        if sidecar is None:
            return self.render(request, "error.html", session, 404, message="No such file in the quarantine.")
        self.access.write("console_view_quarantine", session.user, _address(request), sha256=sha256)
        return self.render(request, "quarantine_item.html", session, status, sha256=sha256, sidecar=sidecar,
                           report=sidecar.get("report") or {}, sightings=sidecar.get("sightings") or [],
                           malware=release.is_malware(sidecar), requests=releases.requests(sha256),
                           four_eyes=release.FOUR_EYES, new_link=token, released=released, problem=problem,
                           State=release.State,
                           members=list(_members((sidecar.get("report") or {}).get("members") or [], 0)))

    def quarantine_zip(self, request: Request, session: Session) -> Response:
        """The file for analysis: only inside a zip encrypted with AES-256 under the password `infected`."""
        sha256 = request.path_params["sha256"].lower()
        releases = self.releases()
        try:
            content = releases.store.read(sha256) if releases and SHA256_RE.match(sha256) else None
        except FileNotFoundError:
            content = None
        if content is None:
            return self.render(request, "error.html", session, 404, message="No such file in the quarantine.")
        body = release.analysis_zip(content, sha256)
        self.access.write("console_download_quarantine", session.user, _address(request), sha256=sha256,
                          size=len(content), container="zip", encryption="aes-256", zip_sha256=_sha256(body))
        return Response(body, media_type="application/zip",
                        headers={"content-disposition": f'attachment; filename="{sha256}.zip"'})

    async def release_approve(self, request: Request, session: Session, form) -> Response:
        return await run_in_threadpool(self._decide, request, session, form, True)

    async def release_refuse(self, request: Request, session: Session, form) -> Response:
        return await run_in_threadpool(self._decide, request, session, form, False)

    def _decide(self, request: Request, session: Session, form, approve: bool) -> Response:
        request_id = request.path_params["request_id"]
        releases = self.releases()
        found = releases.get(request_id) if releases else None
        if found is None:
            return self.render(request, "error.html", session, 404, message="No such release request.")
        request.path_params["sha256"] = found.sha256
        reason = str(form.get("reason", ""))[:2000]
        token = ""
        try:
            if approve:
                decided, token = releases.approve(request_id, session.user, reason,
                                                  self.settings.console_public_url or str(request.base_url))
            else:
                decided = releases.refuse(request_id, session.user, reason)
        except release.ReleaseError as e:
            self.access.write("console_release_approve" if approve else "console_release_refuse", session.user,
                              _address(request), "failure", sha256=found.sha256, request=request_id, reason=str(e))
            return self.quarantine_item(request, session, problem=str(e), status=409)
        self.access.write("console_release_approve" if approve else "console_release_refuse", session.user,
                          _address(request), sha256=found.sha256, request=request_id, reason=reason,
                          state=decided.state.value)
        if token:
            self.access.write("console_release", session.user, _address(request), sha256=found.sha256,
                              request=request_id, receivers=decided.receivers, expires=decided.expires,
                              approvers=[a for a, _, _ in decided.approvals])
        # The link is shown on this answer only: the ledger keeps its hash, nothing keeps the link.
        return self.quarantine_item(request, session, token=token, released=decided)

    async def release_form(self, request: Request, message: str = "", status: int = 200,
                           done: bool = False) -> Response:
        """The page a notice names: the blocked person asks for their file (no console account)."""
        session = self.session(request) or self.sessions.new()
        sha256 = request.query_params.get("sha256", "").strip().lower()
        response = self.render(request, "release_request.html", None, status, csrf=session.csrf,
                               sha256=sha256 if SHA256_RE.match(sha256) else "", message=message, done=done)
        self._set_cookie(response, session)
        return response

    async def release_ask(self, request: Request, session: Session, form) -> Response:
        sha256 = str(form.get("sha256", "")).strip().lower()[:64]
        requester = str(form.get("requester", ""))[:300]
        why = str(form.get("why", ""))[:2000]
        releases = self.releases()
        try:
            if releases is None or not SHA256_RE.match(sha256):
                raise release.ReleaseError("no such file was blocked for you")
            asked = await run_in_threadpool(releases.ask, sha256, requester, why)
        except release.ReleaseError as e:
            self.access.write("console_release_request", requester, _address(request), "failure", sha256=sha256,
                              reason=str(e))
            return await self.release_form(request, str(e), 400)
        self.access.write("console_release_request", asked.requester, _address(request), sha256=sha256,
                          request=asked.id, malware=asked.malware, why=why)
        return await self.release_form(request, f"Your request (number {asked.id}) is recorded: an analyst will "
                                                f"decide. {'Two analysts must approve it.' if asked.malware else ''}",
                                       done=True)

    async def released_form(self, request: Request) -> Response:
        """The receiver's one-time link: a page with a button (a link preview that fetches it spends nothing)."""
        session = self.session(request) or self.sessions.new()
        response = self.render(request, "released.html", None, csrf=session.csrf,
                               token=request.path_params["token"][:100])
        self._set_cookie(response, session)
        return response

    async def released_download(self, request: Request, session: Session, form) -> Response:
        token = request.path_params["token"][:100]
        releases = self.releases()
        address = _address(request)
        redeemed = await run_in_threadpool(releases.redeem, token, f"link holder at {address}") if releases \
            else None
        if redeemed is None:
            self.access.write("console_release_download", "", address, "failure", link=release.link_hash(token))
            return self.render(request, "error.html", None, 410, message="This link is unknown, used or expired.")
        done, content = redeemed
        self.access.write("console_release_download", "", address, sha256=done.sha256, request=done.id,
                          receivers=done.receivers, size=len(content))
        name = _safe_name(_released_name(releases, done.sha256))
        return Response(content, media_type="application/octet-stream",
                        headers={"content-disposition": f'attachment; filename="{name}"'})

    # --- the rule playground ------------------------------------------------------------------------

    def playground_form(self, request: Request, session: Session, **context: Any) -> Response:
        return self.render(request, "playground.html", session, protocols=PLAYGROUND_PROTOCOLS,
                           directions=("", "inbound", "outbound", "internal"),
                           values=context.pop("values", {}), **context)

    async def playground(self, request: Request, session: Session, form) -> Response:
        values = {k: str(form.get(k, ""))[:2000] for k in ("text", "protocol", "direction", "sender", "recipient",
                                                            "room")}
        upload = form.get("file")
        content, name = b"", ""
        if upload is not None and not isinstance(upload, str) and upload.filename:
            limit = self.settings.console_playground_max_bytes
            content = await upload.read(limit + 1)
            name = upload.filename[:300]
            if len(content) > limit:
                return await run_in_threadpool(self.playground_form, request, session, values=values,
                                               problem=f"The file is larger than {limit} bytes "
                                                       "(console_playground_max_bytes).")
        return await run_in_threadpool(self._playground_decide, request, session, values, content, name)

    def _playground_decide(self, request: Request, session: Session, values: dict[str, str], content: bytes,
                           name: str) -> Response:
        from imguard.cli import _format_report
        from imguard.model import ChatContext
        from imguard.policy import explain

        if values["direction"] not in ("", "inbound", "outbound", "internal"):
            values["direction"] = ""
        if not content and not name and not values["text"]:
            return self.playground_form(request, session, values=values, problem="Paste a message or choose a file.")
        try:
            pipeline = self.playground_pipeline()
        except Exception as e:          # a broken rules or signatures folder: say so on the page
            return self.playground_form(request, session, values=values, problem=f"The rules do not load: {e}")
        ctx = ChatContext(protocol=values["protocol"][:50], direction=values["direction"],
                          sender=values["sender"].strip(),
                          recipients=tuple(r for r in values["recipient"].split() if r)[:20],
                          conversation=values["room"].strip())
        if content or name:
            report, decision = pipeline.check_file(content, ctx, name=name)
            shown = _format_report(Path(name or "(file)"), report, decision, explain=True)
            kind, facts = "file", {"sha256": report.sha256, "size": report.size}
        else:
            decision = pipeline.policy.decide_message(values["text"], pipeline.with_direction(ctx))
            shown = explain(decision)
            kind, facts = "message", {"text_length": len(values["text"])}
        self.access.write("console_playground", session.user, _address(request), kind=kind,
                          protocol=ctx.protocol, direction=ctx.direction, decision=decision.action,
                          rules=decision.rule_ids, **facts)
        return self.playground_form(request, session, values=values, decision=decision, shown=shown, kind=kind,
                                    rules_dir=str(self.rules_dir))

    def playground_pipeline(self) -> Any:
        """The pipeline `imguard scan` builds (the same inspection and policy), writing nothing: no alerts, archive
        or quarantine; its compiled-signature cache goes to DATA_DIR/console/playground."""
        with self._playground_lock:
            if self._playground is None:
                from imguard.inspect import InspectLimits
                from imguard.runtime import build_pipeline

                self._playground = build_pipeline(
                    self.rules_dir, self.signatures_dir, self.data_dir / "console" / "playground",
                    limits=dataclasses.replace(InspectLimits(), zip_password_wait=0.0), write_alerts=False)
            return self._playground

    # --- supervision: the review queue (review.py) ---------------------------------------------------

    def review_list(self, request: Request, session: Session, problem: str = "", status: int = 200) -> Response:
        self.review.take_flagged(self.alerts)
        self.review.catch_up(self.archive)
        state = request.query_params.get("state", "open")
        state = state if state in ("open", "all", *(s.value for s in review.State)) else "open"
        items = self.review.list(state)
        self.access.write("console_view_review", session.user, _address(request), state=state, items=len(items))
        return self.render(request, "review.html", session, status, items=items, state=state,
                           states=("open", "all", *(s.value for s in review.State)), problem=problem,
                           percent=self.review.percent, sampled=sorted(self.review.sampled.values(),
                                                                       key=lambda s: s["day"], reverse=True)[:10],
                           today=datetime.now(UTC).date().isoformat(), trail_problems=self.review.trail.problems,
                           urls={i.id: _review_conversation_url(i) for i in items})

    def review_item(self, request: Request, session: Session, problem: str = "", status: int = 200) -> Response:
        self.review.take_flagged(self.alerts)
        item = self.review.items.get(request.path_params["item"])
        if item is None:
            return self.render(request, "error.html", session, 404, message="No such item in the review queue.")
        self.access.write("console_view_review", session.user, _address(request), item=item.id)
        choices = [d for d in review.Disposition if (item.state, d) in review.TRANSITIONS]
        return self.render(request, "review_item.html", session, status, item=item, choices=choices,
                           problem=problem, conversation_url=_review_conversation_url(item), State=review.State)

    async def review_dispose(self, request: Request, session: Session, form) -> Response:
        return await run_in_threadpool(self._dispose, request, session, form)

    def _dispose(self, request: Request, session: Session, form) -> Response:
        item_id = request.path_params["item"]
        disposition, comment = str(form.get("disposition", ""))[:40], str(form.get("comment", ""))
        try:
            item = self.review.dispose(item_id, session.user, disposition, comment)
        except review.ReviewError as e:
            self.access.write("console_review", session.user, _address(request), "failure", item=item_id,
                              disposition=disposition, reason=str(e))
            return self.review_item(request, session, problem=str(e), status=409)
        self.access.write("console_review", session.user, _address(request), item=item_id,
                          disposition=disposition, state=item.state.value, alert=item.alert,
                          source=item.source.value)
        return RedirectResponse(f"/review/{item_id}", status_code=303)

    async def review_sample(self, request: Request, session: Session, form) -> Response:
        day = str(form.get("day", "")).strip()[:10]
        return await run_in_threadpool(self._sample, request, session, day)

    def _sample(self, request: Request, session: Session, day: str) -> Response:
        if self.review.percent <= 0:
            problem = "Sampling is off: the console runs with console_review_sample_percent 0."
        else:
            try:
                line = self.review.sample_day(self.archive, day, actor=session.user)
            except ValueError:
                line, problem = None, f"{day!r} is not a day (YYYY-MM-DD)."
            else:
                problem = "" if line else f"The sample of {day} was drawn already (a day is drawn once)."
            if line:
                self.access.write("console_review_sample", session.user, _address(request), day=day,
                                  percent=line["percent"], population=line["population"], drawn=line["drawn"])
        if problem:
            self.access.write("console_review_sample", session.user, _address(request), "failure", day=day,
                              reason=problem)
            return self.review_list(request, session, problem=problem, status=409)
        return RedirectResponse("/review", status_code=303)

    def review_export(self, request: Request, session: Session) -> Response:
        self.review.take_flagged(self.alerts)
        fmt = "csv" if request.query_params.get("format") == "csv" else "jsonl"
        rows = self.review.export_rows()
        self.access.write("console_review_export", session.user, _address(request), format=fmt, items=len(rows))
        body = archive.to_csv(rows, review.EXPORT_COLUMNS) if fmt == "csv" else archive.to_jsonl(rows)
        media = "text/csv" if fmt == "csv" else "application/x-ndjson"
        return Response(body, media_type=f"{media}; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="imguard-review.{fmt}"'})

    # --- retro-hunt results ------------------------------------------------------------------------------

    def retrohunt(self, request: Request, session: Session) -> Response:
        hunts = []
        for event in self.alerts.by_action("retrohunt"):
            found = _get(event, "imguard", "retrohunt") or {}
            hunts.append({"id": _get(event, "event", "id"), "time": event.get("@timestamp", ""),
                          "file": event.get("file") or {}, "rules": found.get("rules") or _as_list(
                              _get(event, "rule", "id")),
                          "yara": found.get("yara_rules") or [], "senders": found.get("senders") or [],
                          "recipients": found.get("recipients") or [], "count": found.get("sightings_count", 0),
                          "first": found.get("first_seen", ""), "last": found.get("last_seen", ""),
                          "previous": found.get("previous_actions") or [],
                          "signatures": found.get("signatures_version", "")})
        self.access.write("console_view_retrohunt", session.user, _address(request), alerts=len(hunts))
        return self.render(request, "retrohunt.html", session, hunts=hunts)

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


def _as_list(value: Any) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _review_conversation_url(item: review.Item) -> str:
    """The conversation of a review item: its room or its two people, around the item's time (a sample: the end
    of its day)."""
    around = f"{item.sample_day}T23:59:59" if item.sample_day else item.time
    params = {"protocol": item.protocol, "a": data.bare(item.sender),
              "b": data.bare(item.recipients[0]) if item.recipients else "", "room": item.room,
              "around": around[:19]}
    if not (item.room or (params["a"] and params["b"])):
        return ""
    return "/conversations/view?" + urlencode({k: v for k, v in params.items() if v})


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
    return {k: v for k, v in vars(obj).items() if v and k not in ("page", "per_page", "before", "after")}


def _page_url(request: Request, page: int, before: data.Cursor | None = None,
              after: data.Cursor | None = None) -> str:
    """The link to page `page`; with a cursor, the page of the records older (`before`) or newer (`after`) than
    that record (keyset pagination: the alert list, the archive search)."""
    if page < 1:
        return ""
    params = {k: v for k, v in request.query_params.items() if k not in ("before", "after")}
    params["page"] = str(page)
    for name, cursor in (("before", before), ("after", after)):
        if cursor:
            params[name] = f"{cursor[0]},{cursor[1]}"
    return f"{request.url.path}?{urlencode(params)}"


def _cursor(value: str | None) -> data.Cursor | None:
    """A page cursor from a link: 'TIME,ID' (a record's time and id); None for anything else."""
    when, _, ident = (value or "")[:100].rpartition(",")
    return (when, int(ident)) if when and ident.isdigit() and len(ident) < 19 else None


def _conversation_url(record: dict[str, Any]) -> str:
    recipients = (record.get("recipients") or "").split()
    params = {"protocol": record.get("protocol") or "", "a": data.bare(record.get("sender") or ""),
              "b": data.bare(recipients[0]) if recipients else "", "room": record.get("conversation") or "",
              "around": record.get("time") or ""}
    return "/conversations/view?" + urlencode({k: v for k, v in params.items() if v})


PLAYGROUND_PROTOCOLS = ("xmpp", "irc", "sip", "msrp", "http", "oscar", "msnp", "ymsg", "sametime", "")


def _sha256(body: bytes) -> str:
    import hashlib
    return hashlib.sha256(body).hexdigest()


def _released_name(releases: release.Releases, sha256: str) -> str:
    sidecar = releases.store.show(sha256) or {}
    return str((sidecar.get("report") or {}).get("name") or sha256)


def _safe_name(name: str) -> str:
    """A file name for a Content-Disposition header: printable ASCII without quotes, slashes or controls (the
    name came from the wire)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:100]
    return cleaned or "file"


def _members(members: list[dict], depth: int):
    """An archive's tree, flattened with depth for indentation."""
    for member in members:
        if isinstance(member, dict):
            yield depth, member
            yield from _members(member.get("members") or [], depth + 1)
