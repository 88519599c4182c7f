"""Agent-side TLS for passthrough services given --cert/--key.

The relay passes the visitor's TLS through untouched; the agent terminates it
here, with the service's own certificate, and hands plaintext to the service.
It is a listener on 127.0.0.1 (an ephemeral port) that the agent's streams
connect to instead of the service: `TLSLayer` (relay/wire/tlslayer.py) on each
connection, and a plain TCP splice from its plaintext to the service. The extra
loopback hop keeps the agent's stream code the same for every kind of tunnel.
"""

import ssl

from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from client.errors import ConfigurationError
from relay.wire.tcpio import set_socket_options
from relay.wire.tlslayer import TLSLayerFactory

CONNECT_TIMEOUT_SECONDS = 10.0


def server_context(cert_path: str, key_path: str, client_ca: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_path, key_path)
        if client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=client_ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigurationError(f"cannot use --cert {cert_path} / --key {key_path}: {e}") from None
    return context


@implementer(IHalfCloseableProtocol)
class _HalfCloseSplice(Protocol):
    """One side of a TCP-to-TCP splice: writes what it reads to `peer`,
    with Twisted producers for backpressure and half-close both ways."""

    def __init__(self):
        self.peer: "_HalfCloseSplice | None" = None
        self._early: list[bytes] = []
        self._read_closed = self._write_closed = False

    def connectionMade(self):
        set_socket_options(self.transport, keepalive=True)

    def pair(self, peer: "_HalfCloseSplice") -> None:
        self.peer, peer.peer = peer, self
        # Each side's full write buffer pauses the other side's reading.
        self.transport.registerProducer(peer.transport, True)
        peer.transport.registerProducer(self.transport, True)
        for side in (self, peer):
            early, side._early = side._early, []
            for data in early:
                side.peer.transport.write(data)
            if side._read_closed:  # EOF came before the pair: pass it on now
                side.peer.transport.unregisterProducer()
                side.peer.transport.loseWriteConnection()

    def dataReceived(self, data: bytes):
        if self.peer is None:
            self._early.append(data)  # bounded: the service connect pauses our reading
        else:
            self.peer.transport.write(data)

    def readConnectionLost(self):
        self._read_closed = True
        if self.peer is not None:
            self.peer.transport.unregisterProducer()
            self.peer.transport.loseWriteConnection()
        self._maybe_close()

    def writeConnectionLost(self):
        self._write_closed = True
        self._maybe_close()

    def _maybe_close(self):
        if self._read_closed and self._write_closed:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _Plaintext(_HalfCloseSplice):
    """The decrypted side: connects to the service and splices to it."""

    _log = Logger()

    def __init__(self, terminator: "AgentTLSTerminator"):
        super().__init__()
        self.terminator = terminator

    def connectionMade(self):
        super().connectionMade()
        self.transport.pauseProducing()  # nothing to write to until the service answers
        outbound = _HalfCloseSplice()
        endpoint = HostnameEndpoint(
            self.terminator.reactor, self.terminator.host, self.terminator.port,
            timeout=CONNECT_TIMEOUT_SECONDS,
        )
        d = endpoint.connect(_OneProtocolFactory(outbound))
        d.addCallbacks(self._connected, self._failed)
        d.addErrback(lambda f: self._log.failure("TLS terminator splice failed", f))

    def _connected(self, outbound):
        if self.transport is None or self.transport.disconnecting:
            outbound.transport.loseConnection()
            return
        self.pair(outbound)
        self.transport.resumeProducing()

    def _failed(self, failure):
        self._log.warn(
            "cannot reach {target}: {error}", target=self.terminator.target, error=failure.getErrorMessage()
        )
        self.transport.abortConnection()


class _OneProtocolFactory(Factory):
    noisy = False

    def __init__(self, protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        return self.protocol_instance


class _PlaintextFactory(Factory):
    noisy = False

    def __init__(self, terminator):
        self.terminator = terminator

    def buildProtocol(self, addr):
        return _Plaintext(self.terminator)


class AgentTLSTerminator:
    """A loopback TLS listener in front of one service."""

    def __init__(self, reactor, host: str, port: int, context: ssl.SSLContext):
        self.reactor, self.host, self.port = reactor, host, port
        self.target = f"{host}:{port}"
        self.context = context
        self.listening = None

    def start(self):
        """A Deferred firing with the loopback port to dial instead of the service."""
        factory = TLSLayerFactory(self.context, _PlaintextFactory(self), self.reactor)
        d = TCP4ServerEndpoint(self.reactor, 0, backlog=1024, interface="127.0.0.1").listen(factory)

        def listening(port):
            self.listening = port
            return port.getHost().port

        return d.addCallback(listening)

    def stop(self):
        if self.listening is not None:
            port, self.listening = self.listening, None
            return port.stopListening()
        return None
