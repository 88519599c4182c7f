"""Per-token limits on a node over in-memory transports: tunnels and streams
per token, new streams per second, the port range, the bandwidth bucket,
revocation and reloads that reach live sessions."""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from relay.mux import ErrorCode
from relay.mux import events as ev
from relay.mux.control import LimitExceededError, RequestErrorCode
from relay.node import tokens
from relay.node.state import hash_token
from relay.node.tokens import TokenLimits, TokenRecord, TokenStore
from relay.wire.splice import Splice
from relay.wire.throttle import ThrottledSplice, TokenBucket
from tests.relay.node_helpers import HIGH, LOW, Node

ACME, BETA = "acme-token-never-logged", "beta-token-never-logged"


class Tenants:
    """A node whose agents log in with tokens of a real tokens file."""

    def __init__(self, tmp_path, acme: TokenLimits, beta: TokenLimits = TokenLimits()):
        self.path = tmp_path / "tokens.json"
        self.write(acme, beta)
        self.store = TokenStore(self.path)
        self.node = Node()
        self.node.factory.check_token = self.store.check_token
        self.store.on_reload.append(lambda table: self.node.tunnels.apply_grants(table.grant_of))

    def write(self, acme: TokenLimits | None, beta: TokenLimits | None = TokenLimits()) -> None:
        records = []
        if acme is not None:
            records.append(TokenRecord("acme1", "acme", tokens.now_text(), hash_token(ACME), "", acme))
        if beta is not None:
            records.append(TokenRecord("beta1", "beta", tokens.now_text(), hash_token(BETA), "", beta))
        tokens.write_tokens(self.path, records)

    def agent(self, token=ACME):
        agent = self.node.agent(token)
        assert any(isinstance(e, ev.HelloReceived) for e in agent.events)
        return agent


def _visit(node, port, count, first_port=40000):
    out = []
    for i in range(count):
        addr = IPv4Address("TCP", "203.0.113.7", first_port + i)
        protocol = node.listener(port).buildProtocol(addr)
        if protocol is not None:
            protocol.makeConnection(StringTransport(peerAddress=addr))
        out.append(protocol)
    return out


def test_tunnels_are_counted_over_every_link_of_the_token(tmp_path):
    """max_tunnels counts both links of one token; the refusal names the limit; another tenant is untouched."""
    t = Tenants(tmp_path, TokenLimits(max_tunnels=2))
    one, two, beta = t.agent(), t.agent(), t.agent(BETA)
    assert one.open().ok and two.open().ok
    reply = one.open()
    assert isinstance(reply.error, LimitExceededError) and reply.error.code is RequestErrorCode.LIMIT_EXCEEDED
    assert "tunnels of this token: at most 2" in str(reply.error)
    assert all(beta.open().ok for _ in range(3))
    assert t.node.metrics.allocation_failures["limit_exceeded"] == 1


def test_a_token_gets_ports_only_from_its_range_and_a_clear_error_when_it_is_used_up(tmp_path):
    """Every TCP port of the token lies in its range; past it, limit_exceeded naming the range."""
    t = Tenants(tmp_path, TokenLimits(ports=(LOW + 2, LOW + 3)))
    agent = t.agent()
    ports = {agent.open().body["tunnel"]["port"] for _ in range(2)}
    assert ports == {LOW + 2, LOW + 3}
    reply = agent.open()
    assert reply.error.code is RequestErrorCode.LIMIT_EXCEEDED
    assert f"public ports of this token ({LOW + 2}-{LOW + 3})" in str(reply.error)
    assert t.agent(BETA).open().body["tunnel"]["port"] not in ports  # others use the rest of the range


def test_a_port_range_outside_the_relays_is_refused_by_name(tmp_path):
    """A token range that does not meet --ports is a limit_exceeded that says so."""
    t = Tenants(tmp_path, TokenLimits(ports=(HIGH + 10, HIGH + 20)))
    reply = t.agent().open()
    assert reply.error.code is RequestErrorCode.LIMIT_EXCEEDED and "outside the relay's range" in str(reply.error)


def test_concurrent_streams_per_token_are_capped_counted_and_logged_once(tmp_path):
    """Past max_streams over all of a token's tunnels, visitors are refused, counted by reason, in one log line."""
    t = Tenants(tmp_path, TokenLimits(max_streams=3))
    agent, beta = t.agent(), t.agent(BETA)
    first, second = (agent.open().body["tunnel"]["port"] for _ in range(2))
    with capturedLogs() as events:
        got = _visit(t.node, first, 2) + _visit(t.node, second, 5)
    assert [p is not None for p in got] == [True] * 3 + [False] * 4
    assert t.node.metrics.refused_by_reason["streams_per_token"] == 4
    lines = [e for e in events if e.get("reason") == "streams_per_token"]
    assert len(lines) == 1 and lines[0]["tenant"] == "acme"
    assert all(p is not None for p in _visit(t.node, beta.open().body["tunnel"]["port"], 5))
    assert ACME not in repr(events)


def test_new_streams_per_second_of_a_token_are_a_bucket_per_tunnel(tmp_path):
    """max_new_streams_per_second: a burst of one second's worth, then the rate."""
    t = Tenants(tmp_path, TokenLimits(max_new_streams_per_second=4))
    port = t.agent().open().body["tunnel"]["port"]
    assert sum(p is not None for p in _visit(t.node, port, 10)) == 4
    assert t.node.metrics.refused_by_reason["new_streams_rate"] == 6
    t.node.reactor.advance(0.5)
    assert sum(p is not None for p in _visit(t.node, port, 10, 41000)) == 2


def test_a_reload_applies_new_limits_to_live_sessions_without_closing_them(tmp_path):
    """A raised max_tunnels lets the same live link open more; its existing tunnel stays."""
    t = Tenants(tmp_path, TokenLimits(max_tunnels=1))
    agent = t.agent()
    assert agent.open().ok and not agent.open().ok
    t.write(TokenLimits(max_tunnels=3))
    t.store.reload()
    assert agent.open().ok and agent.open().ok and not agent.open().ok
    assert not agent.link.closed and len(t.node.tunnels.tunnels) == 3


def test_revoking_a_token_closes_its_links_and_tunnels_at_once_and_nobody_elses(tmp_path):
    """A token gone from the file: its link gets GOAWAY(AUTH_FAILED, token revoked), its tunnels end (no grace); beta keeps everything."""
    t = Tenants(tmp_path, TokenLimits())
    acme, beta = t.agent(), t.agent(BETA)
    acme_port = acme.open().body["tunnel"]["port"]
    beta_port = beta.open().body["tunnel"]["port"]
    t.write(None)
    with capturedLogs() as events:
        t.store.reload()
    goaways = [e for e in acme.pump() if isinstance(e, ev.GoAwayReceived)]
    assert [(g.code, g.message) for g in goaways] == [(ErrorCode.AUTH_FAILED, "token revoked")]
    acme.lose()
    assert acme_port in t.node.allocator._quarantine  # closed now, not held for a reclaim
    assert [tunnel.endpoints[0].port for tunnel in t.node.tunnels.tunnels.values()] == [beta_port]
    assert not beta.link.closed and _visit(t.node, beta_port, 1)[0] is not None
    assert ACME not in repr(events) and BETA not in repr(events)
    assert t.store.check_token(ACME) is None


def test_a_corrupt_file_keeps_the_old_grants(tmp_path):
    """A bad file is refused: live sessions keep their limits and the token still logs in."""
    t = Tenants(tmp_path, TokenLimits(max_tunnels=1))
    agent = t.agent()
    t.path.write_text("{")
    assert t.store.reload() is False
    assert not agent.link.closed and agent.open().ok and not agent.open().ok
    t.agent()  # still accepted


# -- the bandwidth cap -------------------------------------------------------------


def test_an_uncapped_tunnel_gets_the_plain_splice_and_a_capped_one_the_throttled(tmp_path):
    """No per-chunk cost without a cap: the splice class says which path a visitor takes."""
    t = Tenants(tmp_path, TokenLimits(bandwidth=100_000))
    capped = t.agent().open().body["tunnel"]["port"]
    free = t.agent(BETA).open().body["tunnel"]["port"]
    [capped_side] = _visit(t.node, capped, 1)
    [free_side] = _visit(t.node, free, 1)
    assert type(capped_side.splice) is ThrottledSplice
    assert type(free_side.splice) is Splice


class _Transport(StringTransport):
    """A transport that records pause/resume as a producer (what the splice calls on it)."""

    def __init__(self):
        super().__init__()
        self.reading = True

    def pauseProducing(self):
        self.reading = False

    def resumeProducing(self):
        self.reading = True


def _throttled_pair(rate):
    clock = Clock()
    up, down = TokenBucket(rate, clock), TokenBucket(rate, clock)
    splice = ThrottledSplice(clock, up, down)
    visitor, stream = _Transport(), _Transport()
    splice.a.makeConnection(visitor)
    splice.b.makeConnection(stream)
    return clock, splice, visitor, stream, up


def test_the_bucket_pauses_the_reading_side_and_a_timer_resumes_it():
    """Reading past the burst pauses that side's transport; it resumes when the debt is paid, bytes pass unchanged."""
    clock, splice, visitor, stream, up = _throttled_pair(rate=100_000)
    burst = up.burst
    chunk = b"x" * 65536
    sent = 0
    while visitor.reading:
        splice.a.dataReceived(chunk)
        sent += len(chunk)
    assert sent > burst and stream.value() == b"x" * sent  # written at once, never held
    assert stream.reading  # the other direction is not slowed
    wait = (sent - burst) / 100_000
    clock.advance(wait * 0.9)
    assert not visitor.reading
    clock.advance(wait * 0.2)
    assert visitor.reading


def test_a_throttled_side_stays_paused_when_its_consumer_resumes_it_early():
    """The consumer's resumeProducing does not lift the bucket's pause; the timer does, unless the consumer still pauses."""
    clock, splice, visitor, stream, up = _throttled_pair(rate=50_000)
    splice.a.dataReceived(b"y" * (up.burst + 50_000))  # one second of debt
    assert not visitor.reading
    splice.a.pauseProducing()  # the stream's window filled
    splice.a.resumeProducing()  # and drained again
    assert not visitor.reading
    splice.a.pauseProducing()
    clock.advance(1.1)
    assert not visitor.reading  # the debt is paid, but the consumer still pauses it
    splice.a.resumeProducing()
    assert visitor.reading


def test_sharing_one_bucket_the_tunnels_visitors_share_its_rate():
    """A second visitor of the tunnel that spent the bucket waits for the same debt."""
    clock = Clock()
    up, down = TokenBucket(100_000, clock), TokenBucket(100_000, clock)
    sides = []
    for _ in range(2):
        splice = ThrottledSplice(clock, up, down)
        visitor, stream = _Transport(), _Transport()
        splice.a.makeConnection(visitor)
        splice.b.makeConnection(stream)
        sides.append((splice, visitor))
    sides[0][0].a.dataReceived(b"z" * (up.burst + 100_000))
    sides[1][0].a.dataReceived(b"z")
    assert not sides[0][1].reading and not sides[1][1].reading
    clock.advance(1.1)
    assert sides[0][1].reading and sides[1][1].reading


def test_a_reload_changes_the_rate_of_a_live_tunnel(tmp_path):
    """A changed bandwidth reaches the buckets of a tunnel that already has visitors."""
    t = Tenants(tmp_path, TokenLimits(bandwidth=100_000))
    port = t.agent().open().body["tunnel"]["port"]
    [side] = _visit(t.node, port, 1)
    assert side.bucket.rate == 100_000
    t.write(TokenLimits(bandwidth=2_000_000))
    t.store.reload()
    assert side.bucket.rate == 2_000_000 and side.other.bucket.rate == 2_000_000
    t.write(TokenLimits())  # the cap lifted: live visitors stop waiting, new ones get the plain splice
    t.store.reload()
    assert side.bucket.charge(10**9) == 0.0
    [new_side] = _visit(t.node, port, 1, 41000)
    assert type(new_side.splice) is Splice


@pytest.mark.parametrize("rate", [1024, 10**6])
def test_a_bucket_never_allows_more_than_rate_times_time_plus_burst(rate):
    """Over any run, the bytes charged without debt are at most burst + rate x elapsed."""
    clock = Clock()
    bucket = TokenBucket(rate, clock)
    passed = 0
    for _ in range(200):
        if bucket.wait_seconds() == 0:
            bucket.charge(4096)
            passed += 4096
        clock.advance(0.01)
    assert passed <= bucket.burst + rate * clock.seconds() + 4096
