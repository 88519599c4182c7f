"""The Prometheus observer and collector (relay/wire/prommetrics.py) without
sockets: a real node on in-memory transports (tests/relay/node_helpers.py)
whose observer is a PrometheusMetrics, scraped with generate_latest and read
back with prometheus-client's own parser."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from relay.mux import events as ev
from relay.node.admin import AdminAPI
from relay.node.limits import SessionLimits
from relay.wire.prommetrics import MetricsPage, PrometheusMetrics, metrics_registry
from tests.relay.node_helpers import TOKEN, Node

VISITOR = IPv4Address("TCP", "203.0.113.7", 51234)


def prom_node(grants=None, **kwargs) -> Node:
    """A node whose observer is the relay's PrometheusMetrics, wired as makeService wires it."""
    def metrics(node):
        return PrometheusMetrics(
            "relay", tenant_of=lambda t: node.tunnels.tunnel_tenant(t), live_links=lambda: node.tunnels.links,
            **kwargs,
        )
    return Node(metrics=metrics, grants=grants)


def scrape(metrics, prefix="tunnel_relay") -> dict:
    """{(sample name, frozenset of labels): value} of one scrape."""
    text = generate_latest(metrics_registry(metrics, prefix)).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def value(samples, name, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series_with(samples, label, wanted) -> list:
    return [key for key in samples if dict(key[1]).get(label) == wanted]


def visit(node, port):
    """A visitor on a public port: the visitor's protocol on a StringTransport."""
    protocol = node.listener(port).buildProtocol(VISITOR)
    transport = StringTransport(peerAddress=VISITOR)
    protocol.makeConnection(transport)
    return protocol, transport


def accept_all(agent) -> list[int]:
    """The agent accepts every OPEN it was sent (its service answered); their stream ids."""
    ids = [e.stream_id for e in agent.pump() if isinstance(e, ev.StreamOpened)]
    for stream_id in ids:
        agent.mux.accept_stream(stream_id)
    agent.pump()
    return ids


def test_a_tunnels_series_count_its_visitors_bytes_and_vanish_when_it_closes():
    """Per-tunnel and per-tenant streams and bytes follow the visitors (open ones too), and the tunnel's series go when it closes."""
    node = prom_node()
    agent = node.agent()
    reply = agent.open()
    tunnel_id, port = reply.body["tunnel"]["id"], reply.body["tunnel"]["port"]
    (v1, _), (v2, t2) = visit(node, port), visit(node, port)
    s1, s2 = accept_all(agent)
    v1.dataReceived(b"u" * 100)  # visitor -> service
    agent.pump()
    agent.mux.send(s2, b"d" * 250)  # service -> visitor, on a stream still open
    agent.pump()
    assert t2.value() == b"d" * 250
    samples = scrape(node.metrics)
    assert value(samples, "tunnel_relay_tunnel_streams_active", tunnel=tunnel_id, tenant="dev") == 2
    assert value(samples, "tunnel_relay_tunnel_streams_opened_total", tunnel=tunnel_id, tenant="dev") == 2
    assert value(samples, "tunnel_relay_tunnel_stream_bytes_total", tunnel=tunnel_id, tenant="dev",
                 direction="visitor_to_service") == 100
    assert value(samples, "tunnel_relay_tunnel_stream_bytes_total", tunnel=tunnel_id, tenant="dev",
                 direction="service_to_visitor") == 250
    assert value(samples, "tunnel_relay_tenant_links_active", tenant="dev") == 1
    assert value(samples, "tunnel_relay_tenant_tunnels_active", tenant="dev") == 1
    assert value(samples, "tunnel_relay_streams_active") == 2

    v1.connectionLost(Failure(ConnectionDone()))
    v2.connectionLost(Failure(ConnectionDone()))
    agent.pump()
    samples = scrape(node.metrics)
    assert value(samples, "tunnel_relay_streams_active") == 0
    assert value(samples, "tunnel_relay_stream_bytes_total", direction="visitor_to_service") == 100
    assert value(samples, "tunnel_relay_stream_bytes_total", direction="service_to_visitor") == 250
    assert value(samples, "tunnel_relay_tenant_stream_bytes_total", tenant="dev", direction="service_to_visitor") == 250

    assert agent.close(tunnel_id).ok
    samples = scrape(node.metrics)
    assert series_with(samples, "tunnel", tunnel_id) == []
    assert value(samples, "tunnel_relay_tunnels_active") == 0
    assert value(samples, "tunnel_relay_tunnels_opened_total", kind="tcp") == 1
    assert value(samples, "tunnel_relay_streams_opened_total") == 2  # totals outlive the tunnel
    assert value(samples, "tunnel_relay_tenant_streams_opened_total", tenant="dev") == 2


def test_open_latency_lands_in_the_bucket_of_the_time_to_accept():
    """The histogram counts each stream once, at the time from the visitor's accept to the agent's ACCEPT."""
    node = prom_node()
    agent = node.agent()
    port = agent.open().body["tunnel"]["port"]
    visit(node, port)
    node.reactor.advance(0.003)
    accept_all(agent)
    samples = scrape(node.metrics)
    assert value(samples, "tunnel_relay_stream_open_seconds_bucket", le="0.0025") == 0
    assert value(samples, "tunnel_relay_stream_open_seconds_bucket", le="0.005") == 1
    assert value(samples, "tunnel_relay_stream_open_seconds_bucket", le="+Inf") == 1
    assert value(samples, "tunnel_relay_stream_open_seconds_count") == 1
    assert abs(value(samples, "tunnel_relay_stream_open_seconds_sum") - 0.003) < 1e-9


def test_refusals_auth_and_allocation_failures_and_limit_hits_are_counted_by_reason():
    """A bad token, a refused visitor, and a session limit each move their counter by one, with the limit and tenant named."""
    node = Node(limits=SessionLimits(max_tunnels=1), metrics=lambda n: PrometheusMetrics(
        "relay", tenant_of=lambda t: n.tunnels.tunnel_tenant(t), live_links=lambda: n.tunnels.links))
    node.agent(token="wrong-" + TOKEN)
    agent = node.agent()
    reply = agent.open(allow=["192.0.2.0/24"])
    assert reply.ok
    assert node.listener(reply.body["tunnel"]["port"]).buildProtocol(VISITOR) is None  # outside --allow
    assert not agent.open().ok  # a second tunnel: over max_tunnels
    samples = scrape(node.metrics)
    assert value(samples, "tunnel_relay_auth_failures_total") == 1
    assert value(samples, "tunnel_relay_visitors_refused_total", reason="not_allowed") == 1
    assert value(samples, "tunnel_relay_tunnel_visitors_refused_total",
                 tunnel=reply.body["tunnel"]["id"], tenant="dev") == 1
    assert value(samples, "tunnel_relay_tenant_visitors_refused_total", tenant="dev") == 1
    assert value(samples, "tunnel_relay_allocation_failures_total", reason="limit_exceeded") == 1
    assert value(samples, "tunnel_relay_limit_hits_total", limit="tunnels", tenant="dev") == 1


def test_a_full_link_transport_counts_a_flow_stall():
    """pauseProducing on a link's transport is one flow stall."""
    node = prom_node()
    agent = node.agent()
    agent.link.pauseProducing()
    assert value(scrape(node.metrics), "tunnel_relay_flow_stalls_total") == 1


def test_tunnel_and_tenant_labels_are_capped():
    """Past the caps, tunnels get no series of their own (counted in the totals and in *_tunnels_unlabelled) and tenants share _other."""
    tenants = {"a": "alpha", "b": "beta", "c": "gamma"}
    metrics = PrometheusMetrics("relay", tenant_of=tenants.get, max_tunnel_series=2, max_tenant_series=2)
    for tunnel_id in ("a", "b", "c"):
        metrics.tunnel_opened(tunnel_id, "tcp")
        metrics.stream_opened(tunnel_id, 0.001)
        metrics.stream_closed(tunnel_id, 10, 20)
    samples = scrape(metrics)
    assert series_with(samples, "tunnel", "c") == []
    assert value(samples, "tunnel_relay_tunnels_unlabelled") == 1
    assert value(samples, "tunnel_relay_streams_opened_total") == 3
    assert value(samples, "tunnel_relay_tenant_streams_opened_total", tenant="_other") == 1
    assert series_with(samples, "tenant", "gamma") == []
    metrics.tunnel_closed("a", "closed")  # a slot frees: the next tunnel gets series
    metrics.tunnel_opened("d", "tls")
    samples = scrape(metrics)
    assert value(samples, "tunnel_relay_tunnel_streams_opened_total", tunnel="d", tenant="") == 0
    assert value(samples, "tunnel_relay_tunnels_unlabelled") == 1


def test_the_agent_counts_bytes_from_the_link_as_visitor_to_service():
    """The ends name a stream's directions alike: the agent's bytes from the link are the visitor's."""
    metrics = PrometheusMetrics("agent")
    metrics.tunnel_opened("t", "tcp")
    metrics.stream_opened("t", 0.01)
    metrics.stream_closed("t", 10, 20)
    samples = scrape(metrics, "tunnel_agent")
    assert value(samples, "tunnel_agent_stream_bytes_total", direction="visitor_to_service") == 10
    assert value(samples, "tunnel_agent_tunnel_stream_bytes_total", tunnel="t", direction="service_to_visitor") == 20
    assert not any(name.startswith("tunnel_agent_tenant_") for name, _ in samples)


def test_the_process_collector_reports_cpu_memory_and_open_files():
    """process_* of prometheus-client's process collector are on the page."""
    samples = scrape(PrometheusMetrics("agent"), "tunnel_agent")
    names = {name for name, _ in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"} <= names
    assert value(samples, "process_open_fds") > 0


def test_the_admin_port_serves_metrics_behind_its_host_check():
    """GET /metrics on the admin API is the exposition; another site's Host gets 421 and no data."""
    node = prom_node()
    node.agent().open()
    page = MetricsPage(metrics_registry(node.metrics, "tunnel_relay"), set())
    site = Site(AdminAPI(node.tunnels, node.metrics, 0.0, node.reactor, metrics_page=page).resource(),
                reactor=node.reactor)

    def get(host: bytes) -> tuple[int, bytes]:
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /metrics HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    status, body = get(b"127.0.0.1:17080")
    assert status == 200
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "tunnel_relay_tunnels_active" in families
    status, body = get(b"evil.example")
    assert status == 421 and b"tunnel_relay" not in body


def test_the_agents_metrics_page_serves_only_metrics_to_loopback_names():
    """The agent's MetricsPage answers /metrics, 404 elsewhere, 421 to a foreign Host."""
    page = MetricsPage(metrics_registry(PrometheusMetrics("agent"), "tunnel_agent"), {"localhost", "127.0.0.1"})

    def get(path: bytes, host: bytes):
        request = DummyRequest([])
        request.path = path
        request.requestHeaders.setRawHeaders(b"host", [host])
        body = page.render_GET(request)
        return request.responseCode or 200, body

    status, body = get(b"/metrics", b"localhost:9100")
    assert status == 200 and b"tunnel_agent_links_active" in body
    assert get(b"/", b"localhost:9100")[0] == 404
    assert get(b"/metrics", b"rebound.example:9100")[0] == 421


def test_a_visitor_over_a_stream_limit_is_a_limit_hit_of_its_tenant():
    """A visitor refused by streams_per_tunnel counts as that refusal and as a limit hit with the session's tenant."""
    node = Node(limits=SessionLimits(max_streams_per_tunnel=1), metrics=lambda n: PrometheusMetrics(
        "relay", tenant_of=lambda t: n.tunnels.tunnel_tenant(t), live_links=lambda: n.tunnels.links))
    agent = node.agent()
    port = agent.open().body["tunnel"]["port"]
    visit(node, port)
    accept_all(agent)
    assert node.listener(port).buildProtocol(VISITOR) is None
    samples = scrape(node.metrics)
    assert value(samples, "tunnel_relay_visitors_refused_total", reason="streams_per_tunnel") == 1
    assert value(samples, "tunnel_relay_limit_hits_total", limit="streams_per_tunnel", tenant="dev") == 1


def test_a_tunnel_of_another_tenant_is_labelled_with_its_own_tenant():
    """A tunnel opened with an acme token counts under tenant="acme", never under the dev tenant."""
    from relay.node.tenants import DEV_GRANT, Grant

    acme = "acme-token-for-the-labels"
    node = prom_node(grants={TOKEN: DEV_GRANT,
                             acme: Grant(tenant="acme", token_id="t-acme")})
    agent = node.agent(acme)
    reply = agent.open()
    tunnel_id, port = reply.body["tunnel"]["id"], reply.body["tunnel"]["port"]
    visit(node, port)
    accept_all(agent)
    samples = scrape(node.metrics)
    assert value(samples, "tunnel_relay_tunnel_streams_active", tunnel=tunnel_id, tenant="acme") == 1
    assert value(samples, "tunnel_relay_tenant_tunnels_active", tenant="acme") == 1
    assert series_with(samples, "tenant", "dev") == [] or value(
        samples, "tunnel_relay_tenant_tunnels_active", tenant="dev") in (None, 0)
