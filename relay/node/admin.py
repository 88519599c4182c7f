"""Admin HTTP API on loopback (klein): health and the live tunnel list.

Read-only and unauthenticated, so it binds 127.0.0.1 by default; never put
it on a public interface. Tokens and reclaim secrets never appear here.
Every request's Host header must name the address the port is bound to
(or `localhost`, or one of `allowed_hosts`): a page on another site that a
browser on the relay's machine opens cannot reach this API by rebinding
its own DNS name to 127.0.0.1 (DNS rebinding), since its Host stays its own.
Counts come from the metrics observer (relay/wire/metrics.py `Counters`),
the tunnel list from the node's `TunnelManager`: no counters of its own;
`/metrics` is the Prometheus page over the same observer (docs/metrics.md).
"""

import json

from klein import Klein
from twisted.web.resource import Resource

from relay.wire.hostcheck import LOOPBACK_NAMES, allowed_hosts_for, host_allowed, host_of  # noqa: F401 (re-exported)


class AdminAPI:
    app = Klein()

    def __init__(self, tunnels, metrics, started_at: float, clock, *, interface: str = "127.0.0.1",
                 allowed_hosts=(), metrics_page=None):
        self.tunnels = tunnels  # relay.node.tunnels.TunnelManager
        self.metrics = metrics  # relay.wire.metrics.Counters
        self.started_at = started_at
        self.clock = clock
        self.allowed_hosts = allowed_hosts_for(interface, allowed_hosts)
        self.metrics_page = metrics_page  # relay.wire.prommetrics.MetricsPage, or None

    def host_allowed(self, request) -> bool:
        return host_allowed(request.getHeader(b"host"), self.allowed_hosts)

    def resource(self):
        """The web resource to serve: every route behind the Host check."""
        return _HostChecked(self.app.resource(), self)

    def refuse_host(self, request) -> bytes:
        request.setResponseCode(421)  # Misdirected Request (RFC 9110 15.5.20)
        return self._json(request, {"error": "unexpected Host header"})

    def _json(self, request, body: dict) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(body, indent=1).encode() + b"\n"

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        m = self.metrics
        refused = m.refused_by_reason
        body = {
            "status": "ok",
            "uptime_seconds": round(self.clock.seconds() - self.started_at, 3),
            "agents": m.links_up,
            "tunnels": m.tunnels_open,
            "streams_active": m.streams_active,
            "streams_total": m.streams_total,
            "auth_failures": m.auth_failures,
            "tls_port_refused": {
                "unknown_names": refused["unknown_name"],
                "bad_hellos": refused["bad_hello"],
                "hello_timeouts": refused["hello_timeout"],
                "failed_handshakes": refused["handshake_failed"],
            },
            "visitors_refused": dict(sorted(refused.items())),
        }
        return self._json(request, body)

    @app.route("/v1/tunnels", methods=["GET"])
    def tunnels(self, request):
        return self._json(request, {"tunnels": self.tunnels.describe(self.metrics.tunnel)})

    @app.route("/metrics", methods=["GET"])
    def prometheus(self, request):
        """Prometheus exposition (docs/metrics.md), rendered at scrape time."""
        if self.metrics_page is None:
            request.setResponseCode(404)
            return self._json(request, {"error": "metrics are off on this node"})
        return self.metrics_page.render_metrics(request)


class _HostChecked(Resource):
    """Checks the Host header before klein sees the request (klein itself
    raises on a Host that is not UTF-8), so no route can forget it."""

    isLeaf = True

    def __init__(self, wrapped, admin: AdminAPI):
        super().__init__()
        self._wrapped = wrapped
        self._admin = admin

    def render(self, request):
        if not self._admin.host_allowed(request):
            return self._admin.refuse_host(request)
        return self._wrapped.render(request)
