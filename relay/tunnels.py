"""Routing: which public port belongs to which agent link; grace and reclaim.

A tunnel outlives its link for `grace_seconds`: its port stays bound (so no
other tunnel can take it, and visitors are refused at once rather than left
hanging), and the agent that holds the tunnel's reclaim secret can attach it
to a new link. An agent that reconnects before the relay noticed the old link
died takes over at once; the old link is aborted (a stale reservation blocking
the reconnect is the classic bug of frp, sish and localtunnel).

Control operations (JSON on stream 0, docs/protocol.md "Control messages"):
`open_tunnel` (new, or `reclaim` an old one) and `close_tunnel`.
"""

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from relay.link import LISTEN_BACKLOG
from relay.ports import NoFreePortError, PortAllocator

DEFAULT_GRACE_SECONDS = 60.0
# Ports another process happens to hold are skipped; give up after this many.
MAX_BIND_ATTEMPTS = 32


class TunnelRequestError(Exception):
    """A control request the relay refuses; `code` goes back to the agent."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def new_tunnel_id() -> str:
    """16 characters of [a-z2-7] carrying 80 random bits: DNS-safe, unguessable."""
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(eq=False)
class Tunnel:
    tunnel_id: str
    kind: str
    name: str
    host: str
    port: int
    created: float
    reclaim_digest: bytes = field(repr=False)
    link: object = None  # the RelayLink serving it; None while in grace
    listening: object = None  # IListeningPort
    grace_call: object = None
    detached_at: float | None = None
    streams_total: int = 0

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def describe(self) -> dict:
        return {
            "id": self.tunnel_id,
            "kind": self.kind,
            "name": self.name,
            "url": self.url,
            "host": self.host,
            "port": self.port,
            "tcp_socket": [self.host, self.port],
        }


class VisitorFactory(ServerFactory):
    """Accepts visitors on a tunnel's public port and opens a stream for each."""

    noisy = False  # one log line per tunnel/link is ours to write

    def __init__(self, registry: "TunnelRegistry", tunnel: Tunnel):
        self.registry = registry
        self.tunnel = tunnel

    def buildProtocol(self, addr):
        link = self.tunnel.link
        if link is None or link.closed:
            return None  # agent away: Twisted closes the visitor at once
        self.tunnel.streams_total += 1
        return link.open_visitor_stream(self.tunnel, addr)


class TunnelRegistry:
    _log = Logger()

    def __init__(
        self,
        reactor,
        allocator: PortAllocator,
        *,
        interface: str,
        public_host: str,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
    ):
        self.reactor = reactor
        self.allocator = allocator
        self.interface = interface
        self.public_host = public_host
        self.grace_seconds = grace_seconds
        self.tunnels: dict[str, Tunnel] = {}
        self.links: set = set()
        self._ids_used: set[str] = set()

    # -- opening ---------------------------------------------------------------

    @defer.inlineCallbacks
    def open_tcp(self, link, name: str):
        """Bind a random free port for a new tunnel on `link`.

        Returns (tunnel, reclaim_secret); raises TunnelRequestError."""
        try:
            candidates = self.allocator.candidates(MAX_BIND_ATTEMPTS)
        except NoFreePortError as e:
            raise TunnelRequestError("no_free_port", str(e)) from None
        tunnel_id = self._fresh_id()
        secret = secrets.token_urlsafe(24)
        tunnel = Tunnel(
            tunnel_id=tunnel_id,
            kind="tcp",
            name=name,
            host=self.public_host,
            port=0,
            created=self.reactor.seconds(),
            reclaim_digest=_digest(secret),
        )
        factory = VisitorFactory(self, tunnel)
        for port in candidates:
            self.allocator.claim(port)  # before the yield: no concurrent request takes it
            endpoint = serverFromString(
                self.reactor,
                f"tcp:{port}:interface={quoteStringArgument(self.interface)}:backlog={LISTEN_BACKLOG}",
            )
            try:
                tunnel.listening = yield endpoint.listen(factory)
            except CannotListenError:
                self.allocator.in_use.discard(port)  # held elsewhere: not ours to quarantine
                continue
            tunnel.port = port
            break
        else:
            raise TunnelRequestError(
                "no_free_port", f"no bindable port in {self.allocator.low}-{self.allocator.high}"
            )
        if link.closed:  # the agent left while we were binding
            self._unbind(tunnel)
            raise TunnelRequestError("link_closed", "link closed")
        tunnel.link = link
        self.tunnels[tunnel_id] = tunnel
        self._log.info(
            "tunnel {tunnel} open: {url} for agent {agent}",
            tunnel=tunnel_id, url=tunnel.url, agent=link.session_id,
        )
        return tunnel, secret

    def reclaim(self, link, tunnel_id: str, secret: str) -> Tunnel:
        """Attach a held tunnel to a new link, given its reclaim secret."""
        tunnel = self.tunnels.get(tunnel_id) if isinstance(tunnel_id, str) else None
        if tunnel is None or not isinstance(secret, str) or not hmac.compare_digest(
            tunnel.reclaim_digest, _digest(secret)
        ):
            raise TunnelRequestError("reclaim_failed", "tunnel expired or unknown")
        old = tunnel.link
        if tunnel.grace_call is not None and tunnel.grace_call.active():
            tunnel.grace_call.cancel()
        tunnel.grace_call = None
        tunnel.detached_at = None
        tunnel.link = link
        if old is not None and old is not link and not old.closed:
            # The agent is back before we noticed its old link died: take over now.
            self._log.info(
                "agent {agent} reclaimed tunnel {tunnel} from a live link: aborting the old one",
                agent=link.session_id, tunnel=tunnel_id,
            )
            old.replace_session()
        self._log.info("tunnel {tunnel} reattached: {url}", tunnel=tunnel_id, url=tunnel.url)
        return tunnel

    # -- closing -----------------------------------------------------------------

    def close(self, tunnel: Tunnel, why: str) -> None:
        """End a tunnel now: close its visitors, unbind, quarantine its port."""
        if self.tunnels.get(tunnel.tunnel_id) is not tunnel:
            return
        del self.tunnels[tunnel.tunnel_id]
        if tunnel.grace_call is not None and tunnel.grace_call.active():
            tunnel.grace_call.cancel()
        tunnel.grace_call = None
        if tunnel.link is not None:
            tunnel.link.close_visitors(tunnel)
        tunnel.link = None
        self._unbind(tunnel)
        self._log.info("tunnel {tunnel} closed ({why})", tunnel=tunnel.tunnel_id, why=why)

    def _unbind(self, tunnel: Tunnel) -> None:
        if tunnel.listening is not None:
            d = defer.maybeDeferred(tunnel.listening.stopListening)
            d.addErrback(lambda f: self._log.failure("stopListening failed", f))
            tunnel.listening = None
        if tunnel.port:
            self.allocator.release(tunnel.port)

    def link_lost(self, link, graceful: bool) -> None:
        """A link ended: its tunnels end too (agent said goodbye) or wait in grace."""
        self.links.discard(link)
        for tunnel in [t for t in self.tunnels.values() if t.link is link]:
            if graceful:
                self.close(tunnel, "agent closed it")
                continue
            tunnel.link = None
            tunnel.detached_at = self.reactor.seconds()
            tunnel.grace_call = self.reactor.callLater(
                self.grace_seconds, self.close, tunnel, "grace period expired"
            )
            self._log.info(
                "tunnel {tunnel} waits {seconds:.0f}s for its agent to come back",
                tunnel=tunnel.tunnel_id, seconds=self.grace_seconds,
            )

    def close_all(self) -> None:
        for tunnel in list(self.tunnels.values()):
            self.close(tunnel, "relay stopping")

    # -- views -------------------------------------------------------------------

    def describe(self) -> list[dict]:
        out = []
        for tunnel in self.tunnels.values():
            item = tunnel.describe()
            item["state"] = "live" if tunnel.link is not None else "waiting-for-agent"
            item["agent"] = tunnel.link.session_id if tunnel.link is not None else None
            item["visitors"] = tunnel.link.visitor_count(tunnel) if tunnel.link is not None else 0
            item["streams_total"] = tunnel.streams_total
            out.append(item)
        return out

    def _fresh_id(self) -> str:
        while True:
            tunnel_id = new_tunnel_id()
            if tunnel_id not in self._ids_used:
                self._ids_used.add(tunnel_id)  # never reused while the relay runs
                return tunnel_id
