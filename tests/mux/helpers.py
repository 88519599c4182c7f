"""Test helpers for the sans-IO mux core: a frame builder and a LinkPair.

The frame builder packs headers with its own struct, not `relay.mux.frames`,
so a test written with it checks the code against the spec rather than
against itself (as Twisted's web/test/test_http2.py FrameFactory does).
`LinkPair` joins an agent-side and a relay-side `MuxConnection` in memory and
moves each side's `outgoing()` bytes to the other (h11 tests/helpers.py
ConnectionPair).
"""

import json
import struct
from typing import NamedTuple

from relay.mux import MuxConnection, Role
from relay.mux.frames import FrameType

# docs/protocol.md "Frame header": length u32, type u8, flags u8, stream_id u32, big-endian.
_HEADER = struct.Struct(">IBBI")
TOKEN = "s3cret"


# -- frame builder ------------------------------------------------------------


def frame(
    frame_type: int,
    stream_id: int = 0,
    payload: bytes = b"",
    *,
    flags: int = 0,
    length: int | None = None
) -> bytes:
    """Raw frame bytes; `length` overrides the header's length field (for lies)."""
    if length is None:
        length = len(payload)
    return _HEADER.pack(length, frame_type, flags, stream_id) + payload


def json_frame(frame_type: int, stream_id: int, obj) -> bytes:
    return frame(frame_type, stream_id, json.dumps(obj, separators=(",", ":")).encode())


def hello(**fields) -> bytes:
    body = {"version": 2, "initial_window": 256 * 1024}
    body.update(fields)
    return json_frame(FrameType.HELLO, 0, body)


def control(message: dict) -> bytes:
    return json_frame(FrameType.CONTROL, 0, message)


def open_frame(stream_id: int, metadata: dict | None = None) -> bytes:
    return json_frame(FrameType.OPEN, stream_id, metadata if metadata is not None else {})


def data(stream_id: int, payload: bytes) -> bytes:
    return frame(FrameType.DATA, stream_id, payload)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(FrameType.WINDOW_UPDATE, stream_id, struct.pack(">I", increment))


def fin(stream_id: int) -> bytes:
    return frame(FrameType.FIN, stream_id)


def reset(stream_id: int, code: int, reason: str = "") -> bytes:
    return frame(FrameType.RESET, stream_id, struct.pack(">I", code) + reason.encode())


def goaway(code: int, reason: str = "") -> bytes:
    return frame(FrameType.GOAWAY, 0, struct.pack(">I", code) + reason.encode())


def ping(opaque: bytes = b"12345678") -> bytes:
    return frame(FrameType.PING, 0, opaque)


def pong(opaque: bytes = b"12345678") -> bytes:
    return frame(FrameType.PONG, 0, opaque)


def parse(raw: bytes) -> list[tuple[FrameType, int, int, bytes]]:
    """Split complete frames: (type, flags, stream_id, payload). Independent of FrameDecoder."""
    out = []
    offset = 0
    while offset < len(raw):
        assert len(raw) - offset >= _HEADER.size, "truncated header"
        length, frame_type, flags, stream_id = _HEADER.unpack_from(raw, offset)
        start = offset + _HEADER.size
        assert start + length <= len(raw), "truncated payload"
        out.append((FrameType(frame_type), flags, stream_id, raw[start : start + length]))
        offset = start + length
    return out


def split(raw: bytes) -> list[bytes]:
    """Cut raw bytes into one bytes object per complete frame."""
    out = []
    offset = 0
    while offset < len(raw):
        (length,) = struct.unpack_from(">I", raw, offset)
        out.append(raw[offset : offset + _HEADER.size + length])
        offset += _HEADER.size + length
    return out


def sent(conn: MuxConnection) -> list[tuple[FrameType, int, int, bytes]]:
    """Take and parse everything `conn` has queued."""
    return parse(b"".join(conn.outgoing()))


def sent_types(conn: MuxConnection) -> list[FrameType]:
    return [f[0] for f in sent(conn)]


# -- LinkPair -----------------------------------------------------------------


class Exchanged(NamedTuple):
    """Events each side received during one LinkPair.exchange()."""

    agent: list
    relay: list


class LinkPair:
    """An agent and a relay MuxConnection wired back to back, in memory."""

    def __init__(self, *, handshake: bool = True, agent_kwargs=None, relay_kwargs=None):
        self.agent = MuxConnection(Role.AGENT, **(agent_kwargs or {}))
        self.relay = MuxConnection(Role.RELAY, **(relay_kwargs or {}))
        if handshake:
            self.handshake()

    def handshake(self, token: str = TOKEN) -> Exchanged:
        """Agent HELLO, relay accepts: both links end up open."""
        self.agent.send_hello({"token": token})
        first = self.to_relay()
        self.relay.send_hello({})
        return Exchanged(self.to_agent(), first)

    def to_relay(self) -> list:
        """Move the agent's queued bytes to the relay; return the relay's events."""
        return self.relay.receive_data(b"".join(self.agent.outgoing()))

    def to_agent(self) -> list:
        """Move the relay's queued bytes to the agent; return the agent's events."""
        return self.agent.receive_data(b"".join(self.relay.outgoing()))

    def exchange(self) -> Exchanged:
        """Shuttle bytes both ways until neither side has anything queued
        (replies such as PONG go out in the same call)."""
        agent_events: list = []
        relay_events: list = []
        while self.agent.has_outgoing() or self.relay.has_outgoing():
            relay_events += self.to_relay()
            agent_events += self.to_agent()
        return Exchanged(agent_events, relay_events)

    def side(self, role: Role) -> MuxConnection:
        return self.agent if role is Role.AGENT else self.relay

    def peer_of(self, role: Role) -> MuxConnection:
        return self.relay if role is Role.AGENT else self.agent
