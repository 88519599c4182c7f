"""Lifecycle, end to end: links that die loudly or silently, reconnects that
keep the public port, refused tokens, junk on the agent port, port
quarantine, signals, restarts, options, the admin API.

Real `twistd -n relay` and `tunnel-client` processes on loopback; a
`LinkProxy` between agent and relay lets a test cut or blackhole the link.
"""

import hashlib
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.harness import (
    TUNNEL_CLIENT,
    TWISTD,
    LinkProxy,
    RelayProcess,
    closed_within,
    connect,
    listening,
    recv_all,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
# Both ends notice a silent link after 3 s without a byte; pings every second.
FAST_KEEPALIVE = ["--keepalive-interval", "1", "--keepalive-timeout", "3"]


@pytest.fixture
def relays(tmp_path):
    """Start relays with extra options; all are stopped at the end, and none may have logged a traceback."""
    started = []

    def start(*extra, name="relay", **kwargs):
        relay = RelayProcess(tmp_path / name, *extra, **kwargs).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()
    for relay in started:  # whatever the test did, nothing unexpected was logged
        assert "Traceback" not in relay.log(), relay.log()


@pytest.fixture
def proxies():
    made = []

    def make(target_port):
        proxy = LinkProxy(target_port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def echo_once(port: int, payload: bytes = b"ping\n", timeout: float = 5) -> bytes:
    with connect(port, timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s, timeout)


def serves(port: int) -> bool:
    """One visitor gets its bytes echoed through the tunnel on `port`."""
    try:
        return echo_once(port, b"are you there?\n", timeout=2) == b"are you there?\n"
    except OSError:
        return False


def refused_or_closed_at_once(port: int, seconds: float = 3) -> bool:
    """A visitor is refused, or accepted and closed within `seconds` without data."""
    started = time.monotonic()
    try:
        s = connect(port, timeout=seconds)
    except OSError:
        return True
    with s:
        try:
            s.sendall(b"hello?\n")
        except OSError:
            return True
        s.settimeout(seconds)
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            data = b""
        except socket.timeout:
            return False
        return data == b"" and time.monotonic() - started < seconds


def tunnel_states(relay) -> dict[int, str]:
    return {t["port"]: t["state"] for t in relay.tunnels()}


def forward_through(proxy, agents, relay, echo, *extra):
    agent = agents(relay, "forward", str(echo.port), "--unencrypted",
                   "--relay", f"localhost:{proxy.port}", *extra)
    _, port = agent.address()
    assert serves(port)
    # Both links (--links defaults to 2) up, so a cut cuts them all.
    wait_for(lambda: "joined session" in agent.stderr_text(), 10, "the agent's second link")
    return agent, port


# -- 1. links that die, and the same port serving again ----------------------------


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_cut_link_reconnects_to_the_same_port(relays, proxies, echo, agents, how):
    """An agent whose link is closed under it reconnects by itself and the same public port serves again."""
    relay = relays()
    proxy = proxies(relay.agent_port)
    agent, port = forward_through(proxy, agents, relay, echo)
    assert proxy.cut(rst=(how == "rst")) == 2  # both of its links
    wait_for(lambda: proxy.accepted >= 3, 5, "the agent dialling again")
    wait_for(lambda: serves(port), 10, "the same port serving again")
    wait_for(lambda: "is live again" in agent.stderr_text(), 5, "the agent's reconnect line")
    assert tunnel_states(relay) == {port: "live"}
    assert agent.proc.poll() is None


def test_silent_link_noticed_by_both_ends_and_same_port_returns(relays, proxies, echo, agents):
    """A link that goes silent is declared dead by keepalive on each end, and the agent gets the same port back."""
    relay = relays(*FAST_KEEPALIVE)
    proxy = proxies(relay.agent_port)
    agent, port = forward_through(proxy, agents, relay, echo, *FAST_KEEPALIVE)
    proxy.blackhole()  # nothing passes, nothing closes; new links stall too
    # The relay cannot hear from the agent at all now: it noticed by itself.
    wait_for(lambda: tunnel_states(relay) == {port: "waiting-for-agent"}, 8, "relay keepalive")
    assert "silent for" in relay.log()
    wait_for(lambda: "silent for" in agent.stderr_text(), 8, "agent keepalive")
    # Visitors meanwhile are turned away at once, not left hanging.
    assert refused_or_closed_at_once(port, 3)
    proxy.restore_new()
    wait_for(lambda: serves(port), 12, "the same port serving after the path healed")
    assert tunnel_states(relay) == {port: "live"}
    assert agent.proc.poll() is None


# -- 2. visitors while the agent is away ------------------------------------------------


def test_visitors_closed_at_once_while_agent_away(relays, proxies, echo, agents):
    """While a tunnel waits for its agent, a visitor is closed at once and a connected one is dropped."""
    relay = relays()
    proxy = proxies(relay.agent_port)
    agent, port = forward_through(proxy, agents, relay, echo, "--max-retries", "0")
    with connect(port) as visitor:
        visitor.sendall(b"one\n")
        assert visitor.recv(100) == b"one\n"
        proxy.cut()
        assert closed_within(visitor, 3)
    assert agent.wait(10) != 0  # --max-retries 0: the agent gives up
    assert "lost the link" in agent.stderr_text()
    assert tunnel_states(relay) == {port: "waiting-for-agent"}
    for _ in range(3):
        assert refused_or_closed_at_once(port, 3)


# -- 3. bad token ------------------------------------------------------------------------


def test_bad_token_exits_with_a_clear_error(relay, echo, agents):
    """An agent with a wrong token exits non-zero at once, saying the token was refused, without retrying."""
    started = time.monotonic()
    agent = agents(relay, "forward", str(echo.port), "--unencrypted", "--token", "wrong-token")
    code = agent.wait(10)
    assert code != 0
    assert time.monotonic() - started < 10
    err = agent.stderr_text()
    assert "error:" in err and "token" in err, err
    assert "retrying" not in err and "Traceback" not in err, err
    assert relay.log().count("refused: bad token") == 1


# -- 4. junk on the agent port -------------------------------------------------------------


def tls_to_agent_port(relay) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=relay.client_env()["TUNNEL_CA"])
    raw = socket.create_connection(("127.0.0.1", relay.agent_port), timeout=5)
    return context.wrap_socket(raw, server_hostname="localhost")


def test_junk_on_agent_port_is_closed_and_tunnels_live_on(relays, echo, agents):
    """Random bytes, a stalled handshake and junk frames on the agent port are closed, and a live tunnel keeps serving."""
    relay = relays("--handshake-timeout", "2")
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    _, port = agent.address()
    assert serves(port)

    stalled = socket.create_connection(("127.0.0.1", relay.agent_port), timeout=5)
    stalled_at = time.monotonic()

    with socket.create_connection(("127.0.0.1", relay.agent_port), timeout=5) as noise:
        noise.sendall(os.urandom(4096))
        assert closed_within(noise, 3)
    assert serves(port)

    # A frame header (length, type, flags, stream) for DATA on stream 1 before HELLO.
    with tls_to_agent_port(relay) as junk_frames:
        junk_frames.sendall(bytes.fromhex("00000004" "03" "00" "00000001") + b"junk")
        assert closed_within(junk_frames, 3)
    with tls_to_agent_port(relay) as junk_bytes:
        junk_bytes.sendall(os.urandom(2048))
        assert closed_within(junk_bytes, 3)
    assert serves(port)

    with stalled:
        assert closed_within(stalled, 5)
        waited = time.monotonic() - stalled_at
    assert 1.5 <= waited <= 5, waited
    assert "dropped before its handshake" in relay.log() or "no handshake in time" in relay.log()
    assert serves(port)
    assert agent.proc.poll() is None


# -- 5. the token stays out of logs -----------------------------------------------------------


def test_token_never_logged(relays, proxies, echo, agents):
    """Neither the relay's log nor any agent's stderr ever contains the token, through tunnels, reconnects and refusals."""
    # --token=VALUE: a token may start with "-" (token_urlsafe), which argparse takes for an option.
    relay = relays()
    token = relay.client_env()["TUNNEL_TOKEN"]
    assert len(token) >= 32
    proxy = proxies(relay.agent_port)
    agent, port = forward_through(proxy, agents, relay, echo, "--verbose")
    proxy.cut()
    wait_for(lambda: serves(port), 10, "reconnect")
    wrong = token[:-4] + "abcd"
    bad = agents(relay, "forward", str(echo.port), "--unencrypted", f"--token={wrong}", "-v")
    code = bad.wait(10)
    assert code != 0
    assert agent.stop() == 0
    assert "reattached" in relay.log()
    # Read back until the line is there (bounded); say what the agent saw if never.
    try:
        wait_for(lambda: "refused: bad token" in relay.log(), 5, "the relay's refusal line")
    except (AssertionError, TimeoutError):
        raise AssertionError(f"exit {code}; agent: {bad.stderr_text()[-2000:]}\nrelay: {relay.log()[-3000:]}") from None
    for text in (relay.log(), agent.stderr_text(), bad.stderr_text()):
        assert token not in text
        assert wrong not in text
    state_files = {p.name: p.read_bytes() for p in relay.state_dir.iterdir() if p.is_file()}
    holders = [name for name, data in state_files.items() if token.encode() in data]
    assert holders == ["client.env"]


# -- 6. port quarantine ---------------------------------------------------------------------------


def test_two_port_range_quarantines_a_freed_port(relays, echo, agents):
    """A freed port rests in quarantine: the next agent gets the other port, and a third gets a clear no-free-port error."""
    relay = relays("--port-quarantine-seconds", "60", tunnel_ports=2)
    low, high = relay.port_range
    a = agents(relay, "forward", str(echo.port), "--unencrypted")
    _, p1 = a.address()
    assert low <= p1 <= high
    assert a.stop(signal.SIGTERM) == 0
    wait_for(lambda: relay.tunnels() == [], 5, "A's tunnel to go")
    assert not listening(p1)
    b = agents(relay, "forward", str(echo.port), "--unencrypted")
    _, p2 = b.address()
    assert {p1, p2} == {low, high}
    assert serves(p2)
    c = agents(relay, "forward", str(echo.port), "--unencrypted")
    assert c.wait(10) != 0
    err = c.stderr_text()
    assert "no free port" in err and "error:" in err, err
    assert c.stdout.all == []
    assert serves(p2)


# -- 7. signals end the agent's tunnels ---------------------------------------------------------------


def test_sigint_ends_tunnels_and_exits_zero(relay, echo, agents):
    """SIGINT makes the agent close its tunnels and their visitors on the relay promptly and exit 0
    (SIGTERM drains instead: tests/e2e/test_drain.py, and the test below)."""
    sig = signal.SIGINT
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    _, port = agent.address()
    visitor = connect(port)
    with visitor:
        visitor.sendall(b"hi\n")
        assert visitor.recv(100) == b"hi\n"
        signalled = time.monotonic()
        agent.proc.send_signal(sig)
        assert closed_within(visitor, 3)
    wait_for(lambda: relay.tunnels() == [], 3, "the tunnel to leave the admin list")
    assert not listening(port)
    assert agent.wait(5) == 0
    assert time.monotonic() - signalled < 3
    err = agent.stderr_text()
    assert "Traceback" not in err and "Unhandled" not in err, err


def test_sigterm_frees_the_tunnel_at_once_and_exits_once_its_visitor_left(relay, echo, agents):
    """SIGTERM: the relay frees the tunnel promptly (no new visitors) while the visitor in progress is still served; the agent exits 0 once it leaves."""
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    _, port = agent.address()
    visitor = connect(port)
    with visitor:
        visitor.sendall(b"hi\n")
        assert visitor.recv(100) == b"hi\n"
        agent.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: relay.tunnels() == [], 3, "the tunnel to leave the admin list")
        assert not listening(port)
        visitor.sendall(b"still here\n")
        assert visitor.recv(100) == b"still here\n"
        assert agent.proc.poll() is None
        visitor.shutdown(socket.SHUT_WR)
        assert recv_all(visitor, 5) == b""
    assert agent.wait(10) == 0
    err = agent.stderr_text()
    assert "every stream finished" in err and "Traceback" not in err and "Unhandled" not in err, err


# -- 8. restarts and the state folder ---------------------------------------------------------------


def test_first_start_writes_client_env(relay):
    """The first start writes a 0600 client.env with exactly the relay, token and absolute CA path, and keeps only the token's hash."""
    env_path = relay.state_dir / "client.env"
    assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
    lines = env_path.read_text().splitlines()
    assert [line.split("=", 1)[0] for line in lines] == ["TUNNEL_RELAY", "TUNNEL_TOKEN", "TUNNEL_CA"]
    env = relay.client_env()
    assert env["TUNNEL_RELAY"] == f"localhost:{relay.agent_port}"
    assert os.path.isabs(env["TUNNEL_CA"]) and Path(env["TUNNEL_CA"]).is_file()
    stored = (relay.state_dir / "agent-tokens").read_text().split()
    assert stored == [hashlib.sha256(env["TUNNEL_TOKEN"].encode()).hexdigest()]
    # The hint is logged after the ports listen, which is when the harness returns.
    wait_for(lambda: "tunnel-client forward" in relay.log(), 10, "the relay's next-step hint")
    log = relay.log()
    assert f". {env_path}" in log and "tunnel-client forward" in log
    assert env["TUNNEL_TOKEN"] not in log


def test_restart_keeps_state_and_rotate_token_revokes(relays, echo, agents):
    """A restart reuses CA, certificate and token; --rotate-token revokes the old token; a lost client.env gets a rotate hint."""
    relay = relays()
    state = relay.state_dir
    before = {name: (state / name).read_bytes() for name in ("client.env", "ca.pem", "relay.pem")}
    old_env = relay.client_env()
    relay.stop()
    relay.start()
    assert {name: (state / name).read_bytes() for name in before} == before
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    _, port = agent.address()
    assert serves(port)
    agent.stop()

    relay.stop()
    relay.extra.append("--rotate-token")
    relay.start()
    relay.extra.remove("--rotate-token")
    new_env = relay.client_env()
    assert new_env["TUNNEL_TOKEN"] != old_env["TUNNEL_TOKEN"]
    assert (state / "ca.pem").read_bytes() == before["ca.pem"]
    stale = agents(relay, "forward", str(echo.port), "--unencrypted", "--token=" + old_env["TUNNEL_TOKEN"])
    assert stale.wait(10) != 0
    assert "token" in stale.stderr_text()
    fresh = agents(relay, "forward", str(echo.port), "--unencrypted")
    assert serves(fresh.address()[1])
    fresh.stop()

    hint = "--rotate-token to issue a new token"
    assert hint not in relay.log()
    relay.stop()
    (state / "client.env").unlink()
    relay.start()
    wait_for(lambda: hint in relay.log(), 5, "the rotate hint")
    assert not (state / "client.env").exists()


# -- 9. options ----------------------------------------------------------------------------------------


def test_relay_help_lists_every_option(tmp_path):
    """`twistd -n relay --help` documents every option the issue names."""
    out = subprocess.run(
        [TWISTD, "-n", "relay", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=20
    )
    assert out.returncode == 0, out.stderr
    for option in (
        "--state-dir", "--agent-port", "--tls-port", "--admin-port", "--ports", "--public-host",
        "--interface", "--config", "--rotate-token", "--grace-seconds", "--port-quarantine-seconds",
        "--keepalive-interval", "--keepalive-timeout", "--handshake-timeout",
    ):
        assert re.search(rf"^\s+(-\w, )?{option}[=\s]", out.stdout, re.M), option
    # The option's own help, up to the next option line, states the default grace.
    grace_help = re.search(r"^\s+--grace-seconds=((?!\n\s+-).)*", out.stdout, re.M | re.S).group(0)
    assert re.search(r"\[default: 60(\.0)?\]", grace_help), grace_help


def test_encrypted_tunnel_on_a_relay_without_tls_is_refused(tmp_path, echo, agents):
    """On a relay started with --tls-port 0, `forward PORT` (encrypted by default) exits non-zero
    with a clear error, never a silent plaintext tunnel."""
    relay = RelayProcess(tmp_path / "relay")
    relay.tls_port = 0
    relay.start()
    try:
        agent = agents(relay, "forward", str(echo.port))
        assert agent.wait(15) == 6
        assert "no encrypted tunnels" in agent.stderr_text() and "error:" in agent.stderr_text()
        assert agent.stdout.all == []
    finally:
        relay.stop()


def test_config_file_sets_values_and_command_line_wins(tmp_path, echo, agents):
    """A --config TOML file beats the defaults and the command line beats the file."""
    config = tmp_path / "relay.toml"
    config.write_text('public-host = "relay.example.test"\nadmin-port = 1\ngrace-seconds = 7\n')
    relay = RelayProcess(tmp_path / "relay", f"--config={config}")
    relay.start()  # admin port from the command line, else start() times out
    try:
        assert relay.client_env()["TUNNEL_RELAY"] == f"relay.example.test:{relay.agent_port}"
        agent = agents(relay, "forward", str(echo.port), "--unencrypted",
                       "--relay", f"localhost:{relay.agent_port}")
        host, port = agent.address()
        assert host == "relay.example.test"
        assert relay.tunnels()[0]["url"] == f"tcp://relay.example.test:{port}"
        agent.proc.kill()  # no goodbye: the tunnel waits for the grace the file set
        wait_for(lambda: "waits 7s" in relay.log(), 5, "the grace period from the file")
    finally:
        relay.stop()


# -- 10. admin API ------------------------------------------------------------------------------------


def test_admin_health_and_tunnel_list(relay, echo, agents):
    """GET /healthz says ok in JSON and GET /v1/tunnels lists a live tunnel with its url."""
    health = relay.admin("/healthz")
    assert health["status"] == "ok" and health["tunnels"] == 0
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    host, port = agent.address()
    [tunnel] = relay.tunnels()
    assert tunnel["url"] == f"tcp://{host}:{port}"
    assert tunnel["state"] == "live"
    assert relay.admin("/healthz")["tunnels"] == 1


# -- 11. installed, not the repository ----------------------------------------------------------------


def test_processes_run_from_the_installed_package(relay, echo, agents):
    """Relay and agent run in a temporary folder and import the installed package, not the repository."""
    agent = agents(relay, "forward", str(echo.port), "--unencrypted")
    agent.address()
    for pid in (relay.proc.pid, agent.proc.pid):
        cwd = os.readlink(f"/proc/{pid}/cwd")
        assert Path(cwd) == relay.workdir and not Path(cwd).is_relative_to(REPO)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [sys.executable, "-c", "import relay, client; print(relay.__file__); print(client.__file__)"],
        cwd=relay.workdir, env=env, capture_output=True, text=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    for path in out.stdout.split():
        assert "site-packages" in path and not any(Path(path).is_relative_to(REPO / part) for part in ("relay", "client")), path
