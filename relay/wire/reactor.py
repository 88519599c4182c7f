"""The reactor `twistd relay` and `tunnel-client` run on: Twisted's epoll
reactor with two changes, both measured in docs/performance.md.

1. A turn-end hook. ``call_at_turn_end(f)`` runs ``f`` once every event of
   the current poll batch has been handled, before the reactor waits again.
   A mux link queues the frames of every visitor and service that woke up in
   the batch and sends them in one TLS write and one ``send()`` (corking):
   32 parallel connections cost one link write per batch instead of one per
   event. Calls queued outside a batch (by a timer) make the next poll
   return at once, so nothing waits on the hook. Like every reactor method,
   it is for the reactor thread only.

2. Leaner dispatch. Stock ``doPoll`` wraps every event in
   ``log.callWithLogger``, which builds a logging context for legacy
   ``log.msg`` prefixes: about twenty Python calls per event, a large share
   of a tunnel hop. Here each event goes straight to ``_doReadOrWrite``
   (which already catches and logs application errors), and only an error
   escaping that is logged.

Installed only when no reactor is installed yet: ``twistd --reactor=...``
still wins. Code that gets a different reactor (tests with ``task.Clock``,
other reactors) simply has no ``call_at_turn_end`` and writes at once.
"""

import errno
import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger


class RelayReactor(EPollReactor):
    _log = Logger()

    def __init__(self):
        self._turn_end: list = []
        super().__init__()

    def call_at_turn_end(self, f) -> None:
        """Run f() after the events of this poll batch (once per call)."""
        self._turn_end.append(f)  # from a timer: timeout() makes the next poll return at once

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


def install() -> None:
    """Install RelayReactor as the global reactor, unless one is installed."""
    if "twisted.internet.reactor" in sys.modules:
        return
    from twisted.internet.main import installReactor

    installReactor(RelayReactor())

