"""The admin API (relay/node/admin.py) without sockets: HTTP requests go
through a real twisted.web Site on a StringTransport, the node's parts are the
real ones (TunnelManager, MemoryDirectory, PublicPorts over a
MemoryReactorClock, RelayLink, Counters), and an agent is a sans-IO
MuxConnection fed the link's bytes (tests/relay/test_link.py style).
"""

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from relay.node.tenants import DEV_GRANT
from relay.mux import ErrorCode, MuxConnection, Role
from relay.mux import control
from relay.mux import events as ev
from relay.node.admin import AdminAPI
from relay.node.agents import AgentLinkFactory
from relay.node.directory import MemoryDirectory, secret_digest
from relay.node.listeners import PublicPorts
from relay.node.ports import PortAllocator
from relay.node.tunnels import TunnelManager
from relay.wire.metrics import Counters

TOKEN = "adm1n-test-token-that-must-never-show"
LOW_PORT, HIGH_PORT = 21000, 21009
VISITOR = IPv4Address("TCP", "198.51.100.7", 40000)


class Node:
    """One relay node's admin-relevant parts, in memory."""

    def __init__(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)  # started_at is not 0: uptime is a difference
        self.metrics = Counters()
        ports = PublicPorts(self.reactor, PortAllocator(LOW_PORT, HIGH_PORT, 60, self.reactor), "0.0.0.0")
        self.tunnels = TunnelManager(
            self.reactor, ports, public_host="relay.example", domain="t.example", tls_port=8443,
            grace_seconds=60, directory=MemoryDirectory(self.reactor), metrics=self.metrics,
        )
        self.links = AgentLinkFactory(
            self.reactor, self.tunnels, lambda token: DEV_GRANT if token == TOKEN else None, metrics=self.metrics,
            handshake_timeout_seconds=10, keepalive_interval_seconds=10, keepalive_timeout_seconds=30,
        )
        self.admin = AdminAPI(self.tunnels, self.metrics, self.reactor.seconds(), self.reactor)
        self.site = Site(self.admin.resource(), reactor=self.reactor)

    def get(self, path: str):
        """GET `path` over HTTP/1.0 (no chunking): (status, headers, body bytes)."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8081),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        channel.makeConnection(transport)
        channel.dataReceived(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head, _, body = transport.value().partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        channel.connectionLost(Failure(ConnectionDone()))
        return int(status_line.split()[1]), headers, body

    def health(self) -> dict:
        return json.loads(self.get("/healthz")[2])

    def tunnel_list(self) -> list:
        return json.loads(self.get("/v1/tunnels")[2])["tunnels"]

    def agent(self):
        """An authenticated agent link: (AgentPeer, RelayLink)."""
        link = self.links.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.5", 41000))
        link.makeConnection(transport)
        peer = AgentPeer(link, transport)
        peer.mux.send_hello({"token": TOKEN, "agent": "test"})
        events = peer.pump()
        assert [type(e) for e in events] == [ev.HelloReceived]
        return peer, link


class AgentPeer:
    """The agent's end of a RelayLink: a sans-IO core fed the link's bytes."""

    def __init__(self, link, transport):
        self.link = link
        self.transport = transport
        self.mux = MuxConnection(Role.AGENT)
        self._next_id = 1

    def pump(self) -> list:
        """Deliver our queued frames to the link; return what it sent back, as events."""
        if self.mux.has_outgoing():
            self.link.dataReceived(b"".join(self.mux.outgoing()))
        data = self.transport.value()
        self.transport.clear()
        return self.mux.receive_data(data)

    def request(self, message: dict) -> dict:
        """Send one control request (its id is ours), return the relay's reply."""
        message = dict(message, id=self._next_id)
        self._next_id += 1
        self.mux.send_control(message)
        replies = [e.message for e in self.pump() if isinstance(e, ev.ControlReceived)]
        assert len(replies) == 1, replies
        assert replies[0]["id"] == message["id"]
        return replies[0]

    def open_tunnel(self, **wire) -> dict:
        wire.setdefault("services", [{"name": "", "kind": "tcp"}])
        reply = self.request(control.open_tunnel_request(0, wire))
        assert reply["ok"] is True, reply
        return reply


def visit(node: Node, port: int, addr=VISITOR):
    """A visitor connecting to a public port: the splice (or None if refused), on a StringTransport."""
    (factory,) = [f for p, f, _, _ in node.reactor.tcpServers if p == port]
    protocol = factory.buildProtocol(addr)
    if protocol is not None:
        protocol.makeConnection(StringTransport(peerAddress=addr))
    return protocol


def test_healthz_is_uncached_json():
    """GET /healthz answers 200 with a JSON body, Content-Type application/json and Cache-Control no-store."""
    node = Node()
    status, headers, body = node.get("/healthz")
    assert status == 200
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"cache-control"] == b"no-store"
    assert json.loads(body)["status"] == "ok"


def test_tunnel_list_is_uncached_json():
    """GET /v1/tunnels answers 200 with a JSON body, Content-Type application/json and Cache-Control no-store."""
    node = Node()
    status, headers, body = node.get("/v1/tunnels")
    assert status == 200
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"cache-control"] == b"no-store"
    assert json.loads(body) == {"tunnels": []}


def test_healthz_of_an_idle_node_is_all_zeros():
    """A node that heard no event reports zero agents, tunnels, streams and refusals."""
    node = Node()
    health = node.health()
    assert health == {
        "status": "ok",
        "uptime_seconds": 0.0,
        "agents": 0,
        "links": 0,
        "tunnels": 0,
        "streams_active": 0,
        "streams_total": 0,
        "auth_failures": 0,
        "tls_port_refused": {"unknown_names": 0, "bad_hellos": 0, "hello_timeouts": 0, "failed_handshakes": 0},
        "visitors_refused": {},
    }


def test_uptime_follows_the_clock():
    """uptime_seconds is the node's clock minus its start time, not wall time."""
    node = Node()
    node.reactor.advance(12.25)
    assert node.health()["uptime_seconds"] == 12.25


def test_agents_and_tunnels_follow_link_and_tunnel_events():
    """agents counts link_up minus link_down, tunnels counts tunnel_opened minus tunnel_closed."""
    node = Node()
    first, first_link = node.agent()
    second, second_link = node.agent()
    assert node.health()["agents"] == 2
    first.open_tunnel()
    first.open_tunnel(services=[{"name": "web", "kind": "tls"}])
    second.open_tunnel()
    assert node.health()["tunnels"] == 3
    # The first agent says goodbye: its link is down and its two tunnels end at once.
    first.mux.close(ErrorCode.NO_ERROR, "bye")
    first.pump()
    first_link.connectionLost(Failure(ConnectionDone()))
    health = node.health()
    assert (health["agents"], health["tunnels"]) == (1, 1)
    assert len(node.tunnel_list()) == 1


def test_a_lost_link_keeps_its_tunnels_in_grace_then_closes_them():
    """A link lost without goodbye leaves its tunnel listed as waiting-for-agent until grace ends."""
    node = Node()
    agent, link = node.agent()
    tunnel_id = agent.open_tunnel()["tunnel"]["id"]
    link.connectionLost(Failure(ConnectionLost()))
    node.reactor.advance(20)
    health = node.health()
    assert (health["agents"], health["tunnels"]) == (0, 1)
    (listed,) = node.tunnel_list()
    assert (listed["id"], listed["state"], listed["agent"]) == (tunnel_id, "waiting-for-agent", None)
    assert listed["waiting_seconds"] == 20.0
    node.reactor.advance(40)
    assert node.health()["tunnels"] == 0
    assert node.tunnel_list() == []


def test_failed_token_counts_as_auth_failure_not_agent():
    """A HELLO with a wrong token adds to auth_failures and not to agents."""
    node = Node()
    link = node.links.buildProtocol(None)
    transport = StringTransport()
    link.makeConnection(transport)
    peer = AgentPeer(link, transport)
    peer.mux.send_hello({"token": "wrong"})
    events = peer.pump()
    assert [(type(e), e.code) for e in events] == [(ev.GoAwayReceived, ErrorCode.AUTH_FAILED)]
    health = node.health()
    assert (health["auth_failures"], health["agents"]) == (1, 0)


def test_tls_port_refusals_map_to_their_named_keys():
    """Each TLS-port refusal reason has its own tls_port_refused key; visitors_refused lists every raw reason."""
    node = Node()
    reasons = ["unknown_name"] * 3 + ["bad_hello"] * 2 + ["hello_timeout"] + ["handshake_failed"] * 4
    for reason in reasons + ["agent_away", "not_allowed"]:
        node.metrics.visitor_refused(None, reason)
    health = node.health()
    assert health["tls_port_refused"] == {
        "unknown_names": 3, "bad_hellos": 2, "hello_timeouts": 1, "failed_handshakes": 4,
    }
    assert health["visitors_refused"] == {
        "agent_away": 1, "bad_hello": 2, "handshake_failed": 4, "hello_timeout": 1,
        "not_allowed": 1, "unknown_name": 3,
    }


def test_visitors_follow_stream_opened_and_closed():
    """A tunnel's visitors and the node's streams_active count accepted streams; streams_total only grows."""
    node = Node()
    agent, link = node.agent()
    port = agent.open_tunnel()["tunnel"]["port"]
    visitors = [visit(node, port) for _ in range(3)]
    opened = [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]  # the agent hears the three OPENs
    assert node.tunnel_list()[0]["visitors"] == 0  # not yet reached the service
    for event in opened:
        agent.mux.accept_stream(event.stream_id)  # the agent's service answered
    agent.pump()
    (listed,) = node.tunnel_list()
    assert (listed["visitors"], listed["streams_total"]) == (3, 3)
    assert (node.health()["streams_active"], node.health()["streams_total"]) == (3, 3)
    visitors[0].connectionLost(Failure(ConnectionDone()))
    (listed,) = node.tunnel_list()
    assert (listed["visitors"], listed["streams_total"]) == (2, 3)
    health = node.health()
    assert (health["streams_active"], health["streams_total"]) == (2, 3)


def test_refused_visitors_count_per_tunnel_and_per_reason():
    """A visitor outside --allow counts as denied and refused on its tunnel, one to an agent away as refused only."""
    node = Node()
    agent, link = node.agent()
    port = agent.open_tunnel(allow=["192.0.2.0/24"])["tunnel"]["port"]
    assert visit(node, port, IPv4Address("TCP", "198.51.100.9", 1234)) is None  # not allowed
    assert visit(node, port, IPv4Address("TCP", "192.0.2.9", 1234)) is not None  # allowed
    for event in agent.pump():
        if isinstance(event, ev.StreamOpened):
            agent.mux.accept_stream(event.stream_id)  # its service answered
    agent.pump()
    link.connectionLost(Failure(ConnectionLost()))  # grace: the port stays bound
    assert visit(node, port, IPv4Address("TCP", "192.0.2.10", 1234)) is None  # agent away
    (listed,) = node.tunnel_list()
    assert (listed["denied_total"], listed["refused_total"], listed["streams_total"]) == (1, 2, 1)
    assert listed["allow"] == ["192.0.2.0/24"]
    assert node.health()["visitors_refused"] == {"agent_away": 1, "not_allowed": 1}


def test_tunnel_list_describes_tcp_and_tls_tunnels():
    """/v1/tunnels lists each tunnel's id, name, public address and serving agent."""
    node = Node()
    agent, link = node.agent()
    tcp = agent.open_tunnel(name="ssh")["tunnel"]
    tls = agent.open_tunnel(name="site", services=[{"name": "web", "kind": "tls"}])["tunnel"]
    listed = {t["id"]: t for t in node.tunnel_list()}
    assert set(listed) == {tcp["id"], tls["id"]}
    tcp_item, tls_item = listed[tcp["id"]], listed[tls["id"]]
    assert LOW_PORT <= tcp_item["port"] <= HIGH_PORT
    assert (tcp_item["name"], tcp_item["kind"], tcp_item["state"]) == ("ssh", "tcp", "live")
    assert tcp_item["url"] == f"tcp://relay.example:{tcp_item['port']}"
    assert tcp_item["agent"] == link.session_id
    assert tls_item["hostname"] == f"web-{tls['id']}.t.example"
    assert tls_item["tls_socket"] == [f"web-{tls['id']}.t.example", 8443]
    assert (tls_item["mode"], tls_item["state"], tls_item["client_ca"]) == ("terminate", "live", False)


def test_no_token_or_reclaim_secret_in_either_body():
    """Neither /healthz nor /v1/tunnels ever contains an agent's token or a tunnel's reclaim secret."""
    node = Node()
    agent, link = node.agent()
    secrets = [
        agent.open_tunnel()["reclaim_secret"],
        agent.open_tunnel(services=[{"name": "web", "kind": "tls"}])["reclaim_secret"],
    ]
    visit(node, node.tunnel_list()[0]["endpoints"][0]["tcp_socket"][1])
    assert all(secrets) and TOKEN
    bodies = [node.get("/healthz")[2], node.get("/v1/tunnels")[2]]
    assert len(node.tunnel_list()) == 2
    for body in bodies:
        assert TOKEN.encode() not in body
        for secret in secrets:
            assert secret.encode() not in body
            assert secret_digest(secret).hex().encode() not in body
    # Still absent while the tunnels wait in grace for a reclaim.
    link.connectionLost(Failure(ConnectionLost()))
    for body in (node.get("/healthz")[2], node.get("/v1/tunnels")[2]):
        assert TOKEN.encode() not in body
        assert not any(secret.encode() in body for secret in secrets)


def test_a_reclaim_from_a_new_link_moves_the_tunnel_to_it():
    """An agent back on a new link before the old one died counts once, and its tunnel is listed live on the new session."""
    node = Node()
    old, old_link = node.agent()
    reply = old.open_tunnel()
    tunnel_id, secret = reply["tunnel"]["id"], reply["reclaim_secret"]
    new, new_link = node.agent()
    reclaimed = new.open_tunnel(reclaim={"tunnel": tunnel_id, "secret": secret})
    assert (reclaimed["reclaimed"], reclaimed["tunnel"]["id"]) == (True, tunnel_id)
    assert old_link.closed  # replaced: GOAWAY(SESSION_REPLACED) and aborted
    old_link.connectionLost(Failure(ConnectionLost()))
    health = node.health()
    assert (health["agents"], health["tunnels"]) == (1, 1)
    (listed,) = node.tunnel_list()
    assert (listed["id"], listed["state"], listed["agent"]) == (tunnel_id, "live", new_link.session_id)
    assert secret.encode() not in node.get("/v1/tunnels")[2]


def test_healthz_is_503_draining_while_the_node_drains_and_the_console_still_answers():
    """A load balancer sees 503 {"status": "draining"} during a drain (not a 500); the console's JSON keeps working."""
    node = Node()
    assert node.get("/healthz")[0] == 200
    node.tunnels.draining = True
    status, _, body = node.get("/healthz")
    assert status == 503 and json.loads(body)["status"] == "draining"
    status, _, body = node.get("/v1/console")
    assert status == 200 and json.loads(body)["health"]["status"] == "draining"
