"""--node naming and the fleet options (relay/node/service.py, tunnels.py)."""

import pytest
from twisted.python import usage

from relay.node.fleetdir import FleetDirectory
from relay.node.service import Options


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def test_node_names_the_tcp_host_unless_public_host_is_given():
    """--node r1 prints r1.<domain> for TCP tunnels; an explicit --public-host wins; without --node nothing changes."""
    assert parse("--node", "r1", "--domain", "example.net")["public-host"] == "r1.example.net"
    assert parse("--node", "r1", "--domain", "example.net", "--public-host", "edge.example.org")["public-host"] == "edge.example.org"
    assert parse("--domain", "example.net")["public-host"] == "localhost"
    # The agents still dial what they dialled: client.env is not renamed to a name DNS may lack.
    assert parse("--node", "r1", "--domain", "example.net")["agent-host"] == "localhost"


@pytest.mark.parametrize("args, error", [
    (("--node", "R_1"), "DNS label"),
    (("--registry", "redis://127.0.0.1:6379/0"), "needs --node"),
    (("--node", "r1", "--registry", "http://x"), "redis://"),
    (("--node", "r1", "--fleet-ca", "ca.pem"), "go together"),
    (("--node", "r1", "--tls-port", "0"), "encrypted tunnels"),
])
def test_bad_fleet_options_are_refused(args, error):
    """Each bad fleet option is a usage error naming the problem."""
    with pytest.raises(usage.UsageError, match=error):
        parse(*args)


def test_random_hostnames_carry_the_node_label_and_stable_ones_do_not():
    """<id>.<node> for random tunnels and services; <name>-<tenant> with no node label for stable names."""
    from twisted.internet.task import Clock

    from relay.node.tunnels import TunnelManager

    manager = TunnelManager(Clock(), None, public_host="r1.example.net", domain="example.net", node="r1")
    assert manager._label("abc", "", None, "dev") == "abc.r1"
    assert manager._label("abc", "api", None, "dev") == "api-abc.r1"
    assert manager._label("abc", "", "web", "dev") == "web-dev"
    plain = TunnelManager(Clock(), None, public_host="localhost", domain="example.net")
    assert plain._label("abc", "", None, "dev") == "abc"


def test_only_one_label_under_the_domain_is_a_fleet_wide_name():
    """web-dev.<domain> is looked up in the registry; <id>.r1.<domain> and other domains never are."""
    directory = FleetDirectory(None, None, node="r1", domain="example.net")
    assert directory.is_stable_hostname("web-dev.example.net")
    assert not directory.is_stable_hostname("abc.r1.example.net")
    assert not directory.is_stable_hostname("web-dev.example.org")
