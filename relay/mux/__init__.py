"""The tunnel-relay mux protocol, sans-IO: bytes in, events and bytes out.

Stdlib only: no Twisted, no sockets, no clock, no logging. Both the relay and
the agent drive a `MuxConnection` through the thin adapter in `relay.wire.link`.
The wire format is specified in docs/protocol.md.
"""

from relay.mux.connection import MuxConnection, Role, StreamState
from relay.mux.errors import (
    ErrorCode,
    FlowControlError,
    FrameTooLargeError,
    LinkBufferFullError,
    MuxError,
    MuxProtocolError,
    MuxUsageError,
)
from relay.mux.frames import PROTOCOL_VERSION, FrameType

__all__ = [
    "PROTOCOL_VERSION",
    "ErrorCode",
    "FlowControlError",
    "FrameTooLargeError",
    "FrameType",
    "LinkBufferFullError",
    "MuxConnection",
    "MuxError",
    "MuxProtocolError",
    "MuxUsageError",
    "Role",
    "StreamState",
]
