"""The tunnel agent: one TLS link to a relay, tunnels over it, local splices.

`TunnelAgent` keeps the link up with Twisted's ClientService (exponential
backoff with jitter) and, on every new link, asks again for each tunnel it
holds, presenting the tunnel's reclaim secret so the relay gives the same
public address back. `AgentLink` is the agent's end of the mux link: it opens
a local connection per stream the relay opens.

No global reactor here: callers pass one (client/cli.py, the Python API).
"""

import random

from OpenSSL import SSL
from twisted.application.internet import ClientService
from twisted.internet import defer, error as net_error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger

from client.errors import (
    AuthenticationError,
    ConfigurationError,
    RelayUnreachableError,
    RelayVerificationError,
    TunnelError,
    request_error,
)
from relay.link import DEFAULT_KEEPALIVE_INTERVAL_SECONDS, DEFAULT_KEEPALIVE_TIMEOUT_SECONDS, MuxLink, SplicedConnection
from relay.mux import ErrorCode, MuxConnection, Role

AGENT_NAME = "tunnel-client/0.1"
SERVICE_CONNECT_TIMEOUT_SECONDS = 10.0
RELAY_CONNECT_TIMEOUT_SECONDS = 10.0
# Reconnect backoff: 0.5 s, doubling, capped at 30 s, each with up to 50% jitter
# so a relay restart is not met by every agent in the same instant.
BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0


def parse_host_port(text: str, default_host: str | None = None) -> tuple[str, int]:
    """'22' -> (default_host, 22); 'db:5432'; '[::1]:22' -> ('::1', 22)."""
    text = str(text).strip()
    host, port_text = default_host, text
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ConfigurationError(f"bad address {text!r}: use [IPv6]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigurationError(f"bad address {text!r}: the port must be a number") from None
    if not 1 <= port <= 65535 or not host:
        raise ConfigurationError(f"bad address {text!r}: need [HOST:]PORT with PORT in 1-65535")
    return host, port


class TunnelSpec:
    """What the user asked for: a local target and the kind of tunnel."""

    def __init__(self, host: str, port: int, kind: str = "tcp", name: str | None = None):
        self.host, self.port, self.kind = host, port, kind
        self.name = name or (str(port) if host == "localhost" else f"{host}:{port}")

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Tunnel:
    """A tunnel the relay granted: its public address, and what it reaches."""

    def __init__(self, spec: TunnelSpec):
        self.spec = spec
        self.tunnel_id: str | None = None
        self.host: str | None = None
        self.port: int | None = None
        self.url: str | None = None
        self.reclaim_secret: str | None = None
        self._resolved = None  # an endpoint that worked: skip name resolution next time

    @property
    def tcp_socket(self) -> tuple[str, int]:
        return (self.host, self.port)

    def describe(self) -> dict:
        return {
            "url": self.url,
            "tcp_socket": [self.host, self.port],
            "local": self.spec.target,
            "name": self.spec.name,
            "tunnel_id": self.tunnel_id,
        }

    def local_endpoint(self, reactor):
        if self._resolved is not None:
            return self._resolved
        return HostnameEndpoint(reactor, self.spec.host, self.spec.port, timeout=SERVICE_CONNECT_TIMEOUT_SECONDS)

    def remember_address(self, reactor, address) -> None:
        host = getattr(address, "host", None)
        if not host or self._resolved is not None:
            return
        endpoint_class = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        self._resolved = endpoint_class(reactor, host, self.spec.port, timeout=SERVICE_CONNECT_TIMEOUT_SECONDS)

    def forget_address(self) -> None:
        self._resolved = None


class AgentLink(MuxLink):
    _log = Logger()

    def __init__(self, agent: "TunnelAgent"):
        super().__init__(
            MuxConnection(Role.AGENT),
            agent.reactor,
            keepalive_interval_seconds=agent.keepalive_interval_seconds,
            keepalive_timeout_seconds=agent.keepalive_timeout_seconds,
        )
        self.agent = agent
        self.ready = False
        self.session_id = "?"

    def on_connected(self):
        self.mux.send_hello({"token": self.agent.token, "agent": AGENT_NAME})
        self.flush()

    def on_hello(self, info: dict):
        self.ready = True
        self.session_id = str(info.get("session", "?"))[:32]
        self.agent.link_ready(self)

    def on_control(self, message: dict):
        self.agent.control_reply(message)

    def on_stream_opened(self, stream_id: int, metadata: dict):
        tunnel = self.agent.tunnels_by_id.get(metadata.get("tunnel"))
        if tunnel is None:
            self.mux.reset(stream_id, ErrorCode.REFUSED_STREAM, "no such tunnel on this agent")
            return
        splice = SplicedConnection(self, stream_id)
        self.attach_splice(splice)
        endpoint = tunnel.local_endpoint(self.clock)

        def connected(protocol):
            tunnel.remember_address(self.clock, protocol.transport.getPeer())

        def failed(failure):
            tunnel.forget_address()
            self._log.warn(
                "cannot reach {target} for a visitor of {url}: {error}",
                target=tunnel.spec.target, url=tunnel.url, error=failure.getErrorMessage(),
            )
            if self.splices.pop(stream_id, None) is not None and not self.closed:
                splice.stream_open = False
                self.mux.reset(stream_id, ErrorCode.CONNECT_FAILED, "service unreachable")
                self.flush()

        d = endpoint.connect(_SpliceFactory(splice))
        d.addCallbacks(connected, failed)
        d.addErrback(lambda f: self._log.failure("splice setup failed", f))

    def on_goaway(self, code, message: str):
        if code == ErrorCode.AUTH_FAILED:
            self.agent.fail(AuthenticationError(
                "the relay refused the token: check TUNNEL_TOKEN / --token "
                "(a relay started with --rotate-token invalidates old tokens)"
            ))
        elif code not in (ErrorCode.NO_ERROR, ErrorCode.SESSION_REPLACED):
            self._log.warn("relay closed the link: {code} {message}", code=getattr(code, "name", code), message=message)

    def on_link_lost(self, reason):
        if not self.ready and reason.check(SSL.Error):
            self.agent.tls_failed(reason)
        self.agent.link_lost(self)


class _SpliceFactory(Factory):
    """connectProtocol()'s one-shot factory without its "Starting/Stopping
    factory" lines: two info lines per visitor would drown the agent's log."""

    noisy = False

    def __init__(self, splice: SplicedConnection):
        self.splice = splice

    def buildProtocol(self, addr):
        return self.splice


class _AgentLinkFactory(Factory):

    noisy = False  # one log line per tunnel/link is ours to write
    def __init__(self, agent: "TunnelAgent"):
        self.agent = agent

    def buildProtocol(self, addr):
        return AgentLink(self.agent)


class TunnelAgent:
    """Keeps one link to a relay and the tunnels asked for over it.

    `on_tunnel(tunnel, event)` is called with event "open" when a tunnel is
    first granted, "moved" when a reconnect got a different address (the old
    one expired), and "reconnected" when the same address came back.
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
        max_retries: int | None = None,
        keepalive_interval_seconds: float = DEFAULT_KEEPALIVE_INTERVAL_SECONDS,
        keepalive_timeout_seconds: float = DEFAULT_KEEPALIVE_TIMEOUT_SECONDS,
    ):
        if not token:
            raise ConfigurationError("no token: set TUNNEL_TOKEN or pass --token")
        self.reactor = reactor
        self.relay_host, self.relay_port = parse_host_port(relay)
        self.token = token
        self.ca_path = ca_path
        self.tunnels = [Tunnel(spec) for spec in specs]
        self.tunnels_by_id: dict[str, Tunnel] = {}
        self.on_tunnel = on_tunnel or (lambda tunnel, event: None)
        self.max_retries = max_retries
        self.keepalive_interval_seconds = keepalive_interval_seconds
        self.keepalive_timeout_seconds = keepalive_timeout_seconds
        self.link: AgentLink | None = None
        self.done = defer.Deferred()
        self._ever_ready = False
        self._stopping = False
        self._pending: dict[int, tuple[Tunnel, bool]] = {}
        self._next_request_id = 1
        self._service: ClientService | None = None
        self._link_gone: defer.Deferred | None = None

    # -- lifecycle ------------------------------------------------------------------

    def _endpoint(self):
        if self.ca_path:
            try:
                with open(self.ca_path, "rb") as f:
                    trust_root = Certificate.loadPEM(f.read())
            except (OSError, ValueError, SSL.Error) as e:
                raise ConfigurationError(f"cannot read the CA file {self.ca_path}: {e}") from None
        else:
            trust_root = platformTrust()
        tls = optionsForClientTLS(self.relay_host, trustRoot=trust_root)
        tcp = HostnameEndpoint(
            self.reactor, self.relay_host, self.relay_port, timeout=RELAY_CONNECT_TIMEOUT_SECONDS
        )
        return wrapClientTLS(tls, tcp)

    def _retry_delay(self, failed_attempts: int) -> float:
        if self.max_retries is not None and failed_attempts > self.max_retries:
            self.reactor.callLater(0, self.fail, RelayUnreachableError(
                f"gave up on the relay {self.relay_host}:{self.relay_port} "
                f"after {self.max_retries} retries"
            ))
        if failed_attempts > 1 or not self._ever_ready:
            self._log.info(
                "relay {host}:{port} unreachable (attempt {n}); retrying",
                host=self.relay_host, port=self.relay_port, n=failed_attempts,
            )
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2 ** min(failed_attempts - 1, 16))
        return delay * (0.5 + random.random() / 2)

    def start(self) -> None:
        self._service = ClientService(
            self._endpoint(), _AgentLinkFactory(self), retryPolicy=self._retry_delay, clock=self.reactor
        )
        self._service.startService()

    def stop(self) -> defer.Deferred:
        """Say goodbye (the relay frees our tunnels and closes their visitors), then stop."""
        self._stopping = True
        link = self.link
        waits = []
        if link is not None and not link.closed:
            self._link_gone = defer.Deferred()
            waits.append(self._link_gone)
            link.close_link(ErrorCode.NO_ERROR, "agent stopping")
        if self._service is not None and self._service.running:
            waits.append(self._service.stopService())
        d = defer.DeferredList(waits, consumeErrors=True)
        d.addTimeout(3, self.reactor)
        d.addErrback(lambda f: None)  # stopping anyway: a slow goodbye is not an error
        d.addCallback(lambda _: self._finish(None))
        return d

    def fail(self, error: TunnelError) -> None:
        if self.done.called:
            return
        self._stopping = True
        if self._service is not None and self._service.running:
            self._service.stopService().addErrback(lambda f: None)
        if self.link is not None:
            self.link.close_link(ErrorCode.NO_ERROR, "agent stopping")
        self.done.errback(error)

    def _finish(self, result) -> None:
        if not self.done.called:
            self.done.callback(result)

    # -- link events -------------------------------------------------------------------

    def link_ready(self, link: AgentLink) -> None:
        self.link = link
        first = not self._ever_ready
        self._ever_ready = True
        if not first:
            self._log.info("link to the relay is back (session {session})", session=link.session_id)
        for tunnel in self.tunnels:
            self._request_tunnel(link, tunnel)

    def link_lost(self, link: AgentLink) -> None:
        if self.link is link:
            self.link = None
        if self._link_gone is not None and not self._link_gone.called:
            self._link_gone.callback(None)
        self._pending.clear()
        if self._stopping or not link.ready:
            return
        if self.max_retries == 0:
            self.fail(RelayUnreachableError("lost the link to the relay (--max-retries 0)"))
            return
        self._log.warn("lost the link to the relay; reconnecting")

    def tls_failed(self, reason) -> None:
        message = f"TLS with the relay {self.relay_host}:{self.relay_port} failed: {reason.getErrorMessage()}"
        if not self._ever_ready:
            # Before any session succeeded this is a set-up problem, not a network blip.
            self.fail(RelayVerificationError(
                message + " (is TUNNEL_CA / --ca the relay's CA, and TUNNEL_RELAY the name in its certificate?)"
            ))
        else:
            self._log.warn("{message}", message=message)

    # -- control ---------------------------------------------------------------------------

    def _request_tunnel(self, link: AgentLink, tunnel: Tunnel) -> None:
        request_id = self._next_request_id
        self._next_request_id += 1
        request = {"id": request_id, "op": "open_tunnel", "kind": tunnel.spec.kind, "name": tunnel.spec.name}
        if tunnel.reclaim_secret is not None:
            request["reclaim"] = {"tunnel": tunnel.tunnel_id, "secret": tunnel.reclaim_secret}
        self._pending[request_id] = tunnel
        link.mux.send_control(request)
        link.flush()

    def control_reply(self, message: dict) -> None:
        tunnel = self._pending.pop(message.get("id"), None)
        if tunnel is None:
            return
        if not message.get("ok"):
            error = message.get("error") or {}
            self.fail(request_error(
                str(error.get("code", "error")),
                f"the relay refused a tunnel to {tunnel.spec.target}: {error.get('message', 'no reason given')}",
            ))
            return
        granted = message.get("tunnel") or {}
        old_url = tunnel.url
        if tunnel.tunnel_id is not None:
            self.tunnels_by_id.pop(tunnel.tunnel_id, None)
        tunnel.tunnel_id = granted.get("id")
        tunnel.host = granted.get("host")
        tunnel.port = granted.get("port")
        tunnel.url = granted.get("url")
        if message.get("reclaim_secret"):
            tunnel.reclaim_secret = message["reclaim_secret"]
        self.tunnels_by_id[tunnel.tunnel_id] = tunnel
        if old_url is None:
            event = "open"
            self._log.info("forwarding {url} -> {target}", url=tunnel.url, target=tunnel.spec.target)
        elif old_url == tunnel.url:
            event = "reconnected"
            self._log.info("{url} is live again", url=tunnel.url)
        else:
            event = "moved"
            self._log.warn(
                "{old} expired while the link was down; the tunnel is now {url}", old=old_url, url=tunnel.url
            )
        self.on_tunnel(tunnel, event)


def is_connection_refused(failure) -> bool:
    return failure.check(net_error.ConnectionRefusedError) is not None
