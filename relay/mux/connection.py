"""MuxConnection: every link and stream rule of the mux protocol, in one place.

Sans-IO (as h2's H2Connection): `receive_data()` takes bytes from the link and
returns events; commands (`open_stream`, `send`, `end_stream`, `reset`, ...)
queue frames; `outgoing()` hands the queued bytes to whoever owns the socket.
A peer that breaks a rule makes `receive_data()` raise `MuxProtocolError`
after queueing GOAWAY(code): the owner flushes `outgoing()` and closes.

Roles: the agent dials and speaks first (HELLO with its token); the relay
answers HELLO to accept or GOAWAY to refuse. The relay opens streams with even
ids, the agent with odd ids (none yet); 0 is the link itself.
"""

from enum import Enum

from relay.mux import events as ev
from relay.mux import frames as fr
from relay.mux.errors import (
    CalmDownError,
    ErrorCode,
    LinkBufferFullError,
    FlowControlError,
    MuxProtocolError,
    MuxUsageError,
    UnsupportedVersionError,
)
from relay.mux.frames import FrameType
from relay.mux.window import MIN_STREAM_WINDOW, LinkBudget, ReceiveWindow, WindowPool

# 256 KiB lets a new stream start fast on loopback and LAN; auto-tuning grows
# it per stream to cover real round trips (a fixed 256 KiB window caps one
# stream at window/RTT: 2.6 MB/s at 100 ms, frp's yamux lesson).
DEFAULT_INITIAL_WINDOW = 256 * 1024
# 8 MiB covers 400 Mbit/s x 100 ms RTT (5 MB) with room; cloudflared uses 6 MB.
DEFAULT_MAX_WINDOW = 8 * 1024 * 1024
# Growth above the initial window lent out per link: bounds what one link can
# make us buffer beyond n_streams x initial window (cloudflared: 30 MB/conn).
DEFAULT_LINK_BUDGET = 64 * 1024 * 1024
# Initial windows of the streams a link opens, in all (window.WindowPool):
# 16,384 streams x 256 KiB let one link make us buffer 4 GiB; 40 stalled
# downloads kept the relay 72 MB larger. New streams' windows shrink as the
# pool fills, and past it no stream opens (the relay refuses the visitor).
DEFAULT_WINDOW_CAP = 64 * 1024 * 1024
# Bounds of a window a peer announces (HELLO initial_window, OPEN window).
MIN_PEER_WINDOW = 1024
MAX_WINDOW = 2**31 - 1
# The key of OPEN's metadata that carries the opener's receive window for
# the stream, when it is not the opener's HELLO initial_window. The core
# reads and strips it: the application never sees it.
OPEN_WINDOW_KEY = "window"
# Frames that do nothing (empty DATA; DATA, WINDOW_UPDATE, FIN or RESET for a
# stream already gone) add one to a count that each useful frame lowers by
# one; past this the link ends with GOAWAY(ENHANCE_YOUR_CALM). Races with a
# RESET make a few such frames per stream; 1M empty DATA frames (0.94 us
# each) used to run for ever.
MAX_USELESS_FRAMES = 10_000
# Frames for a gone stream are a legitimate race after every stream that ends
# (an ACCEPT or WINDOW_UPDATE crossing our RESET or last FIN): each stream we
# forget lets this many of them through uncounted, so a link of many short
# visitors (health checks) never reaches the bound.
RACE_FRAMES_PER_STREAM = 4
MAX_RACE_ALLOWANCE = 4 * 65_536


class Role(Enum):
    RELAY = "relay"
    AGENT = "agent"


class LinkState(Enum):
    AWAITING_HELLO = "awaiting-hello"  # no HELLO exchanged yet
    HELLO_SENT = "hello-sent"  # agent: sent HELLO, waiting for the relay's
    OPEN = "open"
    CLOSED = "closed"  # GOAWAY sent or received


class StreamState(Enum):
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed-local"  # we sent FIN
    HALF_CLOSED_REMOTE = "half-closed-remote"  # peer sent FIN
    CLOSED = "closed"


class StreamInput(Enum):
    SEND_DATA = "send-data"
    SEND_FIN = "send-fin"
    SEND_RESET = "send-reset"
    RECV_DATA = "recv-data"
    RECV_FIN = "recv-fin"
    RECV_RESET = "recv-reset"


_S, _I = StreamState, StreamInput
# (state, input) -> next state. A missing pair is an error: a protocol error
# for RECV_* inputs, a usage error for SEND_* inputs.
STREAM_TRANSITIONS = {
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_FIN): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.SEND_RESET): _S.CLOSED,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_FIN): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _I.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RECV_RESET): _S.CLOSED,
}


class _Stream:
    __slots__ = ("stream_id", "state", "send_window", "recv", "accepted", "pooled")

    def __init__(self, stream_id: int, send_window: int, recv: ReceiveWindow, pooled: int = 0):
        self.stream_id = stream_id
        self.state = StreamState.OPEN
        self.send_window = send_window
        self.recv = recv
        self.accepted = False  # ACCEPT sent (peer's stream) or received (ours)
        self.pooled = pooled  # its initial window, taken from the link's pool (ours only)

    def transition(self, stream_input: StreamInput) -> None:
        try:
            self.state = STREAM_TRANSITIONS[(self.state, stream_input)]
        except KeyError:
            message = f"stream {self.stream_id}: {stream_input.value} in state {self.state.value}"
            if stream_input.name.startswith("RECV"):
                raise MuxProtocolError(message, ErrorCode.STREAM_CLOSED) from None
            raise MuxUsageError(message) from None


class MuxConnection:
    def __init__(
        self,
        role: Role,
        *,
        initial_window: int = DEFAULT_INITIAL_WINDOW,
        max_window: int = DEFAULT_MAX_WINDOW,
        link_budget: int = DEFAULT_LINK_BUDGET,
        window_cap: int = DEFAULT_WINDOW_CAP,
        min_window: int = MIN_STREAM_WINDOW,
        max_useless_frames: int = MAX_USELESS_FRAMES,
    ):
        self.role = role
        self.max_useless_frames = max_useless_frames
        self.useless_frames = 0
        self._race_allowance = 0  # gone-stream frames still expected from races
        # Streams we opened that the peer has neither accepted nor reset.
        self.opens_in_flight = 0
        self.state = LinkState.AWAITING_HELLO
        self.initial_window = initial_window
        self.max_window = max_window
        self.budget = LinkBudget(link_budget)
        if not MIN_PEER_WINDOW <= min_window <= window_cap:
            raise MuxUsageError(f"window cap {window_cap} with a floor of {min_window}")
        self.window_pool = WindowPool(window_cap, min_window)
        # The peer's initial window, learned from its HELLO.
        self.peer_initial_window = DEFAULT_INITIAL_WINDOW
        self.streams: dict[int, _Stream] = {}
        self._decoder = fr.FrameDecoder(fr.MAX_HELLO_PAYLOAD, stop_after=fr.STOP_AFTER)
        self._control: list[bytes] = []  # goes out ahead of data
        # Control bytes ever queued: the adapter compares it over time to see
        # how many replies (PONG, WINDOW_UPDATE, RESET, CONTROL) a peer that
        # does not read makes us owe.
        self.control_bytes_total = 0
        self._data: list[bytes] = []
        self.queued_data_bytes = 0  # DATA payload bytes queued since the last outgoing()
        self._next_stream_id = 2 if role is Role.RELAY else 1
        self._highest_peer_stream_id = 0
        self.goaway: tuple[ErrorCode | int, str] | None = None
        # GOAWAY(DRAINING) sent / received: the link stays open for the streams
        # it has, and neither side opens another (docs/protocol.md, "Draining").
        self.draining_local = False
        self.draining_remote = False
        self.peer_hello: dict | None = None
        self._handlers = {
            FrameType.HELLO: self._on_hello,
            FrameType.CONTROL: self._on_control,
            FrameType.OPEN: self._on_open,
            FrameType.DATA: self._on_data,
            FrameType.WINDOW_UPDATE: self._on_window_update,
            FrameType.FIN: self._on_fin,
            FrameType.RESET: self._on_reset,
            FrameType.PING: self._on_ping,
            FrameType.PONG: self._on_pong,
            FrameType.GOAWAY: self._on_goaway,
            FrameType.ACCEPT: self._on_accept,
        }

    # -- link lifecycle ---------------------------------------------------

    def send_hello(self, info: dict) -> None:
        """Agent: introduce ourselves. Relay: accept the agent's HELLO."""
        if self.state is not LinkState.AWAITING_HELLO:
            raise MuxUsageError(f"HELLO in link state {self.state.value}")
        if self.role is Role.RELAY and self.peer_hello is None:
            raise MuxUsageError("the relay answers HELLO; it never sends first")
        body = dict(info, version=fr.PROTOCOL_VERSION, initial_window=self.initial_window)
        self._queue_control(fr.encode_json(FrameType.HELLO, 0, body))
        if self.role is Role.AGENT:
            self.state = LinkState.HELLO_SENT
        else:
            self._open_link()

    def _open_link(self) -> None:
        self.state = LinkState.OPEN
        self._decoder.max_payload = fr.MAX_FRAME_PAYLOAD

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Queue GOAWAY: no new streams; the owner closes after flushing."""
        if self.state is LinkState.CLOSED:
            return
        self.state = LinkState.CLOSED
        self._queue_control(fr.encode_coded(FrameType.GOAWAY, 0, code, message))

    def drain(self, message: str = "") -> None:
        """Queue GOAWAY(DRAINING): we open no more streams and refuse the
        peer's new ones; the streams we have go on. `close()` ends the link
        once they are done."""
        self._require_open()
        if self.draining_local:
            return
        self.draining_local = True
        self._queue_control(fr.encode_coded(FrameType.GOAWAY, 0, ErrorCode.DRAINING, message))

    @property
    def draining(self) -> bool:
        """Either side said GOAWAY(DRAINING): no new streams on this link."""
        return self.draining_local or self.draining_remote

    # -- commands -----------------------------------------------------------

    def send_control(self, message: dict) -> None:
        self._require_open()
        self._queue_control(fr.encode_json(FrameType.CONTROL, 0, message))

    def next_stream_window(self) -> int:
        """The receive window a stream opened now would get; 0: the link's
        window cap is reached and `open_stream` would refuse."""
        return self.window_pool.offer(self.initial_window)

    def open_stream(self, metadata: dict) -> int:
        """Open a stream (OPEN with `metadata`). Its receive window comes from
        the link's pool: smaller as the pool fills (the OPEN says so), and
        `LinkBufferFullError` past the cap (check `next_stream_window()`)."""
        self._require_open()
        if self.draining_local or self.draining_remote:
            raise MuxUsageError("the link is draining: no new streams")
        if OPEN_WINDOW_KEY in metadata:
            raise MuxUsageError(f"{OPEN_WINDOW_KEY!r} in OPEN metadata is the protocol's")
        stream_id = self._next_stream_id
        if stream_id > fr.MAX_STREAM_ID:
            raise MuxUsageError("stream ids exhausted on this link; open a new link")
        window = self.window_pool.take(self.initial_window)
        if window == 0:
            raise LinkBufferFullError(
                f"{self.window_pool.granted} bytes of stream windows granted, cap {self.window_pool.cap}"
            )
        self._next_stream_id += 2
        self.streams[stream_id] = _Stream(
            stream_id,
            self.peer_initial_window,
            ReceiveWindow(window, self.max_window),
            pooled=window,
        )
        if window != self.initial_window:
            metadata = dict(metadata)
            metadata[OPEN_WINDOW_KEY] = window  # the peer's send window for this stream
        self._queue_control(fr.encode_json(FrameType.OPEN, stream_id, metadata))
        self.opens_in_flight += 1
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Tell the peer its OPEN reached what it asked for (ACCEPT). Once per
        stream the peer opened; a stream already gone is a no-op (a race with
        the peer's RESET)."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if not self._is_peer_id(stream_id):
            raise MuxUsageError(f"stream {stream_id} is ours: the peer accepts it")
        if stream.accepted:
            raise MuxUsageError(f"stream {stream_id} already accepted")
        stream.accepted = True
        self._queue_control(fr.encode(FrameType.ACCEPT, stream_id))

    def is_accepted(self, stream_id: int) -> bool:
        stream = self.streams.get(stream_id)
        return stream is not None and stream.accepted

    def send_window(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        return stream.send_window if stream is not None else 0

    def send(self, stream_id: int, data: bytes) -> int:
        """Queue as much of `data` as the window allows; return the count taken."""
        stream = self._stream_for_send(stream_id)
        if stream.state is not StreamState.OPEN:  # OPEN stays OPEN: skip the table (hot path)
            stream.transition(StreamInput.SEND_DATA)
        n = min(len(data), stream.send_window)
        if n == 0:
            return 0
        stream.send_window -= n
        self.queued_data_bytes += n
        out = self._data
        if n <= fr.MAX_DATA_PAYLOAD:
            chunk = data if n == len(data) else data[:n]
            out.append(fr.header(FrameType.DATA, stream_id, n))
            out.append(chunk)
        else:
            view = memoryview(data)
            for start in range(0, n, fr.MAX_DATA_PAYLOAD):
                chunk = bytes(view[start : min(start + fr.MAX_DATA_PAYLOAD, n)])
                out.append(fr.header(FrameType.DATA, stream_id, len(chunk)))
                out.append(chunk)
        return n

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (FIN)."""
        stream = self._stream_for_send(stream_id)
        stream.transition(StreamInput.SEND_FIN)
        self._data.append(fr.encode(FrameType.FIN, stream_id))  # after the stream's data
        self._forget_if_closed(stream)

    def reset(self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abort the stream both ways. Resetting a gone stream is a no-op."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.transition(StreamInput.SEND_RESET)
        self._queue_control(fr.encode_coded(FrameType.RESET, stream_id, code, reason))
        self._forget_if_closed(stream)

    def consumed(self, stream_id: int, n: int) -> None:
        """We wrote n received bytes on: credit the peer (maybe, batched)."""
        stream = self.streams.get(stream_id)
        if stream is None or n <= 0:
            return
        if n > stream.recv.pending:
            raise MuxUsageError(f"stream {stream_id}: consumed {n} bytes, only {stream.recv.pending} received")
        grant = stream.recv.consumed(n, self.budget)
        if grant and stream.state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            self._queue_control(fr.encode_window_update(stream_id, grant))

    def ping(self, opaque: bytes) -> None:
        self._require_open()  # the peer refuses PING before the handshake
        if len(opaque) != fr.PING_SIZE:
            raise MuxUsageError("PING payload must be 8 bytes")
        self._queue_control(fr.encode(FrameType.PING, 0, opaque))

    def outgoing(self) -> list[bytes]:
        """Take the queued bytes: control frames first, then data in order."""
        if not self._data:
            out, self._control = self._control, []
            return out
        out = self._control
        out.extend(self._data)
        self._control = []
        self._data = []
        self.queued_data_bytes = 0
        return out

    def has_outgoing(self) -> bool:
        return bool(self._control or self._data)

    # -- receiving ----------------------------------------------------------

    def receive_data(self, data: bytes) -> list[ev.Event]:
        if self.state is LinkState.CLOSED:
            # GOAWAY went one way or the other: ignore whatever trails it. After
            # our own GOAWAY the peer's in-flight frames are no fault of its own
            # (Twisted's TLS keeps delivering until the peer's close_notify).
            return []
        try:
            events: list[ev.Event] = []
            handlers = self._handlers
            frames = self._decoder.feed(data)
            while frames:
                for frame_type, flags, stream_id, payload in frames:
                    event = handlers[frame_type](stream_id, payload)
                    if event is not None:
                        events.append(event)
                    if self.goaway is not None:
                        return events
                # The decoder stopped after a HELLO, which may have raised the
                # size limit for the frames behind it, or after a GOAWAY that
                # kept the link (DRAINING): decode those now.
                last = frames[-1][0]
                again = last == FrameType.HELLO or (last == FrameType.GOAWAY and self.state is LinkState.OPEN)
                frames = self._decoder.feed(b"") if again else []
            return events
        except MuxProtocolError as e:
            self.close(e.code, str(e))
            raise

    def _queue_control(self, frame: bytes) -> None:
        self._control.append(frame)
        self.control_bytes_total += len(frame)

    def _require_open(self) -> None:
        if self.state is not LinkState.OPEN:
            raise MuxUsageError(f"link is {self.state.value}")

    def _stream_for_send(self, stream_id: int) -> _Stream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise MuxUsageError(f"stream {stream_id} is not open")
        return stream

    def _forget_if_closed(self, stream: _Stream) -> None:
        if stream.state is StreamState.CLOSED:
            del self.streams[stream.stream_id]
            stream.recv.release(self.budget)
            if stream.pooled:
                self.window_pool.release(stream.pooled)
            if not stream.accepted and not self._is_peer_id(stream.stream_id):
                self.opens_in_flight -= 1  # ended before the peer accepted it
            self._race_allowance = min(self._race_allowance + RACE_FRAMES_PER_STREAM, MAX_RACE_ALLOWANCE)

    def _gone_stream_frame(self, what: str) -> None:
        if self._race_allowance:
            self._race_allowance -= 1  # the race every ended stream may leave behind
            return
        self._useless(what)

    def _useless(self, what: str) -> None:
        self.useless_frames += 1
        if self.useless_frames > self.max_useless_frames:
            raise CalmDownError(f"{self.useless_frames} frames that do nothing, the last {what}")

    def _is_peer_id(self, stream_id: int) -> bool:
        # relay opens even ids, so the agent's peer ids are even, and vice versa
        return (stream_id % 2 == 0) == (self.role is Role.AGENT)

    def _peer_stream(self, stream_id: int, frame: str) -> _Stream | None:
        """The stream a frame addresses; None if it was closed (frames may trail a RESET)."""
        if self.state is not LinkState.OPEN:
            raise MuxProtocolError(f"{frame} before the link is open")
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream
        if stream_id == 0:
            raise MuxProtocolError(f"{frame} on stream 0")
        if self._is_peer_id(stream_id):
            opened = stream_id <= self._highest_peer_stream_id
        else:
            opened = stream_id < self._next_stream_id
        if not opened:
            raise MuxProtocolError(f"{frame} on stream {stream_id}, which was never opened")
        return None

    # -- frame handlers: one per type ----------------------------------------

    def _on_hello(self, stream_id: int, payload: bytes):
        if stream_id != 0:
            raise MuxProtocolError("HELLO on a stream other than 0")
        expected = LinkState.AWAITING_HELLO if self.role is Role.RELAY else LinkState.HELLO_SENT
        if self.state is not expected or self.peer_hello is not None:
            raise MuxProtocolError(f"unexpected HELLO in link state {self.state.value}")
        info = fr.decode_json(payload)
        version = info.get("version")
        if type(version) is not int or version != fr.PROTOCOL_VERSION:  # True == 1 in Python
            raise UnsupportedVersionError(
                f"peer speaks version {info.get('version')!r}; this side speaks {fr.PROTOCOL_VERSION}"
            )
        window = info.get("initial_window", DEFAULT_INITIAL_WINDOW)
        if type(window) is not int or not MIN_PEER_WINDOW <= window <= MAX_WINDOW:
            raise MuxProtocolError(f"bad initial_window {window!r}")
        self.peer_initial_window = window
        self.peer_hello = info
        if self.role is Role.AGENT:
            self._open_link()
        return ev.HelloReceived(info)

    def _on_control(self, stream_id: int, payload: bytes):
        if self.state is not LinkState.OPEN:
            raise MuxProtocolError("CONTROL before the link is open")
        if stream_id != 0:
            raise MuxProtocolError("CONTROL on a stream other than 0")
        return ev.ControlReceived(fr.decode_json(payload))

    def _on_open(self, stream_id: int, payload: bytes):
        if self.state is not LinkState.OPEN:
            raise MuxProtocolError("OPEN before the link is open")
        if stream_id == 0 or not self._is_peer_id(stream_id):
            raise MuxProtocolError(f"OPEN with stream id {stream_id} of the wrong parity")
        if stream_id <= self._highest_peer_stream_id:
            raise MuxProtocolError(f"OPEN reuses stream id {stream_id}")
        if self.draining_remote:
            raise MuxProtocolError(f"OPEN of stream {stream_id} after the peer's GOAWAY(DRAINING)")
        metadata = fr.decode_json(payload)
        send_window = self.peer_initial_window
        if OPEN_WINDOW_KEY in metadata:
            # The opener's receive window for this stream, smaller than its
            # HELLO's as its link nears its cap: our send window starts there.
            send_window = metadata.pop(OPEN_WINDOW_KEY)
            if type(send_window) is not int or not MIN_PEER_WINDOW <= send_window <= MAX_WINDOW:
                raise MuxProtocolError(f"OPEN of stream {stream_id}: bad window {send_window!r}")
        self._highest_peer_stream_id = stream_id
        stream = self.streams[stream_id] = _Stream(
            stream_id,
            send_window,
            ReceiveWindow(self.initial_window, self.max_window),
        )
        if self.draining_local:
            # It crossed our GOAWAY(DRAINING) on the wire: no fault of the
            # peer's, but we take no new streams (HTTP/2's streams above a
            # GOAWAY's last id are refused the same way, RFC 9113 6.8).
            self.reset(stream.stream_id, ErrorCode.REFUSED_STREAM, "draining")
            return None
        return ev.StreamOpened(stream_id, metadata)

    def _on_data(self, stream_id: int, payload: bytes):
        stream = self._peer_stream(stream_id, "DATA")
        if stream is None:
            self._gone_stream_frame("DATA for a gone stream")
            return None
        if stream.state is not StreamState.OPEN:  # OPEN stays OPEN: skip the table (hot path)
            stream.transition(StreamInput.RECV_DATA)
        if not stream.recv.received(len(payload)):
            raise FlowControlError(
                f"stream {stream_id}: {len(payload)} bytes past a window of {stream.recv.remaining}"
            )
        if not payload:
            self._useless("an empty DATA")
            return None
        if self.useless_frames:
            self.useless_frames -= 1
        return ev.DataReceived(stream_id, payload)

    def _on_window_update(self, stream_id: int, payload: bytes):
        if len(payload) != 4:
            raise MuxProtocolError("WINDOW_UPDATE payload is not 4 bytes")
        stream = self._peer_stream(stream_id, "WINDOW_UPDATE")
        if stream is None:
            self._gone_stream_frame("WINDOW_UPDATE for a gone stream")
            return None
        (increment,) = fr.U32.unpack(payload)
        if increment == 0:
            raise MuxProtocolError(f"stream {stream_id}: WINDOW_UPDATE of 0")
        was_empty = stream.send_window <= 0
        stream.send_window += increment
        if stream.send_window > 2**31 - 1:
            raise FlowControlError(f"stream {stream_id}: window above 2^31-1")
        if was_empty and stream.state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
            return ev.WindowOpened(stream_id)
        return None

    def _on_fin(self, stream_id: int, payload: bytes):
        stream = self._peer_stream(stream_id, "FIN")
        if stream is None:
            self._gone_stream_frame("FIN for a gone stream")
            return None
        stream.transition(StreamInput.RECV_FIN)
        self._forget_if_closed(stream)
        return ev.StreamEnded(stream_id)

    def _on_reset(self, stream_id: int, payload: bytes):
        code, reason = fr.decode_coded(payload)
        stream = self._peer_stream(stream_id, "RESET")
        if stream is None:
            self._gone_stream_frame("RESET for a gone stream")
            return None
        stream.transition(StreamInput.RECV_RESET)
        self._forget_if_closed(stream)
        return ev.StreamReset(stream_id, code, reason)

    def _on_ping(self, stream_id: int, payload: bytes):
        if self.state is not LinkState.OPEN:
            raise MuxProtocolError("PING before the link is open")
        if stream_id != 0 or len(payload) != fr.PING_SIZE:
            raise MuxProtocolError("PING must be 8 bytes on stream 0")
        self._queue_control(fr.encode(FrameType.PONG, 0, payload))
        return None

    def _on_pong(self, stream_id: int, payload: bytes):
        if self.state is not LinkState.OPEN:
            raise MuxProtocolError("PONG before the link is open")
        if stream_id != 0 or len(payload) != fr.PING_SIZE:
            raise MuxProtocolError("PONG must be 8 bytes on stream 0")
        return ev.PongReceived(payload)

    def _on_accept(self, stream_id: int, payload: bytes):
        if payload:
            raise MuxProtocolError("ACCEPT carries no payload")
        if stream_id != 0 and self._is_peer_id(stream_id):
            raise MuxProtocolError(f"ACCEPT for stream {stream_id}, which the peer opened")
        stream = self._peer_stream(stream_id, "ACCEPT")
        if stream is None:
            self._gone_stream_frame("ACCEPT for a gone stream")  # raced with our RESET
            return None
        if stream.accepted:
            raise MuxProtocolError(f"stream {stream_id} accepted twice")
        stream.accepted = True
        self.opens_in_flight -= 1
        return ev.StreamAccepted(stream_id)

    def _on_goaway(self, stream_id: int, payload: bytes):
        if stream_id != 0:
            raise MuxProtocolError("GOAWAY on a stream other than 0")
        code, message = fr.decode_coded(payload)
        if code == ErrorCode.DRAINING and self.state is LinkState.OPEN:
            # The link stays for the streams in progress; the final GOAWAY follows.
            if self.draining_remote:
                return None  # said once is enough
            self.draining_remote = True
            return ev.GoAwayReceived(code, message)
        # Any other GOAWAY, or DRAINING before the link is open (a relay
        # refusing a login while it drains), ends the link.
        self.goaway = (code, message)
        self.state = LinkState.CLOSED
        return ev.GoAwayReceived(code, message)
