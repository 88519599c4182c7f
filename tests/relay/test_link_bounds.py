"""Bounds of the link adapter (relay/wire/link.py) against a peer that does
not read: replies it makes us owe, a transport that never drains, and any
exception its frames cause."""

from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from relay.mux import ErrorCode
from relay.mux import events as ev
from relay.wire.link import DEFAULT_WRITE_STALL_SECONDS, MAX_OWED_CONTROL_BYTES
from tests.mux import helpers as h
from tests.relay.test_link import frames_of, handshaken_pair


def test_pings_while_our_transport_is_full_stop_us_reading_the_peer():
    """While the link transport is full, past MAX_OWED_CONTROL_BYTES of replies owed we stop reading; a drain resumes."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    link.pauseProducing()  # the transport's buffer is full: the peer does not read
    pings = h.ping() * 100
    for _ in range(MAX_OWED_CONTROL_BYTES // (18 * 100) + 2):  # a PONG is 18 bytes
        link.dataReceived(pings)
    assert link.reading_paused and transport.producerState == "paused"
    link.resumeProducing()  # drained
    assert not link.reading_paused and transport.producerState == "producing"


def test_replies_owed_below_the_cap_do_not_pause_reading():
    """A few PINGs while the transport is briefly full are answered without pausing reading."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    link.pauseProducing()
    link.dataReceived(h.ping() * 10)
    assert not link.reading_paused and transport.producerState == "producing"


def test_a_transport_that_never_drains_is_aborted_at_the_write_stall_deadline():
    """A link whose transport stays full for write_stall_seconds is aborted, however often the peer pings."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    link.pauseProducing()
    for _ in range(int(DEFAULT_WRITE_STALL_SECONDS) - 1):
        clock.advance(1)
        link.dataReceived(h.ping())  # liveness, but it never reads
    assert not link.closed
    with capturedLogs() as logs:
        clock.advance(1.5)
    assert link.closed and transport.disconnecting
    assert [e for e in logs if "stopped reading" in e.get("log_format", "")]


def test_a_drain_before_the_deadline_keeps_the_link():
    """A transport that drains in time cancels the write-stall deadline."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)
    link.pauseProducing()
    for _ in range(int(DEFAULT_WRITE_STALL_SECONDS) - 1):
        clock.advance(1)
        link.dataReceived(h.ping())
    link.resumeProducing()
    for _ in range(int(DEFAULT_WRITE_STALL_SECONDS) * 2):
        clock.advance(1)
        link.dataReceived(h.ping())  # a live peer (keepalive)
    assert not link.closed


def test_any_exception_from_handling_a_peer_s_frame_is_a_typed_reset_and_one_line():
    """A bug a peer's frame triggers closes that link with GOAWAY(INTERNAL_ERROR) and one log line, never a traceback."""
    clock = Clock()
    link, transport, peer = handshaken_pair(clock)

    def broken(message):
        raise KeyError("surprise")

    link.on_control = broken
    with capturedLogs() as logs:
        link.dataReceived(h.control({"id": 1}))
    frames = frames_of(transport.value())
    assert frames[-1][0] == h.FrameType.GOAWAY
    assert frames[-1][3][:4] == ErrorCode.INTERNAL_ERROR.to_bytes(4, "big")
    assert link.closed
    assert len(logs) == 1 and not any(e.get("log_failure") for e in logs)
