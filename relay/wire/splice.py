"""`Splice`: two transports joined, each the producer of the other.

One class for every splice of the tunnel: a visitor's TCP connection (or its
relay-terminated TLS plaintext, or its passthrough raw bytes) to a
`MuxStream` on the relay; a `MuxStream` (or the plaintext of a `TLSLayer`
running on one) to the service's TCP connection on the agent. It is not a
proxy with buffers of its own: bytes read on one side are written to the
other at once, and Twisted's producer/consumer pair bounds everything.

A splice has two protocols, `a` and `b` (`_SpliceSide`), one per transport.
Each side is the push producer registered on the *other* side's transport:
when that transport's buffer fills, it pauses the side, which pauses reading
its own transport (a TCP socket stops being read; a `MuxStream` withholds
window credit). The side sits between the two so the splice, not the
transport, decides what a consumer's ``stopProducing`` means (nothing: the
``connectionLost`` that follows it does).

Rules:
- Either side may connect first (the agent's stream exists before its service
  connection). The first side waits with its transport paused; bytes still
  delivered meanwhile (a read in flight, or DATA a paused stream does not
  credit) are kept and written first at the join, after the `preamble` of the
  side that receives them (a PROXY header for the service).
- Half-close both ways: EOF read on one side -> ``loseWriteConnection`` on the
  other (after unregistering the producer that can produce no more: a paused
  one would make Twisted skip the shutdown). When the other direction is
  already done, the EOF closes at once instead (half-close, then close, took
  Twisted two more reactor turns per connection).
- Both directions done (each transport's ``writeConnectionLost``) -> both close.
- A side lost before both EOFs were passed on (a reset, an abort, a stream
  RESET) aborts the other: the peer must not wait for bytes that never come.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol, ILoggingContext, IProtocol, IPushProducer
from zope.interface import implementer

from relay.wire.stream import MuxStream
from relay.wire.tcpio import lose_connection, set_socket_options, write_now
from relay.wire.tlslayer import TLSLayer


def _is_socket(transport) -> bool:
    """write_now for a TCP socket (sent at once when idle, docs/performance.md);
    a stream's or TLS layer's own write otherwise (write_now would only fall
    back to it, after a failed attribute lookup per write)."""
    return not isinstance(transport, (MuxStream, TLSLayer))


@implementer(IProtocol, ILoggingContext, IHalfCloseableProtocol, IPushProducer)
class _SpliceSide:
    """The protocol of one transport of a `Splice`, and the producer that the
    other transport pauses.

    IProtocol written out rather than inherited from `Protocol`, for
    __slots__: every open visitor holds two sides for its whole life (bench:
    RSS per idle visitor), and an instance dict would be most of their size.
    """

    __slots__ = (
        "splice", "other", "preamble", "when_connected", "transport", "connected", "_peer",
        "_peer_is_socket", "_early", "read_ended", "eof_passed", "write_ended", "lost", "paused",
        "_waiting", "cancel_connect",
    )

    def __init__(self, splice: "Splice"):
        self.splice = splice
        self.transport = None
        self.connected = False
        self.other: _SpliceSide | None = None
        self.preamble = b""  # written to this side's transport before anything else
        # Called at connectionMade, before the side waits (it may connect the
        # other side at once: no pause and resume of this transport then).
        self.when_connected = None
        # The other transport once joined, and how to write to it. Plain
        # attributes, not a bound write per side: an idle visitor holds
        # these for its whole life (bench: RSS per idle visitor).
        self._peer = None
        self._peer_is_socket = False
        self._early: list[bytes] | None = None
        self.read_ended = False  # EOF read (passed on, or to be at the join)
        self.eof_passed = False  # the other transport was told (loseWriteConnection)
        self.write_ended = False  # our transport's write side is done (or it is gone)
        self.lost = False
        self.paused = False  # the other transport's consumer paused us
        self._waiting = False  # we paused our transport until the other side connects
        # Set while this side's transport is being dialled: called if the other
        # side is lost first, so the dial stops instead of connecting for nobody.
        self.cancel_connect = None

    # -- Twisted calls these -----------------------------------------------------

    def logPrefix(self) -> str:
        return "Splice"

    def makeConnection(self, transport):
        self.connected = True
        self.transport = transport
        self.connectionMade()

    def connectionMade(self):
        self.cancel_connect = None
        transport = self.transport
        if not isinstance(transport, MuxStream):
            set_socket_options(transport, keepalive=True)
        hook, self.when_connected = self.when_connected, None
        if hook is not None:
            hook()
        self.splice._side_connected(self)

    def dataReceived(self, data: bytes):
        peer = self._peer
        if peer is None:
            # Bounded: our transport is paused until the join.
            if self._early is None:
                self._early = [data]
            else:
                self._early.append(data)
        elif self._peer_is_socket:
            write_now(peer, data)
        else:
            peer.write(data)

    def readConnectionLost(self):
        self.read_ended = True
        if self._peer is not None:
            self.splice._pass_eof(self)

    def writeConnectionLost(self):
        self.write_ended = True
        self.splice._write_ended()

    def connectionLost(self, reason):
        self.lost = True
        self.write_ended = True
        self._early = None
        self.splice._side_lost(self)

    # -- IPushProducer, registered on the other side's transport -------------------

    def pauseProducing(self):
        if not self.paused:
            self.paused = True
            if not self._waiting and not self.read_ended and not self.lost:
                self.transport.pauseProducing()

    def resumeProducing(self):
        if self.paused:
            self.paused = False
            # After EOF Twisted has dropped the reader; resuming a TCP
            # transport would read EOF again (readConnectionLost twice).
            if not self._waiting and not self.read_ended and not self.lost:
                self.transport.resumeProducing()

    def stopProducing(self):
        pass  # the other transport is closing: its connectionLost decides


class Splice:
    """Joins the transports of `a` and `b`: use ``splice.a`` and ``splice.b``
    as the two protocols (in either order)."""

    __slots__ = ("a", "b", "joined")

    def __init__(self):
        self.a = _SpliceSide(self)
        self.b = _SpliceSide(self)
        self.a.other, self.b.other = self.b, self.a
        self.joined = False

    def _side_connected(self, side: _SpliceSide) -> None:
        if self.joined or side.lost:
            return
        other = side.other
        if other.lost:
            side.transport.abortConnection()  # e.g. the stream was reset while we connected
            return
        if not other.connected:
            side._waiting = True
            side.transport.pauseProducing()  # nothing to write to yet
            return
        self._join()

    def _join(self) -> None:
        self.joined = True
        a, b = self.a, self.b
        for side in (a, b):
            side._peer = side.other.transport
            side._peer_is_socket = _is_socket(side._peer)
        b.transport.registerProducer(a, True)
        a.transport.registerProducer(b, True)
        for side in (a, b):
            if side.preamble:
                side.other.dataReceived(side.preamble)  # written to side's own transport
        for side in (a, b):
            early, side._early = side._early, None
            for data in early or ():
                side.dataReceived(data)
            if side.read_ended and not side.eof_passed and not side.other.lost:
                self._pass_eof(side)  # EOF came before the join: pass it on now
        for side in (a, b):
            if side._waiting:
                side._waiting = False
                # Unless writing its kept bytes filled the other transport.
                if not side.paused and not side.read_ended and not side.lost:
                    side.transport.resumeProducing()

    def _pass_eof(self, side: _SpliceSide) -> None:
        """`side` read EOF: end the other transport's write side."""
        other = side.other
        side.eof_passed = True
        if other.lost:
            return
        transport = other.transport
        transport.unregisterProducer()  # `side` produces no more for it
        if side.write_ended:
            # The other direction already ended (its EOF reached our
            # transport): both are done, so close in one step. Buffered
            # bytes still go first.
            self._close(transport)
        else:
            transport.loseWriteConnection()

    def _write_ended(self) -> None:
        a, b = self.a, self.b
        if a.write_ended and b.write_ended:
            for side in (a, b):
                if not side.lost:
                    self._close(side.transport)

    @staticmethod
    def _close(transport) -> None:
        # A socket gets a deadline (a peer that never reads keeps it otherwise);
        # a TLS layer and a stream have their own.
        if _is_socket(transport):
            lose_connection(transport)
        else:
            transport.loseConnection()

    def _side_lost(self, side: _SpliceSide) -> None:
        other = side.other
        if other.transport is None and not other.lost:
            cancel, other.cancel_connect = other.cancel_connect, None
            if cancel is not None:
                cancel()  # nobody is left to splice it to
            return  # if it still connects, it sees `side.lost` and aborts
        if other.lost:
            return
        if not self.joined:
            other.transport.abortConnection()
            return
        if side.eof_passed and other.eof_passed:
            # Both directions ended in order: the other transport finishes
            # its last writes and closes (at once if it already has).
            self._write_ended()
            return
        other.transport.abortConnection()
