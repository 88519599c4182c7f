"""Tenants end to end: `relay-admin` against a running `twistd relay`, real
`tunnel-client` agents with its tokens, real visitors. Each limit hit is a
clear error naming it; a bandwidth cap slows only its tunnel; a revoke closes
only that tenant's link; SIGHUP applies a changed file and keeps the old one
when the new one is bad; no token ever reaches a log. Every wait is bounded."""

import hashlib
import os
import signal
import subprocess
import threading
import time

import pytest

from tests.e2e.harness import BIN, RelayProcess, closed_within, connect, recv_all, wait_for

RELAY_ADMIN = str(BIN / "relay-admin")


def admin(relay: RelayProcess, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [RELAY_ADMIN, "--state-dir", str(relay.state_dir), *argv],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert done.returncode == 0, done.stderr
    return done


def add_token(relay: RelayProcess, *argv: str) -> str:
    return admin(relay, "token", "add", *argv).stdout.strip()


def token_id(relay: RelayProcess, tenant: str) -> str:
    import json

    [record] = [r for r in json.loads(admin(relay, "token", "list", "--json").stdout) if r["tenant"] == tenant]
    return record["id"]


def log_count(relay: RelayProcess, text: str) -> int:
    return relay.log().count(text)


def wait_reloaded(relay: RelayProcess, before: int, timeout: float = 15) -> None:
    wait_for(lambda: log_count(relay, "tokens file loaded") > before, timeout, "the relay to reload its tokens")


def echo_through(port: int, data: bytes, timeout: float = 60) -> tuple[bytes, float]:
    """Send `data` through the tunnel to the echo service while reading the echo; (echoed, seconds)."""
    sock = connect(port, timeout=timeout)
    started = time.monotonic()

    def send():
        view = memoryview(data)
        for offset in range(0, len(data), 65536):
            sock.sendall(view[offset:offset + 65536])
        sock.shutdown(1)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    echoed = recv_all(sock, timeout)
    seconds = time.monotonic() - started
    sender.join(timeout)
    sock.close()
    return echoed, seconds


def assert_no_token_logged(tokens, relay: RelayProcess, agents) -> None:
    texts = [relay.log()] + [a.stderr_text() for a in agents] + ["\n".join(a.stdout.all) for a in agents]
    for token in tokens:
        for text in texts:
            assert token not in text


@pytest.fixture
def tenant_relay(tmp_path):
    r = RelayProcess(tmp_path / "relay", "--tokens-check-seconds=0.5").start()
    yield r
    r.stop()


def test_an_agent_opens_tunnels_up_to_its_tokens_limit_and_is_told_which_limit(tenant_relay, agents, echo):
    """relay-admin add --max-tunnels 2: an agent asking for three gets two and a warning naming
    the limit, and keeps serving; a second agent with nothing left exits 6 saying the same."""
    relay = tenant_relay
    before = log_count(relay, "tokens file loaded")
    token = add_token(relay, "--tenant", "acme", "--max-tunnels", "2", "--label", "e2e")
    wait_reloaded(relay, before)
    env = {"TUNNEL_TOKEN": token}
    first = agents(relay, "forward", str(echo.port), str(echo.port), str(echo.port), "--unencrypted", env=env)
    ports = [first.address()[1], first.address()[1]]
    wait_for(lambda: "tunnels of this token: at most 2" in first.stderr_text(), 30, "the limit named by the agent")
    assert first.proc.poll() is None  # it keeps its two tunnels
    for port in ports:
        assert echo_through(port, b"hello tenant")[0] == b"hello tenant"
    second = agents(relay, "forward", str(echo.port), "--unencrypted", env=env)
    assert second.wait(30) == 6
    assert "tunnels of this token: at most 2" in second.stderr_text()
    assert_no_token_logged([token], relay, [first, second])


def test_a_bandwidth_cap_slows_its_tunnel_only(tenant_relay, agents, echo):
    """A 1 MB/s cap: 2 MB echoed through the capped tunnel take at least 1 s (0.5 x size/cap
    each way), while the uncapped tunnel beside it moves 16 MB at more than 3x the cap, both byte-exact."""
    relay = tenant_relay
    before = log_count(relay, "tokens file loaded")
    token = add_token(relay, "--tenant", "acme", "--bandwidth", "1MB")
    wait_reloaded(relay, before)
    capped = agents(relay, "forward", str(echo.port), "--unencrypted", env={"TUNNEL_TOKEN": token})
    free = agents(relay, "forward", str(echo.port), "--unencrypted")  # the dev token of client.env
    capped_port, free_port = capped.address()[1], free.address()[1]
    small, large = os.urandom(2_000_000), os.urandom(16_000_000)
    results = {}

    def run(name, port, data):
        results[name] = echo_through(port, data)

    threads = [threading.Thread(target=run, args=a, daemon=True)
               for a in (("capped", capped_port, small), ("free", free_port, large))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    (capped_echo, capped_seconds), (free_echo, free_seconds) = results["capped"], results["free"]
    assert hashlib.sha256(capped_echo).digest() == hashlib.sha256(small).digest()
    assert hashlib.sha256(free_echo).digest() == hashlib.sha256(large).digest()
    print(f"capped 2 MB at 1 MB/s: {capped_seconds:.2f} s; uncapped 16 MB: {free_seconds:.2f} s "
          f"({len(large) / free_seconds / 1e6:.1f} MB/s)")
    assert capped_seconds >= 0.5 * len(small) / 1_000_000
    assert capped_seconds < 30  # slowed, not stuck
    assert len(large) / free_seconds > 3 * 1_000_000
    assert_no_token_logged([token], relay, [capped, free])


def test_revoke_closes_that_tenants_link_within_seconds_and_nobody_elses(tenant_relay, agents, echo):
    """relay-admin token revoke: the acme agent exits 3 saying the token was revoked and its visitor
    is closed within 5 s, while a dev-tenant visitor transferring all along stays byte-exact."""
    relay = tenant_relay
    before = log_count(relay, "tokens file loaded")
    token = add_token(relay, "--tenant", "acme")
    wait_reloaded(relay, before)
    acme = agents(relay, "forward", str(echo.port), "--unencrypted", env={"TUNNEL_TOKEN": token})
    other = agents(relay, "forward", str(echo.port), "--unencrypted")
    acme_port, other_port = acme.address()[1], other.address()[1]
    acme_visitor = connect(acme_port)
    acme_visitor.sendall(b"ping")
    acme_visitor.settimeout(10)
    assert acme_visitor.recv(4) == b"ping"

    data = os.urandom(6_000_000)
    result = {}
    sock = connect(other_port, timeout=60)

    def slow_send():  # about 3 s of transfer, spanning the revoke
        for offset in range(0, len(data), 65536):
            sock.sendall(data[offset:offset + 65536])
            time.sleep(0.03)
        sock.shutdown(1)

    sender = threading.Thread(target=slow_send, daemon=True)
    reader = threading.Thread(target=lambda: result.update(echoed=recv_all(sock, 60)), daemon=True)
    sender.start()
    reader.start()
    time.sleep(0.5)
    revoked_at = time.monotonic()
    admin(relay, "token", "revoke", token_id(relay, "acme"))
    assert acme.wait(10) == 3
    assert time.monotonic() - revoked_at < 5
    assert "token revoked" in acme.stderr_text()
    assert closed_within(acme_visitor, 5)
    sender.join(60)
    reader.join(60)
    assert sender.is_alive() is False and hashlib.sha256(result["echoed"]).digest() == hashlib.sha256(data).digest()
    assert other.proc.poll() is None
    assert_no_token_logged([token], relay, [acme, other])


def test_sighup_applies_a_changed_file_and_keeps_the_old_one_when_the_new_is_corrupt(tmp_path, agents, echo):
    """With the periodic check an hour away, only SIGHUP reloads: a raised max_tunnels lets a
    refused agent in; a corrupt file is one log line, and the last good limits stay in force."""
    relay = RelayProcess(tmp_path / "relay", "--tokens-check-seconds=3600").start()
    try:
        token = add_token(relay, "--tenant", "acme", "--max-tunnels", "1")
        os.kill(relay.proc.pid, signal.SIGHUP)
        wait_reloaded(relay, 0)
        env = {"TUNNEL_TOKEN": token}
        first = agents(relay, "forward", str(echo.port), "--unencrypted", env=env)
        first_port = first.address()[1]
        admin(relay, "token", "change", token_id(relay, "acme"), "--max-tunnels", "2")
        refused = agents(relay, "forward", str(echo.port), "--unencrypted", env=env)
        assert refused.wait(30) == 6 and "at most 1" in refused.stderr_text()  # not reloaded yet
        os.kill(relay.proc.pid, signal.SIGHUP)
        wait_reloaded(relay, 1)
        second = agents(relay, "forward", str(echo.port), "--unencrypted", env=env)
        second.address()
        (relay.state_dir / "tokens.json").write_text('{"version": 1, "tokens": [')
        os.kill(relay.proc.pid, signal.SIGHUP)
        wait_for(lambda: log_count(relay, "tokens file refused") >= 1, 15, "the refusal line")
        time.sleep(1)
        assert log_count(relay, "tokens file refused") == 1
        assert echo_through(first_port, b"still here")[0] == b"still here"
        third = agents(relay, "forward", str(echo.port), "--unencrypted", env=env)
        assert third.wait(30) == 6 and "at most 2" in third.stderr_text()  # the last good file's limit
        assert first.proc.poll() is None and second.proc.poll() is None
        assert_no_token_logged([token], relay, [first, refused, second, third])
    finally:
        relay.stop()


def test_a_relay_with_an_unusable_tokens_file_or_key_says_so_in_one_line(tmp_path):
    """A corrupt tokens file, or a key that does not match its certificate, stops the start with
    exit 1 and one clear line, not twistd's traceback."""
    import subprocess

    from tests.e2e.harness import TWISTD

    def start(state, *extra):
        return subprocess.run(
            [TWISTD, "-n", "--pidfile=", "relay", "--state-dir", str(state), "--agent-port", "0",
             "--tls-port", "0", "--admin-port", "0", "--ports", "33990-33999", *extra],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )

    state = tmp_path / "corrupt"
    state.mkdir(mode=0o700)
    (state / "tokens.json").write_text('{"version": 1, "tokens": [')
    done = start(state)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "cannot start" in out and "tokens.json" in out and "Traceback" not in out, out

    # A key from another pair: issue two with the dev CA of a fresh folder.
    from relay.node import state as relay_state

    fresh = relay_state.load_or_create(tmp_path / "pki", agent_address="localhost:1", hostnames=["localhost"])
    relay_state.issue_certificate(fresh, ["localhost"], tmp_path / "a.pem", tmp_path / "a-key.pem")
    relay_state.issue_certificate(fresh, ["localhost"], tmp_path / "b.pem", tmp_path / "b-key.pem")
    done = start(tmp_path / "mismatch", "--agent-cert", str(tmp_path / "a.pem"), "--agent-key", str(tmp_path / "b-key.pem"))
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "cannot start" in out and "Traceback" not in out, out
