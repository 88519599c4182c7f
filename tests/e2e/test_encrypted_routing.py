"""Encrypted tunnels, end to end: routing by SNI on the relay's shared TLS port.

Real `twistd -n relay` and `tunnel-client` processes on loopback, and real
visitors: `openssl s_client`, `nc`, and Python's `ssl` (sockets, or memory
BIOs where a test must control every byte of the ClientHello). Services are
small threaded servers; certificates are made here with `cryptography`.
Most tests share one relay (each opens its own tunnels, and every counter
they read is per tunnel); certificate reload starts its own.
"""

import json
import queue
import signal
import socket
import ssl
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from relay.node import state as relay_state
from tests.e2e.harness import (
    AgentProcess,
    EchoServer,
    RelayProcess,
    closed_within,
    connect,
    recv_all,
    wait_for,
)

DOMAIN = "tunnels.localhost"
# The relay's CLIENT_HELLO_TIMEOUT_SECONDS (relay/node/tlsfront.py).
HELLO_TIMEOUT_SECONDS = 10.0


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """One relay for the module; it must not log a traceback whatever the tests did."""
    r = RelayProcess(tmp_path_factory.mktemp("encrypted") / "relay").start()
    yield r
    r.stop()
    assert "Traceback" not in r.log(), r.log()


@pytest.fixture
def servers():
    """Start threaded services (EchoServer subclasses); all are closed at the end."""
    started = []

    def start(server):
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


# -- certificates ----------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str):
    """A self-signed CA: (certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(ca_cert, ca_key, common_name: str, *, dns_names=(), usage=ExtendedKeyUsageOID.SERVER_AUTH):
    """A leaf signed by (ca_cert, ca_key) with one extended key usage: (certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def write_pem(directory, stem: str, cert, key):
    """Write stem.pem and stem-key.pem; return their paths."""
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


# -- services ---------------------------------------------------------------------------


class TaggedEchoServer(EchoServer):
    """Says its tag first, then echoes: two of them tell the visitor which one it reached."""

    def __init__(self, tag: bytes):
        self.tag = tag
        super().__init__()

    def handle(self, conn):
        conn.sendall(self.tag)
        super().handle(conn)


class TLSEchoServer(EchoServer):
    """An origin that terminates TLS itself, with its own certificate, and echoes."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context
        super().__init__()

    def handle(self, conn):
        with self.context.wrap_socket(conn, server_side=True) as tls:
            while True:
                data = tls.recv(65536)
                if not data:
                    return
                tls.sendall(data)


class ProxyHeaderEchoServer(EchoServer):
    """Parses a PROXY header with Twisted's own parser, records it, then echoes the rest."""

    def __init__(self, parser_class):
        self.parser_class = parser_class
        self.headers: "queue.Queue[object]" = queue.Queue()  # ProxyInfo, or the parse error
        super().__init__()

    def handle(self, conn):
        parser = self.parser_class()
        info = None
        while info is None:
            data = conn.recv(65536)
            if not data:
                self.headers.put(EOFError("no PROXY header before EOF"))
                return
            try:
                info, rest = parser.feed(data)
            except Exception as e:  # InvalidProxyHeader & co: the test reports it
                self.headers.put(e)
                return
        self.headers.put(info)
        if rest:
            conn.sendall(rest)
        super().handle(conn)


# -- visitors -----------------------------------------------------------------------------


def visitor_context(relay, *, cert=None, key=None) -> ssl.SSLContext:
    """A visitor that trusts the relay's development CA (which signs its wildcard certificate)."""
    context = ssl.create_default_context(cafile=relay.client_env()["TUNNEL_CA"])
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def tls_visit(relay, hostname: str, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    """A TLS connection to the relay's TLS port with SNI = hostname, handshake done."""
    context = context or visitor_context(relay)
    raw = connect(relay.tls_port)
    try:
        return context.wrap_socket(raw, server_hostname=hostname)
    except BaseException:
        raw.close()
        raise


def recv_exactly(sock, n: int, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    chunks, size = [], 0
    while size < n:
        data = sock.recv(n - size)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def assert_echo(sock, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def assert_unrecognized_name(relay, hostname: str) -> None:
    """A Python visitor asking for `hostname` gets the fatal unrecognized_name alert."""
    with pytest.raises(ssl.SSLError) as caught:
        tls_visit(relay, hostname).close()
    assert caught.value.reason == "TLSV1_UNRECOGNIZED_NAME", caught.value


def openssl_s_client(relay, *server_name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{relay.tls_port}", *server_name],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15,
    )


def json_lines(agent, count: int) -> list[dict]:
    lines = []
    for _ in range(count):
        line = agent.next_line()
        try:
            lines.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}\n{agent.stderr_text()}") from None
    return lines


def tunnel_info(relay, tunnel_id: str) -> dict:
    return next(t for t in relay.tunnels() if t["id"] == tunnel_id)


# -- 1. unknown or missing names ------------------------------------------------------------


def test_unknown_or_missing_sni_gets_unrecognized_name(relay, echo, agents):
    """A ClientHello naming no tunnel, or no name at all, gets a fatal unrecognized_name alert, and real tunnels keep working."""
    agent = agents(relay, "forward", str(echo.port), "--json")
    (info,) = json_lines(agent, 1)
    hostname, port = info["tls_socket"]
    assert port == relay.tls_port and hostname == f"{info['tunnel_id']}.{DOMAIN}"
    assert info["url"] == f"https://{hostname}:{relay.tls_port}"

    refused_before = relay.admin("/healthz")["tls_port_refused"]["unknown_names"]
    for server_name in (["-servername", f"unknown.{DOMAIN}"], ["-noservername"]):
        result = openssl_s_client(relay, *server_name)
        assert result.returncode != 0, result.stdout
        assert "unrecognized name" in result.stderr and "alert number 112" in result.stderr, result.stderr
        assert "no peer certificate available" in result.stdout, result.stdout
    assert relay.admin("/healthz")["tls_port_refused"]["unknown_names"] == refused_before + 2

    with tls_visit(relay, hostname) as s:
        assert_echo(s, b"still serving\n")


# -- 2. passthrough ---------------------------------------------------------------------------


def test_passthrough_shows_the_origin_certificate(relay, agents, servers):
    """In passthrough the visitor's TLS session is with the service itself: it sees the origin's certificate and bytes pass unchanged."""
    origin_ca, origin_ca_key = make_ca("origin CA")
    origin_cert, origin_key = make_leaf(origin_ca, origin_ca_key, "origin", dns_names=[f"*.{DOMAIN}"])
    origin_dir = relay.workdir / "origin"
    origin_dir.mkdir(exist_ok=True)
    cert_path, key_path = write_pem(origin_dir, "origin", origin_cert, origin_key)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    origin = servers(TLSEchoServer(server_context))

    agent = agents(relay, "forward", str(origin.port), "--tls-passthrough", "--json")
    (info,) = json_lines(agent, 1)
    hostname = info["hostname"]

    # Trusting only the origin's CA (not the relay's), with hostname checks on.
    context = ssl.create_default_context(cadata=origin_ca.public_bytes(serialization.Encoding.PEM).decode())
    with tls_visit(relay, hostname, context) as s:
        seen = s.getpeercert(binary_form=True)
        payload = bytes(range(256)) * 64
        assert_echo(s, payload)
    assert seen == origin_cert.public_bytes(serialization.Encoding.DER)

    relay_ca = x509.load_pem_x509_certificate(open(relay.client_env()["TUNNEL_CA"], "rb").read())
    assert x509.load_der_x509_certificate(seen).issuer != relay_ca.subject
    # The relay's CA does not vouch for the origin: a visitor trusting only it is refused.
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_visit(relay, hostname).close()


# -- 3. ClientHello timing -----------------------------------------------------------------


def _client_hello(hostname: str):
    """(ClientHello bytes, SSLObject, incoming BIO, outgoing BIO) of a visitor for hostname."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read(), tls, incoming, outgoing


def _finish_handshake(sock, tls, incoming, outgoing) -> None:
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                raise AssertionError("the relay closed during the handshake") from None
            incoming.write(data)
    if outgoing.pending:
        sock.sendall(outgoing.read())


def _fragment_records(hello: bytes, fragment_bytes: int) -> bytes:
    """The same ClientHello re-framed into TLS records of at most fragment_bytes each (RFC 8446 5.1)."""
    content_type, version, length = hello[0], hello[1:3], int.from_bytes(hello[3:5], "big")
    assert content_type == 22 and len(hello) == 5 + length, "expected one handshake record"
    body = hello[5:]
    return b"".join(
        bytes([22]) + version + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (body[i : i + fragment_bytes] for i in range(0, len(body), fragment_bytes))
    )


def _bio_echo(sock, tls, incoming, outgoing, payload: bytes) -> bytes:
    tls.write(payload)
    sock.sendall(outgoing.read())
    got = b""
    while len(got) < len(payload):
        try:
            got += tls.read(65536)
            continue
        except ssl.SSLWantReadError:
            pass
        data = sock.recv(65536)
        if not data:
            break
        incoming.write(data)
    return got


def test_client_hello_one_byte_at_a_time_is_routed_and_stalled_hello_dropped(relay, echo, agents):
    """A ClientHello split into one-byte TCP segments or into many TLS records is still routed, while one that never completes is dropped at the 10 s hello deadline."""
    stalled = connect(relay.tls_port)
    stalled_at = time.monotonic()
    # A record header announcing 512 bytes, and one of them.
    stalled.sendall(bytes([22, 3, 1, 2, 0, 1]))

    agent = agents(relay, "forward", str(echo.port), "--json")
    (info,) = json_lines(agent, 1)
    hello, tls, incoming, outgoing = _client_hello(info["hostname"])
    assert len(hello) > 200
    with connect(relay.tls_port) as s:
        for i in range(len(hello)):
            s.sendall(hello[i : i + 1])  # TCP_NODELAY (connect()): one segment each
            time.sleep(0.001)
        _finish_handshake(s, tls, incoming, outgoing)
        payload = b"dribbled\n" * 100
        assert _bio_echo(s, tls, incoming, outgoing, payload) == payload

    hello, tls, incoming, outgoing = _client_hello(info["hostname"])
    fragmented = _fragment_records(hello, 16)
    assert fragmented.count(bytes([22, 3, 1, 0, 16])) > 10
    with connect(relay.tls_port) as s:
        s.sendall(fragmented)
        _finish_handshake(s, tls, incoming, outgoing)
        payload = b"fragmented\n" * 100
        assert _bio_echo(s, tls, incoming, outgoing, payload) == payload

    with stalled:
        left = HELLO_TIMEOUT_SECONDS + 2 - (time.monotonic() - stalled_at)
        assert closed_within(stalled, left), "a stalled ClientHello was kept past the deadline"
        assert time.monotonic() - stalled_at > HELLO_TIMEOUT_SECONDS - 1.5, "dropped before its deadline"


# -- 4. named services ---------------------------------------------------------------------


def test_named_services_reach_their_own_backends(relay, agents, servers):
    """--service NAME=PORT gives each service its own https://NAME-<id> name in one tunnel (a :tcp one a tcp:// port), each reaching its own backend."""
    web = servers(TaggedEchoServer(b"web:"))
    api = servers(TaggedEchoServer(b"api:"))
    ssh = servers(TaggedEchoServer(b"ssh:"))
    agent = agents(
        relay, "forward", "--service", f"web={web.port}", "--service", f"api={api.port}",
        "--service", f"ssh={ssh.port}:tcp", "--json",
    )
    lines = json_lines(agent, 3)
    by_service = {line["service"]: line for line in lines}
    assert set(by_service) == {"web", "api", "ssh"}
    assert len({line["tunnel_id"] for line in lines}) == 1
    tunnel_id = lines[0]["tunnel_id"]

    for name in ("web", "api"):
        line = by_service[name]
        assert line["hostname"] == f"{name}-{tunnel_id}.{DOMAIN}"
        assert line["url"] == f"https://{name}-{tunnel_id}.{DOMAIN}:{relay.tls_port}"
        with tls_visit(relay, line["hostname"]) as s:
            assert recv_exactly(s, 4) == f"{name}:".encode()
            assert_echo(s, f"hello {name}\n".encode())
    # DNS names are case-insensitive (RFC 4343): an upper-case SNI reaches the same service.
    with tls_visit(relay, by_service["api"]["hostname"].upper()) as s:
        assert recv_exactly(s, 4) == b"api:"

    ssh_line = by_service["ssh"]
    host, port = ssh_line["tcp_socket"]
    assert ssh_line["url"] == f"tcp://{host}:{port}"
    result = subprocess.run(
        ["nc", "-N", "127.0.0.1", str(port)], input=b"over nc\n", capture_output=True, timeout=15
    )
    assert result.stdout == b"ssh:over nc\n", result

    # The bare id is not a name of this tunnel: only its services' names are.
    assert_unrecognized_name(relay, f"{tunnel_id}.{DOMAIN}")


@pytest.mark.parametrize("name", ["Web!", "123", "a" * 21, "web-1"])
def test_bad_service_name_is_a_cli_error(relay, name):
    """A service name that is not 1-20 of [a-z0-9], or is all digits, is refused by the CLI before it connects."""
    agent = AgentProcess(relay, "forward", "--service", f"{name}=8000")
    code = agent.wait(15)
    assert code == 2, (code, agent.stderr_text())
    assert "bad service name" in agent.stderr_text()
    assert agent.stdout.all == []


# -- 5. expose -------------------------------------------------------------------------------


def test_expose_ports_names_each_port(relay, agents, servers):
    """`expose --ports P1,P2` gives https://P-<id> per listed port, and an unlisted port name gets unrecognized_name."""
    first = servers(TaggedEchoServer(b"one:"))
    second = servers(TaggedEchoServer(b"two:"))
    agent = agents(relay, "expose", "--ports", f"{first.port},{second.port}", "--json")
    lines = json_lines(agent, 2)
    tunnel_id = lines[0]["tunnel_id"]
    assert [line["hostname"] for line in lines] == [
        f"{first.port}-{tunnel_id}.{DOMAIN}", f"{second.port}-{tunnel_id}.{DOMAIN}",
    ]
    for server, tag in ((first, b"one:"), (second, b"two:")):
        with tls_visit(relay, f"{server.port}-{tunnel_id}.{DOMAIN}") as s:
            assert recv_exactly(s, 4) == tag
            assert_echo(s, b"exposed\n")
    unlisted = next(p for p in (9999, 9998) if p not in (first.port, second.port))
    assert_unrecognized_name(relay, f"{unlisted}-{tunnel_id}.{DOMAIN}")


# -- 6. allowlist --------------------------------------------------------------------------------


def _visit_tcp(port: int) -> bytes:
    """Send a line over a plain TCP visit and return what came back until EOF."""
    with connect(port) as s:
        try:
            s.sendall(b"allowed?\n")
            s.shutdown(socket.SHUT_WR)
            return recv_all(s, 5)
        except OSError:  # reset, or ENOTCONN from shutdown() once the relay has reset
            return b""


def _visit_tls(relay, hostname: str) -> bytes:
    try:
        with tls_visit(relay, hostname) as s:
            s.sendall(b"allowed?\n")
            return recv_exactly(s, 9, timeout=5)
    except OSError:  # ssl.SSLError, reset, broken pipe
        return b""


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_allowlist_closes_and_counts_other_visitors(relay, echo, agents, kind):
    """With --allow, a visitor outside every listed network is closed and counted in denied_total; one inside reaches the service."""
    extra = ["--unencrypted"] if kind == "tcp" else []
    denied_agent = agents(relay, "forward", str(echo.port), "--allow", "10.0.0.0/8", "--json", *extra)
    allowed_agent = agents(
        relay, "forward", str(echo.port), "--allow", "10.0.0.0/8", "--allow", "127.0.0.0/8", "--json", *extra
    )
    (denied,) = json_lines(denied_agent, 1)
    (allowed,) = json_lines(allowed_agent, 1)

    def visit(line):
        return _visit_tcp(line["tcp_socket"][1]) if kind == "tcp" else _visit_tls(relay, line["hostname"])

    accepted = echo.accepted
    assert visit(denied) == b""
    assert visit(denied) == b""
    assert visit(allowed) == b"allowed?\n"
    info = tunnel_info(relay, denied["tunnel_id"])
    assert info["allow"] == ["10.0.0.0/8"]
    assert info["denied_total"] == 2 and info["streams_total"] == 0
    assert tunnel_info(relay, allowed["tunnel_id"])["denied_total"] == 0
    assert echo.accepted == accepted + 1  # denied visitors never reached the service


# -- 7. mutual TLS -----------------------------------------------------------------------------------


def test_client_ca_requires_a_visitor_certificate(relay, echo, agents, tmp_path):
    """With --client-ca, only visitors presenting a certificate from that CA complete the handshake and reach the service."""
    ca_cert, ca_key = make_ca("visitors CA")
    ca_path, _ = write_pem(tmp_path, "visitors-ca", ca_cert, ca_key)
    good = write_pem(tmp_path, "alice", *make_leaf(ca_cert, ca_key, "alice", usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    other_ca = make_ca("someone else's CA")
    stranger = write_pem(tmp_path, "mallory", *make_leaf(*other_ca, "mallory", usage=ExtendedKeyUsageOID.CLIENT_AUTH))

    agent = agents(relay, "forward", str(echo.port), "--client-ca", str(ca_path), "--json")
    (info,) = json_lines(agent, 1)
    hostname = info["hostname"]
    assert tunnel_info(relay, info["tunnel_id"])["client_ca"] is True

    def refused(context) -> None:
        # TLS 1.3: the client finishes first; the relay's alert arrives on the first read.
        try:
            with tls_visit(relay, hostname, context) as s:
                s.sendall(b"let me in\n")
                s.settimeout(5)
                data = s.recv(100)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return
        assert data == b"", data

    refused(visitor_context(relay))
    refused(visitor_context(relay, cert=stranger[0], key=stranger[1]))
    time.sleep(0.2)
    assert echo.accepted == 0, "a visitor without a valid certificate reached the service"

    with tls_visit(relay, hostname, visitor_context(relay, cert=good[0], key=good[1])) as s:
        assert_echo(s, b"alice here\n")
    assert echo.accepted == 1


# -- 8. PROXY protocol -----------------------------------------------------------------------


@pytest.mark.parametrize("version, parser", [("v1", V1Parser), ("v2", V2Parser)])
def test_proxy_protocol_carries_the_visitor_address(relay, agents, servers, version, parser):
    """--proxy-protocol makes the agent send the visitor's own address and port, then its bytes, on TCP and encrypted tunnels."""
    service = servers(ProxyHeaderEchoServer(parser))
    agent = agents(
        relay, "forward", str(service.port), "--service", f"raw={service.port}:tcp",
        "--proxy-protocol", version, "--json",
    )
    tls_line, tcp_line = json_lines(agent, 2)
    assert tcp_line["service"] == "raw" and "service" not in tls_line

    visits = []
    with tls_visit(relay, tls_line["hostname"]) as s:
        assert_echo(s, b"encrypted\n")
        visits.append((s.getsockname(), relay.tls_port))
    tcp_port = tcp_line["tcp_socket"][1]
    with connect(tcp_port) as s:
        assert_echo(s, b"plain\n")
        visits.append((s.getsockname(), tcp_port))

    for visitor, relay_port in visits:
        header = service.headers.get(timeout=5)
        assert not isinstance(header, Exception), header
        assert (header.source.host, header.source.port) == visitor
        assert (header.destination.host, header.destination.port) == ("127.0.0.1", relay_port)


# -- 9. agent config file -------------------------------------------------------------------


def test_agent_toml_services_work_like_flags(relay, agents, servers, tmp_path):
    """A [services] table in the agent's TOML file opens the same named services as --service flags."""
    web = servers(TaggedEchoServer(b"web:"))
    ssh = servers(TaggedEchoServer(b"ssh:"))
    config = tmp_path / "agent.toml"
    config.write_text(
        "json = true\n"
        'allow = ["127.0.0.0/8"]\n'
        "[services]\n"
        f'web = "{web.port}"\n'
        f'ssh = "127.0.0.1:{ssh.port}:tcp"\n'
    )
    agent = agents(relay, "forward", "--config", str(config))
    lines = json_lines(agent, 2)  # json = true in the file
    by_service = {line["service"]: line for line in lines}
    tunnel_id = lines[0]["tunnel_id"]
    assert by_service["web"]["hostname"] == f"web-{tunnel_id}.{DOMAIN}"
    assert by_service["ssh"]["local"] == f"127.0.0.1:{ssh.port}"
    with tls_visit(relay, by_service["web"]["hostname"]) as s:
        assert recv_exactly(s, 4) == b"web:"
        assert_echo(s, b"from toml\n")
    with connect(by_service["ssh"]["tcp_socket"][1]) as s:
        assert recv_exactly(s, 4) == b"ssh:"
        assert_echo(s, b"from toml\n")
    assert tunnel_info(relay, tunnel_id)["allow"] == ["127.0.0.0/8"]


# -- 10. certificate reload -----------------------------------------------------------------


class CertRelay:
    """A relay serving --cert/--key files this test issues from the relay's own dev CA."""

    NAMES = [f"*.{DOMAIN}", DOMAIN]

    def __init__(self, workdir):
        # Only SIGHUP can explain a reload within the hour.
        self.relay = RelayProcess(workdir, "--cert-check-seconds=3600")
        self.state = relay_state.load_or_create(
            self.relay.state_dir, agent_address=f"localhost:{self.relay.agent_port}"
        )
        self.cert_path, self.key_path = workdir / "wildcard.pem", workdir / "wildcard-key.pem"
        self.issue()
        self.relay.extra += [f"--cert={self.cert_path}", f"--key={self.key_path}"]
        self.relay.start()

    def issue(self) -> int:
        """Overwrite the files with a newly issued certificate; returns its serial."""
        relay_state.issue_certificate(self.state, self.NAMES, self.cert_path, self.key_path)
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes()).serial_number

    def served_serial(self, hostname: str, context: ssl.SSLContext | None = None) -> int:
        """The serial a new visitor of hostname is served (after an echo through the tunnel)."""
        with tls_visit(self.relay, hostname, context) as s:
            der = s.getpeercert(binary_form=True)
            assert_echo(s, b"serial?\n")
        return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
def cert_relay(tmp_path):
    r = CertRelay(tmp_path / "relay")
    yield r
    r.relay.stop()
    assert "Traceback" not in r.relay.log(), r.relay.log()


def test_sighup_reloads_the_relay_certificate(cert_relay, echo, agents):
    """After --cert/--key are replaced and the relay gets SIGHUP, new visitors get the new certificate without a restart."""
    agent = agents(cert_relay.relay, "forward", str(echo.port), "--json")
    hostname = json_lines(agent, 1)[0]["hostname"]
    old = x509.load_pem_x509_certificate(cert_relay.cert_path.read_bytes()).serial_number
    assert cert_relay.served_serial(hostname) == old
    new = cert_relay.issue()
    assert new != old
    assert cert_relay.served_serial(hostname) == old  # nothing reloads by itself within the hour
    cert_relay.relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: cert_relay.served_serial(hostname) == new, 10, "the new certificate after SIGHUP")
    assert cert_relay.relay.proc.poll() is None


def test_bad_replacement_keeps_the_old_certificate(cert_relay, echo, agents):
    """A replaced --key that does not match --cert is refused at SIGHUP, and every tunnel, old or new, keeps being served the last good certificate."""
    relay = cert_relay.relay
    agent = agents(relay, "forward", str(echo.port), "--json")
    hostname = json_lines(agent, 1)[0]["hostname"]
    good = cert_relay.served_serial(hostname)

    cert_relay.key_path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the old TLS certificate" in relay.log(), 10, "the relay to refuse the new key")
    assert cert_relay.served_serial(hostname) == good

    # A tunnel with its own ALPN list needs a TLS context the relay had not built before.
    h2_agent = agents(relay, "forward", str(echo.port), "--alpn", "h2", "--json")
    h2_hostname = json_lines(h2_agent, 1)[0]["hostname"]
    context = visitor_context(relay)
    context.set_alpn_protocols(["h2"])
    assert cert_relay.served_serial(h2_hostname, context) == good
    assert relay.proc.poll() is None
