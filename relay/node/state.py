"""The relay's state folder: a development CA, the relay's TLS certificate, the
hashes of the agent tokens it accepts, and client.env for the operator.

The folder (default ``./relay-state``) is created on the first start and reused
on every later one::

    ca.pem          the development CA certificate (PEM); agents trust this
    ca-key.pem      its private key (0600); signs relay certificates
    relay.pem       the relay's certificate chain: leaf, then CA (PEM)
    relay-key.pem   the leaf's private key (0600)
    agent-tokens    SHA-256 hex digests of accepted agent tokens, one a line (0600)
    client.env      TUNNEL_RELAY, TUNNEL_TOKEN and, when agents need the dev CA,
                    TUNNEL_CA, for the operator (0600)
    reservations.json  what reclaims and stable names need across restarts (0600;
                    relay/node/reservations.py writes it, not this module)

Rule 1: the relay never keeps a plaintext token. It stores and compares
SHA-256 digests; the plaintext exists only in ``client.env``, which is written
for the operator to hand to an agent, and in ``RelayState.new_token`` (hidden
from ``repr``) for the one call that created it. So a restart without
``client.env`` cannot recover the token: it reports ``new_token=None`` and the
caller tells the operator to rotate.

Rule 2: what agents already trust survives restarts. The CA is created once and
never replaced here; only the leaf is reissued, from the same CA, when its
names no longer cover what was asked for, it is about to expire, or it no
longer matches its key or the CA (a crash between two writes leaves that).

Every file is written to a temporary file created with its final mode and
renamed over the target, so a crash leaves the old file or the new one, and a
secret is never readable by others, not even for a moment.

This module is not a PKI: no revocation, no intermediate CAs, no ACME, and no
network at all. It does not log either: the caller logs, and the token must
never reach a log. It does not guard against two relays starting on the same
folder at once.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.node.tenants import DEV_GRANT, Grant

__all__ = [
    "DEFAULT_STATE_DIR",
    "RelayState",
    "check_token",
    "hash_token",
    "issue_certificate",
    "load_or_create",
]

# Relative on purpose: the operator finds it next to where the relay was started.
DEFAULT_STATE_DIR = Path("relay-state")

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_FILE = "relay.pem"
KEY_FILE = "relay-key.pem"
TOKENS_FILE = "agent-tokens"
CLIENT_ENV_FILE = "client.env"

# Only the relay's user may list the folder or read its secrets.
STATE_DIR_MODE = 0o700
SECRET_FILE_MODE = 0o600
# Certificates are public; agents and operators copy ca.pem.
PUBLIC_FILE_MODE = 0o644

CA_COMMON_NAME = "tunnel-relay development CA"
# Used when no hostname fits the 64-character commonName limit (RFC 5280
# appendix A, ub-common-name); clients match the SAN, never the CN.
LEAF_FALLBACK_COMMON_NAME = "tunnel-relay"
# Long enough that agents configured with ca.pem never need a new one in a
# development setup's lifetime.
CA_VALIDITY = timedelta(days=3650)
# About two years; reissued automatically, so it need not be long.
LEAF_VALIDITY = timedelta(days=730)
# Certificates start an hour in the past so an agent whose clock is a little
# behind the relay's does not reject a freshly issued certificate.
BACKDATE = timedelta(hours=1)
# Reissue the leaf this long before it expires, so a relay restarted now and
# then never serves an expired certificate.
RENEW_BEFORE_EXPIRY = timedelta(days=30)
# secrets.token_urlsafe(32): 256 bits of entropy, 43 URL-safe characters.
TOKEN_BYTES = 32
# A SHA-256 digest in hex, as stored in agent-tokens.
TOKEN_HASH_HEX_CHARS = 64

CLIENT_ENV_KEYS = ("TUNNEL_RELAY", "TUNNEL_TOKEN", "TUNNEL_CA")
# TUNNEL_CA is absent when the agent port presents a publicly trusted
# certificate: an agent without it uses the system trust store.
CLIENT_ENV_REQUIRED_KEYS = ("TUNNEL_RELAY", "TUNNEL_TOKEN")


@dataclass(frozen=True)
class RelayState:
    """What ``load_or_create`` found or made in the state folder."""

    state_dir: Path
    ca_cert_path: Path
    cert_path: Path
    key_path: Path
    token_hashes: tuple[bytes, ...]
    client_env_path: Path
    created: bool
    # repr=False: a logged RelayState must not carry the token (Rule 1).
    new_token: str | None = field(repr=False)


def new_token() -> str:
    """A new secret for an agent or the admin: 256 random bits, URL-safe.

    Never starting with "-": one token in 64 did, and `tunnel-client --token
    -xyz` (like any command line) takes it for an option."""
    while True:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        if not token.startswith("-"):
            return token


def hash_token(token: str) -> bytes:
    """Return the SHA-256 digest of ``token`` (UTF-8), as stored for it."""
    if not isinstance(token, str):
        raise TypeError(f"a token is a str, not {type(token).__name__}")
    # surrogatepass: a lone surrogate ("\udc80") is valid JSON text but not
    # UTF-8; a peer's token must hash (and fail to match), never raise.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def check_token(state: RelayState, presented: str) -> Grant | None:
    """The grant of ``presented`` if it is one of the accepted agent tokens
    (the development tenant's: relay/node/tenants.py), else None.

    The digest is compared with every stored hash, without stopping at a
    match, so the time taken says nothing about which hash matched.
    """
    if not isinstance(presented, str) or not presented:
        return None
    digest = hash_token(presented)
    matched = False
    for stored in state.token_hashes:
        if hmac.compare_digest(digest, stored):
            matched = True
    return DEV_GRANT if matched else None


def load_or_create(
    state_dir: str | Path,
    *,
    agent_address: str,
    hostnames: Iterable[str] = ("localhost",),
    ip_addresses: Iterable[str] = ("127.0.0.1", "::1"),
    rotate_token: bool = False,
    agents_need_ca: bool = True,
    now: datetime | None = None,
) -> RelayState:
    """Open the state folder, creating or repairing what is missing.

    ``agent_address`` is what agents dial (``TUNNEL_RELAY`` in client.env).
    The leaf certificate must name every one of ``hostnames`` and
    ``ip_addresses``; it is reissued from the same CA if it does not.
    ``rotate_token`` replaces every accepted token with one new token.
    ``agents_need_ca=False`` (the agent port presents a certificate agents
    trust through their system store) leaves TUNNEL_CA out of client.env.

    Raises ``ValueError`` naming the file when a file in the folder is
    corrupt or when the CA key is gone but the leaf must be reissued.
    """
    now = _utc(now)
    dns_names = _dns_names(hostnames)
    ips = _ip_addresses(ip_addresses)
    if not dns_names and not ips:
        raise ValueError("the relay certificate needs at least one hostname or IP address")
    _check_env_value("agent_address", agent_address)

    state_path = Path(state_dir).expanduser().resolve()
    _check_env_value("state_dir", str(state_path))
    _ensure_state_dir(state_path)

    ca_cert, ca_key, created = _load_or_create_ca(state_path, now)
    _ensure_leaf(state_path, ca_cert, ca_key, dns_names, ips, now)

    ca_cert_path = state_path / CA_CERT_FILE
    client_env_path = state_path / CLIENT_ENV_FILE
    env_ca = ca_cert_path if agents_need_ca else None
    token_hashes, new_token = _load_or_create_token_hashes(state_path, rotate_token)
    if new_token is not None:
        _write_atomic(
            client_env_path,
            _client_env_text(agent_address, new_token, env_ca),
            SECRET_FILE_MODE,
        )
    else:
        _update_client_env(client_env_path, agent_address, env_ca)

    return RelayState(
        state_dir=state_path,
        ca_cert_path=ca_cert_path,
        cert_path=state_path / CERT_FILE,
        key_path=state_path / KEY_FILE,
        token_hashes=token_hashes,
        client_env_path=client_env_path,
        created=created,
        new_token=new_token,
    )


def issue_certificate(
    state: RelayState,
    hostnames: list[str],
    cert_path: str | Path,
    key_path: str | Path,
    *,
    now: datetime | None = None,
    ca_paths: tuple[Path, Path] | None = None,
    client_auth: bool = False,
) -> None:
    """Sign an extra leaf for ``hostnames`` (e.g. ``*.tunnels.localhost``)
    with the state's CA, or the (certificate, key) of ``ca_paths`` (a fleet
    CA); write its chain (leaf, then CA) to ``cert_path`` and its key to
    ``key_path`` (0600). Always issues; never reuses a file.
    """
    now = _utc(now)
    dns_names = _dns_names(hostnames)
    if not dns_names:
        raise ValueError("an extra certificate needs at least one hostname")
    ca_cert_path, ca_key_path = ca_paths or (state.ca_cert_path, state.state_dir / CA_KEY_FILE)
    ca_cert = _load_certificate(Path(ca_cert_path))
    ca_key_path = Path(ca_key_path)
    if not ca_key_path.exists():
        raise ValueError(f"{ca_key_path} is missing: cannot sign a certificate")
    ca_key = _load_private_key(ca_key_path)
    _issue_leaf(ca_cert, ca_key, dns_names, (), now, Path(cert_path), Path(key_path), client_auth)


# -- the CA ------------------------------------------------------------------


def _load_or_create_ca(
    state_path: Path, now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None, bool]:
    """Return (CA certificate, CA key or None if gone, created by this call)."""
    cert_path = state_path / CA_CERT_FILE
    key_path = state_path / CA_KEY_FILE
    have_cert, have_key = cert_path.exists(), key_path.exists()

    if have_key:
        key = _load_private_key(key_path)
    else:
        if have_cert:
            # Agents trust this CA: keep it. The leaf can still be served;
            # _ensure_leaf refuses if it would have to be reissued.
            return _load_ca_certificate(cert_path, now), None, False
        key = ec.generate_private_key(ec.SECP256R1())
        _write_atomic(key_path, _private_key_pem(key), SECRET_FILE_MODE)

    if have_cert:
        cert = _load_ca_certificate(cert_path, now)
        if cert.public_key() != key.public_key():
            raise ValueError(f"{key_path} is not the key of the CA in {cert_path}")
        return cert, key, False

    # A key without its certificate is what a crash between the two writes
    # of the first start leaves: certify the key we have.
    cert = _build_ca_certificate(key, now)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE_MODE)
    return cert, key, True


def _load_ca_certificate(path: Path, now: datetime) -> x509.Certificate:
    cert = _load_certificate(path)
    if _not_valid_after(cert) <= now:
        raise ValueError(
            f"the CA in {path} has expired: move the state folder away to create a new CA"
        )
    return cert


def _build_ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        # path_length=0: this CA signs leaves only.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # RFC 5280 4.2.1.2: a CA certificate carries a subject key identifier.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


# -- the leaf ----------------------------------------------------------------


def _ensure_leaf(
    state_path: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey | None,
    dns_names: tuple[str, ...],
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...],
    now: datetime,
) -> None:
    cert_path = state_path / CERT_FILE
    key_path = state_path / KEY_FILE
    problem = _leaf_problem(cert_path, key_path, ca_cert, dns_names, ips, now)
    if problem is None:
        return
    if ca_key is None:
        raise ValueError(
            f"{cert_path} must be reissued ({problem}) but {state_path / CA_KEY_FILE} is missing"
        )
    _issue_leaf(ca_cert, ca_key, dns_names, ips, now, cert_path, key_path)


def _leaf_problem(
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    dns_names: tuple[str, ...],
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...],
    now: datetime,
) -> str | None:
    """Why the leaf must be reissued, or None if it can be served as is."""
    if not cert_path.exists() or not key_path.exists():
        return "missing"
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The leaf is ours to remake, unlike the CA: no need to stop the relay.
        return "unreadable"
    leaf = chain[0]
    if chain[1:] != [ca_cert]:
        return "chain does not end with the current CA"
    if leaf.public_key() != key.public_key():
        return "key does not match"
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by the current CA"
    if _not_valid_before(leaf) > now:
        return "not valid yet"
    if _not_valid_after(leaf) - now < RENEW_BEFORE_EXPIRY:
        return "expires soon"
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    have_names = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    if not set(dns_names) <= have_names or not set(ips) <= have_ips:
        return "names not covered"
    return None


def _issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    dns_names: tuple[str, ...],
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...],
    now: datetime,
    cert_path: Path,
    key_path: Path,
    client_auth: bool = False,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_leaf_certificate(ca_cert, ca_key, key, dns_names, ips, now, client_auth)
    # Key first: a crash between the writes leaves a certificate that does
    # not match its key, which the next start detects and reissues.
    _write_atomic(key_path, _private_key_pem(key), SECRET_FILE_MODE)
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
        serialization.Encoding.PEM
    )
    _write_atomic(cert_path, chain, PUBLIC_FILE_MODE)


def _build_leaf_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    dns_names: tuple[str, ...],
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...],
    now: datetime,
    client_auth: bool = False,
) -> x509.Certificate:
    # A peer certificate (relay/node/peers.py) serves both ends of a peer link.
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
    common_name = next(
        (name for name in dns_names if len(name) <= 64), LEAF_FALLBACK_COMMON_NAME
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    alt_names += [x509.IPAddress(ip) for ip in ips]
    # A leaf that outlives its CA would fail verification anyway.
    not_after = min(now + LEAF_VALIDITY, _not_valid_after(ca_cert))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # RFC 5280 4.2.1.1; OpenSSL's strict mode and cryptography's verifier want it.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


# -- tokens and client.env ---------------------------------------------------


def _load_or_create_token_hashes(
    state_path: Path, rotate_token: bool
) -> tuple[tuple[bytes, ...], str | None]:
    path = state_path / TOKENS_FILE
    if not rotate_token and path.exists():
        return _read_token_hashes(path), None
    token = new_token()
    digest = hash_token(token)
    # Replaces every stored hash: rotation revokes all earlier tokens.
    _write_atomic(path, (digest.hex() + "\n").encode("ascii"), SECRET_FILE_MODE)
    return (digest,), token


def _read_token_hashes(path: Path) -> tuple[bytes, ...]:
    # Messages never quote a line: an operator may have pasted a plaintext token.
    try:
        text = path.read_bytes().decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is corrupt (not ASCII): it must hold one SHA-256 hex digest a line;"
            " rotate the agent token to rewrite it"
        ) from None
    digests = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if len(line) != TOKEN_HASH_HEX_CHARS or not _is_hex(line):
            raise ValueError(
                f"{path} line {number} is not a SHA-256 hex digest;"
                " rotate the agent token to rewrite the file"
            )
        digests.append(bytes.fromhex(line))
    if not digests:
        raise ValueError(
            f"{path} is empty: no agent token would be accepted;"
            " rotate the agent token to rewrite it"
        )
    return tuple(digests)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def _client_env_text(agent_address: str, token: str, ca_cert_path: Path | None) -> bytes:
    values = (agent_address, token, str(ca_cert_path) if ca_cert_path is not None else None)
    return "".join(
        f"{key}={value}\n" for key, value in zip(CLIENT_ENV_KEYS, values) if value is not None
    ).encode("utf-8")


def _update_client_env(path: Path, agent_address: str, ca_cert_path: Path | None) -> None:
    """Point an existing client.env at ``agent_address`` and ``ca_cert_path``
    (None: no TUNNEL_CA line), keeping its token.

    A missing client.env stays missing: its token cannot be recovered (Rule 1).
    """
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        return
    values = _parse_client_env(path, old)
    new = _client_env_text(agent_address, values["TUNNEL_TOKEN"], ca_cert_path)
    if new != old:
        _write_atomic(path, new, SECRET_FILE_MODE)


def _parse_client_env(path: Path, data: bytes) -> dict[str, str]:
    fix = "rotate the agent token to rewrite it"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8; {fix}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or key not in CLIENT_ENV_KEYS or key in values:
            keys = ", ".join(CLIENT_ENV_KEYS)
            raise ValueError(f"{path} line {number} is not one of {keys}; {fix}")
        values[key] = value
    missing = [key for key in CLIENT_ENV_REQUIRED_KEYS if key not in values]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} line; {fix}")
    return values


# -- small helpers -----------------------------------------------------------


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(timezone.utc)


def _dns_names(hostnames: Iterable[str]) -> tuple[str, ...]:
    # ("localhost") is a str, and iterating it would certify single letters.
    if isinstance(hostnames, (str, bytes)):
        raise TypeError("hostnames must be a sequence of names, not a single string")
    names: list[str] = []
    for name in hostnames:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"not a hostname: {name!r}")
        name = name.lower()
        if name not in names:
            names.append(name)
    return tuple(names)


def _ip_addresses(
    addresses: Iterable[str],
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    if isinstance(addresses, (str, bytes)):
        raise TypeError("ip_addresses must be a sequence of addresses, not a single string")
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if ip not in ips:
            ips.append(ip)
    return tuple(ips)


def _check_env_value(what: str, value: str) -> None:
    # client.env is one KEY=value a line; a newline would forge another line.
    if not isinstance(value, str) or not value or "\n" in value or "\r" in value:
        raise ValueError(f"{what} must be a non-empty single-line string")


def _ensure_state_dir(state_path: Path) -> None:
    try:
        state_path.mkdir(mode=STATE_DIR_MODE, parents=True)
    except FileExistsError:
        if not state_path.is_dir():
            raise NotADirectoryError(f"{state_path} exists and is not a directory") from None
    # mkdir's mode passes through the umask, and a folder made by hand (or by
    # an older release) may be 0755: tighten it on every start.
    if stat.S_IMODE(state_path.stat().st_mode) != STATE_DIR_MODE:
        os.chmod(state_path, STATE_DIR_MODE)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``; the file has ``mode`` from its creation."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never write through a file or symlink someone placed there.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)  # the umask may have narrowed it
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path} is not a PEM certificate: {e}") from None


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an ECDSA private key")
    return key


def _not_valid_before(cert: x509.Certificate) -> datetime:
    try:
        return cert.not_valid_before_utc
    except AttributeError:  # cryptography < 42
        return cert.not_valid_before.replace(tzinfo=timezone.utc)


def _not_valid_after(cert: x509.Certificate) -> datetime:
    try:
        return cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        return cert.not_valid_after.replace(tzinfo=timezone.utc)
