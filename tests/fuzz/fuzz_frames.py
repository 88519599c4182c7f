#!/usr/bin/env python3
"""Fuzz target: the frame decoder and MuxConnection.receive_data in both roles.

Input layout (so the fuzzer picks the setting as well as the bytes):
byte 0 is the cut count (see `harness.cuts`) and, in its high bits, the role
(bit 3), how many streams we open ourselves (bits 4-5) and the windows (bits
6-7); then the cut offsets; the rest is what the peer sends after a valid
HELLO handshake, so stream rules (ids, states, windows) are reached at once.

Rules checked, any other exception being a finding:
- FrameDecoder: only MuxProtocolError escapes; any split of the input gives
  the same frames and the same verdict; without stop types it never holds a
  whole frame's worth of bytes.
- MuxConnection: only MuxProtocolError escapes, and then GOAWAY with its code
  is queued and the link is closed; events are Event instances; a split gives
  the same events and verdict as one read; our own outgoing bytes decode; the
  link budget is conserved (available + every stream's growth == total).
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relay.mux import events as ev  # noqa: E402
from relay.mux import frames as fr  # noqa: E402
from relay.mux.connection import (  # noqa: E402
    DEFAULT_LINK_BUDGET,
    LinkState,
    MuxConnection,
    Role,
    StreamState,
)
from relay.mux.errors import MuxProtocolError  # noqa: E402
from relay.mux.frames import FrameType  # noqa: E402
from tests.fuzz.harness import cuts, fuzz_main, pieces  # noqa: E402

EVENT_TYPES = tuple(ev.Event) if isinstance(ev.Event, tuple) else ev.Event.__args__
# (our initial window, our max window, the peer's initial window): small ones
# let a short input reach flow-control errors and window growth.
WINDOWS = [
    (1024, 4096, 1024),
    (4096, 64 * 1024, 2048),
    (64 * 1024, 1024 * 1024, 256 * 1024),
    (256 * 1024, 8 * 1024 * 1024, 2**31 - 1),
]
LINK_BUDGET = 256 * 1024  # small, so the fuzzer can run it dry


# -- FrameDecoder ----------------------------------------------------------------


def _decode_all(decoder: fr.FrameDecoder, chunks: list[bytes]):
    """Every frame of `chunks`, going on past stop types as MuxConnection does."""
    frames = []
    for chunk in chunks:
        got = decoder.feed(chunk)
        while got:
            frames.extend(got)
            got = decoder.feed(b"") if got[-1][0] in decoder.stop_after else []
    return frames


def _decoder_verdict(chunks, max_payload, stop_after):
    decoder = fr.FrameDecoder(max_payload, stop_after=stop_after)
    try:
        return _decode_all(decoder, chunks), decoder.buffered
    except MuxProtocolError as e:
        assert str(e).encode("utf-8")
        return type(e), None


def check_decoder(body: bytes, points: list[int], max_payload: int) -> None:
    for stop_after in (frozenset(), fr.STOP_AFTER):
        whole = _decoder_verdict([body], max_payload, stop_after)
        split = _decoder_verdict(pieces(body, points), max_payload, stop_after)
        assert whole == split, f"split {points} changed the decoder's result"
        if isinstance(whole[0], list):
            assert whole[1] < fr.HEADER_SIZE + max_payload
            assert sum(fr.HEADER_SIZE + len(f[3]) for f in whole[0]) + whole[1] == len(body)
            for frame_type, flags, stream_id, payload in whole[0]:
                assert frame_type in fr.FRAME_TYPES and len(payload) <= max_payload
                assert 0 <= flags <= 0xFF and 0 <= stream_id <= fr.MAX_STREAM_ID


# -- MuxConnection -------------------------------------------------------------


def handshaken(role: Role, windows: tuple[int, int, int], local_streams: int) -> MuxConnection:
    """A link past a valid HELLO exchange, with `local_streams` streams we opened."""
    initial, maximum, peer_initial = windows
    conn = MuxConnection(role, initial_window=initial, max_window=maximum, link_budget=LINK_BUDGET)
    peer_hello = fr.encode_json(FrameType.HELLO, 0, {"version": fr.PROTOCOL_VERSION, "initial_window": peer_initial, "token": "t"})
    if role is Role.RELAY:
        conn.receive_data(peer_hello)
        conn.send_hello({"relay": "fuzz"})
    else:
        conn.send_hello({"token": "t"})
        conn.receive_data(peer_hello)
    assert conn.state is LinkState.OPEN
    for _ in range(local_streams):
        conn.open_stream({"tunnel": "t1", "service": ""})
    conn.outgoing()
    return conn


def _check_link(conn: MuxConnection, *, broken: bool = False) -> None:
    """Window and budget invariants; `broken`: a protocol error closed the link,
    and the frame that broke a rule may have been half applied (a WINDOW_UPDATE
    past 2^31-1 raises after adding), which is harmless on a closed link."""
    growth = 0
    for stream in conn.streams.values():
        recv = stream.recv
        assert recv.initial <= recv.target <= recv.maximum
        assert recv.remaining >= 0 and recv.pending >= 0
        assert stream.state is not StreamState.CLOSED  # closed streams are forgotten
        assert broken or stream.send_window <= 2**31 - 1
        growth += recv.target - recv.initial
    assert conn.budget.available >= 0
    assert conn.budget.available + growth == LINK_BUDGET, "link budget leaked"


def _check_outgoing(conn: MuxConnection) -> list[tuple]:
    """Our own bytes must be frames the peer accepts at the header level."""
    out = b"".join(conn.outgoing())
    decoder = fr.FrameDecoder(fr.MAX_FRAME_PAYLOAD)
    frames = decoder.feed(out)
    assert decoder.buffered == 0, "we queued a partial frame"
    return frames


def _feed(conn: MuxConnection, chunks: list[bytes], *, act: bool):
    """Events of every chunk and the verdict: None, or the error's (type, code).

    With `act`, behave like the adapter: consume what arrived, send where the
    window opened, so grants and window growth run between the reads."""
    events = []
    for chunk in chunks:
        try:
            got = conn.receive_data(chunk)
        except MuxProtocolError as e:
            assert conn.state is LinkState.CLOSED
            str(e).encode("utf-8")
            frames = _check_outgoing(conn)
            assert frames and frames[-1][0] == FrameType.GOAWAY, "no GOAWAY queued for a protocol error"
            assert fr.decode_coded(frames[-1][3])[0] == e.code
            _check_link(conn, broken=True)
            return events, (type(e), e.code)
        for event in got:
            assert isinstance(event, EVENT_TYPES), f"not an event: {event!r}"
        events.extend(got)
        if act:
            for event in got:
                stream = conn.streams.get(getattr(event, "stream_id", None))
                if isinstance(event, ev.DataReceived) and stream is not None:
                    conn.consumed(event.stream_id, min(len(event.data), stream.recv.pending))
                elif isinstance(event, ev.WindowOpened) and stream is not None:
                    if stream.state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
                        taken = conn.send(event.stream_id, b"\0" * 100)
                        assert 0 <= taken <= 100
            for frame_type, _, _, payload in _check_outgoing(conn):
                if frame_type == FrameType.WINDOW_UPDATE:
                    assert fr.U32.unpack(payload)[0] > 0, "we granted 0 bytes"
        _check_link(conn)
    return events, None


def check_connection(body: bytes, points: list[int], role: Role, windows, local_streams: int) -> None:
    whole = _feed(handshaken(role, windows, local_streams), [body], act=False)
    split = _feed(handshaken(role, windows, local_streams), pieces(body, points), act=False)
    if whole[1] is None:
        assert split == whole, f"split {points} changed the events"
    else:
        # The first rule broken may differ (one read checks every header before
        # any handler runs), but a broken stream stays broken however it is cut.
        assert split[1] is not None, f"split {points} hid a protocol error: {whole[1]}"
    _feed(handshaken(role, windows, local_streams), pieces(body, points), act=True)


def one_input(data: bytes) -> None:
    points, body = cuts(data)
    mode = data[0] if data else 0
    role = Role.AGENT if mode & 0x08 else Role.RELAY
    local_streams = (mode >> 4) & 0x3
    windows = WINDOWS[mode >> 6]
    check_decoder(body, points, fr.MAX_HELLO_PAYLOAD if mode & 0x40 else 64)
    check_connection(body, points, role, windows, local_streams)


if __name__ == "__main__":
    fuzz_main("tests.fuzz.fuzz_frames")
