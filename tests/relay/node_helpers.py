"""A relay node's parts on in-memory transports: a TunnelManager over a
MemoryReactorClock (listening ports recorded, no sockets), and agent links
driven by a peer MuxConnection, for tests of routing and control handling."""

from twisted.internet.testing import MemoryReactorClock, StringTransport

from relay.node.tenants import DEV_GRANT
from relay.mux import MuxConnection, Role
from relay.mux import control
from relay.mux import events as ev
from relay.node.agents import AgentLinkFactory
from relay.node.listeners import PublicPorts
from relay.node.ports import PortAllocator
from relay.node.tunnels import TunnelManager
from relay.wire.metrics import Counters

TOKEN = "s3cret-token-value-never-logged"
LOW, HIGH = 21000, 21009
DOMAIN = "tunnels.example"


class Node:
    """A TunnelManager, its metrics and an agent-link factory on one MemoryReactorClock."""

    def __init__(self, grace_seconds: float = 60.0, quarantine_seconds: float = 120.0, directory=None, limits=None,
                 metrics=None, grants=None, state_dir=None, now: float = 0.0, replica_policy: str = "join"):
        """`directory`: a directory class, made with this node's clock (default MemoryDirectory);
        `metrics(node)`: the node's metrics observer (default Counters).
        `grants`: token -> Grant (default: TOKEN, the dev tenant's). `state_dir`: keep
        reservations there (written inline, no thread), as a relay does; `now`: the clock's start."""
        self.reactor = MemoryReactorClock()
        self.reactor.advance(now)
        grants = grants if grants is not None else {TOKEN: DEV_GRANT}
        self.metrics = metrics(self) if metrics is not None else Counters()
        self.allocator = PortAllocator(LOW, HIGH, quarantine_seconds, self.reactor)
        self.tunnels = TunnelManager(
            self.reactor,
            PublicPorts(self.reactor, self.allocator, "127.0.0.1"),
            public_host="relay.example",
            domain=DOMAIN,
            tls_port=443,
            grace_seconds=grace_seconds,
            metrics=self.metrics,
            replica_policy=replica_policy,
            directory=directory(self.reactor) if directory is not None else None,
            **({"limits": limits} if limits is not None else {}),
        )
        self.factory = AgentLinkFactory(
            self.reactor,
            self.tunnels,
            lambda token: grants.get(token) if isinstance(token, str) else None,
            metrics=self.metrics,
            keepalive_interval_seconds=10,
            keepalive_timeout_seconds=30,
        )

        self.journal = None
        if state_dir is not None:
            from twisted.internet import defer

            from relay.node.reservations import ReservationFile

            self.journal = self.tunnels.journal = ReservationFile(
                state_dir, self.reactor, self.tunnels.snapshot, run_blocking=defer.maybeDeferred,
            )

    def restore(self):
        """What a starting relay does with its state folder; (restored, expired)."""
        loaded = self.journal.load()
        self.journal.start()
        return self.tunnels.restore(*loaded).result if loaded is not None else None

    def listener(self, port: int):
        """The factory listening on `port` (the memory reactor records every
        listenTCP; the latest one, after a port was bound again)."""
        factories = [f for p, f, _backlog, _iface in self.reactor.tcpServers if p == port]
        return factories[-1]

    def agent(self, token: str = TOKEN, *, links: int = 1) -> "Agent":
        """A new session's first link; `links`: how many it says it keeps."""
        return Agent(self, token, {"links": links})

    def join(self, first: "Agent", token: str = TOKEN, secret: str | None = None) -> "Agent":
        """One more link of `first`'s session (with its join secret, or `secret`)."""
        session = first.hello["session"]
        given = first.hello["join_secret"] if secret is None else secret
        return Agent(self, token, {"join": {"session": session, "secret": given}})


class Agent:
    """One agent link: the relay's RelayLink on a StringTransport, and the
    agent's MuxConnection that we drive by hand."""

    def __init__(self, node: Node, token: str, fields: dict | None = None):
        self.node = node
        self.link = node.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.mux = MuxConnection(Role.AGENT)
        self.mux.send_hello({"token": token, "agent": "test", **(fields or {})})
        self.events = self._exchange()
        hellos = [e.info for e in self.events if isinstance(e, ev.HelloReceived)]
        self.hello = hellos[0] if hellos else None  # the relay's, if it accepted
        self._next_id = 1

    def _exchange(self) -> list:
        self.link.dataReceived(b"".join(self.mux.outgoing()))
        data = self.transport.value()
        self.transport.clear()
        return self.mux.receive_data(data) if data else []

    def send(self, message: dict) -> list:
        """Send one CONTROL message; the relay's answering events."""
        self.mux.send_control(message)
        return self._exchange()

    def request(self, make) -> control.Reply:
        """A request built by `make(request_id)`; its parsed reply."""
        request_id, self._next_id = self._next_id, self._next_id + 1
        events = [e for e in self.send(make(request_id)) if isinstance(e, ev.ControlReceived)]
        [reply] = [control.parse_reply(e.message) for e in events if e.message.get("id") == request_id]
        return reply

    def open(self, services=({"name": "", "kind": "tcp"},), reclaim=None, **fields) -> control.Reply:
        wire = {"name": "t", "services": list(services), **fields}
        return self.request(lambda rid: control.open_tunnel_request(rid, wire, reclaim))

    def close(self, tunnel_id: str) -> control.Reply:
        return self.request(lambda rid: control.close_tunnel_request(rid, tunnel_id))

    def pump(self) -> list:
        """Events for whatever the relay wrote since the last exchange."""
        return self._exchange()

    def lose(self) -> None:
        """The TCP connection is gone without a goodbye."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.link.connectionLost(Failure(ConnectionLost()))
