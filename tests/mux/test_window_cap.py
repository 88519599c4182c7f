"""The link's cap on the initial windows of the streams it opens
(docs/protocol.md "Flow control", "The link's window cap"; relay/mux/window.py WindowPool).

The relay opens every visitor stream, so these tests open streams on the
relay side and have the agent send on them: the relay is the receiver whose
buffering the cap bounds.
"""

import hashlib
import json

import pytest

from relay.mux import ErrorCode, FlowControlError, FrameType, LinkBufferFullError, MuxProtocolError, MuxUsageError
from relay.mux import events as ev
from relay.mux.connection import OPEN_WINDOW_KEY
from relay.mux.window import MIN_STREAM_WINDOW, WindowPool
from tests.mux import helpers as h
from tests.mux.helpers import LinkPair

KiB = 1024
MiB = 1024 * KiB
INITIAL = 256 * KiB
CAP = 2 * MiB


def capped(cap: int = CAP) -> LinkPair:
    return LinkPair(relay_kwargs={"window_cap": cap})


def open_streams(pair: LinkPair, count: int) -> list[int]:
    sids = [pair.relay.open_stream({"tunnel": "t"}) for _ in range(count)]
    pair.exchange()
    return sids


def open_windows(pair: LinkPair) -> list[int]:
    """The window each OPEN the relay queued announces (None: the HELLO's)."""
    return [
        json.loads(payload).get(OPEN_WINDOW_KEY)
        for frame_type, _flags, _sid, payload in h.sent(pair.relay)
        if frame_type == FrameType.OPEN
    ]


def test_new_stream_windows_halve_as_the_granted_total_nears_the_cap_down_to_the_floor():
    """Streams get the full initial window while under 1/8 of the cap is granted, then half of it
    per further 1/32, never below the floor; the granted total never passes the cap."""
    pool = WindowPool(64 * MiB)
    windows = []
    while (window := pool.take(INITIAL)) != 0:
        windows.append(window)
    assert windows[:32] == [INITIAL] * 32
    assert windows[32:48] == [INITIAL // 2] * 16
    assert windows[48:80] == [INITIAL // 4] * 32
    assert min(windows) == MIN_STREAM_WINDOW == 4 * KiB
    assert windows == sorted(windows, reverse=True)  # only ever shrinking as it fills
    assert sum(windows) == pool.granted == 64 * MiB
    assert len(windows) == 12_304  # 10,000 idle visitors (the benchmark) fit on one link


def test_a_shrunk_window_is_announced_in_open_and_the_peer_sends_no_more():
    """Past the full-window share the OPEN carries the stream's window; the peer's send window
    starts there, and the application never sees the field."""
    pair = capped()
    sids = [pair.relay.open_stream({"tunnel": "t"}) for _ in range(4)]
    announced = open_windows(pair)
    assert announced[0] is None  # the HELLO's initial window: no field
    assert announced[1:] == [128 * KiB, 32 * KiB, 32 * KiB]
    assert [pair.relay.streams[sid].recv.remaining for sid in sids] == [INITIAL, 128 * KiB, 32 * KiB, 32 * KiB]

    pair = capped()
    sids = open_streams(pair, 4)
    assert [pair.agent.send_window(sid) for sid in sids] == [INITIAL, 128 * KiB, 32 * KiB, 32 * KiB]
    assert pair.agent.send(sids[3], b"x" * MiB) == 32 * KiB


def test_the_application_sees_the_metadata_without_the_window():
    """StreamOpened carries the opener's metadata only."""
    pair = capped()
    pair.relay.open_stream({"tunnel": "t"})
    sid = pair.relay.open_stream({"tunnel": "t"})
    events = pair.exchange().agent
    assert events[-1] == ev.StreamOpened(sid, {"tunnel": "t"})


def test_past_the_cap_new_streams_are_refused_and_released_streams_give_the_room_back():
    """When the floor no longer fits, next_stream_window() is 0 and open_stream raises a local
    error (nothing queued); a stream that ends returns its window to the pool."""
    pair = capped()
    sids = []
    while pair.relay.next_stream_window():
        sids.append(pair.relay.open_stream({}))
    pair.exchange()
    assert pair.relay.window_pool.granted <= CAP
    assert CAP - pair.relay.window_pool.granted < MIN_STREAM_WINDOW
    with pytest.raises(LinkBufferFullError):
        pair.relay.open_stream({})
    assert not pair.relay.has_outgoing()
    assert isinstance(LinkBufferFullError("x"), MuxUsageError)  # local, never on the wire
    # A reset by us, a reset by the peer, and both FINs each give the room back.
    first, second, third = sids[0], sids[1], sids[2]
    granted = pair.relay.window_pool.granted
    pair.relay.reset(first)
    pair.agent.reset(second, ErrorCode.CANCEL)
    pair.relay.end_stream(third)
    pair.agent.end_stream(third)
    pair.exchange()
    assert pair.relay.window_pool.granted == granted - INITIAL - 128 * KiB - 32 * KiB
    assert pair.relay.next_stream_window() > 0
    for sid in sids[3:]:
        pair.relay.reset(sid)
    pair.exchange()
    assert pair.relay.window_pool.granted == 0
    assert pair.relay.next_stream_window() == INITIAL  # the next one starts full again


def test_the_receiver_enforces_the_window_it_announced():
    """DATA past a shrunk window is a FLOW_CONTROL_ERROR, as past the HELLO's window."""
    pair = capped()
    open_streams(pair, 2)
    sid = pair.relay.open_stream({})
    pair.exchange()
    window = pair.relay.streams[sid].recv.remaining
    assert window == 32 * KiB
    pair.relay.receive_data(h.data(sid, b"x" * window))
    with pytest.raises(FlowControlError):
        pair.relay.receive_data(h.data(sid, b"y"))
    frames = h.sent(pair.relay)
    assert frames[-1][0] == FrameType.GOAWAY
    assert int.from_bytes(frames[-1][3][:4], "big") == ErrorCode.FLOW_CONTROL_ERROR


def test_a_stream_with_a_shrunk_window_still_transfers_byte_exact():
    """A stream opened at the floor carries 3 MiB whole and in order: credit keeps coming as the
    receiver consumes, and the window grows from the link's growth budget."""
    pair = capped()
    open_streams(pair, 16)
    (sid,) = open_streams(pair, 1)
    assert pair.agent.send_window(sid) == MIN_STREAM_WINDOW
    payload = bytes(range(256)) * (3 * MiB // 256)
    sent = 0
    received = bytearray()
    for _ in range(10_000):  # bounded: one round trip per turn
        if len(received) == len(payload):
            break
        sent += pair.agent.send(sid, payload[sent:])
        for event in pair.to_relay():
            assert isinstance(event, ev.DataReceived)
            received += event.data
            pair.relay.consumed(sid, len(event.data))
        pair.to_agent()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert pair.relay.streams[sid].recv.target > MIN_STREAM_WINDOW  # it grew


def test_a_stalled_floor_stream_does_not_block_its_neighbours():
    """A stream at the floor whose consumer never reads holds its 4 KiB; the stream beside it
    keeps flowing."""
    pair = capped()
    open_streams(pair, 16)
    stalled, busy = open_streams(pair, 2)
    assert pair.agent.send(stalled, b"s" * MiB) == MIN_STREAM_WINDOW
    got = 0
    for _ in range(200):
        pair.agent.send(busy, b"b" * (64 * KiB))
        for event in pair.to_relay():
            if event.stream_id == busy:
                got += len(event.data)
                pair.relay.consumed(busy, len(event.data))
        pair.to_agent()
    assert got >= 64 * KiB * 100
    assert pair.relay.streams[stalled].recv.pending == MIN_STREAM_WINDOW


@pytest.mark.parametrize("window", [0, 1023, 2**31, -5, 4096.0, "4096", True, None, [4096]])
def test_a_bad_window_in_open_is_a_protocol_error(window):
    """OPEN's window must be an integer in 1024..2^31-1, as HELLO's initial_window."""
    pair = LinkPair()
    with pytest.raises(MuxProtocolError) as caught:
        pair.agent.receive_data(h.open_frame(2, {"tunnel": "t", OPEN_WINDOW_KEY: window}))
    assert caught.value.code == ErrorCode.PROTOCOL_ERROR


def test_the_relay_honours_the_window_of_a_stream_the_agent_opens():
    """Either side may open with a smaller window: the agent's OPEN, the relay's send window."""
    pair = LinkPair(agent_kwargs={"window_cap": CAP})
    open_agent = [pair.agent.open_stream({}) for _ in range(3)]
    pair.exchange()
    assert [pair.relay.send_window(sid) for sid in open_agent] == [INITIAL, 128 * KiB, 32 * KiB]
    assert pair.relay.send(open_agent[2], b"z" * MiB) == 32 * KiB


def test_open_metadata_may_not_carry_the_window_key():
    """The window key is the protocol's: an application that puts it in metadata is a local error."""
    pair = LinkPair()
    with pytest.raises(MuxUsageError):
        pair.relay.open_stream({OPEN_WINDOW_KEY: 1})


def test_a_cap_below_the_floor_is_a_usage_error():
    with pytest.raises(MuxUsageError):
        LinkPair(relay_kwargs={"window_cap": 1024, "min_window": 4096})


def test_open_with_a_window_is_the_spec_vector():
    """With 7/32 of its pool granted, the relay's next OPEN is byte for byte the spec's
    open-stream-10-window vector, and the agent starts that stream's send window at 16384."""
    from tests.mux.test_frames import VECTORS

    vector = {v["name"]: v for v in VECTORS}["open-stream-10-window"]
    pair = capped()
    open_streams(pair, 4)
    assert pair.relay.window_pool.granted * 32 == 7 * CAP
    sid = pair.relay.open_stream({"tunnel": "t1", "peer": ["203.0.113.7", 51234]})
    assert sid == 10
    raw = b"".join(pair.relay.outgoing())
    assert raw == vector["bytes"]
    assert pair.agent.receive_data(raw) == [ev.StreamOpened(10, {"tunnel": "t1", "peer": ["203.0.113.7", 51234]})]
    assert pair.agent.send_window(10) == 16384
