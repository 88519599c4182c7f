"""Admin HTTP API on loopback (klein): health and the live tunnel list.

Read-only and unauthenticated, so it binds 127.0.0.1 by default; never put
it on a public interface. Tokens and reclaim secrets never appear here.
"""

import json

from klein import Klein


class AdminAPI:
    app = Klein()

    def __init__(self, registry, started_at: float, clock, tls_front=None):
        self.registry = registry
        self.started_at = started_at
        self.clock = clock
        self.tls_front = tls_front  # TLSFrontFactory: refused-visitor counters

    def _json(self, request, body: dict) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(body, indent=1).encode() + b"\n"

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        body = {
            "status": "ok",
            "uptime_seconds": round(self.clock.seconds() - self.started_at, 3),
            "agents": len(self.registry.links),
            "tunnels": len(self.registry.tunnels),
        }
        front = self.tls_front
        if front is not None:
            body["tls_port_refused"] = {
                "unknown_names": front.unknown_names,
                "bad_hellos": front.bad_hellos,
                "hello_timeouts": front.hello_timeouts,
                "failed_handshakes": front.failed_handshakes,
            }
        return self._json(request, body)

    @app.route("/v1/tunnels", methods=["GET"])
    def tunnels(self, request):
        return self._json(request, {"tunnels": self.registry.describe()})
