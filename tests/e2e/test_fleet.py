"""A fleet of two nodes (docs/network.md), end to end: one redis-server, r1
and r2 on their own loopback addresses sharing one CA (the dev fleet CA), an
agent with `--name` on r1, and visitors entering at r2 for the stable name,
served through the one hop, TLS terminated and passed through. Redis is
stopped and started again under a visitor in progress."""

import shutil
import socket
import ssl

import pytest
from cryptography.hazmat.primitives import serialization

from tests.e2e.harness import AgentProcess, EchoServer, RelayProcess, free_port, wait_for
from tests.e2e.test_encrypted_routing import (
    TLSEchoServer,
    json_lines,
    make_ca,
    make_leaf,
    recv_exactly,
    write_pem,
)
from tests.fleet.redis_server import REDIS_SERVER, RedisServer

DOMAIN = "fleet.localhost"


def node(workdir, name, address, redis, ca_from=None):
    relay = RelayProcess(
        workdir / name, f"--node={name}", f"--domain={DOMAIN}", f"--registry={redis.url}",
        f"--interface={address}", "--agent-interface=127.0.0.1",
        f"--peer-port={free_port(address)}",
    )
    if ca_from is not None:  # nodes sharing one state CA: it is the fleet CA
        relay.state_dir.mkdir(parents=True)
        for stem in ("ca.pem", "ca-key.pem"):
            shutil.copy(ca_from.state_dir / stem, relay.state_dir / stem)
    return relay.start()


@pytest.fixture
def fleet(tmp_path):
    if REDIS_SERVER is None:
        pytest.fail("redis-server is missing: apt-get install -y redis-server (.ci/run installs it)")
    redis = RedisServer(tmp_path).start()
    nodes = []
    try:
        nodes.append(node(tmp_path, "r1", "127.0.0.2", redis))
        nodes.append(node(tmp_path, "r2", "127.0.0.3", redis, ca_from=nodes[0]))
        yield redis, nodes[0], nodes[1]
    finally:
        for relay in nodes:
            relay.stop()
        redis.stop()
    for relay in nodes:
        assert "Traceback" not in relay.log(), relay.log()


def visit(address, port, hostname, context):
    raw = socket.create_connection((address, port), timeout=10)
    try:
        return context.wrap_socket(raw, server_hostname=hostname)
    except BaseException:
        raw.close()
        raise


def test_random_tunnels_carry_the_node_label(fleet):
    """On node r1, a random encrypted tunnel is <id>.r1.<domain> and an unencrypted one r1.<domain>:<port>."""
    _, r1, _ = fleet
    echo = EchoServer()
    agents = [AgentProcess(r1, "forward", str(echo.port), "--json"),
              AgentProcess(r1, "forward", str(echo.port), "--unencrypted")]
    try:
        (info,) = json_lines(agents[0], 1)
        label, _, rest = info["hostname"].partition(".")
        assert rest == f"r1.{DOMAIN}" and len(label) == 16
        host, _ = agents[1].address()
        assert host == f"r1.{DOMAIN}"
    finally:
        for agent in agents:
            agent.stop()
        echo.close()


def terminated_half_close(address, port, hostname, ca_path, payload):
    """A visitor over memory BIOs: sends payload, close_notify and a TCP
    half-close, then reads until EOF; returns what came back."""
    context = ssl.create_default_context(cafile=ca_path)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=hostname)
    raw = socket.create_connection((address, port), timeout=10)
    with raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                data = raw.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        tls.write(payload)
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        raw.sendall(outgoing.read())
        raw.shutdown(socket.SHUT_WR)
        back = []
        while True:
            data = raw.recv(65536)
            if not data:
                break
            incoming.write(data)
            try:
                while True:
                    chunk = tls.read(65536)
                    if not chunk:
                        break
                    back.append(chunk)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
        return b"".join(back)


def test_a_stable_name_is_served_through_the_hop(fleet, tmp_path):
    """A visitor entering at r2 for web-dev.<domain>, held on r1, is served byte-exact both ways
    (terminated with half-close, and passthrough), and Redis going away and back drops nobody."""
    redis, r1, r2 = fleet
    ca_path = r1.client_env()["TUNNEL_CA"]
    echo = EchoServer()
    origin_ca, origin_ca_key = make_ca("origin CA")
    origin_cert, origin_key = make_leaf(origin_ca, origin_ca_key, "origin", dns_names=[f"*.{DOMAIN}"])
    cert_path, key_path = write_pem(tmp_path, "origin", origin_cert, origin_key)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    origin = TLSEchoServer(server_context)
    web = AgentProcess(r1, "forward", str(echo.port), "--name", "web", "--json")
    secure = AgentProcess(r1, "forward", str(origin.port), "--name", "vault", "--tls-passthrough", "--json")
    try:
        (info,) = json_lines(web, 1)
        assert info["hostname"] == f"web-dev.{DOMAIN}"
        (vault,) = json_lines(secure, 1)
        assert vault["hostname"] == f"vault-dev.{DOMAIN}"
        payload = bytes(range(256)) * 257

        # Terminated on r1 (the node holding the agent), entered at r2.
        back = terminated_half_close("127.0.0.3", r2.tls_port, info["hostname"], ca_path, payload)
        assert back == payload

        # Passthrough: the visitor sees the origin's own certificate, through the hop.
        origin_context = ssl.create_default_context(
            cadata=origin_ca.public_bytes(serialization.Encoding.PEM).decode())
        with visit("127.0.0.3", r2.tls_port, vault["hostname"], origin_context) as s:
            assert s.getpeercert(binary_form=True) == origin_cert.public_bytes(serialization.Encoding.DER)
            s.sendall(payload)
            assert recv_exactly(s, len(payload)) == payload

            # Redis away: the visitor already routed goes on; r2 still knows the name (cached).
            redis.stop()
            s.sendall(b"still here")
            assert recv_exactly(s, 10) == b"still here"
            with visit("127.0.0.3", r2.tls_port, info["hostname"], ssl.create_default_context(cafile=ca_path)) as t:
                t.sendall(b"cached")
                assert recv_exactly(t, 6) == b"cached"
            redis.start()
            wait_for(lambda: b"web-dev" in redis.command("KEYS", "*"), 15, "r1 rewriting its keys")
            s.sendall(b"and after")
            assert recv_exactly(s, 9) == b"and after"
    finally:
        web.stop()
        secure.stop()
        echo.close()
        origin.close()
