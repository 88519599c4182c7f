"""Link and stream rules of MuxConnection (docs/protocol.md), without sockets."""

import pytest

from relay.mux import (
    ErrorCode,
    FrameTooLargeError,
    FrameType,
    MuxConnection,
    MuxProtocolError,
    MuxUsageError,
    Role,
    StreamState,
)
from relay.mux import events as ev
from relay.mux import frames as fr
from relay.mux.errors import UnsupportedVersionError
from tests.mux import helpers as h
from tests.mux.helpers import TOKEN, LinkPair

# -- helpers -------------------------------------------------------------------


def relay_after_hello(**fields) -> MuxConnection:
    """A relay that has received the agent's HELLO but not answered it."""
    relay = MuxConnection(Role.RELAY)
    relay.receive_data(h.hello(token=TOKEN, **fields))
    return relay


def agent_after_hello() -> MuxConnection:
    """An agent that has sent its HELLO and waits for the relay's."""
    agent = MuxConnection(Role.AGENT)
    agent.send_hello({"token": TOKEN})
    agent.outgoing()
    return agent


def open_relay() -> MuxConnection:
    relay = relay_after_hello()
    relay.send_hello({})
    relay.outgoing()
    return relay


def open_agent() -> MuxConnection:
    agent = agent_after_hello()
    agent.receive_data(h.hello())
    return agent


def assert_refused(conn: MuxConnection, raw: bytes, code: ErrorCode, exc=MuxProtocolError):
    """Feeding raw raises exc carrying code, and GOAWAY(code) is queued as the last frame."""
    with pytest.raises(exc) as info:
        conn.receive_data(raw)
    assert info.value.code == code
    frames = h.sent(conn)
    assert frames[-1][0] is FrameType.GOAWAY
    assert fr.decode_coded(frames[-1][3])[0] == code
    assert [f[0] for f in frames].count(FrameType.GOAWAY) == 1
    return info.value


# -- handshake -------------------------------------------------------------------


def test_handshake_opens_both_sides():
    """Agent HELLO then relay HELLO opens the link on both sides, each seeing the other's HELLO."""
    pair = LinkPair(handshake=False)
    pair.agent.send_hello({"token": TOKEN})
    [hello] = pair.to_relay()
    assert hello == ev.HelloReceived({"token": TOKEN, "version": 2, "initial_window": 256 * 1024})
    assert pair.relay.state.value == "awaiting-hello"
    pair.relay.send_hello({"motd": "hi"})
    assert pair.relay.state.value == "open"
    [answer] = pair.to_agent()
    assert answer == ev.HelloReceived({"motd": "hi", "version": 2, "initial_window": 256 * 1024})
    assert pair.agent.state.value == "open"


def test_hello_announces_version_and_initial_window_and_they_are_used():
    """HELLO carries version 2 and the sender's initial_window, which becomes the peer's send
    window."""
    pair = LinkPair(
        handshake=False,
        agent_kwargs={"initial_window": 100_000},
        relay_kwargs={"initial_window": 50_000},
    )
    pair.agent.send_hello({"token": TOKEN, "version": 99})  # the core's version wins
    [hello] = pair.to_relay()
    assert hello.info["version"] == 2 and hello.info["initial_window"] == 100_000
    pair.relay.send_hello({})
    pair.to_agent()
    relay_stream = pair.relay.open_stream({})
    agent_stream = pair.agent.open_stream({})
    pair.exchange()
    assert pair.relay.send_window(relay_stream) == 100_000
    assert pair.agent.send_window(agent_stream) == 50_000


def test_relay_never_speaks_first():
    """The relay may only answer a HELLO; sending one first is a local usage error."""
    relay = MuxConnection(Role.RELAY)
    with pytest.raises(MuxUsageError):
        relay.send_hello({})
    assert relay.outgoing() == []


def test_each_side_sends_one_hello():
    """A second send_hello is a local usage error, on either side."""
    pair = LinkPair()
    for conn in (pair.agent, pair.relay):
        with pytest.raises(MuxUsageError):
            conn.send_hello({})
        assert conn.outgoing() == []


@pytest.mark.parametrize("version", [1, 3, 0, "2", None])
def test_relay_refuses_other_versions(version):
    """A HELLO with any version but 2 (version 1 included) closes the link with UNSUPPORTED_VERSION."""
    relay = MuxConnection(Role.RELAY)
    raw = (
        h.hello(token=TOKEN, version=version)
        if version is not None
        else h.json_frame(FrameType.HELLO, 0, {"token": TOKEN})
    )
    assert_refused(relay, raw, ErrorCode.UNSUPPORTED_VERSION, UnsupportedVersionError)


def test_agent_refuses_relay_of_other_version():
    """An agent closes the link with UNSUPPORTED_VERSION if the relay answers with another version."""
    agent = agent_after_hello()
    assert_refused(
        agent, h.hello(version=1), ErrorCode.UNSUPPORTED_VERSION, UnsupportedVersionError
    )
    assert agent.state.value == "closed"


@pytest.mark.parametrize("window", [1023, 2**31, "big", 1.5e6, -1])
def test_bad_initial_window_is_a_protocol_error(window):
    """An initial_window outside 1024..2^31-1 or not an integer is a protocol error."""
    assert_refused(
        MuxConnection(Role.RELAY),
        h.hello(token=TOKEN, initial_window=window),
        ErrorCode.PROTOCOL_ERROR,
    )


def test_initial_window_defaults_when_omitted():
    """A HELLO without initial_window gives the peer the default 256 KiB window."""
    relay = MuxConnection(Role.RELAY, initial_window=4096)
    relay.receive_data(h.json_frame(FrameType.HELLO, 0, {"version": 2, "token": TOKEN}))
    relay.send_hello({})
    assert relay.send_window(relay.open_stream({})) == 256 * 1024


def test_relay_refuses_with_goaway_auth_failed():
    """Refusing a token is GOAWAY(AUTH_FAILED) with a reason; the agent sees it and its link is
    closed."""
    pair = LinkPair(handshake=False)
    pair.agent.send_hello({"token": "wrong"})
    [hello] = pair.to_relay()
    assert hello.info["token"] == "wrong"
    pair.relay.close(ErrorCode.AUTH_FAILED, "bad token")
    raw = b"".join(pair.relay.outgoing())
    assert raw == h.goaway(ErrorCode.AUTH_FAILED, "bad token")
    assert pair.agent.receive_data(raw) == [ev.GoAwayReceived(ErrorCode.AUTH_FAILED, "bad token")]
    assert pair.agent.state.value == "closed"
    with pytest.raises(MuxUsageError):
        pair.agent.open_stream({})
    with pytest.raises(MuxUsageError):
        pair.relay.send_hello({})  # refused is final


def test_relay_cannot_use_the_link_before_accepting():
    """Between the agent's HELLO and its answer, the relay can neither open streams nor send
    control."""
    relay = relay_after_hello()
    with pytest.raises(MuxUsageError):
        relay.open_stream({})
    with pytest.raises(MuxUsageError):
        relay.send_control({"op": "x"})
    with pytest.raises(MuxUsageError):
        relay.ping(b"12345678")
    assert relay.outgoing() == []


def test_agent_cannot_use_the_link_before_the_relay_answers():
    """An agent waiting for the relay's HELLO can neither open streams, send control nor ping."""
    agent = agent_after_hello()
    with pytest.raises(MuxUsageError):
        agent.open_stream({})
    with pytest.raises(MuxUsageError):
        agent.send_control({"op": "x"})
    with pytest.raises(MuxUsageError):
        agent.ping(b"12345678")
    assert agent.outgoing() == []


PRE_HELLO_FRAMES = {
    "control": h.control({"op": "x"}),
    "open": h.open_frame(1),
    "data": h.data(1, b"x"),
    "window_update": h.window_update(1, 10),
    "fin": h.fin(1),
    "reset": h.reset(1, ErrorCode.CANCEL),
    "ping": h.ping(),
    "pong": h.pong(),
}


@pytest.mark.parametrize("name", PRE_HELLO_FRAMES)
def test_relay_rejects_frames_before_hello(name):
    """Any frame but HELLO or GOAWAY before the agent's HELLO is a protocol error."""
    assert_refused(MuxConnection(Role.RELAY), PRE_HELLO_FRAMES[name], ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("name", PRE_HELLO_FRAMES)
def test_relay_rejects_frames_before_accepting(name):
    """The agent sends nothing after its HELLO until the relay has answered."""
    assert_refused(relay_after_hello(), PRE_HELLO_FRAMES[name], ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("name", PRE_HELLO_FRAMES)
def test_agent_rejects_frames_before_the_relays_hello(name):
    """An agent rejects any frame but HELLO or GOAWAY before the relay's HELLO."""
    assert_refused(agent_after_hello(), PRE_HELLO_FRAMES[name], ErrorCode.PROTOCOL_ERROR)


def test_hello_rules():
    """HELLO only on stream 0, only once, and never to an agent that has not sent its own."""
    assert_refused(
        MuxConnection(Role.RELAY),
        h.frame(FrameType.HELLO, 2, b'{"version":2}'),
        ErrorCode.PROTOCOL_ERROR,
    )
    assert_refused(relay_after_hello(), h.hello(token=TOKEN), ErrorCode.PROTOCOL_ERROR)
    assert_refused(open_relay(), h.hello(token=TOKEN), ErrorCode.PROTOCOL_ERROR)
    assert_refused(open_agent(), h.hello(), ErrorCode.PROTOCOL_ERROR)
    assert_refused(MuxConnection(Role.AGENT), h.hello(), ErrorCode.PROTOCOL_ERROR)
    assert_refused(
        MuxConnection(Role.RELAY), h.frame(FrameType.HELLO, 0, b"[1]"), ErrorCode.PROTOCOL_ERROR
    )


def test_deeply_nested_hello_is_a_protocol_error():
    """A HELLO of deeply nested JSON is refused with PROTOCOL_ERROR, like any other bad JSON."""
    nested = b'{"a":' * 5000 + b"1" + b"}" * 5000
    assert_refused(
        MuxConnection(Role.RELAY),
        h.frame(FrameType.HELLO, 0, nested[: fr.MAX_HELLO_PAYLOAD]),
        ErrorCode.PROTOCOL_ERROR,
    )


def test_goaway_is_accepted_before_the_handshake():
    """GOAWAY is valid before the link is open, on either side."""
    for conn in (MuxConnection(Role.RELAY), agent_after_hello(), MuxConnection(Role.AGENT)):
        assert conn.receive_data(h.goaway(ErrorCode.HANDSHAKE_TIMEOUT)) == [
            ev.GoAwayReceived(ErrorCode.HANDSHAKE_TIMEOUT, "")
        ]


# -- size limits -------------------------------------------------------------------


def test_frame_limit_before_hello_is_16k():
    """Before its link is open a side refuses any frame over 16 KiB, judging by the header alone."""
    relay = MuxConnection(Role.RELAY)
    assert_refused(
        relay,
        h.frame(FrameType.HELLO, 0, length=fr.MAX_HELLO_PAYLOAD + 1),
        ErrorCode.FRAME_TOO_LARGE,
        FrameTooLargeError,
    )
    # A HELLO of exactly 16 KiB (JSON padded with spaces) is fine.
    body = b'{"version":2,"token":"s3cret"}'
    padded = body[:-1] + b" " * (fr.MAX_HELLO_PAYLOAD - len(body)) + b"}"
    assert len(MuxConnection(Role.RELAY).receive_data(h.frame(FrameType.HELLO, 0, padded))) == 1
    assert_refused(
        agent_after_hello(),
        h.frame(FrameType.HELLO, 0, length=fr.MAX_HELLO_PAYLOAD + 1),
        ErrorCode.FRAME_TOO_LARGE,
        FrameTooLargeError,
    )


def test_relay_keeps_the_small_limit_until_it_accepts():
    """The relay's limit rises to 256 KiB only when it sends its accepting HELLO."""
    relay = relay_after_hello()
    assert_refused(
        relay,
        h.frame(FrameType.DATA, 1, length=fr.MAX_HELLO_PAYLOAD + 1),
        ErrorCode.FRAME_TOO_LARGE,
        FrameTooLargeError,
    )


def test_frame_limit_after_hello_is_256k():
    """Once the link is open a side accepts a 256 KiB frame and refuses a larger one."""
    pair = LinkPair()
    stream_id = pair.relay.open_stream({})
    pair.to_agent()
    events = pair.agent.receive_data(h.data(stream_id, b"x" * fr.MAX_FRAME_PAYLOAD))
    assert events == [ev.DataReceived(stream_id, b"x" * fr.MAX_FRAME_PAYLOAD)]
    assert_refused(
        pair.agent,
        h.frame(FrameType.DATA, stream_id, length=fr.MAX_FRAME_PAYLOAD + 1),
        ErrorCode.FRAME_TOO_LARGE,
        FrameTooLargeError,
    )
    assert_refused(
        open_relay(),
        h.frame(FrameType.CONTROL, 0, length=fr.MAX_FRAME_PAYLOAD + 1),
        ErrorCode.FRAME_TOO_LARGE,
        FrameTooLargeError,
    )


def test_frames_in_the_same_read_as_the_relays_hello_get_the_open_limit():
    """A frame that arrives in the same read as the HELLO that opens the link is judged by the 256
    KiB limit."""
    agent = agent_after_hello()
    big = b"x" * (fr.MAX_HELLO_PAYLOAD + 1)
    raw = h.hello() + h.open_frame(2) + h.data(2, big)
    assert agent.receive_data(raw) == [
        ev.HelloReceived({"version": 2, "initial_window": 256 * 1024}),
        ev.StreamOpened(2, {}),
        ev.DataReceived(2, big),
    ]


# -- streams -------------------------------------------------------------------------


def test_relay_opens_even_ids_and_agent_odd_ids():
    """The relay opens streams 2, 4, 6... and the agent 1, 3, 5...; the peer sees each OPEN with its
    metadata."""
    pair = LinkPair()
    assert [pair.relay.open_stream({"n": i}) for i in range(3)] == [2, 4, 6]
    assert [pair.agent.open_stream({"n": i}) for i in range(2)] == [1, 3]
    got = pair.exchange()
    assert got.agent == [
        ev.StreamOpened(2, {"n": 0}),
        ev.StreamOpened(4, {"n": 1}),
        ev.StreamOpened(6, {"n": 2}),
    ]
    assert got.relay == [ev.StreamOpened(1, {"n": 0}), ev.StreamOpened(3, {"n": 1})]


@pytest.mark.parametrize("opener", [Role.RELAY, Role.AGENT])
def test_open_data_fin_both_ways(opener):
    """Either side opens a stream, both send data, and FINs from both close it on both sides."""
    pair = LinkPair()
    a, b = pair.side(opener), pair.peer_of(opener)
    sid = a.open_stream({"tunnel": "t"})
    assert a.send(sid, b"ping") == 4
    got = pair.exchange()
    b_events = got.agent if b is pair.agent else got.relay
    assert b_events == [ev.StreamOpened(sid, {"tunnel": "t"}), ev.DataReceived(sid, b"ping")]
    assert b.send(sid, b"pong") == 4
    got = pair.exchange()
    assert (got.relay if a is pair.relay else got.agent) == [ev.DataReceived(sid, b"pong")]
    a.end_stream(sid)
    b.end_stream(sid)
    got = pair.exchange()
    assert got.agent == [ev.StreamEnded(sid)] and got.relay == [ev.StreamEnded(sid)]
    assert sid not in a.streams and sid not in b.streams


def test_half_close_lets_the_other_side_keep_sending():
    """After one side's FIN the other side may still send data, and only its own FIN closes the
    stream."""
    pair = LinkPair()
    sid = pair.relay.open_stream({})
    pair.relay.send(sid, b"request")
    pair.relay.end_stream(sid)
    assert pair.relay.streams[sid].state is StreamState.HALF_CLOSED_LOCAL
    got = pair.exchange()
    assert got.agent == [
        ev.StreamOpened(sid, {}),
        ev.DataReceived(sid, b"request"),
        ev.StreamEnded(sid),
    ]
    assert pair.agent.streams[sid].state is StreamState.HALF_CLOSED_REMOTE
    for chunk in (b"resp", b"onse"):
        assert pair.agent.send(sid, chunk) == 4
    assert pair.exchange().relay == [ev.DataReceived(sid, b"resp"), ev.DataReceived(sid, b"onse")]
    pair.agent.end_stream(sid)
    assert sid not in pair.agent.streams
    assert pair.exchange().relay == [ev.StreamEnded(sid)]
    assert sid not in pair.relay.streams


def test_sending_after_own_fin_is_a_usage_error():
    """Data or a second FIN after our own FIN is a local usage error and puts nothing on the wire."""
    pair = LinkPair()
    sid = pair.agent.open_stream({})
    pair.agent.end_stream(sid)
    pair.exchange()
    with pytest.raises(MuxUsageError):
        pair.agent.send(sid, b"late")
    with pytest.raises(MuxUsageError):
        pair.agent.end_stream(sid)
    assert pair.agent.outgoing() == []


def test_sending_on_unknown_stream_is_a_usage_error():
    """send/end_stream on a stream that is not open is a local usage error."""
    pair = LinkPair()
    with pytest.raises(MuxUsageError):
        pair.relay.send(2, b"x")
    with pytest.raises(MuxUsageError):
        pair.relay.end_stream(2)


@pytest.mark.parametrize("late", ["data", "fin"])
def test_peer_data_or_fin_after_its_fin_is_stream_closed(late):
    """DATA or a second FIN from a peer that already sent FIN closes the link with STREAM_CLOSED."""
    pair = LinkPair()
    sid = pair.relay.open_stream({})
    pair.relay.end_stream(sid)
    pair.exchange()
    raw = h.data(sid, b"x") if late == "data" else h.fin(sid)
    assert_refused(pair.agent, raw, ErrorCode.STREAM_CLOSED)


def test_reset_closes_the_stream_on_both_sides():
    """RESET carries its code and reason, and both sides forget the stream."""
    pair = LinkPair()
    sid = pair.relay.open_stream({})
    pair.exchange()
    pair.agent.reset(sid, ErrorCode.CONNECT_FAILED, "connection refused")
    assert sid not in pair.agent.streams
    assert pair.exchange().relay == [
        ev.StreamReset(sid, ErrorCode.CONNECT_FAILED, "connection refused")
    ]
    assert sid not in pair.relay.streams
    with pytest.raises(MuxUsageError):
        pair.relay.send(sid, b"x")
    pair.agent.reset(sid)  # resetting a gone stream is a no-op
    assert pair.agent.outgoing() == []


def test_reset_is_allowed_in_every_open_state():
    """A stream can be reset after our FIN and after the peer's FIN."""
    pair = LinkPair()
    ours, theirs = pair.relay.open_stream({}), pair.relay.open_stream({})
    pair.relay.end_stream(ours)
    pair.agent.receive_data(b"".join(pair.relay.outgoing()))
    pair.agent.end_stream(theirs)
    pair.relay.receive_data(b"".join(pair.agent.outgoing()))
    pair.relay.reset(ours)
    pair.relay.reset(theirs)
    assert pair.relay.streams == {}
    assert pair.exchange().agent == [
        ev.StreamReset(ours, ErrorCode.CANCEL, ""),
        ev.StreamReset(theirs, ErrorCode.CANCEL, ""),
    ]


def test_crossing_resets_are_harmless():
    """When both sides reset the same stream at once, each ignores the other's RESET."""
    pair = LinkPair()
    sid = pair.relay.open_stream({})
    pair.exchange()
    pair.relay.reset(sid)
    pair.agent.reset(sid)
    assert pair.exchange() == ([], [])


@pytest.mark.parametrize(
    "late",
    [
        h.data(2, b"trailing"),
        h.window_update(2, 1000),
        h.fin(2),
        h.reset(2, ErrorCode.CANCEL),
        h.frame(FrameType.DATA, 2, b""),
    ],
    ids=["data", "window_update", "fin", "reset", "empty-data"],
)
def test_frames_on_closed_streams_are_ignored(late):
    """DATA, WINDOW_UPDATE, FIN or RESET naming a stream that was closed are ignored, on both sides."""
    pair = LinkPair()
    sid = pair.relay.open_stream({})
    assert sid == 2
    pair.exchange()
    pair.relay.reset(sid)
    pair.exchange()
    assert pair.agent.receive_data(late) == []
    assert pair.relay.receive_data(late) == []
    assert pair.agent.outgoing() == [] and pair.relay.outgoing() == []


def test_frames_on_never_opened_streams_are_protocol_errors():
    """A frame naming a stream id nobody opened yet is a protocol error, whichever parity."""
    assert_refused(
        LinkPair().agent, h.data(2, b"x"), ErrorCode.PROTOCOL_ERROR
    )  # relay's id, not opened
    assert_refused(
        LinkPair().relay, h.data(2, b"x"), ErrorCode.PROTOCOL_ERROR
    )  # its own id, not opened
    assert_refused(LinkPair().relay, h.window_update(1, 5), ErrorCode.PROTOCOL_ERROR)
    pair = LinkPair()
    pair.relay.open_stream({})
    pair.exchange()
    assert_refused(pair.agent, h.fin(4), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "raw",
    [
        h.data(0, b"x"),
        h.window_update(0, 5),
        h.fin(0),
        h.reset(0, ErrorCode.CANCEL),
        h.open_frame(0),
    ],
    ids=["data", "window_update", "fin", "reset", "open"],
)
def test_stream_frames_on_stream_zero_are_protocol_errors(raw):
    """Stream 0 is the link: no stream frame may name it."""
    assert_refused(LinkPair().relay, raw, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "raw",
    [
        h.json_frame(FrameType.CONTROL, 2, {}),
        h.frame(FrameType.PING, 2, b"12345678"),
        h.frame(FrameType.PONG, 2, b"12345678"),
        h.frame(FrameType.GOAWAY, 2, b"\x00\x00\x00\x00"),
    ],
    ids=["control", "ping", "pong", "goaway"],
)
def test_link_frames_off_stream_zero_are_protocol_errors(raw):
    """CONTROL, PING, PONG and GOAWAY only travel on stream 0."""
    pair = LinkPair()
    pair.relay.open_stream({})
    pair.exchange()
    assert_refused(pair.agent, raw, ErrorCode.PROTOCOL_ERROR)


def test_open_with_the_wrong_parity_is_a_protocol_error():
    """The agent may not OPEN even ids and the relay may not OPEN odd ids."""
    assert_refused(LinkPair().relay, h.open_frame(2), ErrorCode.PROTOCOL_ERROR)
    assert_refused(LinkPair().agent, h.open_frame(1), ErrorCode.PROTOCOL_ERROR)


def test_open_must_use_a_fresh_higher_id():
    """Reusing a stream id, even of a closed stream, or going below the highest one is a protocol
    error."""
    pair = LinkPair()
    assert pair.relay.open_stream({}) == 2
    pair.exchange()
    pair.relay.reset(2)
    pair.exchange()
    assert_refused(pair.agent, h.open_frame(2), ErrorCode.PROTOCOL_ERROR)
    agent = LinkPair().agent
    agent.receive_data(h.open_frame(6))
    assert_refused(agent, h.open_frame(4), ErrorCode.PROTOCOL_ERROR)


def test_peer_may_skip_ids():
    """Stream ids must increase but need not be consecutive."""
    agent = LinkPair().agent
    assert agent.receive_data(h.open_frame(10, {"a": 1})) == [ev.StreamOpened(10, {"a": 1})]
    assert agent.receive_data(h.open_frame(12)) == [ev.StreamOpened(12, {})]


def test_open_metadata_must_be_a_json_object():
    """OPEN's payload is a JSON object; anything else is a protocol error."""
    assert_refused(LinkPair().agent, h.frame(FrameType.OPEN, 2, b"[]"), ErrorCode.PROTOCOL_ERROR)


def test_stream_ids_run_out():
    """A side that has used up its 32-bit ids gets a usage error and must open a new link."""
    pair = LinkPair()
    pair.relay._next_stream_id = 2**32 - 2  # white-box: opening 2^31 streams takes too long
    assert pair.relay.open_stream({}) == 2**32 - 2
    with pytest.raises(MuxUsageError):
        pair.relay.open_stream({})
    assert pair.exchange().agent == [ev.StreamOpened(2**32 - 2, {})]


def test_flags_are_ignored():
    """Receivers ignore the flags byte."""
    pair = LinkPair()
    sid = pair.relay.open_stream({})
    pair.exchange()
    events = pair.agent.receive_data(
        h.frame(FrameType.DATA, sid, b"x", flags=0xFF)
        + h.frame(FrameType.PING, 0, b"abcdefgh", flags=1)
    )
    assert events == [ev.DataReceived(sid, b"x")]
    assert h.sent(pair.agent) == [(FrameType.PONG, 0, 0, b"abcdefgh")]


def test_senders_set_flags_to_zero():
    """Every frame the core writes has flags 0."""
    pair = LinkPair()
    sid = pair.relay.open_stream({})
    pair.relay.send(sid, b"x")
    pair.relay.send_control({})
    pair.relay.ping(b"12345678")
    pair.relay.end_stream(sid)
    pair.relay.reset(sid)
    pair.relay.close()
    assert {f[1] for f in h.sent(pair.relay)} == {0}


# -- control messages, keepalive, ordering --------------------------------------


def test_control_messages_both_ways():
    """Control messages are JSON objects on stream 0, delivered as ControlReceived in order."""
    pair = LinkPair()
    pair.agent.send_control({"op": "open_tunnel", "id": 1})
    pair.relay.send_control({"id": 1, "ok": True})
    pair.relay.send_control({"id": 2, "ok": False})
    got = pair.exchange()
    assert got.relay == [ev.ControlReceived({"op": "open_tunnel", "id": 1})]
    assert got.agent == [
        ev.ControlReceived({"id": 1, "ok": True}),
        ev.ControlReceived({"id": 2, "ok": False}),
    ]


def test_control_payload_must_be_a_json_object():
    """A CONTROL payload that is not a JSON object is a protocol error."""
    assert_refused(
        LinkPair().relay, h.frame(FrameType.CONTROL, 0, b'"op"'), ErrorCode.PROTOCOL_ERROR
    )


def test_ping_is_answered_with_pong():
    """A PING is answered with a PONG carrying the same 8 bytes, which the pinger sees as
    PongReceived."""
    pair = LinkPair()
    pair.agent.ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    pair.to_relay()
    assert h.sent(pair.relay) == [(FrameType.PONG, 0, 0, b"\x00\x01\x02\x03\x04\x05\x06\x07")]
    pair.relay.ping(b"relay-pi")
    assert pair.exchange().relay == [ev.PongReceived(b"relay-pi")]


@pytest.mark.parametrize("size", [0, 7, 9])
def test_ping_must_be_8_bytes(size):
    """PING and PONG carry exactly 8 bytes: a local usage error to send otherwise, a protocol error
    to receive."""
    pair = LinkPair()
    with pytest.raises(MuxUsageError):
        pair.agent.ping(b"x" * size)
    assert_refused(pair.relay, h.ping(b"x" * size), ErrorCode.PROTOCOL_ERROR)
    assert_refused(LinkPair().agent, h.pong(b"x" * size), ErrorCode.PROTOCOL_ERROR)


def test_outgoing_puts_control_frames_before_data():
    """outgoing() writes control frames first, then DATA and FIN in the order they were queued."""
    pair = LinkPair()
    a, b = pair.relay.open_stream({}), pair.relay.open_stream({})
    pair.exchange()
    pair.agent.send(b, b"x" * 10)
    pair.exchange()
    pair.relay.send(a, b"first")
    pair.relay.send(b, b"second")
    pair.relay.end_stream(a)
    pair.relay.ping(b"12345678")
    pair.relay.send_control({"op": "hello"})
    c = pair.relay.open_stream({})
    pair.relay.consumed(b, 10)  # below the batching threshold: no WINDOW_UPDATE
    pair.relay.reset(b, ErrorCode.CANCEL)
    frames = h.sent(pair.relay)
    assert [(f[0], f[2]) for f in frames] == [
        (FrameType.PING, 0),
        (FrameType.CONTROL, 0),
        (FrameType.OPEN, c),
        (FrameType.RESET, b),
        (FrameType.DATA, a),
        (FrameType.DATA, b),
        (FrameType.FIN, a),
    ]


def test_window_update_goes_ahead_of_queued_data():
    """A WINDOW_UPDATE queued after bulk data is still written before it."""
    pair = LinkPair(relay_kwargs={"initial_window": 4096})
    sid = pair.relay.open_stream({})
    pair.to_agent()
    pair.relay.send(sid, b"y" * 1000)
    pair.relay.receive_data(h.data(sid, b"x" * 4096))
    pair.relay.consumed(sid, 4096)
    types = [f[0] for f in h.sent(pair.relay)]
    assert types == [FrameType.WINDOW_UPDATE, FrameType.DATA]


def test_pong_goes_ahead_of_queued_data():
    """A PONG is written before data that was queued earlier."""
    pair = LinkPair()
    sid = pair.relay.open_stream({})
    pair.to_agent()
    pair.relay.send(sid, b"x" * 100_000)
    pair.relay.receive_data(h.ping())
    assert [f[0] for f in h.sent(pair.relay)] == [FrameType.PONG, FrameType.DATA, FrameType.DATA]


# -- closing the link ---------------------------------------------------------------


def test_goaway_closes_the_link_and_is_final():
    """After GOAWAY the receiver reports it once, opens nothing, and ignores every later byte."""
    pair = LinkPair()
    sid = pair.relay.open_stream({})
    pair.exchange()
    pair.relay.close(ErrorCode.NO_ERROR, "shutting down")
    pair.relay.close(ErrorCode.INTERNAL_ERROR)  # a second close queues nothing
    assert pair.exchange().agent == [ev.GoAwayReceived(ErrorCode.NO_ERROR, "shutting down")]
    assert pair.agent.goaway == (ErrorCode.NO_ERROR, "shutting down")
    with pytest.raises(MuxUsageError):
        pair.agent.open_stream({})
    with pytest.raises(MuxUsageError):
        pair.agent.send_control({})
    assert pair.agent.receive_data(h.data(sid, b"x") + h.frame(0x7F, 0, length=2**32 - 1)) == []


def test_bytes_after_goaway_in_the_same_read_are_ignored():
    """Whatever follows a GOAWAY in the same read, even junk, is ignored rather than judged."""
    agent = LinkPair().agent
    junk = h.frame(FrameType.DATA, 2, length=2**32 - 1) + h.frame(0x7F, 0)
    assert agent.receive_data(h.goaway(ErrorCode.SESSION_REPLACED, "new link") + junk) == [
        ev.GoAwayReceived(ErrorCode.SESSION_REPLACED, "new link")
    ]


def test_peer_frames_after_our_goaway_are_ignored():
    """Once we sent GOAWAY, the peer's in-flight frames are ignored, not treated as violations."""
    pair = LinkPair()
    sid = pair.relay.open_stream({})
    pair.exchange()
    pair.agent.send(sid, b"in flight")
    pair.agent.ping(b"12345678")
    pair.relay.close(ErrorCode.KEEPALIVE_TIMEOUT)
    assert pair.to_relay() == []
    assert h.sent(pair.relay) == [(FrameType.GOAWAY, 0, 0, b"\x00\x00\x00\x09")]


def test_unknown_goaway_code_is_kept():
    """A GOAWAY with a code this side does not know is still reported, with the raw number."""
    agent = LinkPair().agent
    [event] = agent.receive_data(h.goaway(0xBEEF, "future"))
    assert event.code == 0xBEEF and event.message == "future"


def test_protocol_error_sends_one_goaway_with_its_code():
    """A broken rule queues exactly one GOAWAY naming it, after what was already queued."""
    pair = LinkPair()
    pair.relay.send_control({"op": "before"})
    error = assert_refused(pair.relay, h.frame(0x42, 0), ErrorCode.PROTOCOL_ERROR)
    assert "0x42" in str(error)
    assert pair.relay.state.value == "closed"
