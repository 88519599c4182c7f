"""Bounds before login on the agent port (relay/node/login.py, relay/node/agents.py):
caps on connections in their handshake, a short ban after repeated bad tokens,
and one deadline for TLS and HELLO together."""

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from relay.mux import ErrorCode, MuxConnection, Role
from relay.mux import events as ev
from relay.node.login import LoginGuard
from tests.relay.node_helpers import TOKEN, Node


def test_pending_logins_are_capped_in_all_and_per_source():
    """Past the total or the per-source cap a new login is refused; finishing one makes room."""
    guard = LoginGuard(Clock(), max_pending=3, max_pending_per_source=2)
    assert guard.admit("a") is None and guard.admit("a") is None
    assert guard.admit("a") == "busy_source"
    assert guard.admit("b") is None
    assert guard.admit("c") == "busy"
    guard.finished("a")
    assert guard.admit("c") is None
    assert guard.pending == 3 and guard.refused_at_accept == 2


def test_repeated_bad_tokens_ban_the_source_for_a_while():
    """Five refused tokens within the window ban that address (others unaffected) until the ban ends."""
    clock = Clock()
    guard = LoginGuard(clock, bad_tokens_before_ban=5, window_seconds=60, ban_seconds=30)
    for _ in range(4):
        assert guard.bad_token("10.0.0.1") is False
    with capturedLogs() as logs:
        assert guard.bad_token("10.0.0.1") is True
    assert len(logs) == 1  # the ban's one line
    assert guard.admit("10.0.0.1") == "banned" and guard.admit("10.0.0.2") is None
    clock.advance(30.1)
    assert guard.admit("10.0.0.1") is None


def test_bad_tokens_spread_over_more_than_the_window_never_ban():
    """Failures older than the window are forgotten: a slow trickle of mistakes is not an attack."""
    clock = Clock()
    guard = LoginGuard(clock, bad_tokens_before_ban=3, window_seconds=10)
    for _ in range(10):
        assert guard.bad_token("h") is False
        clock.advance(6)


def test_tracked_sources_are_bounded():
    """The failure record keeps at most max_tracked_sources addresses."""
    guard = LoginGuard(Clock(), max_tracked_sources=100)
    for i in range(1000):
        guard.bad_token(f"10.0.{i // 256}.{i % 256}")
    assert len(guard._failures) == 100


def _connect(node, host="198.51.100.9"):
    link = node.factory.buildProtocol(IPv4Address("TCP", host, 40000))
    if link is None:
        return None, None
    transport = StringTransport()
    link.makeConnection(transport)
    return link, transport


def _hello(link, transport, token):
    mux = MuxConnection(Role.AGENT)
    mux.send_hello({"token": token})
    link.dataReceived(b"".join(mux.outgoing()))
    return mux.receive_data(transport.value())


def test_the_agent_port_bans_an_address_after_bad_tokens_and_serves_others():
    """After five bad tokens from one address its next connection is refused at accept; another address still logs in."""
    node = Node()
    with capturedLogs() as logs:
        for _ in range(5):
            link, transport = _connect(node)
            events = _hello(link, transport, "wrong")
            assert any(isinstance(e, ev.GoAwayReceived) and e.code == ErrorCode.AUTH_FAILED for e in events)
            link.connectionLost(None)
        assert _connect(node)[0] is None
    assert node.factory.login_guard.pending == 0
    assert sum("refused: bad token" in str(e.get("log_format")) for e in logs) == 5
    link, transport = _connect(node, host="203.0.113.1")
    assert link.authenticated is False
    _hello(link, transport, TOKEN)
    assert link.authenticated and node.factory.login_guard.pending == 0


def test_tls_and_hello_share_one_deadline_from_the_accept():
    """A connection accepted at t=0 whose TLS took 9 s has 1 s left for its HELLO, not another 10 s."""
    node = Node()
    link = node.factory.buildProtocol(IPv4Address("TCP", "198.51.100.9", 40000))
    node.reactor.advance(9)  # the TLS handshake
    transport = StringTransport()
    link.makeConnection(transport)
    node.reactor.advance(0.9)
    assert not transport.disconnecting and not link.closed
    node.reactor.advance(0.2)
    assert link.closed


def test_a_login_that_never_finishes_tls_still_leaves_the_count():
    """A connection dropped during its TLS handshake (the RelayLink never connected) is no longer counted as pending."""
    import ssl

    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    from relay.node.agents import AgentPortFactory

    node = Node()
    port = AgentPortFactory(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), node.factory, node.reactor)
    layers = []
    for _ in range(3):
        layer = port.buildProtocol(IPv4Address("TCP", "198.51.100.9", 40000))
        layer.makeConnection(StringTransport())
        layers.append(layer)
    assert node.factory.login_guard.pending == 3
    for layer in layers:
        layer.connectionLost(Failure(ConnectionLost()))
    assert node.factory.login_guard.pending == 0


def test_the_end_of_a_burst_of_logins_returns_free_memory_once(monkeypatch):
    """After a burst of at least TRIM_AFTER_PENDING logins falls to a quarter, the
    free pages go back to the system once (not per login); small bursts never trim."""
    from relay.node import login

    calls = []
    monkeypatch.setattr(login, "release_free_memory", lambda: calls.append(1))
    clock = Clock()
    guard = LoginGuard(clock, max_pending=10_000, max_pending_per_source=10_000)
    for _ in range(login.TRIM_AFTER_PENDING - 1):  # one short of a burst
        guard.admit("a")
    for _ in range(login.TRIM_AFTER_PENDING - 1):
        guard.finished("a")
    clock.advance(0)
    assert calls == []
    n = 4 * login.TRIM_AFTER_PENDING
    for _ in range(n):
        guard.admit("a")
    for _ in range(n):
        guard.finished("a")
    clock.advance(0)
    assert calls == [1] and guard.trims == 1 and guard.pending == 0


def test_release_free_memory_runs_here():
    """The trim is a real call on this machine's libc (glibc), and harmless."""
    from relay.node import login

    login.release_free_memory()
