"""The tunnel agent: one TLS link to a relay, tunnels over it, local splices.

`TunnelAgent` keeps the link up with Twisted's ClientService (exponential
backoff with jitter) and, on every new link, asks again for each tunnel it
holds, presenting the tunnel's reclaim secret so the relay gives the same
public address back. `AgentLink` is the agent's end of the mux link: per
stream the relay opens it connects to the service and splices the two
(relay.wire.splice); for a passthrough service given --cert/--key, a
`TLSLayer` runs on the stream itself and its plaintext is what is spliced.

No global reactor here: callers pass one (client/cli.py, the Python API).
"""

import ipaddress
import random
import ssl

from twisted.application.internet import ClientService
from twisted.internet import defer, error as net_error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory
from twisted.logger import Logger
from zope.interface import implementer

from client.errors import (
    AuthenticationError,
    ConfigurationError,
    LimitExceededError,
    RelayUnreachableError,
    RelayVerificationError,
    RelayVersionError,
    TunnelError,
    TunnelLostError,
)
from client.config import ServiceSpec, TunnelSpec, format_target, parse_host_port
from client.proxyheader import proxy_header
from relay.wire.link import DEFAULT_KEEPALIVE_INTERVAL_SECONDS, DEFAULT_KEEPALIVE_TIMEOUT_SECONDS, MuxLink
from relay.mux import ErrorCode, MuxConnection, Role
from relay.mux.connection import LinkState
from relay.mux import control
from relay.wire.metrics import NULL_METRICS
from relay.wire.splice import Splice
from relay.wire.tlslayer import TLSLayer, TLSLayerFactory

AGENT_NAME = "tunnel-client/0.1"
SERVICE_CONNECT_TIMEOUT_SECONDS = 10.0
# Streams the relay may have open on one link, and service connections being
# made at once for them: bounds what a hostile relay's OPENs cost the agent
# (the relay itself caps unanswered opens at 256 per link).
MAX_STREAMS_PER_LINK = 65_536
MAX_DIALS_IN_PROGRESS = 1024
# The TCP connect, and then the TLS handshake, each get this long (--connect-timeout).
RELAY_CONNECT_TIMEOUT_SECONDS = 10.0
# Reconnect backoff: steps of 1 s, doubling, capped at 20 s, each lengthened by
# up to 50% jitter (so 1-1.5 s first, 30 s at most), so a relay restart is not
# met by every agent in the same instant.
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_STEP_SECONDS = 20.0
# Links an agent keeps by default (--links): two, so losing one loses only
# its streams (cloudflared keeps four, Teleport agents a configurable count).
DEFAULT_LINKS = 2
MAX_LINKS = control.MAX_LINKS_PER_SESSION
HEALTHY, DEGRADED, DOWN, INACTIVE = "Healthy", "Degraded", "Down", "Inactive"


_WRONG_NAME = "the relay's certificate does not name"


class _WrongNameError(ValueError):
    """The relay's certificate is valid but for other names (its message
    starts with _WRONG_NAME, which reaches tls_failed as text)."""


def _certificate_names(certificate) -> list[str]:
    from cryptography import x509

    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


class _QuietClientService(ClientService):
    """ClientService without its "Scheduling retry N to connect <endpoint>"
    line: the agent says why each attempt failed, in its own words."""

    _log = Logger(observer=lambda event: None)


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """The relay's endpoint, telling the agent why a connect failed before
    ClientService asks the retry policy (which prints it)."""

    def __init__(self, endpoint, on_failed):
        self._endpoint = endpoint
        self._on_failed = on_failed

    def connect(self, factory):
        def failed(failure):
            self._on_failed(failure)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)

    def __repr__(self):
        return repr(self._endpoint)


class Endpoint:
    """A service's public address, as the relay granted it."""

    def __init__(self, service: ServiceSpec, granted: dict):
        self.service = service
        self.kind = granted.get("kind", "tcp")
        self.url = granted.get("url")
        self.hostname = granted.get("hostname")
        socket_pair = granted.get("tcp_socket") or granted.get("tls_socket") or [None, None]
        self.host, self.port = socket_pair[0], socket_pair[1]

    @property
    def tcp_socket(self) -> tuple[str, int] | None:
        return (self.host, self.port) if self.kind == "tcp" else None

    @property
    def tls_socket(self) -> tuple[str, int] | None:
        return (self.hostname, self.port) if self.kind == "tls" else None

    def describe(self) -> dict:
        out = {"url": self.url}
        if self.kind == "tcp":
            out["tcp_socket"] = [self.host, self.port]
        else:
            out["tls_socket"] = [self.hostname, self.port]
            out["hostname"] = self.hostname
        if self.service.name:
            out["service"] = self.service.name
        out["local"] = self.service.target
        return out


class Tunnel:
    """A tunnel the relay granted: its public addresses, and what they reach.

    `status` is "opening", "live", "reconnecting" (the link dropped; the
    relay holds the addresses for its grace period) or "closed".
    """

    def __init__(self, spec: TunnelSpec, *, keep_address: bool = False):
        self.spec = spec
        self.keep_address = keep_address  # never accept a different address on reconnect
        self.tunnel_id: str | None = None
        self.endpoints: list[Endpoint] = []
        self.reclaim_secret: str | None = None
        self.status = "opening"
        self.error: Exception | None = None  # why it closed, if not by request
        self.opened = defer.Deferred()  # fires with self at the first grant
        self.agent = None  # the TunnelAgent holding it, for `health`
        self.replica = False  # served as a replica of another agent's tunnel of its stable name

    @property
    def health(self) -> str:
        """The agent's status for this tunnel: Healthy (all its links up),
        Degraded (some up), Down (none up, or closed), Inactive (never connected yet)."""
        if self.status == "closed":
            return DOWN
        return self.agent.status if self.agent is not None else INACTIVE

    @property
    def url(self) -> str | None:
        return self.endpoints[0].url if self.endpoints else None

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(e.url for e in self.endpoints)

    @property
    def tls_socket(self) -> tuple[str, int] | None:
        """(hostname, port) of the first TLS endpoint, as in modal.forward."""
        return next((e.tls_socket for e in self.endpoints if e.kind == "tls"), None)

    @property
    def tcp_socket(self) -> tuple[str, int] | None:
        """(relay host, port) of the first TCP endpoint."""
        return next((e.tcp_socket for e in self.endpoints if e.kind == "tcp"), None)

    @property
    def hostname(self) -> str | None:
        return next((e.hostname for e in self.endpoints if e.kind == "tls"), None)

    @property
    def services(self) -> dict[str, Endpoint]:
        """Each named service's endpoint (url, tls_socket or tcp_socket)."""
        return {e.service.name: e for e in self.endpoints}

    def service(self, name: str) -> ServiceSpec | None:
        for service in self.spec.services:
            if service.name == name:
                return service
        return None

    def describe(self) -> list[dict]:
        """One JSON-ready object per endpoint."""
        return [dict(e.describe(), tunnel_id=self.tunnel_id) for e in self.endpoints]


class AgentLink(MuxLink):
    _log = Logger()

    def __init__(self, agent: "TunnelAgent", slot: int = 0):
        super().__init__(
            MuxConnection(Role.AGENT),
            agent.reactor,
            keepalive_interval_seconds=agent.keepalive_interval_seconds,
            keepalive_timeout_seconds=agent.keepalive_timeout_seconds,
            metrics=agent.metrics,
        )
        self.agent = agent
        self.slot = slot  # which of the agent's --links this is
        self.ready = False
        self.joining = False  # its HELLO joins the agent's session (docs/protocol.md)
        self.hello_sent = False
        self.session_id = "?"
        self.dials_in_progress = 0  # service connections being made for streams

    def on_connected(self):
        self.agent.link_connected(self)

    def send_hello(self, join: control.Join | None) -> None:
        """HELLO: a new session keeping the agent's links, or a join of its session."""
        if self.closed or self.hello_sent:
            return
        self.hello_sent = True
        self.joining = join is not None
        self.mux.send_hello(control.hello_fields(
            self.agent.token, AGENT_NAME, links=self.agent.links_wanted, join=join,
        ))
        self.flush()

    def on_hello(self, info: dict):
        self.ready = True
        self.session_id = str(info.get("session", "?"))[:32]
        self.send_ping()  # a round-trip time from the start (/healthz), not after the first keepalive interval
        self.agent.link_ready(self, control.joined_secret(info))

    def on_control(self, message: dict):
        self.agent.control_reply(message)

    def on_stream_opened(self, stream_id: int, metadata: dict):
        tunnel_id, service_name = metadata.get("tunnel"), metadata.get("service", "")
        tunnel = self.agent.tunnels_by_id.get(tunnel_id) if isinstance(tunnel_id, str) else None
        service = tunnel.service(service_name) if tunnel is not None and isinstance(service_name, str) else None
        if service is None:
            self.agent.metrics.visitor_refused(tunnel_id if tunnel is not None else None, "no_such_service")
            self.mux.reset(stream_id, ErrorCode.REFUSED_STREAM, "no such tunnel or service on this agent")
            return
        if len(self.streams) >= MAX_STREAMS_PER_LINK or self.dials_in_progress >= MAX_DIALS_IN_PROGRESS:
            # A hostile (or overloaded) relay's flood of OPENs: refuse the
            # excess at once instead of dialling the service for each.
            busy = "streams_per_link" if len(self.streams) >= MAX_STREAMS_PER_LINK else "dials_in_progress"
            self.agent.metrics.visitor_refused(tunnel_id, "agent_busy")
            self.agent.metrics.limit_hit(busy, None)
            self.mux.reset(stream_id, ErrorCode.REFUSED_STREAM, "agent busy")
            self.flush_soon()
            return
        context = None
        if service.tls_files:
            try:
                context = self.agent.server_context(service)
            except ConfigurationError as e:
                self._log.warn("cannot terminate TLS for {target}: {error}", target=service.target, error=e)
                self.agent.metrics.visitor_refused(tunnel_id, "agent_tls_unavailable")
                self.mux.reset(stream_id, ErrorCode.CONNECT_FAILED, "agent TLS not available")
                return
        # splice.a: the service's TCP connection; splice.b: the stream, or the
        # plaintext of the TLS layer on it. The service is dialled once b is
        # connected: at once, or after the visitor's TLS handshake, so a
        # failed handshake costs the service nothing.
        splice = Splice()
        if service.proxy_protocol:
            splice.a.preamble = proxy_header(service.proxy_protocol, metadata.get("peer"), metadata.get("local"))
        splice.b.when_connected = _ServiceDial(self, stream_id, tunnel, service, splice.a).start
        if context is None:
            self.serve_stream(stream_id, metadata, splice.b)
        else:
            # TLS straight on the stream: no loopback listener, no extra hop.
            layer = TLSLayer(context, splice.b, self.clock, on_handshake_failed=self._visitor_tls_failed)
            self.serve_stream(stream_id, metadata, layer)

    def _visitor_tls_failed(self, reason: str) -> None:
        self._log.debug("visitor TLS handshake failed: {reason}", reason=reason)

    def on_goaway(self, code, message: str):
        if code == ErrorCode.JOIN_REFUSED:
            self._log.info("the relay refused link {slot} into the session ({message}); redialling", slot=self.slot, message=message[:200])
            return
        if code == ErrorCode.DRAINING:
            if self.mux.state is LinkState.OPEN:
                self.agent.link_draining(self)
            else:  # a login refused by a relay that drains: the backoff retries it
                self._log.info("the relay is draining and takes no new agents; retrying")
            return
        if code == ErrorCode.AUTH_FAILED:
            self.agent.metrics.auth_failed(self.agent.relay_host)
            self.agent.fail(AuthenticationError(
                f"the relay refused the token ({message[:200] or 'no reason given'}): check TUNNEL_TOKEN / --token "
                "(a relay started with --rotate-token, or relay-admin token revoke, invalidates tokens)"
            ))
        elif code == ErrorCode.UNSUPPORTED_VERSION:
            self.agent.fail(RelayVersionError(
                f"the relay speaks another protocol version ({message}): "
                "run the same tunnel-relay release on both sides"
            ))
        elif code not in (ErrorCode.NO_ERROR, ErrorCode.SESSION_REPLACED):
            self._log.warn("relay closed the link: {code} {message}", code=getattr(code, "name", code), message=message)

    def on_drained(self) -> None:
        self.close_link(ErrorCode.NO_ERROR, "agent stopping")

    def on_link_lost(self, reason):
        self.agent.link_lost(self)

    def stream_ended(self, stream) -> None:
        super().stream_ended(stream)
        if self.agent.on_visitor is not None:  # once per visitor, with its final byte counts
            self.agent.on_visitor(stream)


class _ServiceDial(ClientFactory):
    """Connects one stream's service and hands the connection to its splice.

    The factory of both paths: reactor.connectTCP to the address that worked
    last time, straight, without an endpoint's Deferred chain and wrapping
    protocol (a third of the agent's CPU per visitor at 2,000 connections/s);
    else the endpoint for the name as given. One object rather than a
    closure per callback: the connector keeps it for the connection's life.
    noisy = False: two "Starting/Stopping factory" lines per visitor would
    drown the agent's log.
    """

    noisy = False
    _log = Logger()

    def __init__(self, link: AgentLink, stream_id: int, tunnel: Tunnel, service: ServiceSpec, side):
        self.link = link
        self.stream_id = stream_id
        self.tunnel = tunnel
        self.service = service
        self.side = side
        self._pending = None  # the connector, or the endpoint's Deferred, while dialling
        self._cancelled = False

    def start(self) -> None:
        agent = self.link.agent
        # A RESET (the visitor left, the relay's open deadline) while we dial
        # cancels the dial: 4,583 visitors that connected and reset used to
        # cost as many connections to the service.
        self.side.cancel_connect = self.cancel
        self.link.dials_in_progress += 1
        address = agent.known_address(self.service)
        if address is not None:
            host, port = address
            self._pending = agent.reactor.connectTCP(host, port, self, timeout=SERVICE_CONNECT_TIMEOUT_SECONDS)
            return
        d = self._pending = agent.service_endpoint(self.service).connect(self)
        d.addCallbacks(self._connected, self._failed)
        d.addErrback(lambda f: self._log.failure("splice setup failed", f))

    def _dial_ended(self) -> None:
        if self._pending is not None:
            self._pending = None
            self.link.dials_in_progress -= 1

    def cancel(self) -> None:
        pending = self._pending
        self._dial_ended()
        if pending is None:
            return
        self._cancelled = True
        if isinstance(pending, defer.Deferred):
            pending.cancel()
            return
        try:
            pending.stopConnecting()  # clientConnectionFailed follows, quietly
        except NotConnectingError:
            pass  # connected in the same turn: the splice aborts it

    def buildProtocol(self, addr):
        self._dial_ended()
        stream = self.link.streams.get(self.stream_id)  # gone if it ended while we connected
        if stream is not None:
            stream.accept()  # ACCEPT: the relay counts the open as done
            stream.report_opened()
        return self.side

    def clientConnectionFailed(self, connector, reason):
        self._failed(reason)

    def _connected(self, protocol) -> None:
        self.link.agent.remember_address(self.service, protocol.transport.getPeer())

    def _failed(self, failure) -> None:
        self._dial_ended()
        if self._cancelled:
            return  # we gave up on purpose: the stream is gone already
        self.link.agent.forget_address(self.service)
        self._log.warn(
            "cannot reach {target} for a visitor of {url}: {error}",
            target=self.service.target, url=self.tunnel.url, error=failure.getErrorMessage(),
        )
        stream = self.link.streams.get(self.stream_id)
        if stream is not None:
            self.link.agent.metrics.visitor_refused(self.tunnel.tunnel_id, "connect_failed")
            stream.reset(ErrorCode.CONNECT_FAILED, "service unreachable")


class _AgentLinkFactory(Factory):

    noisy = False  # one log line per tunnel/link is ours to write
    def __init__(self, agent: "TunnelAgent", slot: int = 0):
        self.agent = agent
        self.slot = slot

    def buildProtocol(self, addr):
        return AgentLink(self.agent, self.slot)


class TunnelAgent:
    """Keeps one link to a relay and the tunnels asked for over it.

    Tunnels come from `specs` at start or from `open_tunnel()` at any time
    (the Python API shares one agent, so one link, per relay and token).
    `on_tunnel(tunnel, event)` is called with "open" when a tunnel is first
    granted, "reconnected" when a reconnect got the same addresses back,
    "moved" when it got new ones (the old ones expired), and "lost" when a
    `keep_address` tunnel could not get its addresses back.
    `on_visitor(stream)` is called as each visitor stream ends (the terminal
    view, client/console.py, lists them).
    `done` fires when the agent stops, or errs with a TunnelError.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        relay: str,
        token: str,
        *,
        ca_path: str | None = None,
        specs: list[TunnelSpec] = (),
        on_tunnel=None,
        fail_on_refusal: bool = True,
        max_retries: int | None = None,
        connect_timeout_seconds: float = RELAY_CONNECT_TIMEOUT_SECONDS,
        keepalive_interval_seconds: float = DEFAULT_KEEPALIVE_INTERVAL_SECONDS,
        keepalive_timeout_seconds: float = DEFAULT_KEEPALIVE_TIMEOUT_SECONDS,
        metrics=NULL_METRICS,
        on_visitor=None,
        links: int = DEFAULT_LINKS,
    ):
        if not token:
            raise ConfigurationError("no token: set TUNNEL_TOKEN or pass --token")
        if isinstance(links, bool) or not isinstance(links, int) or not 1 <= links <= MAX_LINKS:
            raise ConfigurationError(f"--links must be 1 to {MAX_LINKS}")
        self.links_wanted = links
        self.reactor = reactor
        self.relay_host, self.relay_port = parse_host_port(relay)
        self.token = token
        self.ca_path = ca_path
        self.tunnels = [Tunnel(spec) for spec in specs]
        for tunnel in self.tunnels:
            tunnel.agent = self
        self.tunnels_by_id: dict[str, Tunnel] = {}
        self.on_tunnel = on_tunnel or (lambda tunnel, event: None)
        self.on_visitor = on_visitor
        self.fail_on_refusal = fail_on_refusal
        self.max_retries = max_retries
        self.connect_timeout_seconds = connect_timeout_seconds
        self.keepalive_interval_seconds = keepalive_interval_seconds
        self.keepalive_timeout_seconds = keepalive_timeout_seconds
        self.metrics = metrics  # relay.wire.metrics.IMetricsObserver
        # The session (docs/protocol.md, "Joining a session"): its id and join
        # secret while one of our links is in it; its ready links; the link
        # whose fresh HELLO is under way, and the links waiting for it.
        self._session: control.Join | None = None
        self._links_target = 1  # links_wanted once the relay gave a join secret
        self.ready_links: list[AgentLink] = []
        self._primary: AgentLink | None = None
        self._held: list[AgentLink] = []
        self._extra_services: list[ClientService] = []
        self._slot_attempts: dict[int, int] = {}
        self._gone: dict[AgentLink, defer.Deferred] = {}  # links we wait to see closed
        self.done = defer.Deferred()
        self._ever_ready = False
        self._stopping = False
        # request id -> the tunnel being opened, or the Deferred of a close
        self._pending: dict[int, Tunnel | defer.Deferred] = {}
        self._next_request_id = 1
        self._sent_on: dict[int, AgentLink] = {}  # request id -> the link it went on
        self._service: ClientService | None = None
        self._attempts_since_link = 0  # failed connects and lost links since the last ready link
        self._failure_reason: str | None = None  # why the current attempt failed, once known
        self._resolved: dict[ServiceSpec, tuple[str, int]] = {}
        self._server_contexts: dict[ServiceSpec, ssl.SSLContext] = {}  # --cert/--key services
        self._drain: defer.Deferred | None = None  # our own drain (stop with a grace period)
        self._drain_timer = None
        self._drain_started = 0.0
        self._drain_how: str | None = None  # "drained", "deadline" or "forced", once it ended

    @property
    def link(self) -> AgentLink | None:
        """A ready link of the session (the oldest not draining), or None: control requests go on it."""
        live = [link for link in self.ready_links if not link.closed]
        return next((link for link in live if not link.mux.draining), live[0] if live else None)

    @property
    def status(self) -> str:
        """Healthy (every link it keeps is up), Degraded (some), Down (none),
        Inactive (never connected yet)."""
        if not self._ever_ready:
            return INACTIVE
        up = sum(1 for link in self.ready_links if not link.closed)
        if up == 0 or self.stopped:
            return DOWN
        return HEALTHY if up >= self._links_target else DEGRADED

    def link_states(self) -> list[dict]:
        """Each link the agent keeps: up or down, its session and round-trip time (/healthz)."""
        up = {link.slot: link for link in self.ready_links if not link.closed}
        out = []
        for slot in range(self._links_target if self._ever_ready else self.links_wanted):
            link = up.get(slot)
            rtt = link.rtt_seconds if link is not None else None
            out.append({
                "link": slot,
                "state": "up" if link is not None else "down",
                "session": link.session_id if link is not None else None,
                "rtt_ms": None if rtt is None else round(rtt * 1000, 2),
                "streams": len(link.streams) if link is not None else 0,
            })
        return out

    @property
    def ready(self) -> bool:
        """Every tunnel has its address and a link serves it (/ready)."""
        return self.link is not None and all(t.status == "live" for t in self.tunnels)

    @property
    def draining(self) -> bool:
        """Our own drain (stop with a grace period) is under way."""
        return self._drain is not None and self._drain_how is None

    @property
    def stopped(self) -> bool:
        return self._stopping or self.done.called

    def add_tunnel(self, spec: TunnelSpec, *, keep_address: bool = False) -> Tunnel:
        """Ask for one more tunnel on this agent's link; `tunnel.opened` fires
        with it once granted, or errs with a TunnelError."""
        tunnel = Tunnel(spec, keep_address=keep_address)
        tunnel.agent = self
        self.tunnels.append(tunnel)
        if self._link_usable(self.link):
            self._request_tunnel(self.link, tunnel)  # else: asked on the next link
        return tunnel

    def close_tunnel(self, tunnel: Tunnel) -> defer.Deferred:
        """End a tunnel: the relay closes its visitors and frees its addresses."""
        if tunnel in self.tunnels:
            self.tunnels.remove(tunnel)
        if tunnel.tunnel_id is not None and self.tunnels_by_id.get(tunnel.tunnel_id) is tunnel:
            del self.tunnels_by_id[tunnel.tunnel_id]
        was_open = tunnel.status in ("live", "reconnecting", "opening")
        self._mark_closed(tunnel)
        link = self.link
        if not was_open or tunnel.tunnel_id is None or link is None or not link.ready or link.closed:
            return defer.succeed(None)  # nothing granted, or the relay frees it when grace ends
        done = defer.Deferred()
        self._send(link, lambda request_id: control.close_tunnel_request(request_id, tunnel.tunnel_id), done)
        return done

    # -- services ---------------------------------------------------------------------

    def known_address(self, service: ServiceSpec) -> tuple[str, int] | None:
        """The IP address and port that reached this service last time, so a
        visitor costs no name resolution; None until one connection worked."""
        return self._resolved.get(service)

    def service_endpoint(self, service: ServiceSpec):
        """Where to connect for a visitor whose service has no known address:
        the name as given."""
        return HostnameEndpoint(self.reactor, service.host, service.port, timeout=SERVICE_CONNECT_TIMEOUT_SECONDS)

    def server_context(self, service: ServiceSpec) -> ssl.SSLContext:
        """The TLS server context of a passthrough service the agent
        terminates (--cert/--key), built once; ConfigurationError if unusable."""
        context = self._server_contexts.get(service)
        if context is None:
            from client.terminate import server_context

            context = self._server_contexts[service] = server_context(*service.tls_files, service.agent_client_ca)
        return context

    def remember_address(self, service: ServiceSpec, address) -> None:
        host = getattr(address, "host", None)
        if host and service not in self._resolved:
            self._resolved[service] = (host, service.port)

    def forget_address(self, service: ServiceSpec) -> None:
        self._resolved.pop(service, None)

    # -- lifecycle ------------------------------------------------------------------

    def _client_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.ca_path)  # system store if None
        except (OSError, ssl.SSLError) as e:
            raise ConfigurationError(f"cannot read the CA file {self.ca_path}: {e}") from None
        context.check_hostname = False  # service_identity checks the name: _verify_relay
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _verify_relay(self, der: bytes | None) -> None:
        """The relay's certificate must name the host we dialled (RFC 6125, service-identity)."""
        from cryptography import x509
        from service_identity import CertificateError, VerificationError
        from service_identity.cryptography import (
            verify_certificate_hostname,
            verify_certificate_ip_address,
        )

        if not der:
            raise ValueError("the relay presented no certificate")
        certificate = x509.load_der_x509_certificate(der)
        try:
            try:
                ipaddress.ip_address(self.relay_host)
            except ValueError:
                verify_certificate_hostname(certificate, self.relay_host)
            else:
                verify_certificate_ip_address(certificate, self.relay_host)
        except (VerificationError, CertificateError):
            raise _WrongNameError(
                f"{_WRONG_NAME} {self.relay_host} (it names "
                f"{', '.join(_certificate_names(certificate)) or 'nothing'}): "
                "set TUNNEL_RELAY / --relay to one of those names"
            ) from None

    def _endpoint_and_factory(self, slot: int = 0):
        tcp = HostnameEndpoint(
            self.reactor, self.relay_host, self.relay_port, timeout=self.connect_timeout_seconds
        )
        # The agent link's TLS is our stdlib-ssl layer: one C call per frame
        # (relay/wire/tlslayer.py), and no global reactor behind our back.
        factory = TLSLayerFactory(
            self._client_context(), _AgentLinkFactory(self, slot), self.reactor,
            server_side=False, server_hostname=self.relay_host, verify=self._verify_relay,
            on_handshake_failed=self.tls_failed,
            handshake_timeout_seconds=self.connect_timeout_seconds,
        )
        on_failed = self.connect_failed if slot == 0 else (lambda failure: None)
        return _ReportingEndpoint(tcp, on_failed), factory

    @staticmethod
    def _backoff_seconds(failed_attempts: int) -> float:
        step = min(BACKOFF_MAX_STEP_SECONDS, BACKOFF_INITIAL_SECONDS * 2 ** min(failed_attempts - 1, 16))
        # Jitter only lengthens a step: retries never come faster than once a
        # second (the first ones came every 0.26-0.5 s), at most every 30 s.
        return step * (1.0 + random.random() / 2)

    def _retry_delay(self, failed_attempts: int) -> float:
        """The wait before the next attempt, saying once why this one failed.

        `failed_attempts` counts from the last ready link. Before the first
        link each count is an attempt that failed; after a lost link the first
        count is the loss itself (link_lost logs it) and each later one a
        reconnect that failed. Past `max_retries` the agent gives up: after
        the first attempt and N retries, or after N reconnects following a loss."""
        delay = self._backoff_seconds(failed_attempts)
        reason, self._failure_reason = self._failure_reason, None
        # --max-retries counts while no link is up: another link of the
        # session serving means the relay is there, and this one redials.
        giving_up = self.max_retries is not None and failed_attempts > self.max_retries and self.link is None
        if self._ever_ready:
            number, total, what = failed_attempts - 1, self.max_retries, "reconnect"
        else:
            total = None if self.max_retries is None else self.max_retries + 1
            number, what = failed_attempts, "attempt"
        if number > 0:
            self._log.warn(
                "cannot reach the relay {relay} ({what} {number}{of}): {reason}{then}",
                relay=self.relay_address, what=what, number=number,
                of="" if total is None else f" of {total}",
                reason=reason or "the connection closed before the session started",
                then="" if giving_up else f"; retrying in {delay:.1f} s",
            )
        if giving_up:
            tries = f"{number} {what}{'' if number == 1 else 's'}"
            self.reactor.callLater(0, self.fail, RelayUnreachableError(
                f"gave up on the relay {self.relay_address} after {tries} (--max-retries {self.max_retries})"
            ))
        return delay

    def _next_retry_delay(self, failed_attempts: int) -> float:
        """ClientService's retryPolicy. Its count restarts at every TCP connect,
        even one dropped before the relay's HELLO (TLS failed, a proxy in front
        of a stopped relay): count from the last ready link instead, or such a
        relay is retried at the first step forever and --max-retries never gives up."""
        self._attempts_since_link += 1
        return self._retry_delay(self._attempts_since_link)

    @property
    def relay_address(self) -> str:
        return format_target(self.relay_host, self.relay_port)

    def connect_failed(self, failure) -> None:
        """The TCP connect to the relay failed: remember why, in our words."""
        if failure.check(defer.CancelledError, net_error.ConnectingCancelledError):
            return  # we are stopping
        if failure.check(net_error.ConnectionRefusedError):
            reason = "connection refused (is the relay running, and is this its agent port?)"
        elif failure.check(net_error.DNSLookupError):
            reason = f"the name {self.relay_host} does not resolve"
        elif failure.check(net_error.TimeoutError):
            reason = f"timed out: no answer within {self.connect_timeout_seconds:g} s"
        else:
            reason = failure.getErrorMessage()
        self._failure_reason = reason

    def start(self) -> None:
        endpoint, factory = self._endpoint_and_factory()
        self._service = _QuietClientService(endpoint, factory, retryPolicy=self._next_retry_delay, clock=self.reactor)
        self._service.startService()

    def _start_extra_links(self) -> None:
        """Links 1..N-1, once the relay gave our session a join secret: each
        its own ClientService, redialling with its own backoff and jitter."""
        if self._extra_services or self._stopping or self._service is None:
            return
        for slot in range(1, self._links_target):
            endpoint, factory = self._endpoint_and_factory(slot)
            service = _QuietClientService(
                endpoint, factory, retryPolicy=lambda n, slot=slot: self._slot_retry_delay(slot), clock=self.reactor,
            )
            self._extra_services.append(service)
            service.startService()

    def _slot_retry_delay(self, slot: int) -> float:
        """An extra link's backoff: the same steps and jitter, counted per
        link from its last ready link, quietly (link 0 says why it fails)."""
        attempts = self._slot_attempts[slot] = self._slot_attempts.get(slot, 0) + 1
        return self._backoff_seconds(attempts)

    # -- the session's links -------------------------------------------------------

    def link_connected(self, link: AgentLink) -> None:
        """TLS is up: join our session if one of our links is in it, else
        start one; while another link's fresh HELLO is under way, wait for it
        (two fresh sessions would take the tunnels from each other). A link
        redialled while we stop or drain joins nothing: it would take visitors."""
        if self._stopping:
            link.abort_link()
            return
        if self._session is not None and self.link is not None:
            link.send_hello(self._session)
        elif self._primary is None or self._primary.closed:
            self._primary = link
            link.send_hello(None)
        else:
            self._held.append(link)

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for link in held:
            if not link.closed:
                self.link_connected(link)

    def _services(self) -> list:
        return [s for s in [self._service, *self._extra_services] if s is not None]

    def _open_links(self) -> list:
        links = list(self.ready_links)
        links += [link for link in [self._primary, *self._held] if link is not None and link not in links]
        return [link for link in links if not link.closed]

    def _wait_gone(self, link: AgentLink) -> defer.Deferred:
        d = self._gone.get(link)
        if d is None:
            d = self._gone[link] = defer.Deferred()
        return d

    @staticmethod
    def _link_usable(link) -> bool:
        """A link new tunnels may be asked on: ready, open, and neither side draining."""
        return link is not None and link.ready and not link.closed and not link.mux.draining

    def stop(self, grace_seconds: float = 0.0) -> defer.Deferred:
        """Say goodbye (the relay frees our tunnels and closes their visitors), then stop.

        With `grace_seconds`, drain first (docs/protocol.md, "Draining"):
        GOAWAY(DRAINING) makes the relay free our tunnels at once, so no new
        visitor comes, while the streams in progress run to their end for at
        most that long. A second call while draining stops at once."""
        if self._drain is not None:
            if not self._drain.called:
                self._end_drain("forced")
            return self._drain
        links = [link for link in self.ready_links if not link.closed]
        streams = sum(len(link.streams) for link in links)
        if grace_seconds > 0 and streams:
            self._stopping = True
            self._drain = defer.Deferred()
            self._drain_started = self.reactor.seconds()
            self._log.info(
                "draining: {streams} stream(s) may finish within {seconds:g}s; no new visitors "
                "(SIGTERM again or SIGINT: stop at once)",
                streams=streams, seconds=grace_seconds,
            )
            gone = defer.DeferredList([self._wait_gone(link) for link in links])
            gone.addCallback(lambda _: self._end_drain("drained"))
            self._drain_timer = self.reactor.callLater(grace_seconds, self._end_drain, "deadline")
            for link in links:
                link.drain("agent draining")
            return self._drain
        return self._stop_now()

    def _end_drain(self, how: str) -> None:
        if self._drain is None or self._drain_how is not None:
            return
        self._drain_how = how
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        left = sum(len(link.streams) for link in self.ready_links if not link.closed)
        elapsed = self.reactor.seconds() - self._drain_started
        if how == "drained":
            self._log.info("drained in {seconds:.2f}s: every stream finished", seconds=elapsed)
        elif how == "deadline":
            self._log.warn("grace period over after {seconds:.2f}s: closing {streams} stream(s)", seconds=elapsed, streams=left)
        else:
            self._log.info("stopping at once: closing {streams} stream(s)", streams=left)
        d = self._stop_now()
        d.addBoth(lambda _: self._drain.callback(None))

    def _stop_now(self) -> defer.Deferred:
        self._stopping = True
        waits = []
        for link in self._open_links():
            waits.append(self._wait_gone(link))
            link.close_link(ErrorCode.NO_ERROR, "agent stopping")
        for service in self._services():
            if service.running:
                waits.append(service.stopService())
        d = defer.DeferredList(waits, consumeErrors=True)
        d.addTimeout(3, self.reactor)
        d.addErrback(lambda f: None)  # stopping anyway: a slow goodbye is not an error
        d.addCallback(lambda _: self._finish(None))
        return d

    def fail(self, error: TunnelError) -> None:
        if self.done.called:
            return
        self._stopping = True
        for service in self._services():
            if service.running:
                service.stopService().addErrback(lambda f: None)
        for link in self._open_links():
            link.close_link(ErrorCode.NO_ERROR, "agent stopping")
        for tunnel in self.tunnels:
            self._mark_closed(tunnel)
            tunnel.error = error
            if not tunnel.opened.called:
                tunnel.opened.errback(error)
                tunnel.opened.addErrback(lambda f: None)  # the caller may have gone
        self.done.errback(error)

    def _finish(self, result) -> None:
        if not self.done.called:
            self.done.callback(result)

    # -- link events -------------------------------------------------------------------

    def link_ready(self, link: AgentLink, join_secret: str | None = None) -> None:
        if self._stopping and link.joining:
            # Joined while we stop or drain: it would serve new visitors. Goodbye.
            link.close_link(ErrorCode.NO_ERROR, "agent stopping")
            return
        self.ready_links.append(link)
        self.metrics.link_up(link.session_id, f"{self.relay_host}:{self.relay_port}")
        if link.slot == 0:
            self._attempts_since_link = 0
        else:
            self._slot_attempts[link.slot] = 0
        if link.joining:
            # One more link of our session: it serves the session's tunnels already.
            self._log.info(
                "link {slot} joined session {session}: {up} of {wanted} links up",
                slot=link.slot, session=link.session_id, up=len(self.ready_links), wanted=self._links_target,
            )
            return
        if self._primary is link:
            self._primary = None
        first = not self._ever_ready
        self._ever_ready = True
        # A relay that predates sessions gives no join secret: one link then.
        self._session = control.Join(link.session_id, join_secret) if join_secret else None
        self._links_target = self.links_wanted if join_secret else 1
        if not first:
            self._log.info("link to the relay is back (session {session})", session=link.session_id)
        for tunnel in self.tunnels:
            self._request_tunnel(link, tunnel)
        self._release_held()
        self._start_extra_links()

    def link_draining(self, link: AgentLink) -> None:
        """The relay drains: its streams in progress finish on this link, no
        new visitor comes through it and no tunnel is asked on it; once the
        relay closes it, the agent reconnects with its backoff and asks for
        each tunnel again with its reclaim secret."""
        self._log.info(
            "the relay is draining: {streams} stream(s) finish on this link, then reconnecting",
            streams=len(link.streams),
        )
        if self._link_usable(self.link):
            return  # another link still serves the session
        for tunnel in self.tunnels:
            if tunnel.status == "live":
                tunnel.status = "reconnecting"

    def link_lost(self, link: AgentLink) -> None:
        if link in self.ready_links:
            self.ready_links.remove(link)
        if link in self._held:
            self._held.remove(link)
        if self._primary is link:
            self._primary = None
            self._release_held()  # one of them starts the session instead
        if link.ready:
            self.metrics.link_down(link.session_id, "stopping" if self._stopping else "lost")
        gone = self._gone.pop(link, None)
        if gone is not None and not gone.called:
            gone.callback(None)
        others = self.link
        if others is not None:
            # The session lives on its other links: only this one's streams
            # are lost; requests in flight on it go again on another.
            moved = {rid: w for rid, w in self._pending.items() if self._sent_on.get(rid) is link}
            for request_id, waiter in moved.items():
                self._pending.pop(request_id)
                self._sent_on.pop(request_id, None)
                if isinstance(waiter, Tunnel):
                    self._request_tunnel(others, waiter)
                elif not waiter.called:
                    waiter.callback(None)
            if link.ready and not self._stopping:
                self._log.warn(
                    "lost link {slot} to the relay: {up} of {wanted} links up (Degraded); redialling it",
                    slot=link.slot, up=len(self.ready_links), wanted=self._links_target,
                )
            return
        if link.ready:
            self._session = None  # every link is gone: the next one starts a new session
        pending, self._pending = self._pending, {}
        self._sent_on = {}
        for waiter in pending.values():
            if isinstance(waiter, defer.Deferred) and not waiter.called:
                waiter.callback(None)  # a close with the link gone: the relay frees it after grace
        for tunnel in self.tunnels:
            if tunnel.status == "live":
                tunnel.status = "reconnecting"
        if self._stopping or not link.ready:
            return
        if self.max_retries == 0:
            self.fail(RelayUnreachableError("lost the link to the relay (--max-retries 0)"))
            return
        if link.mux.draining_remote:
            self._log.info("the relay closed its drained link; reconnecting")
        else:
            self._log.warn("lost the link to the relay; reconnecting")

    def tls_failed(self, reason: str) -> None:
        """The TLS handshake with the relay failed. Before any session a
        certificate that does not verify is a set-up problem no retry fixes:
        the agent exits (code 4). Otherwise remember why, for the retry line."""
        lowered = reason.lower()
        verify = False
        if reason.startswith(_WRONG_NAME):
            verify, message = True, reason
        elif "certificate verify failed" in lowered:
            detail = reason.split("certificate verify failed:", 1)[-1].strip(" ()") or reason
            trust = (
                f"TUNNEL_CA / --ca is {self.ca_path}" if self.ca_path
                else "no TUNNEL_CA / --ca is set, so the system trust store was used"
            )
            verify, message = True, (
                f"the relay's certificate is not trusted ({detail}); {trust}: point TUNNEL_CA at "
                "the CA that signed it (a development relay's is relay-state/ca.pem)"
            )
        elif "handshake not done" in lowered:
            message = (
                f"timed out: no TLS answer within {self.connect_timeout_seconds:g} s "
                "(is this the relay's agent port?)"
            )
        elif "during the tls handshake" in lowered:
            message = "the connection closed during the TLS handshake (is this the relay's agent port?)"
        else:
            message = f"TLS failed: {reason}"
        if verify and not self._ever_ready:
            self.fail(RelayVerificationError(f"cannot use the relay {self.relay_address}: {message}"))
            return
        self._failure_reason = message

    # -- control ---------------------------------------------------------------------------

    def _send(self, link: AgentLink, make_request, waiter) -> None:
        """Send the request `make_request(request_id)`; its reply goes to `waiter`."""
        request_id = self._next_request_id
        self._next_request_id += 1
        self._pending[request_id] = waiter
        self._sent_on[request_id] = link
        link.mux.send_control(make_request(request_id))
        link.flush()

    def _give_back(self, tunnel_id: str) -> None:
        """Close a tunnel the relay granted that nobody wants any more."""
        if self.link is not None and not self.link.closed:
            self._send(self.link, lambda rid: control.close_tunnel_request(rid, tunnel_id), defer.Deferred())

    def _request_tunnel(self, link: AgentLink, tunnel: Tunnel) -> None:
        reclaim = (tunnel.tunnel_id, tunnel.reclaim_secret) if tunnel.reclaim_secret is not None else None
        self._send(link, lambda rid: control.open_tunnel_request(rid, tunnel.spec.wire(), reclaim), tunnel)

    def control_reply(self, message: dict) -> None:
        """A reply from the relay (relay/mux/control.py): a close's, or an open's."""
        reply = control.parse_reply(message)  # no id: ControlEnvelopeError, the link closes
        waiter = self._pending.pop(reply.request_id, None)
        self._sent_on.pop(reply.request_id, None)
        if isinstance(waiter, defer.Deferred):  # a close_tunnel reply
            if not waiter.called:
                waiter.callback(None)
            return
        tunnel = waiter
        if tunnel is None:
            return  # not ours (or a reply to a link that went away)
        if tunnel not in self.tunnels:
            if reply.ok:  # closed by our user while the request was in flight: give it back
                self._give_back(control.granted_tunnel(reply)[0])
            return
        if not reply.ok and reply.error.code is control.RequestErrorCode.RELAY_DRAINING:
            return  # the request crossed the relay's drain: asked again on the next link
        if not reply.ok:
            targets = ", ".join(s.target for s in tunnel.spec.services)
            error = reply.error
            self._refused(tunnel, type(error)(error.code, f"the relay refused a tunnel to {targets}: {error}"))
            return
        tunnel_id, granted_endpoints, secret = control.granted_tunnel(reply)
        if reply.body.get("replica") is True and not tunnel.replica:
            tunnel.replica = True
            self._log.info("another agent serves this name too: this one is a replica of its tunnel {tunnel}", tunnel=tunnel_id)
        self._granted(tunnel, tunnel_id, granted_endpoints, secret)

    def _granted(self, tunnel: Tunnel, tunnel_id: str, granted_endpoints: list, secret: str | None) -> None:
        old_urls = tunnel.urls
        by_name = {e.get("service", ""): e for e in granted_endpoints}
        new_endpoints = [Endpoint(s, by_name.get(s.name, {})) for s in tunnel.spec.services]
        new_urls = tuple(e.url for e in new_endpoints)
        if old_urls and new_urls != old_urls and tunnel.keep_address:
            # Never a silently different address: give the new one back, end this one.
            self._give_back(tunnel_id)
            self.tunnels.remove(tunnel)
            self.tunnels_by_id.pop(tunnel.tunnel_id, None)
            self._mark_closed(tunnel)
            tunnel.error = TunnelLostError(
                f"{' '.join(old_urls)} expired while the link to the relay was down"
            )
            self._log.warn("{error}", error=tunnel.error)
            self.on_tunnel(tunnel, "lost")
            return
        old_id = tunnel.tunnel_id
        if old_id is not None:
            self.tunnels_by_id.pop(old_id, None)
        tunnel.tunnel_id = tunnel_id
        tunnel.endpoints = new_endpoints
        if secret:
            tunnel.reclaim_secret = secret
        self.tunnels_by_id[tunnel.tunnel_id] = tunnel
        tunnel.status = "live"
        if not old_urls:
            event = "open"
            kinds = {e.kind for e in tunnel.endpoints}
            self.metrics.tunnel_opened(tunnel.tunnel_id, kinds.pop() if len(kinds) == 1 else "mixed")
            for endpoint in tunnel.endpoints:
                self._log.info(
                    "forwarding {url} -> {target}", url=endpoint.url, target=endpoint.service.target
                )
        elif old_urls == tunnel.urls:
            event = "reconnected"
            self._log.info("{urls} is live again", urls=" ".join(tunnel.urls))
        else:
            event = "moved"
            if old_id != tunnel_id:  # a new tunnel id: the old one's series end (relay/wire/prommetrics.py)
                kinds = {e.kind for e in tunnel.endpoints}
                self.metrics.tunnel_closed(old_id, "expired")
                self.metrics.tunnel_opened(tunnel_id, kinds.pop() if len(kinds) == 1 else "mixed")
            self._log.warn(
                "{old} expired while the link was down; the tunnel is now {urls}",
                old=" ".join(old_urls), urls=" ".join(tunnel.urls),
            )
        self.on_tunnel(tunnel, event)
        if not tunnel.opened.called:
            tunnel.opened.callback(tunnel)

    def _mark_closed(self, tunnel: Tunnel) -> None:
        if tunnel.status != "closed" and tunnel.endpoints:
            self.metrics.tunnel_closed(tunnel.tunnel_id, "closed")
        tunnel.status = "closed"

    def _refused(self, tunnel: Tunnel, error: TunnelError) -> None:
        lost = tunnel.keep_address and bool(tunnel.urls)
        if lost:
            # A reconnect found the addresses expired and the relay could not
            # even offer new ones (e.g. the freed port is in quarantine): to the
            # caller, as in control_reply, the addresses are lost.
            error = TunnelLostError(
                f"{' '.join(tunnel.urls)} expired while the link to the relay was down ({error})"
            )
        others = [t for t in self.tunnels if t is not tunnel and t.status != "closed"]
        if self.fail_on_refusal and not (isinstance(error, LimitExceededError) and others):
            self.fail(error)
            if lost:
                self.on_tunnel(tunnel, "lost")
            return
        if self.fail_on_refusal:
            # A limit of the token (docs/security.md) refused this one tunnel:
            # say which, and keep the others; the last one refused ends the agent.
            self._log.warn("{error}; keeping the other tunnels", error=error)
        self.tunnels.remove(tunnel)
        if tunnel.tunnel_id is not None and self.tunnels_by_id.get(tunnel.tunnel_id) is tunnel:
            del self.tunnels_by_id[tunnel.tunnel_id]
        self._mark_closed(tunnel)
        tunnel.error = error
        if lost:
            self.on_tunnel(tunnel, "lost")
        if not tunnel.opened.called:
            tunnel.opened.errback(error)
            if self.fail_on_refusal:
                # Said once in the warning above; nobody else waits on it (the
                # CLI), so it must not end as "Unhandled error in Deferred".
                tunnel.opened.addErrback(lambda _failure: None)
