"""Routing: public port or TLS hostname -> tunnel -> agent link; grace and reclaim.

A tunnel has one or more *endpoints*, one per service: a TCP endpoint owns a
public port; a TLS endpoint owns a hostname on the relay's shared TLS port
(`<id>.<domain>`, `<service>-<id>.<domain>`, or `<port>-<id>.<domain>`).
Tunnel ids are 16 characters of [a-z2-7] (80 random bits from `secrets`) and
never reused while the relay runs, so a hostname is never handed on.

A tunnel outlives its link for `grace_seconds`: its ports stay bound and its
hostnames stay reserved (so nobody else can take them, and visitors are
refused at once rather than left hanging), and the agent holding the tunnel's
reclaim secret can attach it to a new link. An agent that reconnects before
the relay noticed the old link died takes over at once; the old link is
aborted (a stale reservation blocking the reconnect is the classic bug of frp,
sish and localtunnel).

Control operations (JSON on stream 0, docs/protocol.md "Control messages"):
`open_tunnel` (new, or `reclaim` an old one) and `close_tunnel`.
"""

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import ssl
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from relay.wire.tcpio import LISTEN_BACKLOG
from relay.node.ports import NoFreePortError, PortAllocator

DEFAULT_GRACE_SECONDS = 60.0
# Ports another process happens to hold are skipped; give up after this many.
MAX_BIND_ATTEMPTS = 32
# Nebius' rule for service names; all-digit names are Runloop-style port names.
SERVICE_NAME = re.compile(r"[a-z0-9]{1,20}")
MAX_SERVICES = 32
MAX_ALLOW_ENTRIES = 64
MAX_ALPN_ENTRIES = 8
MAX_CLIENT_CA_BYTES = 64 * 1024
TLS_MODES = ("terminate", "passthrough")


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
class Endpoint:
    """One service of a tunnel, as visitors reach it."""

    service: str  # "" for a tunnel's single unnamed service
    kind: str  # "tcp" or "tls"
    mode: str | None = None  # tls: "terminate" (relay speaks TLS) or "passthrough"
    alpn: tuple[str, ...] = ()
    hostname: str | None = None
    host: str = ""
    port: int = 0
    listening: object = None  # IListeningPort of a tcp endpoint

    @property
    def url(self) -> str:
        if self.kind == "tcp":
            return f"tcp://{self.host}:{self.port}"
        return f"https://{self.hostname}" + ("" if self.port == 443 else f":{self.port}")

    def describe(self) -> dict:
        out = {"service": self.service, "kind": self.kind, "url": self.url}
        if self.kind == "tcp":
            out["tcp_socket"] = [self.host, self.port]
        else:
            out.update(
                mode=self.mode,
                hostname=self.hostname,
                tls_socket=[self.hostname, self.port],
                alpn=list(self.alpn),
            )
        return out


@dataclass(eq=False)
class Tunnel:
    tunnel_id: str
    name: str
    created: float
    reclaim_digest: bytes = field(repr=False)
    endpoints: list[Endpoint] = field(default_factory=list)
    allow: tuple = ()  # ip_network objects; empty: everyone
    client_ca: bytes | None = field(default=None, repr=False)  # PEM, for relay-side mTLS
    link: object = None  # the RelayLink serving it; None while in grace
    grace_call: object = None
    detached_at: float | None = None
    streams_total: int = 0
    denied_total: int = 0

    def allows(self, host: str) -> bool:
        if not self.allow:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)

    def describe(self) -> dict:
        endpoints = [e.describe() for e in self.endpoints]
        out = {"id": self.tunnel_id, "name": self.name, "endpoints": endpoints}
        if len(endpoints) == 1:
            out.update(endpoints[0])  # single-service tunnels read flat, as users expect
            if self.endpoints[0].kind == "tcp":
                out.update(host=self.endpoints[0].host, port=self.endpoints[0].port)
        if self.allow:
            out["allow"] = [str(n) for n in self.allow]
        out["client_ca"] = self.client_ca is not None
        return out


class VisitorFactory(ServerFactory):
    """Accepts visitors on a TCP endpoint's public port and opens a stream for each."""

    noisy = False  # one log line per tunnel/link is ours to write

    def __init__(self, registry: "TunnelRegistry", tunnel: Tunnel, endpoint: Endpoint):
        self.registry = registry
        self.tunnel = tunnel
        self.endpoint = endpoint

    def buildProtocol(self, addr):
        listening = self.endpoint.listening
        local = listening.getHost() if listening is not None else None
        return self.registry.visitor_protocol(self.tunnel, self.endpoint, addr, local)


def _parse_request(request: dict) -> tuple[list[dict], tuple, bytes | None]:
    """Validate an open_tunnel request: (services, allow networks, client CA PEM)."""
    services = request.get("services")
    if services is None:  # the short form: one unnamed service of `kind`
        services = [{"name": "", "kind": request.get("kind", "tcp")}]
    if not isinstance(services, list) or not 1 <= len(services) <= MAX_SERVICES:
        raise TunnelRequestError("bad_request", f"a tunnel has 1 to {MAX_SERVICES} services")
    parsed, names = [], set()
    for service in services:
        if not isinstance(service, dict):
            raise TunnelRequestError("bad_request", "each service is an object")
        name = service.get("name", "")
        if not isinstance(name, str) or (name or len(services) > 1) and not SERVICE_NAME.fullmatch(name):
            raise TunnelRequestError(
                "bad_service_name",
                f"bad service name {str(name)[:40]!r}: use 1-20 characters of a-z and 0-9",
            )
        if name in names:
            raise TunnelRequestError("bad_service_name", f"service name {name!r} given twice")
        names.add(name)
        kind = service.get("kind", "tcp")
        if kind not in ("tcp", "tls"):
            raise TunnelRequestError("unsupported_kind", f"unknown tunnel kind {str(kind)[:20]!r}")
        mode = service.get("mode", "terminate") if kind == "tls" else None
        if kind == "tls" and mode not in TLS_MODES:
            raise TunnelRequestError("bad_request", f"mode must be one of {', '.join(TLS_MODES)}")
        alpn = service.get("alpn") or (["http/1.1"] if kind == "tls" else [])
        if (
            not isinstance(alpn, list)
            or len(alpn) > MAX_ALPN_ENTRIES
            or not all(isinstance(p, str) and 0 < len(p.encode()) < 256 and p.isascii() for p in alpn)
        ):
            raise TunnelRequestError("bad_alpn", "ALPN: up to 8 protocol names such as h2, http/1.1")
        parsed.append({"name": name, "kind": kind, "mode": mode, "alpn": tuple(alpn)})
    allow = request.get("allow") or []
    if not isinstance(allow, list) or len(allow) > MAX_ALLOW_ENTRIES:
        raise TunnelRequestError("bad_allow", f"allow: a list of at most {MAX_ALLOW_ENTRIES} CIDRs")
    networks = []
    for entry in allow:
        try:
            networks.append(ipaddress.ip_network(str(entry), strict=False))
        except ValueError:
            raise TunnelRequestError("bad_allow", f"not a CIDR: {str(entry)[:60]!r}") from None
    client_ca = request.get("client_ca")
    if client_ca is not None:
        if not isinstance(client_ca, str) or len(client_ca) > MAX_CLIENT_CA_BYTES:
            raise TunnelRequestError("bad_client_ca", "client_ca: a PEM string of at most 64 KiB")
        try:
            ssl.create_default_context(cadata=client_ca)
        except (ssl.SSLError, ValueError) as e:
            raise TunnelRequestError("bad_client_ca", f"client_ca is not a PEM CA certificate: {e}") from None
        client_ca = client_ca.encode()
    return parsed, tuple(networks), client_ca


class TunnelRegistry:
    _log = Logger()

    def __init__(
        self,
        reactor,
        allocator: PortAllocator,
        *,
        interface: str,
        public_host: str,
        domain: str | None = None,
        tls_port: int = 0,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
    ):
        self.reactor = reactor
        self.allocator = allocator
        self.interface = interface
        self.public_host = public_host
        self.domain = domain
        self.tls_port = tls_port
        self.grace_seconds = grace_seconds
        self.tunnels: dict[str, Tunnel] = {}
        self.hostnames: dict[str, tuple[Tunnel, Endpoint]] = {}
        self.links: set = set()
        self._ids_used: set[str] = set()

    # -- opening ---------------------------------------------------------------

    @defer.inlineCallbacks
    def open_tunnel(self, link, request: dict):
        """Create a tunnel on `link` from a validated request.

        Returns (tunnel, reclaim_secret); raises TunnelRequestError."""
        services, allow, client_ca = _parse_request(request)
        if any(s["kind"] == "tls" for s in services) and not self.domain:
            raise TunnelRequestError("unsupported_kind", "this relay serves no encrypted tunnels")
        tunnel_id = self._fresh_id()
        secret = secrets.token_urlsafe(24)
        tunnel = Tunnel(
            tunnel_id=tunnel_id,
            name=str(request.get("name", ""))[:200],
            created=self.reactor.seconds(),
            reclaim_digest=_digest(secret),
            allow=allow,
            client_ca=client_ca,
        )
        try:
            for service in services:
                endpoint = Endpoint(service["name"], service["kind"], service["mode"], service["alpn"])
                tunnel.endpoints.append(endpoint)
                if endpoint.kind == "tcp":
                    yield self._bind(tunnel, endpoint)
                else:
                    label = f"{endpoint.service}-{tunnel_id}" if endpoint.service else tunnel_id
                    endpoint.hostname = f"{label}.{self.domain}"
                    endpoint.host, endpoint.port = endpoint.hostname, self.tls_port
        except BaseException:
            self._release(tunnel)
            raise
        if link.closed:  # the agent left while we were binding
            self._release(tunnel)
            raise TunnelRequestError("link_closed", "link closed")
        tunnel.link = link
        self.tunnels[tunnel_id] = tunnel
        for endpoint in tunnel.endpoints:
            if endpoint.hostname:
                self.hostnames[endpoint.hostname] = (tunnel, endpoint)
        self._log.info(
            "tunnel {tunnel} open: {urls} for agent {agent}",
            tunnel=tunnel_id, urls=" ".join(e.url for e in tunnel.endpoints), agent=link.session_id,
        )
        return tunnel, secret

    @defer.inlineCallbacks
    def _bind(self, tunnel: Tunnel, endpoint: Endpoint):
        try:
            candidates = self.allocator.candidates(MAX_BIND_ATTEMPTS)
        except NoFreePortError as e:
            raise TunnelRequestError("no_free_port", str(e)) from None
        factory = VisitorFactory(self, tunnel, endpoint)
        for port in candidates:
            self.allocator.claim(port)  # before the yield: no concurrent request takes it
            listener = serverFromString(
                self.reactor,
                f"tcp:{port}:interface={quoteStringArgument(self.interface)}:backlog={LISTEN_BACKLOG}",
            )
            try:
                endpoint.listening = yield listener.listen(factory)
            except CannotListenError:
                self.allocator.in_use.discard(port)  # held elsewhere: not ours to quarantine
                continue
            except BaseException:
                self.allocator.in_use.discard(port)
                raise
            endpoint.host, endpoint.port = self.public_host, port
            return
        raise TunnelRequestError(
            "no_free_port", f"no bindable port in {self.allocator.low}-{self.allocator.high}"
        )

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
        self._log.info("tunnel {tunnel} reattached", tunnel=tunnel_id)
        return tunnel

    # -- visitors ----------------------------------------------------------------

    def admit(self, tunnel: Tunnel, addr) -> bool:
        """May this visitor reach the tunnel now? (agent present, address allowed)"""
        link = tunnel.link
        if link is None or link.closed:
            return False  # agent away: refuse now rather than leave the visitor hanging
        host = getattr(addr, "host", "")
        if not tunnel.allows(host):
            tunnel.denied_total += 1
            self._log.debug("visitor {host} denied on tunnel {tunnel}", host=host, tunnel=tunnel.tunnel_id)
            return False
        return True

    def visitor_protocol(self, tunnel: Tunnel, endpoint: Endpoint, addr, local, sni: str | None = None):
        """A stream for a new visitor, or None to close it at once."""
        if not self.admit(tunnel, addr):
            return None
        tunnel.streams_total += 1
        return tunnel.link.open_visitor_stream(tunnel, endpoint, addr, local, sni)

    def route_hostname(self, server_name: str) -> tuple[Tunnel, Endpoint] | None:
        return self.hostnames.get(server_name)

    # -- closing -----------------------------------------------------------------

    def close(self, tunnel: Tunnel, why: str) -> list:
        """End a tunnel now: close its visitors, unbind, quarantine its ports.
        Returns the Deferreds of the unbinding."""
        if self.tunnels.get(tunnel.tunnel_id) is not tunnel:
            return []
        del self.tunnels[tunnel.tunnel_id]
        if tunnel.grace_call is not None and tunnel.grace_call.active():
            tunnel.grace_call.cancel()
        tunnel.grace_call = None
        if tunnel.link is not None:
            tunnel.link.close_visitors(tunnel)
        tunnel.link = None
        unbinding = self._release(tunnel)
        self._log.info("tunnel {tunnel} closed ({why})", tunnel=tunnel.tunnel_id, why=why)
        return unbinding

    def _release(self, tunnel: Tunnel) -> list:
        """Unbind, quarantine, forget hostnames; the Deferreds of the unbinding."""
        unbinding = []
        for endpoint in tunnel.endpoints:
            if endpoint.listening is not None:
                d = defer.maybeDeferred(endpoint.listening.stopListening)
                d.addErrback(lambda f: self._log.failure("stopListening failed", f))
                unbinding.append(d)
                endpoint.listening = None
            if endpoint.kind == "tcp" and endpoint.port:
                self.allocator.release(endpoint.port)
            if endpoint.hostname and self.hostnames.get(endpoint.hostname, (None,))[0] is tunnel:
                del self.hostnames[endpoint.hostname]
        return unbinding

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

    def close_all(self) -> defer.Deferred:
        """End every tunnel; fires once their ports are unbound."""
        unbinding = []
        for tunnel in list(self.tunnels.values()):
            unbinding.extend(self.close(tunnel, "relay stopping"))
        return defer.DeferredList(unbinding, consumeErrors=True)

    # -- views -------------------------------------------------------------------

    def describe(self) -> list[dict]:
        out = []
        for tunnel in self.tunnels.values():
            item = tunnel.describe()
            item["state"] = "live" if tunnel.link is not None else "waiting-for-agent"
            if tunnel.detached_at is not None:
                item["waiting_seconds"] = round(self.reactor.seconds() - tunnel.detached_at, 3)
            item["agent"] = tunnel.link.session_id if tunnel.link is not None else None
            item["visitors"] = tunnel.link.visitor_count(tunnel) if tunnel.link is not None else 0
            item["streams_total"] = tunnel.streams_total
            item["denied_total"] = tunnel.denied_total
            out.append(item)
        return out

    def _fresh_id(self) -> str:
        while True:
            tunnel_id = new_tunnel_id()
            if tunnel_id not in self._ids_used:
                self._ids_used.add(tunnel_id)  # never reused while the relay runs
                return tunnel_id
