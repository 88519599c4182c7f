"""The container image without a Docker engine (none runs here): its
entrypoint and health check run as plain processes against a real relay and
agent, with the environment a container gets; the Dockerfile and the compose
file are read and checked for what they promise."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e.harness import (
    EchoServer, _LineReader, connect, free_port, free_port_range, listening, recv_all, stop_process, wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    """A container's environment: our commands first on PATH, nothing of the test's own."""
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(*args, env, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class Started:
    def __init__(self, *args, env, cwd):
        self.proc = subprocess.Popen(["sh", str(ENTRYPOINT), *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout = _LineReader(self.proc.stdout)
        self.stderr = _LineReader(self.proc.stderr)

    def text(self) -> str:
        return "\n".join(self.stdout.all + self.stderr.all)

    def stop(self, sig=signal.SIGTERM) -> int:
        code = stop_process(self.proc, 10, sig)
        self.stdout.drain()
        self.stderr.drain()
        return code


@pytest.fixture
def started():
    procs = []

    def start(*args, env, cwd):
        p = Started(*args, env=env, cwd=cwd)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def test_the_entrypoint_runs_a_relay_and_an_agent_from_the_environment(tmp_path, started):
    """`relay` takes its options from RELAY_* (the command line winning), `healthcheck`
    answers from its /healthz, relay-admin passes through, and `tunnel-client` reads its
    token from TUNNEL_TOKEN_FILE and serves TUNNEL_METRICS_PORT: a visitor's bytes pass."""
    state = tmp_path / "state"
    agent_port, admin_port, tls_port = free_port(), free_port(), free_port()
    env_low, env_high = free_port_range(5)
    low, high = free_port_range(5)
    relay_env = _env(RELAY_STATE_DIR=state, RELAY_AGENT_PORT=agent_port, RELAY_ADMIN_PORT=admin_port,
                     RELAY_TLS_PORT=tls_port, RELAY_PORTS=f"{env_low}-{env_high}", RELAY_INTERFACE="127.0.0.1",
                     RELAY_LOG_FORMAT="json")
    assert _run("healthcheck", env=relay_env).returncode == 1  # nothing answers yet
    relay = started("relay", f"--ports={low}-{high}", env=relay_env, cwd=tmp_path)
    wait_for(lambda: relay.proc.poll() is not None or listening(admin_port), 30, "the relay's admin port")
    assert relay.proc.poll() is None, relay.text()
    # exec'd: the entrypoint's pid is twistd's, so docker stop's SIGTERM reaches the relay itself.
    assert b"twistd" in Path(f"/proc/{relay.proc.pid}/cmdline").read_bytes()
    check = _run("healthcheck", env=relay_env)
    assert (check.returncode, check.stdout.strip()) == (0, "healthcheck: relay healthy"), check.stderr
    assert (state / "ca.pem").is_file()  # RELAY_STATE_DIR was the state folder

    added = _run("relay-admin", "--state-dir", str(state), "token", "add", "--tenant", "container", env=relay_env)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    # The relay picks the new token up within --tokens-check-seconds (2): an agent before that is refused.
    wait_for(lambda: any("2 token(s)" in line for line in relay.stdout.all), 15, "the relay to load the new token")
    token_file = tmp_path / "secrets" / "tunnel_token"
    token_file.parent.mkdir()
    token_file.write_text(token + "\n")
    echo = EchoServer()
    metrics_port = free_port()
    agent_env = _env(TUNNEL_RELAY=f"localhost:{agent_port}", TUNNEL_TOKEN_FILE=token_file,
                     TUNNEL_CA=state / "ca.pem", TUNNEL_METRICS_PORT=f"127.0.0.1:{metrics_port}",
                     TUNNEL_HEALTHCHECK="agent")
    try:
        agent = started("tunnel-client", "forward", str(echo.port), "--unencrypted", env=agent_env, cwd=tmp_path)
        line = agent.stdout.next_line(30)
        match = re.fullmatch(r"tcp://localhost:(\d+)", line)
        assert match, (line, agent.text())
        port = int(match.group(1))
        assert low <= port <= high  # --ports on the command line beat RELAY_PORTS
        with connect(port) as s:
            s.sendall(b"through the container's entrypoint")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s, 10) == b"through the container's entrypoint"
        wait_for(lambda: _run("healthcheck", env=agent_env).returncode == 0, 15, "a healthy agent")
        assert token not in agent.text()
        # The relay's log is JSON lines (RELAY_LOG_FORMAT), and holds no token either.
        relay.stop()  # (its exit code on SIGTERM is the drain work's concern, not checked here)
        relay_lines = [json.loads(line) for line in relay.stdout.all if line.strip()]
        assert relay_lines and all("log_level" in item or "level" in item for item in relay_lines)
        assert token not in relay.text()
        unhealthy = wait_for(lambda: (r := _run("healthcheck", env=agent_env)).returncode == 1 and r, 45,
                             "the agent unhealthy without its relay")
        assert "no link to the relay" in unhealthy.stderr
        assert agent.stop() == 0
    finally:
        echo.close()


def test_the_agent_refuses_an_unreadable_token_file_or_two_tokens(tmp_path):
    """A TUNNEL_TOKEN_FILE that cannot be read, or set together with TUNNEL_TOKEN,
    is one clear error line and exit 2, never a traceback or a silent empty token."""
    base = _env(TUNNEL_RELAY="localhost:1")
    missing = _run("tunnel-client", "forward", "80", "--unencrypted",
                   env=dict(base, TUNNEL_TOKEN_FILE=str(tmp_path / "nope")))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"tunnel-client: error: cannot read TUNNEL_TOKEN_FILE {tmp_path / 'nope'}: No such file or directory"
    )
    (tmp_path / "t").write_text("abc\n")
    both = _run("tunnel-client", "forward", "80", "--unencrypted",
                env=dict(base, TUNNEL_TOKEN_FILE=str(tmp_path / "t"), TUNNEL_TOKEN="abc"))
    assert both.returncode == 2 and "both TUNNEL_TOKEN and TUNNEL_TOKEN_FILE are set" in both.stderr
    assert "Traceback" not in missing.stderr + both.stderr
    bare = _run("tunnel-client", env=base)
    assert bare.returncode == 2 and "needs a command" in bare.stderr


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in dockerfile.splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_dockerfile_runs_as_a_non_root_user_with_a_healthcheck():
    """The final stage switches to a non-root USER before its ENTRYPOINT, checks health
    through the entrypoint, and copies only files that exist; the build context keeps secrets out."""
    steps = _instructions((DOCKER / "Dockerfile").read_text())
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM"):]
    words = [word for word, _ in final]
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")  # nothing runs as root after
    (healthcheck,) = [args for word, args in final if word == "HEALTHCHECK"]
    assert re.search(r'CMD \["/opt/tunnel-relay/docker/entrypoint.sh", "healthcheck"\]', healthcheck)
    (entrypoint,) = [args for word, args in final if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["/opt/tunnel-relay/docker/entrypoint.sh"]
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source == "." or (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for secret in ("**/relay-state", "deploy/docker/secrets", ".venv"):
        assert secret in ignored


def test_the_compose_file_has_a_relay_an_agent_and_a_service_restarted_and_health_checked():
    """docker-compose.yml: every service restarts unless stopped; relay and agent are
    health-checked; the agent's token is a secrets file (TUNNEL_TOKEN_FILE), never a variable."""
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"relay", "agent", "web"}
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    for name in ("relay", "agent"):
        # docker stop waits 10 s by default, less than the 30 s a SIGTERM drains for.
        assert int(services[name]["stop_grace_period"].rstrip("s")) > 30, name
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "/opt/tunnel-relay/docker/entrypoint.sh", "healthcheck"], name
    agent = services["agent"]
    assert agent["command"][:2] == ["tunnel-client", "forward"]
    assert "TUNNEL_TOKEN" not in agent["environment"]
    assert agent["environment"]["TUNNEL_TOKEN_FILE"] == "/run/secrets/tunnel_token"
    assert agent["environment"]["TUNNEL_HEALTHCHECK"] == "agent" and agent["environment"]["TUNNEL_METRICS_PORT"]
    assert {"tunnel_token", "relay_ca"} <= set(agent["secrets"])
    assert agent["depends_on"]["relay"]["condition"] == "service_healthy"
    assert compose["secrets"]["tunnel_token"]["file"].startswith("./secrets/")
    relay = services["relay"]
    assert "17000:17000" in relay["ports"]
    assert any(v.endswith(":/var/lib/tunnel-relay") for v in relay["volumes"])
    # The agent reaches the relay by its service name, which the relay's certificate must carry.
    assert agent["environment"]["TUNNEL_RELAY"].split(":")[0] == relay["environment"]["RELAY_PUBLIC_HOST"]
