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

The overridden loop (``timeout``, ``doPoll``) and the private Twisted names
it uses are in `relay.wire.twisted_internals`, each with a test.

Installed only when no reactor is installed yet: ``twistd --reactor=...``
still wins. Code that gets a different reactor (tests with ``task.Clock``,
other reactors) does not provide `relay.wire.interfaces.ITurnEndReactor`
and writes at once.
"""

import sys

from zope.interface import implementer

from relay.wire.interfaces import ITurnEndReactor
from relay.wire.twisted_internals import TurnEndEPollReactor


@implementer(ITurnEndReactor)
class RelayReactor(TurnEndEPollReactor):
    """The epoll reactor with the turn-end hook; the overrides of Twisted's
    loop that run it are in `relay.wire.twisted_internals`."""

    def call_at_turn_end(self, f) -> None:
        """Run f() after the events of this poll batch (once per call)."""
        self._turn_end.append(f)  # from a timer: timeout() makes the next poll return at once


def install() -> None:
    """Install RelayReactor as the global reactor, unless one is installed."""
    if "twisted.internet.reactor" in sys.modules:
        return
    from twisted.internet.main import installReactor

    installReactor(RelayReactor())

