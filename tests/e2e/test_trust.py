"""The agent port's certificate, and what the agent says when it cannot use
the relay: real relays and agents on loopback.

"The system trust store" is a private one: SSL_CERT_FILE names a file
holding the test CA (tests/certificates.py) and SSL_CERT_DIR an empty
folder, which is how OpenSSL, and so the agent's ssl.create_default_context,
finds the default store. No test here sets TUNNEL_CA unless it says so.
"""

import os
import signal
import socket
import threading

import pytest

from tests.certificates import PrivateCA
from tests.e2e.harness import AgentProcess, RelayProcess, connect, free_port, recv_all, wait_for

# Lines of Twisted's own the agent must never print (and what a crash prints).
TWISTED_INTERNALS = (
    "Scheduling retry", "Main loop terminated", "Starting factory", "Stopping factory",
    "HostnameEndpoint", "Traceback", "Unhandled",
)


def system_store(folder, *ca_files) -> dict:
    """Agent environment whose system trust store holds exactly `ca_files`."""
    folder.mkdir(parents=True, exist_ok=True)
    bundle, empty = folder / "trust.pem", folder / "certs"
    empty.mkdir(exist_ok=True)
    bundle.write_bytes(b"".join(open(f, "rb").read() for f in ca_files))
    return {"SSL_CERT_FILE": str(bundle), "SSL_CERT_DIR": str(empty)}


def round_trip(port: int, payload: bytes = b"through the public certificate\n" * 100) -> None:
    with connect(port) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == payload


def assert_no_twisted_lines(agent: AgentProcess) -> None:
    text = agent.stderr_text()
    for marker in TWISTED_INTERNALS:
        assert marker not in text, f"{marker!r} in the agent's stderr:\n{text}"


@pytest.fixture
def public_ca(tmp_path):
    return PrivateCA(tmp_path / "public-ca")


@pytest.fixture
def relays(tmp_path):
    started = []

    def start(*extra, name="relay"):
        relay = RelayProcess(tmp_path / name, *extra).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def test_an_agent_without_tunnel_ca_trusts_the_agent_cert_through_the_system_store(
    tmp_path, public_ca, relays, echo, agents
):
    """With --agent-cert from a CA in the system store, client.env has no TUNNEL_CA and an agent
    with none gets a working tunnel; the same agent with a store lacking that CA is refused (code 4)."""
    cert, key = public_ca.issue(["localhost"], "agent-port")
    relay = relays(f"--agent-cert={cert}", f"--agent-key={key}")
    env = relay.client_env()
    assert sorted(env) == ["TUNNEL_RELAY", "TUNNEL_TOKEN"], env
    assert "agent port certificate: " + str(cert) in relay.log()

    agent = agents(relay, "forward", str(echo.port), "--unencrypted",
                   env=system_store(tmp_path / "store", public_ca.cert_path))
    _, port = agent.address()
    round_trip(port)

    other = PrivateCA(tmp_path / "other-ca", "another CA")
    refused = agents(relay, "forward", str(echo.port), "--unencrypted", "--max-retries", "3",
                     env=system_store(tmp_path / "other-store", other.cert_path))
    assert refused.wait(30) == 4
    text = refused.stderr_text()
    assert text.count("certificate is not trusted") == 1, text
    assert "no TUNNEL_CA / --ca is set, so the system trust store was used" in text
    assert_no_twisted_lines(refused)


def test_the_wildcard_pair_serves_the_agent_port_when_it_names_the_agents_host(
    tmp_path, public_ca, relays, echo, agents
):
    """--cert/--key naming the host agents dial (here `localhost` next to the wildcard) is what
    the agent port presents: agents trust it through the system store, without TUNNEL_CA."""
    cert, key = public_ca.issue(["*.tunnels.example", "tunnels.example", "localhost"], "wildcard")
    relay = relays("--domain=tunnels.example", f"--cert={cert}", f"--key={key}")
    assert "TUNNEL_CA" not in relay.client_env()
    agent = agents(relay, "forward", str(echo.port), "--unencrypted",
                   env=system_store(tmp_path / "store", public_ca.cert_path))
    _, port = agent.address()
    round_trip(port)
    assert f"agent port certificate: {cert} (--cert)" in relay.log()


def test_sighup_swaps_the_agent_cert_for_new_agents_without_dropping_live_links(
    tmp_path, relays, echo, agents
):
    """A renewed --agent-cert (another CA here) is served to new agents after SIGHUP, while a
    link made before keeps carrying its visitors, byte-exact, through and after the swap."""
    first_ca, second_ca = PrivateCA(tmp_path / "ca1", "first CA"), PrivateCA(tmp_path / "ca2", "second CA")
    cert, key = first_ca.issue(["localhost"], "agent-port")
    relay = relays(f"--agent-cert={cert}", f"--agent-key={key}")
    old = agents(relay, "forward", str(echo.port), "--unencrypted",
                 env=system_store(tmp_path / "s1", first_ca.cert_path))
    _, old_port = old.address()

    # A visitor mid-transfer across the swap.
    payload = os.urandom(4 * 1024 * 1024)
    got = {}
    visitor = connect(old_port)

    def transfer():
        visitor.sendall(payload[: len(payload) // 2])
        wait_for(lambda: swapped.is_set(), 20, "the certificate swap")
        visitor.sendall(payload[len(payload) // 2:])
        visitor.shutdown(socket.SHUT_WR)

    swapped = threading.Event()
    sender = threading.Thread(target=transfer, daemon=True)
    sender.start()
    reader = threading.Thread(target=lambda: got.setdefault("data", recv_all(visitor)), daemon=True)
    reader.start()

    new_cert, new_key = second_ca.issue(["localhost"], "renewed")
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: relay.log().count("TLS certificate loaded from " + str(cert)) >= 2, 20, "the reload")
    swapped.set()

    new = agents(relay, "forward", str(echo.port), "--unencrypted",
                 env=system_store(tmp_path / "s2", second_ca.cert_path))
    _, new_port = new.address()
    round_trip(new_port)
    stale = agents(relay, "forward", str(echo.port), "--unencrypted",
                   env=system_store(tmp_path / "s3", first_ca.cert_path))
    assert stale.wait(30) == 4  # the old certificate is no longer served

    sender.join(30)
    reader.join(30)
    assert got.get("data") == payload
    visitor.close()
    round_trip(old_port)  # the old link still serves new visitors
    assert "lost the link" not in old.stderr_text()


def test_a_certificate_for_another_name_is_refused_with_the_names_it_has(
    tmp_path, public_ca, relays, agents
):
    """An agent dialling 127.0.0.1 a relay whose certificate names only localhost exits with
    code 4 at the first attempt, saying which name it wanted and which the certificate has."""
    cert, key = public_ca.issue(["localhost"], "agent-port")
    relay = relays(f"--agent-cert={cert}", f"--agent-key={key}")
    agent = agents(relay, "forward", "9", "--unencrypted", "--max-retries", "3",
                   "--relay", f"127.0.0.1:{relay.agent_port}",
                   env=system_store(tmp_path / "store", public_ca.cert_path))
    assert agent.wait(30) == 4
    text = agent.stderr_text()
    assert text.count("does not name 127.0.0.1 (it names localhost)") == 1, text
    assert_no_twisted_lines(agent)


class SilentPort:
    """Accepts TCP connections and never says a word: no TLS ServerHello."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for s in self.held:
            s.close()


@pytest.fixture
def silent_port():
    port = SilentPort()
    yield port
    port.close()


@pytest.mark.parametrize(
    "case, retries",
    [("refused", 0), ("refused", 2), ("timed out", 1), ("no such name", 1)],
)
def test_an_unreachable_relay_is_reported_once_per_attempt_then_code_5(case, retries, silent_port, agents):
    """Each attempt prints one line with its reason and count, nothing of Twisted's; after the
    first attempt and --max-retries N retries (N + 1 attempts) the agent exits with code 5."""
    relay, reason = {
        "refused": (f"127.0.0.1:{free_port()}", "connection refused"),
        "timed out": (f"127.0.0.1:{silent_port.port}", "timed out: no TLS answer within 1 s"),
        "no such name": ("nonexistent.invalid:17000", "the name nonexistent.invalid does not resolve"),
    }[case]
    agent = agents(None, "forward", "9", "--unencrypted", "--relay", relay, "--token", "t",
                   "--max-retries", str(retries), "--connect-timeout", "1")
    assert agent.wait(60) == 5
    text = agent.stderr_text()
    lines = [line for line in text.splitlines() if "cannot reach the relay" in line]
    attempts = retries + 1
    assert len(lines) == attempts, text
    for n, line in enumerate(lines, start=1):
        assert f"(attempt {n} of {attempts}): {reason}" in line, line
    assert text.count(reason) == attempts, text
    assert f"gave up on the relay {relay} after {attempts} attempt" in text
    assert f"(--max-retries {retries})" in text
    assert_no_twisted_lines(agent)


def test_an_untrusted_certificate_is_one_attempt_and_code_4(tmp_path, relays, agents):
    """A development relay's certificate without TUNNEL_CA: one line naming the trust problem and
    the store used, exit code 4, whatever --max-retries says (no retry can fix it)."""
    relay = relays()
    env = relay.client_env()
    other = PrivateCA(tmp_path / "other-ca", "unrelated CA")
    agent = AgentProcess(None, "forward", "9", "--unencrypted", "--max-retries", "5",
                         env={"TUNNEL_RELAY": env["TUNNEL_RELAY"], "TUNNEL_TOKEN": env["TUNNEL_TOKEN"],
                              **system_store(tmp_path / "store", other.cert_path)})
    try:
        assert agent.wait(30) == 4
    finally:
        agent.stop()
    text = agent.stderr_text()
    assert text.count("certificate is not trusted") == 1, text
    assert "relay-state/ca.pem" in text
    assert_no_twisted_lines(agent)


@pytest.mark.parametrize("interface", ["::1", "127.0.0.2"])
def test_client_env_names_an_address_the_agent_port_answers_on(interface, relays, echo, agents):
    """With --interface set to one address, client.env's TUNNEL_RELAY is that address ([::1]:PORT
    for IPv6), the development certificate names it, and an agent using client.env as is works."""
    relay = relays(f"--interface={interface}")
    expected = f"[{interface}]" if ":" in interface else interface
    assert relay.client_env()["TUNNEL_RELAY"] == f"{expected}:{relay.agent_port}"
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    host, port = agent.address()
    with socket.create_connection((interface, port), timeout=10) as s:
        s.sendall(b"ping\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"ping\n"
