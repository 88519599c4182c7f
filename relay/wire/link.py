"""Twisted adapter around the sans-IO mux core, shared by the relay and the agent.

`MuxLink` owns the link transport (TLS over TCP): it feeds received bytes to a
`MuxConnection`, dispatches the events to its streams, flushes queued frames,
and runs the keepalive. Each stream is a `MuxStream` (relay.wire.stream), the
transport of whatever protocol runs on it (a `Splice` side, a `TLSLayer`);
the stream rules (credit, window, half-close) live there.

Backpressure from the link transport: when it is full, every stream pauses
the producer above it; the streams that paused one are kept in `_blocked`, so
a resume visits only those, in a rotating order.

This module knows nothing of tunnels, tokens or routing: subclasses do. It
groups streams by the "tunnel" of their OPEN metadata, so a subclass can close
or count one tunnel's streams without scanning the others.
"""

import os

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from relay.mux import ErrorCode, MuxConnection, MuxProtocolError, MuxUsageError
from relay.mux.connection import LinkState
from relay.mux import events as ev
from relay.wire.metrics import NULL_METRICS
from relay.wire.stream import MuxStream
from relay.wire.interfaces import ILayeredTransport, IMemoryviewReceiver, ITurnEndReactor
from relay.wire.tcpio import read_into_shared_buffer, set_socket_options

DEFAULT_KEEPALIVE_INTERVAL_SECONDS = 10.0
DEFAULT_KEEPALIVE_TIMEOUT_SECONDS = 30.0
# Twisted's TLS loseConnection waits for the peer's close_notify forever: a
# peer that never answers must not keep a dead link around.
CLOSE_DEADLINE_SECONDS = 5.0
# flush_soon() writes at once past this much queued DATA: a turn of 64 busy
# streams queued 4 MiB, and joining, encrypting and sending it all at the end
# of the turn, out of cache, cost the agent 1.7x the CPU per GB of one stream.
FLUSH_NOW_BYTES = 256 * 1024
# While the link transport is full, the control frames we queue are replies
# the peer made us owe (PONG, WINDOW_UPDATE, RESET, control replies): past
# this many bytes of them we stop reading the peer until the transport drains
# (grpc-go stops reading on too many queued control frames; nghttp2 caps
# outstanding ACKs). A peer pinging without reading grew the relay by 22 MB/s.
# DATA is not counted: windows bound it, and a bidirectional bulk transfer
# that paused reading on a full buffer could deadlock both ends.
MAX_OWED_CONTROL_BYTES = 64 * 1024
# A link whose transport has not drained for this long is aborted, whatever
# PINGs say (yamux's ConnectionWriteTimeout): a peer that stopped reading.
DEFAULT_WRITE_STALL_SECONDS = 30.0


# IMemoryviewReceiver: the frame decoder copies each payload (relay.wire.tlslayer).
@implementer(IPushProducer, IMemoryviewReceiver)
class MuxLink(Protocol):
    """One mux link over a stream transport; subclasses add the relay's or the
    agent's behaviour through the on_* hooks."""

    _log = Logger()

    def __init__(
        self,
        mux: MuxConnection,
        clock,
        *,
        keepalive_interval_seconds: float = DEFAULT_KEEPALIVE_INTERVAL_SECONDS,
        keepalive_timeout_seconds: float = DEFAULT_KEEPALIVE_TIMEOUT_SECONDS,
        metrics=NULL_METRICS,
        write_stall_seconds: float = DEFAULT_WRITE_STALL_SECONDS,
    ):
        self.write_stall_seconds = write_stall_seconds
        self._stall_call = None  # runs out if the transport stays full
        self._control_mark = 0  # mux.control_bytes_total when the transport filled
        self.reading_paused = False  # we stopped reading the peer: it owes us reads
        self.mux = mux
        self.metrics = metrics
        self.clock = clock
        self.keepalive_interval_seconds = keepalive_interval_seconds
        self.keepalive_timeout_seconds = keepalive_timeout_seconds
        self.streams: dict[int, MuxStream] = {}
        self.streams_by_tunnel: dict[str | None, dict[MuxStream, None]] = {}
        # Streams that paused their producer (window used up, or we are paused):
        # the only ones a resume must visit. A dict, for a stable rotation order.
        self._blocked: dict[MuxStream, None] = {}
        self.paused = False
        self.closed = False
        self.last_received = clock.seconds()
        self.peer = "?"
        self._keepalive_call = None
        # The round trip of the last answered PING (keepalive or send_ping):
        # what a PONG costs through the link, queued behind its DATA. Read by
        # the agent's terminal view (client/console.py); None until one came.
        self.rtt_seconds: float | None = None
        self._ping_in_flight: tuple[bytes, float] | None = None  # (opaque, sent at)
        self._close_deadline = None
        self._resume_turn = 0
        self._at_turn_end = clock.call_at_turn_end if ITurnEndReactor.providedBy(clock) else None
        self._flush_queued = False
        self._handlers = {
            ev.HelloReceived: self._on_hello_event,
            ev.ControlReceived: self._on_control_event,
            ev.StreamOpened: self._on_stream_opened_event,
            ev.DataReceived: self._on_data,
            ev.StreamEnded: self._on_stream_ended,
            ev.StreamReset: self._on_stream_reset,
            ev.WindowOpened: self._on_window_opened,
            ev.PongReceived: self._on_pong,
            ev.GoAwayReceived: self._on_goaway,
            ev.StreamAccepted: self._on_stream_accepted,
        }

    # -- Protocol ------------------------------------------------------------

    def connectionMade(self):
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        set_socket_options(self.transport)
        if ILayeredTransport.providedBy(self.transport) and IMemoryviewReceiver.providedBy(self.transport):
            # Large reads for bulk, without a large allocation per read; the
            # TLS layer copies each read into its BIO (tcpio.read_into_shared_buffer).
            read_into_shared_buffer(self.transport.raw_transport(), self.transport.dataReceived)
        self.transport.registerProducer(self, True)
        self.last_received = self.clock.seconds()
        self._keepalive_call = self.clock.callLater(self.keepalive_interval_seconds, self._keepalive)
        self.on_connected()

    def dataReceived(self, data: bytes):
        self.last_received = self.clock.seconds()  # any frame counts as liveness
        try:
            events = self.mux.receive_data(data)
            handlers = self._handlers
            for event in events:
                try:
                    handlers[type(event)](event)
                except MuxUsageError as e:
                    # A race, not a bug of the peer's: e.g. a CONTROL answered after a
                    # GOAWAY in the same read closed the core. The next events still run.
                    self._log.debug("link {peer}: {error}", peer=self.peer, error=e)
                if self.closed:
                    return
        except MuxProtocolError as e:
            # The core queued GOAWAY(code) for its own errors; hooks raise too.
            self._log.warn("closing link {peer}: {error}", peer=self.peer, error=e)
            self.close_link(e.code, str(e))
            return
        except Exception as e:
            # Whatever a peer's bytes made go wrong is one typed reset of its
            # link and one line, never an "Unhandled Error" traceback.
            self._log.error(
                "closing link {peer}: {kind} while handling its frames: {error}",
                peer=self.peer, kind=type(e).__name__, error=str(e)[:200],
            )
            self.close_link(ErrorCode.INTERNAL_ERROR, "internal error")
            return
        if self.paused and not self.reading_paused and (
            self.mux.control_bytes_total - self._control_mark > MAX_OWED_CONTROL_BYTES
        ):
            self.reading_paused = True
            self.transport.pauseProducing()  # until our transport drains
            self._log.info(
                "link {peer} does not read what it asks for: reading it paused", peer=self.peer
            )
        if self.mux.has_outgoing():  # most reads only deliver: nothing to send
            self.flush_soon()

    def connectionLost(self, reason):
        self.closed = True
        self._cancel_timers()
        self._cancel_close_deadline()  # aborting a lost TLS transport raises
        streams = list(self.streams.values())
        for stream in streams:
            stream.link_lost(reason)
        self.streams = {}
        self.streams_by_tunnel = {}
        self._blocked = {}
        self.on_link_lost(reason)

    # -- IPushProducer: the link transport's write buffer --------------------

    def pauseProducing(self):
        if not self.paused:
            self.paused = True
            self._control_mark = self.mux.control_bytes_total
            if self._stall_call is None and not self.closed:
                self._stall_call = self.clock.callLater(self.write_stall_seconds, self._write_stalled)
            self.metrics.flow_stalled(getattr(self, "session_id", self.peer))
            for stream in self.streams.values():  # pausing a producer ends no stream
                stream.update_producer()

    def resumeProducing(self):
        if self.paused:
            self.paused = False
            self._cancel_stall()
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resumeProducing()
            # Rotate who goes first: resuming in the same order every time let
            # the first streams refill the buffer and starve the rest (64
            # streams measured a fairness index of 0.02; dilation outbound.py).
            blocked = list(self._blocked)
            if blocked:
                first = self._resume_turn % len(blocked)
                self._resume_turn += 1
                for stream in blocked[first:] + blocked[:first]:
                    stream.push()
            self.flush_soon()

    def stopProducing(self):
        self.paused = True

    def _write_stalled(self) -> None:
        self._stall_call = None
        if self.closed:
            return
        self._log.warn(
            "link {peer}: nothing written for {seconds:g}s (the peer stopped reading): aborting it",
            peer=self.peer, seconds=self.write_stall_seconds,
        )
        self.close_link(ErrorCode.ENHANCE_YOUR_CALM, "write stalled")
        self.abort_link()  # it will not read our GOAWAY or close_notify either

    def _cancel_stall(self) -> None:
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stall_call = None

    # -- commands -------------------------------------------------------------

    def flush(self) -> None:
        """Write every queued frame now."""
        if self.mux.has_outgoing() and self.transport is not None:
            self.transport.writeSequence(self.mux.outgoing())

    def flush_soon(self) -> None:
        """Write queued frames once this reactor turn's events are handled, in
        one TLS write and one send() for all of them (relay.wire.reactor); at once
        on a reactor without that hook."""
        if self._at_turn_end is None or self.mux.queued_data_bytes >= FLUSH_NOW_BYTES:
            self.flush()
        elif not self._flush_queued:
            self._flush_queued = True
            self._at_turn_end(self._turn_end_flush)

    def _turn_end_flush(self) -> None:
        self._flush_queued = False
        self.flush()

    def close_link(self, code: ErrorCode | None = None, message: str = "") -> None:
        """Send GOAWAY (if not already queued) and close, with a deadline."""
        if self.closed:
            return
        self.closed = True
        if code is not None:
            self.flush()  # DATA corked this turn goes before the GOAWAY
            self.mux.close(code, message)
        self.flush()
        self._cancel_timers()
        # Twisted's TLS sends close_notify only once no producer is registered
        # (protocols/tls.py loseConnection); without this every close waited
        # for the deadline below. The link produces nothing more anyway.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._close_deadline = self.clock.callLater(CLOSE_DEADLINE_SECONDS, self.abort_link)

    def abort_link(self) -> None:
        self._cancel_close_deadline()
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()

    def drain(self, message: str) -> None:
        """GOAWAY(DRAINING): no new streams either way; close once the last
        stream in progress ends (`on_drained`), or now if there is none."""
        if self.closed or self.mux.draining_local or self.mux.state is not LinkState.OPEN:
            return
        self.mux.drain(message)
        self.flush()
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if not self.closed and self.mux.draining_local and not self.streams:
            self.on_drained()

    def on_drained(self) -> None:
        """Our drain is done: the final GOAWAY."""
        self.close_link(ErrorCode.NO_ERROR, "drained")

    def open_stream(self, metadata: dict, protocol) -> MuxStream:
        """Open a stream to the peer (OPEN with `metadata`), with `protocol` on it."""
        stream = MuxStream(self, self.mux.open_stream(metadata), metadata)
        self._add_stream(stream)
        stream.start(protocol)
        self.flush_soon()  # the OPEN, with whatever the protocol wrote at once
        return stream

    def serve_stream(self, stream_id: int, metadata: dict, protocol) -> MuxStream:
        """Run `protocol` on a stream the peer opened (from on_stream_opened).
        The peer hears ACCEPT only once `stream.accept()` is called."""
        stream = MuxStream(self, stream_id, metadata)
        self._add_stream(stream)
        stream.start(protocol)
        return stream

    def _add_stream(self, stream: MuxStream) -> None:
        self.streams[stream.stream_id] = stream
        group = self.streams_by_tunnel.get(stream.tunnel_id)
        if group is None:
            group = self.streams_by_tunnel[stream.tunnel_id] = {}
        group[stream] = None

    def stream_ended(self, stream: MuxStream) -> None:
        """A stream of ours is closed (MuxStream calls this once)."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        group = self.streams_by_tunnel.get(stream.tunnel_id)
        if group is not None:
            group.pop(stream, None)
            if not group:
                del self.streams_by_tunnel[stream.tunnel_id]
        self._blocked.pop(stream, None)
        if self.mux.draining_local and not self.streams and not self.closed:
            # Not from inside the stream's own ending: after this turn.
            self.clock.callLater(0, self._close_if_drained)

    def stream_blocked(self, stream: MuxStream) -> None:
        self._blocked[stream] = None

    def stream_unblocked(self, stream: MuxStream) -> None:
        self._blocked.pop(stream, None)

    # -- keepalive --------------------------------------------------------------

    def _keepalive(self) -> None:
        self._keepalive_call = None
        if self.closed:
            return
        silent = self.clock.seconds() - self.last_received
        if silent >= self.keepalive_timeout_seconds:
            self._log.warn(
                "link {peer} silent for {seconds:.0f}s: closing it", peer=self.peer, seconds=silent
            )
            self.on_keepalive_timeout()
            self.close_link(ErrorCode.KEEPALIVE_TIMEOUT, "keepalive timeout")
            self.abort_link()  # a silent peer will not answer close_notify either
            return
        if self.mux.state is LinkState.OPEN:
            self.send_ping()
        # Check again at the interval, or exactly at the deadline if that is sooner.
        delay = min(self.keepalive_interval_seconds, self.keepalive_timeout_seconds - silent)
        self._keepalive_call = self.clock.callLater(max(delay, 0.05), self._keepalive)

    def send_ping(self) -> None:
        """PING the peer now; its PONG sets `rtt_seconds`. Only the latest
        PING is timed: a PONG to an older one (or a peer's stray) is liveness only."""
        opaque = os.urandom(8)
        self._ping_in_flight = (opaque, self.clock.seconds())
        self.mux.ping(opaque)
        self.flush()

    def _cancel_close_deadline(self) -> None:
        if self._close_deadline is not None and self._close_deadline.active():
            self._close_deadline.cancel()
        self._close_deadline = None

    def _cancel_timers(self) -> None:
        self._cancel_stall()
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None

    # -- event handlers ---------------------------------------------------------

    def _on_hello_event(self, event: ev.HelloReceived):
        self.on_hello(event.info)

    def _on_control_event(self, event: ev.ControlReceived):
        self.on_control(event.message)

    def _on_stream_opened_event(self, event: ev.StreamOpened):
        self.on_stream_opened(event.stream_id, event.metadata)

    def _on_data(self, event: ev.DataReceived):
        stream = self.streams.get(event.stream_id)
        if stream is None:
            # Raced with our reset: the bytes are dropped, the credit too (stream gone).
            return
        stream.data_received(event.data)

    def _on_stream_ended(self, event: ev.StreamEnded):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.fin_received()

    def _on_stream_reset(self, event: ev.StreamReset):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self.on_stream_reset(event.stream_id, event.code, event.reason)
            stream.reset_received(event.code, event.reason)

    def _on_window_opened(self, event: ev.WindowOpened):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.window_opened()

    def _on_stream_accepted(self, event: ev.StreamAccepted):
        self.on_stream_accepted(event.stream_id)

    def _on_pong(self, event: ev.PongReceived):
        # Receiving it already refreshed last_received.
        in_flight = self._ping_in_flight
        if in_flight is not None and event.opaque == in_flight[0]:
            self._ping_in_flight = None
            self.rtt_seconds = self.clock.seconds() - in_flight[1]

    def _on_goaway(self, event: ev.GoAwayReceived):
        self.on_goaway(event.code, event.message)
        if self.mux.state is not LinkState.OPEN:  # DRAINING keeps it for the streams in progress
            self.close_link()

    # -- hooks for subclasses ---------------------------------------------------

    def on_connected(self) -> None:
        pass

    def on_hello(self, info: dict) -> None:
        raise MuxProtocolError("unexpected HELLO")

    def on_control(self, message: dict) -> None:
        pass

    def on_stream_opened(self, stream_id: int, metadata: dict) -> None:
        self.mux.reset(stream_id, ErrorCode.REFUSED_STREAM, "this side accepts no streams")

    def on_stream_reset(self, stream_id: int, code, reason: str) -> None:
        pass

    def on_stream_accepted(self, stream_id: int) -> None:
        pass

    def on_goaway(self, code, message: str) -> None:
        pass

    def on_keepalive_timeout(self) -> None:
        pass

    def on_link_lost(self, reason) -> None:
        pass

