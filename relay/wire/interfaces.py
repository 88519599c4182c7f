"""The contracts between relay.wire's pieces, named as zope.interface interfaces.

What this module is: the interfaces one piece checks on another with
``providedBy``, where it used to look for an attribute. Each is checked once,
when the object is wired up (a link is built or connected, a TLS layer gets
its inner protocol), never per read or write.

What it is not: Twisted's own interfaces (``IProtocol``, ``ITCPTransport``,
``IPushProducer``...) stay in ``twisted.internet.interfaces``; and nothing
here is sent on the wire.
"""

from zope.interface import Interface


class ITurnEndReactor(Interface):
    """A reactor (or test clock) that can run a call once the events of the
    current poll batch are handled, before it waits again
    (`relay.wire.reactor.RelayReactor`). A mux link corks the frames of one
    turn into one write on it; on any other clock it writes at once."""

    def call_at_turn_end(f):
        """Run ``f()`` once, after the events of this poll batch; a call
        queued outside a batch (by a timer) runs without waiting for I/O.
        For the reactor thread only."""


class IMemoryviewReceiver(Interface):
    """Marker: this protocol's ``dataReceived`` may be given a memoryview of
    a buffer that is reused as soon as it returns, and copies whatever it
    keeps before returning (the mux link's frame decoder does; the TLS layer
    writes raw bytes into its BIO). `relay.wire.tlslayer` then delivers
    views of its decrypt buffer, and `relay.wire.tcpio.read_into_shared_buffer`
    may read into one shared buffer for it."""


class ILayeredTransport(Interface):
    """A transport that is itself the protocol of a transport below it (the
    TLS layer over a TCP connection): whatever reads the layer's bytes for it
    may read the raw transport directly and hand them to the layer's
    ``dataReceived``."""

    def raw_transport():
        """The transport this layer's bytes travel on (None before it is connected)."""


class IHalfCloseableTransport(Interface):
    """A transport that can end its write side alone. `ITCPTransport` has
    ``loseWriteConnection`` too, along with TCP options a stream does not have."""

    def loseWriteConnection():
        """Send EOF (a TCP FIN, a mux FIN) after what is queued; keep reading."""
