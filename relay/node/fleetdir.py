"""The directory of a node in a fleet: this node's `MemoryDirectory`, plus
the fleet registry (relay/node/registry.py) for what must be unique across
the fleet, plus the hop (relay/node/peers.py) for stable names another
node holds.

- Random ids are claimed in the registry (`SET NX`); with Redis away a node
  still hands them out (80 random bits; their hostnames carry the node's
  label, so nobody else routes them).
- A stable hostname (`<name>-<tenant>.<domain>`, no node label) is claimed
  in the registry before it is served: a name another live node holds is
  not taken, and with Redis away it is refused (the node cannot know).
- TCP ports are recorded as `port:<node>:<port>`: one node's address space.
- `by_hostname` answers from this node first; a stable hostname held by
  another node gives a `RemoteTunnel` whose one "link" is the peer link to
  that node, so SNI routing splices the visitor's raw bytes onto a stream of
  it exactly as it splices a passthrough visitor onto an agent's stream.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from relay.node.directory import Endpoint, ITunnelDirectory, MemoryDirectory, Tunnel
from relay.node.registry import RegistryUnavailableError, hostname_key, id_key, port_key


class RemoteTunnel(Tunnel):
    """A stable hostname another node holds, as routing sees it here."""


@implementer(ITunnelDirectory)
class FleetDirectory(MemoryDirectory):
    _log = Logger()

    def __init__(self, clock, registry, *, node: str, domain: str, peers=None):
        super().__init__(clock)
        self.registry = registry
        self.node = node
        self.domain = domain
        self.node_suffix = f".{node}.{domain}"
        self.peers = peers  # relay/node/peers.py PeerLinks, or None: no hop

    def is_stable_hostname(self, hostname: str) -> bool:
        """A fleet-wide name: one label under the domain (no node label)."""
        head, _, tail = hostname.partition(".")
        return tail == self.domain and bool(head)

    # -- claims -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def fresh_id(self):
        while True:
            tunnel_id = yield super().fresh_id()
            try:
                ok = yield self.registry.claim(id_key(tunnel_id))
            except RegistryUnavailableError:
                return tunnel_id  # refresh writes it once Redis is back
            if ok:
                return tunnel_id
            self._ids.discard(tunnel_id)

    @defer.inlineCallbacks
    def claim_hostname(self, hostname, tunnel, endpoint):
        ok = yield super().claim_hostname(hostname, tunnel, endpoint)
        if not ok or not self.is_stable_hostname(hostname):
            return ok
        try:
            ok = yield self.registry.claim(hostname_key(hostname))
        except RegistryUnavailableError:
            ok = False  # we cannot know that no other node serves it
        if not ok:
            if self._hostnames.get(hostname, (None,))[0] is tunnel:
                del self._hostnames[hostname]
        return ok

    @defer.inlineCallbacks
    def claim_port(self, port, tunnel, endpoint):
        ok = yield super().claim_port(port, tunnel, endpoint)
        if ok:
            yield self.registry.record(port_key(self.node, port))
        return ok

    def remove(self, tunnel):
        keys = [id_key(tunnel.tunnel_id)]
        for endpoint in tunnel.endpoints:
            if endpoint.hostname and self.is_stable_hostname(endpoint.hostname) and \
                    self._hostnames.get(endpoint.hostname, (None,))[0] is tunnel:
                keys.append(hostname_key(endpoint.hostname))
            if endpoint.kind == "tcp" and self._ports.get(endpoint.port, (None,))[0] is tunnel:
                keys.append(port_key(self.node, endpoint.port))
        d = super().remove(tunnel)
        for key in keys:
            self.registry.release(key)
        return d

    # -- lookups ----------------------------------------------------------------------

    def local_by_hostname(self, hostname):
        """This node's answer only: what a hop stream may reach (one hop at most)."""
        return super().by_hostname(hostname)

    @defer.inlineCallbacks
    def by_hostname(self, hostname):
        local = self._hostnames.get(hostname)
        if local is not None or self.peers is None or not self.is_stable_hostname(hostname):
            return local
        try:
            node = yield self.registry.holder(hostname_key(hostname))
        except RegistryUnavailableError:
            return None  # nothing cached, Redis away: refused
        if node is None or node == self.node:
            return None
        link = yield self.peers.link_to(node)
        if link is None:
            return None
        tunnel = RemoteTunnel(tunnel_id=f"hop:{node}", name=hostname, created=self.clock.seconds(),
                              reclaim_digest=b"\0" * 32)
        tunnel.links = [link]
        endpoint = Endpoint("", "tls", "passthrough", hostname=hostname)  # raw bytes to the holder
        tunnel.endpoints.append(endpoint)
        return tunnel, endpoint
