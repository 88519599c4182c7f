"""relay.wire.tcpio over real loopback sockets: write_now sends before the reactor
turns and never reorders bytes; the shared link read buffer delivers every byte
and the EOF."""

import os
import socket

import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from relay.wire.tcpio import read_into_shared_buffer, write_now, write_sequence_now

MIB = 1024 * 1024


class Server(Protocol):
    """Runs `on_connect(transport)` and records what arrives and how it ends."""

    def __init__(self, on_connect=None):
        self.on_connect = on_connect
        self.received = bytearray()
        self.types = set()
        self.lost = Deferred()
        self.connected_event = Deferred()

    def connectionMade(self):
        if self.on_connect is not None:
            self.on_connect(self.transport)
        self.connected_event.callback(self)

    def dataReceived(self, data):
        self.types.add(type(data))
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(reason.type)


def listen(reactor, protocol):
    return reactor.listenTCP(0, Factory.forProtocol(lambda: protocol), interface="127.0.0.1")


def recv_exactly(sock, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(MIB, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


@pytest_twisted.inlineCallbacks
def test_write_now_sends_before_control_returns_to_the_reactor():
    """The client reads the bytes while the reactor is still inside the
    server's callback: nothing waited for the next reactor turn."""
    from twisted.internet import reactor

    seen = []
    client = socket.socket()

    def on_connect(transport):
        write_now(transport, b"now")
        client.settimeout(2)
        seen.append(client.recv(10))  # blocks the reactor: only a sent byte can arrive

    server = Server(on_connect)
    port = listen(reactor, server)
    try:
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port.getHost().port))
        yield server.connected_event
    finally:
        client.close()
        yield port.stopListening()
    assert seen == [b"now"]


@pytest_twisted.inlineCallbacks
def test_write_now_keeps_order_behind_queued_bytes_and_queues_the_rest():
    """A queued write goes first; what the kernel does not take (the client
    reads nothing yet, small buffers) is queued and arrives intact, in order."""
    from twisted.internet import reactor

    payload = os.urandom(6 * MIB)

    def on_connect(transport):
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        transport.write(b"first|")  # queued: write_now must not overtake it
        write_now(transport, b"second|")
        write_now(transport, payload)
        write_now(transport, b"|last")
        transport.loseConnection()

    server = Server(on_connect)
    port = listen(reactor, server)
    expected = b"first|second|" + payload + b"|last"

    def client():
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            got = recv_exactly(sock, len(expected))
            return got, sock.recv(1)

    try:
        got, after = yield threads.deferToThread(client)
        yield server.lost
    finally:
        yield port.stopListening()
    assert got == expected
    assert after == b""


def test_write_now_without_a_socket_is_a_plain_write():
    transport = StringTransport()
    write_now(transport, b"abc")
    write_now(transport, b"")
    assert transport.value() == b"abc"


@pytest_twisted.inlineCallbacks
def test_write_now_while_closing_queues_like_write_ahead_of_the_fin():
    """After loseWriteConnection the socket is not written directly: the bytes
    join Twisted's queue and leave before the FIN, exactly as write() does."""
    from twisted.internet import reactor

    def on_connect(transport):
        write_now(transport, b"before|")
        transport.loseWriteConnection()
        write_now(transport, b"queued|")
        transport.write(b"written")

    server = Server(on_connect)
    port = listen(reactor, server)

    def client():
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as sock:
            return recv_exactly(sock, 100)

    try:
        got = yield threads.deferToThread(client)
        yield server.lost
    finally:
        yield port.stopListening()
    assert got == b"before|queued|written"


@pytest_twisted.inlineCallbacks
def test_shared_read_buffer_delivers_every_byte_then_eof():
    from twisted.internet import reactor

    server = Server(read_into_shared_buffer)
    port = listen(reactor, server)
    payload = os.urandom(5 * MIB + 7)

    def client():
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as sock:
            sock.sendall(payload)

    try:
        yield threads.deferToThread(client)
        reason = yield server.lost
    finally:
        yield port.stopListening()
    assert bytes(server.received) == payload
    assert server.types == {memoryview}
    assert reason is ConnectionDone


@pytest_twisted.inlineCallbacks
def test_shared_read_buffer_can_bypass_wrapping_protocols_but_not_eof():
    """With `deliver`, reads go straight to it (past wrappers that only
    forward); EOF still reaches the transport's protocol."""
    from twisted.internet import reactor

    direct = bytearray()
    server = Server(lambda transport: read_into_shared_buffer(transport, direct.extend))
    port = listen(reactor, server)
    payload = os.urandom(3 * MIB + 1)

    def client():
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as sock:
            sock.sendall(payload)

    try:
        yield threads.deferToThread(client)
        reason = yield server.lost
    finally:
        yield port.stopListening()
    assert bytes(direct) == payload
    assert server.received == b""  # the protocol saw no data, only the end
    assert reason is ConnectionDone


def test_shared_read_buffer_leaves_other_transports_alone():
    transport = StringTransport()
    read_into_shared_buffer(transport)
    assert "doRead" not in vars(transport)


@pytest_twisted.inlineCallbacks
def test_write_sequence_now_sends_in_order_and_queues_the_rest():
    """Pieces go out in one sendmsg while the socket takes them; a partly sent
    piece and the pieces behind it are queued, and everything arrives in order."""
    from twisted.internet import reactor

    pieces = [os.urandom(n) for n in (10, 70000, 1, 3 * MIB, 65536, 5)]

    def on_connect(transport):
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        write_sequence_now(transport, [b"a", b"b"])
        write_sequence_now(transport, list(pieces))
        write_sequence_now(transport, [b"y", b"z"])
        transport.loseConnection()

    server = Server(on_connect)
    port = listen(reactor, server)
    expected = b"ab" + b"".join(pieces) + b"yz"

    def client():
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            return recv_exactly(sock, len(expected) + 1)

    try:
        got = yield threads.deferToThread(client)
        yield server.lost
    finally:
        yield port.stopListening()
    assert got == expected


def test_write_sequence_now_without_a_socket_is_a_plain_write_sequence():
    transport = StringTransport()
    write_sequence_now(transport, [b"a", b"bc"])
    assert transport.value() == b"abc"


@pytest_twisted.inlineCallbacks
def test_lose_connection_aborts_a_peer_that_never_reads_at_the_deadline():
    """A close with bytes still buffered for a peer that never reads ends by abort at the deadline, not never."""
    from twisted.internet import reactor
    from twisted.internet.error import ConnectionLost

    from relay.wire.tcpio import lose_connection

    def flood_then_close(transport):
        transport.write(b"x" * (32 * MIB))  # far more than the socket buffers hold
        lose_connection(transport, deadline_seconds=0.5)

    server = Server(on_connect=flood_then_close)
    port = listen(reactor, server)
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        start = reactor.seconds()
        ended = yield server.lost
        assert 0.4 <= reactor.seconds() - start < 5
        assert issubclass(ended, ConnectionLost)  # ConnectionAborted: not a clean close
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_lose_connection_with_nothing_buffered_sets_no_timer():
    """An idle close closes at once and leaves no delayed call behind."""
    from twisted.internet import reactor

    from relay.wire.tcpio import lose_connection

    before = len(reactor.getDelayedCalls())
    server = Server(on_connect=lambda transport: lose_connection(transport, deadline_seconds=30))
    port = listen(reactor, server)
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        yield server.connected_event
        assert len(reactor.getDelayedCalls()) == before
        yield server.lost
    finally:
        client.close()
        yield port.stopListening()
