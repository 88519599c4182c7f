"""The relay's shared TLS port: every encrypted tunnel, routed by SNI.

Each visitor's ClientHello is read whole (across TCP segments and TLS
records; bounded in size by relay.node.clienthello and in time here), then:

- unknown or missing server name: a fatal `unrecognized_name` alert
  (RFC 6066 section 3) and close, never a default tunnel;
- passthrough: the bytes read so far and everything after are spliced raw to
  the agent, so the visitor sees the origin's certificate;
- terminate: TLS starts in-process on the bytes already read, with the
  relay's certificate and the tunnel's own ALPN list and client CA (known
  before the handshake, so no SNI callback is needed), and the plaintext is
  spliced to the agent.

`TLSContexts` holds the relay's certificate and picks up a renewed one
without a restart (the agent port uses one too, for its own certificate);
`certificate_covers` says whether a certificate names a host, as agents check (SIGHUP, or a changed file seen by a periodic check).
Contexts are built lazily, one per (ALPN, client CA), always from the bytes
the last successful reload read and checked, never from the files as they are
now: between a renewal's two writes, or after a bad one, the files on disk do
not match, and a new tunnel must still get the last good certificate.
"""

import os
import ssl
import tempfile

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from relay.node.clienthello import ClientHelloError, ClientHelloReader
from relay.wire.tcpio import set_socket_options, socket_fd
from relay.wire.metrics import NULL_METRICS
from relay.wire.tlslayer import TLSLayer

# RFC 8446 6: alert record (21), TLS 1.2 record version, length 2, fatal (2),
# unrecognized_name (112).
UNRECOGNIZED_NAME_ALERT = bytes([21, 3, 3, 0, 2, 2, 112])
# A visitor gets this long to send its whole ClientHello.
CLIENT_HELLO_TIMEOUT_SECONDS = 10.0
# Distinct (ALPN list, client CA) pairs kept built; tunnels share them.
MAX_CACHED_CONTEXTS = 256


class TLSContexts:
    """Server contexts with the relay's certificate, one per (ALPN, client CA)."""

    _log = Logger()

    def __init__(self, cert_path: str, key_path: str):
        self.cert_path, self.key_path = str(cert_path), str(key_path)
        self._contexts: dict[tuple, ssl.SSLContext] = {}
        self._stamp = None
        self._pem: tuple[bytes, bytes] | None = None  # (chain, key) of the last good reload
        self.reload()

    def _files_stamp(self):
        return tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in (self.cert_path, self.key_path))

    def _build(self, alpn: tuple[str, ...], client_ca: bytes | None, pem=None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_cert_chain_bytes(context, *(pem or self._pem))
        if alpn:
            context.set_alpn_protocols(list(alpn))
        if client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=client_ca.decode())
        return context

    def server_context(self) -> ssl.SSLContext:
        """The plain context (no ALPN, no client CA): the agent port's."""
        return self.get((), None)

    def get(self, alpn: tuple[str, ...], client_ca: bytes | None) -> ssl.SSLContext:
        key = (alpn, client_ca)
        context = self._contexts.get(key)
        if context is None:
            if len(self._contexts) >= MAX_CACHED_CONTEXTS:
                self._contexts.pop(next(iter(self._contexts)))
            context = self._contexts[key] = self._build(alpn, client_ca)
        return context

    def reload(self) -> bool:
        """Load the certificate again; keep the old one if the new one is bad."""
        try:
            stamp = self._files_stamp()
            with open(self.cert_path, "rb") as f:
                chain = f.read()
            with open(self.key_path, "rb") as f:
                key = f.read()
            self._build((), None, (chain, key))  # proves the pair loads and matches
        except (OSError, ssl.SSLError) as e:
            if self._stamp is None:
                raise
            self._log.warn("keeping the old TLS certificate: {error}", error=e)
            return False
        changed = stamp != self._stamp
        self._stamp = stamp
        self._pem = (chain, key)
        self._contexts.clear()
        if changed:
            self._log.info("TLS certificate loaded from {path}", path=self.cert_path)
        return changed

    def reload_if_changed(self) -> None:
        try:
            if self._files_stamp() != self._stamp:
                self.reload()
        except OSError as e:
            self._log.warn("cannot check the TLS certificate: {error}", error=e)


def certificate_covers(cert_path: str, host: str) -> bool:
    """Whether the leaf (first certificate) of the PEM chain in `cert_path`
    names `host` as an agent checks it: service-identity (RFC 6125), so a
    wildcard covers one label, and an IP address must be an IP SAN.
    OSError or ValueError if the file is not a PEM certificate."""
    import ipaddress

    from cryptography import x509
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

    with open(cert_path, "rb") as f:
        leaf = x509.load_pem_x509_certificate(f.read())  # the first PEM block
    try:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            verify_certificate_hostname(leaf, host)
        else:
            verify_certificate_ip_address(leaf, host)
    except (VerificationError, CertificateError):
        return False
    return True


def _load_cert_chain_bytes(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """`load_cert_chain` from bytes: stdlib ssl reads only files, so hand it
    private ones that exist just for the call (unnamed memfds where Linux has
    them, else a 0700 temporary folder)."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("tls-chain"), os.memfd_create("tls-key")]
        try:
            for fd, data in zip(fds, (chain, key)):
                with open(fd, "wb", closefd=False) as f:
                    f.write(data)
            context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
            return
        except FileNotFoundError:
            pass  # no /proc: fall back to a folder
        finally:
            for fd in fds:
                os.close(fd)
    with tempfile.TemporaryDirectory() as folder:  # mkdtemp: mode 0700
        paths = [os.path.join(folder, "chain.pem"), os.path.join(folder, "key.pem")]
        for path, data in zip(paths, (chain, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(*paths)


@implementer(IHalfCloseableProtocol)
class SNIRouter(Protocol):
    """Reads one ClientHello, then hands the connection to a splice or a TLS layer."""

    _log = Logger()

    def __init__(self, factory: "TLSFrontFactory"):
        self.factory = factory
        self.next = None  # the protocol we forward to once routed
        self._reader = ClientHelloReader()
        self._timer = None
        self._routing = False  # the directory lookup is under way
        self._early: list[bytes] = []  # bytes that came during the lookup
        self._eof_early = False
        self._lost = False

    def connectionMade(self):
        fd_limit = self.factory.visitor_fd_limit
        if fd_limit is not None:
            fd = socket_fd(self.transport)
            if fd is not None and fd > fd_limit:
                self.factory.refused(None, "out_of_files")
                self.transport.abortConnection()  # the reserve is for agents and admin
                return
        set_socket_options(self.transport, keepalive=True)
        self._timer = self.factory.clock.callLater(CLIENT_HELLO_TIMEOUT_SECONDS, self._too_slow)

    def _too_slow(self):
        self._timer = None
        self.factory.refused(None, "hello_timeout")
        self.transport.abortConnection()

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes):
        if self.next is not None:
            self.next.dataReceived(data)
            return
        if self._routing:
            self._early.append(data)  # bounded: reading is paused while the lookup runs
            return
        try:
            hello = self._reader.feed(data)
        except ClientHelloError as e:
            self._cancel_timer()
            self.factory.refused(None, "bad_hello")
            self._log.debug("visitor {peer}: {error}", peer=self.transport.getPeer(), error=e)
            self.transport.abortConnection()
            return
        if hello is not None:
            self._cancel_timer()
            self._lookup(hello)

    def _lookup(self, hello):
        """Ask the directory for the tunnel of this name; it may answer later
        (a shared directory), so reading pauses until it does."""
        if not hello.server_name:
            self._refuse_name()
            return
        self._routing = True
        self.transport.pauseProducing()
        d = self.factory.tunnels.route_hostname(hello.server_name)
        d.addCallback(self._routed, hello)
        d.addErrback(self._lookup_failed)

    def _lookup_failed(self, failure):
        self._log.failure("hostname lookup failed", failure)
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()

    def _routed(self, target, hello):
        self._routing = False
        if self._lost:
            return  # the visitor left while we looked it up
        if target is None:
            self._refuse_name()
            return
        self.transport.resumeProducing()
        self._route(hello, *target)
        early, self._early = self._early, []
        for data in early:
            if self.next is None:
                break
            self.next.dataReceived(data)
        if self._eof_early and self.next is not None:
            self.readConnectionLost()

    def _refuse_name(self):
        self.factory.refused(None, "unknown_name")
        self.transport.write(UNRECOGNIZED_NAME_ALERT)
        self.transport.loseConnection()

    def _route(self, hello, tunnel, endpoint):
        tunnels = self.factory.tunnels
        peer, local = self.transport.getPeer(), self.transport.getHost()
        if endpoint.mode == "passthrough":
            splice = tunnels.visitor_protocol(tunnel, endpoint, peer, local, hello.server_name)
            if splice is None:
                self.transport.abortConnection()
                return
            self.next = splice
            splice.makeConnection(self.transport)
            splice.dataReceived(hello.raw)
            return
        if tunnels.admit(tunnel, peer) is None:
            self.transport.abortConnection()
            return
        context = self.factory.contexts.get(endpoint.alpn, tunnel.client_ca)

        def open_stream():
            # Only a completed handshake reaches the agent.
            return tunnels.visitor_protocol(tunnel, endpoint, peer, local, hello.server_name)

        layer = TLSLayer(
            context, open_stream, self.factory.clock,
            on_handshake_failed=self.factory.handshake_failed,
        )
        self.next = layer
        layer.makeConnection(self.transport)
        layer.dataReceived(hello.raw)

    def readConnectionLost(self):
        if self._routing:
            self._eof_early = True  # passed on once routed
            return
        if self.next is None:
            self.transport.abortConnection()
        elif IHalfCloseableProtocol.providedBy(self.next):
            self.next.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        if self.next is not None and IHalfCloseableProtocol.providedBy(self.next):
            self.next.writeConnectionLost()

    def connectionLost(self, reason):
        self._lost = True
        self._cancel_timer()
        if self.next is not None:
            self.next.connectionLost(reason)


class TLSFrontFactory(ServerFactory):
    noisy = False
    _log = Logger()

    def __init__(self, tunnels, contexts: TLSContexts, clock, metrics=NULL_METRICS):
        self.tunnels = tunnels  # relay.node.tunnels.TunnelManager
        self.visitor_fd_limit = None  # set by the service (relay.node.limits.visitor_fd_limit)
        self.contexts = contexts
        self.clock = clock
        self.metrics = metrics

    def buildProtocol(self, addr):
        return SNIRouter(self)

    def refused(self, tunnel_id, reason: str) -> None:
        self.metrics.visitor_refused(tunnel_id, reason)

    def handshake_failed(self, reason: str) -> None:
        self.metrics.visitor_refused(None, "handshake_failed")
        self._log.debug("visitor TLS handshake failed: {reason}", reason=reason)
