"""Error codes carried on the wire (RESET, GOAWAY) and the exception tree.

`MuxProtocolError` and its subclasses mean the peer broke a rule: the core has
queued GOAWAY(code) and the link must close. `MuxUsageError` is our own misuse
of the API: a local bug, never sent on the wire (as h11's LocalProtocolError).
"""

from enum import IntEnum


class ErrorCode(IntEnum):
    """u32 codes in RESET and GOAWAY payloads (docs/protocol.md, "Error codes")."""

    NO_ERROR = 0x0  # orderly close, GOAWAY on shutdown
    PROTOCOL_ERROR = 0x1  # peer broke a framing or state rule
    INTERNAL_ERROR = 0x2  # our bug; peer should reconnect
    FLOW_CONTROL_ERROR = 0x3  # peer sent past the window we granted
    FRAME_TOO_LARGE = 0x4  # length above the advertised maximum
    STREAM_CLOSED = 0x5  # frame for a stream that is half-closed that way
    UNSUPPORTED_VERSION = 0x6  # HELLO with a version we do not speak
    AUTH_FAILED = 0x7  # token refused: the agent must not retry
    HANDSHAKE_TIMEOUT = 0x8  # no HELLO within the deadline
    KEEPALIVE_TIMEOUT = 0x9  # nothing received within the keepalive timeout
    SESSION_REPLACED = 0xA  # the same agent reconnected on a new link
    CONNECT_FAILED = 0xB  # stream: the agent could not reach the service
    REFUSED_STREAM = 0xC  # stream: unknown tunnel or not accepting streams
    CANCEL = 0xD  # stream: the visitor or service went away
    BUFFER_OVERFLOW = 0xE  # stream: a local buffer cap was hit
    ENHANCE_YOUR_CALM = 0xF  # link: floods of useless frames, or replies the peer never reads
    # GOAWAY only, and the one GOAWAY that keeps the link: the sender is stopping
    # gracefully. Nobody opens a stream or asks for a tunnel on the link any
    # more; streams in progress finish, then the sender closes with a final
    # GOAWAY (docs/protocol.md, "Draining"). A peer that predates it closes at
    # once, as on any GOAWAY.
    DRAINING = 0x10
    # HELLO refused: its `join` names no live session of this token, or the
    # wrong join secret (docs/protocol.md, "Joining a session"). Not fatal:
    # the agent dials again, as a new session if none of its links is up.
    JOIN_REFUSED = 0x11


class MuxError(Exception):
    """Base of every error the mux core raises."""

    code = ErrorCode.INTERNAL_ERROR


class MuxProtocolError(MuxError):
    """The peer broke a protocol rule; the link is closed with GOAWAY(code)."""

    code = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class FrameTooLargeError(MuxProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class FlowControlError(MuxProtocolError):
    code = ErrorCode.FLOW_CONTROL_ERROR


class UnsupportedVersionError(MuxProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION


class CalmDownError(MuxProtocolError):
    """The peer sends frames that do nothing (empty DATA, frames for gone
    streams) faster than useful ones: RFC 9113 10.5's "track the use of these
    features and set limits"."""

    code = ErrorCode.ENHANCE_YOUR_CALM


class MuxUsageError(MuxError):
    """Local misuse of the API (e.g. writing after FIN). Never on the wire."""



class LinkBufferFullError(MuxUsageError):
    """`open_stream` past the link's window cap: the caller refuses whatever
    wanted the stream (the relay closes the visitor). Local, never on the wire."""
