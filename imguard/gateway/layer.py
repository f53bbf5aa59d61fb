"""The mitmproxy layer that carries a StreamSession (imguard.protocols.base): the proxy adapter.

Events in, session calls, commands out:

    DataReceived(client, b"<message ...")  ->  session.data_received(True, ...)  ->  [Send(to_client=False, ...)]
                                                                                ->  SendData(server, ...)

Each session command becomes mitmproxy commands, in order:
- Send        -> SendData on the client or the server connection;
- StartTls    -> the sends before it are already written in plaintext; then ServerTLSLayer -> ClientTLSLayer
                 -> a new SessionLayer(tls=True) are pushed as children, every later event goes to them, and
                 session.tls_started() is called when both handshakes are done (the child's Start event);
- InspectFile -> an InspectFileHook: the gateway addon runs Pipeline.check_file in a worker thread; the hook
                 pauses this layer only (other connections keep flowing), then session.file_verdict(...);
                 a file whose "being scanned" notices are for this connection's user (in-band: IBB, MSNSLP,
                 Sametime) gets a RequestWakeup after scan_notice_after_seconds: still paused then, those are
                 told at once (session.notice), though the layer waits; after the verdict, never;
- Record      -> carrier.record(event): Pipeline.record, inline;
- a fact (Anomaly, ProtocolEvent, Link, MessageDecision) -> the same, with its event built here;
- Notify      -> carrier.notify_command(cmd): recorded, and delivered on the connection it names;
- Wake        -> carrier.wake_command(cmd): a WakeInjected event on that connection (this one by default) after
                 cmd.after seconds, which becomes session.wake() (a warning's window on an idle connection);
- Close       -> both legs closed; Close(graceful=True) (after a released file) half-closes them behind what
                 was sent and closes once the peers have read it and closed (_close_gracefully).

A peer's close is passed on as the peer made it, after the session has been told (session.connection_closed)
and its commands carried out (a held file is inspected and released first: the tracker's close rule):
- a FIN (the peer half-closed, or closed) -> a half-close of the other leg (shutdown(SHUT_WR)): the other
  peer reads EOF at once, and the other direction keeps flowing until it closes too;
- a reset (or a leg that broke: timeout, unreachable) -> a reset of the other leg (SO_LINGER 0, then close).
Once neither leg can read, both are closed. Inside an HTTP CONNECT tunnel mitmproxy turns a half-close
into a full close (its HttpStream.passthrough): the peer still reads EOF at once.

A NoticeInjected event (the gateway delivering a Notify from another connection, e.g. a DCC file blocked on
its own connection) becomes session.notice(text), whose commands are carried the same way.

A session that raises is logged as an anomaly and its connection is closed; the gateway carries on.
No flow object and no per-message history is kept: memory per connection does not grow with traffic.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, MutableSet, Protocol

from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.commands import StartHook
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer

from imguard import alerts
from imguard.model import ChatContext, Decision, FileReport
from imguard.protocols.base import FACTS, Close, Fact, InspectFile, Notify, Record, Send, StartTls, Wake
from imguard.gateway.tls_memory import TRIM_AFTER, trim_tls_buffers

logger = logging.getLogger("imguard.gateway")

# How long decided stanzas of one read may wait for the rest of it before they are forwarded: long enough to
# gather a few into one write, short enough that the peer is not kept idle while a large read is checked.
FORWARD_AFTER = 0.0005

# Linux only; elsewhere reads are acknowledged as the kernel decides.
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
_NOT_LOOKED_UP = object()


@dataclass
class FileJob:
    """A file a session holds, and, once the hook has run, what inspection and policy made of it."""
    command: InspectFile
    report: FileReport | None = None
    decision: Decision | None = None


@dataclass
class InspectFileHook(StartHook):
    """A session holds a file: inspect it off the event loop and set job.report and job.decision."""
    job: FileJob


@dataclass
class NoticeTarget:
    """The connection pair a notice is for, shaped like a flow (client_conn, server_conn): mitmproxy's HttpLayer
    routes an injected message by these to the CONNECT tunnel that carries the session."""
    client_conn: Any
    server_conn: Any


@dataclass
class NoticeInjected(events.MessageInjected):
    """The gateway asks this connection's session to tell its user `message` (session.notice(message)).
    A MessageInjected, like mitmproxy's inject.tcp: every layer above passes it down (TLS layers and mode
    layers forward non-connection events; HttpLayer forwards injected messages to the tunnel's stream)."""

    @property
    def text(self) -> str:
        return str(self.message)


@dataclass
class WakeInjected(events.MessageInjected):
    """A Wake a session asked for is due on this connection: session.wake() (injected like NoticeInjected)."""


class Carrier(Protocol):
    """What a SessionLayer needs from the gateway (GatewayAddon satisfies it; the replay is the offline carrier).
    Its settings are given to the gateway addon's constructor, not attached afterwards."""

    metrics: Any                        # imguard.metrics.Metrics, or None
    max_queued_bytes: int               # per connection, while its layer waits for a scan (0: unbounded)
    max_total_queued_bytes: int         # all connections together (0: unbounded)
    scan_notice_after: float            # seconds before an in-band file's "being scanned" notices (0: never)
    queued_layers: MutableSet[Any]      # the layers holding queued bytes now

    def record(self, event: dict[str, Any]) -> None:
        """Write an event (alert log, sinks, archive). Never raises."""

    def record_fact(self, fact: Fact) -> None:
        """Record a session's fact (Anomaly, ProtocolEvent, Link, MessageDecision) with its direction."""

    def notify_command(self, cmd: Notify) -> None:
        """Record a Notify and deliver it as a notice on the connection it names."""

    def wake_command(self, cmd: Wake, connection_id: str) -> None:
        """Call session.wake() on `cmd.connection_id` (else `connection_id`, the asking one) after `cmd.after` s."""

    def commit(self) -> None:
        """Put the archive records made so far on disk; called before anything is forwarded. Never raises."""

    def anomaly(self, ctx: ChatContext, kind: str, detail: str, **data: Any) -> None: ...

    def tcp_socket(self, client_id: str, connection) -> Any:
        """The socket under one leg, to acknowledge its reads at once; None = leave acknowledgements to the kernel."""

    def parse_fail_open(self, protocol: str) -> bool:
        """Fail mode `parse` for this protocol: True relays a connection whose session failed, uninspected."""

    def leg_reset(self, client_id: str, connection) -> bool:
        """Whether the read of `connection` ended in an error (a reset, a broken connection), not the peer's FIN."""

    def reset_on_close(self, client_id: str, connection) -> None:
        """Make the coming close of `connection` a reset (SO_LINGER 0); where it cannot, it stays a close."""


class SessionLayer(layer.Layer):
    """One StreamSession on one client/server connection pair."""

    child: layer.Layer | None

    def __init__(self, context: Context, session, chat: ChatContext, carrier: Carrier, *, tls: bool = False,
                 after_starttls: bool = False, pending: Iterable = ()):
        super().__init__(context)
        self.session = session
        self.chat = chat
        self.carrier = carrier
        self.tls = tls                          # this layer sees decrypted bytes
        self.after_starttls = after_starttls    # call session.tls_started() on Start
        self.pending = list(pending)            # commands the session returned after StartTls
        self.child = None
        self.closed = False
        self.closing = False                    # closed gracefully: waiting for the peers to read to the end
        self.queued_bytes = 0                   # bytes queued by mitmproxy while this layer waits for a scan
        self.raw = False                        # fail mode parse=open: the session failed, bytes relayed as they are
        self._ack_sockets: dict[str, Any] = {}  # connection id -> its socket, or None (see _acknowledge)
        self._trim_tls = tls                    # renew the TLS layers' memory BIOs after the next read
        self._scan_notice: tuple[commands.RequestWakeup, tuple[Notify, ...]] | None = None   # _tell_scanning
        metrics = carrier.metrics
        if metrics is not None and not after_starttls:     # one connection, counted once (not again inside TLS)
            metrics.connection_opened(chat.protocol)

    def __repr__(self):
        return f"SessionLayer({type(self.session).__name__}, tls={self.tls})"

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        """While a scan pauses this layer, mitmproxy keeps reading and queues what arrives (it has no
        backpressure): bound that queue, and close the connection (fail closed) when a peer floods it. The wakeup
        of a slow scan is answered at once: its "being scanned" notices (_tell_scanning)."""
        if isinstance(event, events.Wakeup) and self._scan_notice is not None \
                and event.command is self._scan_notice[0]:
            yield from self._tell_scanning()
            return
        if self._paused is not None and isinstance(event, events.DataReceived) and not self.closed:
            self.queued_bytes += len(event.data)
            limit = self.carrier.max_queued_bytes
            if limit and self.queued_bytes > limit:
                self.carrier.anomaly(self.chat, "flood_during_inspection",
                                     f"more than {limit} bytes arrived while a file was being inspected; closed",
                                     queued_bytes=self.queued_bytes)
                yield from self._close()
                return
            # The same queues, all connections together (a flood of many connections, each under its own limit).
            total_limit = self.carrier.max_total_queued_bytes
            queued = self.carrier.queued_layers
            if total_limit:
                queued.add(self)
                total = sum(other.queued_bytes for other in list(queued))
                if total > total_limit:
                    self.carrier.anomaly(self.chat, "overload", f"{total} bytes queued by all connections together "
                                         f"(max_total_queued_bytes {total_limit}); this connection was closed",
                                         queued_bytes=self.queued_bytes, total_queued_bytes=total)
                    yield from self._close()
                    return
        yield from super().handle_event(event)
        if self._paused is None and self.queued_bytes:
            self.queued_bytes = 0
            self.carrier.queued_layers.discard(self)

    # --- events -------------------------------------------------------------------------------------

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.child is not None:
            yield from self.child.handle_event(event)
            return
        if self.closed:
            if self.closing and isinstance(event, events.ConnectionClosed):
                yield from self._close_once_read()     # a graceful close: a peer has read to the end
            return
        if type(event) is events.DataReceived:
            self._acknowledge(event.connection)
        if isinstance(event, events.Start):
            yield from self._start()
        elif self.raw and isinstance(event, events.DataReceived):
            if event.data:
                to_client = event.connection != self.context.client
                yield from self._send(self.context.client if to_client else self.context.server, event.data)
        elif self.raw and isinstance(event, events.ConnectionClosed):
            yield from self._pass_close_on(event.connection)
        elif isinstance(event, events.DataReceived):
            if event.data:
                from_client = event.connection == self.context.client
                yield from self._run_steps(self.session.data_received_steps, from_client, event.data)
                if self.tls and (self._trim_tls or len(event.data) >= TRIM_AFTER):
                    # Between events mitmproxy's TLS layers have read all they were given and sent all they wrote:
                    # the handshake's (or this large read's) BIO buffers can go (tls_memory.renew_bios).
                    self._trim_tls = not trim_tls_buffers(self.context)
        elif isinstance(event, events.ConnectionClosed):
            yield from self._connection_closed(event)
        elif isinstance(event, NoticeInjected):
            yield from self._run(self._call(self._notice, event.text))
        elif isinstance(event, WakeInjected):
            yield from self._run(self._call(self.session.wake))

    def _scanning_timer(self, cmd: InspectFile) -> layer.CommandGenerator[None]:
        """A file held on this connection (in-band: IBB, MSNSLP, ...) whose "being scanned" notices are for this
        connection's own user (HeldTransfer.in_band_scanning_notices): a wakeup after scan_notice_after_seconds.
        The other slow notices are the inspection's to deliver (gateway/inspection.py)."""
        here = tuple(n for n in cmd.slow_notices if n.connection_id == self.chat.connection_id)
        after = getattr(self.carrier, "scan_notice_after", 0)     # carriers without it (tests, replay): never
        if here and after > 0:
            wakeup = commands.RequestWakeup(after)
            self._scan_notice = (wakeup, here)
            yield wakeup

    def _tell_scanning(self) -> layer.CommandGenerator[None]:
        """The scan of a file held here takes longer than scan_notice_after_seconds: its notices are told now,
        though this layer is paused for the verdict (mitmproxy would queue an injected notice until after it),
        through session.notice(), and recorded like any Notify when it goes. Once: the wakeup is forgotten."""
        _, notices = self._scan_notice
        self._scan_notice = None
        if self.closed:
            return
        for notice in notices:
            cmds = self._call(self._notice, notice.text)
            if cmds:
                self.carrier.record_fact(notice)    # a Notify's event, with its direction, like a fact's
            yield from self._run(cmds)

    def _notice(self, text: str) -> list:
        """A Notify from another connection, told in this session's protocol (None: it has no way to: logged)."""
        cmds = self.session.notice(text)
        if cmds is None:
            logger.warning("%s: %s cannot deliver a notice: %s", self.chat.client_address,
                           type(self.session).__name__, text)
        return cmds or []

    def _acknowledge(self, connection) -> None:
        """Acknowledge what was just read on `connection` now, not up to 40 ms later (TCP_QUICKACK re-armed on
        every read: the kernel drops back to delayed ACKs by itself). Why: a chat peer that leaves Nagle's
        algorithm on (Prosody does) sends a small write only once its previous one is acknowledged, and a leg
        that was interactive (a login) is in the kernel's delayed-ACK mode. Measured through Prosody with 25
        messages in flight: 2,055 msg/s and a loaded p99 of 48 ms without, 4,392 msg/s and 11-14 ms with."""
        sock = self._ack_sockets.get(connection.id, _NOT_LOOKED_UP)
        if sock is _NOT_LOOKED_UP:
            try:
                sock = self.carrier.tcp_socket(self.context.client.id, connection) if TCP_QUICKACK is not None \
                    else None
            except Exception:       # only latency is at stake: never the session
                logger.debug("no socket to acknowledge reads on", exc_info=True)
                sock = None
            self._ack_sockets[connection.id] = sock
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
            except OSError:             # closed under us: nothing left to acknowledge
                self._ack_sockets[connection.id] = None

    def _start(self) -> layer.CommandGenerator[None]:
        server = self.context.server
        if not server.connected and server.address is not None:
            err = yield commands.OpenConnection(server)
            if err:
                if server.tls and server.timestamp_tcp_setup is not None and not server.tls_established:
                    # Connected, then the server's TLS failed (its certificate did not verify): a TLS event, side
                    # server, medium (docs/events.md), not an unreachable server.
                    self.carrier.record(alerts.tls_failure_event(self.chat, str(err), side="server",
                                                                 sni=str(server.sni or "")))
                else:
                    self.carrier.anomaly(self.chat, "server_unreachable", f"cannot connect to the server: {err}")
                self.closed = True
                yield commands.CloseConnection(self.context.client)
                return
        work = self.pending
        self.pending = []
        if self.after_starttls:
            work = work + self._call(self.session.tls_started)
        elif not self.tls:
            # A session may speak first once the server leg is up (the SOCKS5 bytestream session replays the
            # handshake to the real streamhost; an unannounced side connection is closed).
            work = work + self._call(self.session.start)
        yield from self._run(work)

    def _connection_closed(self, event: events.ConnectionClosed) -> layer.CommandGenerator[None]:
        from_client = event.connection == self.context.client
        # The session is told first: what it holds from this side is settled now (a partial line dropped, a
        # held file inspected and released, or its connection closed by the tracker's close rule).
        yield from self._run(self._call(self.session.connection_closed, from_client))
        if self.closed or self.child is not None or not self.session.passes_close_on(from_client):
            return
        yield from self._pass_close_on(event.connection)

    def _pass_close_on(self, closed) -> layer.CommandGenerator[None]:
        """The peer on `closed` stopped sending: the other peer learns it the same way (FIN: a half-close, the
        other direction keeps flowing; a reset: a reset). Both legs are closed once neither can read."""
        client, server = self.context.client, self.context.server
        other = server if closed == client else client
        if self._leg_reset(closed):
            logger.info("%s: the %s reset the connection (or it broke): reset passed on", self.chat.client_address,
                        "client" if closed == client else "server")
            self._reset_on_close(other)
            yield from self._close()
        elif not ((client.state & ConnectionState.CAN_READ) or (server.state & ConnectionState.CAN_READ)):
            yield from self._close()
        elif other.state & ConnectionState.CAN_WRITE:
            yield commands.CloseTcpConnection(other, half_close=True)

    def _leg_reset(self, connection) -> bool:
        try:
            return self.carrier.leg_reset(self.context.client.id, connection)
        except Exception:       # only how the close is passed on is at stake: a FIN then
            logger.debug("cannot tell a reset from a close", exc_info=True)
            return False

    def _reset_on_close(self, connection) -> None:
        if connection.state is ConnectionState.CLOSED:
            return
        try:
            self.carrier.reset_on_close(self.context.client.id, connection)
        except Exception:       # it stays a plain close
            logger.debug("cannot reset the other leg", exc_info=True)

    # --- commands -----------------------------------------------------------------------------------

    def _call(self, method: Callable, *args) -> list:
        """A session call; an exception becomes an anomaly and a Close, never a dead gateway."""
        try:
            return list(method(*args) or [])
        except Exception as e:
            unsent = args[1] if method.__name__ == "data_received" else b""
            return self._session_failed(method, args, e, unsent)

    def _run_steps(self, steps: Callable, from_client: bool, data: bytes) -> layer.CommandGenerator[None]:
        """A read, stanza by stanza (session.data_received_steps): what is decided goes out at the latest
        FORWARD_AFTER seconds later, while the rest of the read is still being checked. The server (or the
        client) then works on the first messages on the other core instead of waiting for the whole read:
        a large read of chat messages is a pipeline, not a batch. Sends gathered meanwhile still go out as
        one write."""
        pending: list = []
        flushed_at = time.perf_counter()
        forwarded = False                   # some of this read went out already
        iterator = steps(from_client, data)
        while not self.closed:
            try:
                step = next(iterator, None)
            except Exception as e:
                pending = []                # decided, but the read as a whole is in doubt
                step = self._session_failed(steps, (from_client, data), e, b"" if forwarded else data)
                iterator = iter(())
            if step is None:
                break
            if len(step) == 1 and type(step[0]) is Send:     # the usual step: a line or stanza to forward
                pending.append(step[0])
                if time.perf_counter() - flushed_at < FORWARD_AFTER:
                    continue
                yield from self._run(pending)
                pending = []
                forwarded = True
                flushed_at = time.perf_counter()
                continue
            if any(type(cmd) is StartTls for cmd in step):
                # What follows STARTTLS in this read is handed to the TLS child (its facts; plaintext is dropped).
                try:
                    step = step + [cmd for rest in iterator for cmd in rest]
                except Exception as e:
                    step = step + self._session_failed(steps, (from_client, data), e)
            if all(type(cmd) is Send for cmd in step):
                pending += step
                if time.perf_counter() - flushed_at < FORWARD_AFTER:
                    continue
            else:
                pending += step
            yield from self._run(pending)
            pending = []
            forwarded = True
            flushed_at = time.perf_counter()
        if pending:
            yield from self._run(pending)
        else:
            self._commit()              # a read that forwarded nothing may still have archive records

    def _commit(self) -> None:
        self.carrier.commit()

    def _session_failed(self, method: Callable, args: tuple, e: Exception, unsent: bytes = b"") -> list:
        """What a session's exception becomes: an anomaly and a Close; or with fail mode parse=open, the rest
        of the connection relayed uninspected, starting with `unsent` (the read that failed, when none of it
        went out yet; what the session was holding is lost)."""
        logger.exception("%s: session %s failed in %s", self.chat.client_address,
                         type(self.session).__name__, method.__name__)
        if self.carrier.parse_fail_open(self.chat.protocol):        # fail mode parse (failmode.py)
            self.carrier.anomaly(self.chat, "session_error", f"{type(e).__name__}: {e}; fail mode open: the "
                                 "rest of the connection is relayed uninspected",
                                 session=type(self.session).__name__, call=method.__name__, fail_mode="open",
                                 severity="high")      # from here on nothing on this connection is inspected
            self.raw = True
            from_client = args[0] if args and isinstance(args[0], bool) else True
            return [Send(to_client=not from_client, data=unsent)] if unsent else []
        self.carrier.anomaly(self.chat, "session_error", f"{type(e).__name__}: {e}",
                             session=type(self.session).__name__, call=method.__name__)
        return [Close(f"session error in {method.__name__}")]

    def _run(self, cmds: list) -> layer.CommandGenerator[None]:
        # The archive records of what is about to be forwarded are on disk first, in one write.
        self._commit()
        work = collections.deque(cmds)
        while work and not self.closed:
            cmd = work.popleft()
            if isinstance(cmd, Send):
                data = cmd.data
                # A chunk often holds many stanzas or lines, each its own Send: consecutive sends to one
                # side go out as one write (one syscall, and the peer reads them in one go).
                if work and isinstance(work[0], Send) and work[0].to_client == cmd.to_client:
                    parts = [data]
                    while work and isinstance(work[0], Send) and work[0].to_client == cmd.to_client:
                        parts.append(work.popleft().data)
                    data = b"".join(parts)
                if data:
                    yield from self._send(self.context.client if cmd.to_client else self.context.server, data)
            elif isinstance(cmd, Record):
                self.carrier.record(cmd.event)
            elif isinstance(cmd, FACTS):
                self.carrier.record_fact(cmd)
            elif isinstance(cmd, Notify):
                self.carrier.notify_command(cmd)
            elif isinstance(cmd, Wake):
                self.carrier.wake_command(cmd, self.context.client.id)
            elif isinstance(cmd, InspectFile):
                job = FileJob(cmd)
                yield from self._scanning_timer(cmd)
                yield InspectFileHook(job)          # blocking: pauses this layer only
                self._scan_notice = None            # the verdict is in: a later wakeup tells nothing
                if job.decision is None:            # no handler answered: never a silent pass
                    self.carrier.anomaly(self.chat, "inspection_unavailable", "no inspection verdict",
                                         transfer_id=cmd.transfer_id)
                    work.append(Close("no inspection verdict"))
                    continue
                # The commands returned with the InspectFile came first; the verdict's follow.
                work.extend(self._call(self.session.file_verdict, cmd.transfer_id, job.report, job.decision))
            elif isinstance(cmd, StartTls):
                if self.tls:
                    self.carrier.anomaly(self.chat, "starttls_twice", "StartTls on a connection already in TLS")
                    yield from self._close()
                    return
                # Plaintext never enters the TLS session (CVE-2011-0411 class): a Send after StartTls is dropped.
                rest = [c for c in work if type(c) is not Send]
                if len(rest) != len(work):
                    self.carrier.anomaly(self.chat, "starttls_injection", "plaintext returned after StartTls was "
                                         "discarded", severity="high",
                                         size=sum(len(c.data) for c in work if type(c) is Send))
                yield from self._start_tls(rest)
                return
            elif isinstance(cmd, Close):
                yield from (self._close_gracefully() if cmd.graceful else self._close())
            else:
                self.carrier.anomaly(self.chat, "unknown_command", f"session returned {cmd!r}")

    def _send(self, connection, data: bytes) -> layer.CommandGenerator[None]:
        """SendData, unless the gateway has half-closed that leg (its peer's counterpart closed): nothing can be
        written after the FIN (asyncio refuses a write after write_eof), so what the session still sends that way
        (a bounce, a notice) is dropped."""
        if connection.state is ConnectionState.CAN_READ:
            logger.debug("%s: %d bytes for a leg already half-closed, dropped", self.chat.client_address, len(data))
            return
        yield commands.SendData(connection, data)

    def _start_tls(self, rest: list) -> layer.CommandGenerator[None]:
        """Push ServerTLS -> ClientTLS -> SessionLayer(tls=True); from now on every event goes to them.
        ServerTLSLayer must be constructed first: ClientTLSLayer looks for it at context.layers[-2]."""
        server_tls = ServerTLSLayer(self.context)
        client_tls = ClientTLSLayer(self.context)
        server_tls.child_layer = client_tls
        client_tls.child_layer = SessionLayer(self.context, self.session, self.chat, self.carrier, tls=True,
                                              after_starttls=True, pending=rest)
        self.child = server_tls
        yield from server_tls.handle_event(events.Start())

    def _close_gracefully(self) -> layer.CommandGenerator[None]:
        """Close(graceful=True): what was sent arrives before the end (a released file, megabytes still in the
        buffers). Each leg whose peer still sends is half-closed, its FIN queued behind those bytes, and still read
        (this layer ignores what arrives) until its peer closes; a leg whose peer has closed stays open meanwhile
        (closing the client's alone would end every leg in mitmproxy). Then both are closed. A full close at once
        would stop the reads, and the kernel answers a peer's later bytes (a DCC receiver's ACKs) with a reset that
        discards what it had not sent yet. A peer that never closes is ended by mitmproxy's idle timeout."""
        self.closed = True
        self.closing = True
        if self.queued_bytes:
            self.queued_bytes = 0
            self.carrier.queued_layers.discard(self)
        yield from self._close_once_read()

    def _close_once_read(self) -> layer.CommandGenerator[None]:
        client, server = self.context.client, self.context.server
        if not ((client.state & ConnectionState.CAN_READ) or (server.state & ConnectionState.CAN_READ)):
            self.closing = False
            yield from self._close()
            return
        for leg in (server, client):
            if leg.state & ConnectionState.CAN_READ and leg.state & ConnectionState.CAN_WRITE:
                yield commands.CloseTcpConnection(leg, half_close=True)

    def _close(self) -> layer.CommandGenerator[None]:
        self.closed = True
        if self.queued_bytes:           # what it queued is dropped with the connection
            self.queued_bytes = 0
            self.carrier.queued_layers.discard(self)
        server, client = self.context.server, self.context.client
        if server.state is not ConnectionState.CLOSED:
            yield commands.CloseConnection(server)
        if client.state is not ConnectionState.CLOSED:
            yield commands.CloseConnection(client)


def tls_first_stack(context: Context, session, chat: ChatContext, carrier: Carrier) -> layer.Layer:
    """ServerTLS -> ClientTLS -> SessionLayer(tls=True): for a client that opens with a ClientHello (XMPP on
    5223, direct TLS on 5222). The session was built with tls_on_connect=True; tls_started() is not called."""
    server_tls = ServerTLSLayer(context)
    client_tls = ClientTLSLayer(context)
    server_tls.child_layer = client_tls
    client_tls.child_layer = SessionLayer(context, session, chat, carrier, tls=True)
    return server_tls


class RefuseLayer(layer.Layer):
    """Closes the client at once (a connection the gateway will not carry)."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            if self.context.server.state is not ConnectionState.CLOSED:
                yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)
