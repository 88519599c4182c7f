"""Passthrough tunnels terminated by the agent itself (--cert/--key)."""

import json
import socket
import ssl

import pytest

from relay.node import state as relay_state


@pytest.fixture
def agent_terminated(relay, echo, agents, tmp_path):
    """An echo service behind --tls-passthrough --cert/--key, with a CA of its own:
    (that CA's file, hostname, TLS port)."""
    own = relay_state.load_or_create(tmp_path / "service-ca", agent_address="localhost:1")
    cert, key = tmp_path / "svc.pem", tmp_path / "svc-key.pem"
    relay_state.issue_certificate(own, ["*.tunnels.localhost"], cert, key)
    agent = agents(
        relay, "forward", str(echo.port), "--tls-passthrough", "--cert", str(cert), "--key", str(key), "--json"
    )
    hostname, port = json.loads(agent.next_line())["tls_socket"]
    return str(own.ca_cert_path), hostname, port


def test_agent_terminates_passthrough_with_its_own_certificate(agent_terminated):
    """With --tls-passthrough --cert/--key the visitor sees the agent's certificate
    (from a CA the relay never had) and its plaintext reaches the service byte-exact."""
    own_ca, hostname, port = agent_terminated
    context = ssl.create_default_context(cafile=own_ca)  # NOT the relay's CA
    payload = bytes(range(256)) * 4096
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=hostname) as tls:
            issuer = dict(x[0] for x in tls.getpeercert()["issuer"])
            assert issuer["commonName"] == "tunnel-relay development CA"
            tls.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = tls.recv(65536)
                assert chunk, "stream ended early"
                got += chunk
            assert got == payload


def test_relay_ca_does_not_verify_an_agent_terminated_tunnel(relay, agent_terminated):
    """The relay's CA does not vouch for an agent-terminated tunnel: the relay never terminates it."""
    _, hostname, port = agent_terminated
    context = ssl.create_default_context(cafile=relay.client_env()["TUNNEL_CA"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            context.wrap_socket(raw, server_hostname=hostname)
        except ssl.SSLCertVerificationError:
            return
    raise AssertionError("the relay's CA verified a certificate it did not issue")
