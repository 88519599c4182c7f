"""The systemd units (deploy/systemd/): `systemd-analyze verify` with their
ExecStart pointing at this venv (skipped where systemd-analyze is missing:
apt-get install systemd), their hardening, and their ExecStart command lines
run as plain processes (systemd itself is not PID 1 here, so the sandbox
is not exercised: docs/deploy.md says so)."""

import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import (
    EchoServer, _LineReader, connect, free_port, free_port_range, listening, recv_all,
    stop_process, wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
BIN = Path(sys.executable).parent
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="no systemd-analyze (apt-get install systemd)")


def _settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _local_copies(tmp_path: Path) -> Path:
    """The units with /opt/tunnel-relay/bin/ replaced by this venv's bin (verify checks
    that ExecStart is executable); the template also as an instance, for verify."""
    folder = tmp_path / "units"
    folder.mkdir()
    for unit in ("tunnel-relay.service", "tunnel-client@.service"):
        text = (UNITS / unit).read_text().replace("/opt/tunnel-relay/bin/", f"{BIN}/")
        (folder / unit).write_text(text)
    shutil.copy(folder / "tunnel-client@.service", folder / "tunnel-client@demo.service")
    return folder


@needs_analyze
def test_the_units_verify_without_a_warning(tmp_path):
    """systemd-analyze verify accepts the relay's unit and an agent instance, and says nothing:
    a misspelt or unknown setting is only a warning, so silence is the bar."""
    folder = _local_copies(tmp_path)
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(folder / "tunnel-relay.service"), str(folder / "tunnel-client@demo.service")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and result.stderr.strip() == "" and result.stdout.strip() == "", result


@needs_analyze
@pytest.mark.parametrize("unit", ["tunnel-relay.service", "tunnel-client@demo.service"])
def test_the_units_are_rated_well_sandboxed(tmp_path, unit):
    """systemd-analyze security rates each unit's exposure below 2.0 of 10 ("OK")."""
    folder = _local_copies(tmp_path)
    result = subprocess.run([ANALYZE, "security", "--offline=yes", str(folder / unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-500:]
    assert float(match.group(1)) < 2.0, result.stdout


def test_the_relay_unit_is_hardened_and_may_bind_443():
    """A dynamic user, a read-only system but for its state folder, and CAP_NET_BIND_SERVICE alone."""
    s = _settings("tunnel-relay.service")
    assert s["DynamicUser"] == ["yes"] and s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    assert s["StateDirectory"] == ["tunnel-relay"] and "--state-dir /var/lib/tunnel-relay" in s["ExecStart"][0]
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"] == s["CapabilityBoundingSet"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # certificates and tokens reload on SIGHUP


def test_the_agent_unit_is_an_instance_per_config_file_with_its_token_as_a_credential():
    """tunnel-client@NAME runs /etc/tunnel-client/NAME.toml; the token comes from a credential, never the unit."""
    s = _settings("tunnel-client@.service")
    assert "--config /etc/tunnel-client/%i.toml" in s["ExecStart"][0] and "--no-console" in s["ExecStart"][0]
    assert s["LoadCredential"] == ["token:/etc/tunnel-client/%i.token"]
    assert s["Environment"] == ["TUNNEL_TOKEN_FILE=%d/token"]
    assert s["DynamicUser"] == ["yes"] and s["ProtectSystem"] == ["strict"]
    assert s["CapabilityBoundingSet"] == [""] and s["AmbientCapabilities"] == [""]
    assert "StateDirectory" not in s  # the agent writes nothing


def _exec_start(unit: str, replacements: dict[str, str]) -> list[str]:
    line = _settings(unit)["ExecStart"][0]
    for old, new in replacements.items():
        line = line.replace(old, new)
    return shlex.split(line)


def test_the_units_command_lines_start_a_relay_and_an_agent(tmp_path):
    """The relay's ExecStart with $RELAY_OPTIONS split into words as systemd does, and the
    agent's with an instance's config file and its credential: a visitor's bytes pass."""
    state = tmp_path / "state"
    agent_port, admin_port, tls_port = free_port(), free_port(), free_port()
    low, high = free_port_range(5)
    options = f"--agent-port {agent_port} --admin-port {admin_port} --tls-port {tls_port} --ports {low}-{high}"
    relay_cmd = _exec_start("tunnel-relay.service", {
        "/opt/tunnel-relay/bin/": f"{BIN}/", "/var/lib/tunnel-relay": str(state), "$RELAY_OPTIONS": options,
    })
    relay = subprocess.Popen(relay_cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    echo = EchoServer()
    agent = None
    try:
        wait_for(lambda: relay.poll() is not None or listening(admin_port), 30, "the relay")
        assert relay.poll() is None
        env = dict(line.split("=", 1) for line in (state / "client.env").read_text().splitlines())
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        (credentials / "token").write_text(env["TUNNEL_TOKEN"] + "\n")
        config = tmp_path / "etc" / "demo.toml"
        config.parent.mkdir()
        config.write_text(f'relay = "localhost:{agent_port}"\nca = "{state / "ca.pem"}"\n'
                          f'unencrypted = true\nforward = ["{echo.port}"]\n')
        agent_cmd = _exec_start("tunnel-client@.service", {
            "/opt/tunnel-relay/bin/": f"{BIN}/", "/etc/tunnel-client/%i.toml": str(config),
        })
        token_file = _settings("tunnel-client@.service")["Environment"][0].split("=", 1)[1].replace("%d", str(credentials))
        agent = subprocess.Popen(agent_cmd, env={"PATH": "/usr/bin:/bin", "TUNNEL_TOKEN_FILE": token_file},
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out = _LineReader(agent.stdout)
        line = out.next_line(30)
        assert re.fullmatch(r"tcp://localhost:\d+", line), line
        with connect(int(line.rsplit(":", 1)[1])) as s:
            s.sendall(b"through the units' command lines")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s, 10) == b"through the units' command lines"
    finally:
        if agent is not None:
            stop_process(agent, 10)
        stop_process(relay, 10)
        echo.close()
