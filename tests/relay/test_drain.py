"""The node's drain (relay/node/drain.py) and an agent's drain as the relay
sees it, on in-memory transports with a fake clock (tests/relay/node_helpers.py)."""

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from relay.mux import ErrorCode
from relay.mux import events as ev
from relay.mux.control import RequestErrorCode
from relay.node.drain import DrainInput, DrainState, DrainStateError, NodeDrain
from relay.node.service import RelayNode
from tests.relay.node_helpers import Node

VISITOR = IPv4Address("TCP", "203.0.113.7", 51234)


class Accepting:
    """stop_accepting for the drain: counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return defer.succeed(None)


def _serving(node):
    """An agent with a TCP tunnel and one visitor whose stream the agent accepted."""
    agent = node.agent()
    port = agent.open().body["tunnel"]["port"]
    visitor = node.listener(port).buildProtocol(VISITOR)
    transport = StringTransport(peerAddress=VISITOR)
    visitor.makeConnection(transport)
    [opened] = [e for e in agent.pump() if isinstance(e, ev.StreamOpened)]
    agent.mux.accept_stream(opened.stream_id)
    agent.pump()
    return agent, port, opened.stream_id, transport


def _goaways(events):
    return [(e.code, e.message) for e in events if isinstance(e, ev.GoAwayReceived)]


def test_a_drain_sends_goaway_draining_refuses_new_visitors_and_keeps_streams():
    """start(): listeners closed, GOAWAY(DRAINING) on the link, the live stream untouched, a new visitor refused and counted."""
    node = Node()
    agent, port, stream_id, visitor = _serving(node)
    accepting = Accepting()
    drain = NodeDrain(node.reactor, node.tunnels, accepting, 30)
    done = drain.start()
    assert accepting.calls == 1 and drain.state is DrainState.DRAINING and not done.called
    assert _goaways(agent.pump()) == [(ErrorCode.DRAINING, "relay draining")]
    assert not agent.link.closed and not visitor.disconnecting
    assert node.listener(port).buildProtocol(IPv4Address("TCP", "203.0.113.8", 1)) is None
    assert node.metrics.refused_by_reason["draining"] == 1
    agent.mux.send(stream_id, b"still flowing")
    agent.pump()
    assert visitor.value() == b"still flowing"


def test_the_drain_ends_as_soon_as_the_last_stream_ends():
    """When the link's last stream ends the relay sends the final GOAWAY; once the link is gone, done fires ("drained") before the deadline."""
    node = Node()
    agent, _port, stream_id, _visitor = _serving(node)
    drain = NodeDrain(node.reactor, node.tunnels, Accepting(), 30)
    done = drain.start()
    agent.pump()
    node.reactor.advance(5)
    agent.mux.reset(stream_id, ErrorCode.CANCEL, "visitor done")
    agent.pump()
    node.reactor.advance(0)  # the link closes after the stream's own turn
    assert _goaways(agent.pump()) == [(ErrorCode.NO_ERROR, "relay stopping")]
    assert agent.link.closed and not done.called
    agent.lose()
    assert done.result == "drained" and drain.streams_cut == 0
    assert all(c.getTime() != 35 for c in node.reactor.getDelayedCalls())  # the deadline was cancelled


def test_an_idle_link_is_closed_at_once_and_no_link_means_done_at_once():
    """A link with no streams gets GOAWAY(DRAINING) then the final GOAWAY at once; a node with no links is drained at start."""
    node = Node()
    agent = node.agent()
    agent.open()
    drain = NodeDrain(node.reactor, node.tunnels, Accepting(), 30)
    done = drain.start()
    assert _goaways(agent.pump()) == [(ErrorCode.DRAINING, "relay draining"), (ErrorCode.NO_ERROR, "relay stopping")]
    agent.lose()
    assert done.result == "drained"
    empty = NodeDrain(Node().reactor, Node().tunnels, Accepting(), 30)
    assert empty.start().result == "drained"


def test_at_the_deadline_the_drain_ends_with_the_streams_left_counted():
    """A stream that never ends holds the drain until grace_period_seconds, no longer; it is counted as cut."""
    node = Node()
    _agent, _port, _stream_id, _visitor = _serving(node)
    drain = NodeDrain(node.reactor, node.tunnels, Accepting(), 10)
    with capturedLogs() as logs:
        done = drain.start()
        node.reactor.advance(9.9)
        assert not done.called
        node.reactor.advance(0.2)
    assert done.result == "deadline" and drain.streams_cut == 1
    assert any("grace period of 10s over: closing 1 stream" in (e.get("log_format") or "").format(**e) for e in logs)


def test_force_ends_the_drain_at_once_and_a_later_input_changes_nothing():
    """force() while draining fires done ("forced"); before any start it stops without draining; after the end every input is ignored."""
    node = Node()
    _serving(node)
    drain = NodeDrain(node.reactor, node.tunnels, Accepting(), 30)
    done = drain.start()
    drain.force()
    assert done.result == "forced" and drain.streams_cut == 1
    drain.force()
    assert drain.start().result == "forced" and drain.state is DrainState.STOPPED
    early = NodeDrain(node.reactor, node.tunnels, Accepting(), 30)
    early.force()
    assert early.how == "forced" and early.started_at is None


def test_the_table_names_a_missing_pair():
    """An input with no (state, input) entry is our bug, named, never a silent change."""
    drain = NodeDrain(Node().reactor, Node().tunnels, Accepting(), 30)
    with pytest.raises(DrainStateError, match="last-link-gone in state running"):
        drain._move(DrainInput.LAST_LINK_GONE)


def test_while_draining_logins_and_tunnel_requests_are_refused():
    """A login accepted just before the port closed gets GOAWAY(DRAINING); a request on a draining link gets relay_draining."""
    node = Node()
    agent = node.agent()
    drain = NodeDrain(node.reactor, node.tunnels, Accepting(), 30)
    node.tunnels.draining = True  # as start() sets it, without closing this idle link
    assert agent.open().error.code is RequestErrorCode.RELAY_DRAINING
    late = node.agent()
    assert _goaways(late.events) == [(ErrorCode.DRAINING, "relay draining: try again later")]
    assert late.link.closed and late.link not in node.tunnels.links
    assert drain.state is DrainState.RUNNING


def test_an_agent_s_drain_frees_its_tunnels_at_once_and_keeps_its_streams():
    """GOAWAY(DRAINING) from the agent: the port is unbound into quarantine and no visitor reaches it, the live stream goes on; the agent's final GOAWAY ends the link."""
    node = Node()
    agent, port, stream_id, visitor = _serving(node)
    agent.mux.drain("agent draining")
    agent.pump()
    assert node.tunnels.tunnels == {} and port not in node.allocator.in_use
    assert node.allocator.quarantined() == 1
    assert not agent.link.closed and not visitor.disconnecting
    agent.mux.send(stream_id, b"last bytes")
    agent.pump()
    assert visitor.value() == b"last bytes"
    agent.mux.reset(stream_id, ErrorCode.CANCEL, "done")
    agent.mux.close(ErrorCode.NO_ERROR, "agent stopping")
    agent.pump()
    agent.lose()
    assert node.metrics.links_down_by_reason["goaway"] == 1 and node.tunnels.links == set()


class FakeReactor:
    def __init__(self):
        self.stops = 0

    def stop(self):
        self.stops += 1


def test_the_first_sigterm_drains_a_second_or_a_sigint_forces():
    """RelayNode.signalled: SIGTERM calls reactor.stop() once (stopService drains); a second SIGTERM forces the drain's end."""
    node = Node()
    _serving(node)
    relay = RelayNode({"grace-period": 30}, None, node.tunnels, node.metrics, node.reactor)
    reactor = FakeReactor()
    relay.signalled("SIGTERM", reactor)
    assert reactor.stops == 1
    done = relay.drain.start()  # what reactor.stop()'s before-shutdown trigger begins
    assert not done.called
    relay.signalled("SIGTERM", reactor)
    assert done.result == "forced" and reactor.stops == 1


def test_a_sigint_stops_without_draining():
    """SIGINT first: stopService closes everything at once (the live visitor is reset), no drain."""
    node = Node()
    agent, _port, _stream_id, visitor = _serving(node)
    relay = RelayNode({"grace-period": 30}, None, node.tunnels, node.metrics, node.reactor)
    reactor = FakeReactor()
    relay.signalled("SIGINT", reactor)
    assert reactor.stops == 1
    relay.running = 1
    d = relay.stopService()
    assert d.called and relay.drain.how == "forced"
    assert visitor.disconnecting or visitor.disconnected
    assert not [g for g in _goaways(agent.pump()) if g[0] == ErrorCode.DRAINING]
