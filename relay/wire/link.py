"""Twisted adapter around the sans-IO mux core, shared by the relay and the agent.

`MuxLink` owns the link transport (TLS over TCP): it feeds received bytes to a
`MuxConnection`, dispatches the events, flushes queued frames, and runs the
keepalive. `SplicedConnection` is one local TCP connection (a visitor on the
relay, a service on the agent) spliced to one mux stream.

Backpressure, both ways (Twisted producers and consumers):
- local -> link: a splice reads only while its stream has send window and the
  link transport is not paused; bytes the window did not take (at most one
  read) wait in `_stash` with the local socket paused.
- link -> local: received DATA is written to the local transport at once; the
  window credit goes back to the peer only once that transport is not paused
  (its buffer drained), so a stalled service or visitor costs at most its
  stream window, and never stalls the other streams of the link.

Half-close: local EOF -> FIN (after any stashed bytes); FIN -> loseWriteConnection.
This module knows nothing of tunnels, tokens or routing: subclasses do.
"""

import os

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from relay.mux import ErrorCode, MuxConnection, MuxProtocolError, MuxUsageError
from relay.mux.connection import LinkState
from relay.mux import events as ev
from relay.wire.interfaces import ILayeredTransport, IMemoryviewReceiver, ITurnEndReactor
from relay.wire.tcpio import read_into_shared_buffer, set_socket_options, write_now

DEFAULT_KEEPALIVE_INTERVAL_SECONDS = 10.0
DEFAULT_KEEPALIVE_TIMEOUT_SECONDS = 30.0
# Twisted's TLS loseConnection waits for the peer's close_notify forever: a
# peer that never answers must not keep a dead link around.
CLOSE_DEADLINE_SECONDS = 5.0
# flush_soon() writes at once past this much queued DATA: a turn of 64 busy
# streams queued 4 MiB, and joining, encrypting and sending it all at the end
# of the turn, out of cache, cost the agent 1.7x the CPU per GB of one stream.
FLUSH_NOW_BYTES = 256 * 1024


@implementer(IHalfCloseableProtocol, IPushProducer)
class SplicedConnection(Protocol):
    """A local TCP connection spliced to one mux stream.

    Also the push producer registered with its own transport: that transport
    calls pauseProducing()/resumeProducing() on us as its write buffer fills
    and drains, which is when we hold back or return window credit.
    """

    _log = Logger()

    def __init__(self, link: "MuxLink", stream_id: int):
        self.link = link
        self.stream_id = stream_id
        self.stream_open = True  # the mux stream still exists on our side
        self._early: list[bytes] = []  # DATA that came before the local connection
        self._stash = b""  # local bytes our send window has not taken yet
        self._eof_pending = False  # local EOF seen; FIN waits for the stash
        self._peer_fin = False
        self._write_paused = False
        self._uncredited = 0
        self._read_paused = False
        self._window_empty = False
        self._read_closed = False
        self._write_closed = False
        self.preamble = b""  # written before any stream bytes (agent: a PROXY header)

    # -- local side (Twisted calls these) ------------------------------------

    def connectionMade(self):
        if not self.stream_open:
            # The stream died (reset, link lost) while we were connecting.
            self.transport.abortConnection()
            return
        set_socket_options(self.transport, keepalive=True)
        self.transport.registerProducer(self, True)
        if self.preamble:
            write_now(self.transport, self.preamble)
        early, self._early = self._early, []
        for data in early:
            self.deliver(data)
        self.update_reading()
        if self._peer_fin:
            self._half_close()
        self.link.flush_soon()

    def dataReceived(self, data: bytes):
        if not self.stream_open:
            return
        if self._stash:
            self._stash += data  # only after a pause raced with a read in flight
        else:
            self._stash = data
        self.push()
        self.link.flush_soon()

    def readConnectionLost(self):
        self._read_closed = True
        self._eof_pending = True
        self.push()
        self.link.flush_soon()
        self._close_if_done()

    def writeConnectionLost(self):
        self._write_closed = True
        self._close_if_done()

    def _close_if_done(self):
        # Twisted leaves a half-closed socket open after both halves end. Our
        # FIN must be queued too: stashed bytes may still wait for window.
        if self._read_closed and self._write_closed and not self._eof_pending:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.link.splice_lost(self)

    # -- IPushProducer for the local transport's writes ----------------------

    def pauseProducing(self):
        self._write_paused = True

    def resumeProducing(self):
        self._write_paused = False
        if self._uncredited and self.stream_open:
            self.link.mux.consumed(self.stream_id, self._uncredited)
            self._uncredited = 0
            self.link.flush_soon()

    def stopProducing(self):
        self._write_paused = True

    # -- link side (MuxLink calls these) -------------------------------------

    def deliver(self, data: bytes) -> None:
        """Bytes from the peer: write them on, credit them once written."""
        if self.transport is None:
            self._early.append(data)  # not connected yet: uncredited, so bounded by the window
            return
        write_now(self.transport, data)
        if self._write_paused:
            self._uncredited += len(data)
        else:
            self.link.mux.consumed(self.stream_id, len(data))

    def peer_ended(self) -> None:
        self._peer_fin = True
        if self.transport is not None:
            self._half_close()

    def _half_close(self) -> None:
        # No DATA follows a FIN, so no credit is owed: drop the producer first,
        # or a paused one makes Twisted skip the shutdown once the buffer drains.
        self.transport.unregisterProducer()
        if self._read_closed and not self._eof_pending:
            # The local side's EOF came first and its FIN is queued: both
            # directions are done, so close in one step (half-close, then
            # close, took Twisted two more reactor turns per connection).
            # Buffered bytes still go first.
            self.transport.loseConnection()
        else:
            self.transport.loseWriteConnection()

    def window_opened(self) -> None:
        self.push()

    def push(self) -> None:
        """Move stashed bytes into the stream as far as the window allows."""
        mux = self.link.mux
        if self.stream_open and self.stream_id not in mux.streams:
            # The peer reset it in the same read that opened its window: events
            # come after the core applied every frame of that read.
            self.stream_open = False
        if not self.stream_open:
            return
        if self._stash:
            taken = mux.send(self.stream_id, self._stash)
            self._stash = self._stash[taken:] if taken < len(self._stash) else b""
        self._window_empty = bool(self._stash) or mux.send_window(self.stream_id) <= 0
        if self._eof_pending and not self._stash:
            self._eof_pending = False
            mux.end_stream(self.stream_id)
            self.stream_open = self.stream_id in mux.streams
            if self._peer_fin and self.transport is not None:
                self._close_if_done()  # the close waited for this FIN
        self.update_reading()

    def update_reading(self) -> None:
        if self.transport is None or self._read_closed:
            # After EOF Twisted has dropped the reader; resumeProducing() would
            # add it back, read EOF again and call readConnectionLost twice (FIN twice).
            return
        should_pause = self._window_empty or self.link.paused
        if should_pause and not self._read_paused:
            self._read_paused = True
            self.transport.pauseProducing()
        elif not should_pause and self._read_paused:
            self._read_paused = False
            self.transport.resumeProducing()

    def abort(self) -> None:
        """The stream is gone (reset, or the link died): drop the local side now."""
        self.stream_open = False
        self._early = []
        if self.transport is not None:
            self.transport.abortConnection()


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
    ):
        self.mux = mux
        self.clock = clock
        self.keepalive_interval_seconds = keepalive_interval_seconds
        self.keepalive_timeout_seconds = keepalive_timeout_seconds
        self.splices: dict[int, SplicedConnection] = {}
        self.paused = False
        self.closed = False
        self.last_received = clock.seconds()
        self.peer = "?"
        self._keepalive_call = None
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
        if self.mux.has_outgoing():  # most reads only deliver: nothing to send
            self.flush_soon()

    def connectionLost(self, reason):
        self.closed = True
        self._cancel_timers()
        self._cancel_close_deadline()  # aborting a lost TLS transport raises
        splices, self.splices = self.splices, {}
        for splice in splices.values():
            splice.abort()
        self.on_link_lost(reason)

    # -- IPushProducer: the link transport's write buffer --------------------

    def pauseProducing(self):
        if not self.paused:
            self.paused = True
            for splice in self.splices.values():
                splice.update_reading()

    def resumeProducing(self):
        if self.paused:
            self.paused = False
            # Rotate who goes first: resuming in the same order every time let
            # the first streams refill the buffer and starve the rest (64
            # streams measured a fairness index of 0.02; dilation outbound.py).
            splices = list(self.splices.values())
            if splices:
                first = self._resume_turn % len(splices)
                self._resume_turn += 1
                for splice in splices[first:] + splices[:first]:
                    splice.push()
            self.flush_soon()

    def stopProducing(self):
        self.paused = True

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

    def attach_splice(self, splice: SplicedConnection) -> None:
        self.splices[splice.stream_id] = splice

    def splice_lost(self, splice: SplicedConnection) -> None:
        """The local connection closed: reset the stream if it is still open."""
        if self.splices.get(splice.stream_id) is splice:
            del self.splices[splice.stream_id]
        if splice.stream_open and splice.stream_id in self.mux.streams and not self.closed:
            if self.mux.queued_data_bytes:
                self.flush()  # DATA corked this turn goes before the RESET (sent ahead of data)
            self.mux.reset(splice.stream_id, ErrorCode.CANCEL, "connection closed")
            self.flush_soon()
        splice.stream_open = False

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
            self.mux.ping(os.urandom(8))
            self.flush()
        # Check again at the interval, or exactly at the deadline if that is sooner.
        delay = min(self.keepalive_interval_seconds, self.keepalive_timeout_seconds - silent)
        self._keepalive_call = self.clock.callLater(max(delay, 0.05), self._keepalive)

    def _cancel_close_deadline(self) -> None:
        if self._close_deadline is not None and self._close_deadline.active():
            self._close_deadline.cancel()
        self._close_deadline = None

    def _cancel_timers(self) -> None:
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
        splice = self.splices.get(event.stream_id)
        if splice is None:
            # Raced with our reset: the bytes are dropped, the credit too (stream gone).
            return
        splice.deliver(event.data)

    def _on_stream_ended(self, event: ev.StreamEnded):
        splice = self.splices.get(event.stream_id)
        if splice is not None:
            splice.stream_open = event.stream_id in self.mux.streams
            splice.peer_ended()

    def _on_stream_reset(self, event: ev.StreamReset):
        splice = self.splices.pop(event.stream_id, None)
        if splice is not None:
            self.on_stream_reset(event.stream_id, event.code, event.reason)
            splice.abort()

    def _on_window_opened(self, event: ev.WindowOpened):
        splice = self.splices.get(event.stream_id)
        if splice is not None:
            splice.window_opened()

    def _on_stream_accepted(self, event: ev.StreamAccepted):
        self.on_stream_accepted(event.stream_id)

    def _on_pong(self, event: ev.PongReceived):
        pass  # receiving it already refreshed last_received

    def _on_goaway(self, event: ev.GoAwayReceived):
        self.on_goaway(event.code, event.message)
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

