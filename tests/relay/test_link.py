"""The Twisted adapter (relay/wire/link.py, relay/node/agents.py) over in-memory
transports and a fake clock: keepalive, credit, backpressure, handshake.

A local connection is a StringTransport spliced (relay/wire/splice.py) to a
stream of the link, as the relay splices a visitor: `side` is its protocol,
`local.producer` is what the local transport pauses when its buffer fills."""

from typing import NamedTuple

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from zope.interface import implementer

from relay.node.tenants import DEV_GRANT
from relay.node.agents import AgentLinkFactory
from relay.wire.interfaces import ITurnEndReactor
from relay.wire.link import MuxLink
from relay.wire.splice import Splice
from relay.wire.stream import MuxStream, StreamState
from relay.mux import ErrorCode, MuxConnection, Role
from relay.mux import events as ev
from relay.mux import frames as fr

TOKEN = "s3cret-token-value-never-logged"


class FakeRegistry:
    def __init__(self):
        self.links = set()
        self.tunnels = {}
        self.draining = False  # TunnelManager.draining
        self.lost = []
        from relay.node.sessions import SessionTable

        self.sessions = SessionTable(__import__("twisted.internet.task", fromlist=["Clock"]).Clock())

    def add_link(self, link):
        self.links.add(link)

    def start_session(self, link, wanted_links):
        return self.sessions.start(link, wanted_links)

    def join_session(self, link, join):
        return self.sessions.join(link, join)

    def splice_for(self, tunnel, link):
        from relay.wire.splice import Splice

        return Splice()

    def link_lost(self, link, graceful):
        self.lost.append((link, graceful))


class StreamLink(MuxLink):
    """A relay-role link that opens streams on demand, for adapter tests."""


def handshaken_pair(clock, **kwargs):
    """A relay-role MuxLink on a StringTransport, and the agent's core as the peer."""
    link = StreamLink(MuxConnection(Role.RELAY), clock, **kwargs)
    transport = StringTransport()
    link.makeConnection(transport)
    peer = MuxConnection(Role.AGENT)
    peer.send_hello({"token": "x"})
    link.mux.receive_data(b"".join(peer.outgoing()))
    link.mux.send_hello({})
    link.flush()
    peer.receive_data(transport.value())
    transport.clear()
    return link, transport, peer


class Spliced(NamedTuple):
    side: object  # the local connection's protocol
    stream: MuxStream


def open_splice(link, local=None):
    """A local connection spliced to a new stream, as RelayLink.open_visitor_stream does."""
    splice = Splice()
    streams = []
    splice.a.when_connected = lambda: streams.append(link.open_stream({"tunnel": "t"}, splice.b))
    local = local if local is not None else StringTransport()
    splice.a.makeConnection(local)
    return Spliced(splice.a, streams[0]), local


def frames_of(data: bytes):
    return fr.FrameDecoder(fr.MAX_FRAME_PAYLOAD).feed(data)


@implementer(ITurnEndReactor)
class TurnEndClock(Clock):
    """A fake clock with RelayReactor's turn-end hook, run by hand."""

    def __init__(self):
        super().__init__()
        self.turn_end = []

    def call_at_turn_end(self, f):
        self.turn_end.append(f)

    def end_turn(self):
        calls, self.turn_end = self.turn_end, []
        for f in calls:
            f()


def test_keepalive_pings_then_declares_silent_link_dead():
    """A link pings every interval and is aborted once nothing arrived for the timeout."""
    clock = Clock()
    link, transport, peer = handshaken_pair(
        clock, keepalive_interval_seconds=10, keepalive_timeout_seconds=30
    )
    clock.advance(10)
    assert [f[0] for f in frames_of(transport.value())] == [fr.FrameType.PING]
    clock.advance(10)
    clock.advance(10)
    assert transport.disconnecting or link.closed
    assert link.closed


def test_pong_to_the_latest_ping_measures_the_round_trip():
    """rtt_seconds is the time from our latest PING to its PONG; a PONG with
    other bytes (a stale or stray one) leaves it as it was."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock, keepalive_interval_seconds=10, keepalive_timeout_seconds=30)
    assert link.rtt_seconds is None
    clock.advance(10)  # the keepalive's PING
    peer.receive_data(transport.value())
    transport.clear()
    clock.advance(0.25)
    link.dataReceived(b"".join(peer.outgoing()))  # the peer's core answered PONG
    assert link.rtt_seconds == pytest.approx(0.25)
    link.send_ping()
    clock.advance(0.5)
    link.dataReceived(fr.encode(fr.FrameType.PONG, 0, b"\x00" * fr.PING_SIZE))  # not our bytes
    assert link.rtt_seconds == pytest.approx(0.25)
    peer.receive_data(transport.value())
    link.dataReceived(b"".join(peer.outgoing()))
    assert link.rtt_seconds == pytest.approx(0.5)
    assert not link.closed


def test_any_frame_counts_as_liveness():
    """Data arriving more often than the timeout keeps the link up even if no PONG comes."""
    clock = Clock()
    link, transport, peer = handshaken_pair(
        clock, keepalive_interval_seconds=10, keepalive_timeout_seconds=30
    )
    splice, local = open_splice(link)
    peer.receive_data(transport.value())
    transport.clear()
    for _ in range(10):
        clock.advance(9)
        peer.send(splice.stream.stream_id, b"x")
        link.dataReceived(b"".join(peer.outgoing()))
    assert not link.closed
    assert local.value() == b"x" * 10


def test_credit_waits_for_a_paused_consumer():
    """Bytes written to a paused local transport are credited only when it resumes."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    splice, local = open_splice(link)
    peer.receive_data(transport.value())
    transport.clear()
    local.producer.pauseProducing()  # the local socket's buffer is full
    sent = peer.send(splice.stream.stream_id, b"a" * 200_000)
    link.dataReceived(b"".join(peer.outgoing()))
    assert sent == 200_000 and len(local.value()) == 200_000
    assert not any(f[0] == fr.FrameType.WINDOW_UPDATE for f in frames_of(transport.value()))
    local.producer.resumeProducing()
    updates = [f for f in frames_of(transport.value()) if f[0] == fr.FrameType.WINDOW_UPDATE]
    assert updates, "credit must flow once the consumer drains"


def test_exhausted_window_pauses_the_local_reader():
    """When the send window is used up, the local socket stops being read; credit resumes it."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    splice, local = open_splice(link)
    events = peer.receive_data(transport.value())
    transport.clear()
    window = link.mux.send_window(splice.stream.stream_id)
    splice.side.dataReceived(b"b" * (window + 1000))
    assert local.producerState == "paused"
    events = peer.receive_data(transport.value())
    transport.clear()
    received = sum(len(e.data) for e in events if isinstance(e, ev.DataReceived))
    assert received == window  # the rest waits in the stash, bounded by one read
    peer.consumed(splice.stream.stream_id, received)
    link.dataReceived(b"".join(peer.outgoing()))
    assert local.producerState == "producing"
    events = peer.receive_data(transport.value())
    assert sum(len(e.data) for e in events if isinstance(e, ev.DataReceived)) == 1000


def test_paused_link_pauses_every_local_reader():
    """The link transport's backpressure pauses reading on every spliced connection."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    pairs = [open_splice(link) for _ in range(3)]
    link.pauseProducing()
    assert all(local.producerState == "paused" for _, local in pairs)
    link.resumeProducing()
    assert all(local.producerState == "producing" for _, local in pairs)


def test_local_eof_sends_fin_after_stashed_bytes():
    """A local EOF becomes FIN, and only after the bytes the window held back."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    splice, local = open_splice(link)
    peer.receive_data(transport.value())
    transport.clear()
    window = link.mux.send_window(splice.stream.stream_id)
    splice.side.dataReceived(b"c" * (window + 10))
    splice.side.readConnectionLost()
    events = peer.receive_data(transport.value())
    transport.clear()
    assert not any(isinstance(e, ev.StreamEnded) for e in events)
    peer.consumed(splice.stream.stream_id, window)
    link.dataReceived(b"".join(peer.outgoing()))
    events = peer.receive_data(transport.value())
    kinds = [type(e) for e in events]
    assert kinds == [ev.DataReceived, ev.StreamEnded]


def test_malformed_frame_closes_only_that_link():
    """Garbage on an open link sends GOAWAY(PROTOCOL_ERROR) and closes the link."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    link.dataReceived(fr.encode(0x7F, 0, b""))
    frames = frames_of(transport.value())
    assert frames[-1][0] == fr.FrameType.GOAWAY
    assert fr.decode_coded(frames[-1][3])[0] == ErrorCode.PROTOCOL_ERROR
    assert transport.disconnecting


def relay_link(clock, check=lambda token: DEV_GRANT if token == TOKEN else None):
    registry = FakeRegistry()
    factory = AgentLinkFactory(
        clock, registry, check,
        handshake_timeout_seconds=5, keepalive_interval_seconds=10, keepalive_timeout_seconds=30,
    )
    link = factory.buildProtocol(None)
    transport = StringTransport()
    link.makeConnection(transport)
    return link, transport, registry


def test_handshake_deadline_drops_silent_connections():
    """A connection that sends no HELLO within the deadline is aborted."""
    clock = Clock()
    link, transport, registry = relay_link(clock)
    clock.advance(4.9)
    assert not link.closed
    clock.advance(0.2)
    assert link.closed


def test_bad_token_is_refused_and_never_logged():
    """A wrong token gets GOAWAY(AUTH_FAILED); neither token appears in any log event."""
    clock = Clock()
    link, transport, registry = relay_link(clock)
    agent = MuxConnection(Role.AGENT)
    agent.send_hello({"token": "wrong-" + TOKEN})
    with capturedLogs() as events:
        link.dataReceived(b"".join(agent.outgoing()))
    frames = frames_of(transport.value())
    assert frames[-1][0] == fr.FrameType.GOAWAY
    assert fr.decode_coded(frames[-1][3])[0] == ErrorCode.AUTH_FAILED
    assert link.closed and registry.links == set()
    assert events and TOKEN not in repr(events)


def test_good_token_opens_the_link():
    """The right token gets the relay's HELLO and the link joins the registry."""
    clock = Clock()
    link, transport, registry = relay_link(clock)
    agent = MuxConnection(Role.AGENT)
    agent.send_hello({"token": TOKEN})
    with capturedLogs() as events:
        link.dataReceived(b"".join(agent.outgoing()))
    received = agent.receive_data(transport.value())
    assert isinstance(received[0], ev.HelloReceived)
    assert link in registry.links
    assert TOKEN not in repr(events)
    clock.advance(10)  # the handshake deadline was cancelled
    assert not link.closed


@pytest.mark.parametrize("garbage", [b"\x16\x03\x01" + b"\x00" * 100, b"GET / HTTP/1.1\r\n\r\n"])
def test_unauthenticated_garbage_is_dropped(garbage):
    """Bytes that are not a HELLO close an unauthenticated link at once."""
    clock = Clock()
    link, transport, registry = relay_link(clock)
    link.dataReceived(garbage)
    assert link.closed


def test_close_link_unregisters_the_producer_and_cancels_its_deadline():
    """Closing drops our producer (else Twisted's TLS never sends close_notify),
    and a link lost before the deadline is not aborted later."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    assert transport.producer is link
    link.close_link()
    assert transport.producer is None and transport.disconnecting
    assert clock.getDelayedCalls()
    link.connectionLost(None)
    assert not [c for c in clock.getDelayedCalls() if c.active()]


def test_window_update_and_reset_in_one_read_reset_only_that_stream():
    """A WINDOW_UPDATE and a RESET for one stream in the same read drop that
    stream, never the link (events follow the core's view of the whole read)."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    splice, local = open_splice(link)
    other, other_local = open_splice(link)
    peer.receive_data(transport.value())
    transport.clear()
    window = link.mux.send_window(splice.stream.stream_id)
    splice.side.dataReceived(b"d" * (window + 100))  # window used up, 100 bytes stashed
    received = peer.receive_data(transport.value())
    transport.clear()
    peer.consumed(splice.stream.stream_id, sum(len(e.data) for e in received if isinstance(e, ev.DataReceived)))
    peer.reset(splice.stream.stream_id)
    link.dataReceived(b"".join(peer.outgoing()))  # WINDOW_UPDATE, then RESET
    assert not link.closed
    assert local.disconnecting or splice.stream.state is StreamState.CLOSED
    other.side.dataReceived(b"still here")
    events = peer.receive_data(transport.value())
    assert [e.data for e in events if isinstance(e, ev.DataReceived)] == [b"still here"]


def test_resume_rotates_which_stream_goes_first(monkeypatch):
    """Each resume of the link starts with a different stream, so none is starved."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    streams = [open_splice(link)[0].stream for _ in range(3)]
    order = []
    monkeypatch.setattr(MuxStream, "push", lambda s: order.append(s.stream_id))
    for _ in range(3):
        link.pauseProducing()
        link.resumeProducing()
    firsts = [order[i * 3] for i in range(3)]
    assert sorted(firsts) == sorted(s.stream_id for s in streams)


class HalfCloseTransport(StringTransport):
    """A StringTransport that records half-close and close like a TCP transport."""

    def __init__(self):
        super().__init__()
        self.write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


def test_peer_fin_never_closes_before_our_stashed_bytes_and_fin_are_sent():
    """Local data beyond the window, then local EOF, then the peer's FIN before
    its credit: the socket stays open until the stash and our FIN went out."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    local = HalfCloseTransport()
    splice, local = open_splice(link, local)
    stream_id = splice.stream.stream_id
    peer.receive_data(transport.value())
    transport.clear()
    window = link.mux.send_window(stream_id)
    splice.side.dataReceived(b"c" * (window + 10))  # 10 bytes wait in the stash
    splice.side.readConnectionLost()  # local EOF: our FIN waits for the stash
    got = peer.receive_data(transport.value())
    transport.clear()
    assert sum(len(e.data) for e in got if isinstance(e, ev.DataReceived)) == window
    peer.end_stream(stream_id)  # the peer finishes before crediting us
    link.dataReceived(b"".join(peer.outgoing()))
    assert not local.disconnecting  # closing now would reset the stream
    assert local.write_closed  # the peer's FIN became our half-close
    splice.side.writeConnectionLost()
    assert not local.disconnecting
    peer.consumed(stream_id, window)  # credit comes: stash, then FIN, then the close
    link.dataReceived(b"".join(peer.outgoing()))
    got = peer.receive_data(transport.value())
    assert [type(e) for e in got] == [ev.DataReceived, ev.StreamEnded]
    assert got[0].data == b"c" * 10
    assert local.disconnecting


def test_goaway_goes_after_data_corked_in_the_same_turn():
    clock = TurnEndClock()
    link, transport, peer = handshaken_pair(clock)
    splice, local = open_splice(link)
    peer.receive_data(transport.value())
    transport.clear()
    splice.side.dataReceived(b"last words")  # corked until the turn ends
    link.close_link(ErrorCode.INTERNAL_ERROR, "shutting down")
    got = peer.receive_data(transport.value())
    kinds = [type(e) for e in got if type(e) in (ev.DataReceived, ev.GoAwayReceived)]
    assert kinds == [ev.DataReceived, ev.GoAwayReceived]


def test_reset_goes_after_data_corked_in_the_same_turn():
    """A local connection that sends its last bytes and dies in the same turn:
    the peer gets the bytes, then the RESET."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    clock = TurnEndClock()
    link, transport, peer = handshaken_pair(clock)
    splice, local = open_splice(link)
    splice.side.dataReceived(b"last bytes")  # corked until the turn ends
    splice.side.connectionLost(Failure(ConnectionLost()))
    clock.end_turn()
    got = peer.receive_data(transport.value())
    kinds = [type(e) for e in got if type(e) in (ev.DataReceived, ev.StreamReset)]
    assert kinds == [ev.DataReceived, ev.StreamReset]


def test_close_visitors_resets_only_that_tunnels_streams():
    """RelayLink keeps its visitors per tunnel: close_visitors(t) resets t's
    streams and aborts their visitors; stream_count counts per tunnel."""
    from types import SimpleNamespace

    from twisted.internet.address import IPv4Address

    clock = Clock()
    link, transport, registry = relay_link(clock)
    agent = MuxConnection(Role.AGENT)
    agent.send_hello({"token": TOKEN})
    link.dataReceived(b"".join(agent.outgoing()))
    agent.receive_data(transport.value())
    transport.clear()
    tunnels = [SimpleNamespace(tunnel_id=name) for name in ("t1", "t2")]
    endpoint = SimpleNamespace(service="")
    visitors = {}
    for tunnel in tunnels:
        for port in (1, 2):
            local = StringTransport()
            protocol = link.open_visitor_stream(
                tunnel, endpoint, IPv4Address("TCP", "198.51.100.7", port), IPv4Address("TCP", "127.0.0.1", 28000)
            )
            protocol.makeConnection(local)
            visitors.setdefault(tunnel.tunnel_id, []).append(local)
    opened = [e for e in agent.receive_data(transport.value()) if isinstance(e, ev.StreamOpened)]
    transport.clear()
    assert [e.metadata["tunnel"] for e in opened] == ["t1", "t1", "t2", "t2"]
    assert opened[0].metadata["peer"] == ["198.51.100.7", 1]
    assert [link.stream_count(t.tunnel_id) for t in tunnels] == [2, 2]
    link.close_visitors(tunnels[0])
    resets = [e for e in agent.receive_data(transport.value()) if isinstance(e, ev.StreamReset)]
    assert sorted(e.stream_id for e in resets) == sorted(e.stream_id for e in opened[:2])
    assert all(local.disconnecting for local in visitors["t1"])
    assert not any(local.disconnecting for local in visitors["t2"])
    assert [link.stream_count(t.tunnel_id) for t in tunnels] == [0, 2]
