"""A tunnel's lifecycle on one node: open, reclaim, visitors, grace, close.

`TunnelManager` ties the parts together; each part has its own home:
validation is the control protocol's (relay/mux/control.py), the records and
lookups are the directory's (relay/node/directory.py, asked through
`ITunnelDirectory`), listening sockets are `PublicPorts`'
(relay/node/listeners.py), and counting is the metrics observer's.

A tunnel has one or more *endpoints*, one per service: a TCP endpoint owns a
public port; a TLS endpoint owns a hostname on the relay's shared TLS port
(`<id>.<domain>`, `<service>-<id>.<domain>`, or `<port>-<id>.<domain>`).

A tunnel outlives its links for `grace_seconds`: its ports stay bound and its
hostnames stay reserved (so nobody else can take them, and visitors are
refused at once rather than left hanging), and the agent holding the tunnel's
reclaim secret can attach it to a new link. An agent that reconnects before
the relay noticed the old link died takes over at once; the old link is
aborted (a stale reservation blocking the reconnect is the classic bug of frp,
sish and localtunnel).

Reservations outlive the process too: every change a reclaim depends on is
reported to the reservations file (relay/node/reservations.py), and `restore`
rebinds the ports and hostnames of the tunnels held when the relay went
down, each waiting out what is left of its grace period from that moment.

A *stable name* (`open_tunnel`'s `stable_name`) ties an address to the
tenant instead of the tunnel: `https://<name>-<tenant>.<domain>` (and
`<service>-<name>-<tenant>` for named services), and for TCP a port reserved
for the name on first use and kept for it ever after (never quarantined,
never handed to another tunnel). A name belongs to the first tenant that
claims it; the token's grant must allow it; a live agent of the tenant
holding it makes a second claim a duplicate unless that one holds the
tunnel's reclaim secret (a reconnect); a tunnel of the name waiting in its
grace period is ended and the name handed to the new claim (the same agent
restarted, without its secret).
"""

from __future__ import annotations

import hashlib
import re
import secrets

from twisted.internet import defer
from twisted.logger import Logger

from relay.mux.control import (
    BadNameError,
    LimitExceededError,
    NameInUseError,
    NameNotAllowedError,
    NameTakenError,
    NoPortsAvailableError,
    OpenTunnel,
    ReclaimFailedError,
    RequestErrorCode,
    TunnelRequestError,
    UnknownTunnelError,
)
from relay.node.directory import Endpoint, ITunnelDirectory, MemoryDirectory, Tunnel, secret_digest
from relay.node.limits import DEFAULT_LIMITS, SessionLimits
from relay.node.listeners import PublicPorts, VisitorFactory
from relay.mux import ErrorCode
from relay.node.reservations import MAX_NAMES_PER_TENANT, NameRegistry
from relay.node.sessions import SessionTable, tunnel_status
from relay.node.tenants import DEV_TENANT
from relay.wire.metrics import NULL_METRICS
from relay.wire.splice import Splice
from relay.wire.throttle import ThrottledSplice, TokenBucket

DEFAULT_GRACE_SECONDS = 60.0
# What a second live agent of a tenant's stable name does (--replica-policy):
# join the tunnel as a replica, or be refused as a duplicate (name_in_use).
REPLICA_POLICIES = ("join", "refuse")
# At most one log line per token and reason this often for refused visitors.
REFUSAL_LOG_SECONDS = 10.0
# The rate a live throttled splice gets when its cap is lifted: never in debt.
UNCAPPED_BYTES_PER_SECOND = 10**12
# A tenant is part of its stable names' hostnames: it must be a DNS label.
DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_LABEL_CHARS = 63  # RFC 1035 2.3.4


class GraceTimers:
    """One timer per detached tunnel: it ends the tunnel unless its agent is back."""

    def __init__(self, clock):
        self.clock = clock
        self._calls: dict[str, object] = {}

    def start(self, tunnel_id: str, seconds: float, expire) -> None:
        self.cancel(tunnel_id)
        self._calls[tunnel_id] = self.clock.callLater(seconds, self._fire, tunnel_id, expire)

    def _fire(self, tunnel_id: str, expire) -> None:
        self._calls.pop(tunnel_id, None)
        expire()

    def cancel(self, tunnel_id: str) -> None:
        call = self._calls.pop(tunnel_id, None)
        if call is not None and call.active():
            call.cancel()



def tenant_of_link(link) -> str | None:
    """The tenant of a session (relay/node/tenants.py Grant), None before login."""
    grant = getattr(link, "grant", None)
    return grant.tenant if grant is not None else None


class TunnelManager:
    _log = Logger()

    def __init__(
        self,
        reactor,
        ports: PublicPorts,
        *,
        public_host: str,
        domain: str | None = None,
        tls_port: int = 0,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        directory: ITunnelDirectory | None = None,
        metrics=NULL_METRICS,
        limits: SessionLimits = DEFAULT_LIMITS,
        node: str | None = None,
        replica_policy: str = "join",
    ):
        if replica_policy not in REPLICA_POLICIES:
            raise ValueError(f"replica policy: one of {', '.join(REPLICA_POLICIES)}")
        self.replica_policy = replica_policy
        self.sessions = SessionTable(reactor)
        self.reactor = reactor
        # A fleet's node name (docs/network.md): random hostnames carry it as
        # a label, <id>.<node>.<domain>, so DNS alone finds their node.
        self.node = node
        self.ports = ports
        self.public_host = public_host
        self.domain = domain
        self.tls_port = tls_port
        self.grace_seconds = grace_seconds
        self.directory = directory if directory is not None else MemoryDirectory(reactor)
        self.metrics = metrics
        self.grace = GraceTimers(reactor)
        self.limits = limits
        self.links: set = set()  # authenticated agent links of this node
        # The node drains (SIGTERM, relay/node/drain.py): no new visitors,
        # tunnels or logins; what runs finishes.
        self.draining = False
        self.on_link_gone = None  # called after each authenticated link is gone (the drain watches)
        self._local: dict[str, Tunnel] = {}  # tunnels whose sockets and links this node holds
        # One copy of each distinct client CA PEM, shared by the tunnels naming it.
        self._client_cas: dict[bytes, list] = {}  # sha256 -> [pem, tunnels using it]
        # Per token (relay/node/tokens.py): its live links, and the tunnels it
        # opened (live or in grace), for the limits that count over all of them.
        self._links_by_token: dict[str, set] = {}
        self._tunnels_by_token: dict[str, set[str]] = {}
        self._token_of: dict[str, str] = {}  # tunnel id -> token id
        # Bandwidth caps: tunnel id -> (visitor-to-agent, agent-to-visitor) buckets.
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self._refusal_logged_at: dict[tuple[str, str], float] = {}
        self.names = NameRegistry()
        self._named: dict[str, Tunnel] = {}  # stable name -> the tunnel holding it (opening ones too)
        # relay/node/reservations.py ReservationFile, told of every change a reclaim needs
        self.journal = None

    def _changed(self) -> None:
        if self.journal is not None:
            self.journal.changed()

    def limits_of(self, link) -> SessionLimits:
        """The limits of `link`'s session: its token's, else the node's."""
        grant = getattr(link, "grant", None)
        if grant is not None and grant.limits is not None:
            return grant.limits
        return self.limits

    # -- links and their tokens --------------------------------------------------

    def add_link(self, link) -> None:
        """An authenticated link: counted with its token's others."""
        self.links.add(link)
        self._links_by_token.setdefault(_token_id(link), set()).add(link)

    def start_session(self, link, wanted_links: int) -> str:
        """`link` (authenticated) starts a session; its join secret."""
        return self.sessions.start(link, wanted_links)

    def join_session(self, link, join):
        """`link` (authenticated) joins the session `join` names and serves
        each of its tunnels; the session, or None if refused."""
        session = self.sessions.join(link, join)
        if session is None:
            return None
        for tunnel_id in list(session.tunnel_ids):
            tunnel = self._local.get(tunnel_id)
            if tunnel is not None:
                d = self.directory.attach_link(tunnel, link, replace=False)
                d.addErrback(lambda f: self._log.failure("attach_link failed", f))
        self._log.info(
            "agent {agent}: link {number} joined ({live} of {wanted} links)",
            agent=session.session_id, number=link.link_number, live=len(session.live_links()),
            wanted=session.wanted_links,
        )
        return session

    @staticmethod
    def _serving(session) -> list:
        """The links of a session that may take new visitors: live, not draining."""
        return [
            link for link in session.live_links()
            if not link.graceful and not link.mux.draining
        ]

    @defer.inlineCallbacks
    def _attach_session(self, tunnel: Tunnel, session):
        """Every serving link of `session` serves `tunnel` from now on."""
        for link in self._serving(session):
            yield self.directory.attach_link(tunnel, link, replace=False)
        if session not in tunnel.sessions:
            tunnel.sessions.append(session)
        session.tunnel_ids.add(tunnel.tunnel_id)

    def _drop_link(self, link) -> None:
        self.links.discard(link)
        token_id = _token_id(link)
        links = self._links_by_token.get(token_id)
        if links is not None:
            links.discard(link)
            if not links:
                del self._links_by_token[token_id]

    def apply_grants(self, grant_of) -> None:
        """The tokens file changed: live links get their token's new grant
        (new limits apply to their next tunnels and visitors); links of a
        token that is gone are closed (AUTH_FAILED) and their tunnels ended
        at once. `grant_of(token_id)` is the new grant, or None."""
        revoked = []
        for link in list(self.links):
            grant = getattr(link, "grant", None)
            if grant is None:
                continue
            new = grant_of(grant.token_id)
            if new is None:
                revoked.append(link)
            else:
                link.grant = new
                if getattr(link, "session", None) is not None:
                    link.session.grant = new
        for tunnel_id, buckets in list(self._buckets.items()):
            tunnel = self._local.get(tunnel_id)
            link = tunnel.pick_link() if tunnel is not None else None
            if link is None:
                continue
            rate = self.limits_of(link).bandwidth_bytes_per_second
            if not rate:
                # Cap lifted: new visitors get the plain splice; live ones stop waiting.
                del self._buckets[tunnel_id]
                for bucket in buckets:
                    bucket.set_rate(UNCAPPED_BYTES_PER_SECOND)
                    bucket.tokens = float(bucket.burst)
                continue
            for bucket in buckets:
                bucket.set_rate(rate)
        for link in revoked:
            self._log.info(
                "token {token} of tenant {tenant} revoked: closing agent {agent}",
                token=link.grant.token_id, tenant=link.grant.tenant, agent=link.session_id,
            )
            link.graceful = True  # its tunnels end now: nobody may reclaim them with this token
            link.close_link(ErrorCode.AUTH_FAILED, "token revoked")

    def tunnel_tenant(self, tunnel_id: str) -> str | None:
        """The tenant a tunnel belongs to (for metrics labels), None if unknown here."""
        tunnel = self._local.get(tunnel_id)
        if tunnel is None:
            return None
        return getattr(tunnel, "tenant", None) or tenant_of_link(tunnel.pick_link())

    @property
    def tunnels(self) -> dict[str, Tunnel]:
        """The tunnels this node holds, by id."""
        return self._local

    # -- opening ---------------------------------------------------------------

    @defer.inlineCallbacks
    def open_tunnel(self, link, request: OpenTunnel):
        """Create a tunnel on `link` from a validated request.

        Fires with (tunnel, reclaim_secret); errs with a TunnelRequestError."""
        services = request.services
        if any(s.kind == "tls" for s in services) and not self.domain:
            raise TunnelRequestError(RequestErrorCode.UNSUPPORTED_KIND, "this relay serves no encrypted tunnels")
        try:
            self._check_limits(link, request)
        except LimitExceededError as e:
            self.metrics.allocation_failed(e.code.value)
            self.metrics.limit_hit(e.limit or "session", tenant_of_link(link))
            self._log.info(
                "agent {agent}: {error}", agent=link.session_id, error=str(e),
            )
            raise
        tenant = self.tenant_of(link)
        stable = request.stable_name
        record = None
        if stable is not None:
            try:
                record, holder = yield self._claim_name(link, request)
                if holder is not None:
                    yield self._join_replica(link, holder, request)
                    return holder, None
            except TunnelRequestError as e:
                self.metrics.allocation_failed(getattr(e.code, "value", str(e.code)))
                self._log.info("agent {agent}: {error}", agent=link.session_id, error=str(e))
                raise
        tunnel_id = yield self.directory.fresh_id()
        secret = secrets.token_urlsafe(24)
        tunnel = Tunnel(
            tunnel_id=tunnel_id,
            name=request.name,
            created=self.reactor.seconds(),
            reclaim_digest=secret_digest(secret),
            allow=request.allow,
            client_ca=self._share_client_ca(request.client_ca),
            tenant=tenant,
            stable_name=stable,
        )
        if tunnel.client_ca is not None:
            tunnel.client_ca_digest = hashlib.sha256(tunnel.client_ca).digest()
        if stable is not None:
            self._named[stable] = tunnel  # opening: a concurrent claim is a duplicate
        try:
            for service in services:
                endpoint = Endpoint(service.name, service.kind, service.mode, service.alpn)
                tunnel.endpoints.append(endpoint)
                if endpoint.kind == "tcp":
                    reserved = record.ports.get(service.name) if record is not None else None
                    yield self._bind_endpoint(
                        tunnel, endpoint, port=reserved, within=self.limits_of(link).port_range,
                    )
                    if record is not None and reserved is None:
                        record.ports[service.name] = endpoint.port  # the name's port from now on
                        self._changed()
                else:
                    label = self._label(tunnel_id, endpoint.service, stable, tenant)
                    yield self._claim_endpoint_hostname(tunnel, endpoint, f"{label}.{self.domain}")
            if not self._serving(link.session):  # the agent left while we were binding
                raise TunnelRequestError(RequestErrorCode.LINK_CLOSED, "link closed")
            yield self.directory.add(tunnel)
        except BaseException as e:
            self._release(tunnel)
            if isinstance(e, TunnelRequestError):
                self.metrics.allocation_failed(getattr(e.code, "value", str(e.code)))
            if isinstance(e, LimitExceededError):  # the token's port range
                self.metrics.limit_hit(e.limit or "port_range", tenant_of_link(link))
            raise
        tunnel.owner = link.session
        yield self._attach_session(tunnel, link.session)
        self._local[tunnel_id] = tunnel
        token_id = _token_id(link)
        self._tunnels_by_token.setdefault(token_id, set()).add(tunnel_id)
        self._token_of[tunnel_id] = token_id
        self._changed()
        kinds = {e.kind for e in tunnel.endpoints}
        self.metrics.tunnel_opened(tunnel_id, kinds.pop() if len(kinds) == 1 else "mixed")
        self._log.info(
            "tunnel {tunnel} open: {urls} for agent {agent}",
            tunnel=tunnel_id, urls=" ".join(e.url for e in tunnel.endpoints), agent=link.session_id,
        )
        return tunnel, secret

    def _bind_endpoint(self, tunnel: Tunnel, endpoint: Endpoint, port: int | None = None,
                       within: tuple[int, int] | None = None) -> defer.Deferred:
        """Listen for a TCP endpoint's visitors: on a random port of the
        range (or of `within`, the token's), or on `port` (a name's, or one
        restored after a restart)."""
        factory = VisitorFactory(lambda addr, local: self.visitor_protocol(tunnel, endpoint, addr, local))
        endpoint.host = self.public_host

        def bound(number):
            endpoint.port = number
            return number

        d = self.ports.bind(
            factory, claim=lambda number: self.directory.claim_port(number, tunnel, endpoint),
            within=within, port=port,
        )
        return d.addCallback(bound)

    @defer.inlineCallbacks
    def _claim_endpoint_hostname(self, tunnel: Tunnel, endpoint: Endpoint, hostname: str):
        endpoint.hostname = hostname
        endpoint.host, endpoint.port = hostname, self.tls_port
        if not (yield self.directory.claim_hostname(hostname, tunnel, endpoint)):
            if tunnel.stable_name is not None:
                raise NameTakenError(None, f"the hostname {hostname} is taken")
            raise TunnelRequestError(RequestErrorCode.BAD_REQUEST, "hostname taken")

    # -- stable names ------------------------------------------------------------

    def tenant_of(self, link) -> str:
        grant = getattr(link, "grant", None)
        return grant.tenant if grant is not None else DEV_TENANT

    def _label(self, tunnel_id: str, service: str, stable: str | None, tenant: str) -> str:
        """The first DNS label of an endpoint's hostname."""
        base = f"{stable}-{tenant}" if stable is not None else tunnel_id
        label = f"{service}-{base}" if service else base
        if stable is None and self.node:
            return f"{label}.{self.node}"
        return label

    @defer.inlineCallbacks
    def _claim_name(self, link, request: OpenTunnel):
        """The name's record, once this request may have it; errs with the
        name errors of relay/mux/control.py."""
        stable = request.stable_name
        tenant = self.tenant_of(link)
        grant = getattr(link, "grant", None)
        if grant is not None and not grant.allows_name(stable):
            raise NameNotAllowedError(None, f"this token may not claim the name {stable!r}")
        record = self.names.get(stable)
        if record is not None and record.tenant != tenant:
            raise NameTakenError(None, f"the name {stable!r} belongs to another tenant")
        for service in request.services:
            if service.kind != "tls":
                continue
            if not DNS_LABEL.fullmatch(tenant):
                raise BadNameError(None, f"tenant {tenant[:40]!r} is not a DNS label: its names cannot be hostnames")
            label = self._label("", service.name, stable, tenant)
            if len(label) > MAX_LABEL_CHARS:
                raise BadNameError(
                    None, f"{label}: stable name, service and tenant exceed a DNS label's {MAX_LABEL_CHARS} characters",
                )
        holder = self._named.get(stable)
        if holder is not None:
            if self._local.get(holder.tunnel_id) is holder and holder.pick_link() is not None:
                if self.replica_policy == "join" and record is not None:
                    return record, holder  # a replica of the live tunnel (issue 14)
                raise NameInUseError(
                    None, f"the name {stable!r} is served by another live agent of this tenant",
                )
            if self._local.get(holder.tunnel_id) is not holder:
                raise NameInUseError(
                    None, f"the name {stable!r} is served by another live agent of this tenant",
                )
            # Its agent is away (restarted without the secret): the name moves here.
            self._log.info(
                "tunnel {tunnel}: its name {name} is claimed again; it ends", tunnel=holder.tunnel_id, name=stable,
            )
            yield defer.DeferredList(self.close(holder, "its name was claimed again"), consumeErrors=True)
        if record is None:
            if self.names.count(tenant) >= MAX_NAMES_PER_TENANT:
                raise LimitExceededError(None, f"stable names per tenant: at most {MAX_NAMES_PER_TENANT}")
            record = self.names.claim(stable, tenant)
            self._changed()
        return record, None

    @defer.inlineCallbacks
    def _join_replica(self, link, tunnel: Tunnel, request: OpenTunnel):
        """`link`'s session serves the live tunnel of its stable name too, as
        a replica: same services (each replica may forward them to its own
        local targets); the tunnel's other settings are its first agent's."""
        wanted = [(s.name, s.kind) for s in request.services]
        if wanted != [(e.service, e.kind) for e in tunnel.endpoints]:
            raise NameInUseError(
                None, f"the name {tunnel.stable_name!r} is served with other services: a replica asks for the same ones",
            )
        session = link.session
        if session in tunnel.sessions:
            # One agent asking twice is a duplicate, not a replica.
            raise NameInUseError(None, f"the name {tunnel.stable_name!r} is served by this agent already")
        yield self._attach_session(tunnel, session)
        self._log.info(
            "agent {agent} joined tunnel {tunnel} ({name}) as a replica: {count} replicas",
            agent=link.session_id, tunnel=tunnel.tunnel_id, name=tunnel.stable_name, count=len(tunnel.sessions),
        )
        return tunnel

    def _kept_port(self, tunnel: Tunnel, endpoint: Endpoint) -> bool:
        """Whether the endpoint's port is its stable name's (kept when it closes)."""
        record = self.names.get(tunnel.stable_name) if tunnel.stable_name is not None else None
        return record is not None and record.ports.get(endpoint.service) == endpoint.port

    # -- reclaims ----------------------------------------------------------------

    @defer.inlineCallbacks
    def reclaim(self, link, tunnel_id: str, secret: str, request: OpenTunnel | None = None):
        """Attach a held tunnel to a new link, given its reclaim secret; a
        tunnel restored after a restart takes its settings from `request`.
        Errs with ReclaimFailedError."""
        tunnel = yield self.directory.reclaim(tunnel_id, secret)
        if self._local.get(tunnel.tunnel_id) is not tunnel:
            # Held by the directory but not by this node (a fleet): not ours to move.
            raise TunnelRequestError(RequestErrorCode.RECLAIM_FAILED, "tunnel expired or unknown")
        if tunnel.tenant != self.tenant_of(link) or (
            request is not None and request.stable_name != tunnel.stable_name
        ):
            raise ReclaimFailedError(None, "tunnel expired or unknown")
        if tunnel.restored:
            self._refresh_restored(tunnel, request)
        self.grace.cancel(tunnel.tunnel_id)
        tunnel.deadline = None
        session, old_owner = link.session, tunnel.owner
        replaced = []
        if old_owner is not None and old_owner is not session:
            # The secret's holder is back on a new session: the old one's
            # links stop serving it (a takeover); replicas keep theirs.
            replaced = [old for old in tunnel.links if getattr(old, "session", None) is old_owner]
            for old in replaced:
                yield self.directory.detach_link(tunnel, old)
            old_owner.tunnel_ids.discard(tunnel.tunnel_id)
            if old_owner in tunnel.sessions:
                tunnel.sessions.remove(old_owner)
        tunnel.owner = session
        yield self._attach_session(tunnel, session)
        for old in replaced:
            if not old.closed:
                # The agent is back before we noticed its old link died: take over now.
                self._log.info(
                    "agent {agent} reclaimed tunnel {tunnel} from a live link: aborting the old one",
                    agent=link.session_id, tunnel=tunnel.tunnel_id,
                )
                old.replace_session()
        self._log.info("tunnel {tunnel} reattached", tunnel=tunnel.tunnel_id)
        self._changed()
        return tunnel

    def _refresh_restored(self, tunnel: Tunnel, request: OpenTunnel | None) -> None:
        """What the file does not keep comes from the reclaiming request,
        which must ask for the same services."""
        if request is None:
            raise ReclaimFailedError(None, "tunnel expired or unknown")
        wanted = [(s.name, s.kind) for s in request.services]
        if wanted != [(e.service, e.kind) for e in tunnel.endpoints]:
            raise ReclaimFailedError(None, "the reclaim asks for other services than the tunnel has")
        for endpoint, service in zip(tunnel.endpoints, request.services):
            endpoint.mode, endpoint.alpn = service.mode, service.alpn
        tunnel.allow = request.allow
        tunnel.client_ca = self._share_client_ca(request.client_ca)
        if tunnel.client_ca is not None:
            tunnel.client_ca_digest = hashlib.sha256(tunnel.client_ca).digest()
        tunnel.restored = False

    # -- visitors ----------------------------------------------------------------

    def admit(self, tunnel: Tunnel, addr):
        """The link to open this visitor's stream on, or None to refuse it now
        (agent away, address not allowed, the node draining)."""
        if self.draining:
            self.metrics.visitor_refused(tunnel.tunnel_id, "draining")
            return None
        link = tunnel.pick_link()
        if link is None:
            self.metrics.visitor_refused(tunnel.tunnel_id, "agent_away")
            return None  # agent away: refuse now rather than leave the visitor hanging
        host = getattr(addr, "host", "")
        if not tunnel.allows(host):
            self.metrics.visitor_refused(tunnel.tunnel_id, "not_allowed")
            self._log.debug("visitor {host} denied on tunnel {tunnel}", host=host, tunnel=tunnel.tunnel_id)
            return None
        limits = self.limits_of(link)
        if link.stream_count(tunnel.tunnel_id) >= limits.max_streams_per_tunnel:
            return self._refuse(tunnel, link, "streams_per_tunnel", limits.max_streams_per_tunnel)
        if len(link.streams) >= limits.max_streams_per_link:
            return self._refuse(tunnel, link, "streams_per_link", limits.max_streams_per_link)
        if limits.token_max_streams is not None:
            # Only a capped token pays for this count: its own links, usually one or two.
            streams = sum(len(other.streams) for other in self._links_by_token.get(_token_id(link), ()))
            if streams >= limits.token_max_streams:
                return self._refuse(tunnel, link, "streams_per_token", limits.token_max_streams)
        if not self._take_stream_token(tunnel, limits):
            return self._refuse(tunnel, link, "new_streams_rate", limits.new_streams_per_second)
        return link

    def _refuse(self, tunnel: Tunnel, link, reason: str, limit) -> None:
        """A visitor over a limit: counted by reason; one log line per token and reason per burst."""
        self.metrics.visitor_refused(tunnel.tunnel_id, reason)
        self.metrics.limit_hit(reason, tenant_of_link(link))
        key = (_token_id(link), reason)
        now = self.reactor.seconds()
        logged = self._refusal_logged_at.get(key)
        if logged is None or now - logged >= REFUSAL_LOG_SECONDS:
            if len(self._refusal_logged_at) >= 1024:
                self._refusal_logged_at.clear()  # bounded: a lost line at worst
            self._refusal_logged_at[key] = now
            grant = getattr(link, "grant", None)
            self._log.warn(
                "tunnel {tunnel} (tenant {tenant}): refusing visitors over the limit {reason} ({limit:g}); "
                "next line in {seconds:g}s at most",
                tunnel=tunnel.tunnel_id, tenant=getattr(grant, "tenant", "?"), reason=reason,
                limit=limit, seconds=REFUSAL_LOG_SECONDS,
            )
        return None

    def splice_for(self, tunnel: Tunnel, link) -> Splice:
        """The splice of a new visitor: throttled when its token caps bandwidth.
        Side a reads the visitor, side b the stream."""
        rate = self.limits_of(link).bandwidth_bytes_per_second
        if not rate:
            return Splice()
        buckets = self._buckets.get(tunnel.tunnel_id)
        if buckets is None:
            buckets = self._buckets[tunnel.tunnel_id] = (
                TokenBucket(rate, self.reactor), TokenBucket(rate, self.reactor),
            )
        return ThrottledSplice(self.reactor, *buckets)

    def _take_stream_token(self, tunnel: Tunnel, limits: SessionLimits) -> bool:
        """The tunnel's new-stream token bucket: refill by elapsed time, take one."""
        now = self.reactor.seconds()
        if tunnel.stream_tokens < 0:  # a new tunnel starts with a full bucket
            tokens = float(limits.new_streams_burst)
        else:
            tokens = min(
                float(limits.new_streams_burst),
                tunnel.stream_tokens + (now - tunnel.stream_tokens_at) * limits.new_streams_per_second,
            )
        tunnel.stream_tokens_at = now
        if tokens < 1.0:
            tunnel.stream_tokens = tokens
            return False
        tunnel.stream_tokens = tokens - 1.0
        return True

    def visitor_protocol(self, tunnel: Tunnel, endpoint: Endpoint, addr, local, sni: str | None = None):
        """A stream for a new visitor, or None to close it at once."""
        link = self.admit(tunnel, addr)
        if link is None:
            return None
        return link.open_visitor_stream(tunnel, endpoint, addr, local, sni)

    def route_hostname(self, server_name: str) -> defer.Deferred:
        """(Tunnel, Endpoint) for a TLS hostname, or None."""
        return self.directory.by_hostname(server_name)

    # -- closing -----------------------------------------------------------------

    def close(self, tunnel: Tunnel, why: str, keep_streams: bool = False) -> list:
        """End a tunnel now: close its visitors, unbind, quarantine its ports.
        With `keep_streams` (its agent drains) the visitors it has go on to
        their end; only new ones are refused. Returns the Deferreds of the unbinding."""
        if self._local.get(tunnel.tunnel_id) is not tunnel:
            return []
        del self._local[tunnel.tunnel_id]
        self.grace.cancel(tunnel.tunnel_id)
        self._buckets.pop(tunnel.tunnel_id, None)
        token_id = self._token_of.pop(tunnel.tunnel_id, None)
        held = self._tunnels_by_token.get(token_id)
        if held is not None:
            held.discard(tunnel.tunnel_id)
            if not held:
                del self._tunnels_by_token[token_id]
        tunnel.deadline = None
        links, tunnel.links = tunnel.links, []
        for session in tunnel.sessions:
            session.tunnel_ids.discard(tunnel.tunnel_id)
        tunnel.sessions = []
        for link in links:
            if not keep_streams:
                link.close_visitors(tunnel)
        unbinding = self._release(tunnel)
        self.metrics.tunnel_closed(tunnel.tunnel_id, why)
        self._log.info("tunnel {tunnel} closed ({why})", tunnel=tunnel.tunnel_id, why=why)
        self._changed()
        return unbinding

    def close_for_link(self, link, tunnel_id: str) -> None:
        """The agent's close_tunnel: only a tunnel this link serves."""
        tunnel = self._local.get(tunnel_id)
        session = link.session
        if tunnel is None or tunnel_id not in session.tunnel_ids:
            raise UnknownTunnelError(None, "no such tunnel on this link")
        if any(other is not session for other in tunnel.sessions):
            # A replica leaves: the others go on serving the tunnel.
            session.tunnel_ids.discard(tunnel_id)
            tunnel.sessions.remove(session)
            for other in [old for old in tunnel.links if old.session is session]:
                self.directory.detach_link(tunnel, other)
                other.close_visitors(tunnel)
            self._log.info("agent {agent} left tunnel {tunnel} (a replica)", agent=link.session_id, tunnel=tunnel_id)
            return
        self.close(tunnel, "agent closed it")

    def _release(self, tunnel: Tunnel) -> list:
        """Unbind, quarantine, forget names and ports; the Deferreds of the unbinding."""
        self._unshare_client_ca(tunnel.client_ca_digest)
        tunnel.client_ca = tunnel.client_ca_digest = None
        if tunnel.stable_name is not None and self._named.get(tunnel.stable_name) is tunnel:
            del self._named[tunnel.stable_name]
        unbinding = []
        for endpoint in tunnel.endpoints:
            if endpoint.kind == "tcp" and endpoint.port:
                unbinding.append(self.ports.unbind(endpoint.port, keep=self._kept_port(tunnel, endpoint)))
        d = self.directory.remove(tunnel)
        d.addErrback(lambda f: self._log.failure("directory remove failed", f))
        return unbinding

    def link_lost(self, link, graceful: bool) -> None:
        """A link ended: its tunnels end too (agent said goodbye), or wait in
        grace once no other link serves them."""
        self._drop_link(link)
        session = getattr(link, "session", None)
        if session is not None:
            if graceful:
                session.stopping = True
            graceful = graceful or session.stopping
        self._detach_all(link, graceful, keep_streams=False)
        if session is not None and self.sessions.leave(link):
            # Its last link: it serves nothing now. Its tunnels wait in their
            # grace period unless a replica serves them.
            for tunnel_id in list(session.tunnel_ids):
                tunnel = self._local.get(tunnel_id)
                if tunnel is not None and session in tunnel.sessions:
                    tunnel.sessions.remove(session)
        if self.on_link_gone is not None:
            self.on_link_gone()

    def link_draining(self, link) -> None:
        """The agent said GOAWAY(DRAINING): its tunnels end now, as on a
        goodbye (no new visitors, ports into quarantine), but the streams in
        progress on the link go on until the agent's final GOAWAY."""
        session = getattr(link, "session", None)
        if session is not None:
            session.stopping = True
        self._detach_all(link, True, keep_streams=True)

    def _detach_all(self, link, graceful: bool, keep_streams: bool) -> None:
        session = getattr(link, "session", None)
        served = session.tunnel_ids if session is not None else ()
        for tunnel in [self._local[i] for i in list(served) if i in self._local]:
            if link not in tunnel.links:
                continue  # drained before it was lost: detached then
            d = self.directory.detach_link(tunnel, link)
            d.addCallback(self._detached, tunnel, graceful, keep_streams)
            d.addErrback(lambda f: self._log.failure("detach_link failed", f))

    def _detached(self, remaining: list, tunnel: Tunnel, graceful: bool, keep_streams: bool = False) -> None:
        if remaining or self._local.get(tunnel.tunnel_id) is not tunnel:
            return  # still served by another link, or closed meanwhile
        if graceful:
            self.close(tunnel, "agent draining" if keep_streams else "agent closed it", keep_streams=keep_streams)
        else:
            tunnel.detached_at = self.reactor.seconds()
            tunnel.deadline = tunnel.detached_at + self.grace_seconds
            self.grace.start(tunnel.tunnel_id, self.grace_seconds, lambda: self.close(tunnel, "grace period expired"))
            self._changed()
            self._log.info(
                "tunnel {tunnel} waits {seconds:.0f}s for its agent to come back",
                tunnel=tunnel.tunnel_id, seconds=self.grace_seconds,
            )

    def _check_limits(self, link, request: OpenTunnel) -> None:
        limits = self.limits_of(link)
        held = [self._local[i] for i in link.session.tunnel_ids if i in self._local]
        if len(held) + 1 > limits.max_tunnels:
            raise LimitExceededError(None, f"tunnels per session: at most {limits.max_tunnels}", "tunnels")
        if limits.token_max_tunnels is not None:
            # Live and in grace, over every link of the token.
            if len(self._tunnels_by_token.get(_token_id(link), ())) + 1 > limits.token_max_tunnels:
                raise LimitExceededError(None, f"tunnels of this token: at most {limits.token_max_tunnels}", "tunnels_per_token")
        ports = sum(e.kind == "tcp" for t in held for e in t.endpoints)
        wanted_ports = sum(s.kind == "tcp" for s in request.services)
        if ports + wanted_ports > limits.max_ports:
            raise LimitExceededError(None, f"public ports per session: at most {limits.max_ports}", "ports")
        hostnames = sum(e.kind == "tls" for t in held for e in t.endpoints)
        wanted_hostnames = len(request.services) - wanted_ports
        if hostnames + wanted_hostnames > limits.max_hostnames:
            raise LimitExceededError(None, f"hostnames per session: at most {limits.max_hostnames}", "hostnames")
        if request.client_ca is not None:
            distinct = {t.client_ca_digest: len(t.client_ca) for t in held if t.client_ca}
            distinct[hashlib.sha256(request.client_ca).digest()] = len(request.client_ca)
            if sum(distinct.values()) > limits.max_client_ca_bytes:
                raise LimitExceededError(
                    None, f"client CA bytes per session: at most {limits.max_client_ca_bytes}", "client_ca_bytes"
                )

    def _share_client_ca(self, pem: bytes | None) -> bytes | None:
        if pem is None:
            return None
        entry = self._client_cas.setdefault(hashlib.sha256(pem).digest(), [pem, 0])
        entry[1] += 1
        return entry[0]

    def _unshare_client_ca(self, digest: bytes | None) -> None:
        if digest is None:
            return
        entry = self._client_cas.get(digest)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._client_cas[digest]

    def close_all(self) -> defer.Deferred:
        """End every tunnel; fires once their ports are unbound."""
        unbinding = []
        for tunnel in list(self._local.values()):
            unbinding.extend(self.close(tunnel, "relay stopping"))
        return defer.DeferredList(unbinding, consumeErrors=True)

    # -- the state folder (relay/node/reservations.py) ------------------------------

    def snapshot(self) -> dict:
        """What a restarted relay needs to honour every reclaim and name."""
        tunnels = []
        for tunnel in self._local.values():
            endpoints = []
            for e in tunnel.endpoints:
                item = {"service": e.service, "kind": e.kind}
                if e.kind == "tcp":
                    item["port"] = e.port
                else:
                    item.update(mode=e.mode, alpn=list(e.alpn), hostname=e.hostname)
                endpoints.append(item)
            tunnels.append({
                "id": tunnel.tunnel_id,
                "name": tunnel.name,
                "created": tunnel.created,
                "tenant": tunnel.tenant,
                "token": self._token_of.get(tunnel.tunnel_id),  # its id, for the token's limits
                "stable_name": tunnel.stable_name,
                "secret_sha256": tunnel.reclaim_digest.hex(),
                # None while served: a restart counts the grace from its going down.
                "deadline": tunnel.deadline if tunnel.pick_link() is None else None,
                "endpoints": endpoints,
            })
        quarantine = self.ports.allocator.quarantine()
        return {
            "tunnels": tunnels,
            "names": self.names.encode(),
            "quarantine": {str(port): until for port, until in quarantine.items()},
        }

    @defer.inlineCallbacks
    def restore(self, snapshot: dict, down_at: float):
        """Take back what the relay held when it went down at `down_at`:
        names and their ports, the quarantine, and every tunnel whose grace
        period is not over (ports bound again, hostnames reserved, a grace
        timer for what is left); the others expire now. Fires with
        (restored, expired)."""
        now = self.reactor.seconds()
        allocator = self.ports.allocator
        skipped = restored = expired = 0
        try:
            self.names.load(snapshot.get("names") or {})
        except (AttributeError, KeyError, TypeError, ValueError):
            skipped += 1
        for port in self.names.ports():
            allocator.keep(port)
        for port, until in (snapshot.get("quarantine") or {}).items():
            try:
                allocator.quarantine_until(int(port), float(until))
            except (TypeError, ValueError):
                skipped += 1
        for item in snapshot.get("tunnels") or ():
            try:
                deadline = item.get("deadline")
                deadline = float(deadline) if deadline is not None else down_at + self.grace_seconds
                tunnel = self._restored_tunnel(item, min(down_at, now), deadline)
            except (AttributeError, KeyError, TypeError, ValueError):
                skipped += 1
                continue
            if deadline <= now:
                expired += 1
                self._expired_while_down(tunnel, now)
                continue
            token_id = item.get("token")
            ok = yield self._rebind(tunnel, str(token_id) if token_id is not None else None)
            if ok:
                restored += 1
                self.grace.start(tunnel.tunnel_id, deadline - now, lambda t=tunnel: self.close(t, "grace period expired"))
            else:
                expired += 1
        self._log.info(
            "reservations: {restored} tunnel(s) wait for their agents, {expired} expired while the relay "
            "was down, {names} stable name(s){skipped}",
            restored=restored, expired=expired, names=len(self.names.encode()),
            skipped=f", {skipped} unreadable entries skipped" if skipped else "",
        )
        self._changed()
        return restored, expired

    def _restored_tunnel(self, item: dict, detached_at: float, deadline: float) -> Tunnel:
        tunnel = Tunnel(
            tunnel_id=str(item["id"]),
            name=str(item.get("name", "")),
            created=float(item.get("created", detached_at)),
            reclaim_digest=bytes.fromhex(item["secret_sha256"]),
            tenant=str(item.get("tenant", DEV_TENANT)),
            stable_name=item.get("stable_name"),
            detached_at=detached_at,
            deadline=deadline,
            restored=True,
        )
        if len(tunnel.reclaim_digest) != 32:
            raise ValueError("a reclaim digest is 32 bytes")
        for e in item["endpoints"]:
            endpoint = Endpoint(str(e["service"]), str(e["kind"]))
            if endpoint.kind == "tcp":
                endpoint.port = int(e["port"])
            elif endpoint.kind == "tls":
                endpoint.mode = str(e.get("mode", "terminate"))
                endpoint.alpn = tuple(str(p) for p in e.get("alpn", ()))
                endpoint.hostname = str(e["hostname"])
            else:
                raise ValueError("bad kind")
            tunnel.endpoints.append(endpoint)
        return tunnel

    def _expired_while_down(self, tunnel: Tunnel, now: float) -> None:
        """Its ports rest in quarantine from now, as if it had expired here."""
        for endpoint in tunnel.endpoints:
            if endpoint.kind == "tcp" and not self._kept_port(tunnel, endpoint):
                self.ports.allocator.quarantine_until(endpoint.port, now + self.ports.allocator.quarantine_seconds)

    @defer.inlineCallbacks
    def _rebind(self, tunnel: Tunnel, token_id: str | None = None):
        """Bind a restored tunnel's ports and reserve its hostnames; False
        (and nothing held) if one cannot be had."""
        try:
            for endpoint in tunnel.endpoints:
                if endpoint.kind == "tcp":
                    yield self._bind_endpoint(tunnel, endpoint, port=endpoint.port)
                elif self.domain is None or not (
                    yield self.directory.claim_hostname(endpoint.hostname, tunnel, endpoint)
                ):
                    raise NoPortsAvailableError(None, f"{endpoint.hostname} cannot be served")
                else:
                    endpoint.host, endpoint.port = endpoint.hostname, self.tls_port
            yield self.directory.add(tunnel)
        except TunnelRequestError as e:
            self._log.warn("tunnel {tunnel} not restored: {error}", tunnel=tunnel.tunnel_id, error=str(e))
            self._release(tunnel)
            return False
        self._local[tunnel.tunnel_id] = tunnel
        if tunnel.stable_name is not None:
            self._named[tunnel.stable_name] = tunnel
        if token_id is not None:
            self._tunnels_by_token.setdefault(token_id, set()).add(tunnel.tunnel_id)
            self._token_of[tunnel.tunnel_id] = token_id
        return True

    # -- views -------------------------------------------------------------------

    def describe(self, figures=None) -> list[dict]:
        """The admin view of this node's tunnels; `figures(tunnel_id)` adds
        the metrics observer's per-tunnel counts."""
        out = []
        for tunnel in self._local.values():
            item = tunnel.describe()
            live = tunnel.pick_link()
            item["state"] = "live" if live is not None else "waiting-for-agent"
            if tunnel.detached_at is not None and live is None:
                item["waiting_seconds"] = round(self.reactor.seconds() - tunnel.detached_at, 3)
            item["agent"] = live.session_id if live is not None else None
            item["status"] = tunnel_status(tunnel)
            item["replicas"] = [session.describe() for session in tunnel.sessions]
            if figures is not None:
                counts = figures(tunnel.tunnel_id)
                item["visitors"] = counts["streams_active"]
                item["streams_total"] = counts["streams_total"]
                item["denied_total"] = counts["denied_total"]  # outside --allow
                item["refused_total"] = counts["refused_total"]  # any reason
                item["bytes_in"] = counts["bytes_in"]
                item["bytes_out"] = counts["bytes_out"]
            out.append(item)
        return out


def _token_id(link) -> str:
    grant = getattr(link, "grant", None)
    return grant.token_id if grant is not None else ""
