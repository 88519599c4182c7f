"""The metrics seam: what the relay and the agent tell an observer they are given.

Protocol code calls an `IMetricsObserver` at each lifecycle event and never
imports a metrics library: the default, `NullMetrics`, does nothing, and
`Counters` keeps plain totals that the admin API reads. The Prometheus side
(relay/wire/prommetrics.py) is a `Counters` with a few more figures and a
collector that reads them at scrape time; anything that aggregates across
nodes would be one more implementation.

Events are facts in the past tense, with the few fields a dashboard needs.
Nothing here is called per byte: bytes are counted by the stream and
reported once, when it closes.
"""

from __future__ import annotations

from collections import Counter

from zope.interface import Interface, implementer


class IMetricsObserver(Interface):
    """Hears the lifecycle of links, tunnels and streams (both ends)."""

    def link_up(link_id: str, peer: str) -> None:
        """An authenticated link is up."""

    def link_down(link_id: str, reason: str) -> None:
        """An authenticated link ended; `reason` is a short word (goaway, lost, keepalive...)."""

    def tunnel_opened(tunnel_id: str, kind: str) -> None:
        """A tunnel was granted (kind: tcp, tls, or mixed for several services)."""

    def tunnel_closed(tunnel_id: str, reason: str) -> None:
        """A tunnel ended for good (not a link drop inside its grace period)."""

    def stream_opened(tunnel_id: str, open_seconds: float) -> None:
        """A visitor stream reached the other side; `open_seconds` is how long
        the open took (relay: visitor accepted to stream open; agent: OPEN to
        service connected)."""

    def stream_closed(tunnel_id: str, bytes_in: int, bytes_out: int) -> None:
        """A stream ended: bytes received from the link and sent onto it."""

    def visitor_refused(tunnel_id: str | None, reason: str) -> None:
        """A visitor was turned away (reason: agent_away, not_allowed,
        unknown_name, bad_hello, hello_timeout, handshake_failed, connect_failed, draining...)."""

    def auth_failed(peer: str) -> None:
        """A link presented a token that was refused."""

    def allocation_failed(reason: str) -> None:
        """A tunnel could not get a port or name (reason: the error code)."""

    def flow_stalled(link_id: str) -> None:
        """A link's transport filled up and paused its streams' reading."""

    def limit_hit(limit: str, tenant: str | None) -> None:
        """A limit refused something (limit: tunnels, tunnels_per_token, ports,
        port_range, hostnames, client_ca_bytes, streams_per_tunnel,
        streams_per_link, streams_per_token, new_streams_rate,
        opens_in_flight, open_files, ...); `tenant` is the
        session's (relay/node/tenants.py Grant), None where unknown."""


@implementer(IMetricsObserver)
class NullMetrics:
    """The default observer: hears everything, keeps nothing."""

    def link_up(self, link_id, peer):
        pass

    def link_down(self, link_id, reason):
        pass

    def tunnel_opened(self, tunnel_id, kind):
        pass

    def tunnel_closed(self, tunnel_id, reason):
        pass

    def stream_opened(self, tunnel_id, open_seconds):
        pass

    def stream_closed(self, tunnel_id, bytes_in, bytes_out):
        pass

    def visitor_refused(self, tunnel_id, reason):
        pass

    def auth_failed(self, peer):
        pass

    def allocation_failed(self, reason):
        pass

    def flow_stalled(self, link_id):
        pass

    def limit_hit(self, limit, tenant):
        pass


NULL_METRICS = NullMetrics()


@implementer(IMetricsObserver)
class Counters:
    """Plain totals and gauges for one process, as the admin API shows them.

    Per-tunnel figures live only while the tunnel does (`tunnel_closed`
    drops them), so memory follows the live tunnels, not their history.
    """

    def __init__(self):
        self.links_up = 0
        self.links_total = 0
        self.links_down_by_reason: Counter[str] = Counter()
        self.tunnels_open = 0
        self.tunnels_total = 0
        self.streams_active = 0
        self.streams_total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.open_seconds_sum = 0.0
        self.refused_by_reason: Counter[str] = Counter()
        self.auth_failures = 0
        self.allocation_failures: Counter[str] = Counter()
        self.flow_stalls = 0
        self.limit_hits: Counter[str] = Counter()
        self.per_tunnel: dict[str, dict[str, int]] = {}

    def _tunnel(self, tunnel_id: str) -> dict[str, int]:
        figures = self.per_tunnel.get(tunnel_id)
        if figures is None:
            figures = self.per_tunnel[tunnel_id] = self._zero()
        return figures

    def link_up(self, link_id, peer):
        self.links_up += 1
        self.links_total += 1

    def link_down(self, link_id, reason):
        self.links_up -= 1
        self.links_down_by_reason[reason] += 1

    def tunnel_opened(self, tunnel_id, kind):
        self.tunnels_open += 1
        self.tunnels_total += 1
        self._tunnel(tunnel_id)

    def tunnel_closed(self, tunnel_id, reason):
        self.tunnels_open -= 1
        self.per_tunnel.pop(tunnel_id, None)

    def stream_opened(self, tunnel_id, open_seconds):
        self.streams_active += 1
        self.streams_total += 1
        self.open_seconds_sum += open_seconds
        figures = self.per_tunnel.get(tunnel_id)
        if figures is not None:
            figures["streams_active"] += 1
            figures["streams_total"] += 1

    def stream_closed(self, tunnel_id, bytes_in, bytes_out):
        self.streams_active -= 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        figures = self.per_tunnel.get(tunnel_id)
        if figures is not None:
            figures["streams_active"] -= 1
            figures["bytes_in"] += bytes_in
            figures["bytes_out"] += bytes_out

    def visitor_refused(self, tunnel_id, reason):
        self.refused_by_reason[reason] += 1
        figures = self.per_tunnel.get(tunnel_id) if tunnel_id is not None else None
        if figures is not None:
            figures["refused_total"] += 1
            if reason == "not_allowed":
                figures["denied_total"] += 1

    def auth_failed(self, peer):
        self.auth_failures += 1

    def allocation_failed(self, reason):
        self.allocation_failures[reason] += 1

    def flow_stalled(self, link_id):
        self.flow_stalls += 1

    def limit_hit(self, limit, tenant):
        self.limit_hits[limit] += 1

    def tunnel(self, tunnel_id: str) -> dict[str, int]:
        """This tunnel's figures (zeros if it has none)."""
        return dict(self.per_tunnel.get(tunnel_id) or self._zero())

    @staticmethod
    def _zero() -> dict[str, int]:
        return {
            "streams_active": 0, "streams_total": 0, "refused_total": 0, "denied_total": 0,
            "bytes_in": 0, "bytes_out": 0,
        }
