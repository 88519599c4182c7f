"""MuxStream (relay/wire/stream.py) and Splice (relay/wire/splice.py) without
sockets: a MuxLink on a StringTransport, the peer's sans-IO core, a fake clock."""

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol, IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relay.mux import ErrorCode, MuxConnection, Role
from relay.mux import events as ev
from relay.wire.link import MuxLink
from relay.wire.metrics import Counters
from relay.wire.splice import Splice
from relay.wire.stream import (
    _TRANSITIONS,
    CLOSE_DEADLINE_SECONDS,
    MuxStream,
    StreamInput,
    StreamState,
    StreamStateError,
)
from relay.wire.tlslayer import TLSLayer
from tests.relay.test_tlslayer import MemoryClient, client_context, pki, server_context  # noqa: F401

METADATA = {"tunnel": "t1", "service": "", "peer": ["203.0.113.5", 4242], "local": ["::1", 28000]}


class Pair:
    """A relay-role MuxLink on a StringTransport, and the agent's core as its peer."""

    def __init__(self, metrics=None):
        self.clock = Clock()
        kwargs = {"metrics": metrics} if metrics is not None else {}
        self.link = MuxLink(MuxConnection(Role.RELAY), self.clock, **kwargs)
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.peer = MuxConnection(Role.AGENT)
        self.peer.send_hello({"token": "x"})
        self.link.mux.receive_data(b"".join(self.peer.outgoing()))
        self.link.mux.send_hello({})
        self.link.flush()
        self.to_peer()

    def open(self, protocol, metadata=METADATA) -> MuxStream:
        stream = self.link.open_stream(dict(metadata), protocol)
        self.to_peer()
        return stream

    def to_peer(self) -> list:
        """The peer reads what the link wrote; its events."""
        events = self.peer.receive_data(self.transport.value())
        self.transport.clear()
        return events

    def to_link(self) -> None:
        self.link.dataReceived(b"".join(self.peer.outgoing()))


def data_of(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ev.DataReceived))


def kinds(events) -> list:
    return [type(e) for e in events]


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """A protocol above the stream that records what it is told."""

    def __init__(self):
        self.received = b""
        self.events = []

    def connectionMade(self):
        self.events.append("connected")

    def dataReceived(self, data):
        self.received += data

    def readConnectionLost(self):
        self.events.append("read-lost")

    def writeConnectionLost(self):
        self.events.append("write-lost")

    def connectionLost(self, reason):
        self.events.append(("lost", reason.type))


class PlainRecorder(Protocol):
    """A protocol that cannot half-close."""

    def __init__(self):
        self.events = []

    def connectionLost(self, reason):
        self.events.append(("lost", reason.type))


@implementer(IPushProducer)
class FakeProducer:
    def __init__(self):
        self.state = "producing"

    def pauseProducing(self):
        self.state = "paused"

    def resumeProducing(self):
        self.state = "producing"

    def stopProducing(self):
        self.state = "stopped"


def test_stream_provides_the_transport_interfaces():
    """A MuxStream is an ITransport, an IConsumer and an IPushProducer."""
    pair = Pair()
    stream = pair.open(Recorder())
    for interface in (ITransport, IConsumer, IPushProducer):
        assert verifyObject(interface, stream)


def test_peer_fin_then_ours_half_close_both_ways():
    """The peer's FIN is readConnectionLost above; we can still write; our
    loseWriteConnection sends FIN, then writeConnectionLost, then the close."""
    pair = Pair()
    protocol = Recorder()
    stream = pair.open(protocol)
    pair.peer.send(stream.stream_id, b"question")
    pair.peer.end_stream(stream.stream_id)
    pair.to_link()
    assert protocol.received == b"question"
    assert protocol.events == ["connected", "read-lost"]
    assert stream.state is StreamState.READ_CLOSED
    stream.write(b"answer")
    stream.loseWriteConnection()
    got = pair.to_peer()
    assert data_of(got) == b"answer" and kinds(got)[-1] is ev.StreamEnded
    assert protocol.events == ["connected", "read-lost", "write-lost", ("lost", ConnectionDone)]
    assert stream.state is StreamState.CLOSED
    assert pair.link.streams == {} and pair.link.streams_by_tunnel == {}


def test_our_fin_then_peer_fin_half_close_both_ways():
    """After our FIN the peer's bytes still arrive, our writes are dropped, and
    the peer's FIN ends the stream."""
    pair = Pair()
    protocol = Recorder()
    stream = pair.open(protocol)
    stream.loseWriteConnection()
    assert kinds(pair.to_peer()) == [ev.StreamEnded]
    assert protocol.events == ["connected", "write-lost"]
    stream.write(b"too late")
    assert pair.to_peer() == []
    pair.peer.send(stream.stream_id, b"reply")
    pair.peer.end_stream(stream.stream_id)
    pair.to_link()
    assert protocol.received == b"reply"
    assert protocol.events == ["connected", "write-lost", "read-lost", ("lost", ConnectionDone)]


def test_fin_waits_for_the_bytes_the_window_kept():
    """loseWriteConnection with bytes beyond the window: FIN goes after them,
    and writeConnectionLost only when it does."""
    pair = Pair()
    protocol = Recorder()
    stream = pair.open(protocol)
    window = pair.link.mux.send_window(stream.stream_id)
    stream.write(b"k" * (window + 10))
    stream.loseWriteConnection()
    got = pair.to_peer()
    assert len(data_of(got)) == window and ev.StreamEnded not in kinds(got)
    assert "write-lost" not in protocol.events
    pair.peer.consumed(stream.stream_id, window)
    pair.to_link()
    got = pair.to_peer()
    assert data_of(got) == b"k" * 10 and kinds(got)[-1] is ev.StreamEnded
    assert protocol.events[-1] == "write-lost"


def test_abort_sends_reset_and_ends_the_protocol():
    """abortConnection sends RESET(CANCEL), drops kept bytes, and the protocol
    above gets connectionLost(ConnectionAborted)."""
    pair = Pair()
    protocol = Recorder()
    stream = pair.open(protocol)
    window = pair.link.mux.send_window(stream.stream_id)
    stream.write(b"z" * (window + 10))
    pair.to_peer()
    stream.abortConnection()
    got = pair.to_peer()
    assert kinds(got) == [ev.StreamReset] and got[0].code == ErrorCode.CANCEL
    assert protocol.events == ["connected", ("lost", ConnectionAborted)]
    assert stream.state is StreamState.CLOSED and pair.link.streams == {}
    stream.abortConnection()  # a second abort is a no-op
    assert pair.to_peer() == []


def test_peer_reset_ends_the_protocol():
    """The peer's RESET is connectionLost(ConnectionLost) above."""
    pair = Pair()
    protocol = Recorder()
    stream = pair.open(protocol)
    pair.peer.reset(stream.stream_id, ErrorCode.CONNECT_FAILED, "service unreachable")
    pair.to_link()
    assert protocol.events == ["connected", ("lost", ConnectionLost)]
    assert stream.state is StreamState.CLOSED


def test_credit_is_withheld_while_paused_and_returned_on_resume():
    """DATA is delivered at once; while the protocol above has paused us its
    credit waits, and resumeProducing sends it."""
    pair = Pair()
    protocol = Recorder()
    stream = pair.open(protocol)
    stream.pauseProducing()
    pair.peer.send(stream.stream_id, b"a" * 200_000)
    pair.to_link()
    assert len(protocol.received) == 200_000
    assert ev.WindowOpened not in kinds(pair.to_peer())
    assert pair.peer.send_window(stream.stream_id) < 100_000
    stream.resumeProducing()
    pair.to_peer()
    assert pair.peer.send_window(stream.stream_id) >= 256 * 1024


def test_write_beyond_the_window_keeps_the_rest_and_pauses_the_producer():
    """Bytes past the send window wait in the stream with the producer above
    paused; credit sends them and resumes it."""
    pair = Pair()
    stream = pair.open(Recorder())
    producer = FakeProducer()
    stream.registerProducer(producer, True)
    window = pair.link.mux.send_window(stream.stream_id)
    stream.write(b"b" * (window + 1000))
    assert producer.state == "paused"
    assert len(data_of(pair.to_peer())) == window
    pair.peer.consumed(stream.stream_id, window)
    pair.to_link()
    assert producer.state == "producing"
    assert data_of(pair.to_peer()) == b"b" * 1000
    assert stream.bytes_out == window + 1000


def test_a_full_link_pauses_producers_and_resume_visits_only_those():
    """The link transport's pause reaches every stream's producer; a resume
    visits only the streams that paused one."""
    pair = Pair()
    streams = [pair.open(Recorder()) for _ in range(3)]
    producers = [FakeProducer() for _ in streams]
    for stream, producer in zip(streams[:2], producers):
        stream.registerProducer(producer, True)
    pair.link.pauseProducing()
    assert [p.state for p in producers[:2]] == ["paused", "paused"]
    assert set(pair.link._blocked) == set(streams[:2])
    pair.link.resumeProducing()
    assert [p.state for p in producers[:2]] == ["producing", "producing"]
    assert pair.link._blocked == {}


def test_get_peer_and_get_host_come_from_the_open_metadata():
    """getPeer is the visitor's address and getHost the public one, from OPEN."""
    pair = Pair()
    stream = pair.open(Recorder())
    assert stream.getPeer() == IPv4Address("TCP", "203.0.113.5", 4242)
    assert stream.getHost() == IPv6Address("TCP", "::1", 28000)
    bare = pair.open(Recorder(), {"tunnel": "t1"})
    assert bare.getPeer() == IPv4Address("TCP", "", 0)


@pytest.mark.parametrize("state", list(StreamState))
@pytest.mark.parametrize("stream_input", list(StreamInput))
def test_every_state_and_input_moves_or_raises_a_typed_error(state, stream_input):
    """The table gives each (state, input) a next state, or StreamStateError naming both."""
    pair = Pair()
    stream = pair.open(Recorder())
    stream.state = state
    if (state, stream_input) in _TRANSITIONS:
        assert stream._move(stream_input) is _TRANSITIONS[(state, stream_input)]
    else:
        with pytest.raises(StreamStateError) as info:
            stream._move(stream_input)
        assert state.value in str(info.value) and stream_input.value in str(info.value)


def test_lose_connection_drops_and_credits_until_the_peer_fin():
    """loseConnection: FIN now; the peer's later bytes are credited, not
    delivered; its FIN closes the stream."""
    pair = Pair()
    protocol = Recorder()
    stream = pair.open(protocol)
    stream.loseConnection()
    assert kinds(pair.to_peer()) == [ev.StreamEnded]
    pair.peer.send(stream.stream_id, b"x" * 200_000)
    pair.to_link()
    assert protocol.received == b""
    pair.to_peer()
    assert pair.peer.send_window(stream.stream_id) > 200_000  # 62,144 without the credit
    pair.peer.end_stream(stream.stream_id)
    pair.to_link()
    assert protocol.events == ["connected", ("lost", ConnectionDone)]


def test_lose_connection_resets_a_peer_that_never_sends_fin():
    """A peer that sends no FIN within the deadline after our close gets a RESET."""
    pair = Pair()
    protocol = Recorder()
    stream = pair.open(protocol)
    stream.loseConnection()
    pair.to_peer()
    pair.clock.advance(CLOSE_DEADLINE_SECONDS)
    assert kinds(pair.to_peer()) == [ev.StreamReset]
    assert protocol.events[-1] == ("lost", ConnectionAborted)


def test_a_protocol_that_cannot_half_close_is_closed_by_the_peer_fin():
    """Without IHalfCloseableProtocol, the peer's FIN closes the stream, as TCP does."""
    pair = Pair()
    protocol = PlainRecorder()
    stream = pair.open(protocol)
    pair.peer.end_stream(stream.stream_id)
    pair.to_link()
    assert kinds(pair.to_peer()) == [ev.StreamEnded]
    assert protocol.events == [("lost", ConnectionDone)]


def test_stream_reports_its_bytes_when_it_ends():
    """A stream reported open reports stream_closed with its byte counts."""
    metrics = Counters()
    metrics.tunnel_opened("t1", "tcp")
    pair = Pair(metrics=metrics)
    stream = pair.open(Recorder())
    stream.report_opened()
    assert metrics.streams_active == 1
    pair.peer.send(stream.stream_id, b"12345")
    pair.to_link()
    stream.write(b"abc")
    stream.abortConnection()
    assert metrics.streams_active == 0
    assert (metrics.bytes_in, metrics.bytes_out) == (5, 3)
    assert metrics.tunnel("t1")["bytes_in"] == 5
    assert stream.opened_at == pair.clock.seconds()


# -- a splice whose stream comes first (the agent's path) ---------------------------


def test_splice_holds_uncredited_data_until_the_other_side_connects():
    """DATA arriving before the service connection waits in the splice,
    uncredited; the join writes the preamble, then the bytes, then credits."""
    pair = Pair()
    splice = Splice()
    splice.a.preamble = b"PROXY TCP4 ...\r\n"
    stream = pair.open(splice.b)  # the stream side first: the service is still connecting
    pair.peer.send(stream.stream_id, b"a" * 200_000)
    pair.to_link()
    pair.to_peer()
    assert pair.peer.send_window(stream.stream_id) < 100_000
    service = StringTransport()
    splice.a.makeConnection(service)
    assert service.value() == b"PROXY TCP4 ...\r\n" + b"a" * 200_000
    assert service.producer is splice.b and stream._producer is splice.a
    pair.to_peer()
    assert pair.peer.send_window(stream.stream_id) >= 256 * 1024


def test_splice_passes_an_early_fin_on_at_the_join():
    """A FIN that came before the service connection half-closes it once connected."""
    pair = Pair()
    splice = Splice()
    stream = pair.open(splice.b)
    pair.peer.send(stream.stream_id, b"request")
    pair.peer.end_stream(stream.stream_id)
    pair.to_link()
    service = StringTransport()
    service.loseWriteConnection = lambda: setattr(service, "write_closed", True)
    splice.a.makeConnection(service)
    assert service.value() == b"request" and service.write_closed
    assert service.producer is None  # the stream produces nothing after its FIN


def test_splice_aborts_a_late_side_whose_stream_was_reset():
    """A stream reset while the service connects: the connection is aborted on arrival."""
    pair = Pair()
    splice = Splice()
    stream = pair.open(splice.b)
    pair.peer.reset(stream.stream_id, ErrorCode.CANCEL)
    pair.to_link()
    service = StringTransport()
    splice.a.makeConnection(service)
    assert service.disconnecting


# -- TLSLayer on a stream (the agent terminating passthrough TLS) -------------------


class TLSOverStream:
    """A TLSLayer on a MuxStream; the visitor's TLS client at the peer core's end."""

    def __init__(self, pki):
        self.pair = Pair()
        self.inner = Recorder()
        self.layer = TLSLayer(server_context(pki), self.inner, self.pair.clock)
        self.stream = self.pair.open(self.layer)
        self.client = MemoryClient(client_context(pki))
        self.peer_events = []

    def pump(self) -> None:
        pair, sid = self.pair, self.stream.stream_id
        for _ in range(20):
            self.client.step_handshake()
            moved = False
            data = self.client.take_outgoing()
            if data:
                pair.peer.send(sid, data)
                pair.to_link()
                moved = True
            events = pair.to_peer()
            self.peer_events += events
            received = data_of(events)
            if received:
                self.client.incoming.write(received)
                pair.peer.consumed(sid, len(received))
                moved = True
            if not moved:
                return
        raise AssertionError("the session never went quiet")


def test_tls_layer_over_a_stream_round_trips_and_half_closes(pki):
    """TLSLayer runs on a MuxStream: bytes pass both ways, and its
    loseWriteConnection is close_notify then a mux FIN, while the visitor can
    still send; the visitor's close_notify and FIN end the stream."""
    session = TLSOverStream(pki)
    session.pump()
    assert session.client.handshake_done and session.inner.events == ["connected"]
    session.client.sslobj.write(b"hello from the visitor")
    session.pump()
    assert session.inner.received == b"hello from the visitor"
    session.inner.transport.write(b"hello from the service")
    session.pump()
    assert session.client.read_all() == b"hello from the service"

    session.peer_events = []
    session.inner.transport.loseWriteConnection()
    session.pump()
    assert kinds(session.peer_events)[-1] is ev.StreamEnded  # FIN after the close_notify record
    assert ev.DataReceived in kinds(session.peer_events)
    assert session.client.read_all() == b"" and session.client.eof
    assert session.inner.events == ["connected", "write-lost"]
    assert session.stream.state is StreamState.WRITE_CLOSED

    session.client.sslobj.write(b"one more thing")
    session.pump()
    assert session.inner.received.endswith(b"one more thing")
    session.client.close_notify()
    session.pump()
    session.pair.peer.end_stream(session.stream.stream_id)
    session.pair.to_link()
    assert session.inner.events == ["connected", "write-lost", "read-lost", ("lost", ConnectionDone)]
    assert session.stream.state is StreamState.CLOSED
