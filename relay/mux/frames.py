"""Frame encoding and decoding: the byte layout of docs/protocol.md.

Every frame is a 10-byte header followed by `length` payload bytes:

    length u32 | type u8 | flags u8 | stream_id u32      (network byte order)

This module knows layouts and size limits only; which frame may come when is
`connection.py`'s business.
"""

import json
import struct
from enum import IntEnum

from relay.mux.errors import ErrorCode, FrameTooLargeError, MuxProtocolError

# 2: ACCEPT (the acceptor's answer to OPEN) and ENHANCE_YOUR_CALM. A version 1
# peer is refused with GOAWAY(UNSUPPORTED_VERSION) naming both versions.
PROTOCOL_VERSION = 2

HEADER = struct.Struct("!IBBI")
HEADER_SIZE = HEADER.size  # 10
U32 = struct.Struct("!I")
CODE_HEADER = struct.Struct("!I")  # RESET and GOAWAY start with a u32 code

# Largest payload a receiver accepts once the link is up. DATA frames are cut
# at MAX_DATA_PAYLOAD: 64 KiB frames beat 16 KiB and 256 KiB on this stack
# (shared/perf-calibration.md), and the margin leaves room for JSON control.
MAX_FRAME_PAYLOAD = 256 * 1024
MAX_DATA_PAYLOAD = 64 * 1024
# Before the peer's HELLO has been accepted, anything larger is junk: an
# unauthenticated peer must not make us buffer much.
MAX_HELLO_PAYLOAD = 16 * 1024
MAX_STREAM_ID = 2**32 - 1


class FrameType(IntEnum):
    HELLO = 0x0
    CONTROL = 0x1
    OPEN = 0x2
    DATA = 0x3
    WINDOW_UPDATE = 0x4
    FIN = 0x5
    RESET = 0x6
    PING = 0x7
    PONG = 0x8
    GOAWAY = 0x9
    ACCEPT = 0xA


FRAME_TYPES = frozenset(FrameType)
# MuxConnection's decoder stops after these and returns what it has: HELLO
# changes the size limit for the frames behind it (16 KiB -> 256 KiB), and
# nothing after GOAWAY is read at all. Judging the rest first would make the
# result depend on how the bytes were split into reads.
STOP_AFTER = frozenset({FrameType.HELLO, FrameType.GOAWAY})
PING_SIZE = 8


def header(frame_type: int, stream_id: int, length: int, flags: int = 0) -> bytes:
    return HEADER.pack(length, frame_type, flags, stream_id)


def encode(frame_type: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(len(payload), frame_type, flags, stream_id) + payload


# json.dumps with any option builds a new encoder per call: one, reused (an
# OPEN per visitor connection is on the new-connection path).
_JSON = json.JSONEncoder(separators=(",", ":"))


def encode_json(frame_type: int, stream_id: int, obj: dict) -> bytes:
    return encode(frame_type, stream_id, _JSON.encode(obj).encode())


def encode_window_update(stream_id: int, increment: int) -> bytes:
    return encode(FrameType.WINDOW_UPDATE, stream_id, U32.pack(increment))


def encode_coded(frame_type: int, stream_id: int, code: int, message: str) -> bytes:
    """RESET and GOAWAY: a u32 code, then an optional UTF-8 reason."""
    reason = message.encode("utf-8", "replace")[:1024]
    return encode(frame_type, stream_id, CODE_HEADER.pack(code) + reason)


def _reject_constant(name: str):
    # Python's json reads NaN, Infinity and -Infinity; RFC 8259 JSON has none,
    # and a peer's Infinity as a port number raised deep inside the agent.
    raise ValueError(f"{name} is not JSON")


def decode_json(payload: bytes) -> dict:
    try:
        obj = json.loads(payload, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # RecursionError: a 16 KiB HELLO of nested brackets, before any auth.
        raise MuxProtocolError(f"payload is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise MuxProtocolError("JSON payload is not an object")
    return obj


def decode_coded(payload: bytes) -> tuple[ErrorCode | int, str]:
    if len(payload) < CODE_HEADER.size:
        raise MuxProtocolError("RESET/GOAWAY payload shorter than its 4-byte code")
    (code,) = CODE_HEADER.unpack_from(payload)
    try:
        code = ErrorCode(code)
    except ValueError:
        pass  # unknown codes are kept as ints: newer peers may add some
    return code, payload[CODE_HEADER.size :].decode("utf-8", "replace")


class FrameDecoder:
    """Cuts a byte stream into (type, flags, stream_id, payload) tuples.

    Any split of the input gives the same frames. Size limits are checked on
    the header, before the payload is buffered. `feed()` returns early after a
    frame whose type is in `stop_after`, leaving the rest buffered: call
    `feed(b"")` to go on.
    """

    __slots__ = ("_buffer", "max_payload", "stop_after")

    def __init__(self, max_payload: int = MAX_HELLO_PAYLOAD, stop_after: frozenset = frozenset()):
        self._buffer = bytearray()
        self.max_payload = max_payload
        self.stop_after = stop_after

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        buf = self._buffer
        if not buf and len(data) >= HEADER_SIZE:
            # Fast path: the read is exactly one whole frame (small messages).
            length, frame_type, flags, stream_id = HEADER.unpack_from(data)
            if (
                len(data) == HEADER_SIZE + length
                and length <= self.max_payload
                and frame_type in FRAME_TYPES
            ):
                return [(frame_type, flags, stream_id, bytes(data[HEADER_SIZE:]))]
        if buf:
            buf += data
            view = buf
        else:
            view = data  # common case: parse straight from the read, no copy in
        frames = []
        offset = 0
        end = len(view)
        unpack_from = HEADER.unpack_from
        max_payload = self.max_payload
        stop_after = self.stop_after
        with memoryview(view) as mv:  # one copy per payload, from either source
            while end - offset >= HEADER_SIZE:
                length, frame_type, flags, stream_id = unpack_from(view, offset)
                if length > max_payload:
                    raise FrameTooLargeError(
                        f"frame of {length} bytes exceeds the maximum of {max_payload}"
                    )
                if frame_type not in FRAME_TYPES:
                    raise MuxProtocolError(f"unknown frame type 0x{frame_type:02x}")
                stop = offset + HEADER_SIZE + length
                if stop > end:
                    break
                frames.append((frame_type, flags, stream_id, bytes(mv[offset + HEADER_SIZE : stop])))
                offset = stop
                if frame_type in stop_after:
                    break
        if buf:
            del buf[:offset]
        elif offset < end:
            buf += memoryview(view)[offset:]  # one copy of the partial tail, not two
        return frames
