"""relay.wire.interfaces: who provides each contract, and that the pieces that
check one act on the interface (not on a look-alike attribute)."""

import socket

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from relay.mux import MuxConnection, Role
from relay.wire.interfaces import ILayeredTransport, IMemoryviewReceiver, ITurnEndReactor
from relay.wire.link import MuxLink
from relay.wire.reactor import RelayReactor
from relay.wire.tlslayer import TLSLayer
from tests.relay.test_link import TurnEndClock


def test_the_relay_pieces_provide_their_interfaces():
    assert verifyClass(ITurnEndReactor, RelayReactor)
    assert verifyClass(ILayeredTransport, TLSLayer)
    assert IMemoryviewReceiver.implementedBy(TLSLayer)  # its BIO copies each raw read
    assert IMemoryviewReceiver.implementedBy(MuxLink)  # its frame decoder copies payloads


def test_tls_layer_names_its_raw_transport():
    layer = TLSLayer(None, StringTransport(), Clock())
    raw = StringTransport()
    layer.transport = raw  # what makeConnection sets, without starting a handshake
    assert verifyObject(ILayeredTransport, layer)
    assert layer.raw_transport() is raw


class LookAlikeClock(Clock):
    """Has the method, but does not declare ITurnEndReactor."""

    def __init__(self):
        super().__init__()
        self.queued = []

    def call_at_turn_end(self, f):
        self.queued.append(f)


def link_on(clock):
    link = MuxLink(MuxConnection(Role.AGENT), clock)
    writes = []
    transport = StringTransport()
    transport.writeSequence = lambda seq: writes.append(b"".join(seq))
    link.makeConnection(transport)
    return link, writes


def test_a_link_corks_only_on_a_clock_that_provides_iturnendreactor():
    """Flushes wait for the turn end on an ITurnEndReactor, and go out at
    once on anything else, even a clock that has a call_at_turn_end."""
    corked, corked_writes = link_on(TurnEndClock())
    corked.mux.send_hello({"token": "x"})
    corked.flush_soon()
    assert corked_writes == []

    plain, plain_writes = link_on(LookAlikeClock())
    plain.mux.send_hello({"token": "x"})
    plain.flush_soon()
    assert len(plain_writes) == 1
    assert plain.clock.queued == []


class RawTCP(StringTransport):
    """Passes for a Twisted TCP connection with relay.wire.tcpio: a socket and
    _dataReceived (the protocol's path for reads and EOF)."""

    def __init__(self):
        super().__init__()
        self.socket, self.peer_socket = socket.socketpair()
        self.socket.setblocking(False)
        self.through_protocol = []

    def _dataReceived(self, data):
        self.through_protocol.append(bytes(data))

    def close(self):
        self.socket.close()
        self.peer_socket.close()


class Layer(StringTransport):
    def __init__(self, raw):
        super().__init__()
        self.raw = raw
        self.received = []

    def raw_transport(self):
        return self.raw

    def dataReceived(self, data):
        self.received.append(bytes(data))


@implementer(ILayeredTransport, IMemoryviewReceiver)
class CopyingLayer(Layer):
    pass


@implementer(ILayeredTransport)
class KeepingLayer(Layer):
    """A layer that may keep what it is given: no shared buffer for it."""


def test_a_link_reads_the_raw_transport_of_a_copying_layer_into_the_shared_buffer():
    raw = RawTCP()
    try:
        layer = CopyingLayer(raw)
        MuxLink(MuxConnection(Role.RELAY), Clock()).makeConnection(layer)
        assert "doRead" in vars(raw)
        raw.peer_socket.sendall(b"ciphertext")
        assert raw.doRead() is None
        assert layer.received == [b"ciphertext"]  # straight to the layer
        assert raw.through_protocol == []
    finally:
        raw.close()


def test_a_link_leaves_the_raw_reads_of_other_transports_alone():
    for layer in (KeepingLayer(RawTCP()), StringTransport()):
        MuxLink(MuxConnection(Role.RELAY), Clock()).makeConnection(layer)
        raw = getattr(layer, "raw", None)
        if raw is not None:
            assert "doRead" not in vars(raw)
            raw.close()
