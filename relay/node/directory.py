"""The tunnel directory: which tunnels exist, what names and ports they hold,
and which links serve them. Routing asks it; it does no I/O of its own here.

`ITunnelDirectory` is what routing needs, and every lookup answers with a
`Deferred`, so that a directory kept on another machine (Redis, for a fleet
of nodes: Teleport keeps its routing table in a shared backend) can stand in
without touching the routing code. `MemoryDirectory` is one node's directory,
in memory; its Deferreds have already fired.

What is *not* here: listening sockets (relay/node/listeners.py), grace
timers and the lifecycle of a tunnel (relay/node/tunnels.py). A `Tunnel` is
the record the directory keeps; the live links serving it are attached to it
by the node that holds them.

Tunnel ids are 16 characters of [a-z2-7] (80 random bits from `secrets`),
never those of a live tunnel nor of one that ended within
`RECENT_ID_SECONDS`, so a hostname is never handed straight on to another
tunnel. 80 random bits make a repeat after that as likely as guessing the
id; remembering every id ever used grew by 5.3 MB per 50,000 tunnels.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field

from twisted.internet import defer
from zope.interface import Interface, implementer

from relay.mux.control import ReclaimFailedError

# How long the id of an ended tunnel stays out of use (its hostname stays dead).
RECENT_ID_SECONDS = 24 * 3600.0


def new_tunnel_id() -> str:
    """16 characters of [a-z2-7] carrying 80 random bits: DNS-safe, unguessable."""
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()


def secret_digest(secret: str) -> bytes:
    # surrogatepass: a peer's lone surrogate is valid JSON; it must hash, not raise.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


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
    client_ca_digest: bytes | None = field(default=None, repr=False)  # sha256 of client_ca
    # The live links serving it, oldest first; empty while it waits in grace.
    # They are the links of its sessions (relay/node/sessions.py): the one
    # that opened it, and replicas of a stable name.
    links: list = field(default_factory=list)
    sessions: list = field(default_factory=list)  # live sessions serving it, first one first
    owner: object = None  # the session given its reclaim secret (a takeover replaces its links)
    detached_at: float | None = None
    # The new-stream token bucket (TunnelManager.admit): tokens, and when counted.
    stream_tokens: float = -1.0
    stream_tokens_at: float = 0.0
    tenant: str = ""  # the tenant of the token that opened it
    stable_name: str | None = None  # its tenant's stable name, if it has one
    # When its grace period ends, while it waits for its agent.
    deadline: float | None = None
    # Rebuilt from the state folder after a restart: its reclaim brings the
    # settings the file does not keep (allow, client CA).
    restored: bool = False

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

    def pick_link(self):
        """The live link with the fewest streams of this tunnel, or None."""
        links = self.links
        if not links:
            return None
        if len(links) == 1:  # today's common case: no counting on the visitor path
            link = links[0]
            return None if link.closed else link
        live = [link for link in links if not link.closed]
        return min(live, key=lambda link: link.stream_count(self.tunnel_id)) if live else None

    def describe(self) -> dict:
        endpoints = [e.describe() for e in self.endpoints]
        out = {"id": self.tunnel_id, "name": self.name, "endpoints": endpoints}
        if self.stable_name is not None:
            out["stable_name"] = self.stable_name
        if len(endpoints) == 1:
            out.update(endpoints[0])  # single-service tunnels read flat, as users expect
            if self.endpoints[0].kind == "tcp":
                out.update(host=self.endpoints[0].host, port=self.endpoints[0].port)
        if self.allow:
            out["allow"] = [str(n) for n in self.allow]
        out["client_ca"] = self.client_ca is not None
        return out


class ITunnelDirectory(Interface):
    """What routing needs to know about tunnels. Every method answers with a Deferred."""

    def fresh_id() -> defer.Deferred:
        """A tunnel id never handed out before (fires with str)."""

    def claim_hostname(hostname: str, tunnel: Tunnel, endpoint: Endpoint) -> defer.Deferred:
        """Reserve a hostname for a tunnel's endpoint (fires with True, or False if taken)."""

    def claim_port(port: int, tunnel: Tunnel, endpoint: Endpoint) -> defer.Deferred:
        """Record that a public port belongs to a tunnel's endpoint (True, or False if taken)."""

    def add(tunnel: Tunnel) -> defer.Deferred:
        """Record a tunnel whose names and ports are claimed."""

    def remove(tunnel: Tunnel) -> defer.Deferred:
        """Forget a tunnel and release its hostnames and ports."""

    def by_id(tunnel_id: str) -> defer.Deferred:
        """The Tunnel, or None."""

    def by_hostname(hostname: str) -> defer.Deferred:
        """(Tunnel, Endpoint) serving a TLS hostname, or None."""

    def by_port(port: int) -> defer.Deferred:
        """(Tunnel, Endpoint) serving a public TCP port, or None."""

    def reclaim(tunnel_id: str, secret: str) -> defer.Deferred:
        """The Tunnel whose reclaim secret this is; errs with ReclaimFailedError."""

    def attach_link(tunnel: Tunnel, link, *, replace: bool) -> defer.Deferred:
        """`link` serves the tunnel now; with `replace`, instead of the links before.
        Fires with the links it replaced."""

    def detach_link(tunnel: Tunnel, link) -> defer.Deferred:
        """`link` no longer serves the tunnel; fires with the links still serving it."""

    def links(tunnel: Tunnel) -> defer.Deferred:
        """[(link, live stream count)] of the links serving the tunnel."""

    def tunnels() -> defer.Deferred:
        """Every tunnel, oldest first."""


@implementer(ITunnelDirectory)
class MemoryDirectory:
    """One node's directory, in dicts. Lookups are synchronous underneath and
    exposed as already-fired Deferreds; `lookup_hostname` is the synchronous
    form for callers that know they hold a MemoryDirectory (tests)."""

    def __init__(self, clock, recent_id_seconds: float = RECENT_ID_SECONDS):
        self.clock = clock
        self.recent_id_seconds = recent_id_seconds
        self._tunnels: dict[str, Tunnel] = {}
        self._hostnames: dict[str, tuple[Tunnel, Endpoint]] = {}
        self._ports: dict[int, tuple[Tunnel, Endpoint]] = {}
        # Ids not free to hand out: those handed out and not yet ended, and
        # ended ones (oldest first, so pruning pops from the front) until
        # recent_id_seconds after they ended.
        self._ids: set[str] = set()
        self._ended: dict[str, float] = {}

    def fresh_id(self):
        self._prune_ended()
        while True:
            tunnel_id = new_tunnel_id()
            if tunnel_id not in self._ids and tunnel_id not in self._ended:
                self._ids.add(tunnel_id)
                return defer.succeed(tunnel_id)

    def id_in_use(self, tunnel_id: str) -> bool:
        """Whether the id is live or ended too recently to hand out again."""
        self._prune_ended()
        return tunnel_id in self._ids or tunnel_id in self._ended

    def _prune_ended(self) -> None:
        cutoff = self.clock.seconds() - self.recent_id_seconds
        ended = self._ended
        while ended:
            tunnel_id, ended_at = next(iter(ended.items()))
            if ended_at > cutoff:
                break
            del ended[tunnel_id]

    def _id_ended(self, tunnel_id: str) -> None:
        if tunnel_id in self._ids:
            self._ids.discard(tunnel_id)
            self._ended[tunnel_id] = self.clock.seconds()

    def claim_hostname(self, hostname, tunnel, endpoint):
        holder = self._hostnames.get(hostname)
        if holder is not None and holder[0] is not tunnel:
            return defer.succeed(False)
        self._hostnames[hostname] = (tunnel, endpoint)
        return defer.succeed(True)

    def claim_port(self, port, tunnel, endpoint):
        holder = self._ports.get(port)
        if holder is not None and holder[0] is not tunnel:
            return defer.succeed(False)
        self._ports[port] = (tunnel, endpoint)
        return defer.succeed(True)

    def add(self, tunnel):
        self._tunnels[tunnel.tunnel_id] = tunnel
        self._ids.add(tunnel.tunnel_id)  # a restored tunnel's id was not handed out by fresh_id
        return defer.succeed(None)

    def remove(self, tunnel):
        if self._tunnels.get(tunnel.tunnel_id) is tunnel:
            del self._tunnels[tunnel.tunnel_id]
        self._id_ended(tunnel.tunnel_id)
        for endpoint in tunnel.endpoints:
            if endpoint.hostname and self._hostnames.get(endpoint.hostname, (None,))[0] is tunnel:
                del self._hostnames[endpoint.hostname]
            if endpoint.kind == "tcp" and self._ports.get(endpoint.port, (None,))[0] is tunnel:
                del self._ports[endpoint.port]
        return defer.succeed(None)

    def by_id(self, tunnel_id):
        return defer.succeed(self._tunnels.get(tunnel_id))

    def lookup_hostname(self, hostname: str):
        return self._hostnames.get(hostname)

    def by_hostname(self, hostname):
        return defer.succeed(self._hostnames.get(hostname))

    def by_port(self, port):
        return defer.succeed(self._ports.get(port))

    def reclaim(self, tunnel_id, secret):
        tunnel = self._tunnels.get(tunnel_id) if isinstance(tunnel_id, str) else None
        # Always compare, so an unknown id costs the same as a wrong secret.
        digest = tunnel.reclaim_digest if tunnel is not None else b"\0" * 32
        given = secret_digest(secret) if isinstance(secret, str) else b""
        if not hmac.compare_digest(digest, given) or tunnel is None:
            return defer.fail(ReclaimFailedError(None, "tunnel expired or unknown"))
        return defer.succeed(tunnel)

    def attach_link(self, tunnel, link, *, replace):
        replaced = [old for old in tunnel.links if old is not link] if replace else []
        if replace:
            tunnel.links = [link]
        elif link not in tunnel.links:
            tunnel.links.append(link)
        tunnel.detached_at = None
        return defer.succeed(replaced)

    def detach_link(self, tunnel, link):
        if link in tunnel.links:
            tunnel.links.remove(link)
        return defer.succeed(list(tunnel.links))

    def links(self, tunnel):
        return defer.succeed([(link, link.stream_count(tunnel.tunnel_id)) for link in tunnel.links])

    def tunnels(self):
        return defer.succeed(list(self._tunnels.values()))
