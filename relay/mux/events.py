"""Events returned by `MuxConnection.receive_data()`: past-tense facts."""

from dataclasses import dataclass

from relay.mux.errors import ErrorCode


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """The peer's HELLO: on the relay, the agent's credentials; on the agent,
    the relay's acceptance and parameters."""

    info: dict


@dataclass(frozen=True, slots=True)
class ControlReceived:
    """A control message (JSON object) on stream 0."""

    message: dict


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream_id: int
    metadata: dict


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The peer reached what our OPEN asked for (the agent: the service answered)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (FIN): no more data will come."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """Our send window for the stream grew from zero: sending may resume."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    code: ErrorCode
    message: str


Event = (
    HelloReceived
    | ControlReceived
    | StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowOpened
    | PongReceived
    | GoAwayReceived
)
