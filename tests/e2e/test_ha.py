"""High availability with real processes (issue 14): an agent's two links,
one frozen or reset under it; every link cut; replicas of a stable name, one
SIGKILLed mid-transfer; /healthz and /ready through each state."""

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

from tests.chaos.faults import FaultProxy
from tests.e2e.harness import AgentProcess, EchoServer, RelayProcess, free_port, listening, wait_for

FAST = ["--keepalive-interval", "1", "--keepalive-timeout", "3"]


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def status(port: int) -> str:
    return get(port, "/healthz")[1]["status"]


def echo_exact(port: int, size: int = 64 * 1024) -> bool:
    """One visitor: `size` random bytes out, the same bytes back, then EOF."""
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return bytes(got) == payload


def start_agent(relay, proxy_port, echo_port, metrics_port, *extra):
    host = relay.client_env()["TUNNEL_RELAY"].rpartition(":")[0]
    agent = AgentProcess(relay, "forward", str(echo_port), "--unencrypted", "--links", "2",
                         "--relay", f"{host}:{proxy_port}", "--metrics-port", str(metrics_port), *FAST, *extra)
    return agent


def test_two_links_one_frozen_then_one_reset_and_then_all_cut(tmp_path):
    """Visitors keep being served through the other link; Degraded then Healthy; every cut restores the same address."""
    relay = RelayProcess(tmp_path / "relay", *FAST).start()
    echo = EchoServer()
    proxy = FaultProxy(relay.agent_port)
    metrics = free_port()
    agent = start_agent(relay, proxy.port, echo.port, metrics)
    try:
        _, port = agent.address()
        wait_for(lambda: listening(metrics), 10, "the agent's metrics port")
        wait_for(lambda: status(metrics) == "Healthy", 15, "both links up")
        code, body = get(metrics, "/healthz")
        assert code == 200 and [link["state"] for link in body["links"]] == ["up", "up"]
        assert get(metrics, "/ready")[0] == 200
        [tunnel] = relay.tunnels()
        assert tunnel["status"] == "Healthy" and len(tunnel["replicas"][0]["links"]) == 2
        # Freeze one link: no FIN, no RST. Keepalive finds it on both ends.
        proxy.live()[0].freeze()
        wait_for(lambda: status(metrics) == "Degraded", 10, "the frozen link noticed")
        assert get(metrics, "/healthz")[0] == 200  # Degraded still serves
        assert all(echo_exact(port) for _ in range(10))
        wait_for(lambda: status(metrics) == "Healthy", 15, "the frozen link redialled")
        # Reset one link in the middle of 16 transfers: the streams on the other stay exact.
        results = []
        threads = [threading.Thread(target=lambda: results.append(_safe_echo(port, 1 << 20))) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        proxy.live()[0].close("reset")
        for t in threads:
            t.join(30)
        assert len(results) == 16 and all(r in (True, "reset") for r in results), results
        assert results.count(True) >= 1  # those on the other link came through byte-exact
        assert all(echo_exact(port) for _ in range(10))  # new visitors: no gap
        wait_for(lambda: status(metrics) == "Healthy", 15, "the reset link redialled")
        # Every link cut: Down; once the path heals, the same address is back.
        proxy.set("freeze")
        wait_for(lambda: status(metrics) == "Down", 10, "both links noticed dead")
        code, _ = get(metrics, "/healthz")
        assert code == 503 and get(metrics, "/ready")[0] == 503
        wait_for(lambda: relay.tunnels()[0]["status"] == "Down", 10, "the relay's side")
        proxy.set("pass")
        for pair in proxy.live():
            pair.close("reset")
        wait_for(lambda: status(metrics) == "Healthy", 20, "both links back")
        wait_for(lambda: get(metrics, "/ready")[0] == 200, 10, "ready again")
        assert relay.tunnels()[0]["port"] == port and echo_exact(port)
    finally:
        agent.stop()
        proxy.close()
        echo.close()
        relay.stop()
    assert "Traceback" not in relay.log()


def _safe_echo(port: int, size: int):
    """True if byte-exact; "reset" if the visitor saw a reset (its stream was on the cut link)."""
    try:
        return True if echo_exact(port, size) else False
    except (ConnectionResetError, BrokenPipeError):
        return "reset"


def test_healthz_says_inactive_before_the_relay_is_up(tmp_path):
    """An agent whose relay is not up yet: Inactive, 503 on /healthz and /ready; Healthy once the relay starts."""
    relay = RelayProcess(tmp_path / "relay").start()
    relay.stop()  # its client.env stays; the port is free now
    echo = EchoServer()
    metrics = free_port()
    agent = AgentProcess(relay, "forward", str(echo.port), "--unencrypted", "--metrics-port", str(metrics))
    try:
        wait_for(lambda: listening(metrics), 10, "the agent's metrics port")
        code, body = get(metrics, "/healthz")
        assert code == 503 and body["status"] == "Inactive"
        assert get(metrics, "/ready")[0] == 503
        relay.start()
        wait_for(lambda: status(metrics) == "Healthy", 40, "the agent connected")
        assert get(metrics, "/ready")[0] == 200
    finally:
        agent.stop()
        echo.close()
        relay.stop()


def test_two_replicas_one_killed_mid_transfer_the_survivor_serves_everyone(tmp_path):
    """Two agents of one --name are replicas; SIGKILL one during 64 transfers: the survivor's streams are exact and it serves every new visitor."""
    relay = RelayProcess(tmp_path / "relay").start()
    echo_a, echo_b = EchoServer(), EchoServer()
    a = AgentProcess(relay, "forward", str(echo_a.port), "--unencrypted", "--name", "db")
    b = None
    try:
        _, port = a.address()
        b = AgentProcess(relay, "forward", str(echo_b.port), "--unencrypted", "--name", "db")
        _, port_b = b.address()
        assert port_b == port
        wait_for(lambda: len(relay.tunnels()[0]["replicas"]) == 2, 10, "two replicas")
        results = []
        threads = [threading.Thread(target=lambda: results.append(_safe_echo(port, 1 << 20))) for _ in range(64)]
        for t in threads:
            t.start()
        wait_for(lambda: echo_b.accepted > 0 and echo_a.accepted > 0, 10, "both replicas serving")
        before_a = echo_a.accepted
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(5)
        killed = time.monotonic()
        for t in threads:
            t.join(60)
        assert len(results) == 64 and all(r in (True, "reset") for r in results), results
        assert results.count(True) >= before_a  # every stream of the survivor stayed byte-exact
        # New visitors after the kill: all served, by the survivor, within a second of it (generous).
        served_by_b = echo_b.accepted
        deadline = killed + 1.0
        while time.monotonic() < deadline and len(relay.tunnels()[0]["replicas"]) != 1:
            time.sleep(0.02)
        assert len(relay.tunnels()[0]["replicas"]) == 1
        assert all(echo_exact(port, 4096) for _ in range(20))
        assert echo_b.accepted == served_by_b
    finally:
        a.stop()
        if b is not None and b.proc.poll() is None:
            b.stop()
        echo_a.close()
        echo_b.close()
        relay.stop()
    assert "Traceback" not in relay.log()
