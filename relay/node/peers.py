"""Relay-to-relay links: the one hop of a fleet (docs/network.md, protocol.md).

A node that receives a visitor for a stable name another node holds forwards
the visitor's bytes to that node over a *peer link*: TLS with certificates
of the fleet CA on both sides (the client's is required), carrying the same
mux protocol as an agent link. The dialling node plays the agent's role
(it sends HELLO `{"peer": <its node>}` and opens odd streams); the holding
node answers HELLO and serves each stream.

A hop stream's OPEN metadata is `{"hop": "tls", "sni": <hostname>, "peer":
[visitor host, port], "local": [host, port the visitor reached]}`, and its
bytes are the visitor's raw bytes from its ClientHello on, both ways. The
holding node runs its own SNI router on the stream, answering from its *own*
tunnels only (one hop at most), so TLS is terminated, or passed through, on
the node that holds the agent, with the tunnel's ALPN list, client CA and
allowlist (checked against the visitor's address from OPEN): exactly as for
a visitor that came straight to it. No L7 reading on either node.

What a peer may ask: streams for hostnames this node holds, nothing else:
no control messages, no tunnels, no other node's names.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from relay.mux import ErrorCode, MuxConnection, Role
from relay.wire.link import MuxLink
from relay.wire.splice import Splice
from relay.wire.tlslayer import TLSLayer

PEER_AGENT_NAME = "tunnel-relay-peer/1"
# A peer link's HELLO must come this soon after the TCP accept (TLS included).
PEER_HANDSHAKE_SECONDS = 10.0
# How long dialling a peer may take before the visitor waiting for it is refused.
PEER_CONNECT_SECONDS = 5.0
# Hop streams open at once on one peer link; past it new ones are reset.
MAX_HOP_STREAMS_PER_LINK = 4096
# Peer links accepted at once (each node keeps one to each other node).
MAX_PEER_LINKS = 256


def peer_dns_name(node: str, domain: str) -> str:
    """The name a node's peer certificate carries, and peers check."""
    return f"{node}.peers.{domain}"


def certificate_dns_names(der: bytes | None) -> list[str]:
    if not der:
        return []
    certificate = x509.load_der_x509_certificate(der)
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.DNSName)


class PeerTLS:
    """The contexts of peer links: this node's peer certificate, and the fleet CA."""

    def __init__(self, cert_path, key_path, ca_path):
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for context in (self.server, self.client):
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(str(cert_path), str(key_path))
            context.load_verify_locations(cafile=str(ca_path))
            context.verify_mode = ssl.CERT_REQUIRED
        self.client.check_hostname = True


class PeerClientLink(MuxLink):
    """Our link to another node: we open one stream per visitor we hop."""

    _log = Logger()

    def __init__(self, peers: "PeerLinks", node: str):
        super().__init__(MuxConnection(Role.AGENT), peers.reactor)
        self.peers = peers
        self.node = node
        self.grant = None  # routing asks the node's own limits for it
        self.session_id = f"peer-{node}"
        self.ready = defer.Deferred()

    def on_connected(self):
        self.mux.send_hello({"peer": self.peers.node, "agent": PEER_AGENT_NAME})
        self.flush()

    def on_hello(self, info: dict):
        if info.get("peer") != self.node:
            self._log.warn("peer link to {node}: it says it is {other}", node=self.node, other=info.get("peer"))
            self.close_link(ErrorCode.PROTOCOL_ERROR, "wrong node")
            return
        self._log.info("peer link to node {node} up", node=self.node)
        if not self.ready.called:
            self.ready.callback(self)

    def on_link_lost(self, reason):
        self.peers.lost(self)
        if not self.ready.called:
            self.ready.callback(None)

    def stream_count(self, tunnel_id: str) -> int:
        return len(self.streams)

    def open_visitor_stream(self, tunnel, endpoint, addr, local, sni=None):
        """As RelayLink.open_visitor_stream: the visitor's raw bytes go onto a hop stream."""
        metadata = {
            "hop": "tls",
            "sni": sni or endpoint.hostname,
            "peer": [getattr(addr, "host", ""), getattr(addr, "port", 0)],
            "local": [getattr(local, "host", ""), getattr(local, "port", 0)],
        }
        splice = Splice()

        def open_stream():
            if self.closed or self.mux.draining or len(self.streams) >= MAX_HOP_STREAMS_PER_LINK:
                splice.a.transport.abortConnection()
                return
            try:
                self.open_stream(metadata, splice.b)
            except Exception as e:  # the link filled or closed since: this visitor only
                self._log.info("hop to {node} refused: {error}", node=self.node, error=str(e))
                splice.a.transport.abortConnection()

        splice.a.when_connected = open_stream
        return splice.a

    def close_visitors(self, tunnel) -> None:
        pass


class PeerServerLink(MuxLink):
    """Another node's link to us: each stream is one visitor for one of our hostnames."""

    _log = Logger()

    def __init__(self, peers: "PeerLinks"):
        super().__init__(MuxConnection(Role.RELAY), peers.reactor)
        self.peers = peers
        self.node = None
        self.cert_names: list[str] = []
        self._deadline = None

    def on_connected(self):
        self._deadline = self.clock.callLater(PEER_HANDSHAKE_SECONDS, self._too_slow)

    def _too_slow(self):
        self._deadline = None
        self._log.warn("peer link {peer}: no HELLO in time", peer=self.peer)
        self.abort_link()

    def on_hello(self, info: dict):
        node = info.get("peer")
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if not isinstance(node, str) or peer_dns_name(node, self.peers.domain) not in self.cert_names:
            self._log.warn("peer link {peer}: HELLO names {node!r}, its certificate does not", peer=self.peer,
                           node=str(node)[:64])
            self.close_link(ErrorCode.AUTH_FAILED, "the certificate does not name this node")
            return
        self.node = node
        self.mux.send_hello({"peer": self.peers.node, "agent": PEER_AGENT_NAME})
        self.flush()
        self._log.info("peer link from node {node} up", node=node)

    def on_stream_opened(self, stream_id: int, metadata: dict) -> None:
        sni = metadata.get("sni")
        if metadata.get("hop") != "tls" or not isinstance(sni, str) or self.node is None:
            self.mux.reset(stream_id, ErrorCode.REFUSED_STREAM, "not a hop stream")
            self.flush_soon()
            return
        if len(self.streams) >= MAX_HOP_STREAMS_PER_LINK:
            self.mux.reset(stream_id, ErrorCode.REFUSED_STREAM, "too many hop streams")
            self.flush_soon()
            return
        stream = self.serve_stream(stream_id, metadata, self.peers.front.buildProtocol(None))
        stream.accept()

    def on_link_lost(self, reason):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()


class LocalRouting:
    """The routing a hop stream sees: the node's, but with hostnames answered
    from this node's own tunnels only, so a hop never hops again."""

    def __init__(self, tunnels, directory):
        self._tunnels = tunnels
        self._directory = directory

    def route_hostname(self, hostname: str):
        return self._directory.local_by_hostname(hostname)

    def __getattr__(self, name):
        return getattr(self._tunnels, name)


class PeerLinks:
    """This node's peer links: one dialled to each node it hops to, and the
    ones other nodes dialled to it."""

    _log = Logger()

    def __init__(self, reactor, registry, tls: PeerTLS, *, node: str, domain: str):
        self.reactor = reactor
        self.registry = registry
        self.tls = tls
        self.node = node
        self.domain = domain
        self.front = None  # a TLSFrontFactory over LocalRouting (the service sets it)
        self._links: dict[str, PeerClientLink] = {}
        self._dialling: dict[str, defer.Deferred] = {}
        self.accepted = 0

    def link_to(self, node: str) -> defer.Deferred:
        """The live link to `node` (dialled if need be), or None if it cannot be had."""
        link = self._links.get(node)
        if link is not None and not link.closed and link.ready.called:
            return defer.succeed(link)
        pending = self._dialling.get(node)
        if pending is None:
            pending = self._dialling[node] = self._dial(node)
            pending.addBoth(self._dialled, node)
        waiter = defer.Deferred()
        pending.addBoth(lambda result: (waiter.callback(result), result)[1])
        return waiter

    def _dialled(self, result, node):
        self._dialling.pop(node, None)
        return result

    @defer.inlineCallbacks
    def _dial(self, node: str):
        try:
            info = yield self.registry.node_info_of(node)
        except Exception as e:
            self._log.info("peer {node}: no address ({error})", node=node, error=str(e))
            return None
        address = (info or {}).get("peer")
        if not isinstance(address, str) or ":" not in address:
            return None
        host, _, port = address.rpartition(":")
        link = PeerClientLink(self, node)
        layer = TLSLayer(
            self.tls.client, link, self.reactor, server_side=False,
            server_hostname=peer_dns_name(node, self.domain),
        )
        endpoint = clientFromString(self.reactor, f"tcp:host={host.strip('[]')}:port={int(port)}:timeout={PEER_CONNECT_SECONDS:g}")
        try:
            yield connectProtocol(endpoint, layer)
        except Exception as e:
            self._log.info("peer {node} at {address} unreachable: {error}", node=node, address=address, error=str(e))
            return None
        self._links[node] = link
        timer = self.reactor.callLater(PEER_CONNECT_SECONDS, lambda: link.ready.called or link.abort_link())
        ready = yield link.ready
        if timer.active():
            timer.cancel()
        return ready

    def lost(self, link: PeerClientLink) -> None:
        if self._links.get(link.node) is link:
            del self._links[link.node]
            self._log.info("peer link to node {node} down", node=link.node)

    def server_factory(self) -> Factory:
        peers = self

        class PeerPortFactory(Factory):
            noisy = False

            def buildProtocol(self, addr):
                if peers.accepted >= MAX_PEER_LINKS:
                    return None
                peers.accepted += 1
                link = PeerServerLink(peers)

                def verify(der):
                    link.cert_names = certificate_dns_names(der)

                def lost():
                    peers.accepted -= 1  # the raw connection ended, handshake or not

                return TLSLayer(peers.tls.server, link, peers.reactor, verify=verify, on_lost=lost,
                                handshake_timeout_seconds=PEER_HANDSHAKE_SECONDS)

        return PeerPortFactory()

    def close_all(self) -> None:
        for link in list(self._links.values()):
            link.close_link(ErrorCode.NO_ERROR, "relay stopping")
