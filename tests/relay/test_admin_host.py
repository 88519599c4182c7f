"""The admin API refuses requests whose Host header is not its own (DNS rebinding)."""

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.server import Site

from relay.node.admin import AdminAPI, host_of
from tests.relay.node_helpers import Node


def get(admin: AdminAPI, path: str, host: bytes | None):
    node = admin.clock
    site = Site(admin.resource(), reactor=node)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    channel.makeConnection(transport)
    header = b"" if host is None else b"Host: " + host + b"\r\n"
    channel.dataReceived(b"GET " + path.encode() + b" HTTP/1.0\r\n" + header + b"\r\n")
    status = int(transport.value().split(b" ", 2)[1])
    return status, transport.value()


@pytest.fixture
def admin():
    node = Node()
    return AdminAPI(node.tunnels, node.metrics, 0.0, node.reactor, interface="127.0.0.1",
                    allowed_hosts=["relay-admin.internal"])


@pytest.mark.parametrize(
    "host", [b"127.0.0.1:17080", b"localhost", b"LOCALHOST:17080", b"[::1]:17080", b"127.0.0.2", b"relay-admin.internal:1"]
)
def test_own_names_are_served(admin, host):
    """Loopback names, the bound address and configured names (any port) are answered."""
    for path in ("/healthz", "/v1/tunnels"):
        status, body = get(admin, path, host)
        assert status == 200, body


@pytest.mark.parametrize("host", [b"evil.example", b"evil.example:17080", b"127.0.0.1.evil.example", b"", b"\xff"])
def test_other_hosts_get_421_and_no_data(admin, host):
    """A Host that is not the admin's own (a rebinding page's name, or an empty one) gets 421 and no tunnel data."""
    for path in ("/healthz", "/v1/tunnels"):
        status, body = get(admin, path, host)
        assert status == 421
        assert b"tunnels" not in body.partition(b"\r\n\r\n")[2]
        assert json.loads(body.partition(b"\r\n\r\n")[2])["error"] == "unexpected Host header"


def test_host_of_strips_port_and_brackets():
    """host_of takes the host part of a Host header."""
    assert host_of(b"Example.COM:80") == "example.com"
    assert host_of(b"[::1]:8080") == "::1"
    assert host_of(b"") is None


def test_an_http_1_0_request_without_host_is_served(admin):
    """No Host header at all (HTTP/1.0, curl -0) is served: browsers, the rebinding path, always send one."""
    status, body = get(admin, "/healthz", None)
    assert status == 200
