"""Relay restarts and stable names, end to end: real `twistd -n relay` and
`tunnel-client` processes, visitors with nc, curl and Python's ssl.

Six agents hold one tunnel each of every kind (unencrypted TCP, TLS the
relay terminates, passthrough, services in one tunnel, and a stable name of
each of TCP and TLS); the relay is stopped (SIGTERM) or killed (SIGKILL) and
started again on the same state folder; every agent must reconnect to the
same addresses, print nothing new, and every visitor be served byte-exact.
A second tenant comes from `relay-admin token add` (tests/e2e/test_tenants.py's
helpers) for name_taken and name_not_allowed.
"""

import functools
import hashlib
import http.server
import json
import os
import signal
import ssl
import subprocess
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization

from tests.e2e.harness import AgentProcess, EchoServer, LinkProxy, connect, listening, wait_for
from tests.e2e.test_encrypted_routing import TLSEchoServer, make_ca, make_leaf, recv_exactly, write_pem

DOMAIN = "tunnels.localhost"
PAYLOAD = os.urandom(256 * 1024)
RECONNECT_SECONDS = 45  # agents back off 1, 2, 4, 8 s (+50 % jitter) while the relay is down


@pytest.fixture
def http_files(tmp_path):
    """A threaded HTTP/1.1 file server with one 1 MiB random file, /blob."""
    folder = tmp_path / "www"
    folder.mkdir()
    (folder / "blob").write_bytes(os.urandom(1024 * 1024))

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    server.daemon_threads = True
    server.blob_sha256 = hashlib.sha256((folder / "blob").read_bytes()).hexdigest()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def tls_echo(tmp_path):
    """An origin that terminates TLS itself (for passthrough), with its own CA."""
    ca, ca_key = make_ca("origin CA")
    cert, key = make_leaf(ca, ca_key, "origin", dns_names=[f"*.{DOMAIN}"])
    folder = tmp_path / "origin"
    folder.mkdir()
    cert_path, key_path = write_pem(folder, "origin", cert, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server = TLSEchoServer(context)
    server.ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    yield server
    server.close()


# -- visitors ------------------------------------------------------------------------------


def nc_echo(port: int) -> bytes:
    """nc sends PAYLOAD, half-closes (-N) and prints what came back."""
    done = subprocess.run(
        ["nc", "-N", "127.0.0.1", str(port)], input=PAYLOAD, capture_output=True, timeout=30,
    )
    return done.stdout


def curl_sha256(relay, hostname: str) -> str:
    done = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", "30", "--cacert", relay.client_env()["TUNNEL_CA"],
         "--resolve", f"{hostname}:{relay.tls_port}:127.0.0.1", f"https://{hostname}:{relay.tls_port}/blob"],
        capture_output=True, timeout=40,
    )
    assert done.returncode == 0, done.stderr
    return hashlib.sha256(done.stdout).hexdigest()


def passthrough_echo(relay, hostname: str, ca_pem: str) -> bytes:
    context = ssl.create_default_context(cadata=ca_pem)  # the origin's certificate, end to end
    with context.wrap_socket(connect(relay.tls_port), server_hostname=hostname) as tls:
        tls.sendall(PAYLOAD)
        return recv_exactly(tls, len(PAYLOAD), timeout=30)


def json_line(agent) -> dict:
    """The next printed address (one JSON object per endpoint)."""
    line = agent.next_line()
    try:
        return json.loads(line)
    except ValueError:
        raise AssertionError(f"not JSON: {line!r}\n{agent.stderr_text()}") from None


class Fleet:
    """Six agents, one tunnel each of every kind, and how to visit each."""

    def __init__(self, relay, agents, echo, http_files, tls_echo):
        self.relay = relay
        self.tls_echo = tls_echo
        self.http_files = http_files
        start = functools.partial(agents, relay)
        self.agents = {
            "tcp": start("forward", str(echo.port), "--unencrypted", "--json"),
            "tls": start("forward", str(http_files.server_port), "--json"),
            "passthrough": start("forward", str(tls_echo.port), "--tls-passthrough", "--json"),
            "services": start("forward", "--service", f"web={http_files.server_port}",
                              "--service", f"raw={echo.port}:tcp", "--json"),
            "named-tcp": start("forward", str(echo.port), "--unencrypted", "--name", "db", "--json"),
            "named-tls": start("forward", str(http_files.server_port), "--name", "site", "--json"),
        }
        self.endpoints = {}
        for kind, agent in self.agents.items():
            lines = [json_line(agent)]
            if kind == "services":
                lines.append(json_line(agent))
            self.endpoints[kind] = lines

    def urls(self) -> set[str]:
        return {e["url"] for lines in self.endpoints.values() for e in lines}

    def visit_all(self) -> None:
        """Every endpoint serves its visitor byte-exact."""
        for kind, lines in self.endpoints.items():
            for e in lines:
                if "tcp_socket" in e:
                    assert nc_echo(e["tcp_socket"][1]) == PAYLOAD, kind
                elif kind == "passthrough":
                    assert passthrough_echo(self.relay, e["hostname"], self.tls_echo.ca_pem) == PAYLOAD
                else:
                    assert curl_sha256(self.relay, e["hostname"]) == self.http_files.blob_sha256, kind

    def all_back(self) -> bool:
        try:
            tunnels = self.relay.tunnels()
        except OSError:
            return False
        live = {e["url"] for t in tunnels if t["state"] == "live" for e in t["endpoints"]}
        return live == self.urls()

    def assert_nothing_new_printed(self) -> None:
        for kind, agent in self.agents.items():
            assert agent.stdout.lines.empty(), (kind, agent.stdout.all, agent.stderr_text()[-2000:])


def reservations_hold(relay, count: int) -> bool:
    try:
        data = json.loads((relay.state_dir / "reservations.json").read_text())
    except (OSError, ValueError):
        return False
    return len(data["tunnels"]) == count


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_restarted_relay_gives_every_agent_its_addresses_back(relay, agents, echo, http_files, tls_echo, how):
    """Stopped by SIGTERM or killed by SIGKILL and started again, the relay gives each of six agents (every tunnel kind, two stable names) the same addresses, and visitors are served there byte-exact."""
    fleet = Fleet(relay, agents, echo, http_files, tls_echo)
    fleet.visit_all()
    wait_for(lambda: reservations_hold(relay, 6), 10, "the six tunnels in reservations.json")
    if how == "SIGTERM":
        relay.stop()  # twistd ends by the signal it got (-15): its log says it stopped cleanly
    else:
        time.sleep(2.5)  # a stamp after the last write, as a long-running relay has
        relay.kill()
    assert not any(listening(e["tcp_socket"][1]) for lines in fleet.endpoints.values() for e in lines if "tcp_socket" in e)
    relay.start()
    wait_for(fleet.all_back, RECONNECT_SECONDS, "every agent back on its addresses")
    fleet.visit_all()
    fleet.assert_nothing_new_printed()
    log = relay.log()
    assert "Traceback" not in log and "6 tunnel(s) wait for their agents" in log, log[-3000:]
    for agent in fleet.agents.values():
        assert "expired" not in agent.stderr_text()


def test_a_reclaim_after_the_grace_counted_from_the_stop_expires_but_a_name_stays(tmp_path, agents, echo):
    """Down longer than --grace-seconds: the random tunnel gets a new address (printed), the old port is quarantined; the named one keeps its port."""
    from tests.e2e.harness import RelayProcess

    relay = RelayProcess(tmp_path / "relay", "--grace-seconds", "2").start()
    try:
        plain = agents(relay, "forward", str(echo.port), "--unencrypted")
        named = agents(relay, "forward", str(echo.port), "--unencrypted", "--name", "db")
        _, old_port = plain.address()
        _, named_port = named.address()
        relay.stop()
        time.sleep(3)  # the grace runs out while the relay is down
        relay.start()
        _, new_port = plain.address(timeout=RECONNECT_SECONDS)  # "moved": a new line
        assert new_port != old_port
        assert nc_echo(new_port) == PAYLOAD
        wait_for(lambda: any(t["state"] == "live" and t.get("port") == named_port for t in relay.tunnels()),
                 RECONNECT_SECONDS, "the named tunnel back on its port")
        assert nc_echo(named_port) == PAYLOAD
        assert named.stdout.lines.empty(), named.stdout.all
        assert not listening(old_port)
        assert "1 expired while the relay was down" in relay.log() or "2 expired" in relay.log()
    finally:
        relay.stop()
    assert "Traceback" not in relay.log()


def test_an_agent_away_past_the_grace_gets_its_name_back(tmp_path, agents, echo):
    """An agent killed (no goodbye) and started again after the grace, with --name, gets the same port; without a name it would not."""
    from tests.e2e.harness import RelayProcess

    relay = RelayProcess(tmp_path / "relay", "--grace-seconds", "1").start()
    proxy = LinkProxy(relay.agent_port)
    try:
        env = {"TUNNEL_RELAY": f"localhost:{proxy.port}"}
        first = AgentProcess(relay, "forward", str(echo.port), "--unencrypted", "--name", "devbox", env=env)
        _, port = first.address()
        first.proc.send_signal(signal.SIGKILL)
        first.wait(5)
        proxy.cut()  # the relay sees the link go at once, as a suspended laptop's NAT would drop it
        wait_for(lambda: relay.tunnels() == [], 10, "the tunnel to expire after its grace")
        time.sleep(1)
        again = agents(relay, "forward", str(echo.port), "--unencrypted", "--name", "devbox")
        assert again.address() == ("localhost", port)
        assert nc_echo(port) == PAYLOAD
        # A second live agent of the name is a replica (--replica-policy join, the default):
        # the same address (tests/relay/test_reservations.py checks refuse's name_in_use).
        other = agents(relay, "forward", str(echo.port), "--unencrypted", "--name", "devbox")
        assert other.address() == ("localhost", port)
        wait_for(lambda: len(relay.tunnels()[0]["replicas"]) == 2, 10, "two replicas")
    finally:
        proxy.close()
        relay.stop()
    assert "Traceback" not in relay.log()


def test_another_tenant_cannot_take_a_name_and_a_token_claims_only_its_names(tmp_path, agents, http_files):
    """With a second tenant from relay-admin: the dev tenant's name is name_taken for acme (exit 9), a name outside acme's --names is name_not_allowed (exit 9), and one of its names gets https://NAME-acme.<domain>, served by curl."""
    from tests.e2e.harness import RelayProcess
    from tests.e2e.test_tenants import add_token, log_count, wait_reloaded

    relay = RelayProcess(tmp_path / "relay", "--tokens-check-seconds=0.5").start()
    try:
        mine = agents(relay, "forward", str(http_files.server_port), "--name", "web", "--json")
        assert json_line(mine)["hostname"] == f"web-dev.{DOMAIN}"
        before = log_count(relay, "tokens file loaded")
        token = add_token(relay, "--tenant", "acme", "--names", "web,api")
        wait_reloaded(relay, before)
        acme = {"TUNNEL_TOKEN": token}
        taken = agents(relay, "forward", str(http_files.server_port), "--name", "web", env=acme)
        assert taken.wait(20) == 9 and "belongs to another tenant" in taken.stderr_text()
        refused = agents(relay, "forward", str(http_files.server_port), "--name", "shop", env=acme)
        assert refused.wait(20) == 9 and "may not claim the name" in refused.stderr_text()
        allowed = agents(relay, "forward", str(http_files.server_port), "--name", "api", "--json", env=acme)
        hostname = json_line(allowed)["hostname"]
        assert hostname == f"api-acme.{DOMAIN}"
        assert curl_sha256(relay, hostname) == http_files.blob_sha256
        assert token not in relay.log()
    finally:
        relay.stop()
    assert "Traceback" not in relay.log()
