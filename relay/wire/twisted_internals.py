"""Every private Twisted attribute and method tunnel-relay relies on, in one place.

What this module is: the only code in `relay` and `client` that reads,
replaces or overrides a private Twisted name: an underscored one, or an
implementation detail outside ``twisted.internet.interfaces`` (``dataBuffer``,
``offset``, ``TLS``, ``socket``, ``doRead`` on an instance, the reactor's
``timeout``/``doPoll``). `relay.wire.tcpio` and `relay.wire.reactor`
build on it; nothing else imports it. Each behaviour below has a test in
tests/relay/test_twisted_internals.py that fails if Twisted changes it, and
setup.cfg pins Twisted to the releases those tests passed on.

What it is not: a place for our own logic. Corking, the shared read buffer
and the turn-end hook's contract (`relay.wire.interfaces.ITurnEndReactor`)
live in tcpio.py and reactor.py; this module only says how they reach into
Twisted. Private non-Twisted names (stdlib ``ssl.SSLObject._sslobj`` in
tlslayer.py) are not here.

Twisted versions checked: 23.10.0, 24.3.0, 24.11.0, 25.5.0, 26.4.0 and 26.10.0
(the tests and the unit suite pass on each); setup.cfg allows >=23.10,<27.

Relied on, and why (figures from docs/performance.md, "What changed in this round"):

1. `idle_socket` (``write_now``: round trip 600-670 -> 440-500 us, bulk
   240-260 -> 310-340 MB/s, with the shared read buffer below). Twisted's
   ``write()`` only queues; sending at once is safe only when nothing is
   queued. A ``twisted.internet.tcp.Connection`` (a ``FileDescriptor``) keeps
   its queue in ``_tempDataBuffer``/``_tempDataLen`` (bytes written since the
   last ``doWrite``) and ``dataBuffer``/``offset`` (what ``doWrite`` took,
   of which ``dataBuffer[offset:]`` is unsent). Writing is closed or closing
   when ``_writeDisconnecting`` / ``_writeDisconnected`` is set (half-close),
   ``disconnecting`` (loseConnection), ``_aborting`` (abortConnection: still
   ``connected`` until the next turn) or ``connected`` is false. After
   ``startTLS`` ``TLS`` is true and the socket carries ciphertext. ``socket``
   is the connected socket (as ``getHandle()``).
2. `reads_replaceable` / `replace_do_read` (the link's ``recv_into`` one
   shared 1 MiB buffer, part of the same gain as 1: no ``mmap``+``mremap``+
   ``munmap`` per message; tcpio.py's ``LINK_READ_BYTES`` notes 1.3-1.7x the
   bulk throughput of Twisted's 64 KiB reads). The
   reactor calls ``doRead`` looked up on the instance, so an instance
   attribute replaces ``Connection.doRead`` (Twisted's own ``abortConnection``
   does the same). ``doRead`` returns None, or a ``ConnectionLost`` /
   ``ConnectionDone`` instance that the reactor turns into
   ``connectionLost`` (``readConnectionLost`` for a half-closeable protocol
   on ``ConnectionDone``); ``twisted.internet.main.CONNECTION_LOST`` is the
   ``ConnectionLost`` instance Twisted returns for a failed ``recv``.
   ``Connection._dataReceived(data)`` hands non-empty data (a memoryview
   too, as it is) to ``protocol.dataReceived`` and returns None, and returns
   ``CONNECTION_DONE`` for empty data: Twisted's own path to EOF.
   `replace_do_read` is ``Connection.doRead`` with ``recv_into``; a test
   fails if Twisted's ``doRead`` changes, so the copy gets reviewed.
3. `TurnEndEPollReactor` (``RelayReactor``: round trip 440-500 -> 400-416
   us, relay CPU per new connection 350 -> 230 us). ``ReactorBase.mainLoop``
   calls ``timeout()`` (None: no timed call; else seconds to the next) and
   passes the result (False once stopping) to ``doIteration``: returning 0.0 from ``timeout()``
   keeps the next poll from blocking, and ``doIteration`` may be replaced.
   ``EPollReactor`` keeps its ``select.epoll`` in ``_poller`` and maps each
   watched fd to its selectable in ``_selectables``;
   ``_doReadOrWrite(selectable, fd, event)`` does the read, write or
   disconnect of one event and logs and disconnects on an exception from
   ``doRead``/``doWrite``. Our ``doPoll`` is Twisted's without
   ``log.callWithLogger`` around each event; a test fails if Twisted's
   ``doPoll`` changes, so the copy gets reviewed.
"""

import errno

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_LOST
from twisted.logger import Logger

# -- 1. the write queue of a TCP transport -----------------------------------------


def idle_socket(transport):
    """The transport's socket if it is a Twisted TCP connection with nothing
    queued and writing still open; None for anything else (TLS layers, test
    transports, a closing connection), which then takes the plain write()."""
    if getattr(transport, "_tempDataLen", None) != 0:
        return None
    if (
        not transport.connected
        or transport.disconnecting
        or getattr(transport, "_aborting", False)
        or getattr(transport, "TLS", False)  # after startTLS the socket carries ciphertext
        or transport._writeDisconnecting
        or transport._writeDisconnected
        or transport.offset != len(transport.dataBuffer)
    ):
        return None
    return getattr(transport, "socket", None)


# -- 2. a TCP transport's reads -----------------------------------------------------


def reads_replaceable(transport) -> bool:
    """True for a Twisted TCP connection, whose doRead `replace_do_read` can replace."""
    return getattr(transport, "socket", None) is not None and hasattr(transport, "_dataReceived")


def replace_do_read(transport, view: memoryview, deliver=None) -> None:
    """Make the reactor read `transport` with ``recv_into(view)``, handing
    ``view[:n]`` to `deliver` (default: the transport's protocol, through
    Twisted's ``_dataReceived``). EOF always goes through ``_dataReceived``,
    so the protocol still gets readConnectionLost or connectionLost.
    Only for a transport `reads_replaceable` accepts."""
    recv_into = transport.socket.recv_into
    received = transport._dataReceived

    if deliver is None:

        def doRead():
            try:
                n = recv_into(view)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return CONNECTION_LOST
            return received(view[:n])  # an empty view is EOF, as b"" is

    else:

        def doRead():
            try:
                n = recv_into(view)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return CONNECTION_LOST
            if not n:
                return received(b"")  # EOF: Twisted's own path to connectionLost
            deliver(view[:n])
            return None

    transport.doRead = doRead


# -- 3. the epoll reactor's loop ----------------------------------------------------


class TurnEndEPollReactor(EPollReactor):
    """Twisted's epoll reactor with a list of calls run after each poll batch.

    ``_turn_end`` holds zero-argument calls; each poll runs them once every
    event of its batch is handled (calls they queue run in the same turn),
    and while it is not empty ``timeout()`` is 0 so the poll does not block.
    Events go straight to ``_doReadOrWrite`` (which already catches and logs
    application errors), without stock ``doPoll``'s ``log.callWithLogger``
    (about twenty Python calls per event, for legacy ``log.msg`` prefixes).
    """

    _log = Logger()

    def __init__(self):
        self._turn_end: list = []
        super().__init__()

    def timeout(self):
        if self._turn_end:
            return 0.0
        return super().timeout()

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        get = self._selectables.get
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except Exception:
                # _doReadOrWrite catches application errors; this is a failure
                # inside its own disconnect handling. Log it and go on.
                self._log.failure("error handling an event of {selectable!r}", selectable=selectable)
        while self._turn_end:
            calls, self._turn_end = self._turn_end, []
            for call in calls:
                try:
                    call()
                except Exception:
                    self._log.failure("error in a turn-end call")

    doIteration = doPoll
