"""The control protocol: CONTROL messages on stream 0, used by both ends.

The one home of the op names, the request error codes and the typed errors
they map to (with the CLI's exit codes), and the encoding and validation of
every request and reply (docs/protocol.md, "Control messages"). Stdlib only,
sans-IO like the rest of `relay.mux`: it turns dicts into checked values and
back, and never touches a link.

Rule 1: a request that fails validation raises a `TunnelRequestError` whose
`code` goes back to the agent in the error reply; it never closes the link.
Rule 2: an envelope without an integer `id` is a protocol violation
(`ControlEnvelopeError`, a `MuxProtocolError`): there is nobody to reply to.
Rule 3: the agent maps an error reply back to the same exception class the
relay raised (`error_from_reply`), so the Python API and the CLI see one
family of errors with one set of exit codes.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
import ssl
from dataclasses import dataclass, field

from relay.mux.errors import MuxProtocolError

# Nebius' rule for service names; all-digit names are Runloop-style port names.
SERVICE_NAME = re.compile(r"[a-z0-9]{1,20}")
MAX_SERVICES = 32
MAX_ALLOW_ENTRIES = 64
MAX_ALPN_ENTRIES = 8
MAX_CLIENT_CA_BYTES = 64 * 1024
MAX_TUNNEL_NAME_CHARS = 200
# A stable name is one DNS label (RFC 1035 2.3.1: letters, digits, inner
# hyphens), lowercase, and short enough that `<service>-<name>-<tenant>` can
# still fit a label's 63 characters. No "--": RFC 5891 4.2.3.1 reserves it
# at positions 3-4 (xn--), and it would make `<name>-<tenant>` ambiguous.
STABLE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
MAX_STABLE_NAME_CHARS = 32
# Request ids are the agent's counter; JSON allows any size, we do not.
MAX_REQUEST_ID = 2**53
KINDS = ("tcp", "tls")
TLS_MODES = ("terminate", "passthrough")
DEFAULT_ALPN = ("http/1.1",)


class Op(str, enum.Enum):
    """The `op` of a request (agent -> relay)."""

    OPEN_TUNNEL = "open_tunnel"
    CLOSE_TUNNEL = "close_tunnel"


class RequestErrorCode(str, enum.Enum):
    """The `error.code` strings of an error reply."""

    BAD_REQUEST = "bad_request"
    BAD_SERVICE_NAME = "bad_service_name"
    UNSUPPORTED_KIND = "unsupported_kind"
    BAD_ALPN = "bad_alpn"
    BAD_ALLOW = "bad_allow"
    BAD_CLIENT_CA = "bad_client_ca"
    NO_FREE_PORT = "no_free_port"
    LINK_CLOSED = "link_closed"
    UNKNOWN_TUNNEL = "unknown_tunnel"
    RECLAIM_FAILED = "reclaim_failed"
    LIMIT_EXCEEDED = "limit_exceeded"
    RELAY_OVERLOADED = "relay_overloaded"
    BAD_NAME = "bad_name"
    NAME_TAKEN = "name_taken"
    NAME_NOT_ALLOWED = "name_not_allowed"
    NAME_IN_USE = "name_in_use"
    RELAY_DRAINING = "relay_draining"


# -- the error family both ends raise ------------------------------------------


class TunnelError(Exception):
    """Base of every error a tunnel-client user sees; `exit_code` for the CLI."""

    exit_code = 1


class ConfigurationError(TunnelError):
    """Missing or malformed settings or request (relay address, token, CA, targets)."""

    exit_code = 2


class TunnelRequestError(TunnelError):
    """A control request the relay refuses; `code` travels in the error reply."""

    exit_code = 6
    default_code = RequestErrorCode.BAD_REQUEST

    def __init__(self, code: RequestErrorCode | str | None, message: str):
        super().__init__(message)
        self.code = _code_or_string(code if code is not None else self.default_code)


class NoPortsAvailableError(TunnelRequestError):
    """The relay's port range is used up (or in quarantine)."""

    default_code = RequestErrorCode.NO_FREE_PORT


class BadServiceNameError(TunnelRequestError, ConfigurationError):
    """A service name the relay (or the client, before asking) refuses."""

    exit_code = 2
    default_code = RequestErrorCode.BAD_SERVICE_NAME


class UnknownTunnelError(TunnelRequestError):
    """close_tunnel named a tunnel this link does not hold."""

    default_code = RequestErrorCode.UNKNOWN_TUNNEL


class ReclaimFailedError(TunnelRequestError):
    """The tunnel to reclaim expired, or the secret does not match."""

    default_code = RequestErrorCode.RECLAIM_FAILED


class LimitExceededError(TunnelRequestError):
    """A limit of this session (or, later, of its tenant) is reached; the
    message names the limit and its value (docs/security.md lists them)."""

    default_code = RequestErrorCode.LIMIT_EXCEEDED

    def __init__(self, code: RequestErrorCode | str | None, message: str, limit: str = ""):
        super().__init__(code, message)
        self.limit = limit  # which limit, for the metrics (the wire carries only the message)


class RelayOverloadedError(TunnelRequestError):
    """The relay itself is out of a resource (file descriptors): try later or elsewhere."""

    default_code = RequestErrorCode.RELAY_OVERLOADED


class BadNameError(TunnelRequestError, ConfigurationError):
    """A stable name that is not one lowercase DNS label of 1-32 characters."""

    exit_code = 2
    default_code = RequestErrorCode.BAD_NAME


class NameUnavailableError(TunnelRequestError):
    """A stable name this agent cannot have (the subclasses say why); exit 9,
    so a script can tell it from a full port range."""

    exit_code = 9


class NameTakenError(NameUnavailableError):
    """The stable name belongs to another tenant."""

    default_code = RequestErrorCode.NAME_TAKEN


class NameNotAllowedError(NameUnavailableError):
    """The token may not claim this stable name (its grant lists others)."""

    default_code = RequestErrorCode.NAME_NOT_ALLOWED


class NameInUseError(NameUnavailableError):
    """A live agent of the same tenant serves this name, and this request
    does not hold its reclaim secret (a duplicate, not a reconnect)."""

    default_code = RequestErrorCode.NAME_IN_USE


class RelayDrainingError(TunnelRequestError):
    """The relay is stopping gracefully (docs/protocol.md, "Draining"): the
    agent keeps the tunnel and asks again on its next link."""

    default_code = RequestErrorCode.RELAY_DRAINING


ERRORS_BY_CODE: dict[RequestErrorCode, type[TunnelRequestError]] = {
    RequestErrorCode.RELAY_DRAINING: RelayDrainingError,
    RequestErrorCode.RELAY_OVERLOADED: RelayOverloadedError,
    RequestErrorCode.LIMIT_EXCEEDED: LimitExceededError,
    RequestErrorCode.NO_FREE_PORT: NoPortsAvailableError,
    RequestErrorCode.BAD_SERVICE_NAME: BadServiceNameError,
    RequestErrorCode.UNKNOWN_TUNNEL: UnknownTunnelError,
    RequestErrorCode.RECLAIM_FAILED: ReclaimFailedError,
    RequestErrorCode.BAD_NAME: BadNameError,
    RequestErrorCode.NAME_TAKEN: NameTakenError,
    RequestErrorCode.NAME_NOT_ALLOWED: NameNotAllowedError,
    RequestErrorCode.NAME_IN_USE: NameInUseError,
}


def _code_or_string(code) -> RequestErrorCode | str:
    try:
        return RequestErrorCode(code)
    except ValueError:
        return str(code)[:40]  # a newer relay's code: kept, as text, for the message


def request_error(code, message: str) -> TunnelRequestError:
    """The typed error for a wire code (TunnelRequestError for unknown ones)."""
    code = _code_or_string(code)
    cls = ERRORS_BY_CODE.get(code, TunnelRequestError) if isinstance(code, RequestErrorCode) else TunnelRequestError
    return cls(code, message)


class ControlEnvelopeError(MuxProtocolError):
    """A CONTROL message that is not a request or reply at all (no integer id)."""


# -- requests --------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceRequest:
    name: str  # "" for a tunnel's single unnamed service
    kind: str  # "tcp" or "tls"
    mode: str | None = None  # tls: "terminate" or "passthrough"
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpenTunnel:
    """A validated open_tunnel request."""

    request_id: int
    services: tuple[ServiceRequest, ...]
    name: str = ""
    stable_name: str | None = None  # the tenant's stable name, or None for a random address
    allow: tuple = ()  # ip_network objects; empty: everyone
    client_ca: bytes | None = field(default=None, repr=False)  # PEM
    reclaim: tuple[str, str] | None = field(default=None, repr=False)  # (tunnel id, secret)


@dataclass(frozen=True)
class CloseTunnel:
    request_id: int
    tunnel_id: str


def request_id_of(message: dict) -> int:
    """The envelope's id; raises ControlEnvelopeError without a usable one."""
    request_id = message.get("id") if isinstance(message, dict) else None
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ControlEnvelopeError("control message without an integer id")
    return request_id


def parse_request(message: dict) -> OpenTunnel | CloseTunnel:
    """Validate a request (relay side). Raises ControlEnvelopeError (no id)
    or a TunnelRequestError (replied to, link kept)."""
    request_id = request_id_of(message)
    op = message.get("op")
    if op == Op.OPEN_TUNNEL.value:
        return _parse_open_tunnel(request_id, message)
    if op == Op.CLOSE_TUNNEL.value:
        tunnel_id = message.get("tunnel")
        if not isinstance(tunnel_id, str):
            raise UnknownTunnelError(None, "no such tunnel on this link")
        return CloseTunnel(request_id, tunnel_id)
    raise TunnelRequestError(RequestErrorCode.BAD_REQUEST, f"unknown op {_short(op)!r}")


def _short(value, limit: int = 40) -> str:
    """A peer's value for an error message: bounded, and encodable (a lone
    surrogate in JSON text is valid JSON but not valid UTF-8)."""
    return str(value)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _parse_open_tunnel(request_id: int, request: dict) -> OpenTunnel:
    services = request.get("services")
    if services is None:  # the short form: one unnamed service of `kind`
        services = [{"name": "", "kind": request.get("kind", "tcp")}]
    if not isinstance(services, list) or not 1 <= len(services) <= MAX_SERVICES:
        raise TunnelRequestError(RequestErrorCode.BAD_REQUEST, f"a tunnel has 1 to {MAX_SERVICES} services")
    parsed, names = [], set()
    for service in services:
        if not isinstance(service, dict):
            raise TunnelRequestError(RequestErrorCode.BAD_REQUEST, "each service is an object")
        parsed.append(_parse_service(service, names, several=len(services) > 1))
    allow = request.get("allow") or []
    if not isinstance(allow, list) or len(allow) > MAX_ALLOW_ENTRIES:
        raise TunnelRequestError(RequestErrorCode.BAD_ALLOW, f"allow: a list of at most {MAX_ALLOW_ENTRIES} CIDRs")
    networks = []
    for entry in allow:
        try:
            if not isinstance(entry, str):
                raise ValueError
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise TunnelRequestError(RequestErrorCode.BAD_ALLOW, f"not a CIDR: {_short(entry, 60)!r}") from None
    client_ca = request.get("client_ca")
    if client_ca is not None:
        if not isinstance(client_ca, str) or len(client_ca) > MAX_CLIENT_CA_BYTES:
            raise TunnelRequestError(RequestErrorCode.BAD_CLIENT_CA, "client_ca: a PEM string of at most 64 KiB")
        try:
            client_ca = client_ca.encode("ascii")
        except UnicodeEncodeError:
            raise TunnelRequestError(RequestErrorCode.BAD_CLIENT_CA, "client_ca: PEM is ASCII") from None
        _check_client_ca(client_ca)
    reclaim = request.get("reclaim")
    if isinstance(reclaim, dict) and isinstance(reclaim.get("tunnel"), str) and isinstance(reclaim.get("secret"), str):
        reclaim = (reclaim["tunnel"], reclaim["secret"])
    else:
        reclaim = None  # malformed: treated as absent, so the agent gets a fresh tunnel
    name = request.get("name", "")
    return OpenTunnel(
        request_id=request_id,
        services=tuple(parsed),
        name=_short(name, MAX_TUNNEL_NAME_CHARS) if name else "",
        stable_name=check_stable_name(request["stable_name"]) if "stable_name" in request else None,
        allow=tuple(networks),
        client_ca=client_ca,
        reclaim=reclaim,
    )


# Parsing a 60 KiB PEM took about 6.5 ms of the reactor; agents send the same
# CA with every tunnel and every reconnect, so remember recent verdicts.
_CLIENT_CA_VERDICTS: dict[bytes, str | None] = {}  # sha256 -> None (good) or the error
MAX_CLIENT_CA_VERDICTS = 256


def _check_client_ca(pem: bytes) -> None:
    digest = hashlib.sha256(pem).digest()
    if digest in _CLIENT_CA_VERDICTS:
        error = _CLIENT_CA_VERDICTS[digest]
    else:
        try:
            ssl.create_default_context(cadata=pem.decode("ascii"))
            error = None
        except (ssl.SSLError, ValueError) as e:
            error = f"client_ca is not a PEM CA certificate: {_short(e, 200)}"
        if len(_CLIENT_CA_VERDICTS) >= MAX_CLIENT_CA_VERDICTS:
            _CLIENT_CA_VERDICTS.pop(next(iter(_CLIENT_CA_VERDICTS)))
        _CLIENT_CA_VERDICTS[digest] = error
    if error is not None:
        raise TunnelRequestError(RequestErrorCode.BAD_CLIENT_CA, error)


def check_stable_name(name) -> str:
    """The name if it is a valid stable name, else BadNameError (both ends use it)."""
    if not isinstance(name, str) or not STABLE_NAME.fullmatch(name) or "--" in name:
        raise BadNameError(
            None,
            f"bad stable name {_short(name)!r}: use 1-{MAX_STABLE_NAME_CHARS} characters of a-z, 0-9 "
            "and inner single hyphens (one DNS label, lowercase)",
        )
    return name


def _parse_service(service: dict, names: set, *, several: bool) -> ServiceRequest:
    name = service.get("name", "")
    if not isinstance(name, str) or (name or several) and not SERVICE_NAME.fullmatch(name):
        raise BadServiceNameError(
            None, f"bad service name {_short(name)!r}: use 1-20 characters of a-z and 0-9"
        )
    if name in names:
        raise BadServiceNameError(None, f"service name {name!r} given twice")
    names.add(name)
    kind = service.get("kind", "tcp")
    if kind not in KINDS:
        raise TunnelRequestError(RequestErrorCode.UNSUPPORTED_KIND, f"unknown tunnel kind {_short(kind, 20)!r}")
    mode = service.get("mode", "terminate") if kind == "tls" else None
    if kind == "tls" and mode not in TLS_MODES:
        raise TunnelRequestError(RequestErrorCode.BAD_REQUEST, f"mode must be one of {', '.join(TLS_MODES)}")
    alpn = service.get("alpn") or (list(DEFAULT_ALPN) if kind == "tls" else [])
    if (
        not isinstance(alpn, list)
        or len(alpn) > MAX_ALPN_ENTRIES
        or not all(isinstance(p, str) and p.isascii() and 0 < len(p) < 256 for p in alpn)
    ):
        raise TunnelRequestError(RequestErrorCode.BAD_ALPN, "ALPN: up to 8 protocol names such as h2, http/1.1")
    return ServiceRequest(name, kind, mode, tuple(alpn))


def open_tunnel_request(request_id: int, wire: dict, reclaim: tuple[str, str] | None = None) -> dict:
    """The agent's open_tunnel message: `wire` is the tunnel spec's fields
    (services, name, stable_name, allow, client_ca), `reclaim` an earlier (tunnel id, secret)."""
    message = {"id": request_id, "op": Op.OPEN_TUNNEL.value, **wire}
    if reclaim is not None:
        message["reclaim"] = {"tunnel": reclaim[0], "secret": reclaim[1]}
    return message


def close_tunnel_request(request_id: int, tunnel_id: str) -> dict:
    return {"id": request_id, "op": Op.CLOSE_TUNNEL.value, "tunnel": tunnel_id}


# -- sessions of several links (docs/protocol.md, "Joining a session") -------------

# The links one agent may ask to keep (HELLO `links`): cloudflared keeps 4.
MAX_LINKS_PER_SESSION = 16
# Join secrets are 32 bytes from `secrets`, url-safe base64 (43 characters).
JOIN_SECRET_BYTES = 32
MAX_SESSION_ID_CHARS = 32


@dataclass(frozen=True)
class Join:
    """The `join` field of an agent's HELLO: the session its link joins."""

    session: str
    secret: str = field(repr=False)


def hello_fields(token: str, agent: str | None = None, *, links: int = 1, join: Join | None = None) -> dict:
    """The agent's HELLO fields: a new session wanting `links` links, or a
    link joining the session `join` names (the secret its first link got)."""
    fields = {"token": token} if agent is None else {"token": token, "agent": agent}
    if join is not None:
        fields["join"] = {"session": join.session, "secret": join.secret}
    else:
        fields["links"] = links
    return fields


def parse_hello_links(info: dict) -> int:
    """How many links a new session's agent keeps (1 if absent or malformed), capped."""
    links = info.get("links", 1)
    if type(links) is not int or links < 1:
        return 1
    return min(links, MAX_LINKS_PER_SESSION)


def parse_join(info: dict) -> Join | None:
    """The HELLO's join request, or None for a new session. A `join` that is
    not an object of two short strings is a join that cannot succeed: it is
    refused (JOIN_REFUSED), never taken for a new session."""
    join = info.get("join")
    if join is None:
        return None
    if not isinstance(join, dict):
        return Join("", "")
    session, secret = join.get("session"), join.get("secret")
    if not isinstance(session, str) or not isinstance(secret, str) or len(session) > MAX_SESSION_ID_CHARS:
        return Join("", "")
    return Join(session, secret[:256])


def joined_secret(info: dict) -> str | None:
    """The relay's HELLO `join_secret` (the session's first link only), or None."""
    secret = info.get("join_secret")
    return secret if isinstance(secret, str) and 0 < len(secret) <= 256 else None


# -- replies -----------------------------------------------------------------------


def ok_reply(request_id: int, body: dict | None = None) -> dict:
    return {"id": request_id, "ok": True, **(body or {})}


def error_reply(request_id: int, error: TunnelRequestError) -> dict:
    code = error.code.value if isinstance(error.code, RequestErrorCode) else str(error.code)
    return {"id": request_id, "ok": False, "error": {"code": code, "message": str(error)}}


def opened_reply(request_id: int, tunnel: dict, *, reclaimed: bool, reclaim_secret: str | None = None,
                 replica: bool = False) -> dict:
    """open_tunnel's success: the tunnel's description, and on a fresh tunnel
    its reclaim secret; a replica (another agent of the stable name) gets none."""
    body = {"tunnel": tunnel, "reclaimed": reclaimed}
    if reclaim_secret is not None:
        body["reclaim_secret"] = reclaim_secret
    if replica:
        body["replica"] = True
    return ok_reply(request_id, body)


@dataclass(frozen=True)
class Reply:
    """A reply as the agent reads it."""

    request_id: int
    ok: bool
    body: dict
    error: TunnelRequestError | None = None


def parse_reply(message: dict) -> Reply:
    """Validate a reply (agent side). Raises ControlEnvelopeError without an id;
    an error reply carries its typed error, not raised."""
    request_id = request_id_of(message)
    if message.get("ok") is True:
        return Reply(request_id, True, message)
    error = message.get("error")
    if not isinstance(error, dict):
        error = {}
    code = error.get("code", RequestErrorCode.BAD_REQUEST.value)
    text = error.get("message", "no reason given")
    return Reply(request_id, False, message, request_error(_short(code), _short(text, 500)))


def granted_tunnel(reply: Reply) -> tuple[str, list[dict], str | None]:
    """(tunnel id, endpoints, reclaim secret or None) of an open_tunnel success.
    Raises ControlEnvelopeError if the relay's reply is not of that shape."""
    tunnel = reply.body.get("tunnel")
    if not isinstance(tunnel, dict) or not isinstance(tunnel.get("id"), str):
        raise ControlEnvelopeError("open_tunnel reply without a tunnel id")
    endpoints = tunnel.get("endpoints")
    if not isinstance(endpoints, list) or not all(isinstance(e, dict) for e in endpoints):
        raise ControlEnvelopeError("open_tunnel reply without endpoints")
    secret = reply.body.get("reclaim_secret")
    return tunnel["id"], endpoints, secret if isinstance(secret, str) else None
