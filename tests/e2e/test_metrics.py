"""Prometheus /metrics and --log-format json with real processes: `twistd -n
relay` and `tunnel-client`, visitors made with nc, pages scraped with curl
and read with prometheus-client's own parser (docs/metrics.md)."""

import json
import re
import signal
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import TWISTD, AgentProcess, _LineReader, free_port, free_port_range, listening, stop_process, wait_for

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


def curl(url: str) -> str:
    out = subprocess.run(["curl", "-sS", "--max-time", "5", "-f", url], capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode()


def scrape(port: int) -> dict:
    """{(sample name, frozenset(labels)): value} of one /metrics page."""
    text = curl(f"http://127.0.0.1:{port}/metrics")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def exposed_names(port: int) -> set[str]:
    """The names a user queries: counters with _total, histograms and gauges as they are."""
    text = curl(f"http://127.0.0.1:{port}/metrics")
    return {f.name + "_total" if f.type == "counter" else f.name for f in text_string_to_metric_families(text)}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def nc_visit(port: int, payload: bytes) -> bytes:
    """One visitor: nc sends the payload, half-closes (-N), and prints what came back."""
    out = subprocess.run(["nc", "-N", "-w", "10", "127.0.0.1", str(port)], input=payload,
                         capture_output=True, timeout=20)
    return out.stdout


def tunnel_series(samples, tunnel_id):
    return [key for key in samples if dict(key[1]).get("tunnel") == tunnel_id]


def test_relay_and_agent_metrics_count_visitors_and_bytes_and_a_tunnels_series_go_with_it(relay, echo, agents):
    """Three nc visitors move streams, bytes and the open-latency histogram by exactly their counts on both
    pages; a refused visitor and a bad token are counted; the tunnel's series vanish once the agent stops."""
    metrics_port = free_port()
    agent = agents(relay, "forward", str(echo.port), "--unencrypted", "--metrics-port", str(metrics_port))
    _, port = agent.address()
    wait_for(lambda: listening(metrics_port), 10, "agent metrics port")
    for _ in range(3):
        assert nc_visit(port, PAYLOAD) == PAYLOAD
    [tunnel] = relay.tunnels()
    tunnel_id = tunnel["id"]

    def settled(p, pre):
        return value(scrape(p), f"{pre}_streams_active") == 0

    wait_for(lambda: settled(relay.admin_port, "tunnel_relay"), 10, "relay streams closed")
    wait_for(lambda: settled(metrics_port, "tunnel_agent"), 10, "agent streams closed")
    for p, pre in ((relay.admin_port, "tunnel_relay"), (metrics_port, "tunnel_agent")):
        # The agent keeps two links by default (--links): both count, once both are up.
        wait_for(lambda: value(scrape(p), f"{pre}_links_active") == 2, 10, "both links up")
        samples = scrape(p)
        assert value(samples, f"{pre}_tunnels_active") == 1
        assert value(samples, f"{pre}_streams_opened_total") == 3
        assert value(samples, f"{pre}_stream_open_seconds_count") == 3
        assert value(samples, f"{pre}_stream_open_seconds_bucket", le="+Inf") == 3
        for direction in ("visitor_to_service", "service_to_visitor"):
            assert value(samples, f"{pre}_stream_bytes_total", direction=direction) == 3 * len(PAYLOAD)
        assert value(samples, "process_open_fds") > 0
        assert value(samples, "process_resident_memory_bytes") > 0
    relay_samples = scrape(relay.admin_port)
    assert value(relay_samples, "tunnel_relay_tunnel_stream_bytes_total", tunnel=tunnel_id, tenant="dev",
                 direction="visitor_to_service") == 3 * len(PAYLOAD)
    assert value(relay_samples, "tunnel_relay_tenant_streams_opened_total", tenant="dev") == 3
    assert value(scrape(metrics_port), "tunnel_agent_tunnel_streams_opened_total", tunnel=tunnel_id) == 3

    # A visitor outside --allow, and an agent with a wrong token.
    fenced = agents(relay, "forward", str(echo.port), "--unencrypted", "--allow", "192.0.2.0/24")
    _, fenced_port = fenced.address()
    assert nc_visit(fenced_port, b"x") == b""
    bad = AgentProcess(relay, "forward", str(echo.port), "--unencrypted", env={"TUNNEL_TOKEN": "not-the-token"})
    assert bad.wait(20) == 3
    samples = scrape(relay.admin_port)
    assert value(samples, "tunnel_relay_visitors_refused_total", reason="not_allowed") == 1
    assert value(samples, "tunnel_relay_auth_failures_total") == 1

    assert agent.stop() == 0
    wait_for(lambda: not tunnel_series(scrape(relay.admin_port), tunnel_id), 10, "tunnel series gone")
    samples = scrape(relay.admin_port)
    assert value(samples, "tunnel_relay_tunnels_active") == 1  # the fenced agent's
    assert value(samples, "tunnel_relay_streams_opened_total") == 3  # totals stay


def test_the_docs_list_exactly_what_each_metrics_page_exposes(relay, echo, agents):
    """docs/metrics.md names every metric of the relay's and the agent's page, and nothing else."""
    metrics_port = free_port()
    agent = agents(relay, "forward", str(echo.port), "--unencrypted", "--metrics-port", f"127.0.0.1:{metrics_port}")
    agent.address()
    wait_for(lambda: listening(metrics_port), 10, "agent metrics port")
    docs = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `((?:tunnel_relay|tunnel_agent|process)_[a-z_]+)`", docs, re.MULTILINE))
    process = {n for n in listed if n.startswith("process_")}
    assert exposed_names(relay.admin_port) == {n for n in listed if n.startswith("tunnel_relay_")} | process
    assert exposed_names(metrics_port) == {n for n in listed if n.startswith("tunnel_agent_")} | process


def test_log_format_json_is_one_object_per_line_for_both_commands_with_no_secret(tmp_path, echo):
    """`twistd -n relay --log-format json` (stdout) and `tunnel-client --log-format json` (stderr) write only
    JSON objects, one per line, with time, level, namespace and message; the token is in no log and no page."""
    workdir = tmp_path / "relay"
    workdir.mkdir()
    agent_port, admin_port, tls_port = free_port(), free_port(), free_port()
    low, high = free_port_range(10)
    relay = subprocess.Popen(
        [TWISTD, "-n", "relay", "--log-format", "json", f"--agent-port={agent_port}", f"--admin-port={admin_port}",
         f"--tls-port={tls_port}", f"--ports={low}-{high}"],
        cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    relay_out = _LineReader(relay.stdout)  # read as it comes: a full pipe would stall the relay
    agent = None
    try:
        wait_for(lambda: relay.poll() is not None or listening(agent_port), 20, "relay agent port")
        wait_for(lambda: listening(admin_port), 20, "relay admin port")
        env = dict(line.split("=", 1) for line in (workdir / "relay-state" / "client.env").read_text().splitlines())
        token = env["TUNNEL_TOKEN"]
        env["TUNNEL_RELAY"] = f"localhost:{agent_port}"
        metrics_port = free_port()
        agent = AgentProcess(None, "forward", str(echo.port), "--unencrypted", "--log-format", "json",
                             "--metrics-port", str(metrics_port), env=env, cwd=workdir)
        line = agent.next_line()
        port = int(line.rpartition(":")[2])
        assert nc_visit(port, b"ping") == b"ping"
        pages = [curl(f"http://127.0.0.1:{admin_port}{path}") for path in ("/healthz", "/v1/tunnels", "/metrics")]
        wait_for(lambda: listening(metrics_port), 10, "agent metrics port")
        pages.append(curl(f"http://127.0.0.1:{metrics_port}/metrics"))
        assert agent.stop(signal.SIGTERM) == 0
    finally:
        if agent is not None:
            agent.stop()
        stop_process(relay, 10)
    relay_out.drain()
    relay_lines = relay_out.all
    agent_lines = agent.stderr.all
    assert relay_lines and agent_lines
    for lines, who in ((relay_lines, "relay"), (agent_lines, "agent")):
        for line in lines:
            record = json.loads(line)  # every line, not just most
            assert isinstance(record, dict), (who, line)
            assert {"time", "level", "namespace", "message"} <= set(record), (who, line)
            assert token not in line, who
    assert any("relay node up" in json.loads(line)["message"] for line in relay_lines)
    assert any("forwarding tcp://" in json.loads(line)["message"] for line in agent_lines)
    for page in pages:
        assert token not in page


def test_a_metrics_port_in_use_is_a_clear_error_and_exit_2(relay):
    """The agent says it cannot listen on --metrics-port, as one JSON line under --log-format json, and exits 2."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = AgentProcess(relay, "forward", "22", "--unencrypted", "--metrics-port", str(port),
                             "--log-format", "json")
        assert agent.wait(20) == 2
    [line] = agent.stderr.all
    record = json.loads(line)
    assert record["level"] == "critical" and f"--metrics-port 127.0.0.1:{port}" in record["message"]
    assert "Traceback" not in line
