"""`MuxStream`: one mux stream as a Twisted transport, for any protocol above it.

As Twisted's ``web/_http2.py`` ``H2Stream`` is a transport over the sans-IO h2
core, a `MuxStream` is one over `relay.mux.MuxConnection`: it provides
``ITransport`` (``write``, ``writeSequence``, ``loseConnection``, ``getPeer``,
``getHost``), half-close (``loseWriteConnection``) and ``abortConnection``, and
is both the ``IConsumer`` of the protocol above's producer and an
``IPushProducer`` that protocol (or the transport it writes to) pauses. A splice
(`relay.wire.splice`), a `TLSLayer`, or any other protocol runs on it
unchanged. It is not the link: `MuxLink` (relay.wire.link) owns the link
transport, creates streams and hands them their frames' events.

Rules (docs/architecture.md, "A visitor's bytes"):

Rule 1, link -> protocol: DATA goes to ``protocol.dataReceived`` at once. Its
window credit goes back to the peer at once too, unless the protocol above
has paused us (``pauseProducing``: it cannot take more, e.g. the socket it
splices to is full); then credit waits for ``resumeProducing``. A stalled
consumer therefore costs at most the stream's receive window.

Rule 2, protocol -> link: ``write`` queues what the send window allows and
keeps the rest (at most one read of the producer above: the stream pauses its
registered producer as soon as the window is used up or the link transport is
full, and resumes it when both open again).

Rule 3, half-close: ``loseWriteConnection`` sends FIN after any kept bytes,
then calls ``writeConnectionLost`` on the protocol above; the peer's FIN calls
its ``readConnectionLost`` (``IHalfCloseableProtocol``; a protocol that cannot
half-close gets ``loseConnection`` done for it, as Twisted's TCP does). Both
FINs -> ``connectionLost(ConnectionDone)``.

Rule 4, endings: ``abortConnection`` (or a RESET from the peer, or the link
dying) ends the stream at once with ``connectionLost(ConnectionLost)``.
``loseConnection`` is FIN after the kept bytes; what the peer still sends
until its FIN is credited and dropped, and a peer that has not sent FIN after
`CLOSE_DEADLINE_SECONDS` gets a RESET (closing never waits for the peer).

The stream's state moves only through `_TRANSITIONS`; a missing (state, input)
pair is our bug and raises `StreamStateError` naming both.
"""

from __future__ import annotations

import enum
import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.mux import ErrorCode, MuxUsageError
from relay.wire.interfaces import IHalfCloseableTransport

# Same deadline as the link's close and TLSLayer's: long enough for a last
# reply, short enough that a peer that never sends FIN cannot pin the stream.
CLOSE_DEADLINE_SECONDS = 5.0


class StreamState(enum.Enum):
    OPEN = "open"  # both directions open
    WRITE_CLOSED = "write-closed"  # our FIN is sent; the peer may still send
    READ_CLOSED = "read-closed"  # the peer's FIN came; we may still send
    CLOSED = "closed"  # both FINs, a RESET either way, or the link is gone


class StreamInput(enum.Enum):
    FIN_SENT = "fin-sent"
    FIN_RECEIVED = "fin-received"
    RESET_SENT = "reset-sent"
    RESET_RECEIVED = "reset-received"
    LINK_LOST = "link-lost"


_S, _I = StreamState, StreamInput
# (state, input) -> next state. Callers check idempotence first (a second
# abortConnection returns early), so a missing pair is a bug of ours.
_TRANSITIONS = {
    (_S.OPEN, _I.FIN_SENT): _S.WRITE_CLOSED,
    (_S.OPEN, _I.FIN_RECEIVED): _S.READ_CLOSED,
    (_S.OPEN, _I.RESET_SENT): _S.CLOSED,
    (_S.OPEN, _I.RESET_RECEIVED): _S.CLOSED,
    (_S.OPEN, _I.LINK_LOST): _S.CLOSED,
    (_S.WRITE_CLOSED, _I.FIN_RECEIVED): _S.CLOSED,
    (_S.WRITE_CLOSED, _I.RESET_SENT): _S.CLOSED,
    (_S.WRITE_CLOSED, _I.RESET_RECEIVED): _S.CLOSED,
    (_S.WRITE_CLOSED, _I.LINK_LOST): _S.CLOSED,
    (_S.READ_CLOSED, _I.FIN_SENT): _S.CLOSED,
    (_S.READ_CLOSED, _I.RESET_SENT): _S.CLOSED,
    (_S.READ_CLOSED, _I.RESET_RECEIVED): _S.CLOSED,
    (_S.READ_CLOSED, _I.LINK_LOST): _S.CLOSED,
}


class StreamStateError(RuntimeError):
    """Our own bug: an input the stream's table has no entry for (never on the wire)."""


def stream_address(pair):
    """A twisted address from OPEN metadata's [host, port]; host "" and port 0
    when the other end sent none (the agent never opens streams with one)."""
    if isinstance(pair, (list, tuple)) and len(pair) == 2:
        host, port = pair
        if isinstance(host, str) and isinstance(port, int):
            try:
                if ipaddress.ip_address(host).version == 6:
                    return IPv6Address("TCP", host, port)
            except ValueError:
                pass  # a name, or empty: kept as given
            return IPv4Address("TCP", host, port)
    return IPv4Address("TCP", "", 0)


@implementer(ITransport, IHalfCloseableTransport, IConsumer, IPushProducer)
class MuxStream:
    """One mux stream, the transport of `protocol`.

    Made by `MuxLink.open_stream` / `MuxLink.accept_stream`, which call
    ``protocol.makeConnection(stream)``; the link feeds it its events
    (`data_received`, `fin_received`, `reset_received`, `window_opened`,
    `link_lost`).
    """

    # Slots: every open visitor holds one stream for its whole life (bench:
    # RSS per idle visitor), and nothing else hangs attributes on it.
    __slots__ = (
        "link", "stream_id", "tunnel_id", "_peer_pair", "_local_pair", "state", "protocol", "bytes_in", "bytes_out",
        "opened_at", "connected", "disconnecting", "_mux", "_half_closeable", "_paused",
        "_uncredited", "_stash", "_fin_pending", "_producer", "_producer_paused",
        "_reported_open", "_close_call",
    )

    def __init__(self, link, stream_id: int, metadata: dict):
        self.link = link
        self.stream_id = stream_id
        # Only what the stream answers for, not the whole OPEN dict: it lives
        # as long as the visitor does.
        self._peer_pair = metadata.get("peer")
        self._local_pair = metadata.get("local")
        tunnel_id = metadata.get("tunnel")
        self.tunnel_id = tunnel_id if isinstance(tunnel_id, str) else None
        self.state = StreamState.OPEN
        self.protocol = None
        self.bytes_in = 0  # DATA bytes from the link, delivered to the protocol
        self.bytes_out = 0  # bytes the protocol wrote, sent onto the link
        self.opened_at = link.clock.seconds()
        self.connected = True
        self.disconnecting = False  # as on Twisted transports: loseConnection was called
        self._mux = link.mux
        self._half_closeable = False
        self._paused = False  # the protocol above paused us: credit waits
        self._uncredited = 0
        self._stash = b""  # written bytes the send window has not taken yet
        self._fin_pending = False  # loseWriteConnection called; FIN waits for the stash
        self._producer = None  # registered by the protocol above (its source of writes)
        self._producer_paused = False  # we paused it (window used up, or link full)
        self._reported_open = False
        self._close_call = None

    # -- lifecycle -------------------------------------------------------------

    def start(self, protocol) -> None:
        """Become `protocol`'s transport."""
        self.protocol = protocol
        self._half_closeable = IHalfCloseableProtocol.providedBy(protocol)
        protocol.makeConnection(self)

    def accept(self) -> None:
        """Tell the opener we reached what its OPEN asked for (ACCEPT)."""
        self._mux.accept_stream(self.stream_id)
        self.link.flush_soon()

    def report_opened(self) -> None:
        """Tell the metrics observer the stream reached its other end (once).
        Only a stream reported open is reported closed, so gauges balance."""
        if not self._reported_open:
            self._reported_open = True
            self.link.metrics.stream_opened(self.tunnel_id, self.link.clock.seconds() - self.opened_at)

    @property
    def reported_open(self) -> bool:
        """Whether the observer was told of this stream (a scrape-time
        collector counts the live bytes of exactly those streams)."""
        return self._reported_open

    def _move(self, stream_input: StreamInput) -> StreamState:
        try:
            self.state = _TRANSITIONS[(self.state, stream_input)]
        except KeyError:
            raise StreamStateError(
                f"stream {self.stream_id}: no transition for {stream_input.value} in state {self.state.value}"
            ) from None
        return self.state

    def _ended(self, reason: Failure) -> None:
        """The stream is CLOSED: forget it, report it, tell the protocol."""
        self.connected = False
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        self._stash = b""
        self._producer = None
        self.link.stream_ended(self)
        if self._reported_open:
            self.link.metrics.stream_closed(self.tunnel_id, self.bytes_in, self.bytes_out)
        if self.protocol is not None:
            self.protocol.connectionLost(reason)

    # -- link -> protocol (MuxLink calls these) ----------------------------------

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.bytes_in += n
        if self.disconnecting:
            # loseConnection was called: nobody reads any more, so the bytes
            # are dropped, but credited, or the peer would stall before its FIN.
            self._mux.consumed(self.stream_id, n)
            return
        self.protocol.dataReceived(data)
        # After the write: a consumer whose buffer that write filled has
        # paused us by now, and these bytes wait for its resumeProducing.
        if self._paused:
            self._uncredited += n
        else:
            self._mux.consumed(self.stream_id, n)

    def fin_received(self) -> None:
        state = self._move(StreamInput.FIN_RECEIVED)
        if not self.disconnecting:  # else nobody reads any more
            if self._half_closeable:
                self.protocol.readConnectionLost()
            elif state is not StreamState.CLOSED:
                self.loseConnection()  # as Twisted's TCP does for such a protocol
                return
        if self.connected:  # both directions ended
            if state is StreamState.CLOSED:
                self._ended(Failure(ConnectionDone("both directions ended")))

    def reset_received(self, code, reason: str) -> None:
        if self.state is StreamState.CLOSED:
            return
        self._move(StreamInput.RESET_RECEIVED)
        self._ended(Failure(ConnectionLost(f"stream reset by the peer: {getattr(code, 'name', code)} {reason}")))

    def link_lost(self, reason) -> None:
        if self.state is StreamState.CLOSED:
            return
        self._move(StreamInput.LINK_LOST)
        self._ended(Failure(ConnectionLost("the mux link is gone")))

    def window_opened(self) -> None:
        self.push()

    # -- protocol -> link: ITransport ----------------------------------------------

    def write(self, data) -> None:
        if self._fin_pending or self.state is StreamState.WRITE_CLOSED or self.state is StreamState.CLOSED:
            return  # like Twisted's transports: writes after a close are dropped
        if not data:
            return
        if self._stash:
            self._stash += data  # only after a pause raced with a read in flight
        else:
            try:
                taken = self._mux.send(self.stream_id, data)
            except MuxUsageError:
                return  # the peer's RESET is in this read's events: it ends us next
            self.bytes_out += taken
            if taken < len(data):
                self._stash = data[taken:]
        self.update_producer()
        self.link.flush_soon()

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def push(self) -> None:
        """Move kept bytes into the stream as far as the window allows; then a
        pending FIN; then let the producer above read again if it may."""
        if self.state is StreamState.CLOSED:
            return
        stash = self._stash
        try:
            if stash:
                taken = self._mux.send(self.stream_id, stash)
                self.bytes_out += taken
                self._stash = stash[taken:] if taken < len(stash) else b""
            if self._fin_pending and not self._stash:
                self._send_fin()
                return
        except MuxUsageError:
            return  # as in write()
        self.update_producer()
        self.link.flush_soon()

    def _send_fin(self) -> None:
        self._fin_pending = False
        self._mux.end_stream(self.stream_id)
        self.link.flush_soon()
        state = self._move(StreamInput.FIN_SENT)
        if not self.disconnecting and self._half_closeable:
            self.protocol.writeConnectionLost()
        if not self.connected:
            return  # the protocol aborted us meanwhile
        if state is StreamState.CLOSED:
            self._ended(Failure(ConnectionDone("both directions ended")))
        elif self.disconnecting:
            self._close_call = self.link.clock.callLater(CLOSE_DEADLINE_SECONDS, self._close_overdue)

    def update_producer(self) -> None:
        producer = self._producer
        if producer is None:
            return
        should_pause = bool(self._stash) or self.link.paused or self._mux.send_window(self.stream_id) <= 0
        if should_pause:
            if not self._producer_paused:
                self._producer_paused = True
                self.link.stream_blocked(self)
                producer.pauseProducing()
        elif self._producer_paused:
            self._producer_paused = False
            self.link.stream_unblocked(self)
            producer.resumeProducing()

    def loseWriteConnection(self) -> None:
        """FIN after the kept bytes; the peer may go on sending."""
        if self._fin_pending or self.state is not StreamState.OPEN and self.state is not StreamState.READ_CLOSED:
            return
        self._fin_pending = True
        self.push()

    def loseConnection(self) -> None:
        """FIN after the kept bytes, then drop (and credit) whatever the peer
        still sends until its FIN; RESET if that does not come in time."""
        if self.disconnecting or self.state is StreamState.CLOSED:
            return
        self.disconnecting = True
        self.unregisterProducer()  # it produces nothing we will send
        if self._uncredited:
            self._mux.consumed(self.stream_id, self._uncredited)
            self._uncredited = 0
        if self._fin_pending or self.state is StreamState.WRITE_CLOSED:
            if self.state is StreamState.WRITE_CLOSED:
                self._close_call = self.link.clock.callLater(CLOSE_DEADLINE_SECONDS, self._close_overdue)
            return
        self._fin_pending = True
        self.push()

    def _close_overdue(self) -> None:
        self._close_call = None
        self.reset(ErrorCode.CANCEL, "no FIN after close")

    def abortConnection(self) -> None:
        """RESET now: both directions end, kept bytes are dropped."""
        self.reset(ErrorCode.CANCEL, "connection closed")

    def reset(self, code: ErrorCode, reason: str) -> None:
        if self.state is StreamState.CLOSED:
            return
        self._move(StreamInput.RESET_SENT)
        link = self.link
        if not link.closed:
            if self._mux.queued_data_bytes:
                link.flush()  # DATA corked this turn goes first (RESET is sent ahead of data)
            self._mux.reset(self.stream_id, code, reason)
            link.flush_soon()
        self._ended(Failure(ConnectionAborted(reason)))

    def getPeer(self):
        """The visitor's address, as the relay's OPEN gave it."""
        return stream_address(self._peer_pair)

    def getHost(self):
        """The public address the visitor reached, as the relay's OPEN gave it."""
        return stream_address(self._local_pair)

    # -- IConsumer: the protocol above's source of writes ----------------------------

    def registerProducer(self, producer, streaming) -> None:
        if not streaming:
            raise ValueError("MuxStream takes push producers only")
        if self.state is StreamState.CLOSED:
            producer.stopProducing()  # as Twisted's transports do once disconnected
            return
        self._producer = producer
        self._producer_paused = False
        self.update_producer()

    def unregisterProducer(self) -> None:
        if self._producer_paused:
            self._producer_paused = False
            self.link.stream_unblocked(self)
        self._producer = None

    # -- IPushProducer: the protocol above's consumer controls our credit -------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._uncredited and self.state is not StreamState.CLOSED:
            self._mux.consumed(self.stream_id, self._uncredited)
            self._uncredited = 0
            self.link.flush_soon()

    def stopProducing(self) -> None:
        # Twisted's transports call this as they close: withhold credit; the
        # protocol above decides how the stream ends (the splice aborts it).
        self._paused = True
