"""Tests for relay.node.state: the state folder, its certificates and agent tokens."""

import dataclasses
import hashlib
import hmac
import ipaddress
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address

from relay.node.state import (
    check_token,
    hash_token,
    issue_certificate,
    load_or_create,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
AGENT_ADDRESS = "relay.example:4433"


def _start(state_dir, **kwargs):
    kwargs.setdefault("agent_address", AGENT_ADDRESS)
    kwargs.setdefault("now", NOW)
    return load_or_create(state_dir, **kwargs)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _chain(path):
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def _san(cert):
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _tls_handshake(cert_path, key_path, ca_path, server_name):
    """Run a TLS handshake in memory; return the client connection once the
    server's chain verified against ca_path."""
    server_ctx = SSL.Context(SSL.TLS_METHOD)
    server_ctx.use_certificate_chain_file(str(cert_path))
    server_ctx.use_privatekey_file(str(key_path))
    server_ctx.check_privatekey()
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.load_verify_locations(str(ca_path))
    client_ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    client.set_tlsext_host_name(server_name.encode("ascii"))
    done = {client: False, server: False}
    for _ in range(10):
        for conn in (client, server):
            if not done[conn]:
                try:
                    conn.do_handshake()
                    done[conn] = True
                except SSL.WantReadError:
                    pass
        for src, dst in ((client, server), (server, client)):
            try:
                dst.bio_write(src.bio_read(65536))
            except SSL.WantReadError:
                pass
        if all(done.values()):
            return client
    raise AssertionError("TLS handshake did not finish")


def test_first_start_creates_files_with_private_modes(tmp_path):
    """The first start creates the folder 0700 and every secret file 0600."""
    state = _start(tmp_path / "relay-state")
    assert state.created is True
    assert isinstance(state.new_token, str) and len(state.new_token) >= 43
    assert state.state_dir == tmp_path / "relay-state"
    assert _mode(state.state_dir) == 0o700
    for path in (
        state.key_path,
        state.client_env_path,
        state.state_dir / "agent-tokens",
        state.state_dir / "ca-key.pem",
    ):
        assert _mode(path) == 0o600, path
    assert state.ca_cert_path == state.state_dir / "ca.pem"
    assert state.cert_path == state.state_dir / "relay.pem"
    assert state.key_path == state.state_dir / "relay-key.pem"
    assert state.client_env_path == state.state_dir / "client.env"
    assert state.token_hashes == (hashlib.sha256(state.new_token.encode()).digest(),)
    assert check_token(state, state.new_token)


def test_agent_tokens_holds_only_the_hex_digest(tmp_path):
    """agent-tokens holds the token's SHA-256 hex digest, one a line."""
    state = _start(tmp_path)
    text = (tmp_path / "agent-tokens").read_text()
    assert text == hashlib.sha256(state.new_token.encode()).hexdigest() + "\n"


def test_client_env_has_exactly_three_lines_with_absolute_ca(tmp_path, monkeypatch):
    """client.env holds exactly TUNNEL_RELAY, TUNNEL_TOKEN and an absolute TUNNEL_CA."""
    monkeypatch.chdir(tmp_path)
    state = _start("relay-state")
    assert state.state_dir.is_absolute()
    lines = state.client_env_path.read_text().splitlines()
    ca_path = tmp_path.resolve() / "relay-state" / "ca.pem"
    assert lines == [
        f"TUNNEL_RELAY={AGENT_ADDRESS}",
        f"TUNNEL_TOKEN={state.new_token}",
        f"TUNNEL_CA={ca_path}",
    ]
    assert Path(lines[2].partition("=")[2]).is_absolute()
    assert state.client_env_path.read_text().endswith("\n")


def test_certificates_have_the_required_profile(tmp_path):
    """The CA is a 10-year CA; the leaf is a CA-signed serverAuth P-256 cert with the SANs."""
    state = _start(tmp_path)
    (ca,) = _chain(state.ca_cert_path)
    leaf, chained_ca = _chain(state.cert_path)
    assert chained_ca == ca

    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "tunnel-relay development CA"
    )
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= timedelta(days=3650)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"

    leaf.verify_directly_issued_by(ca)
    assert leaf.not_valid_before_utc == NOW - timedelta(hours=1)
    assert timedelta(days=700) < leaf.not_valid_after_utc - NOW <= timedelta(days=740)
    assert leaf.public_key().curve.name == "secp256r1"
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = _san(leaf)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_leaf_passes_cryptography_server_verification(tmp_path):
    """cryptography's RFC 5280 verifier accepts the leaf for each name and IP against the CA."""
    state = _start(tmp_path)
    (ca,) = _chain(state.ca_cert_path)
    leaf, _ = _chain(state.cert_path)
    builder = PolicyBuilder().store(Store([ca])).time(NOW)
    for subject in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ):
        builder.build_server_verifier(subject).verify(leaf, [])
    with pytest.raises(Exception):
        builder.build_server_verifier(x509.DNSName("example.com")).verify(leaf, [])


def test_leaf_passes_openssl_store_verification(tmp_path):
    """An OpenSSL X509Store holding only ca.pem verifies the leaf."""
    state = _start(tmp_path)
    store = crypto.X509Store()
    store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, state.ca_cert_path.read_bytes()))
    leaf = crypto.load_certificate(crypto.FILETYPE_PEM, state.cert_path.read_bytes())
    crypto.X509StoreContext(store, leaf).verify_certificate()

    other = _start(tmp_path / "other")
    stranger = crypto.load_certificate(crypto.FILETYPE_PEM, other.cert_path.read_bytes())
    with pytest.raises(crypto.X509StoreContextError):
        crypto.X509StoreContext(store, stranger).verify_certificate()


def test_tls_handshake_and_service_identity(tmp_path):
    """A pyOpenSSL client trusting ca.pem completes a handshake and service_identity
    accepts localhost, 127.0.0.1 and ::1 but not other names."""
    state = _start(tmp_path)
    client = _tls_handshake(state.cert_path, state.key_path, state.ca_cert_path, "localhost")
    verify_hostname(client, "localhost")
    verify_ip_address(client, "127.0.0.1")
    verify_ip_address(client, "::1")
    with pytest.raises(VerificationError):
        verify_hostname(client, "example.com")
    with pytest.raises(VerificationError):
        verify_ip_address(client, "10.0.0.1")


def test_second_start_reuses_everything(tmp_path):
    """A second start reuses CA, certificate, key, token hashes and client.env unchanged."""
    first = _start(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = _start(tmp_path, now=NOW + timedelta(days=10))
    assert second.created is False
    assert second.new_token is None
    assert second.token_hashes == first.token_hashes
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert check_token(second, first.new_token)


def test_rotate_token_replaces_all_hashes(tmp_path):
    """rotate_token gives a new token, refuses every old one and rewrites client.env."""
    first = _start(tmp_path)
    ca_bytes = first.ca_cert_path.read_bytes()
    extra = dataclasses.replace(first, token_hashes=first.token_hashes + (hash_token("x"),))
    assert check_token(extra, "x")

    rotated = _start(tmp_path, rotate_token=True)
    assert rotated.new_token and rotated.new_token != first.new_token
    assert rotated.created is False
    assert rotated.token_hashes == (hash_token(rotated.new_token),)
    assert check_token(rotated, rotated.new_token)
    assert not check_token(rotated, first.new_token)
    assert f"TUNNEL_TOKEN={rotated.new_token}\n" in rotated.client_env_path.read_text()
    assert _mode(rotated.client_env_path) == 0o600
    assert rotated.ca_cert_path.read_bytes() == ca_bytes

    again = _start(tmp_path)
    assert again.new_token is None
    assert check_token(again, rotated.new_token)
    assert not check_token(again, first.new_token)


def test_check_token_refuses_wrong_empty_and_non_str(tmp_path):
    """check_token accepts the token and refuses others, the empty string and non-str values."""
    state = _start(tmp_path)
    assert check_token(state, state.new_token) is not None
    assert check_token(state, state.new_token + "x") is None
    assert check_token(state, "") is None
    for value in (None, state.new_token.encode(), 42, [state.new_token]):
        assert check_token(state, value) is None


def test_check_token_compares_every_hash(tmp_path, monkeypatch):
    """check_token compares against every stored hash even after a match."""
    state = _start(tmp_path)
    state = dataclasses.replace(
        state, token_hashes=state.token_hashes + (hash_token("b"), hash_token("c"))
    )
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert check_token(state, state.new_token)
    assert len(calls) == 3
    assert check_token(state, "c")


def test_missing_client_env_does_not_invent_a_token(tmp_path):
    """Without client.env a restart returns new_token None and the old token stays valid."""
    first = _start(tmp_path)
    first.client_env_path.unlink()
    second = _start(tmp_path)
    assert second.new_token is None
    assert not second.client_env_path.exists()
    assert second.token_hashes == first.token_hashes
    assert check_token(second, first.new_token)


def test_changed_agent_address_rewrites_only_relay_line(tmp_path):
    """A new agent_address rewrites TUNNEL_RELAY and keeps the token line as is."""
    first = _start(tmp_path)
    old_lines = first.client_env_path.read_text().splitlines()
    second = _start(tmp_path, agent_address="relay.other:443")
    lines = second.client_env_path.read_text().splitlines()
    assert second.new_token is None
    assert lines == ["TUNNEL_RELAY=relay.other:443", old_lines[1], old_lines[2]]
    assert _mode(second.client_env_path) == 0o600


def test_changed_hostnames_reissue_leaf_from_same_ca(tmp_path):
    """Names the leaf does not cover make a new leaf signed by the unchanged CA."""
    first = _start(tmp_path)
    ca_bytes = first.ca_cert_path.read_bytes()
    leaf_bytes = first.cert_path.read_bytes()

    second = _start(
        tmp_path, hostnames=("localhost", "relay.example"), ip_addresses=("192.0.2.7",)
    )
    assert second.created is False
    assert second.ca_cert_path.read_bytes() == ca_bytes
    assert second.cert_path.read_bytes() != leaf_bytes
    assert check_token(second, first.new_token)
    (ca,) = _chain(second.ca_cert_path)
    leaf, _ = _chain(second.cert_path)
    leaf.verify_directly_issued_by(ca)
    assert _san(leaf).get_values_for_type(x509.DNSName) == ["localhost", "relay.example"]
    assert _san(leaf).get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    assert _mode(second.key_path) == 0o600
    client = _tls_handshake(
        second.cert_path, second.key_path, second.ca_cert_path, "relay.example"
    )
    verify_hostname(client, "relay.example")

    # A subset of what the leaf names is covered: no reissue.
    reissued = second.cert_path.read_bytes()
    _start(tmp_path, hostnames=("relay.example",), ip_addresses=())
    assert second.cert_path.read_bytes() == reissued


def test_leaf_near_expiry_is_reissued(tmp_path):
    """A leaf within 30 days of expiry is reissued; one further from it is kept."""
    first = _start(tmp_path)
    leaf_bytes = first.cert_path.read_bytes()
    _start(tmp_path, now=NOW + timedelta(days=600))
    assert first.cert_path.read_bytes() == leaf_bytes

    later = NOW + timedelta(days=710)
    _start(tmp_path, now=later)
    leaf, _ = _chain(first.cert_path)
    assert leaf.not_valid_before_utc == later - timedelta(hours=1)
    assert _chain(first.cert_path)[1] == _chain(first.ca_cert_path)[0]


def test_leaf_with_mismatched_key_is_reissued(tmp_path):
    """A relay key that does not match the leaf (a crash between writes) triggers a reissue."""
    first = _start(tmp_path)
    other = _start(tmp_path / "other")
    first.key_path.write_bytes(other.key_path.read_bytes())
    _start(tmp_path)
    _tls_handshake(first.cert_path, first.key_path, first.ca_cert_path, "localhost")


def test_token_plaintext_only_in_client_env(tmp_path):
    """The plaintext token appears in no file of the state folder but client.env."""
    state = _start(tmp_path)
    rotated = _start(tmp_path, rotate_token=True)
    _start(tmp_path, agent_address="elsewhere:1")
    for token in (state.new_token, rotated.new_token):
        holders = sorted(p.name for p in tmp_path.rglob("*") if token.encode() in p.read_bytes())
        expected = ["client.env"] if token == rotated.new_token else []
        assert holders == expected
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_repr_does_not_show_the_token(tmp_path):
    """repr(RelayState) leaves the plaintext token out, so logging it is safe."""
    state = _start(tmp_path)
    assert state.new_token not in repr(state)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"not-a-digest\n", b"\xff\xfe"])
def test_corrupt_agent_tokens_raise_value_error_naming_file(tmp_path, content):
    """An empty or corrupt agent-tokens file raises ValueError naming the file."""
    _start(tmp_path)
    path = tmp_path / "agent-tokens"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="agent-tokens") as info:
        _start(tmp_path)
    assert str(path) in str(info.value)


def test_corrupt_agent_tokens_message_does_not_quote_the_line(tmp_path):
    """A bad agent-tokens line is not quoted in the error: it may be a plaintext token."""
    state = _start(tmp_path)
    (tmp_path / "agent-tokens").write_text(state.new_token + "\n")
    with pytest.raises(ValueError) as info:
        _start(tmp_path)
    assert state.new_token not in str(info.value)


def test_issue_certificate_signs_wildcard_with_same_ca(tmp_path):
    """issue_certificate signs an extra wildcard leaf with the state's CA."""
    state = _start(tmp_path)
    ca_bytes = state.ca_cert_path.read_bytes()
    cert_path, key_path = tmp_path / "wild.pem", tmp_path / "wild-key.pem"
    issue_certificate(state, ["*.tunnels.localhost"], cert_path, key_path, now=NOW)
    assert state.ca_cert_path.read_bytes() == ca_bytes
    assert _mode(key_path) == 0o600
    leaf, chained_ca = _chain(cert_path)
    (ca,) = _chain(state.ca_cert_path)
    assert chained_ca == ca
    leaf.verify_directly_issued_by(ca)
    assert _san(leaf).get_values_for_type(x509.DNSName) == ["*.tunnels.localhost"]
    client = _tls_handshake(cert_path, key_path, state.ca_cert_path, "web.tunnels.localhost")
    verify_hostname(client, "web.tunnels.localhost")
    with pytest.raises(VerificationError):
        verify_hostname(client, "tunnels.localhost")


def test_hostnames_must_be_a_sequence_not_a_string(tmp_path):
    """A single string for hostnames is refused rather than certified letter by letter."""
    with pytest.raises(TypeError):
        _start(tmp_path, hostnames="localhost")


def test_agent_address_with_newline_is_refused(tmp_path):
    """An agent_address containing a newline is refused so client.env keeps three lines."""
    with pytest.raises(ValueError):
        _start(tmp_path, agent_address="a:1\nTUNNEL_TOKEN=forged")
    assert not (tmp_path / "client.env").exists()


@pytest.mark.parametrize("presented", ["\udc80", "tok\ud800en", "\udfff" * 100])
def test_a_token_with_lone_surrogates_is_refused_not_an_exception(tmp_path, presented):
    """A lone surrogate is valid JSON text but not UTF-8: the token check says no, it never raises."""
    state = _start(tmp_path / "state")
    assert check_token(state, presented) is None


def test_a_state_folder_made_with_another_mode_is_tightened_on_start(tmp_path):
    """A state folder that already exists as 0755 is 0700 after the relay starts."""
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    _start(folder)
    assert _mode(folder) == 0o700
    os.chmod(folder, 0o755)
    _start(folder)  # a second start, with the files already there
    assert _mode(folder) == 0o700


def test_new_tokens_never_start_with_a_dash(monkeypatch):
    """A token starting with "-" reads as an option on a command line
    (`tunnel-client --token -abc`): new_token draws again."""
    from relay.node import state as relay_state

    draws = iter(["-starts-with-a-dash", "_fine"])
    monkeypatch.setattr(relay_state.secrets, "token_urlsafe", lambda n: next(draws))
    assert relay_state.new_token() == "_fine"
