"""TLSLayer (relay/wire/tlslayer.py): the handshake, both half-closes, close
deadlines and backpressure, against a client ``ssl.SSLObject`` on memory BIOs,
a StringTransport and a fake clock; one test over real sockets."""

import os
import socket
import ssl
import sys
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.node.state import load_or_create
from relay.wire.interfaces import IMemoryviewReceiver
from relay.wire.tlslayer import DELIVER_BYTES, DELIVER_VIEW_BYTES, RECORD_BYTES, TLSLayer

MIB = 1024 * 1024


# -- certificates -------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The relay's CA and leaf, plus a client certificate (clientAuth) from the same CA."""
    folder = tmp_path_factory.mktemp("tlslayer")
    state = load_or_create(folder / "relay-state", agent_address="127.0.0.1:1")
    # issue_certificate's leaves carry only serverAuth, which OpenSSL refuses
    # as a client certificate ("unsuitable certificate purpose").
    ca_cert = x509.load_pem_x509_certificate(state.ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(
        (state.state_dir / "ca-key.pem").read_bytes(), password=None
    )
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "visitor")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    client_cert_path = folder / "visitor.pem"
    client_key_path = folder / "visitor-key.pem"
    client_cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    client_key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {
        "state": state,
        "client_cert_path": client_cert_path,
        "client_key_path": client_key_path,
        "client_cert_der": cert.public_bytes(serialization.Encoding.DER),
    }


def server_context(pki, *, alpn=None, require_client_cert=False) -> ssl.SSLContext:
    state = pki["state"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(state.cert_path, state.key_path)
    if alpn:
        context.set_alpn_protocols(alpn)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(state.ca_cert_path)
    return context


def client_context(pki, *, alpn=None, with_cert=False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki["state"].ca_cert_path)
    if alpn:
        context.set_alpn_protocols(alpn)
    if with_cert:
        context.load_cert_chain(pki["client_cert_path"], pki["client_key_path"])
    return context


# -- in-memory parts ------------------------------------------------------------


class MemoryClient:
    """A TLS client on memory BIOs: the visitor."""

    def __init__(self, context: ssl.SSLContext):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.handshake_done = False
        self.eof = False

    def step_handshake(self) -> None:
        if not self.handshake_done:
            try:
                self.sslobj.do_handshake()
                self.handshake_done = True
            except ssl.SSLWantReadError:
                pass

    def take_outgoing(self) -> bytes:
        return self.outgoing.read()

    def read_all(self) -> bytes:
        """Every plaintext byte available; sets ``eof`` at close_notify."""
        chunks = []
        while True:
            try:
                chunk = self.sslobj.read(256 * 1024)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close_notify(self) -> None:
        try:
            self.sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass


@implementer(ITCPTransport)
class RawTransport(StringTransport):
    """A StringTransport with TCP half-close, counting writes."""

    def __init__(self):
        super().__init__()
        self.write_closed = False
        self.write_calls = 0

    def write(self, data):
        self.write_calls += 1
        super().write(data)

    def writeSequence(self, data):
        self.write_calls += 1
        super().writeSequence(data)

    def loseWriteConnection(self):
        self.write_closed = True


class PlainInner(Protocol):
    """An inner protocol that cannot half-close: records bytes and lifecycle events."""

    def __init__(self):
        self.received = bytearray()
        self.events = []

    def connectionMade(self):
        self.events.append("connected")

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.events.append(("lost", reason.type))


@implementer(IHalfCloseableProtocol)
class RecordingInner(PlainInner):
    """The usual inner protocol: records half-closes too."""

    def readConnectionLost(self):
        self.events.append("read-lost")

    def writeConnectionLost(self):
        self.events.append("write-lost")


@implementer(IPushProducer)
class FakeProducer:
    def __init__(self):
        self.state = "producing"

    def pauseProducing(self):
        self.state = "paused"

    def resumeProducing(self):
        self.state = "producing"

    def stopProducing(self):
        self.state = "stopped"


class Session:
    """A layer on a RawTransport with a fake clock, and the visitor talking to it."""

    def __init__(self, pki, *, server=None, client=None, inner=None, **kwargs):
        self.clock = Clock()
        self.raw = RawTransport()
        self.inner = inner if inner is not None else RecordingInner()
        self.failures = []
        self.layer = TLSLayer(
            server if server is not None else server_context(pki),
            self.inner,
            self.clock,
            on_handshake_failed=self.failures.append,
            **kwargs,
        )
        self.client = MemoryClient(client if client is not None else client_context(pki))
        self.layer.makeConnection(self.raw)

    def to_server(self) -> int:
        data = self.client.take_outgoing()
        if data:
            self.layer.dataReceived(data)
        return len(data)

    def to_client(self) -> int:
        data = self.raw.value()
        self.raw.clear()
        if data:
            self.client.incoming.write(data)
        return len(data)

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to send."""
        for _ in range(20):
            self.client.step_handshake()
            if not (self.to_server() | self.to_client()):
                self.client.step_handshake()
                if not (self.to_server() | self.to_client()):
                    return
        raise AssertionError("the session never went quiet")

    def connect(self) -> "Session":
        self.pump()
        assert self.client.handshake_done and self.inner.events == ["connected"]
        return self


# -- the handshake -----------------------------------------------------------------


def test_inner_connects_after_handshake_and_4mib_pass_exactly_both_ways(pki):
    """The inner protocol is connected only once the handshake completes, then
    4 MiB pass byte-exact in each direction."""
    session = Session(pki)
    session.client.step_handshake()
    session.to_server()  # the ClientHello alone completes nothing
    assert session.inner.events == []
    assert session.inner.transport is None
    session.connect()
    assert session.inner.transport is session.layer

    upload = os.urandom(4 * MIB)
    session.client.sslobj.write(upload)
    session.to_server()
    assert bytes(session.inner.received) == upload

    download = os.urandom(4 * MIB)
    session.layer.write(download[: MIB // 2])
    session.layer.writeSequence([download[MIB // 2 : 3 * MIB], download[3 * MIB :]])
    session.to_client()
    assert session.client.read_all() == download


def test_each_inner_write_is_one_raw_write(pki):
    """write() and writeSequence() hand all their ciphertext to the raw transport in
    one call (writeSequence: encrypted in ~64 KiB pieces, handed over together)."""
    session = Session(pki).connect()
    before = session.raw.write_calls
    session.layer.write(os.urandom(MIB))
    session.layer.writeSequence([b"a" * 100, b"b" * 70000, b"c"])
    session.layer.writeSequence([os.urandom(10)] + [os.urandom(65536) for _ in range(5)])
    assert session.raw.write_calls == before + 3
    session.to_client()
    assert len(session.client.read_all()) == MIB + 70101 + 10 + 5 * 65536


class ChunkInner(RecordingInner):
    """Records the type and size of every delivery."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def dataReceived(self, data):
        self.chunks.append((type(data), len(data)))
        super().dataReceived(data)


@implementer(IMemoryviewReceiver)  # copies what it keeps, as the mux link does
class ViewInner(ChunkInner):
    pass


@pytest.mark.parametrize(
    "inner_class, kind, limit",
    [(ChunkInner, bytes, DELIVER_BYTES), (ViewInner, memoryview, DELIVER_VIEW_BYTES)],
)
def test_deliveries_are_bytes_or_views_as_the_inner_accepts(pki, inner_class, kind, limit):
    """A large read is delivered in as few calls as the cap allows: views of the
    shared buffer to an inner that says it copies, bytes (kept below glibc's
    mmap threshold) to any other; every byte arrives, in order."""
    session = Session(pki, inner=inner_class()).connect()
    upload = os.urandom(MIB + 5)
    session.client.sslobj.write(upload)
    session.to_server()
    assert bytes(session.inner.received) == upload
    assert {t for t, _ in session.inner.chunks} == {kind}
    sizes = [n for _, n in session.inner.chunks]
    assert max(sizes) <= limit + RECORD_BYTES
    assert len(sizes) <= len(upload) // limit + 2


@pytest.mark.parametrize("split", ["whole", "one-byte-at-a-time"])
def test_clienthello_already_read_is_the_first_input(pki, split):
    """The ClientHello the router already read, fed as the first dataReceived
    whole or one byte at a time, completes the handshake."""
    session = Session(pki)
    session.client.step_handshake()
    hello = session.client.take_outgoing()
    assert hello[0] == 0x16  # a TLS handshake record
    if split == "whole":
        session.layer.dataReceived(hello)
    else:
        for i in range(len(hello)):
            assert session.raw.value() == b""  # no ServerHello before the last byte
            session.layer.dataReceived(hello[i : i + 1])
    assert session.raw.value() != b""
    session.connect()
    session.client.sslobj.write(b"GET / HTTP/1.1\r\n\r\n")
    session.to_server()
    assert bytes(session.inner.received) == b"GET / HTTP/1.1\r\n\r\n"


def test_first_request_in_the_same_segment_as_finished_is_delivered(pki):
    """Application data that arrives with the client's Finished reaches the inner protocol."""
    session = Session(pki)
    session.client.step_handshake()
    session.to_server()
    session.to_client()
    session.client.step_handshake()
    assert session.client.handshake_done
    session.client.sslobj.write(b"early request")
    session.to_server()  # Finished and the request in one dataReceived
    assert session.inner.events == ["connected"]
    assert bytes(session.inner.received) == b"early request"


def test_alpn_result_is_exposed(pki):
    """The ALPN protocol chosen from the context's list is negotiated_protocol
    after the handshake."""
    session = Session(
        pki,
        server=server_context(pki, alpn=["h2", "http/1.1"]),
        client=client_context(pki, alpn=["h2"]),
    )
    assert session.layer.negotiated_protocol is None
    session.connect()
    assert session.layer.negotiated_protocol == "h2"
    assert session.client.sslobj.selected_alpn_protocol() == "h2"


def test_missing_client_certificate_never_reaches_the_inner_protocol(pki):
    """Under CERT_REQUIRED a client without a certificate fails the handshake:
    on_handshake_failed once, an alert, TCP closed, the inner never connected."""
    session = Session(pki, server=server_context(pki, require_client_cert=True))
    session.pump()
    assert session.inner.events == []
    assert len(session.failures) == 1
    assert "certificate" in session.failures[0]
    assert "_ssl.c" not in session.failures[0]
    assert session.raw.disconnecting
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        session.client.read_all()  # the alert reached the client
    session.layer.connectionLost(Failure(ConnectionDone()))
    assert session.inner.events == []
    assert len(session.failures) == 1
    assert session.clock.getDelayedCalls() == []


def test_inner_factory_is_called_only_after_the_handshake(pki):
    """A callable inner is called once the handshake completes, never for a
    failed one, and returning None closes the connection with close_notify."""
    made = []

    def make_inner():
        made.append(RecordingInner())
        return made[-1]

    failed = Session(pki, server=server_context(pki, require_client_cert=True), inner=make_inner)
    failed.pump()
    assert made == [] and len(failed.failures) == 1

    session = Session(pki, inner=make_inner)
    session.client.step_handshake()
    session.to_server()
    assert made == []
    session.pump()
    assert len(made) == 1 and made[0].events == ["connected"]
    assert made[0].transport is session.layer

    refused = Session(pki, inner=lambda: None)
    refused.pump()
    assert refused.client.handshake_done
    assert refused.raw.disconnecting
    refused.client.read_all()
    assert refused.client.eof
    assert refused.failures == []
    refused.layer.connectionLost(Failure(ConnectionDone()))
    assert refused.clock.getDelayedCalls() == []


def test_client_certificate_is_exposed(pki):
    """With a client certificate, getPeerCertificate returns it (DER)."""
    session = Session(
        pki,
        server=server_context(pki, require_client_cert=True),
        client=client_context(pki, with_cert=True),
    )
    assert session.layer.getPeerCertificate() is None
    session.connect()
    assert session.failures == []
    assert session.layer.getPeerCertificate() == pki["client_cert_der"]


def test_handshake_timeout_closes_then_aborts(pki):
    """A handshake not done after handshake_timeout_seconds fails, closes TCP,
    and aborts it close_timeout_seconds later."""
    session = Session(pki, handshake_timeout_seconds=10, close_timeout_seconds=5)
    session.client.step_handshake()
    session.layer.dataReceived(session.client.take_outgoing()[:20])
    session.clock.advance(9.9)
    assert session.failures == [] and not session.raw.disconnecting
    session.clock.advance(0.1)
    assert session.failures == ["TLS handshake not done after 10s"]
    assert session.raw.disconnecting and not session.raw.disconnected
    session.clock.advance(5)
    assert session.raw.disconnected  # aborted
    session.layer.connectionLost(Failure(ConnectionDone()))
    assert session.failures == ["TLS handshake not done after 10s"]
    assert session.inner.events == []
    assert session.clock.getDelayedCalls() == []


def test_tcp_eof_during_handshake_is_a_failure(pki):
    """TCP EOF before the handshake completes fails it once and closes TCP."""
    session = Session(pki)
    session.client.step_handshake()
    session.to_server()
    session.layer.readConnectionLost()
    session.layer.connectionLost(Failure(ConnectionDone()))
    assert session.failures == ["connection closed during the TLS handshake"]
    assert session.raw.disconnecting
    assert session.inner.events == []
    assert session.clock.getDelayedCalls() == []


# -- half-close -----------------------------------------------------------------------


def test_client_close_notify_ends_only_the_read_direction(pki):
    """The client's close_notify gives the inner readConnectionLost; the inner
    still writes and the client receives it; TCP stays open."""
    session = Session(pki).connect()
    session.client.sslobj.write(b"request")
    session.client.close_notify()
    session.to_server()
    assert bytes(session.inner.received) == b"request"
    assert session.inner.events == ["connected", "read-lost"]
    session.layer.write(b"response after the client's EOF")
    session.to_client()
    assert session.client.read_all() == b"response after the client's EOF"
    assert not session.client.eof
    assert not session.raw.disconnecting


def test_inner_lose_write_connection_ends_only_the_write_direction(pki):
    """loseWriteConnection sends close_notify and a FIN; the client still sends
    and the inner receives; TCP closes once the client ends too."""
    session = Session(pki).connect()
    session.layer.write(b"last words")
    session.layer.loseWriteConnection()
    assert session.raw.write_closed
    assert session.inner.events == ["connected", "write-lost"]
    session.to_client()
    assert session.client.read_all() == b"last words"
    assert session.client.eof
    session.layer.write(b"dropped: written after close_notify")
    assert session.raw.value() == b""

    session.client.sslobj.write(b"upload after the server's close_notify")
    session.to_server()
    assert bytes(session.inner.received) == b"upload after the server's close_notify"
    assert not session.raw.disconnecting

    session.client.close_notify()
    session.to_server()
    assert session.inner.events == ["connected", "write-lost", "read-lost"]
    assert session.raw.disconnecting
    session.layer.connectionLost(Failure(ConnectionDone()))
    assert session.inner.events[-1] == ("lost", ConnectionDone)
    assert session.clock.getDelayedCalls() == []


def test_ragged_tcp_eof_is_an_eof(pki):
    """TCP EOF without close_notify delivers the decrypted bytes, then readConnectionLost."""
    session = Session(pki).connect()
    session.client.sslobj.write(b"GET / HTTP/1.0\r\n\r\n")
    session.client.sslobj.write(b"truncated record")
    ciphertext = session.client.take_outgoing()
    session.layer.dataReceived(ciphertext[:-3])  # the second record arrives cut
    session.layer.readConnectionLost()
    assert bytes(session.inner.received) == b"GET / HTTP/1.0\r\n\r\n"
    assert session.inner.events == ["connected", "read-lost"]
    session.layer.readConnectionLost()  # Twisted may repeat it; the inner hears it once
    assert session.inner.events == ["connected", "read-lost"]
    assert not session.raw.disconnecting  # the inner may still answer
    session.layer.write(b"HTTP/1.0 200 OK\r\n\r\n")
    session.to_client()
    assert session.client.read_all() == b"HTTP/1.0 200 OK\r\n\r\n"


def test_inner_without_half_close_gets_connection_lost_at_eof(pki):
    """An inner protocol that cannot half-close gets connectionLost(ConnectionDone)
    at the client's close_notify, once, and the connection closes."""
    inner = PlainInner()
    assert not IHalfCloseableProtocol.providedBy(inner)
    session = Session(pki, inner=inner).connect()
    session.client.close_notify()
    session.to_server()
    assert inner.events == ["connected", ("lost", ConnectionDone)]
    assert session.raw.disconnecting
    session.to_client()
    session.client.read_all()
    assert session.client.eof  # our close_notify went out
    session.layer.connectionLost(Failure(ConnectionDone()))
    assert inner.events == ["connected", ("lost", ConnectionDone)]


# -- closing ----------------------------------------------------------------------------


def test_lose_connection_does_not_wait_for_the_peer(pki):
    """loseConnection sends close_notify, unregisters the producer, closes TCP
    at once and aborts it after close_timeout_seconds if the peer never answers."""
    session = Session(pki, close_timeout_seconds=5).connect()
    producer = FakeProducer()
    session.layer.registerProducer(producer, True)
    assert session.raw.producer is producer
    session.raw.producer.pauseProducing()  # a full write buffer
    session.layer.loseConnection()
    assert session.raw.producer is None
    assert session.raw.disconnecting and not session.raw.disconnected
    session.to_client()
    session.client.read_all()
    assert session.client.eof
    session.clock.advance(4.9)
    assert not session.raw.disconnected
    session.clock.advance(0.1)
    assert session.raw.disconnected
    session.layer.connectionLost(Failure(ConnectionDone()))
    assert session.inner.events == ["connected", ("lost", ConnectionDone)]
    assert session.clock.getDelayedCalls() == []


def test_abort_connection_is_immediate(pki):
    """abortConnection aborts the raw transport now and leaves no timer."""
    session = Session(pki).connect()
    session.layer.abortConnection()
    assert session.raw.disconnected
    assert session.clock.getDelayedCalls() == []
    session.client.sslobj.write(b"too late")
    session.to_server()
    assert bytes(session.inner.received) == b""


def test_tls_error_after_handshake_closes_with_that_reason(pki):
    """A corrupted record closes the connection, and the inner's connectionLost
    carries the SSLError."""
    session = Session(pki).connect()
    session.client.sslobj.write(b"x" * 100)
    record = bytearray(session.client.take_outgoing())
    record[-1] ^= 0xFF
    session.layer.dataReceived(bytes(record))
    assert session.raw.disconnecting
    session.layer.connectionLost(Failure(ConnectionDone()))
    assert session.inner.events[-1][0] == "lost"
    assert issubclass(session.inner.events[-1][1], ssl.SSLError)
    assert session.clock.getDelayedCalls() == []


# -- backpressure ------------------------------------------------------------------------


def test_pause_stops_delivery_until_resume(pki):
    """After the inner pauses, decrypted bytes wait in ssl until resumeProducing;
    reading from TCP is paused meanwhile."""

    class PausingInner(RecordingInner):
        def dataReceived(self, data):
            super().dataReceived(data)
            self.transport.pauseProducing()

    inner = PausingInner()
    session = Session(pki, inner=inner).connect()
    upload = os.urandom(MIB)
    session.client.sslobj.write(upload)
    session.client.close_notify()
    session.to_server()
    assert 0 < len(inner.received) < MIB
    assert session.raw.producerState == "paused"
    resumes = 0
    while len(inner.received) < MIB:
        delivered = len(inner.received)
        session.layer.resumeProducing()
        assert len(inner.received) > delivered
        assert inner.events == ["connected"]  # no EOF before the last byte
        resumes += 1
    assert bytes(inner.received) == upload
    assert resumes >= 2
    session.layer.resumeProducing()
    assert inner.events == ["connected", "read-lost"]


# -- real sockets -------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class EchoUntilEOF(Protocol):
    def __init__(self):
        self.lost = Deferred()

    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseWriteConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.lost.callback(reason.type)


def blocking_client(port: int, context: ssl.SSLContext, payload: bytes) -> tuple[bytes, bytes, str]:
    """Send payload, read the echo, close_notify; return the echo, what TCP gives after, ALPN."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        tls = context.wrap_socket(sock, server_hostname="localhost")
        tls.sendall(payload)
        echoed = bytearray()
        while len(echoed) < len(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            echoed += chunk
        alpn = tls.selected_alpn_protocol()
        plain = tls.unwrap()  # our close_notify; waits for the relay's
        after = plain.recv(10)  # the relay's FIN
        return bytes(echoed), after, alpn


@pytest_twisted.inlineCallbacks
def test_real_socket_echo_and_half_close(pki):
    """Over real TCP a blocking Python TLS client gets a byte-exact echo, and its
    close_notify is answered by ours and a FIN."""
    from twisted.internet import reactor

    failures = []
    inners = []
    server = server_context(pki, alpn=["h2", "http/1.1"])

    def build():
        inners.append(EchoUntilEOF())
        return TLSLayer(server, inners[-1], reactor, on_handshake_failed=failures.append)

    port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
    try:
        payload = os.urandom(2 * MIB)
        echoed, after, alpn = yield threads.deferToThread(
            blocking_client,
            port.getHost().port,
            client_context(pki, alpn=["http/1.1"]),
            payload,
        )
        lost = yield inners[0].lost
    finally:
        yield port.stopListening()
    assert echoed == payload
    assert after == b""
    assert alpn == "http/1.1"
    assert lost is ConnectionDone
    assert failures == []
    assert len(inners) == 1


def test_two_reactor_threads_never_share_a_decrypt_buffer(pki):
    """forward() runs a private reactor thread next to the caller's reactor:
    two threads decrypting at once each see only their own bytes."""
    import threading

    corrupted = []

    @implementer(IMemoryviewReceiver)
    class LetterInner(RecordingInner):
        def __init__(self, letter):
            super().__init__()
            self.letter = letter
            self.count = 0

        def dataReceived(self, data):
            for i in range(0, len(data), 4096):  # Python work while the view is live
                if bytes(data[i : i + 4096]).strip(self.letter):
                    corrupted.append(self.letter)
                    return
            self.count += len(data)

    def run(letter, results):
        session = Session(pki, inner=LetterInner(letter)).connect()
        payload = letter * (256 * 1024)
        for _ in range(100):
            session.client.sslobj.write(payload)
            session.to_server()
            session.raw.clear()
            if corrupted:
                break
        results[letter] = session.inner.count

    results = {}
    threads = [threading.Thread(target=run, args=(letter, results)) for letter in (b"A", b"B")]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a busy process would
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert corrupted == []
    assert results == {b"A": 100 * 256 * 1024, b"B": 100 * 256 * 1024}
