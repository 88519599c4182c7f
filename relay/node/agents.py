"""The relay's side of an agent link: handshake deadline, token check, control.

An agent connects over TLS, sends HELLO with its token within
`handshake_timeout_seconds` (TLS handshake included), and is then served
tunnel requests. Before that it can make us buffer at most one 16 KiB HELLO
(relay.mux.frames.MAX_HELLO_PAYLOAD). Tokens are compared in constant time
against stored hashes and never logged; a session gets a short random id for
the logs instead.
"""

import secrets

from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger

from relay.mux import ErrorCode, LinkBufferFullError, MuxConnection, Role
from relay.mux.connection import DEFAULT_LINK_BUDGET, DEFAULT_WINDOW_CAP, LinkState
from relay.mux import control
from relay.mux.control import CloseTunnel, OpenTunnel, RelayDrainingError, TunnelRequestError
from relay.node.limits import FD_RESERVE, visitor_fd_limit
from relay.node.login import LoginGuard
from relay.wire.link import MuxLink
from relay.wire.metrics import NULL_METRICS
from relay.wire.tcpio import socket_fd
from relay.wire.tlslayer import TLSLayer, TLSLayerFactory

DEFAULT_HANDSHAKE_TIMEOUT_SECONDS = 10.0
BUSY_LOG_SECONDS = 10.0  # at most one "too many logins" line this often
# A visitor whose stream the agent has not accepted (service connected) in
# this long is closed: frp and bore use 10 s too.
DEFAULT_OPEN_TIMEOUT_SECONDS = 10.0
# Opens in flight per link before new visitors are refused at once (yamux's
# accept backlog is 256).
DEFAULT_MAX_OPENS_IN_FLIGHT = 256
RELAY_AGENT_NAME = "tunnel-relay/0.1"
# What one agent link may make the relay buffer, in all: half for the initial
# windows of its visitor streams (which shrink as it fills; past it visitors
# are refused), half for window growth (docs/protocol.md, "Flow control").
DEFAULT_LINK_BUFFER_CAP = DEFAULT_WINDOW_CAP + DEFAULT_LINK_BUDGET
# Refused visitors: one log line per reason per burst, this often at most.
REFUSAL_LOG_SECONDS = BUSY_LOG_SECONDS


def link_buffer_split(cap_bytes: int) -> tuple[int, int]:
    """(window cap, growth budget) of a link-buffer cap: half each."""
    return cap_bytes // 2, cap_bytes - cap_bytes // 2


class RelayLink(MuxLink):
    _log = Logger()

    def __init__(self, factory: "AgentLinkFactory", source: str = "?"):
        window_cap, growth_budget = link_buffer_split(factory.link_buffer_cap)
        super().__init__(
            MuxConnection(Role.RELAY, window_cap=window_cap, link_budget=growth_budget),
            factory.reactor,
            keepalive_interval_seconds=factory.keepalive_interval_seconds,
            keepalive_timeout_seconds=factory.keepalive_timeout_seconds,
            metrics=factory.metrics,
        )
        self.factory = factory
        self.tunnels = factory.tunnels
        self.session_id = secrets.token_hex(4)
        self.authenticated = False
        # relay/node/tenants.py Grant: the tenant, token id, limits and names
        # of the token this session logged in with (None before login).
        self.grant = None
        self.graceful = False  # the agent said GOAWAY(NO_ERROR): free its tunnels now
        # relay/node/sessions.py: the session this link serves (after HELLO), its number in it
        self.session = None
        self.link_number = 0
        self._handshake_call = None
        self._open_deadlines: dict[int, float] = {}  # stream id -> when its open times out
        self._open_timer = None
        self._refusal_logged_at: dict[str, float] = {}  # reason -> when its burst was logged
        self.source = source  # the peer's address, for the login guard
        self.accepted_at = self.clock.seconds()  # TCP accept: TLS and HELLO share one deadline
        self._login_pending = True  # counted by the login guard until it ends

    def on_connected(self):
        # One deadline for TLS and HELLO together, counted from the accept.
        left = self.factory.handshake_timeout_seconds - (self.clock.seconds() - self.accepted_at)
        self._handshake_call = self.clock.callLater(max(left, 0.0), self._handshake_expired)

    def login_ended(self) -> None:
        """Authenticated, or the connection is gone: no longer a pending login."""
        if self._login_pending:
            self._login_pending = False
            self.factory.login_guard.finished(self.source)

    def _handshake_expired(self):
        self._handshake_call = None
        if not self.authenticated and not self.closed:
            self._log.warn("agent connection {peer}: no handshake in time, dropped", peer=self.peer)
            self.abort_link()

    def on_hello(self, info: dict):
        if self.tunnels.draining:
            # Accepted just before the agent port closed: come back later (with backoff).
            self.close_link(ErrorCode.DRAINING, "relay draining: try again later")
            return
        grant = self.factory.check_token(info.get("token"))
        if grant is None:
            if not self.factory.login_guard.banned(self.source):
                self._log.warn("agent {peer} refused: bad token", peer=self.peer)
            self.metrics.auth_failed(self.peer)
            self.factory.login_guard.bad_token(self.source)
            self.close_link(ErrorCode.AUTH_FAILED, "token refused")
            return
        self.grant = grant
        self.login_ended()
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        reply = {"relay": RELAY_AGENT_NAME, "keepalive_interval": self.keepalive_interval_seconds}
        join = control.parse_join(info)
        if join is not None:
            # One more link of a session (docs/protocol.md, "Joining a session").
            if self.tunnels.join_session(self, join) is None:
                self._log.warn(
                    "agent {peer}: link refused: it names no live session of its token, or a wrong join secret",
                    peer=self.peer,
                )
                self.close_link(ErrorCode.JOIN_REFUSED, "no such session, or a wrong join secret")
                return
            reply.update(session=self.session_id, link=self.link_number)
        else:
            reply.update(
                session=self.session_id,
                join_secret=self.tunnels.start_session(self, control.parse_hello_links(info)),
            )
        self.authenticated = True
        self.tunnels.add_link(self)
        self.metrics.link_up(self.session_id, self.peer)
        self.mux.send_hello(reply)
        if join is None:
            self._log.info(
                "agent {agent} connected from {peer} ({client})",
                agent=self.session_id, peer=self.peer, client=str(info.get("agent", "?"))[:80],
            )

    # -- control requests (relay/mux/control.py) ---------------------------------

    def on_control(self, message: dict):
        # No integer id: ControlEnvelopeError, a MuxProtocolError (GOAWAY).
        request_id = control.request_id_of(message)
        try:
            request = control.parse_request(message)
            if isinstance(request, OpenTunnel):
                self._open_tunnel(request)
            elif isinstance(request, CloseTunnel):
                self.tunnels.close_for_link(self, request.tunnel_id)
                self._send_reply(control.ok_reply(request_id))
        except TunnelRequestError as e:
            self._send_reply(control.error_reply(request_id, e))

    def _send_reply(self, reply: dict) -> None:
        if self.closed:
            return
        self.mux.send_control(reply)
        self.flush()

    def _open_tunnel(self, request: OpenTunnel) -> None:
        request_id = request.request_id
        if self.tunnels.draining or self.mux.draining:
            # A request that crossed a GOAWAY(DRAINING): the agent asks again on its next link.
            self._send_reply(control.error_reply(request_id, RelayDrainingError(None, "the relay is draining")))
            return

        def reclaimed(tunnel):
            self._send_reply(control.opened_reply(request_id, tunnel.describe(), reclaimed=True))

        def fresh(failure=None):
            if failure is not None:
                failure.trap(TunnelRequestError)  # expired: a fresh tunnel, and the agent is told it is new
            d = self.tunnels.open_tunnel(self, request)
            d.addCallbacks(opened, refused)
            return d

        def opened(result):
            tunnel, secret = result
            self._send_reply(control.opened_reply(
                request_id, tunnel.describe(), reclaimed=False, reclaim_secret=secret, replica=secret is None,
            ))

        def refused(failure):
            failure.trap(TunnelRequestError)
            self._send_reply(control.error_reply(request_id, failure.value))

        if request.reclaim is not None:
            d = self.tunnels.reclaim(self, *request.reclaim, request=request)
            d.addCallbacks(reclaimed, fresh)
        else:
            d = fresh()
        d.addErrback(lambda f: self._log.failure("open_tunnel failed", f))

    # -- visitors --------------------------------------------------------------------

    def open_visitor_stream(self, tunnel, endpoint, addr, local, sni=None):
        """The protocol for one visitor's connection: once it has its
        transport, it opens a stream to the agent and is spliced to it.
        `addr` and `local` are the visitor's and our side of its TCP
        connection (the stream's getPeer/getHost, and PROXY headers)."""
        metadata = {
            "tunnel": tunnel.tunnel_id,
            "service": endpoint.service,
            "peer": [getattr(addr, "host", ""), getattr(addr, "port", 0)],
            "local": [getattr(local, "host", ""), getattr(local, "port", 0)],
        }
        if sni is not None:
            metadata["sni"] = sni
        if self.mux.opens_in_flight >= self.factory.max_opens_in_flight:
            # yamux's backlog: the agent is not answering OPENs; more visitors
            # would only wait for the deadline. A RST now, one line per burst.
            self._refuse_visitor(tunnel.tunnel_id, "opens_in_flight")
            return _Refused()
        if self.mux.next_stream_window() == 0:
            # The link's stream windows add up to its cap: a new stream would
            # let the agent make us buffer more than it (stalled visitors).
            self._refuse_visitor(tunnel.tunnel_id, "link_buffer_cap")
            return _Refused()
        splice = self.tunnels.splice_for(tunnel, self)

        def open_stream():
            if self.closed or self.mux.draining:
                # The link died, or either side began to drain, since buildProtocol.
                self.metrics.visitor_refused(tunnel.tunnel_id, "agent_away" if self.closed else "draining")
                splice.a.transport.abortConnection()
                return
            fd = socket_fd(splice.a.transport)
            if fd is not None and fd > self.factory.visitor_fd_limit:
                self.metrics.visitor_refused(tunnel.tunnel_id, "out_of_files")
                self.metrics.limit_hit("open_files", self.grant.tenant if self.grant else None)
                self.factory.out_of_files()
                splice.a.transport.abortConnection()  # keeps the reserve for agents and admin
                return
            try:
                stream = self.open_stream(metadata, splice.b)
            except LinkBufferFullError:
                # Filled up since the visitor was accepted (a TLS handshake, a burst).
                self._refuse_visitor(tunnel.tunnel_id, "link_buffer_cap")
                splice.a.transport.abortConnection()
                return
            self._open_deadlines[stream.stream_id] = self.clock.seconds() + self.factory.open_timeout_seconds
            if self._open_timer is None:
                self._open_timer = self.clock.callLater(self.factory.open_timeout_seconds, self._opens_overdue)

        splice.a.when_connected = open_stream
        return splice.a

    def on_stream_accepted(self, stream_id: int) -> None:
        self._open_deadlines.pop(stream_id, None)
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.report_opened()  # open latency: visitor accepted to service connected

    def stream_ended(self, stream) -> None:
        super().stream_ended(stream)
        self._open_deadlines.pop(stream.stream_id, None)

    def _opens_overdue(self) -> None:
        """Reset the streams the agent has not accepted within the deadline
        (their visitors are closed); wait for the next deadline."""
        self._open_timer = None
        if self.closed:
            return
        now = self.clock.seconds()
        deadlines = self._open_deadlines
        overdue = []
        for stream_id, deadline in deadlines.items():  # in open order, so deadline order
            if deadline > now:
                break
            overdue.append(stream_id)
        for stream_id in overdue:
            deadlines.pop(stream_id, None)
            stream = self.streams.get(stream_id)
            if stream is not None:
                self.metrics.visitor_refused(stream.tunnel_id, "open_timeout")
                stream.reset(ErrorCode.CANCEL, "open not accepted in time")
        if overdue:
            self._log.info(
                "agent {agent}: {count} visitor(s) closed: the agent did not accept their streams within {seconds:g}s",
                agent=self.session_id, count=len(overdue), seconds=self.factory.open_timeout_seconds,
            )
            self.flush_soon()
        if deadlines:
            first = next(iter(deadlines.values()))
            self._open_timer = self.clock.callLater(max(first - now, 0.0), self._opens_overdue)

    def _refuse_visitor(self, tunnel_id: str, reason: str) -> None:
        """Count a refused visitor; log its reason once per burst, not per visitor."""
        self.metrics.visitor_refused(tunnel_id, reason)
        self.metrics.limit_hit(reason, self.grant.tenant if self.grant else None)
        now = self.clock.seconds()
        logged_at = self._refusal_logged_at.get(reason)
        if logged_at is not None and now - logged_at < REFUSAL_LOG_SECONDS:
            return
        self._refusal_logged_at[reason] = now
        if reason == "opens_in_flight":
            self._log.warn(
                "agent {agent}: {count} opens unanswered: refusing new visitors of tunnel {tunnel} for now",
                agent=self.session_id, count=self.mux.opens_in_flight, tunnel=tunnel_id,
            )
        else:
            pool = self.mux.window_pool
            self._log.warn(
                "agent {agent}: stream windows of {granted} bytes reach the link's cap of {cap}: "
                "refusing new visitors of tunnel {tunnel} for now",
                agent=self.session_id, granted=pool.granted, cap=pool.cap, tunnel=tunnel_id,
            )

    def close_visitors(self, tunnel) -> None:
        for stream in list(self.streams_by_tunnel.get(tunnel.tunnel_id, ())):
            stream.reset(ErrorCode.CANCEL, "tunnel closed")  # its splice aborts the visitor
        self.flush()

    def stream_count(self, tunnel_id: str) -> int:
        """Live visitor streams of a tunnel on this link."""
        return len(self.streams_by_tunnel.get(tunnel_id, ()))

    def on_drained(self) -> None:
        self.close_link(ErrorCode.NO_ERROR, "relay stopping")

    def replace_session(self) -> None:
        """The same agent is back on a new link: drop this one without waiting."""
        if self.closed:
            return
        self.close_link(ErrorCode.SESSION_REPLACED, "session moved to a new link")
        self.abort_link()

    # -- endings -------------------------------------------------------------------------

    def on_goaway(self, code, message: str):
        if code == ErrorCode.DRAINING and not self.closed and self.mux.state is LinkState.OPEN:
            # The agent stops gracefully: free its tunnels now, keep its streams.
            self.graceful = True
            self._log.info("agent {agent} drains: its tunnels are freed, its streams finish", agent=self.session_id)
            self.tunnels.link_draining(self)
            return
        if code in (ErrorCode.NO_ERROR, ErrorCode.DRAINING):
            # DRAINING with its final GOAWAY in the same read (a drained link
            # without streams, one of an agent's several) is a goodbye too.
            self.graceful = True
        self._log.info(
            "agent {agent} said goodbye ({code})", agent=self.session_id, code=getattr(code, "name", code)
        )

    def on_link_lost(self, reason):
        self.login_ended()
        if self._open_timer is not None and self._open_timer.active():
            self._open_timer.cancel()
        self._open_timer = None
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        if self.authenticated:
            self._log.info("agent {agent} link closed", agent=self.session_id)
            self.metrics.link_down(self.session_id, "goaway" if self.graceful else "lost")
            self.tunnels.link_lost(self, graceful=self.graceful)


class _Refused(Protocol):
    """A visitor refused after accept: reset at once (RST), nothing read."""

    def connectionMade(self):
        self.transport.abortConnection()


class AgentLinkFactory(ServerFactory):
    """Builds a RelayLink for each TLS connection on the agent port."""

    _log = Logger()

    noisy = False  # one log line per tunnel/link is ours to write

    def __init__(
        self,
        reactor,
        tunnels,
        check_token,
        *,
        metrics=NULL_METRICS,
        handshake_timeout_seconds: float = DEFAULT_HANDSHAKE_TIMEOUT_SECONDS,
        keepalive_interval_seconds: float,
        keepalive_timeout_seconds: float,
        login_guard: LoginGuard | None = None,
        open_timeout_seconds: float = DEFAULT_OPEN_TIMEOUT_SECONDS,
        max_opens_in_flight: int = DEFAULT_MAX_OPENS_IN_FLIGHT,
        link_buffer_cap: int = DEFAULT_LINK_BUFFER_CAP,
    ):
        self.link_buffer_cap = link_buffer_cap
        self.open_timeout_seconds = open_timeout_seconds
        self.max_opens_in_flight = max_opens_in_flight
        self.visitor_fd_limit = visitor_fd_limit()
        self._out_of_files_logged_at = None
        self.reactor = reactor
        self.login_guard = login_guard if login_guard is not None else LoginGuard(reactor)
        self._busy_logged_at = None
        self.tunnels = tunnels  # relay.node.tunnels.TunnelManager
        self.metrics = metrics
        self.check_token = check_token
        self.handshake_timeout_seconds = handshake_timeout_seconds
        self.keepalive_interval_seconds = keepalive_interval_seconds
        self.keepalive_timeout_seconds = keepalive_timeout_seconds

    def buildProtocol(self, addr):
        source = str(getattr(addr, "host", "?"))
        refused = self.login_guard.admit(source)
        if refused is not None:
            self._refused_at_accept(source, refused)
            return None  # Twisted closes it at once: no TLS work for it
        return RelayLink(self, source)

    def out_of_files(self) -> None:
        """A visitor was closed to keep the file-descriptor reserve: one line per burst."""
        now = self.reactor.seconds()
        if self._out_of_files_logged_at is None or now - self._out_of_files_logged_at >= BUSY_LOG_SECONDS:
            self._out_of_files_logged_at = now
            self._log.warn(
                "open files near the limit: closing new visitors (the last {reserve} are kept "
                "for agent links and the admin port)",
                reserve=FD_RESERVE,
            )

    def _refused_at_accept(self, source: str, why: str) -> None:
        if why == "banned":
            return  # the ban's start was logged once
        now = self.reactor.seconds()
        if self._busy_logged_at is None or now - self._busy_logged_at >= BUSY_LOG_SECONDS:
            self._busy_logged_at = now  # one line per burst, not per connection
            self._log.warn(
                "agent port: {pending} logins in progress ({why}): refusing new connections from {source}",
                pending=self.login_guard.pending, why=why, source=source,
            )

    def tls_handshake_failed(self, reason: str) -> None:
        """A connection on the agent port that never became a TLS session."""
        self._log.warn("agent connection dropped before its handshake: {reason}", reason=reason)


class AgentPortFactory(TLSLayerFactory):
    """The agent port: our stdlib TLS layer around each RelayLink, telling the
    link when its raw connection ends, so a login that never got past TLS
    still leaves the login guard's count.

    `context` is an SSLContext or a callable returning the current one
    (TLSContexts.server_context): asked per connection, so a reloaded
    certificate serves new agents while live links keep their session."""

    def buildProtocol(self, addr):
        link = self.wrapped.buildProtocol(addr)
        if link is None:
            return None
        context = self.context() if callable(self.context) else self.context
        return TLSLayer(context, link, self.clock, on_lost=link.login_ended, **self.layer_options)
