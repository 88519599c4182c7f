"""Prometheus metrics of one process (relay or agent), made with prometheus-client.

`PrometheusMetrics` is the metrics observer (relay/wire/metrics.py) with
the few figures `Counters` lacks: the open-latency histogram's buckets,
tunnel kinds, per-tenant totals and limit hits. It keeps plain integers, as
`Counters` does: nothing of prometheus-client runs on the data path.
`MetricsCollector` turns them into metric families when Prometheus scrapes,
and reads then what is live (links, their streams' byte counts), so a long
download is seen while it runs, not only when it ends. `MetricsPage` is the
`/metrics` page, on the relay's admin port and on the agent's metrics port.

Cardinality is bounded: a tunnel's series exist while the tunnel does (they
go at `tunnel_closed`), at most `MAX_TUNNEL_SERIES` tunnels have series of
their own (the rest count in the totals only, and `*_tunnels_unlabelled`
says how many), and at most `MAX_TENANT_SERIES` tenants get a label (the
rest share `tenant="_other"`). docs/metrics.md lists every name.

No protocol code imports this module (STYLE.md): the node and the agent's
command line build it and hand it in as their observer.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from twisted.web.resource import Resource

from relay.wire.hostcheck import host_allowed
from relay.wire.metrics import Counters

# Tunnels with series of their own: each costs about eight series, and
# Prometheus copes with some 10^4-10^5 series per target; a relay near its
# 512-tunnels-per-session limit with a few sessions stays under it.
MAX_TUNNEL_SERIES = 1000
# Tenants with a label of their own; the rest share OTHER_TENANT.
MAX_TENANT_SERIES = 200
OTHER_TENANT = "_other"
# Stream open latency buckets (seconds): a loopback open takes about a
# millisecond, a far agent's service some tens; 10 s is the open deadline.
OPEN_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Stream byte directions, named from the visitor's side so both ends agree.
TO_SERVICE, TO_VISITOR = "visitor_to_service", "service_to_visitor"


class PrometheusMetrics(Counters):
    """The metrics observer whose figures `/metrics` shows (and the admin API, as `Counters`).

    `end` is "relay" or "agent": on the relay a stream's bytes from the link
    go to the visitor, on the agent to the service. `tenant_of(tunnel_id)`
    names a new tunnel's tenant (the relay's sessions; None on the agent).
    `live_links()` gives the links up now, read at scrape time for the bytes
    of streams still open and each tenant's links.
    """

    def __init__(self, end: str, *, tenant_of=None, live_links=None, link_states=None,
                 max_tunnel_series: int = MAX_TUNNEL_SERIES, max_tenant_series: int = MAX_TENANT_SERIES):
        super().__init__()
        if end not in ("relay", "agent"):
            raise ValueError(f"end must be relay or agent, not {end!r}")
        self.end = end
        self._tenant_of = tenant_of
        self.live_links = live_links or (lambda: ())
        # The agent's links (client/agent.py TunnelAgent.link_states): up or
        # down and round-trip time, per link number; None on the relay.
        self.link_states = link_states
        self.max_tunnel_series = max_tunnel_series
        self.max_tenant_series = max_tenant_series
        # Non-cumulative counts per bucket; the last one is +Inf.
        self.open_buckets = [0] * (len(OPEN_SECONDS_BUCKETS) + 1)
        self.tunnels_by_kind: Counter[str] = Counter()
        self.tunnel_tenant: dict[str, str] = {}  # live tunnel id -> tenant label
        self.labelled: set[str] = set()  # live tunnels with series of their own
        self.per_tenant: dict[str, dict[str, int]] = {}
        self.limit_hits_by_tenant: Counter[tuple[str, str]] = Counter()

    def tenant_label(self, tenant: str | None) -> str | None:
        """The label a tenant's series carry (capped), or None for no tenant."""
        if tenant is None:
            return None
        if tenant in self.per_tenant:
            return tenant
        if len(self.per_tenant) >= self.max_tenant_series:
            tenant = OTHER_TENANT
        if tenant not in self.per_tenant:
            self.per_tenant[tenant] = {"streams_total": 0, "bytes_in": 0, "bytes_out": 0, "refused_total": 0}
        return tenant

    def tunnel_opened(self, tunnel_id, kind):
        super().tunnel_opened(tunnel_id, kind)
        self.tunnels_by_kind[kind] += 1
        if self._tenant_of is not None:
            tenant = self.tenant_label(self._tenant_of(tunnel_id))
            if tenant is not None:
                self.tunnel_tenant[tunnel_id] = tenant
        if len(self.labelled) < self.max_tunnel_series:
            self.labelled.add(tunnel_id)

    def tunnel_closed(self, tunnel_id, reason):
        super().tunnel_closed(tunnel_id, reason)
        self.tunnel_tenant.pop(tunnel_id, None)
        self.labelled.discard(tunnel_id)

    def stream_opened(self, tunnel_id, open_seconds):
        super().stream_opened(tunnel_id, open_seconds)
        self.open_buckets[bisect_left(OPEN_SECONDS_BUCKETS, open_seconds)] += 1
        tenant = self.tunnel_tenant.get(tunnel_id)
        if tenant is not None:
            self.per_tenant[tenant]["streams_total"] += 1

    def stream_closed(self, tunnel_id, bytes_in, bytes_out):
        super().stream_closed(tunnel_id, bytes_in, bytes_out)
        tenant = self.tunnel_tenant.get(tunnel_id)
        if tenant is not None:
            figures = self.per_tenant[tenant]
            figures["bytes_in"] += bytes_in
            figures["bytes_out"] += bytes_out

    def visitor_refused(self, tunnel_id, reason):
        super().visitor_refused(tunnel_id, reason)
        tenant = self.tunnel_tenant.get(tunnel_id) if tunnel_id is not None else None
        if tenant is not None:
            self.per_tenant[tenant]["refused_total"] += 1

    def limit_hit(self, limit, tenant):
        super().limit_hit(limit, tenant)
        label = self.tenant_label(tenant)
        self.limit_hits_by_tenant[(limit, label if label is not None else "")] += 1

    def directions(self, bytes_in: int, bytes_out: int) -> tuple[int, int]:
        """(visitor to service, service to visitor) of a stream's (in, out)."""
        return (bytes_out, bytes_in) if self.end == "relay" else (bytes_in, bytes_out)


class MetricsCollector(Collector):
    """Metric families of a `PrometheusMetrics`, built at each scrape."""

    def __init__(self, metrics: PrometheusMetrics, prefix: str):
        self.metrics = metrics
        self.prefix = prefix

    def collect(self):
        m, p = self.metrics, self.prefix
        per_tenant = m._tenant_of is not None  # the relay's sessions have tenants; the agent's link has none
        tunnel_labels = ["tunnel", "tenant"] if per_tenant else ["tunnel"]

        def tunnel_key(tunnel_id):
            return [tunnel_id, m.tunnel_tenant.get(tunnel_id, "")] if per_tenant else [tunnel_id]

        # Bytes of the streams still open, added to those of the closed ones.
        live_total = [0, 0]
        live_tunnel: dict[str, list[int]] = {}
        live_tenant: dict[str, list[int]] = {}
        tenant_links: Counter[str] = Counter()
        for link in m.live_links():
            if per_tenant:
                grant = getattr(link, "grant", None)
                if grant is not None:
                    tenant_links[m.tenant_label(grant.tenant)] += 1
            for stream in list(link.streams.values()):
                if not stream.reported_open:
                    continue
                b_in, b_out = stream.bytes_in, stream.bytes_out
                live_total[0] += b_in
                live_total[1] += b_out
                tunnel_id = stream.tunnel_id
                if tunnel_id in m.labelled:
                    pair = live_tunnel.setdefault(tunnel_id, [0, 0])
                    pair[0] += b_in
                    pair[1] += b_out
                tenant = m.tunnel_tenant.get(tunnel_id)
                if tenant is not None:
                    pair = live_tenant.setdefault(tenant, [0, 0])
                    pair[0] += b_in
                    pair[1] += b_out

        yield _gauge(f"{p}_links_active", "Authenticated links up now.", value=m.links_up)
        yield _counter(f"{p}_links_established", "Authenticated links that came up.", value=m.links_total)
        closed = CounterMetricFamily(f"{p}_links_closed", "Authenticated links that ended, by reason.", labels=["reason"])
        for reason, n in sorted(m.links_down_by_reason.items()):
            closed.add_metric([reason], n)
        yield closed
        yield _gauge(f"{p}_tunnels_active", "Tunnels open now (on the relay: with or without their agent).",
                     value=m.tunnels_open)
        opened = CounterMetricFamily(f"{p}_tunnels_opened", "Tunnels granted, by kind (tcp, tls, mixed).",
                                     labels=["kind"])
        for kind, n in sorted(m.tunnels_by_kind.items()):
            opened.add_metric([kind], n)
        yield opened
        yield _gauge(f"{p}_tunnels_unlabelled",
                     f"Tunnels open now without series of their own (more than {m.max_tunnel_series}).",
                     value=max(m.tunnels_open - len(m.labelled), 0))
        yield _gauge(f"{p}_streams_active", "Visitor streams open now.", value=m.streams_active)
        yield _counter(f"{p}_streams_opened", "Visitor streams that reached the other side.", value=m.streams_total)
        to_service, to_visitor = m.directions(m.bytes_in + live_total[0], m.bytes_out + live_total[1])
        stream_bytes = CounterMetricFamily(f"{p}_stream_bytes", "Bytes carried by visitor streams, by direction.",
                                           labels=["direction"])
        stream_bytes.add_metric([TO_SERVICE], to_service)
        stream_bytes.add_metric([TO_VISITOR], to_visitor)
        yield stream_bytes
        cumulative, buckets = 0, []
        for bound, n in zip((*OPEN_SECONDS_BUCKETS, float("inf")), m.open_buckets):
            cumulative += n
            buckets.append((_le(bound), cumulative))
        yield HistogramMetricFamily(
            f"{p}_stream_open_seconds",
            "Time from a visitor's accept to its service connected (relay), or from OPEN to the service "
            "connected (agent).",
            buckets=buckets, sum_value=m.open_seconds_sum,
        )
        refused = CounterMetricFamily(f"{p}_visitors_refused", "Visitors turned away, by reason.", labels=["reason"])
        for reason, n in sorted(m.refused_by_reason.items()):
            refused.add_metric([reason], n)
        yield refused
        yield _counter(f"{p}_auth_failures", "Links whose token was refused.", value=m.auth_failures)
        allocation = CounterMetricFamily(f"{p}_allocation_failures",
                                         "Tunnels refused a port or name, by error code.", labels=["reason"])
        for reason, n in sorted(m.allocation_failures.items()):
            allocation.add_metric([reason], n)
        yield allocation
        limit_labels = ["limit", "tenant"] if per_tenant else ["limit"]
        limits = CounterMetricFamily(f"{p}_limit_hits", "Requests or visitors refused by a limit, by limit.",
                                     labels=limit_labels)
        for (limit, tenant), n in sorted(m.limit_hits_by_tenant.items()):
            limits.add_metric([limit, tenant] if per_tenant else [limit], n)
        yield limits
        yield _counter(f"{p}_flow_stalls", "Times a link's transport filled and paused its streams.",
                       value=m.flow_stalls)

        # Per tunnel: only live tunnels, at most max_tunnel_series of them.
        t_active = GaugeMetricFamily(f"{p}_tunnel_streams_active", "Visitor streams open now, per tunnel.",
                                     labels=tunnel_labels)
        t_opened = CounterMetricFamily(f"{p}_tunnel_streams_opened", "Visitor streams opened, per tunnel.",
                                       labels=tunnel_labels)
        t_bytes = CounterMetricFamily(f"{p}_tunnel_stream_bytes", "Bytes carried, per tunnel and direction.",
                                      labels=[*tunnel_labels, "direction"])
        t_refused = CounterMetricFamily(f"{p}_tunnel_visitors_refused", "Visitors turned away, per tunnel.",
                                        labels=tunnel_labels)
        for tunnel_id in sorted(m.labelled):
            figures = m.per_tunnel.get(tunnel_id)
            if figures is None:
                continue
            key = tunnel_key(tunnel_id)
            live = live_tunnel.get(tunnel_id, (0, 0))
            to_service, to_visitor = m.directions(figures["bytes_in"] + live[0], figures["bytes_out"] + live[1])
            t_active.add_metric(key, figures["streams_active"])
            t_opened.add_metric(key, figures["streams_total"])
            t_bytes.add_metric([*key, TO_SERVICE], to_service)
            t_bytes.add_metric([*key, TO_VISITOR], to_visitor)
            t_refused.add_metric(key, figures["refused_total"])
        yield from (t_active, t_opened, t_bytes, t_refused)

        if m.link_states is not None:  # the agent's links, each up or down, with its RTT
            yield from self._agent_links(m.link_states(), p)
        if not per_tenant:
            return
        tenants = sorted(set(m.per_tenant) | set(tenant_links))
        tunnels_of: Counter[str] = Counter(m.tunnel_tenant.values())
        streams_of: Counter[str] = Counter()
        for tunnel_id, tenant in m.tunnel_tenant.items():
            figures = m.per_tunnel.get(tunnel_id)
            if figures is not None:
                streams_of[tenant] += figures["streams_active"]
        g_links = GaugeMetricFamily(f"{p}_tenant_links_active", "Links up now, per tenant.", labels=["tenant"])
        g_tunnels = GaugeMetricFamily(f"{p}_tenant_tunnels_active", "Tunnels open now, per tenant.",
                                      labels=["tenant"])
        g_streams = GaugeMetricFamily(f"{p}_tenant_streams_active", "Visitor streams open now, per tenant.",
                                      labels=["tenant"])
        c_opened = CounterMetricFamily(f"{p}_tenant_streams_opened", "Visitor streams opened, per tenant.",
                                       labels=["tenant"])
        c_bytes = CounterMetricFamily(f"{p}_tenant_stream_bytes", "Bytes carried, per tenant and direction.",
                                      labels=["tenant", "direction"])
        c_refused = CounterMetricFamily(f"{p}_tenant_visitors_refused", "Visitors turned away, per tenant.",
                                        labels=["tenant"])
        for tenant in tenants:
            figures = m.per_tenant.get(tenant) or {"streams_total": 0, "bytes_in": 0, "bytes_out": 0,
                                                   "refused_total": 0}
            live = live_tenant.get(tenant, (0, 0))
            to_service, to_visitor = m.directions(figures["bytes_in"] + live[0], figures["bytes_out"] + live[1])
            g_links.add_metric([tenant], tenant_links[tenant])
            g_tunnels.add_metric([tenant], tunnels_of[tenant])
            g_streams.add_metric([tenant], streams_of[tenant])
            c_opened.add_metric([tenant], figures["streams_total"])
            c_bytes.add_metric([tenant, TO_SERVICE], to_service)
            c_bytes.add_metric([tenant, TO_VISITOR], to_visitor)
            c_refused.add_metric([tenant], figures["refused_total"])
        yield from (g_links, g_tunnels, g_streams, c_opened, c_bytes, c_refused)

    @staticmethod
    def _agent_links(states: list[dict], p: str):
        up = GaugeMetricFamily(f"{p}_link_up", "1 if the agent's link is up, 0 if it is down or redialling.",
                               labels=["link"])
        rtt = GaugeMetricFamily(f"{p}_link_rtt_seconds", "Round-trip time of the link's last keepalive.",
                                labels=["link"])
        for state in states:
            up.add_metric([str(state["link"])], 1 if state["state"] == "up" else 0)
            if state["state"] == "up" and state["rtt_ms"] is not None:
                rtt.add_metric([str(state["link"])], state["rtt_ms"] / 1000)
        yield up
        yield rtt
        yield _gauge(f"{p}_links_wanted", "Links the agent keeps (--links, or 1 with a relay without sessions).",
                     value=len(states))


def _gauge(name: str, documentation: str, *, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, *, value) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def metrics_registry(metrics: PrometheusMetrics, prefix: str) -> CollectorRegistry:
    """A registry of our collector and the process collector (CPU, memory,
    open files: the standard `process_*` names), private to this process's
    page rather than prometheus-client's global one, so that tests and the
    Python API can hold several."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(metrics, prefix))
    ProcessCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """`/metrics` in the Prometheus text format, behind the Host check
    (relay/wire/hostcheck.py): a tunnel id names an encrypted tunnel's
    unguessable hostname, so the page is no more public than the admin API."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, allowed_hosts: set[str]):
        super().__init__()
        self.registry = registry
        self.allowed_hosts = allowed_hosts

    def render_metrics(self, request) -> bytes:
        """The exposition itself (the admin API's route calls this after its own Host check)."""
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        return generate_latest(self.registry)

    def render_GET(self, request):
        if not host_allowed(request.getHeader(b"host"), self.allowed_hosts):
            request.setResponseCode(421)  # Misdirected Request (RFC 9110 15.5.20)
            return b"unexpected Host header\n"
        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"only /metrics here\n"
        return self.render_metrics(request)
