"""TunnelAgent and AgentLink (client/agent.py) without sockets.

The reactor is a MemoryReactorClock. Reconnects go through the agent's own
ClientService: its connection attempts show up in `reactor.tcpClients`, and
are refused or accepted by hand. The link rules are checked on an
`AgentLink(agent)` over a StringTransport (no TLS), with the relay played by
a sans-IO `MuxConnection(Role.RELAY)` fed what the agent wrote and feeding
its replies back (tests/relay/test_link.py style).
"""

import ssl

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

import client.agent
from client.agent import AGENT_NAME, AgentLink, TunnelAgent
from client.config import ServiceSpec, TunnelSpec
from client.errors import (
    AuthenticationError,
    BadServiceNameError,
    LimitExceededError,
    NoPortsAvailableError,
    ReclaimFailedError,
    RelayUnreachableError,
    TunnelLostError,
    TunnelRequestError,
)
from relay.mux import ErrorCode, MuxConnection, Role
from relay.mux import control
from relay.mux import events as ev
from relay.mux.control import RequestErrorCode
from relay.node.state import load_or_create

RELAY = "127.0.0.1:7000"
TOKEN = "agent-test-token"
SECRET = "reclaim-secret-one"


def tcp_spec(port: int = 8000) -> TunnelSpec:
    return TunnelSpec([ServiceSpec("localhost", port)])


def granted(tunnel_id: str, port: int, host: str = "relay.example") -> dict:
    """The relay's description of a one-service TCP tunnel (TunnelManager's shape)."""
    endpoint = {"service": "", "kind": "tcp", "url": f"tcp://{host}:{port}", "tcp_socket": [host, port]}
    return {"id": tunnel_id, "name": "8000", "endpoints": [endpoint], **endpoint}


def failure_of(d):
    """The Failure a fired Deferred holds (consumed), or None if it succeeded or has not fired."""
    out = []
    d.addErrback(out.append)
    return out[0] if out else None


def errors_of(d) -> list:
    """Collect the failures `d` will err with, as a caller waiting on it does."""
    out = []
    d.addErrback(out.append)
    return out


def result_of(d):
    out = []
    d.addCallback(out.append)
    return out[0] if out else None


class Relay:
    """The relay's end of one agent link: an AgentLink on a StringTransport,
    and a relay-role MuxConnection that reads what the agent wrote."""

    def __init__(self, agent: TunnelAgent, **mux_kwargs):
        self.agent = agent
        self.transport = StringTransport()
        self.mux = MuxConnection(Role.RELAY, **mux_kwargs)
        self.link = AgentLink(agent)
        self.link.makeConnection(self.transport)

    def read(self) -> list:
        """Events for everything the agent wrote since the last read."""
        data = self.transport.value()
        self.transport.clear()
        return self.mux.receive_data(data)

    def deliver(self) -> None:
        self.link.dataReceived(b"".join(self.mux.outgoing()))

    def accept(self, session: str = "sess1") -> dict:
        """Read the agent's HELLO and accept it; returns the HELLO's info."""
        (hello,) = self.read()
        assert isinstance(hello, ev.HelloReceived)
        self.mux.send_hello({"relay": "test", "session": session})
        self.deliver()
        return hello.info

    def requests(self) -> list[dict]:
        return [e.message for e in self.read() if isinstance(e, ev.ControlReceived)]

    def reply(self, message: dict) -> None:
        self.mux.send_control(message)
        self.deliver()

    def grant(self, request: dict, tunnel_id: str, port: int, *, secret: str | None = None, reclaimed=False):
        self.reply(control.opened_reply(request["id"], granted(tunnel_id, port), reclaimed=reclaimed, reclaim_secret=secret))

    def lose(self) -> None:
        self.link.connectionLost(Failure(ConnectionLost()))


def reconnect(agent: TunnelAgent, relay: "Relay"):
    """The link drops and comes back: (the new relay end, the tunnel request it got)."""
    relay.lose()
    relay2 = Relay(agent)
    relay2.accept()
    (request,) = relay2.requests()
    return relay2, request


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, tunnel, event):
        self.events.append((tunnel, event, tunnel.urls))


def live_agent(relay_mux_kwargs=None, **kwargs):
    """An agent with one TCP tunnel granted on a first link: (agent, tunnel, relay, recorder)."""
    reactor = MemoryReactorClock()
    recorder = Recorder()
    agent = TunnelAgent(reactor, RELAY, TOKEN, specs=[tcp_spec()], on_tunnel=recorder, **kwargs)
    relay = Relay(agent, **(relay_mux_kwargs or {}))
    relay.accept()
    (request,) = relay.requests()
    relay.grant(request, "tunnel1", 20001, secret=SECRET)
    (tunnel,) = agent.tunnels
    return agent, tunnel, relay, recorder


# -- reconnect backoff -------------------------------------------------------------------


@pytest.mark.parametrize(
    "attempt, step",
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 20.0), (7, 20.0), (100, 20.0), (10_000, 20.0)],
)
def test_retry_delay_doubles_from_one_second_and_never_goes_faster(monkeypatch, attempt, step):
    """The n-th retry waits 1 s x 2^(n-1) (step at most 20 s), lengthened by a jitter factor of 1 to 1.5: never under 1 s, never over 30 s."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN)
    monkeypatch.setattr(client.agent.random, "random", lambda: 0.0)
    assert agent._retry_delay(attempt) == pytest.approx(step)
    monkeypatch.setattr(client.agent.random, "random", lambda: 1.0)
    assert agent._retry_delay(attempt) == pytest.approx(step * 1.5)


def test_retry_delay_jitter_spreads_within_one_to_one_and_a_half_steps():
    """Retry delays vary between calls and always lie in [100%, 150%) of the backoff step."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN)
    delays = [agent._retry_delay(4) for _ in range(200)]
    assert all(8.0 <= d < 12.0 for d in delays)
    assert len(set(delays)) > 150
    assert min(delays) < 9.0 and max(delays) > 11.0  # both halves of the range are used


def refuse_attempt(reactor) -> None:
    """The latest connection attempt is refused, a second after it began (after
    HostnameEndpoint's staggering, so the refusal reaches ClientService at once)."""
    reactor.advance(1.0)
    reactor.tcpClients[-1][2].clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))


def wait_for_attempt(reactor, low: float, high: float) -> float:
    """Advance the clock until the next connectTCP; assert it came within [low, high] s; return the wait."""
    before = len(reactor.tcpClients)
    start = reactor.seconds()
    reactor.advance(low - 0.001)
    assert len(reactor.tcpClients) == before, f"retried before {low} s"
    while len(reactor.tcpClients) == before:
        assert reactor.seconds() - start <= high, f"no retry within {high} s"
        reactor.advance(0.001)
    return reactor.seconds() - start


def test_client_service_retries_with_the_backoff_delays():
    """Refused connections are retried by ClientService after 1, 2, 4, 8... s (each with its jitter)."""
    reactor = MemoryReactorClock()
    agent = TunnelAgent(reactor, RELAY, TOKEN, specs=[tcp_spec()])
    agent.start()
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 7000)]
    for step in (1.0, 2.0, 4.0, 8.0, 16.0):
        refuse_attempt(reactor)
        wait_for_attempt(reactor, step, step * 1.5)
    assert len(reactor.tcpClients) == 6
    assert not agent.done.called


class MemoryTLSRelay:
    """The relay's end of a real TLS connection on memory BIOs (the relay
    state's CA and leaf for 127.0.0.1), speaking the mux as a relay-role
    MuxConnection: it completes the agent's own factory (TLSLayer, verify,
    AgentLink) without a socket."""

    def __init__(self, state, protocol, transport):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(state.cert_path, state.key_path)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.protocol, self.transport = protocol, transport
        self.mux = MuxConnection(Role.RELAY)
        self.events = []

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to say."""
        while True:
            data = self.transport.value()
            self.transport.clear()
            self.incoming.write(data)
            try:
                self.tls.do_handshake()
                while True:
                    plaintext = self.tls.read(65536)
                    if not plaintext:
                        break
                    for event in self.mux.receive_data(plaintext):
                        self.events.append(event)
                        if isinstance(event, ev.HelloReceived):
                            self.mux.send_hello({"relay": "test", "session": "tls1"})
            except ssl.SSLWantReadError:
                pass
            if self.mux.has_outgoing():
                self.tls.write(b"".join(self.mux.outgoing()))
            reply = self.outgoing.read()
            if reply:
                self.protocol.dataReceived(reply)
            elif not data:
                return


@pytest.fixture(scope="module")
def relay_state(tmp_path_factory):
    return load_or_create(tmp_path_factory.mktemp("agent") / "relay-state", agent_address=RELAY)


def connect_attempt(reactor):
    """The latest connection attempt succeeds at the TCP level: (protocol, transport)."""
    factory = reactor.tcpClients[-1][2]
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_the_agent_factory_makes_a_link_over_tls(relay_state):
    """The agent's factory does TLS with the relay's certificate, sends HELLO, and asks for its tunnels."""
    reactor = MemoryReactorClock()
    agent = TunnelAgent(reactor, RELAY, TOKEN, ca_path=str(relay_state.ca_cert_path), specs=[tcp_spec()])
    agent.start()
    protocol, transport = connect_attempt(reactor)
    relay = MemoryTLSRelay(relay_state, protocol, transport)
    relay.pump()
    hello, request = relay.events
    assert hello.info["token"] == TOKEN
    assert request.message["op"] == "open_tunnel"
    assert agent.link is not None and agent.link.ready


def test_a_ready_link_resets_the_backoff(relay_state):
    """After a link that got the relay's HELLO is lost, the next try waits the first step (1-1.5 s) again."""
    reactor = MemoryReactorClock()
    agent = TunnelAgent(reactor, RELAY, TOKEN, ca_path=str(relay_state.ca_cert_path), specs=[tcp_spec()])
    agent.start()
    for step in (1.0, 2.0, 4.0, 8.0):
        refuse_attempt(reactor)
        wait_for_attempt(reactor, step, step * 1.5)
    protocol, transport = connect_attempt(reactor)
    MemoryTLSRelay(relay_state, protocol, transport).pump()
    assert agent.link is not None and agent.link.ready
    protocol.connectionLost(Failure(ConnectionLost()))
    assert agent.link is None
    wait_for_attempt(reactor, 1.0, 1.5)  # not the 16-24 s of a fifth failure
    assert not agent.done.called


def test_connections_that_never_become_a_link_count_as_failed_attempts():
    """A relay port that accepts TCP but drops it before the relay's HELLO (TLS failure, a proxy
    in front of a stopped relay) keeps backing off, and max_retries=N still gives up after N retries."""
    reactor = MemoryReactorClock()
    agent = TunnelAgent(reactor, RELAY, TOKEN, specs=[tcp_spec()], max_retries=2)
    agent.start()
    for step in (1.0, 2.0):
        protocol, transport = connect_attempt(reactor)
        assert transport.value().startswith(b"\x16\x03")  # the TLS ClientHello went out
        protocol.connectionLost(Failure(ConnectionLost()))
        wait_for_attempt(reactor, step, step * 1.5)
    protocol, transport = connect_attempt(reactor)
    protocol.connectionLost(Failure(ConnectionLost()))
    reactor.advance(0)
    error = failure_of(agent.done)
    assert error is not None and error.check(RelayUnreachableError)
    reactor.advance(120)
    assert len(reactor.tcpClients) == 3


def test_max_retries_gives_up_with_relay_unreachable():
    """With max_retries=N the agent stops after the first attempt and N retries, failing with RelayUnreachableError."""
    reactor = MemoryReactorClock()
    agent = TunnelAgent(reactor, RELAY, TOKEN, specs=[tcp_spec()], max_retries=2)
    (tunnel,) = agent.tunnels
    opened_errors = errors_of(tunnel.opened)
    agent.start()
    refuse_attempt(reactor)
    wait_for_attempt(reactor, 1.0, 1.5)
    refuse_attempt(reactor)
    wait_for_attempt(reactor, 2.0, 3.0)
    assert not agent.done.called
    refuse_attempt(reactor)
    reactor.advance(0)
    error = failure_of(agent.done)
    assert error is not None and error.check(RelayUnreachableError)
    assert "after 3 attempts (--max-retries 2)" in str(error.value) and error.value.exit_code == 5
    assert [f.type for f in opened_errors] == [RelayUnreachableError]
    assert tunnel.status == "closed"
    reactor.advance(120)
    assert len(reactor.tcpClients) == 3  # no fourth attempt


def retry_lines(logs) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in logs if "cannot reach the relay" in formatEvent(e)]


def test_each_failed_attempt_says_why_once_in_the_agents_words():
    """Every refused attempt is one line naming the reason and the count (N of max_retries + 1),
    the last one without "retrying", and ClientService's "Scheduling retry" line is not emitted."""
    reactor = MemoryReactorClock()
    agent = TunnelAgent(reactor, RELAY, TOKEN, specs=[tcp_spec()], max_retries=2)
    errors_of(agent.tunnels[0].opened)
    with capturedLogs() as logs:
        agent.start()
        refuse_attempt(reactor)
        wait_for_attempt(reactor, 1.0, 1.5)
        refuse_attempt(reactor)
        wait_for_attempt(reactor, 2.0, 3.0)
        refuse_attempt(reactor)
        reactor.advance(0)
    lines = retry_lines(logs)
    assert len(lines) == 3, lines
    for n, line in enumerate(lines, start=1):
        assert f"(attempt {n} of 3): connection refused" in line, line
    assert "retrying in" in lines[0] and "retrying in" in lines[1] and "retrying" not in lines[2]
    from twisted.logger import formatEvent

    assert not [e for e in logs if "Scheduling retry" in formatEvent(e)]
    assert failure_of(agent.done).check(RelayUnreachableError)


def test_a_name_that_does_not_resolve_is_said_so():
    """A DNS failure of the relay's name is reported as such on the attempt's line."""
    from twisted.internet.interfaces import IHostResolution
    from zope.interface import implementer

    @implementer(IHostResolution)
    class Resolution:
        def __init__(self, name):
            self.name = name

        def cancel(self):
            pass

    class NoAddresses:
        """A resolver that finds no address for any name, as for nonexistent.invalid."""

        def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
            resolution = Resolution(hostName)
            receiver.resolutionBegan(resolution)
            receiver.resolutionComplete()
            return resolution

    reactor = MemoryReactorClock()
    reactor.installNameResolver(NoAddresses())
    agent = TunnelAgent(reactor, "nonexistent.invalid:7000", TOKEN, specs=[tcp_spec()], max_retries=0)
    errors_of(agent.tunnels[0].opened)
    with capturedLogs() as logs:
        agent.start()
        reactor.advance(0)
    (line,) = retry_lines(logs)
    assert "the name nonexistent.invalid does not resolve" in line and "(attempt 1 of 1)" in line
    assert "gave up on the relay nonexistent.invalid:7000 after 1 attempt (--max-retries 0)" in str(
        failure_of(agent.done).value
    )


def test_a_tls_handshake_that_never_finishes_is_a_timeout_with_its_own_line():
    """A port that accepts and never answers TLS: the attempt's line says it timed out."""
    reactor = MemoryReactorClock()
    agent = TunnelAgent(reactor, RELAY, TOKEN, specs=[tcp_spec()], max_retries=1, connect_timeout_seconds=3)
    errors_of(agent.tunnels[0].opened)
    with capturedLogs() as logs:
        agent.start()
        protocol, transport = connect_attempt(reactor)
        reactor.advance(3)  # the handshake deadline: the layer aborts the connection
        assert transport.disconnecting or transport.disconnected
        protocol.connectionLost(Failure(ConnectionLost()))
    (line,) = retry_lines(logs)
    assert "(attempt 1 of 2): timed out: no TLS answer within 3 s" in line


def test_after_a_lost_link_max_retries_counts_reconnects(relay_state):
    """Once a link was up, max_retries=N allows N failed reconnects, each on its own line, then fails (exit 5)."""
    reactor = MemoryReactorClock()
    agent = TunnelAgent(reactor, RELAY, TOKEN, ca_path=str(relay_state.ca_cert_path), specs=[tcp_spec()], max_retries=2)
    agent.start()
    protocol, transport = connect_attempt(reactor)
    MemoryTLSRelay(relay_state, protocol, transport).pump()
    assert agent.link is not None and agent.link.ready
    with capturedLogs() as logs:
        protocol.connectionLost(Failure(ConnectionLost()))
        wait_for_attempt(reactor, 1.0, 1.5)
        refuse_attempt(reactor)
        wait_for_attempt(reactor, 2.0, 3.0)
        refuse_attempt(reactor)
        reactor.advance(0)
    lines = retry_lines(logs)
    assert len(lines) == 2 and "(reconnect 1 of 2): connection refused" in lines[0], lines
    assert "(reconnect 2 of 2): connection refused" in lines[1] and "retrying" not in lines[1]
    error = failure_of(agent.done)
    assert error.check(RelayUnreachableError) and "after 2 reconnects (--max-retries 2)" in str(error.value)
    reactor.advance(120)
    assert len(reactor.tcpClients) == 3  # the first link and two reconnects


def test_max_retries_zero_gives_up_when_the_link_is_lost():
    """With max_retries=0 losing an established link fails the agent with RelayUnreachableError."""
    agent, tunnel, relay, recorder = live_agent(max_retries=0)
    relay.lose()
    error = failure_of(agent.done)
    assert error is not None and error.check(RelayUnreachableError)
    assert tunnel.status == "closed" and isinstance(tunnel.error, RelayUnreachableError)


def test_a_lost_link_without_max_retries_does_not_end_the_agent():
    """Without max_retries a lost link only marks live tunnels reconnecting; the agent carries on."""
    agent, tunnel, relay, recorder = live_agent()
    relay.lose()
    assert not agent.done.called
    assert tunnel.status == "reconnecting" and agent.link is None
    assert tunnel.urls == ("tcp://relay.example:20001",)


# -- handshake and first grant ------------------------------------------------------------


def test_hello_carries_the_token_and_agent_name():
    """The agent's first frame is HELLO with its token and agent name."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()])
    relay = Relay(agent)
    info = relay.accept()
    assert (info["token"], info["agent"]) == (TOKEN, AGENT_NAME)


def test_first_grant_fires_open_and_makes_the_tunnel_live():
    """After the relay's HELLO the agent asks for each tunnel; the grant makes it live and fires "open"."""
    agent, tunnel, relay, recorder = live_agent()
    assert tunnel.status == "live" and tunnel.tunnel_id == "tunnel1"
    assert tunnel.url == "tcp://relay.example:20001"
    assert tunnel.tcp_socket == ("relay.example", 20001)
    assert result_of(tunnel.opened) is tunnel
    assert [(t, e) for t, e, _ in recorder.events] == [(tunnel, "open")]
    assert agent.tunnels_by_id == {"tunnel1": tunnel}


def test_first_request_has_no_reclaim():
    """A tunnel never granted is asked for without a reclaim field."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()])
    relay = Relay(agent)
    relay.accept()
    (request,) = relay.requests()
    assert request["op"] == "open_tunnel" and "reclaim" not in request
    assert request["services"] == [{"name": "", "kind": "tcp"}]


# -- reclaim after a lost link ---------------------------------------------------------------


def test_reconnect_asks_again_with_the_tunnel_id_and_reclaim_secret():
    """After a lost link the new link's open_tunnel carries reclaim {tunnel, secret} and the same services."""
    agent, tunnel, relay, recorder = live_agent()
    relay.lose()
    relay2 = Relay(agent)
    relay2.accept("sess2")
    (request,) = relay2.requests()
    assert request["op"] == "open_tunnel"
    assert request["reclaim"] == {"tunnel": "tunnel1", "secret": SECRET}
    assert request["services"] == [{"name": "", "kind": "tcp"}]
    assert control.parse_request(request).reclaim == ("tunnel1", SECRET)  # what the relay reads


def test_reclaim_with_the_same_address_fires_reconnected():
    """A reply with the same addresses makes the tunnel live again and fires "reconnected"."""
    agent, tunnel, relay, recorder = live_agent()
    relay2, request = reconnect(agent, relay)
    relay2.grant(request, "tunnel1", 20001, reclaimed=True)
    assert tunnel.status == "live" and agent.link is relay2.link
    assert [e for _, e, _ in recorder.events] == ["open", "reconnected"]
    assert tunnel.urls == ("tcp://relay.example:20001",)


def test_a_reclaim_reply_without_secret_keeps_the_old_one():
    """A reclaimed grant carries no new secret: the next reconnect presents the original one."""
    agent, tunnel, relay, recorder = live_agent()
    relay2, request = reconnect(agent, relay)
    relay2.grant(request, "tunnel1", 20001, reclaimed=True)
    relay2.lose()
    relay3 = Relay(agent)
    relay3.accept()
    (request,) = relay3.requests()
    assert request["reclaim"] == {"tunnel": "tunnel1", "secret": SECRET}


def test_a_new_address_after_reconnect_fires_moved():
    """A reply with different addresses (the old ones expired) updates the tunnel and fires "moved"."""
    agent, tunnel, relay, recorder = live_agent()
    relay2, request = reconnect(agent, relay)
    relay2.grant(request, "tunnel2", 20002, secret="reclaim-secret-two")
    assert [(e, urls) for _, e, urls in recorder.events] == [
        ("open", ("tcp://relay.example:20001",)),
        ("moved", ("tcp://relay.example:20002",)),
    ]
    assert tunnel.status == "live" and tunnel.tunnel_id == "tunnel2"
    assert agent.tunnels_by_id == {"tunnel2": tunnel}
    # The next reconnect reclaims the new tunnel with its new secret.
    relay2.lose()
    relay3 = Relay(agent)
    relay3.accept()
    (request,) = relay3.requests()
    assert request["reclaim"] == {"tunnel": "tunnel2", "secret": "reclaim-secret-two"}


def keep_address_agent():
    """An agent with one keep_address tunnel (as the Python API asks), granted: (agent, tunnel, relay, recorder)."""
    recorder = Recorder()
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, on_tunnel=recorder, fail_on_refusal=False)
    relay = Relay(agent)
    relay.accept()
    tunnel = agent.add_tunnel(tcp_spec(), keep_address=True)
    (request,) = relay.requests()
    relay.grant(request, "tunnel1", 20001, secret=SECRET)
    assert tunnel.status == "live"
    return agent, tunnel, relay, recorder


def test_keep_address_refuses_a_different_address_and_gives_it_back():
    """keep_address: a reconnect granting different addresses closes the tunnel with TunnelLostError and closes the new grant."""
    agent, tunnel, relay, recorder = keep_address_agent()
    relay2, request = reconnect(agent, relay)
    assert request["reclaim"] == {"tunnel": "tunnel1", "secret": SECRET}
    relay2.grant(request, "tunnel2", 20002, secret="reclaim-secret-two")
    (give_back,) = relay2.requests()
    assert (give_back["op"], give_back["tunnel"]) == ("close_tunnel", "tunnel2")
    assert tunnel.status == "closed"
    assert isinstance(tunnel.error, TunnelLostError)
    assert "tcp://relay.example:20001" in str(tunnel.error)
    assert tunnel.urls == ("tcp://relay.example:20001",)  # never silently the new address
    assert [e for _, e, _ in recorder.events] == ["open", "lost"]
    assert tunnel not in agent.tunnels and agent.tunnels_by_id == {}
    assert not agent.done.called  # other tunnels of the agent live on


def test_keep_address_with_the_same_address_reconnects():
    """keep_address: a reconnect granting the same addresses keeps the tunnel live."""
    agent, tunnel, relay, recorder = keep_address_agent()
    relay2, request = reconnect(agent, relay)
    relay2.grant(request, "tunnel1", 20001, reclaimed=True)
    assert relay2.requests() == []  # nothing given back
    assert tunnel.status == "live" and tunnel.error is None
    assert [e for _, e, _ in recorder.events] == ["open", "reconnected"]


def test_keep_address_refused_on_reconnect_is_lost():
    """keep_address: a reconnect the relay refuses (old addresses expired, no new port) ends the tunnel with TunnelLostError and fires "lost"."""
    agent, tunnel, relay, recorder = keep_address_agent()
    relay2, request = reconnect(agent, relay)
    assert request["reclaim"] == {"tunnel": "tunnel1", "secret": SECRET}
    relay2.reply(control.error_reply(request["id"], control.request_error("no_free_port", "range full")))
    assert tunnel.status == "closed"
    assert isinstance(tunnel.error, TunnelLostError)
    assert "tcp://relay.example:20001" in str(tunnel.error) and "range full" in str(tunnel.error)
    assert tunnel not in agent.tunnels and agent.tunnels_by_id == {}
    assert not agent.done.called and relay2.requests() == []
    assert [e for _, e, _ in recorder.events] == ["open", "lost"]


@pytest.mark.parametrize("fail_on_refusal", [False, True])
def test_lost_fires_once_the_tunnel_is_closed(fail_on_refusal):
    """When "lost" fires, the tunnel is already closed with its TunnelLostError, whether the refusal also ends the agent or not."""
    seen = []
    agent = TunnelAgent(
        MemoryReactorClock(), RELAY, TOKEN, fail_on_refusal=fail_on_refusal,
        on_tunnel=lambda tunnel, event: seen.append((event, tunnel.status, type(tunnel.error))),
    )
    relay = Relay(agent)
    relay.accept()
    tunnel = agent.add_tunnel(tcp_spec(), keep_address=True)
    (request,) = relay.requests()
    relay.grant(request, "tunnel1", 20001, secret=SECRET)
    relay2, request = reconnect(agent, relay)
    relay2.reply(control.error_reply(request["id"], control.request_error("no_free_port", "range full")))
    assert seen == [("open", "live", type(None)), ("lost", "closed", TunnelLostError)]
    done_errors = [f.type for f in errors_of(agent.done)]
    assert done_errors == ([TunnelLostError] if fail_on_refusal else [])


# -- refusals and relay errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "code, error_class",
    [
        ("no_free_port", NoPortsAvailableError),
        ("bad_service_name", BadServiceNameError),
        ("reclaim_failed", ReclaimFailedError),
        ("some_future_code", TunnelRequestError),
    ],
)
def test_a_refused_request_fails_the_agent_with_the_typed_error(code, error_class):
    """With fail_on_refusal an error reply ends the agent with the error class of its code."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()])
    (tunnel,) = agent.tunnels
    opened_errors = errors_of(tunnel.opened)
    relay = Relay(agent)
    relay.accept()
    (request,) = relay.requests()
    relay.reply({"id": request["id"], "ok": False, "error": {"code": code, "message": "nope"}})
    error = failure_of(agent.done)
    assert error is not None and type(error.value) is error_class
    assert getattr(error.value.code, "value", error.value.code) == code
    assert "localhost:8000" in str(error.value) and "nope" in str(error.value)
    assert [type(f.value) for f in opened_errors] == [error_class]
    assert tunnel.status == "closed"
    # The agent said goodbye on its way out.
    (goaway,) = relay.read()
    assert (type(goaway), goaway.code) == (ev.GoAwayReceived, ErrorCode.NO_ERROR)


def test_without_fail_on_refusal_only_the_refused_tunnel_ends():
    """Without fail_on_refusal an error reply errs that tunnel's `opened`; other tunnels and the agent go on."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, fail_on_refusal=False)
    relay = Relay(agent)
    relay.accept()
    refused = agent.add_tunnel(tcp_spec(8000))
    kept = agent.add_tunnel(tcp_spec(8001))
    first, second = relay.requests()
    error = control.request_error(RequestErrorCode.NO_FREE_PORT, "no free port in 20000-20001")
    relay.reply(control.error_reply(first["id"], error))
    relay.grant(second, "tunnel2", 20002, secret=SECRET)
    failure = failure_of(refused.opened)
    assert failure is not None and failure.check(NoPortsAvailableError)
    assert failure.value.code is RequestErrorCode.NO_FREE_PORT
    assert refused.status == "closed" and refused not in agent.tunnels
    assert kept.status == "live" and result_of(kept.opened) is kept
    assert not agent.done.called and not relay.link.closed


def test_auth_failed_goaway_fails_with_authentication_error():
    """A GOAWAY(AUTH_FAILED) answering HELLO ends the agent with AuthenticationError (exit code 3)."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()])
    (tunnel,) = agent.tunnels
    opened_errors = errors_of(tunnel.opened)
    relay = Relay(agent)
    relay.read()  # the HELLO
    relay.mux.close(ErrorCode.AUTH_FAILED, "token refused")
    relay.deliver()
    error = failure_of(agent.done)
    assert error is not None and error.check(AuthenticationError)
    assert error.value.exit_code == 3
    assert [f.type for f in opened_errors] == [AuthenticationError]
    assert relay.link.closed and relay.transport.disconnecting


def test_a_limit_refusal_keeps_the_other_tunnels_and_the_last_one_ends_the_agent():
    """With fail_on_refusal (the CLI) a limit_exceeded reply ends only that tunnel, named in one
    warning, while others are open or opening; once none is left the agent ends with exit code 6."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec(8000), tcp_spec(8001), tcp_spec(8002)])
    relay = Relay(agent)
    relay.accept()
    first, second, third = relay.requests()
    relay.grant(first, "tunnel1", 20001, secret=SECRET)
    limit = control.request_error(RequestErrorCode.LIMIT_EXCEEDED, "tunnels of this token: at most 1")
    refused = list(agent.tunnels[1:])
    with capturedLogs() as events:
        relay.reply(control.error_reply(second["id"], limit))
        relay.reply(control.error_reply(third["id"], limit))
    assert not agent.done.called and [t.status for t in agent.tunnels] == ["live"]
    # Said once in the warning: the refused tunnels' Deferreds hold no unhandled
    # failure (it would print "Unhandled error in Deferred" with a traceback).
    for tunnel in refused:
        results = []
        tunnel.opened.addBoth(results.append)
        assert results == [None], results
    warnings = [e for e in events if "keeping the other tunnels" in e.get("log_format", "")]
    assert len(warnings) == 2 and "tunnels of this token: at most 1" in str(warnings[0]["error"])
    # Alone, a refused tunnel ends the agent with the limit's error.
    lonely = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec(8000)])
    relay = Relay(lonely)
    relay.accept()
    (request,) = relay.requests()
    relay.reply(control.error_reply(request["id"], limit))
    error = failure_of(lonely.done)
    assert error.check(LimitExceededError) and error.value.exit_code == 6
    assert "tunnels of this token: at most 1" in str(error.value)


def test_a_revoked_token_ends_the_agent_saying_so():
    """GOAWAY(AUTH_FAILED, "token revoked") on a live link ends the agent (exit 3) with the relay's reason."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()])
    relay = Relay(agent)
    relay.accept()
    (request,) = relay.requests()
    relay.grant(request, "tunnel1", 20001, secret=SECRET)
    relay.mux.close(ErrorCode.AUTH_FAILED, "token revoked")
    relay.deliver()
    error = failure_of(agent.done)
    assert error.check(AuthenticationError) and error.value.exit_code == 3
    assert "token revoked" in str(error.value)


@pytest.mark.parametrize("code", [ErrorCode.NO_ERROR, ErrorCode.SESSION_REPLACED, ErrorCode.INTERNAL_ERROR])
def test_other_goaways_close_the_link_but_not_the_agent(code):
    """A GOAWAY other than AUTH_FAILED closes the link; the agent stays up to reconnect."""
    agent, tunnel, relay, recorder = live_agent()
    relay.mux.close(code, "relay restarting")
    relay.deliver()
    assert relay.link.closed and relay.transport.disconnecting
    relay.lose()
    assert not agent.done.called and tunnel.status == "reconnecting"


def test_stop_sends_goaway_no_error_and_finishes_once_the_link_is_gone():
    """stop() sends GOAWAY(NO_ERROR), closes the link, and `done` fires once the link is lost."""
    agent, tunnel, relay, recorder = live_agent()
    stopped = agent.stop()
    (goaway,) = relay.read()
    assert (type(goaway), goaway.code) == (ev.GoAwayReceived, ErrorCode.NO_ERROR)
    assert relay.transport.disconnecting
    assert not agent.done.called  # waits for the link to end
    relay.link.connectionLost(Failure(ConnectionDone()))
    assert agent.done.called and result_of(agent.done) is None
    assert stopped.called


def test_stop_does_not_wait_forever_for_a_silent_relay():
    """stop() finishes after 3 s even if the link never reports its end."""
    agent, tunnel, relay, recorder = live_agent()
    agent.stop()
    agent.reactor.advance(2.9)
    assert not agent.done.called
    agent.reactor.advance(0.2)
    assert agent.done.called and result_of(agent.done) is None


@pytest.mark.parametrize(
    "message",
    [{"ok": True}, {"id": "1", "ok": True}, {"id": True, "ok": True}, {"id": 1.0, "ok": True}, {"id": -1, "ok": True}],
)
def test_a_reply_without_an_integer_id_closes_the_link(message):
    """A CONTROL reply without an integer id is a protocol violation: GOAWAY(PROTOCOL_ERROR), link closed."""
    agent, tunnel, relay, recorder = live_agent()
    relay.reply(message)
    (goaway,) = relay.read()
    assert (type(goaway), goaway.code) == (ev.GoAwayReceived, ErrorCode.PROTOCOL_ERROR)
    assert relay.link.closed and relay.transport.disconnecting
    assert not agent.done.called  # a broken link, not a broken agent: it reconnects


def test_a_grant_without_a_tunnel_id_closes_the_link():
    """An ok reply to open_tunnel without a tunnel id is a protocol violation: GOAWAY(PROTOCOL_ERROR)."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, specs=[tcp_spec()])
    relay = Relay(agent)
    relay.accept()
    (request,) = relay.requests()
    relay.reply({"id": request["id"], "ok": True, "tunnel": {"endpoints": []}})
    (goaway,) = relay.read()
    assert (type(goaway), goaway.code) == (ev.GoAwayReceived, ErrorCode.PROTOCOL_ERROR)
    assert relay.link.closed
    assert agent.tunnels[0].status == "opening"


# -- closing -------------------------------------------------------------------------------


def test_close_tunnel_asks_the_relay_and_fires_on_its_reply():
    """close_tunnel() sends close_tunnel with the tunnel id; its Deferred fires when the relay answers."""
    agent, tunnel, relay, recorder = live_agent()
    closing = agent.close_tunnel(tunnel)
    (request,) = relay.requests()
    assert (request["op"], request["tunnel"]) == ("close_tunnel", "tunnel1")
    assert tunnel.status == "closed" and not closing.called
    relay.reply(control.ok_reply(request["id"]))
    assert closing.called
    assert agent.tunnels == [] and agent.tunnels_by_id == {}


def test_a_grant_for_a_tunnel_closed_in_flight_is_given_back():
    """A tunnel closed while its open_tunnel was in flight is closed on the relay as soon as it is granted."""
    recorder = Recorder()
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN, on_tunnel=recorder)
    relay = Relay(agent)
    relay.accept()
    tunnel = agent.add_tunnel(tcp_spec())
    (request,) = relay.requests()
    assert result_of(agent.close_tunnel(tunnel)) is None  # nothing granted yet: nothing to send
    assert relay.requests() == []
    relay.grant(request, "tunnel9", 20009, secret=SECRET)
    (give_back,) = relay.requests()
    assert (give_back["op"], give_back["tunnel"]) == ("close_tunnel", "tunnel9")
    assert tunnel.status == "closed" and recorder.events == []
    assert agent.tunnels_by_id == {}


def test_a_refusal_for_a_tunnel_closed_in_flight_is_ignored():
    """An error reply for a tunnel closed while its request was in flight neither fails the agent nor sends anything."""
    agent = TunnelAgent(MemoryReactorClock(), RELAY, TOKEN)
    relay = Relay(agent)
    relay.accept()
    tunnel = agent.add_tunnel(tcp_spec())
    (request,) = relay.requests()
    agent.close_tunnel(tunnel)
    relay.reply(control.error_reply(request["id"], control.request_error("no_free_port", "full")))
    assert relay.requests() == []
    assert not agent.done.called and not relay.link.closed


def test_a_relay_of_another_protocol_version_stops_the_agent():
    """GOAWAY(UNSUPPORTED_VERSION) from the relay ends the agent with RelayVersionError (exit 8), no retries."""
    from client.errors import RelayVersionError

    reactor = MemoryReactorClock()
    agent = TunnelAgent(reactor, RELAY, TOKEN, specs=[tcp_spec()])
    link = AgentLink(agent)
    link.makeConnection(StringTransport())
    relay = MuxConnection(Role.RELAY)
    try:
        relay.receive_data(link.transport.value().replace(b'"version":2', b'"version":1'))
    except Exception:
        pass
    link.dataReceived(b"".join(relay.outgoing()))
    error = failure_of(agent.done)
    assert error is not None and error.check(RelayVersionError)
    assert error.value.exit_code == 8 and "version 1" in str(error.value)


def _stream_to_service(port: int = 8000, **relay_mux_kwargs):
    """A live agent whose service address is known, and a visitor stream the relay opened: (agent, relay, stream id)."""
    agent, tunnel, relay, _ = live_agent(relay_mux_kwargs)
    agent.remember_address(tunnel.spec.services[0], IPv4Address("TCP", "127.0.0.1", port))
    stream_id = relay.mux.open_stream({"tunnel": "tunnel1", "service": "", "peer": ["203.0.113.7", 1], "local": ["127.0.0.1", 20001]})
    relay.deliver()
    return agent, relay, stream_id


def test_the_agent_accepts_a_stream_once_its_service_connection_is_up():
    """ACCEPT goes to the relay only when the service's TCP connection is made, not at OPEN."""
    agent, relay, stream_id = _stream_to_service()
    assert not [e for e in relay.read() if isinstance(e, ev.StreamAccepted)]
    host, port, factory, *_ = agent.reactor.tcpClients[-1]
    assert (host, port) == ("127.0.0.1", 8000)
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(StringTransport())
    agent.reactor.advance(0)
    assert [e.stream_id for e in relay.read() if isinstance(e, ev.StreamAccepted)] == [stream_id]
    assert relay.mux.opens_in_flight == 0


def test_a_reset_while_the_agent_dials_cancels_the_dial():
    """The relay's RESET before the service answered stops the connection attempt; nothing is accepted or logged as a failure."""
    agent, relay, stream_id = _stream_to_service()
    connector = agent.reactor.connectors[-1]
    relay.mux.reset(stream_id)
    with capturedLogs() as logs:
        relay.deliver()
    assert connector.stoppedConnecting
    assert not [e for e in logs if "cannot reach" in str(e.get("log_format"))]


def test_opens_beyond_the_dials_in_progress_cap_are_refused(monkeypatch):
    """A relay's OPENs past MAX_DIALS_IN_PROGRESS unanswered service dials are reset (REFUSED_STREAM) at once; a finished dial makes room."""
    monkeypatch.setattr(client.agent, "MAX_DIALS_IN_PROGRESS", 2)
    agent, relay, first = _stream_to_service()
    meta = {"tunnel": "tunnel1", "service": "", "peer": ["203.0.113.7", 1], "local": ["127.0.0.1", 20001]}
    second = relay.mux.open_stream(meta)
    third = relay.mux.open_stream(meta)
    relay.deliver()
    resets = [e for e in relay.read() if isinstance(e, ev.StreamReset)]
    assert [(r.stream_id, r.code) for r in resets] == [(third, ErrorCode.REFUSED_STREAM)]
    assert len(agent.reactor.tcpClients) == 2
    host, port, factory, *_ = agent.reactor.tcpClients[0]
    factory.buildProtocol(IPv4Address("TCP", host, port)).makeConnection(StringTransport())
    assert relay.link.dials_in_progress == 1
    relay.mux.open_stream(meta)
    relay.deliver()
    assert not [e for e in relay.read() if isinstance(e, ev.StreamReset)]
    assert len(agent.reactor.tcpClients) == 3


def test_the_agent_sends_no_more_than_the_window_the_relay_announced_in_open():
    """A relay near its link's cap opens a stream with a 4 KiB window: of 64 KiB the service
    writes, the agent sends 4 KiB, and the rest once the relay credits it."""
    agent, relay, stream_id = _stream_to_service(window_cap=4096)
    host, port, factory, *_ = agent.reactor.tcpClients[-1]
    service = factory.buildProtocol(IPv4Address("TCP", host, port))
    service.makeConnection(StringTransport())
    agent.reactor.advance(0)
    relay.read()
    service.dataReceived(b"s" * 65536)
    agent.reactor.advance(0)
    data = [e for e in relay.read() if isinstance(e, ev.DataReceived)]
    assert sum(len(e.data) for e in data) == 4096
    relay.mux.consumed(stream_id, 4096)
    relay.deliver()
    agent.reactor.advance(0)
    more = [e for e in relay.read() if isinstance(e, ev.DataReceived)]
    assert 0 < sum(len(e.data) for e in more) <= relay.mux.streams[stream_id].recv.target
