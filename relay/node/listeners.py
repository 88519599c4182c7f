"""Public TCP ports: binding a random free port of the range for a tunnel's
TCP endpoint, and unbinding it into quarantine (relay/node/ports.py).

This is the node's local half of a TCP endpoint: the directory records which
tunnel a port belongs to; only the node that holds the listening socket
binds it. Each listening socket's factory knows its tunnel and endpoint, so
a visitor on it needs no lookup.
"""

from __future__ import annotations

import errno

from twisted.internet import defer
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from relay.mux.control import LimitExceededError, NoPortsAvailableError, RelayOverloadedError
from relay.node.ports import NoFreePortError, PortAllocator
from relay.wire.tcpio import LISTEN_BACKLOG

# Ports another process happens to hold are skipped; give up after this many.
MAX_BIND_ATTEMPTS = 32
OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class VisitorFactory(ServerFactory):
    """Accepts visitors on a TCP endpoint's public port; `open_visitor(addr,
    local)` makes each one's protocol (or None: Twisted closes it at once)."""

    noisy = False  # one log line per tunnel/link is ours to write

    def __init__(self, open_visitor):
        self.open_visitor = open_visitor
        self.listening = None  # IListeningPort, once bound

    def buildProtocol(self, addr):
        local = self.listening.getHost() if self.listening is not None else None
        return self.open_visitor(addr, local)


class PublicPorts:
    """Binds and unbinds the public ports of TCP endpoints."""

    _log = Logger()

    def __init__(self, reactor, allocator: PortAllocator, interface: str):
        self.reactor = reactor
        self.allocator = allocator
        self.interface = interface
        self._listening: dict[int, object] = {}  # port -> IListeningPort

    @defer.inlineCallbacks
    def bind(self, factory: VisitorFactory, claim=None, within: tuple[int, int] | None = None,
             port: int | None = None):
        """Listen on a free port of the range (or of `within`, a token's
        ports) with `factory`, or on `port` (one reserved for a stable name,
        or restored after a restart); fires with the port number.
        `claim(port)` (a Deferred of bool) may veto a port. Errs with
        NoPortsAvailableError, or LimitExceededError naming the token's range."""
        exact = port
        if exact is not None:
            candidates = [exact]
            # Reserved for a name: a failed bind must leave it reserved.
            unclaim = (lambda p: None) if exact in self.allocator.in_use else self.allocator.unclaim
        else:
            unclaim = self.allocator.unclaim
            try:
                candidates = self.allocator.candidates(MAX_BIND_ATTEMPTS, within)
            except NoFreePortError as e:
                if within is not None:
                    raise LimitExceededError(None, f"public ports of this token ({within[0]}-{within[1]}): {e}", "port_range") from None
                raise NoPortsAvailableError(None, str(e)) from None
        for port in candidates:
            self.allocator.claim(port)  # before any yield: no concurrent request takes it
            try:
                if claim is not None and not (yield claim(port)):
                    unclaim(port)
                    continue
                listener = serverFromString(
                    self.reactor,
                    f"tcp:{port}:interface={quoteStringArgument(self.interface)}:backlog={LISTEN_BACKLOG}",
                )
                factory.listening = yield listener.listen(factory)
            except CannotListenError as e:
                unclaim(port)  # held elsewhere: not ours to quarantine
                if getattr(e.socketError, "errno", None) in OUT_OF_FILES:
                    # Not "no bindable port": no port would bind now.
                    raise RelayOverloadedError(None, "the relay is out of file descriptors") from None
                continue
            except BaseException:
                unclaim(port)
                raise
            self._listening[port] = factory.listening
            return port
        if exact is not None:
            raise NoPortsAvailableError(None, f"port {exact} is taken (another process or tunnel holds it)")
        if within is not None:
            raise LimitExceededError(
                None, f"public ports of this token ({within[0]}-{within[1]}): no bindable port", "port_range"
            )
        raise NoPortsAvailableError(
            None, f"no bindable port in {self.allocator.low}-{self.allocator.high}"
        )

    def close_listeners(self) -> defer.Deferred:
        """Stop accepting on every public port (a drain), keeping the ports
        allocated: the tunnels still own them until they are closed."""
        listening, self._listening = self._listening, {}
        stops = [defer.maybeDeferred(port.stopListening) for port in listening.values()]
        return defer.DeferredList(stops, consumeErrors=True)

    def unbind(self, port: int, keep: bool = False) -> defer.Deferred:
        """Stop listening and put the port in quarantine (or, with `keep`,
        keep it reserved: a stable name's port); fires once unbound."""
        listening = self._listening.pop(port, None)
        if not keep:
            self.allocator.release(port)
        if listening is None:
            return defer.succeed(None)
        d = defer.maybeDeferred(listening.stopListening)
        d.addErrback(lambda f: self._log.failure("stopListening failed", f))
        return d
