"""The twistd plugin: option parsing, config precedence, the service tree."""

import subprocess
import sys

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage

from relay.node.service import Options, makeService


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def test_plugin_is_found_as_relay():
    """`twistd relay` resolves to our IServiceMaker."""
    names = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "relay" in names
    assert names["relay"].module == "relay.node.service"


def test_development_defaults_avoid_the_ephemeral_range():
    """Default ports are fixed, distinct, and below the kernel's ephemeral range."""
    o = parse()
    low, high = o["port-range"]
    fixed = [o["agent-port"], o["tls-port"], o["admin-port"]]
    assert len(set(fixed)) == 3
    assert all(p < 32768 for p in fixed) and high < 32768
    assert not any(low <= p <= high for p in fixed)
    assert o["interface"] == "127.0.0.1" and o["state-dir"] == "relay-state"


def test_config_file_is_beaten_by_the_command_line(tmp_path):
    """TOML settings apply, and the command line overrides them."""
    config = tmp_path / "relay.toml"
    config.write_text('agent-port = 18000\nports = "21000-21010"\npublic_host = "relay.example"\n')
    o = parse("--config", str(config), "--agent-port", "18001")
    assert o["agent-port"] == 18001
    assert o["port-range"] == (21000, 21010)
    assert o["public-host"] == "relay.example"


@pytest.mark.parametrize(
    "args",
    [
        ["--ports", "9-3"],
        ["--ports", "abc"],
        ["--agent-port", "20001"],  # inside the default tunnel range
        ["--keepalive-interval", "30", "--keepalive-timeout", "10"],
        ["--agent-port", "x"],
        ["--admin-auth", "none"],  # no way to switch the admin credential off
    ],
)
def test_bad_options_are_usage_errors(args):
    """Nonsense settings are refused with a UsageError, before anything binds."""
    with pytest.raises(usage.UsageError):
        parse(*args)


def test_unknown_config_keys_are_refused(tmp_path):
    """A typo in the config file is an error, not silently ignored."""
    config = tmp_path / "relay.toml"
    config.write_text("agent_prot = 1\n")
    with pytest.raises(usage.UsageError, match="agent-prot"):
        parse("--config", str(config))


def test_make_service_builds_without_binding(tmp_path):
    """makeService creates the state folder and a service tree, binding nothing yet."""
    o = parse("--state-dir", str(tmp_path / "state"), "--agent-port", "0", "--admin-port", "0")
    node = makeService(o)
    assert (tmp_path / "state" / "client.env").exists()
    assert not node.running


def test_client_cli_does_not_load_the_server_or_a_reactor():
    """Importing the agent's modules loads nothing of the node (relay.node), nor klein or a reactor."""
    code = (
        "import sys, client.cli, client.agent, client.api; "
        "bad = [m for m in sys.modules if m == 'relay.node' or m.startswith('relay.node.')] + "
        "[m for m in ('klein', 'twisted.internet.reactor') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "[]", out.stderr
