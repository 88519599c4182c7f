"""TLS on stdlib ``ssl`` memory BIOs, for visitors' encrypted tunnels and the agent link.

`TLSLayer` is the protocol of a raw TCP connection (or of a `MuxStream`: the
agent terminates passthrough TLS on the stream itself) and, once the TLS
handshake completes, the transport of an inner protocol (a `Splice` side
for a visitor, a `MuxLink` for the agent link): ciphertext in, plaintext out,
and back. It is not a TLS library and not a router: on the TLS port the caller
has already read the ClientHello to route by SNI and hands those bytes over as
the first ``dataReceived``, and the caller configures the ``ssl.SSLContext``
(certificates, ALPN, client CA, versions); this module sets no option on it.
As a client (the agent dialling the relay) it starts the handshake itself and
runs the caller's `verify` check on the peer certificate before the inner
protocol exists.

Why on the agent link too: ``SSLObject.write`` encrypts a 64 KiB frame in one
C call, where Twisted's TLS layer makes four 16 KiB ``SSL_write`` calls with a
BIO read and a transport write each; on this machine that measured 2.6x the
encryption throughput (shared/perf-calibration.md: that Python glue, not AES,
dominated the link's cost).

Why not Twisted's ``protocols/tls.py``: it cannot half-close, and its
``loseConnection`` waits for the peer's close_notify forever. Here:

Rule 1: the inner protocol exists only after a completed handshake.
``inner.makeConnection(layer)`` runs then, so a failed handshake (no client
certificate under CERT_REQUIRED, a scanner, a timeout) reaches only
``on_handshake_failed``, once, and the TCP connection closes after whatever
alert ``ssl`` produced. ``inner`` may also be a callable that makes the
protocol: it is called only then (opening a mux stream costs the agent), and
if it returns None the layer closes (close_notify, then TCP).

Rule 2: each direction ends on its own. The visitor's close_notify, or a TCP
EOF without one (a "ragged EOF": many HTTP clients just close), ends the
visitor -> inner direction: ``inner.readConnectionLost()``. The inner's
``loseWriteConnection()`` sends close_notify and a TCP FIN and ends only the
inner -> visitor direction: we keep reading, which OpenSSL allows after
SSL_shutdown (RFC 8446 section 6.1 makes close_notify a half-close). Once both
directions have ended, the TCP connection closes.

Rule 3: closing never waits for the peer. ``loseConnection`` sends
close_notify, closes TCP, and aborts it if it is still there after
``close_timeout_seconds`` (a peer that does not read keeps our buffer full).

Backpressure is Twisted's: the inner protocol's producer is registered on the
raw transport (ciphertext backpressure is plaintext backpressure), and the
inner's pauseProducing stops reading from the raw transport.

Stdlib ``ssl`` details this relies on (OpenSSL 3, Python 3.11):
- ``SSLObject.read`` returns at most one TLS record (16 KiB) per call, so the
  read loop joins records into one ``inner.dataReceived`` per raw read (up to
  `DELIVER_BYTES`): the inner's per-call work (mux framing) is the cost.
- The peer's close_notify shows as ``b""`` from ``read()`` while we have not
  sent ours, and as ``SSLZeroReturnError`` once we have: both mean EOF.
- ``unwrap()`` raises ``SSLWantReadError`` after queueing close_notify when the
  peer has not sent its own, and returns when it has: both are success.
- ``write()`` after our close_notify raises (PROTOCOL_IS_SHUTDOWN); writing
  after the peer's close_notify is fine. Without SSL_MODE_ENABLE_PARTIAL_WRITE
  (CPython does not set it) ``write()`` takes all the bytes at once.
"""

from __future__ import annotations

import enum
import re
import ssl
import threading
from collections.abc import Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.wire.interfaces import IHalfCloseableTransport, ILayeredTransport, IMemoryviewReceiver
from relay.wire.tcpio import write_now, write_sequence_now

DEFAULT_HANDSHAKE_TIMEOUT_SECONDS = 10.0
# Same deadline as relay.wire.link.CLOSE_DEADLINE_SECONDS: long enough to flush a
# last response, short enough that a peer that stopped reading cannot pin us.
DEFAULT_CLOSE_TIMEOUT_SECONDS = 5.0
# A TLS record carries at most 16 KiB of plaintext (RFC 8446 5.1), and
# SSLObject.read() returns at most one record.
RECORD_BYTES = 16 * 1024
# Decrypted bytes handed to inner.dataReceived at once: up to 256 KiB as a
# memoryview to an inner protocol that copies what it keeps (it provides
# `relay.wire.interfaces.IMemoryviewReceiver`: the mux link), else 64 KiB as bytes.
# Allocations above glibc's mmap threshold (128 KiB) cost an mmap, a page
# fault per 4 KiB and a munmap each: every buffer on the data path stays
# below it or is reused.
DELIVER_VIEW_BYTES = 256 * 1024
DELIVER_BYTES = 64 * 1024
# Plaintext encrypted per SSLObject.write when the inner writes a sequence
# (a turn's frames of many streams): the ciphertext pieces go out in one
# sendmsg, with no join of the whole turn.
ENCRYPT_BYTES = 64 * 1024
# Records are decrypted into one buffer per thread (SSLObject.read(n) would
# allocate n bytes per call). It serves every layer of that thread's reactor:
# a delivery is used or copied before the next read. Per thread, because
# forward() runs a private reactor thread next to the caller's reactor, and
# SSL_read writes into the buffer with the GIL released.
_per_thread = threading.local()


def _scratch_view() -> memoryview:
    view = getattr(_per_thread, "scratch", None)
    if view is None:
        view = _per_thread.scratch = memoryview(bytearray(DELIVER_VIEW_BYTES + RECORD_BYTES))
    return view


class _Phase(enum.Enum):
    HANDSHAKING = "handshaking"  # the inner protocol does not exist yet
    OPEN = "open"  # inner connected; each direction may still end on its own
    CLOSING = "closing"  # TCP close requested (or aborted); nothing more is delivered
    CLOSED = "closed"  # the raw transport called connectionLost


# (phase, input) -> next phase. Callers check their own preconditions (an
# idempotent loseConnection returns early), so a missing entry is our bug.
_TRANSITIONS = {
    (_Phase.HANDSHAKING, "handshake_completed"): _Phase.OPEN,
    (_Phase.HANDSHAKING, "close"): _Phase.CLOSING,
    (_Phase.HANDSHAKING, "lost"): _Phase.CLOSED,
    (_Phase.OPEN, "close"): _Phase.CLOSING,
    (_Phase.OPEN, "lost"): _Phase.CLOSED,
    (_Phase.CLOSING, "lost"): _Phase.CLOSED,
}


class TLSLayerStateError(RuntimeError):
    """Our own bug: an input the phase table has no entry for (never sent on the wire)."""


# How a read loop ended, besides an SSLError instance.
_WANT_READ = "want-read"
_EOF = "eof"
# CPython appends " (_ssl.c:1006)" to every SSLError message.
_SSL_SOURCE_POSITION = re.compile(r" \(_ssl\.c:\d+\)$")


# IMemoryviewReceiver: dataReceived writes what it is given into the incoming
# BIO at once; ILayeredTransport: raw_transport() is the TCP connection under it.
@implementer(
    IHalfCloseableProtocol, ITCPTransport, ISSLTransport, IConsumer, IPushProducer,
    IMemoryviewReceiver, ILayeredTransport,
)
class TLSLayer(Protocol):
    """The protocol of one raw TCP connection and the transport of ``inner``.

    Use: ``layer.makeConnection(raw_transport)``, then
    ``layer.dataReceived(bytes_already_read)``; forward every later
    ``dataReceived``, ``readConnectionLost`` and ``connectionLost`` of the raw
    transport to the layer. ``inner`` is a protocol, or a callable returning
    one (or None: no protocol, close) once the handshake has completed.
    """

    _log = Logger()

    def __init__(
        self,
        context: ssl.SSLContext,
        inner: IProtocol | Callable[[], IProtocol | None],
        clock,
        *,
        handshake_timeout_seconds: float = DEFAULT_HANDSHAKE_TIMEOUT_SECONDS,
        close_timeout_seconds: float = DEFAULT_CLOSE_TIMEOUT_SECONDS,
        on_handshake_failed: Callable[[str], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        server_side: bool = True,
        server_hostname: str | None = None,
        verify: Callable[[bytes | None], None] | None = None,
    ):
        self._context = context
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._verify = verify  # given the peer's DER certificate; raises to refuse it
        if IProtocol.providedBy(inner):
            self._inner, self._make_inner = inner, None
        else:
            self._inner, self._make_inner = None, inner
        self._inner_half_closeable = IHalfCloseableProtocol.providedBy(inner)
        self._inner_takes_views = IMemoryviewReceiver.providedBy(inner)
        self._clock = clock
        self._handshake_timeout_seconds = handshake_timeout_seconds
        self._close_timeout_seconds = close_timeout_seconds
        self._on_handshake_failed = on_handshake_failed
        self._on_lost = on_lost  # the raw connection ended, handshake or not
        self.negotiated_protocol: str | None = None
        self.disconnecting = False  # as on Twisted transports: loseConnection was called
        self._phase = _Phase.HANDSHAKING
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj: ssl.SSLObject | None = None
        self._ssl = None
        self._handshake_completed = False
        self._read_done = False  # visitor -> inner ended (EOF delivered to inner)
        self._write_done = False  # inner -> visitor ended (close_notify queued)
        self._raw_eof = False  # the raw transport's read side ended
        self._read_paused = False  # the inner asked us to stop delivering
        self._producer_registered = False  # on the raw transport, for the inner
        self._inner_lost = False  # inner.connectionLost was called
        self._error: Failure | None = None  # a TLS error to report to the inner
        self._handshake_call = None
        self._close_call = None

    # -- raw side: the TCP transport calls these ------------------------------

    def connectionMade(self):
        self._sslobj = self._context.wrap_bio(
            self._incoming, self._outgoing,
            server_side=self._server_side, server_hostname=self._server_hostname,
        )
        # The C object behind ssl.SSLObject (same methods and errors): the
        # data path calls it directly, one Python frame less per record.
        self._ssl = getattr(self._sslobj, "_sslobj", self._sslobj)
        self._handshake_call = self._clock.callLater(
            self._handshake_timeout_seconds, self._handshake_timed_out
        )
        if not self._server_side:
            self._continue_handshake()  # the ClientHello is ours to send

    def dataReceived(self, data: bytes):
        phase = self._phase
        if phase is _Phase.OPEN:
            if self._read_done:
                return  # bytes after close_notify mean nothing
            self._incoming.write(data)
            if not self._read_paused:
                self._read_plaintext()
            # Reading can queue records too (TLS 1.3 KeyUpdate answers, alerts).
            if self._outgoing.pending:
                write_now(self.transport, self._outgoing.read())
        elif phase is _Phase.HANDSHAKING:
            self._incoming.write(data)
            self._continue_handshake()
        # CLOSING, CLOSED: we asked TCP to close; nothing more is delivered.

    def readConnectionLost(self):
        """TCP EOF: during the handshake a failure; after it, EOF for the inner
        (after the decrypted bytes), whether or not close_notify came first."""
        if self._raw_eof:
            return
        self._raw_eof = True
        if self._phase is _Phase.HANDSHAKING:
            self._fail_handshake("connection closed during the TLS handshake")
        elif self._phase is _Phase.OPEN and not self._read_done and not self._read_paused:
            self._read_plaintext()  # ends with EOF: the BIO gets no more bytes
            self._flush()

    def writeConnectionLost(self):
        # The raw transport finished the FIN sent by loseWriteConnection; the
        # inner was told when close_notify was queued.
        pass

    def connectionLost(self, reason):
        if self._phase is _Phase.CLOSED:
            return
        was_handshaking = self._phase is _Phase.HANDSHAKING
        self._move("lost")
        self._cancel_timers()
        if self._on_lost is not None:
            self._on_lost()
        if was_handshaking:
            self._report_handshake_failure("connection lost during the TLS handshake")
        if self._inner is not None and self._handshake_completed and not self._inner_lost:
            self._inner_lost = True
            self._inner.connectionLost(self._error or reason)

    # -- the handshake ----------------------------------------------------------

    def _continue_handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()  # ServerHello .. Finished, or nothing yet
            return
        except ssl.SSLError as e:
            self._fail_handshake(_describe(e))
            return
        if self._verify is not None:
            try:
                self._verify(self._sslobj.getpeercert(binary_form=True))
            except Exception as e:  # the caller's check said no, in its own words
                self._fail_handshake(str(e) or type(e).__name__)
                return
        self._move("handshake_completed")
        self._handshake_completed = True
        self._cancel(self._handshake_call)
        self._handshake_call = None
        self.negotiated_protocol = self._sslobj.selected_alpn_protocol()
        self._flush()  # TLS 1.3 session tickets
        if self._inner is None:
            self._inner = self._make_inner()
            self._make_inner = None
            if self._inner is None:
                self._log.debug("no inner protocol for {peer}: closing", peer=self._peer())
                self.loseConnection()
                return
            self._inner_half_closeable = IHalfCloseableProtocol.providedBy(self._inner)
            self._inner_takes_views = IMemoryviewReceiver.providedBy(self._inner)
        self._inner.makeConnection(self)
        # The client's first request often shares a segment with its Finished.
        if self._phase is _Phase.OPEN and not self._read_paused:
            self._read_plaintext()
        self._flush()

    def _handshake_timed_out(self) -> None:
        self._handshake_call = None
        if self._phase is _Phase.HANDSHAKING:
            self._fail_handshake(
                f"TLS handshake not done after {self._handshake_timeout_seconds:g}s"
            )

    def _fail_handshake(self, reason_text: str) -> None:
        self._flush()  # the alert, if ssl produced one
        self._close_raw()
        self._report_handshake_failure(reason_text)

    def _report_handshake_failure(self, reason_text: str) -> None:
        # Called only on leaving HANDSHAKING, which happens once.
        self._log.debug("TLS handshake failed: {reason}", reason=reason_text)
        if self._on_handshake_failed is not None:
            self._on_handshake_failed(reason_text)

    # -- visitor -> inner ---------------------------------------------------------

    def _read_plaintext(self) -> None:
        """Deliver decrypted bytes until ssl needs more ciphertext, the visitor's
        stream ends, TLS fails, or the inner pauses or closes us."""
        sslobj = self._ssl
        read = sslobj.read
        incoming = self._incoming
        deliver = self._inner.dataReceived
        views = self._inner_takes_views
        limit = DELIVER_VIEW_BYTES if views else DELIVER_BYTES
        scratch = _scratch_view()
        while True:
            size = 0
            end = None
            try:
                while size < limit:
                    n = read(RECORD_BYTES, scratch[size : size + RECORD_BYTES])
                    if not n:  # close_notify while ours is unsent
                        end = _EOF
                        break
                    size += n
                    if not incoming.pending and not sslobj.pending():
                        # Nothing left to decrypt: skip the read that would
                        # raise SSLWantReadError (an exception per delivery).
                        end = _WANT_READ
                        break
            except ssl.SSLWantReadError:
                end = _WANT_READ
            except ssl.SSLZeroReturnError:  # close_notify after ours
                end = _EOF
            except ssl.SSLError as e:
                end = e
            if size:
                deliver(scratch[:size] if views else bytes(scratch[:size]))
            if self._phase is not _Phase.OPEN or self._read_done:
                return  # the inner closed us, or a nested resumeProducing read to the end
            if end is None:
                if self._read_paused:
                    return  # resumeProducing reads the rest from the BIO
                continue
            if end is _WANT_READ:
                if self._raw_eof:
                    self._visitor_ended()  # ragged EOF: accepted, as HTTP clients do it
                return
            if end is _EOF:
                self._visitor_ended()
                return
            self._tls_failed(end)
            return

    def _visitor_ended(self) -> None:
        self._read_done = True
        if not self._inner_half_closeable:
            self._inner_lost = True
            self._inner.connectionLost(Failure(ConnectionDone("TLS stream ended")))
            self.loseConnection()
            return
        self._inner.readConnectionLost()
        if self._phase is _Phase.OPEN and self._write_done:
            self._close_raw()

    def _tls_failed(self, error: ssl.SSLError) -> None:
        self._log.debug(
            "TLS error from {peer}: {error}", peer=self._peer(), error=_describe(error)
        )
        self._error = Failure(error)
        self._read_done = self._write_done = True  # the TLS session is unusable
        self._flush()  # the alert, if ssl produced one
        self._close_raw()

    # -- inner -> visitor: ITransport ------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._write_done or self._phase is not _Phase.OPEN or not data:
            return  # like Twisted's transports, writes after a close are dropped
        if self._encrypt(data):
            write_now(self.transport, self._outgoing.read())

    def writeSequence(self, data) -> None:
        """Encrypt about ENCRYPT_BYTES at a time (small pieces joined into one
        record, large ones not joined at all) and send the ciphertext pieces
        together, without one allocation the size of the whole sequence."""
        if self._write_done or self._phase is not _Phase.OPEN:
            return
        outgoing = self._outgoing
        ciphertext = []
        pending = []
        size = 0
        for chunk in data:
            pending.append(chunk)
            size += len(chunk)
            if size >= ENCRYPT_BYTES:
                if not self._encrypt(pending[0] if len(pending) == 1 else b"".join(pending)):
                    return
                ciphertext.append(outgoing.read())
                pending = []
                size = 0
        if size:
            if not self._encrypt(pending[0] if len(pending) == 1 else b"".join(pending)):
                return
            ciphertext.append(outgoing.read())
        if len(ciphertext) == 1:
            write_now(self.transport, ciphertext[0])
        elif ciphertext:
            write_sequence_now(self.transport, ciphertext)

    def _encrypt(self, data) -> bool:
        """Queue data's records in the outgoing BIO; False if TLS failed."""
        try:
            written = self._ssl.write(data)
            if written < len(data):  # not with CPython's SSL modes; kept for safety
                view = memoryview(data)
                while written < len(data):
                    written += self._ssl.write(view[written:])
        except ssl.SSLError as e:
            self._tls_failed(e)
            return False
        return True

    def loseWriteConnection(self) -> None:
        """Send close_notify and a TCP FIN; keep reading the visitor."""
        if self._phase is not _Phase.OPEN or self._write_done:
            return
        self._write_done = True
        self._send_close_notify()
        transport = self.transport
        # TCP sends its FIN, a MuxStream its mux FIN, both after close_notify.
        if ITCPTransport.providedBy(transport) or IHalfCloseableTransport.providedBy(transport):
            transport.loseWriteConnection()
        if self._inner_half_closeable:
            self._inner.writeConnectionLost()
        if self._phase is _Phase.OPEN and self._read_done:
            self._close_raw()

    def loseConnection(self) -> None:
        """close_notify, then close TCP; abort it after close_timeout_seconds."""
        if self._phase is _Phase.CLOSING or self._phase is _Phase.CLOSED:
            return
        if self._phase is _Phase.OPEN and not self._write_done:
            self._write_done = True
            self._send_close_notify()
        self._close_raw()

    def abortConnection(self) -> None:
        if self._phase is _Phase.CLOSED:
            return
        if self._phase is not _Phase.CLOSING:
            self._move("close")
        self.disconnecting = True
        self._cancel(self._handshake_call)
        self._handshake_call = None
        self.transport.abortConnection()

    def raw_transport(self):
        """The TCP transport under this layer (ILayeredTransport)."""
        return self.transport

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    def getHandle(self):
        return self.transport.getHandle()

    def getTcpNoDelay(self):
        return self.transport.getTcpNoDelay()

    def setTcpNoDelay(self, enabled):
        self.transport.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self):
        return self.transport.getTcpKeepAlive()

    def setTcpKeepAlive(self, enabled):
        self.transport.setTcpKeepAlive(enabled)

    def getPeerCertificate(self) -> bytes | None:
        """The client's certificate (DER) after the handshake, or None."""
        if not self._handshake_completed:
            return None
        return self._sslobj.getpeercert(binary_form=True)

    # -- IConsumer: the inner's producer goes on the raw transport ------------------

    def registerProducer(self, producer, streaming) -> None:
        if self._phase is not _Phase.OPEN:
            # A producer registered on a closing transport would stall its close
            # (Twisted's doWrite skips it while the producer is paused).
            producer.stopProducing()
            return
        self.transport.registerProducer(producer, streaming)
        self._producer_registered = True

    def unregisterProducer(self) -> None:
        if self._producer_registered:
            self._producer_registered = False
            self.transport.unregisterProducer()

    # -- IPushProducer: the inner controls reading from the visitor ------------------

    def pauseProducing(self) -> None:
        if self._read_paused:
            return
        self._read_paused = True
        if self._phase is _Phase.OPEN and not self._raw_eof:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._read_paused:
            return
        self._read_paused = False
        if self._phase is not _Phase.OPEN:
            return
        if not self._raw_eof:
            # After TCP EOF Twisted has dropped the reader; resuming would read
            # EOF again and call readConnectionLost twice.
            self.transport.resumeProducing()
        if not self._read_done:
            self._read_plaintext()  # records that arrived before the pause
            self._flush()

    def stopProducing(self) -> None:
        # A TCP transport's stopProducing is loseConnection; ours adds close_notify.
        self.loseConnection()

    # -- helpers ---------------------------------------------------------------------

    def _send_close_notify(self) -> None:
        try:
            self._sslobj.unwrap()  # returns if the peer's close_notify came first
        except ssl.SSLWantReadError:
            pass  # close_notify is queued; the peer's is not needed
        except ssl.SSLError as e:
            self._log.debug("no close_notify for {peer}: {error}", peer=self._peer(), error=e)
        self._flush()

    def _close_raw(self) -> None:
        """Close TCP now, and abort it if it is still there at the deadline."""
        self._move("close")
        self.disconnecting = True
        self._cancel(self._handshake_call)
        self._handshake_call = None
        if self._producer_registered:
            # A paused streaming producer makes Twisted skip the close.
            self._producer_registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._close_call = self._clock.callLater(self._close_timeout_seconds, self._close_overdue)

    def _close_overdue(self) -> None:
        self._close_call = None
        if self._phase is not _Phase.CLOSED:
            self._log.debug("TLS close to {peer} overdue: aborting", peer=self._peer())
            self.transport.abortConnection()

    def _flush(self) -> None:
        if self._outgoing.pending:
            write_now(self.transport, self._outgoing.read())

    def _move(self, event: str) -> None:
        try:
            self._phase = _TRANSITIONS[(self._phase, event)]
        except KeyError:
            raise TLSLayerStateError(
                f"no transition for {event!r} in phase {self._phase.value!r}"
            ) from None

    def _cancel_timers(self) -> None:
        self._cancel(self._handshake_call)
        self._cancel(self._close_call)
        self._handshake_call = self._close_call = None

    @staticmethod
    def _cancel(call) -> None:
        if call is not None and call.active():
            call.cancel()

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"


def _describe(error: ssl.SSLError) -> str:
    """An ssl error as one line, without CPython's source position: "[SSL:
    PEER_DID_NOT_RETURN_A_CERTIFICATE] peer did not return a certificate"."""
    return _SSL_SOURCE_POSITION.sub("", str(error))


class TLSLayerFactory(Factory):
    """Wraps every protocol of `wrapped` in a TLSLayer: stdlib TLS for a
    listening or dialling endpoint (the agent link's two ends)."""

    noisy = False

    def __init__(self, context: ssl.SSLContext, wrapped: Factory, clock, **layer_options):
        self.context = context
        self.wrapped = wrapped
        self.clock = clock
        self.layer_options = layer_options

    def doStart(self):
        self.wrapped.doStart()

    def doStop(self):
        self.wrapped.doStop()

    def buildProtocol(self, addr):
        inner = self.wrapped.buildProtocol(addr)
        if inner is None:
            return None
        return TLSLayer(self.context, inner, self.clock, **self.layer_options)
