"""An agent's several links (client/agent.py): one session, joined with the
relay's secret; statuses Healthy, Degraded, Down and Inactive. Links are
AgentLinks on StringTransports, the relay a sans-IO MuxConnection (as in
tests/client/test_agent.py)."""

from twisted.internet.testing import MemoryReactorClock, StringTransport

from client.agent import AgentLink, TunnelAgent
from client.errors import ConfigurationError
from relay.mux import ErrorCode, MuxConnection, Role
from relay.mux import events as ev
from tests.client.test_agent import RELAY, SECRET, TOKEN, Relay, tcp_spec

import pytest

JOIN_SECRET = "j" * 43


class SlotRelay(Relay):
    """The relay's end of link `slot` of the agent."""

    def __init__(self, agent, slot: int):
        self.agent = agent
        self.transport = StringTransport()
        self.mux = MuxConnection(Role.RELAY)
        self.link = AgentLink(agent, slot)
        self.link.makeConnection(self.transport)

    def hello(self) -> dict:
        hellos = [e.info for e in self.read() if isinstance(e, ev.HelloReceived)]
        return hellos[0] if hellos else None

    def accept_fresh(self, session="s1"):
        self.mux.send_hello({"session": session, "join_secret": JOIN_SECRET})
        self.deliver()

    def accept_join(self, session="s1", number=1):
        self.mux.send_hello({"session": session, "link": number})
        self.deliver()


def two_links():
    """An agent keeping 2 links, both up, its tunnel granted: (agent, tunnel, relay0, relay1)."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()], links=2)
    r0 = SlotRelay(agent, 0)
    assert r0.hello()["links"] == 2
    r0.accept_fresh()
    (request,) = r0.requests()
    r0.grant(request, "tunnel1", 20001, secret=SECRET)
    r1 = SlotRelay(agent, 1)
    hello = r1.hello()
    assert hello["join"] == {"session": "s1", "secret": JOIN_SECRET} and "links" not in hello
    r1.accept_join()
    return agent, agent.tunnels[0], r0, r1


def test_the_statuses_from_inactive_to_healthy():
    """Inactive before any link; Degraded with 1 of 2 up; Healthy with both; the joining link asks for nothing."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()], links=2)
    assert agent.status == "Inactive" and agent.tunnels[0].health == "Inactive" and not agent.ready
    r0 = SlotRelay(agent, 0)
    r0.hello()
    r0.accept_fresh()
    (request,) = r0.requests()
    assert agent.status == "Degraded" and not agent.ready  # no address yet
    r0.grant(request, "tunnel1", 20001, secret=SECRET)
    assert agent.ready
    r1 = SlotRelay(agent, 1)
    r1.hello()
    r1.accept_join()
    assert r1.requests() == []
    assert agent.status == "Healthy" and agent.tunnels[0].health == "Healthy"
    assert [s["state"] for s in agent.link_states()] == ["up", "up"]


def test_losing_one_link_keeps_the_tunnel_live_and_losing_both_starts_a_new_session():
    """One link lost: Degraded, the tunnel stays live; both: Down, reconnecting, and the next link sends a fresh HELLO and reclaims."""
    agent, tunnel, r0, r1 = two_links()
    r0.lose()
    assert agent.status == "Degraded" and tunnel.status == "live" and agent.link is r1.link
    assert [s["state"] for s in agent.link_states()] == ["down", "up"]
    r1.lose()
    assert agent.status == "Down" and tunnel.status == "reconnecting" and not agent.ready
    r2 = SlotRelay(agent, 1)
    hello = r2.hello()
    assert "join" not in hello and hello["links"] == 2
    r2.accept_fresh("s2")
    (request,) = r2.requests()
    assert request["reclaim"] == {"tunnel": "tunnel1", "secret": SECRET}


def test_a_link_that_connects_during_a_fresh_hello_waits_and_then_joins():
    """Only one fresh HELLO at a time: a second link waits for it, then joins the new session."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()], links=2)
    r0 = SlotRelay(agent, 0)
    r1 = SlotRelay(agent, 1)
    assert r0.hello() is not None and r1.hello() is None  # waits
    r0.accept_fresh()
    assert r1.hello()["join"]["session"] == "s1"


def test_the_waiting_link_starts_the_session_if_the_first_fails():
    """If the link whose fresh HELLO is under way closes, a waiting one sends its own fresh HELLO."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()], links=2)
    r0 = SlotRelay(agent, 0)
    r1 = SlotRelay(agent, 1)
    r0.hello()
    r0.lose()
    hello = r1.hello()
    assert hello is not None and "join" not in hello


def test_a_request_in_flight_on_a_lost_link_is_asked_again_on_another():
    """open_tunnel sent on a link that dies before its reply goes again on the session's other link."""
    agent, tunnel, r0, r1 = two_links()
    second = agent.add_tunnel(tcp_spec(9000))
    (request,) = r0.requests()
    r0.lose()
    (again,) = r1.requests()
    assert again["services"] == request["services"]
    r1.grant(again, "tunnel2", 20002, secret="s2")
    assert second.status == "live"


def test_join_refused_is_not_fatal_and_a_relay_without_sessions_keeps_one_link():
    """GOAWAY(JOIN_REFUSED) only closes that link; a relay giving no join secret means one link is Healthy."""
    agent, tunnel, r0, r1 = two_links()
    r1.lose()
    r2 = SlotRelay(agent, 1)
    r2.hello()
    r2.mux.close(ErrorCode.JOIN_REFUSED, "no such session")
    r2.deliver()
    assert not agent.done.called and tunnel.status == "live"
    old = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()], links=2)
    r = SlotRelay(old, 0)
    r.accept()  # no join_secret
    assert old.status == "Healthy" and len(old.link_states()) == 1


def test_links_must_be_1_to_16():
    """--links outside 1..16 is a configuration error."""
    for bad in (0, 17, "2", True):
        with pytest.raises(ConfigurationError):
            TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, links=bad)
