"""Version 2 of the mux core: ACCEPT answers OPEN, opens in flight are
counted, and frames that do nothing end the link past a bound."""

import pytest

from relay.mux import ErrorCode, MuxConnection, MuxProtocolError, MuxUsageError, Role
from relay.mux import events as ev
from relay.mux.errors import CalmDownError
from relay.mux.frames import FrameType
from tests.mux import helpers as h
from tests.mux.helpers import LinkPair
from tests.mux.test_frames import VECTORS

VECTOR = {v["name"]: v for v in VECTORS}


def opened_pair():
    pair = LinkPair()
    stream_id = pair.relay.open_stream({"tunnel": "t"})
    [opened] = pair.to_agent()
    assert isinstance(opened, ev.StreamOpened)
    return pair, stream_id


def test_accept_reaches_the_opener_and_ends_the_open_in_flight():
    """The receiver's ACCEPT becomes StreamAccepted at the opener, whose opens in flight go back down."""
    pair, stream_id = opened_pair()
    assert pair.relay.opens_in_flight == 1 and not pair.relay.is_accepted(stream_id)
    pair.agent.accept_stream(stream_id)
    sent = b"".join(pair.agent.outgoing())
    assert sent == h.frame(FrameType.ACCEPT, stream_id)
    assert pair.relay.receive_data(sent) == [ev.StreamAccepted(stream_id)]
    assert pair.relay.opens_in_flight == 0 and pair.relay.is_accepted(stream_id)


def test_accept_vector_is_what_the_core_sends():
    """accept_stream(2) is byte for byte the spec's accept-stream-2 vector."""
    pair, stream_id = opened_pair()
    assert stream_id == 2
    pair.agent.accept_stream(2)
    assert b"".join(pair.agent.outgoing()) == VECTOR["accept-stream-2"]["bytes"]


def test_a_reset_before_accept_also_ends_the_open_in_flight():
    """An open the peer refuses (RESET) or that we cancel no longer counts as in flight."""
    pair, first = opened_pair()
    second = pair.relay.open_stream({})
    pair.to_agent()
    assert pair.relay.opens_in_flight == 2
    pair.agent.reset(first, ErrorCode.CONNECT_FAILED)
    pair.to_relay()
    pair.relay.reset(second)
    assert pair.relay.opens_in_flight == 0


@pytest.mark.parametrize(
    "raw, why",
    [
        (lambda sid: h.frame(FrameType.ACCEPT, sid, b"x"), "payload"),
        (lambda sid: h.frame(FrameType.ACCEPT, sid) * 2, "twice"),
        (lambda sid: h.frame(FrameType.ACCEPT, 0), "stream 0"),
        (lambda sid: h.frame(FrameType.ACCEPT, 99), "never opened"),
    ],
)
def test_bad_accepts_are_protocol_errors(raw, why):
    """ACCEPT with a payload, twice, on stream 0 or for a stream never opened closes the link."""
    pair, stream_id = opened_pair()
    with pytest.raises(MuxProtocolError):
        pair.relay.receive_data(raw(stream_id))


def test_accept_for_the_receiver_s_own_stream_is_a_protocol_error():
    """Only the peer of the opener may ACCEPT: the agent cannot be sent ACCEPT for the relay's stream."""
    pair, stream_id = opened_pair()
    with pytest.raises(MuxProtocolError):
        pair.agent.receive_data(h.frame(FrameType.ACCEPT, stream_id))


def test_accept_after_our_reset_is_ignored():
    """An ACCEPT that crossed our RESET is dropped, not an error."""
    pair, stream_id = opened_pair()
    pair.relay.reset(stream_id)
    assert pair.relay.receive_data(h.frame(FrameType.ACCEPT, stream_id)) == []


def test_accept_stream_misuse_is_a_local_error():
    """Accepting our own stream, or twice, is our bug; accepting a gone stream is a no-op."""
    pair, stream_id = opened_pair()
    with pytest.raises(MuxUsageError):
        pair.relay.accept_stream(stream_id)
    pair.agent.accept_stream(stream_id)
    with pytest.raises(MuxUsageError):
        pair.agent.accept_stream(stream_id)
    pair.agent.reset(stream_id)
    pair.agent.accept_stream(stream_id)  # gone: nothing queued, no error


def test_a_flood_of_empty_data_frames_ends_in_enhance_your_calm():
    """Past MAX_USELESS_FRAMES empty DATA frames the link closes with GOAWAY(ENHANCE_YOUR_CALM)."""
    pair = LinkPair(relay_kwargs={"max_useless_frames": 100})
    stream_id = pair.relay.open_stream({})
    pair.to_agent()
    empty = h.frame(FrameType.DATA, stream_id)
    pair.relay.receive_data(empty * 100)
    with pytest.raises(CalmDownError):
        pair.relay.receive_data(empty)
    assert h.parse(b"".join(pair.relay.outgoing()))[-1][0] is FrameType.GOAWAY
    assert pair.relay.goaway is None and pair.relay.state.value == "closed"


def test_useful_data_pays_back_for_useless_frames():
    """Every DATA frame with bytes lowers the count, so a long healthy link with races never reaches the bound."""
    pair = LinkPair(relay_kwargs={"max_useless_frames": 10})
    stream_id = pair.relay.open_stream({})
    pair.to_agent()
    for _ in range(50):
        pair.relay.receive_data(h.frame(FrameType.DATA, stream_id) * 5 + h.data(stream_id, b"x") * 5)
        pair.relay.consumed(stream_id, 5)
    assert pair.relay.useless_frames <= 10


def test_frames_for_gone_streams_count_as_useless_beyond_the_race_each_stream_may_leave():
    """DATA, WINDOW_UPDATE, FIN, RESET and ACCEPT for a gone stream are free up to RACE_FRAMES_PER_STREAM per ended stream, then count."""
    from relay.mux.connection import RACE_FRAMES_PER_STREAM

    pair = LinkPair(relay_kwargs={"max_useless_frames": 3})
    stream_id = pair.relay.open_stream({})
    pair.to_agent()
    pair.relay.reset(stream_id)
    race = h.data(stream_id, b"x") + h.window_update(stream_id, 1) + h.fin(stream_id) + h.frame(FrameType.ACCEPT, stream_id)
    assert RACE_FRAMES_PER_STREAM == 4
    pair.relay.receive_data(race)
    assert pair.relay.useless_frames == 0
    pair.relay.receive_data(h.window_update(stream_id, 1) * 3)
    assert pair.relay.useless_frames == 3
    with pytest.raises(CalmDownError):
        pair.relay.receive_data(h.reset(stream_id, ErrorCode.CANCEL))


def test_many_short_visitors_whose_accept_crossed_our_reset_never_end_the_link():
    """20,000 streams each reset by us while the peer's ACCEPT was on its way (health checks) leave the link open."""
    pair = LinkPair()
    for _ in range(20_000):
        stream_id = pair.relay.open_stream({})
        pair.to_agent()
        pair.relay.reset(stream_id)  # the visitor left
        pair.agent.accept_stream(stream_id)  # crossed the RESET
        pair.to_relay()
        pair.to_agent()
    assert pair.relay.state.value == "open" and pair.relay.useless_frames == 0


def test_a_version_1_agent_gets_the_spec_s_refusal():
    """A version 1 HELLO is answered with exactly the goaway-unsupported-version vector."""
    relay = MuxConnection(Role.RELAY)
    with pytest.raises(MuxProtocolError) as info:
        relay.receive_data(VECTOR["hello-agent-v1"]["bytes"])
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert b"".join(relay.outgoing()) == VECTOR["goaway-unsupported-version"]["bytes"]
