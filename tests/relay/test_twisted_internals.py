"""Each private Twisted behaviour relay.wire.twisted_internals relies on, one
test each, on Twisted's own classes (real TCP on 127.0.0.1, a fresh epoll
reactor): a test here fails when a Twisted release changes what we assumed,
before tcpio.py or reactor.py silently misbehave. setup.cfg pins Twisted to
the releases these passed on.

Every wait is bounded (DEADLINE_SECONDS, or a thread's socket timeout)."""

import ast
import hashlib
import inspect
import os
import select
import socket
import textwrap
import time

import pytest
import pytest_twisted
from twisted.internet import error, main, tcp, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IHalfCloseableProtocol, IReadDescriptor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from relay.wire.twisted_internals import TurnEndEPollReactor, idle_socket, reads_replaceable

DEADLINE_SECONDS = 5.0
MIB = 1024 * 1024


def reactor():
    from twisted.internet import reactor

    return reactor


def bounded(d: Deferred) -> Deferred:
    return d.addTimeout(DEADLINE_SECONDS, reactor())


class Peer(Protocol):
    """Records what Twisted tells it; each milestone is a Deferred."""

    def __init__(self):
        self.made = Deferred()
        self.lost = Deferred()  # fires with None; the reason is in .reason
        self.reason = None
        self.received = []

    def connectionMade(self):
        self.made.callback(self.transport)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


@implementer(IHalfCloseableProtocol)
class HalfCloseablePeer(Peer):
    def __init__(self):
        super().__init__()
        self.read_lost = Deferred()
        self.write_lost = Deferred()

    def readConnectionLost(self):
        self.read_lost.callback(None)

    def writeConnectionLost(self):
        self.write_lost.callback(None)


class Connected:
    """A Twisted server transport on loopback and the plain socket at its other end."""

    def __init__(self, protocol):
        self.protocol = protocol
        protocols = [protocol]  # later connections to the port get their own Peer
        self.port = reactor().listenTCP(
            0, Factory.forProtocol(lambda: protocols.pop() if protocols else Peer()), interface="127.0.0.1"
        )
        # Completes in the kernel's backlog: no reactor turn needed.
        self.client = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=DEADLINE_SECONDS)
        self.transport = None

    @inlineCallbacks
    def start(self):
        self.transport = yield bounded(self.protocol.made)
        return self

    @inlineCallbacks
    def close(self):
        self.client.close()
        if self.transport is not None and not self.protocol.lost.called:
            self.transport.abortConnection()
            yield bounded(self.protocol.lost)
        yield self.port.stopListening()


def connected(protocol=None) -> Deferred:
    return Connected(protocol if protocol is not None else Peer()).start()


def copy_digest(function) -> str:
    """The code of a function, ignoring its docstring, comments, annotations
    and the spelling of ``return`` / ``return None``: changes when Twisted's
    code does."""

    class Normalise(ast.NodeTransformer):
        def visit_FunctionDef(self, node):
            self.generic_visit(node)
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            node.body = body
            node.returns = None
            return node

        def visit_arg(self, node):
            node.annotation = None
            return node

        def visit_AnnAssign(self, node):
            return ast.Assign(targets=[node.target], value=node.value) if node.value else None

        def visit_Return(self, node):
            if node.value is None:
                node.value = ast.Constant(None)
            return node

    tree = Normalise().visit(ast.parse(textwrap.dedent(inspect.getsource(function))))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


# -- 1. the write queue of a TCP transport (idle_socket) -------------------------------


@pytest_twisted.inlineCallbacks
def test_an_idle_tcp_transport_has_nothing_queued_and_writing_open():
    """Server and client transports alike, idle: _tempDataLen 0,
    offset == len(dataBuffer), no close flag set, not TLS, and .socket the
    connected socket; so idle_socket hands that socket out."""
    conn = yield connected()
    client_protocol = Peer()
    factory = ClientFactory.forProtocol(lambda: client_protocol)
    connector = reactor().connectTCP("127.0.0.1", conn.port.getHost().port, factory, timeout=DEADLINE_SECONDS)
    try:
        client_transport = yield bounded(client_protocol.made)
        for transport in (conn.transport, client_transport):
            assert isinstance(transport, tcp.Connection)
            assert transport._tempDataLen == 0
            assert transport.offset == len(transport.dataBuffer)
            assert transport.connected and not transport.disconnecting
            assert transport._writeDisconnecting is False
            assert transport._writeDisconnected is False
            assert transport._aborting is False
            assert transport.TLS is False
            assert transport.socket is transport.getHandle()
            assert reads_replaceable(transport)
            assert idle_socket(transport) is transport.socket
    finally:
        connector.disconnect()
        yield bounded(client_protocol.lost)
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_write_and_write_sequence_count_queued_bytes_in_temp_data_len():
    """write() and writeSequence() only queue, counting the bytes in
    _tempDataLen; once the reactor sent them the transport is idle again."""
    conn = yield connected()
    try:
        transport = conn.transport
        transport.write(b"abc")
        assert transport._tempDataLen == 3
        transport.writeSequence([b"de", b"f"])
        assert transport._tempDataLen == 6
        assert idle_socket(transport) is None

        def read_six():
            got = b""
            while len(got) < 6:
                chunk = conn.client.recv(6 - len(got))
                if not chunk:
                    break
                got += chunk
            return got

        got = yield threads.deferToThread(read_six)
        assert got == b"abcdef"
        assert transport._tempDataLen == 0
        assert transport.offset == len(transport.dataBuffer)
        assert idle_socket(transport) is transport.socket
    finally:
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_bytes_the_kernel_did_not_take_are_data_buffer_from_offset():
    """After a write turn the kernel did not finish (the peer reads nothing),
    _tempDataLen is 0 and the unsent bytes are exactly dataBuffer[offset:]."""
    conn = yield connected()
    try:
        transport = conn.transport
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        payload = os.urandom(4 * MIB)
        transport.write(payload)
        yield deferLater(reactor(), 0.2, lambda: None)  # a few turns: doWrite ran
        unsent = bytes(transport.dataBuffer[transport.offset :])
        assert transport._tempDataLen == 0
        assert 0 < len(unsent) < len(payload)
        assert payload.endswith(unsent)
        assert idle_socket(transport) is None
    finally:
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_lose_write_connection_sets_write_disconnecting_then_write_disconnected():
    """loseWriteConnection() sets _writeDisconnecting at once; once the FIN
    is sent (writeConnectionLost), _writeDisconnected."""
    conn = yield connected(HalfCloseablePeer())
    try:
        transport = conn.transport
        transport.loseWriteConnection()
        assert transport._writeDisconnecting is True
        assert idle_socket(transport) is None
        yield bounded(conn.protocol.write_lost)
        assert transport._writeDisconnected is True
        assert conn.client.recv(1) == b""  # the FIN
    finally:
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_lose_connection_sets_disconnecting_and_abort_sets_aborting_at_once():
    """loseConnection() sets disconnecting; abortConnection() sets _aborting
    before connectionLost, which comes a turn later."""
    conn = yield connected()
    transport = conn.transport
    transport.loseConnection()
    assert transport.disconnecting
    assert idle_socket(transport) is None
    yield bounded(conn.protocol.lost)
    assert not transport.connected
    yield conn.close()

    conn = yield connected()
    transport = conn.transport
    transport.abortConnection()
    assert transport._aborting is True
    assert not conn.protocol.lost.called
    assert idle_socket(transport) is None
    yield bounded(conn.protocol.lost)
    yield conn.close()


@pytest_twisted.inlineCallbacks
def test_start_tls_sets_tls():
    """After startTLS the socket carries ciphertext, and TLS says so."""
    from twisted.internet.ssl import optionsForClientTLS

    conn = yield connected()
    client_protocol = Peer()
    factory = ClientFactory.forProtocol(lambda: client_protocol)
    connector = reactor().connectTCP("127.0.0.1", conn.port.getHost().port, factory, timeout=DEADLINE_SECONDS)
    try:
        transport = yield bounded(client_protocol.made)
        assert transport.TLS is False
        transport.startTLS(optionsForClientTLS("localhost"))
        assert transport.TLS is True
        assert idle_socket(transport) is None
    finally:
        connector.disconnect()
        yield bounded(client_protocol.lost)
        yield conn.close()


# -- 2. a TCP transport's reads (replace_do_read) ---------------------------------------


@pytest_twisted.inlineCallbacks
def test_the_reactor_calls_a_do_read_set_on_the_instance():
    """An instance attribute doRead is what the reactor calls on a readable
    event (the class's doRead, and so dataReceived, never run)."""
    conn = yield connected()
    try:
        transport = conn.transport
        called = Deferred()

        def doRead():
            data = transport.socket.recv(100)
            if not called.called:
                called.callback(data)
            return None

        transport.doRead = doRead
        conn.client.sendall(b"ping")
        assert (yield bounded(called)) == b"ping"
        assert conn.protocol.received == []
    finally:
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_pause_producing_stops_the_reactor_calling_a_replaced_do_read():
    """pauseProducing() takes the transport off the reactor's readers, so a
    replaced doRead is not called until resumeProducing()."""
    conn = yield connected()
    try:
        transport = conn.transport
        calls = []
        resumed_read = Deferred()

        def doRead():
            calls.append(transport.socket.recv(100))
            if not resumed_read.called:
                resumed_read.callback(None)
            return None

        transport.doRead = doRead
        transport.pauseProducing()
        conn.client.sendall(b"waiting")
        yield deferLater(reactor(), 0.2, lambda: None)
        assert calls == []
        transport.resumeProducing()
        yield bounded(resumed_read)
        assert calls == [b"waiting"]
    finally:
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_data_received_passes_data_as_given_and_empty_data_is_eof():
    """Connection._dataReceived hands a memoryview on as it is and returns
    None; empty data (bytes or view) returns ConnectionDone without a call."""
    conn = yield connected()
    try:
        transport = conn.transport
        view = memoryview(bytearray(b"abc"))
        assert transport._dataReceived(view) is None
        assert len(conn.protocol.received) == 1 and conn.protocol.received[0] is view
        for empty in (b"", memoryview(b"abc")[:0]):
            assert isinstance(transport._dataReceived(empty), error.ConnectionDone)
        assert len(conn.protocol.received) == 1
    finally:
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_do_read_returning_data_received_of_nothing_is_eof_for_the_protocol():
    """A replaced doRead that returns _dataReceived(b"") ends the connection
    as a peer's EOF does: connectionLost(ConnectionDone), or only
    readConnectionLost for a half-closeable protocol."""
    conn = yield connected()
    try:
        transport = conn.transport
        transport.doRead = lambda: transport._dataReceived(b"")
        conn.client.sendall(b"x")  # makes the socket readable
        yield bounded(conn.protocol.lost)
        assert conn.protocol.reason.check(error.ConnectionDone)
    finally:
        yield conn.close()

    conn = yield connected(HalfCloseablePeer())
    try:
        transport = conn.transport
        transport.doRead = lambda: transport._dataReceived(b"")
        conn.client.sendall(b"x")
        yield bounded(conn.protocol.read_lost)
        assert not conn.protocol.lost.called
        transport.write(b"still open")  # the write half lives on
        conn.client.settimeout(DEADLINE_SECONDS)
        assert (yield threads.deferToThread(conn.client.recv, 100)) == b"still open"
    finally:
        yield conn.close()


@pytest_twisted.inlineCallbacks
def test_do_read_returning_main_connection_lost_loses_the_connection():
    """main.CONNECTION_LOST is a ConnectionLost; returned from doRead it ends
    the connection with that reason (no half-close, even for a half-closeable
    protocol)."""
    assert isinstance(main.CONNECTION_LOST, error.ConnectionLost)
    conn = yield connected(HalfCloseablePeer())
    try:
        conn.transport.doRead = lambda: main.CONNECTION_LOST
        conn.client.sendall(b"x")
        yield bounded(conn.protocol.lost)
        assert conn.protocol.reason.check(error.ConnectionLost)
        assert not conn.protocol.read_lost.called
    finally:
        yield conn.close()


# Connection.doRead in Twisted 23.10.0 .. 26.10.0 (annotations aside).
# replace_do_read is this code with recv_into a shared buffer: when Twisted's
# changes, read the new one and bring replace_do_read in line before adding
# its digest here.
KNOWN_DO_READ = {"0be051df4aabd70f"}


def test_twisted_do_read_is_the_one_replace_do_read_copies():
    assert copy_digest(tcp.Connection.doRead) in KNOWN_DO_READ


# -- 3. the epoll reactor's loop (TurnEndEPollReactor) ----------------------------------


@implementer(IReadDescriptor)
class Reader:
    """A selectable reading one end of a socket pair, with a chosen doRead."""

    def __init__(self, do_read):
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)
        self.do_read = do_read
        self.reads = 0
        self.lost = []

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        self.reads += 1
        return self.do_read(self)

    def connectionLost(self, reason):
        self.lost.append(reason)

    def logPrefix(self):
        return "Reader"

    def close(self):
        self.sock.close()
        self.peer.close()


@pytest.fixture
def fresh_reactor():
    """A stock EPollReactor that is never run: its loop's pieces are called by hand."""
    fresh = EPollReactor()
    yield fresh
    fresh.removeAll()
    fresh.waker.connectionLost(None)
    fresh._poller.close()


def test_epoll_reactor_maps_fds_to_selectables_and_polls_them_with_its_poller(fresh_reactor):
    """addReader puts fd -> selectable in _selectables; _poller.poll(timeout,
    maxevents) reports (fd, event); _doReadOrWrite(selectable, fd, event)
    calls its doRead; removeReader takes the fd out again."""
    reader = Reader(lambda r: (r.sock.recv(100), None)[1])
    try:
        fresh_reactor.addReader(reader)
        fd = reader.fileno()
        assert fresh_reactor._selectables[fd] is reader
        reader.peer.sendall(b"x")
        events = dict(fresh_reactor._poller.poll(DEADLINE_SECONDS, len(fresh_reactor._selectables)))
        assert events[fd] & select.EPOLLIN
        fresh_reactor._doReadOrWrite(reader, fd, events[fd])
        assert reader.reads == 1 and reader.lost == []
        fresh_reactor.removeReader(reader)
        assert fd not in fresh_reactor._selectables
    finally:
        reader.close()


def test_do_read_or_write_disconnects_on_a_returned_loss_or_a_raised_error(fresh_reactor):
    """_doReadOrWrite turns doRead's ConnectionLost, or an exception it raises
    (logged, not raised), into connectionLost and removes the selectable."""
    logged = []
    # log.err() publishes a legacy event: its failure is under "failure".
    observer = lambda event: logged.append(event.get("log_failure") or event.get("failure"))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    readers = []
    try:
        for do_read, expected in (
            (lambda r: main.CONNECTION_LOST, error.ConnectionLost),
            (lambda r: 1 / 0, ZeroDivisionError),
        ):
            reader = Reader(do_read)
            readers.append(reader)
            fresh_reactor.addReader(reader)
            fd = reader.fileno()
            fresh_reactor._doReadOrWrite(reader, fd, select.EPOLLIN)  # does not raise
            assert len(reader.lost) == 1 and reader.lost[0].check(expected)
            assert fd not in fresh_reactor._selectables
    finally:
        globalLogPublisher.removeObserver(observer)
        for reader in readers:
            reader.close()
    assert [f.type for f in logged if f is not None] == [ZeroDivisionError]


def test_timeout_is_none_without_timed_calls_else_seconds_to_the_next(fresh_reactor):
    assert fresh_reactor.timeout() is None
    call = fresh_reactor.callLater(10, lambda: None)
    assert 9 < fresh_reactor.timeout() <= 10
    soon = fresh_reactor.callLater(0, lambda: None)
    assert fresh_reactor.timeout() == 0
    call.cancel()
    soon.cancel()


@pytest.mark.timeout(30)
def test_the_main_loop_passes_timeout_to_do_iteration():
    """Each turn of ReactorBase.mainLoop calls timeout() and hands its value
    to doIteration: what TurnEndEPollReactor overrides to poll without
    blocking while turn-end calls wait."""

    class Probe(EPollReactor):
        def __init__(self):
            super().__init__()
            self.pairs = []
            self._last = "unset"

        def timeout(self):
            self._last = super().timeout()
            return self._last

        def doIteration(self, timeout):
            self.pairs.append((self._last, timeout))
            super().doIteration(timeout)

    probe = Probe()
    probe.callLater(0.05, probe.stop)
    started = time.monotonic()
    probe.run(installSignalHandlers=False)
    assert time.monotonic() - started < 10
    probe.waker.connectionLost(None)
    probe._poller.close()
    assert probe.pairs, "mainLoop did not call doIteration"
    # After stop() the loop passes `self.running and timeout()`: False, a poll
    # that does not block.
    assert all(given == last or given is False for last, given in probe.pairs)
    assert any(isinstance(last, float) and 0 < last <= 0.05 for last, _ in probe.pairs)


def test_turn_end_reactor_does_not_block_while_calls_wait():
    """Ours, on Twisted's loop: with a turn-end call queued timeout() is 0
    and the poll returns at once, running the call; then timeout() is
    Twisted's again."""
    fresh = TurnEndEPollReactor()
    try:
        ran = []
        fresh._turn_end.append(lambda: ran.append(True))
        assert fresh.timeout() == 0.0
        started = time.monotonic()
        fresh.doIteration(fresh.timeout())
        assert time.monotonic() - started < 1.0
        assert ran == [True]
        assert fresh.timeout() is None
    finally:
        fresh.removeAll()
        fresh.waker.connectionLost(None)
        fresh._poller.close()


# EPollReactor.doPoll in Twisted 23.10.0 .. 26.10.0. TurnEndEPollReactor.doPoll
# is this code without log.callWithLogger, plus the turn-end calls: when
# Twisted's changes, read the new one and bring ours in line before adding
# its digest here.
KNOWN_DO_POLL = {"f8d6486bad81024b"}


def test_twisted_do_poll_is_the_one_turn_end_reactor_copies():
    assert copy_digest(EPollReactor.doPoll) in KNOWN_DO_POLL
