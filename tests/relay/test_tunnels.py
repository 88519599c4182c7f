"""The node's tunnel lifecycle and control handling without sockets: a real
RelayLink and TunnelManager on in-memory transports (tests/relay/node_helpers.py),
driven by an agent-side MuxConnection."""

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from relay.mux import ErrorCode
from relay.mux import events as ev
from relay.mux.control import RequestErrorCode
from relay.node.directory import ITunnelDirectory, MemoryDirectory
from tests.relay.node_helpers import DOMAIN, HIGH, LOW, TOKEN, Node

VISITOR = IPv4Address("TCP", "203.0.113.7", 51234)


def goaway_of(events):
    return next((e for e in events if isinstance(e, ev.GoAwayReceived)), None)


def test_a_tcp_tunnel_binds_a_port_of_the_range_and_the_directory_knows_it():
    """open_tunnel for TCP listens on a port of the range, replies with its address, and the directory finds it by id and port."""
    node = Node()
    agent = node.agent()
    reply = agent.open()
    assert reply.ok and reply.body["reclaimed"] is False and reply.body["reclaim_secret"]
    port = reply.body["tunnel"]["port"]
    assert LOW <= port <= HIGH
    assert reply.body["tunnel"]["url"] == f"tcp://relay.example:{port}"
    node.listener(port)  # a listener exists on that port
    tunnel_id = reply.body["tunnel"]["id"]
    found = node.tunnels.directory.by_port(port)
    assert found.result[0].tunnel_id == tunnel_id
    assert node.tunnels.directory.by_id(tunnel_id).result.tunnel_id == tunnel_id
    assert node.metrics.tunnels_open == 1 and node.metrics.links_up == 1


def test_a_tls_tunnel_gets_a_hostname_under_the_domain():
    """open_tunnel for TLS names the tunnel <id>.<domain> (named services <name>-<id>) and binds no port."""
    node = Node()
    agent = node.agent()
    reply = agent.open(services=[{"name": "web", "kind": "tls"}, {"name": "api", "kind": "tls", "mode": "passthrough"}])
    tunnel_id = reply.body["tunnel"]["id"]
    hostnames = [e["hostname"] for e in reply.body["tunnel"]["endpoints"]]
    assert hostnames == [f"web-{tunnel_id}.{DOMAIN}", f"api-{tunnel_id}.{DOMAIN}"]
    tunnel, endpoint = node.tunnels.route_hostname(hostnames[1]).result
    assert tunnel.tunnel_id == tunnel_id and endpoint.mode == "passthrough"
    assert node.reactor.tcpServers == []


def test_a_bad_request_gets_its_error_code_and_the_link_stays():
    """A request that fails validation is answered with its code; the link keeps serving."""
    node = Node()
    agent = node.agent()
    reply = agent.open(services=[{"name": "Bad!", "kind": "tcp"}])
    assert not reply.ok and reply.error.code is RequestErrorCode.BAD_SERVICE_NAME
    assert agent.open().ok
    assert not agent.link.closed


def test_a_request_without_an_integer_id_closes_the_link():
    """A CONTROL message with no integer id is a protocol error: GOAWAY(PROTOCOL_ERROR)."""
    node = Node()
    agent = node.agent()
    with capturedLogs() as logs:
        events = agent.send({"id": "one", "op": "open_tunnel"})
    assert goaway_of(events).code == ErrorCode.PROTOCOL_ERROR
    assert agent.link.closed
    assert not any(e.get("log_failure") for e in logs)


def test_a_bad_token_is_refused_and_counted_without_logging_it():
    """A wrong token gets GOAWAY(AUTH_FAILED), one auth failure counted, and never appears in a log."""
    node = Node()
    with capturedLogs() as logs:
        agent = node.agent(token="wrong-" + TOKEN)
    assert goaway_of(agent.events).code == ErrorCode.AUTH_FAILED
    assert node.metrics.auth_failures == 1 and node.metrics.links_up == 0
    assert not any(TOKEN in str(e) for e in logs)


def test_no_free_port_is_a_typed_error_and_an_allocation_failure():
    """When every port of the range is taken, open_tunnel answers no_free_port and counts it."""
    node = Node()
    agent = node.agent()
    for _ in range(HIGH - LOW + 1):
        assert agent.open().ok
    reply = agent.open()
    assert reply.error.code is RequestErrorCode.NO_FREE_PORT
    assert node.metrics.allocation_failures["no_free_port"] == 1


def test_close_tunnel_unbinds_into_quarantine_and_only_for_its_own_link():
    """close_tunnel frees the port into quarantine; another link cannot close it (unknown_tunnel)."""
    node = Node()
    owner, other = node.agent(), node.agent()
    reply = owner.open()
    tunnel_id, port = reply.body["tunnel"]["id"], reply.body["tunnel"]["port"]
    assert other.close(tunnel_id).error.code is RequestErrorCode.UNKNOWN_TUNNEL
    assert owner.close(tunnel_id).ok
    assert port not in node.allocator.in_use and node.allocator.quarantined() == 1
    assert node.tunnels.directory.by_port(port).result is None
    assert owner.close(tunnel_id).error.code is RequestErrorCode.UNKNOWN_TUNNEL
    assert node.metrics.tunnels_open == 0


def test_a_lost_link_holds_the_tunnel_for_the_grace_period_then_frees_it():
    """Without a goodbye the tunnel waits grace_seconds (visitors refused meanwhile), then closes."""
    node = Node(grace_seconds=30)
    agent = node.agent()
    reply = agent.open()
    port = reply.body["tunnel"]["port"]
    agent.lose()
    assert node.metrics.links_up == 0
    [tunnel] = node.tunnels.tunnels.values()
    assert node.listener(port).buildProtocol(VISITOR) is None  # agent away: refused at once
    assert node.metrics.refused_by_reason["agent_away"] == 1
    node.reactor.advance(29)
    assert tunnel.tunnel_id in node.tunnels.tunnels and port in node.allocator.in_use
    node.reactor.advance(2)
    assert node.tunnels.tunnels == {} and port not in node.allocator.in_use


def test_reclaim_on_a_new_link_keeps_the_address_and_a_wrong_secret_gets_a_fresh_one():
    """The reclaim secret moves a held tunnel to a new link with the same port; a wrong secret opens a new tunnel."""
    node = Node()
    first = node.agent()
    reply = first.open()
    tunnel = reply.body["tunnel"]
    first.lose()
    second = node.agent()
    wrong = second.open(reclaim=(tunnel["id"], "not-the-secret"))
    assert wrong.ok and wrong.body["reclaimed"] is False and wrong.body["tunnel"]["port"] != tunnel["port"]
    right = second.open(reclaim=(tunnel["id"], reply.body["reclaim_secret"]))
    assert right.ok and right.body["reclaimed"] is True and "reclaim_secret" not in right.body
    assert right.body["tunnel"]["url"] == tunnel["url"]
    node.reactor.advance(3600)  # the grace timer was cancelled
    assert tunnel["id"] in node.tunnels.tunnels


def test_reclaim_from_a_live_link_takes_over_and_aborts_the_old_one():
    """An agent back before the relay noticed its old link died takes the tunnel; the old link gets SESSION_REPLACED."""
    node = Node()
    old = node.agent()
    reply = old.open()
    new = node.agent()
    assert new.open(reclaim=(reply.body["tunnel"]["id"], reply.body["reclaim_secret"])).body["reclaimed"]
    assert goaway_of(old.pump()).code == ErrorCode.SESSION_REPLACED
    assert old.link.closed
    [tunnel] = node.tunnels.tunnels.values()
    assert tunnel.links == [new.link]


def test_goodbye_closes_the_link_s_tunnels_at_once():
    """GOAWAY(NO_ERROR) from the agent ends its tunnels now, with no grace period."""
    node = Node()
    agent = node.agent()
    port = agent.open().body["tunnel"]["port"]
    agent.mux.close(ErrorCode.NO_ERROR, "bye")
    agent.pump()
    agent.lose()
    assert node.tunnels.tunnels == {} and port not in node.allocator.in_use
    assert node.metrics.links_down_by_reason["goaway"] == 1


def test_a_visitor_opens_a_stream_with_its_addresses_and_the_allowlist_refuses_others():
    """A visitor on the tunnel's port becomes an OPEN carrying tunnel, service, peer and local; one outside --allow is refused and counted."""
    node = Node()
    agent = node.agent()
    reply = agent.open(allow=["203.0.113.0/24"])
    tunnel_id, port = reply.body["tunnel"]["id"], reply.body["tunnel"]["port"]
    factory = node.listener(port)
    assert factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 4000)) is None
    assert node.metrics.tunnel(tunnel_id)["denied_total"] == 1
    visitor = factory.buildProtocol(VISITOR)
    assert visitor is not None
    visitor.makeConnection(StringTransport(peerAddress=VISITOR))  # the stream opens once connected
    [opened] = [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]
    assert opened.metadata == {
        "tunnel": tunnel_id, "service": "", "peer": ["203.0.113.7", 51234], "local": ["0.0.0.0", port],
    }  # local: the listening port's own address (the memory reactor's is 0.0.0.0)
    assert agent.link.stream_count(tunnel_id) == 1
    assert node.metrics.tunnel(tunnel_id)["streams_active"] == 0  # counted once the agent accepts
    agent.mux.accept_stream(opened.stream_id)
    agent.pump()
    assert node.metrics.tunnel(tunnel_id)["streams_active"] == 1


class SlowDirectory(MemoryDirectory):
    """A directory whose hostname lookups answer only when told (as a remote one would)."""

    def __init__(self, clock):
        super().__init__(clock)
        self.waiting: list[tuple[defer.Deferred, str]] = []

    def by_hostname(self, hostname):
        d = defer.Deferred()
        self.waiting.append((d, hostname))
        return d

    def answer(self):
        for d, hostname in self.waiting:
            d.callback(self.lookup_hostname(hostname))
        self.waiting = []


def test_the_manager_runs_on_any_directory_that_provides_the_interface():
    """TunnelManager takes any ITunnelDirectory; a lookup that answers later answers through it."""
    node = Node(directory=SlowDirectory)
    directory = node.tunnels.directory
    assert ITunnelDirectory.providedBy(directory)
    agent = node.agent()
    hostname = agent.open(services=[{"name": "", "kind": "tls"}]).body["tunnel"]["hostname"]
    d = node.tunnels.route_hostname(hostname)
    assert not d.called
    directory.answer()
    assert d.result[0].endpoints[0].hostname == hostname


def test_an_ended_tunnel_s_id_stays_out_of_use_for_a_day_then_is_forgotten():
    """The directory never hands out a live id or one that ended within RECENT_ID_SECONDS, and forgets older ones (bounded memory)."""
    from relay.node import directory as directory_module

    node = Node()
    agent = node.agent()
    directory = node.tunnels.directory
    tunnel_id = agent.open().body["tunnel"]["id"]
    assert directory.id_in_use(tunnel_id)
    agent.close(tunnel_id)
    node.reactor.advance(directory_module.RECENT_ID_SECONDS - 1)
    assert directory.id_in_use(tunnel_id)
    node.reactor.advance(2)
    assert not directory.id_in_use(tunnel_id)
    assert directory._ended == {} and directory._ids == set()


def test_out_of_file_descriptors_is_reported_as_such_not_as_no_free_port(monkeypatch):
    """At the open-file limit open_tunnel answers relay_overloaded (not a misleading no_free_port), and frees the port it tried."""
    import errno
    import socket

    from twisted.internet.error import CannotListenError

    node = Node()
    agent = node.agent()

    def listen_fails(port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, socket.error(errno.EMFILE, "Too many open files"))

    monkeypatch.setattr(node.reactor, "listenTCP", listen_fails)
    reply = agent.open()
    assert reply.error.code is RequestErrorCode.RELAY_OVERLOADED
    assert "file descriptors" in str(reply.error)
    assert node.allocator.in_use == set() and node.allocator.quarantined() == 0


def _visitors(node, port, count):
    transports = []
    for i in range(count):
        visitor = node.listener(port).buildProtocol(IPv4Address("TCP", "203.0.113.7", 40000 + i))
        transport = StringTransport(peerAddress=VISITOR)
        visitor.makeConnection(transport)
        transports.append(transport)
    return transports


def test_an_open_the_agent_never_accepts_is_reset_and_its_visitor_closed_at_the_deadline():
    """A stream the agent neither accepts nor refuses is reset after open_timeout_seconds and its visitor closed; an accepted one stays."""
    node = Node()
    node.factory.open_timeout_seconds = 10
    agent = node.agent()
    port = agent.open().body["tunnel"]["port"]
    slow, quick = _visitors(node, port, 2)
    opened = [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]
    agent.mux.accept_stream(opened[1].stream_id)
    agent.pump()
    node.reactor.advance(9.9)
    assert not slow.disconnecting
    node.reactor.advance(0.2)
    resets = [e for e in agent.pump() if isinstance(e, ev.StreamReset)]
    assert [r.stream_id for r in resets] == [opened[0].stream_id]
    assert slow.disconnecting or slow.disconnected
    assert not quick.disconnecting
    assert node.metrics.refused_by_reason["open_timeout"] == 1
    assert agent.link.mux.opens_in_flight == 0


def test_opens_in_flight_are_capped_per_link_with_a_reset_for_the_excess():
    """Past max_opens_in_flight unanswered OPENs, a new visitor is reset at once; an ACCEPT makes room."""
    node = Node()
    node.factory.max_opens_in_flight = 3
    agent = node.agent()
    port = agent.open().body["tunnel"]["port"]
    _visitors(node, port, 3)
    opened = [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]
    (refused,) = _visitors(node, port, 1)
    assert refused.disconnecting and not [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]
    assert node.metrics.refused_by_reason["opens_in_flight"] == 1
    agent.mux.accept_stream(opened[0].stream_id)
    agent.pump()
    (admitted,) = _visitors(node, port, 1)
    assert not admitted.disconnecting


def test_visitors_past_the_link_buffer_cap_are_closed_counted_and_logged_once_per_burst():
    """Once the link's stream windows fill its cap, a new visitor is closed at once and counted
    (link_buffer_cap), one log line for the burst; an ended stream gives its room back."""
    node = Node()
    node.factory.link_buffer_cap = 1024 * 1024  # 512 KiB of stream windows: 256 KiB, then 64 x 4 KiB
    agent = node.agent()
    port = agent.open().body["tunnel"]["port"]
    with capturedLogs() as logs:
        visitors = _visitors(node, port, 70)
    opened = [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]
    assert len(opened) == 65
    assert [bool(v.disconnecting) for v in visitors] == [False] * 65 + [True] * 5
    assert node.metrics.refused_by_reason["link_buffer_cap"] == 5
    lines = [e for e in logs if "cap" in e.get("log_format", "")]
    assert len(lines) == 1 and lines[0]["log_level"].name == "warn"
    assert agent.link.mux.window_pool.granted <= 512 * 1024
    # The agent's send windows follow the relay's OPENs: the first full, the rest at the floor.
    windows = [agent.mux.send_window(e.stream_id) for e in opened]
    assert windows == [256 * 1024] + [4096] * 64
    agent.mux.reset(opened[-1].stream_id, ErrorCode.CANCEL)
    agent.pump()
    (admitted,) = _visitors(node, port, 1)
    assert not admitted.disconnecting


def test_a_visitor_accepted_before_the_cap_filled_is_closed_when_its_stream_would_pass_it():
    """Two visitors built while one stream still fits: the second, connected after the first
    took the room, is aborted (link_buffer_cap), not opened past the cap."""
    node = Node()
    node.factory.link_buffer_cap = 1024 * 1024
    agent = node.agent()
    port = agent.open().body["tunnel"]["port"]
    _visitors(node, port, 64)
    late = [node.listener(port).buildProtocol(IPv4Address("TCP", "203.0.113.7", 41000 + i)) for i in range(2)]
    # lenient: a real transport takes the splice's pause after an abort (its connectionLost comes later)
    transports = [StringTransport(peerAddress=VISITOR, lenient=True) for _ in late]
    for visitor, transport in zip(late, transports):
        visitor.makeConnection(transport)
    assert [bool(t.disconnecting or t.disconnected) for t in transports] == [False, True]
    assert node.metrics.refused_by_reason["link_buffer_cap"] == 1
    assert len([e for e in agent.pump() if isinstance(e, ev.StreamOpened)]) == 65
