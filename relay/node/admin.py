"""Admin HTTP API on loopback (klein): health and the live tunnel list.

Read-only and unauthenticated, so it binds 127.0.0.1 by default; never put
it on a public interface. Tokens and reclaim secrets never appear here.
Counts come from the metrics observer (relay/wire/metrics.py `Counters`),
the tunnel list from the node's `TunnelManager`: no counters of its own.
"""

import json

from klein import Klein


class AdminAPI:
    app = Klein()

    def __init__(self, tunnels, metrics, started_at: float, clock):
        self.tunnels = tunnels  # relay.node.tunnels.TunnelManager
        self.metrics = metrics  # relay.wire.metrics.Counters
        self.started_at = started_at
        self.clock = clock

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
