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


# -- the agent port's certificate and client.env (issue 12) ----------------------------


@pytest.fixture(scope="module")
def public_ca(tmp_path_factory):
    from tests.certificates import PrivateCA

    return PrivateCA(tmp_path_factory.mktemp("public-ca"))


@pytest.mark.parametrize(
    "names, host, covered",
    [
        (["*.example.com"], "relay.example.com", True),
        (["*.example.com"], "a.relay.example.com", False),  # a wildcard covers one label only
        (["*.example.com"], "example.com", False),
        (["*.tunnels.example.com", "relay.example.com"], "relay.example.com", True),
        (["localhost", "192.0.2.7"], "192.0.2.7", True),
        (["192.0.2.7"], "192.0.2.8", False),
        (["192.0.2.7"], "relay.example.com", False),
    ],
)
def test_certificate_covers_follows_service_identity(public_ca, names, host, covered):
    """Whether a certificate names a host is decided as the agent decides it (RFC 6125, service-identity)."""
    from relay.node.tlsfront import certificate_covers

    cert, _ = public_ca.issue(names, f"leaf-{abs(hash((tuple(names), host)))}")
    assert certificate_covers(str(cert), host) is covered


@pytest.mark.parametrize(
    "public_host, interface, agent_interface, expected",
    [
        ("localhost", "127.0.0.1", None, "localhost"),
        ("localhost", "::1", None, "::1"),
        ("localhost", "127.0.0.2", None, "127.0.0.2"),
        ("localhost", "0.0.0.0", None, "localhost"),
        ("localhost", "::", None, "localhost"),
        ("localhost", "0.0.0.0", "::1", "::1"),
        ("relay.example", "::1", None, "relay.example"),  # an explicit host is the operator's word
    ],
)
def test_the_agents_host_is_one_the_agent_port_answers_on(public_host, interface, agent_interface, expected):
    """`localhost` is kept unless the agent port binds one other address, which becomes the host agents dial."""
    args = ["--public-host", public_host, "--interface", interface]
    if agent_interface:
        args += ["--agent-interface", agent_interface]
    assert parse(*args)["agent-host"] == expected


def test_client_env_relay_is_bracketed_for_ipv6_and_the_dev_cert_names_the_interfaces(tmp_path):
    """`--interface ::1` writes TUNNEL_RELAY=[::1]:PORT (what tunnel-client parses), and the
    development certificate names every specific address the relay binds."""
    from cryptography import x509
    import ipaddress

    o = parse("--state-dir", str(tmp_path / "s"), "--interface", "::1", "--agent-interface", "127.0.0.3",
              "--agent-port", "17001")
    assert o["agent-host"] == "127.0.0.3"
    o = parse("--state-dir", str(tmp_path / "s"), "--interface", "::1", "--agent-port", "17001")
    makeService(o)
    env = dict(line.split("=", 1) for line in (tmp_path / "s" / "client.env").read_text().splitlines())
    assert env["TUNNEL_RELAY"] == "[::1]:17001"
    o = parse("--state-dir", str(tmp_path / "s"), "--interface", "127.0.0.2", "--agent-interface", "127.0.0.3")
    makeService(o)
    leaf = x509.load_pem_x509_certificate((tmp_path / "s" / "relay.pem").read_bytes())
    ips = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "127.0.0.2", "127.0.0.3")} <= set(ips)


def test_an_ip_public_host_is_an_ip_san_not_a_dns_name(tmp_path):
    """--public-host 192.0.2.7 is certified as an IP address, which is what an agent dialling it checks."""
    from relay.node.tlsfront import certificate_covers

    makeService(parse("--state-dir", str(tmp_path / "s"), "--public-host", "192.0.2.7"))
    assert certificate_covers(str(tmp_path / "s" / "relay.pem"), "192.0.2.7")


def test_which_certificate_the_agent_port_presents(tmp_path, public_ca):
    """--agent-cert wins; else --cert if it names the agents' host; else the dev CA's, and only
    then does client.env carry TUNNEL_CA."""
    wildcard, wildcard_key = public_ca.issue(["*.tunnels.example", "relay.tunnels.example"], "w")
    agent_cert, agent_key = public_ca.issue(["relay.tunnels.example"], "a")
    common = ["--domain", "tunnels.example", "--public-host", "relay.tunnels.example"]

    def env_keys(state):
        return [line.split("=", 1)[0] for line in (state / "client.env").read_text().splitlines()]

    o = parse("--state-dir", str(tmp_path / "1"), *common, "--cert", str(wildcard), "--key", str(wildcard_key))
    assert o["agent-tls"] == "cert"
    makeService(o)
    assert env_keys(tmp_path / "1") == ["TUNNEL_RELAY", "TUNNEL_TOKEN"]

    o = parse("--state-dir", str(tmp_path / "2"), *common, "--agent-cert", str(agent_cert), "--agent-key", str(agent_key))
    assert o["agent-tls"] == "agent-cert"

    o = parse("--state-dir", str(tmp_path / "3"), "--domain", "tunnels.example", "--cert", str(wildcard), "--key", str(wildcard_key))
    assert o["agent-tls"] == "dev"  # the wildcard does not name localhost
    makeService(o)
    assert env_keys(tmp_path / "3") == ["TUNNEL_RELAY", "TUNNEL_TOKEN", "TUNNEL_CA"]

    # The same folder, started again with a public agent certificate: TUNNEL_CA goes, the token stays.
    token_line = (tmp_path / "3" / "client.env").read_text().splitlines()[1]
    makeService(parse("--state-dir", str(tmp_path / "3"), "--agent-cert", str(agent_cert), "--agent-key",
                      str(agent_key), "--public-host", "relay.tunnels.example"))
    lines = (tmp_path / "3" / "client.env").read_text().splitlines()
    assert lines == ["TUNNEL_RELAY=relay.tunnels.example:17000", token_line]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--agent-cert", "x.pem"], "--agent-cert and --agent-key go together"),
        (["--agent-cert", "/nonexistent.pem", "--agent-key", "k"], "not a readable PEM certificate"),
    ],
)
def test_bad_agent_certificate_options_are_usage_errors(args, message):
    """A lone --agent-cert or an unreadable one is refused before anything starts."""
    with pytest.raises(usage.UsageError, match=message):
        parse(*args)


def test_an_agent_cert_for_another_name_is_a_usage_error(public_ca):
    """An --agent-cert that does not name the host agents dial would be refused by every agent: say so at start."""
    cert, key = public_ca.issue(["other.example"], "other")
    with pytest.raises(usage.UsageError, match="does not name localhost"):
        parse("--agent-cert", str(cert), "--agent-key", str(key))
