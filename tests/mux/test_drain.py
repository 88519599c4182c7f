"""GOAWAY(DRAINING) in the sans-IO core (docs/protocol.md, "Draining"): the
link stays open for the streams it has, and no side opens another."""

import pytest

from relay.mux import ErrorCode, MuxProtocolError, MuxUsageError
from relay.mux import events as ev
from relay.mux.connection import LinkState
from relay.mux.frames import FrameType
from tests.mux import helpers as h


def _pair_with_stream():
    pair = h.LinkPair()
    stream_id = pair.relay.open_stream({"tunnel": "t1"})
    pair.to_agent()
    pair.agent.accept_stream(stream_id)
    pair.to_relay()
    return pair, stream_id


def test_a_draining_goaway_keeps_the_link_and_its_streams():
    """After GOAWAY(DRAINING) both sides stay open, and DATA, WINDOW_UPDATE and FIN still flow on the streams in progress."""
    pair, stream_id = _pair_with_stream()
    pair.relay.drain("relay draining")
    pair.relay.drain("again")  # said once is enough
    raw = b"".join(pair.relay.outgoing())
    assert raw == h.goaway(ErrorCode.DRAINING, "relay draining")
    assert pair.agent.receive_data(raw) == [ev.GoAwayReceived(ErrorCode.DRAINING, "relay draining")]
    assert pair.agent.state is LinkState.OPEN and pair.agent.draining_remote and pair.agent.draining
    assert pair.agent.send(stream_id, b"body") == 4
    pair.agent.end_stream(stream_id)
    events = pair.to_relay()
    assert events == [ev.DataReceived(stream_id, b"body"), ev.StreamEnded(stream_id)]
    pair.relay.consumed(stream_id, 4)
    pair.relay.end_stream(stream_id)
    pair.to_agent()
    assert pair.agent.streams == {} and pair.relay.streams == {}


def test_no_side_opens_a_stream_on_a_draining_link():
    """open_stream after either side's GOAWAY(DRAINING) is a local usage error, never an OPEN on the wire."""
    pair = h.LinkPair()
    pair.relay.drain()
    with pytest.raises(MuxUsageError):
        pair.relay.open_stream({})
    pair.to_agent()
    other = h.LinkPair()
    other.agent.drain()
    other.to_relay()
    with pytest.raises(MuxUsageError):
        other.relay.open_stream({})  # the peer said it takes no new streams
    assert not other.relay.has_outgoing()


def test_an_open_that_crossed_our_draining_goaway_is_refused():
    """An OPEN sent before the peer saw our GOAWAY(DRAINING) is answered RESET(REFUSED_STREAM), with no event."""
    pair = h.LinkPair()
    stream_id = pair.relay.open_stream({"tunnel": "t1"})  # in flight ...
    pair.agent.drain("agent draining")  # ... while the agent drains
    assert pair.to_agent() == []
    assert b"".join(pair.agent.outgoing()) == (
        h.goaway(ErrorCode.DRAINING, "agent draining") + h.reset(stream_id, ErrorCode.REFUSED_STREAM, "draining")
    )
    assert pair.agent.streams == {}


def test_an_open_after_the_peer_s_draining_goaway_is_a_protocol_error():
    """A peer that said GOAWAY(DRAINING) and then opens a stream broke its word: GOAWAY(PROTOCOL_ERROR)."""
    pair = h.LinkPair()
    with pytest.raises(MuxProtocolError):
        pair.agent.receive_data(h.goaway(ErrorCode.DRAINING) + h.open_frame(2, {}))
    assert h.sent(pair.agent)[-1][0] is FrameType.GOAWAY
    assert pair.agent.state is LinkState.CLOSED


def test_frames_behind_a_draining_goaway_in_one_read_are_decoded():
    """The decoder stops after every GOAWAY; after a DRAINING one the frames of the same read still arrive."""
    pair, stream_id = _pair_with_stream()
    events = pair.agent.receive_data(h.goaway(ErrorCode.DRAINING, "x") + h.data(stream_id, b"hi") + h.fin(stream_id))
    assert events == [
        ev.GoAwayReceived(ErrorCode.DRAINING, "x"), ev.DataReceived(stream_id, b"hi"), ev.StreamEnded(stream_id),
    ]


def test_the_final_goaway_after_draining_closes_the_link():
    """close() after drain() queues the final GOAWAY; the peer's link is then closed."""
    pair = h.LinkPair()
    pair.relay.drain()
    pair.relay.close(ErrorCode.NO_ERROR, "drained")
    events = pair.to_agent()
    assert events == [ev.GoAwayReceived(ErrorCode.DRAINING, ""), ev.GoAwayReceived(ErrorCode.NO_ERROR, "drained")]
    assert pair.agent.state is LinkState.CLOSED and pair.relay.state is LinkState.CLOSED


def test_a_draining_goaway_before_the_link_is_open_ends_it():
    """A relay that drains refuses a login with GOAWAY(DRAINING): before the link is open it is a final GOAWAY."""
    pair = h.LinkPair(handshake=False)
    pair.agent.send_hello({"token": h.TOKEN})
    pair.to_relay()
    events = pair.agent.receive_data(h.goaway(ErrorCode.DRAINING, "relay draining"))
    assert events == [ev.GoAwayReceived(ErrorCode.DRAINING, "relay draining")]
    assert pair.agent.state is LinkState.CLOSED
