"""A node's graceful stop: what SIGTERM does (`twistd relay`, relay/node/service.py).

It is not the immediate stop (a second SIGTERM, SIGINT, or the end of the
grace period), which closes whatever is left; this module only decides when
that moment comes.

    running --start--> draining --last link gone / deadline / force--> stopped
    running --force--> stopped

Draining: the node accepts no new agents or visitors (`stop_accepting` closes
the listening sockets; a login or visitor accepted just before is refused),
every agent link gets GOAWAY(DRAINING) (docs/protocol.md, "Draining") and
closes itself once its last stream ends, so an agent without live visitors
reconnects at once. `when_done()` fires when no authenticated link is left, when
`grace_period_seconds` have passed, or on `force()`, whichever comes first:
the process exits as soon as the last stream ends, and never later than the
deadline.
"""

from __future__ import annotations

import enum

from twisted.internet import defer
from twisted.logger import Logger

DEFAULT_GRACE_PERIOD_SECONDS = 30.0  # cloudflared's --grace-period, Kubernetes' terminationGracePeriodSeconds


class DrainState(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class DrainInput(enum.Enum):
    START = "start"  # the first SIGTERM
    LAST_LINK_GONE = "last-link-gone"
    DEADLINE = "deadline"
    FORCE = "force"  # a second SIGTERM, or SIGINT


_S, _I = DrainState, DrainInput
# (state, input) -> next state. Inputs after STOPPED are ignored before the
# lookup (a second signal while the reactor shuts down); a missing pair is our bug.
_TRANSITIONS = {
    (_S.RUNNING, _I.START): _S.DRAINING,
    (_S.RUNNING, _I.FORCE): _S.STOPPED,
    (_S.DRAINING, _I.START): _S.DRAINING,
    (_S.DRAINING, _I.LAST_LINK_GONE): _S.STOPPED,
    (_S.DRAINING, _I.DEADLINE): _S.STOPPED,
    (_S.DRAINING, _I.FORCE): _S.STOPPED,
}


class DrainStateError(RuntimeError):
    """Our own bug: an input the drain's table has no entry for."""


class NodeDrain:
    _log = Logger()

    def __init__(self, clock, tunnels, stop_accepting, grace_period_seconds: float = DEFAULT_GRACE_PERIOD_SECONDS):
        """`tunnels`: the node's TunnelManager (its `links`, `draining`,
        `on_link_gone`); `stop_accepting()`: close the agent and visitor
        listening sockets, a Deferred."""
        self.clock = clock
        self.tunnels = tunnels
        self.stop_accepting = stop_accepting
        self.grace_period_seconds = grace_period_seconds
        self.state = DrainState.RUNNING
        self.how: str | None = None  # how it ended: "drained", "deadline" or "forced"
        self._waiters: list[defer.Deferred] = []
        self.started_at: float | None = None
        self.streams_cut = 0  # streams still open when the drain ended
        self._deadline = None

    def _move(self, what: DrainInput) -> DrainState:
        try:
            self.state = _TRANSITIONS[(self.state, what)]
        except KeyError:
            raise DrainStateError(f"drain: {what.value} in state {self.state.value}") from None
        return self.state

    def _streams_left(self) -> int:
        return sum(len(link.streams) for link in self.tunnels.links)

    def when_done(self) -> defer.Deferred:
        """A Deferred of its own for each caller, fired with `how`."""
        if self.how is not None:
            return defer.succeed(self.how)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def start(self) -> defer.Deferred:
        """Begin draining; fires (when_done) once it ended."""
        if self.state is not DrainState.RUNNING:
            return self.when_done()
        done = self.when_done()
        self._move(DrainInput.START)
        self.started_at = self.clock.seconds()
        self.tunnels.draining = True
        d = defer.maybeDeferred(self.stop_accepting)
        d.addErrback(lambda f: self._log.failure("closing the listening sockets failed", f))
        links = list(self.tunnels.links)
        self._log.info(
            "draining: no new agents or visitors; {streams} stream(s) on {links} agent link(s) may "
            "finish within {seconds:g}s (SIGTERM again or SIGINT: stop at once)",
            streams=self._streams_left(), links=len(links), seconds=self.grace_period_seconds,
        )
        self.tunnels.on_link_gone = self._link_gone
        for link in links:
            link.drain("relay draining")  # an idle link closes at once
        if self.state is DrainState.DRAINING:
            if not self.tunnels.links:
                self._end(DrainInput.LAST_LINK_GONE, "drained")
            else:
                self._deadline = self.clock.callLater(self.grace_period_seconds, self._deadline_reached)
        return done

    def force(self) -> None:
        """Stop now, whatever is still running."""
        if self.state is not DrainState.STOPPED:
            self._end(DrainInput.FORCE, "forced")

    def _link_gone(self) -> None:
        if self.state is DrainState.DRAINING and not self.tunnels.links:
            self._end(DrainInput.LAST_LINK_GONE, "drained")

    def _deadline_reached(self) -> None:
        self._deadline = None
        if self.state is DrainState.DRAINING:
            self._end(DrainInput.DEADLINE, "deadline")

    def _end(self, what: DrainInput, how: str) -> None:
        self._move(what)
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.tunnels.on_link_gone = None
        self.streams_cut = self._streams_left()
        elapsed = self.clock.seconds() - self.started_at if self.started_at is not None else 0.0
        if how == "drained":
            self._log.info("drained in {seconds:.2f}s: every stream finished", seconds=elapsed)
        elif how == "deadline":
            self._log.warn(
                "grace period of {seconds:g}s over: closing {streams} stream(s) still open",
                seconds=self.grace_period_seconds, streams=self.streams_cut,
            )
        elif self.started_at is None:
            self._log.info("stopping at once: closing {streams} stream(s)", streams=self.streams_cut)
        else:
            self._log.info(
                "stopping at once after {seconds:.2f}s of draining: closing {streams} stream(s) still open",
                seconds=elapsed, streams=self.streams_cut,
            )
        self.how = how
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(how)
