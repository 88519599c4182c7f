"""The agent and GOAWAY(DRAINING) (docs/protocol.md, "Draining"), without
sockets: a relay that drains, and the agent's own drain (stop with a grace
period), on the helpers of tests/client/test_agent.py."""

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relay.mux import ErrorCode
from relay.mux import control
from relay.mux import events as ev
from relay.mux.control import RelayDrainingError
from tests.client.test_agent import RELAY, SECRET, TOKEN, Relay, live_agent, result_of, tcp_spec


class ServiceTransport(StringTransport):
    """The service's TCP connection, which half-closes as TCP does."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


def _serving():
    """A live agent with one visitor stream spliced to its service: (agent, tunnel, relay, stream id, service transport);
    `service.protocol` is the splice side on it."""
    agent, tunnel, relay, _ = live_agent()
    agent.remember_address(tunnel.spec.services[0], IPv4Address("TCP", "127.0.0.1", 8000))
    stream_id = relay.mux.open_stream({"tunnel": "tunnel1", "service": "", "peer": ["203.0.113.7", 1], "local": ["127.0.0.1", 20001]})
    relay.deliver()
    host, port, factory, *_ = agent.reactor.tcpClients[-1]
    service = ServiceTransport()
    service.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    service.protocol.makeConnection(service)
    agent.reactor.advance(0)
    relay.read()
    return agent, tunnel, relay, stream_id, service


def _goaways(events):
    return [(e.code, e.message) for e in events if isinstance(e, ev.GoAwayReceived)]


def test_a_draining_relay_keeps_the_agent_s_streams_and_gets_no_new_tunnel_request():
    """After the relay's GOAWAY(DRAINING) the stream in progress still carries bytes, the link stays, and a tunnel added now is not asked on it."""
    agent, tunnel, relay, stream_id, service = _serving()
    relay.mux.drain("relay draining")
    relay.mux.send(stream_id, b"more body")
    relay.deliver()
    assert not relay.link.closed and service.value() == b"more body"
    assert tunnel.status == "reconnecting"
    agent.add_tunnel(tcp_spec(9000))
    assert relay.requests() == []


def test_after_a_relay_s_drain_the_agent_reconnects_and_asks_to_reclaim_every_tunnel():
    """The relay's final GOAWAY ends the link; ClientService dials again with the backoff, and the new link's request carries the reclaim secret."""
    agent, tunnel, relay, _ = live_agent()
    agent.start()  # the ClientService that reconnects
    relay.mux.drain("relay draining")
    relay.mux.close(ErrorCode.NO_ERROR, "relay stopping")
    relay.deliver()
    assert relay.link.closed
    relay.link.connectionLost(Failure(ConnectionDone()))
    assert not agent.done.called
    relay2 = Relay(agent)
    relay2.accept("sess2")
    (request,) = relay2.requests()
    assert request["reclaim"] == {"tunnel": "tunnel1", "secret": SECRET}
    agent.stop()


def test_a_relay_draining_refusal_keeps_the_tunnel_for_the_next_link():
    """An open_tunnel answered relay_draining neither fails the agent nor drops the tunnel: the next link asks again."""
    from client.agent import TunnelAgent
    from twisted.internet.testing import MemoryReactorClock

    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()])
    relay = Relay(agent)
    relay.accept()
    (request,) = relay.requests()
    relay.reply(control.error_reply(request["id"], RelayDrainingError(None, "the relay is draining")))
    assert not agent.done.called and len(agent.tunnels) == 1
    relay.lose()
    relay2 = Relay(agent)
    relay2.accept("sess2")
    (again,) = relay2.requests()
    assert again["op"] == "open_tunnel" and "reclaim" not in again


def test_stop_with_a_grace_period_drains_and_ends_when_the_last_stream_ends():
    """stop(grace) sends GOAWAY(DRAINING), keeps the stream; its end brings the final GOAWAY, and done fires once the link is gone."""
    agent, tunnel, relay, stream_id, service = _serving()
    stopped = agent.stop(30)
    assert _goaways(relay.read()) == [(ErrorCode.DRAINING, "agent draining")]
    assert agent.draining and not relay.link.closed
    relay.mux.send(stream_id, b"tail")
    relay.mux.end_stream(stream_id)
    relay.deliver()
    assert service.value() == b"tail" and service.write_closed
    service.protocol.readConnectionLost()  # the service's EOF: the agent's FIN ends the stream
    agent.reactor.advance(0)
    assert _goaways(relay.read()) == [(ErrorCode.NO_ERROR, "agent stopping")]
    assert not stopped.called
    relay.link.connectionLost(Failure(ConnectionDone()))
    assert agent.done.called and stopped.called and result_of(agent.done) is None


def test_the_agent_s_drain_ends_at_its_deadline():
    """A stream that never ends holds the agent's drain for the grace period, then the link is closed."""
    agent, tunnel, relay, stream_id, service = _serving()
    stopped = agent.stop(5)
    relay.read()
    agent.reactor.advance(4.9)
    assert not relay.transport.disconnecting
    agent.reactor.advance(0.2)
    assert _goaways(relay.read()) == [(ErrorCode.NO_ERROR, "agent stopping")]
    assert relay.transport.disconnecting
    relay.link.connectionLost(Failure(ConnectionDone()))
    assert stopped.called and agent.done.called


def test_a_second_stop_while_draining_forces():
    """stop() again during the drain closes the link at once (the second signal)."""
    agent, tunnel, relay, stream_id, service = _serving()
    first = agent.stop(30)
    relay.read()
    assert agent.stop() is first
    assert _goaways(relay.read()) == [(ErrorCode.NO_ERROR, "agent stopping")]
    relay.link.connectionLost(Failure(ConnectionDone()))
    assert first.called and not agent.draining


def test_stop_with_a_grace_period_and_no_streams_stops_at_once():
    """No stream in progress: nothing to drain, the goodbye is today's GOAWAY(NO_ERROR)."""
    agent, tunnel, relay, _ = live_agent()
    agent.stop(30)
    assert _goaways(relay.read()) == [(ErrorCode.NO_ERROR, "agent stopping")]


def test_an_open_that_crossed_the_agent_s_drain_is_refused():
    """An OPEN the relay sent before it read our GOAWAY(DRAINING) is reset REFUSED_STREAM; no service is dialled."""
    agent, tunnel, relay, stream_id, service = _serving()
    dials = len(agent.reactor.tcpClients)
    agent.stop(30)
    relay.mux.open_stream({"tunnel": "tunnel1", "service": "", "peer": ["203.0.113.7", 2], "local": ["127.0.0.1", 20001]})
    relay.deliver()
    resets = [e for e in relay.read() if isinstance(e, ev.StreamReset)]
    assert [r.code for r in resets] == [ErrorCode.REFUSED_STREAM]
    assert len(agent.reactor.tcpClients) == dials
