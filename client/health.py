"""The agent's health page on --metrics-port: /healthz, /ready and /metrics.

`GET /healthz`: the agent's status (client/agent.py TunnelAgent.status) and
each link's state and round-trip time, as JSON; 200 when Healthy or Degraded
(it serves), 503 when Down (no link up) or Inactive (never connected yet: as
good as Down to a probe, and an orchestrator's start-up delay covers the
first connect). `GET /ready`: 200 once every tunnel has its address and a
link serves it, else 503. `GET /metrics`: relay/wire/prommetrics.py's page.
Every path is behind the same Host check as /metrics.
"""

import json

from twisted.web.resource import Resource

from relay.wire.hostcheck import host_allowed

SERVING = ("Healthy", "Degraded")


class AgentHealthPage(Resource):
    isLeaf = True

    def __init__(self, agent, metrics_page):
        super().__init__()
        self.agent = agent
        self.metrics_page = metrics_page

    def render_GET(self, request):
        if not host_allowed(request.getHeader(b"host"), self.metrics_page.allowed_hosts):
            request.setResponseCode(421)  # Misdirected Request (RFC 9110 15.5.20)
            return b"unexpected Host header\n"
        if request.path == b"/metrics":
            return self.metrics_page.render_metrics(request)
        if request.path == b"/healthz":
            status = self.agent.status
            body = {"status": status, "links": self.agent.link_states()}
            return self._json(request, 200 if status in SERVING else 503, body)
        if request.path == b"/ready":
            ready = self.agent.ready
            tunnels = [
                {"urls": list(t.urls), "state": t.status} for t in self.agent.tunnels
            ]
            return self._json(request, 200 if ready else 503, {"ready": ready, "tunnels": tunnels})
        request.setResponseCode(404)
        return b"here: /healthz, /ready, /metrics\n"

    @staticmethod
    def _json(request, code: int, body: dict) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(body).encode() + b"\n"
