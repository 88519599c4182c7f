"""Per-session limits (relay/node/limits.py): each refusal is a typed
limit_exceeded error to the agent, counted, and other sessions are untouched."""

import pytest

from relay.mux import control
from relay.mux.control import RequestErrorCode
from relay.node.limits import SessionLimits
from tests.relay.node_helpers import Node

def _ca_pem() -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def ca_pem():
    return _ca_pem()


def test_tunnels_per_session_are_capped_and_other_sessions_unaffected():
    """Past max_tunnels a session's open_tunnel gets limit_exceeded; another session still opens."""
    node = Node(limits=SessionLimits(max_tunnels=3))
    agent, other = node.agent(), node.agent()
    for _ in range(3):
        assert agent.open(services=[{"name": "", "kind": "tls"}]).ok
    reply = agent.open(services=[{"name": "", "kind": "tls"}])
    assert reply.error.code is RequestErrorCode.LIMIT_EXCEEDED and isinstance(reply.error, control.LimitExceededError)
    assert "tunnels per session" in str(reply.error)
    assert node.metrics.allocation_failures["limit_exceeded"] == 1
    assert other.open(services=[{"name": "", "kind": "tls"}]).ok
    tunnel_id = next(iter(node.tunnels.tunnels))
    assert agent.close(tunnel_id).ok or other.close(tunnel_id).ok
    assert agent.open(services=[{"name": "", "kind": "tls"}]).ok  # room again after a close


def test_ports_per_session_are_capped_before_any_port_is_bound():
    """A request that would take the session past max_ports is refused whole: no port bound for it."""
    node = Node(limits=SessionLimits(max_ports=2))
    agent = node.agent()
    assert agent.open().ok
    reply = agent.open(services=[{"name": "a", "kind": "tcp"}, {"name": "b", "kind": "tcp"}])
    assert reply.error.code is RequestErrorCode.LIMIT_EXCEEDED and "ports" in str(reply.error)
    assert len(node.allocator.in_use) == 1


def test_hostnames_per_session_are_capped():
    """Past max_hostnames a TLS request is refused with limit_exceeded."""
    node = Node(limits=SessionLimits(max_hostnames=1))
    agent = node.agent()
    assert agent.open(services=[{"name": "", "kind": "tls"}]).ok
    assert agent.open(services=[{"name": "", "kind": "tls"}]).error.code is RequestErrorCode.LIMIT_EXCEEDED


def test_client_ca_bytes_count_once_per_distinct_pem(ca_pem):
    """Tunnels naming the same client CA share one copy and count it once; a second distinct CA over the cap is refused."""
    limit = len(ca_pem) + 10
    node = Node(limits=SessionLimits(max_client_ca_bytes=limit))
    agent = node.agent()
    tls = [{"name": "", "kind": "tls"}]
    assert agent.open(services=tls, client_ca=ca_pem).ok
    assert agent.open(services=tls, client_ca=ca_pem).ok
    first, second = node.tunnels.tunnels.values()
    assert first.client_ca is second.client_ca  # one copy in memory
    reply = agent.open(services=tls, client_ca=_ca_pem())
    assert reply.error.code is RequestErrorCode.LIMIT_EXCEEDED and "client CA" in str(reply.error)
    for tunnel_id in list(node.tunnels.tunnels):
        agent.close(tunnel_id)
    assert node.tunnels._client_cas == {}


def test_a_client_ca_is_parsed_once_however_often_it_is_sent(ca_pem, monkeypatch):
    """The control module remembers a PEM's verdict by content, so the same CA costs one parse."""
    import ssl

    calls = []
    real = ssl.create_default_context

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    pem = _ca_pem()
    for request_id in range(5):
        control.parse_request({"id": request_id, "op": "open_tunnel", "client_ca": pem})
    assert len(calls) == 1
    with pytest.raises(control.TunnelRequestError):
        control.parse_request({"id": 9, "op": "open_tunnel", "client_ca": "-----BEGIN CERTIFICATE-----\nAAAA\n"})
    with pytest.raises(control.TunnelRequestError):
        control.parse_request({"id": 9, "op": "open_tunnel", "client_ca": "-----BEGIN CERTIFICATE-----\nAAAA\n"})
    assert len(calls) == 2  # a bad one is remembered too


def _visit(node, port, count):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    out = []
    for i in range(count):
        addr = IPv4Address("TCP", "203.0.113.7", 40000 + i)
        protocol = node.listener(port).buildProtocol(addr)
        if protocol is not None:
            protocol.makeConnection(StringTransport(peerAddress=addr))
        out.append(protocol)
    return out


def test_concurrent_streams_per_tunnel_are_capped():
    """Past max_streams_per_tunnel live streams a new visitor is refused and counted; other tunnels still serve."""
    node = Node(limits=SessionLimits(max_streams_per_tunnel=2))
    agent = node.agent()
    first, second = (agent.open().body["tunnel"]["port"] for _ in range(2))
    assert [p is not None for p in _visit(node, first, 3)] == [True, True, False]
    assert node.metrics.refused_by_reason["streams_per_tunnel"] == 1
    assert all(p is not None for p in _visit(node, second, 2))


def test_new_streams_per_second_are_a_token_bucket():
    """A burst beyond new_streams_burst is refused; the bucket refills at new_streams_per_second."""
    node = Node(limits=SessionLimits(new_streams_per_second=10, new_streams_burst=5))
    agent = node.agent()
    port = agent.open().body["tunnel"]["port"]
    assert sum(p is not None for p in _visit(node, port, 8)) == 5
    assert node.metrics.refused_by_reason["new_streams_rate"] == 3
    node.reactor.advance(0.3)  # three more tokens
    assert sum(p is not None for p in _visit(node, port, 5)) == 3
