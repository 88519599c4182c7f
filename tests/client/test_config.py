"""What a command line asks for: targets, services, ports, modes, errors."""

import pytest

from client.config import build_specs, load_agent_config, parse_host_port, parse_service
from client.errors import ConfigurationError


@pytest.mark.parametrize(
    "text, expected",
    [("22", ("localhost", 22)), ("db:5432", ("db", 5432)), ("[::1]:22", ("::1", 22))],
)
def test_host_port_forms(text, expected):
    """A port alone means localhost; HOST:PORT and [IPv6]:PORT are read as such."""
    assert parse_host_port(text, default_host="localhost") == expected


@pytest.mark.parametrize("text", ["0", "70000", "x", "[::1]22", "host:"])
def test_bad_host_port(text):
    """Out-of-range or malformed addresses are configuration errors."""
    with pytest.raises(ConfigurationError):
        parse_host_port(text, default_host="localhost")


def test_service_syntax():
    """NAME=[HOST:]PORT[:MODE] with modes tls, passthrough and tcp."""
    assert parse_service("web=8000") == ("web", "localhost", 8000, None, None)
    assert parse_service("ssh=22:tcp") == ("ssh", "localhost", 22, "tcp", None)
    assert parse_service("api=10.0.0.2:9000:passthrough") == ("api", "10.0.0.2", 9000, "tls", "passthrough")
    assert parse_service("v6=[::1]:443") == ("v6", "::1", 443, None, None)


@pytest.mark.parametrize("text", ["Web=80", "a_b=80", "123=80", "x" * 21 + "=80", "=80", "web"])
def test_bad_service_names(text):
    """Names are 1-20 of [a-z0-9] and not all digits (those are port names)."""
    with pytest.raises(ConfigurationError):
        parse_service(text)


def test_default_is_encrypted_terminated_http11():
    """A bare port asks for an encrypted tunnel the relay terminates."""
    (spec,) = build_specs(targets=["8000"])
    assert spec.wire()["services"] == [{"name": "", "kind": "tls", "mode": "terminate"}]


def test_targets_are_separate_tunnels_and_services_share_one():
    """Each positional target is its own tunnel; all --service entries form one tunnel."""
    specs = build_specs(targets=["22", "5432"], services=["web=8000", "ssh=22:tcp"], alpn=["h2,http/1.1"])
    assert len(specs) == 3
    web, ssh = specs[2].services
    assert (web.kind, web.mode, web.alpn) == ("tls", "terminate", ("h2", "http/1.1"))
    assert (ssh.kind, ssh.alpn) == ("tcp", ())


def test_expose_names_services_by_port():
    """expose --ports gives one tunnel whose services are named by their port."""
    (spec,) = build_specs(expose_ports=[3000, 8080])
    assert [s.name for s in spec.services] == ["3000", "8080"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"targets": ["1"], "unencrypted": True, "tls_passthrough": True},
        {"targets": ["1"], "unencrypted": True, "alpn": ["h2"]},
        {"targets": ["1"], "tls_passthrough": True, "client_ca": "pem"},
        {"services": ["web=1", "web=2"]},
        {},
    ],
)
def test_contradictions_are_errors(kwargs):
    """Options that cannot hold together, or nothing to forward, are refused before dialling."""
    with pytest.raises(ConfigurationError):
        build_specs(**kwargs)


def test_agent_toml(tmp_path):
    """The agent's TOML file gives relay settings and services like the flags."""
    path = tmp_path / "agent.toml"
    path.write_text('relay = "localhost:17000"\nalpn = "h2"\n[services]\nweb = "8000"\nssh = "22:tcp"\n')
    data = load_agent_config(str(path))
    assert data["relay"] == "localhost:17000"
    assert data["services"] == ["web=8000", "ssh=22:tcp"]
    assert data["alpn"] == ["h2"]
    path.write_text("relya = 1\n")
    with pytest.raises(ConfigurationError, match="relya"):
        load_agent_config(str(path))


def test_a_stable_name_names_the_one_tunnel_asked_for(tmp_path):
    """--name travels as stable_name of the one tunnel (a target, or the services); with several tunnels, or bad, it is refused."""
    from client.errors import BadNameError

    (spec,) = build_specs(targets=["8000"], stable_name="web")
    assert spec.wire()["stable_name"] == "web"
    (spec,) = build_specs(services=["web=8000", "ssh=22:tcp"], stable_name="app")
    assert spec.wire()["stable_name"] == "app"
    assert "stable_name" not in build_specs(targets=["8000"])[0].wire()
    with pytest.raises(ConfigurationError):
        build_specs(targets=["8000", "9000"], stable_name="web")
    with pytest.raises(BadNameError) as caught:
        build_specs(targets=["8000"], stable_name="Web")
    assert caught.value.exit_code == 2
    path = tmp_path / "agent.toml"
    path.write_text('name = "web"\nforward = [8000]\n')
    assert load_agent_config(str(path))["name"] == "web"


def test_forward_passes_its_stable_name_on_with_a_port_or_with_services():
    """forward(name=...) puts the name in the tunnel's spec, also when services={...}
    is given (its loop variable used to overwrite `name`)."""
    from client.api import forward

    settings = dict(relay="localhost:17000", token="t", ca=None)
    assert forward(8000, name="web", **settings)._spec.stable_name == "web"
    spec = forward(services={"api": 9000, "admin": 9001}, name="web", **settings)._spec
    assert spec.stable_name == "web"
    assert forward(8000, **settings)._spec.stable_name is None
