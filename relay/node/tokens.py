"""The tokens file: every agent token the relay accepts, its tenant and limits.

``<state-dir>/tokens.json`` (mode 0600) holds one record per token::

    {"version": 1, "tokens": [
      {"id": "3f9c0a1b2d4e", "tenant": "acme", "label": "ci", "created": "2025-01-02T03:04:05Z",
       "sha256": "<64 hex digits>",
       "limits": {"max_tunnels": 10, "max_streams": 200, "max_new_streams_per_second": 50,
                  "bandwidth": 1000000, "ports": [30000, 30099], "names": ["web", "api"]}}]}

JSON, not TOML: `relay-admin` writes the file and the relay reads it, both with
the stdlib (tomllib reads only, and a TOML writer would be one more
dependency), and a strict JSON parse gives one clear error for a bad file.

Rule 1: only the SHA-256 of a token is stored; the clear token is printed once
by `relay-admin token add` (or written to client.env for the development
token) and never again. No message of this module quotes a stored digest.

Rule 2: every write is a whole new file (temporary file with mode 0600, fsync,
rename, relay/node/state.py's `_write_atomic`), under an advisory lock on
``.tokens.lock`` so two writers never lose each other's change; the relay
reads without the lock and always sees the old file or the new one.

Rule 3: a file that does not parse is refused whole: at start the relay stops
with the error; on reload it logs one line and keeps the last good table.

Absent limit = the node's default (relay/node/limits.py). What each limit
means and counts is in docs/security.md ("Per token").

The development token (``agent-tokens``, client.env) is migrated on the first
start into a token of the ``dev`` tenant with no limits; ``--rotate-token``
replaces the dev tenant's tokens (other tenants keep theirs).
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from twisted.logger import Logger

from relay.mux.control import MAX_STABLE_NAME_CHARS, TunnelRequestError, check_stable_name
from relay.node.limits import DEFAULT_LIMITS, SessionLimits
from relay.node.state import _write_atomic, hash_token
from relay.node.tenants import DEV_TENANT, Grant

TOKENS_JSON = "tokens.json"
LOCK_FILE = ".tokens.lock"
FILE_VERSION = 1
SECRET_FILE_MODE = 0o600
# secrets.token_hex(6): ids are labels for operators and logs, not secrets.
TOKEN_ID_BYTES = 6
TOKEN_ID = re.compile(r"[a-z0-9]{1,32}")
# A tenant is one DNS label's worth of [a-z0-9]: stable names become
# <name>-<tenant>.<domain>, so no dash (it would make names ambiguous).
TENANT = re.compile(r"[a-z0-9]{1,20}")
MAX_LABEL_CHARS = 200
MAX_NAMES = 256
MAX_TOKENS = 100_000
# Below this a tunnel crawls through timers, one per chunk: a typo, not a cap.
MIN_BANDWIDTH = 1024
LIMIT_KEYS = ("max_tunnels", "max_streams", "max_new_streams_per_second", "bandwidth", "ports", "names")


class TokensFileError(ValueError):
    """The tokens file (or a value for it) is not valid; the message says where."""


@dataclass(frozen=True)
class TokenLimits:
    """A token's own limits; None: the node's default."""

    max_tunnels: int | None = None
    max_streams: int | None = None
    max_new_streams_per_second: float | None = None
    bandwidth: int | None = None  # bytes per second per tunnel, each direction
    ports: tuple[int, int] | None = None
    names: frozenset[str] | None = None

    def to_json(self) -> dict:
        out = {}
        for key in LIMIT_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            if key == "ports":
                value = list(value)
            elif key == "names":
                value = sorted(value)
            out[key] = value
        return out

    def session_limits(self, defaults: SessionLimits) -> SessionLimits | None:
        """The node's limits with this token's in their place; None if it sets none."""
        if all(getattr(self, key) is None for key in LIMIT_KEYS if key != "names"):
            return None
        limits = replace(
            defaults,
            token_max_tunnels=self.max_tunnels,
            token_max_streams=self.max_streams,
            bandwidth_bytes_per_second=self.bandwidth,
            port_range=self.ports,
        )
        if self.max_new_streams_per_second is not None:
            rate = self.max_new_streams_per_second
            # One second's worth of burst: the rate is what the operator typed.
            limits = replace(limits, new_streams_per_second=float(rate), new_streams_burst=max(1, int(rate)))
        return limits


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    tenant: str
    created: str
    digest: bytes = field(repr=False)
    label: str = ""
    limits: TokenLimits = TokenLimits()

    def to_json(self) -> dict:
        return {
            "id": self.token_id, "tenant": self.tenant, "label": self.label, "created": self.created,
            "sha256": self.digest.hex(), "limits": self.limits.to_json(),
        }

    def public(self) -> dict:
        """What `token list` shows: everything but the digest."""
        out = self.to_json()
        del out["sha256"]
        return out


# -- parsing and writing ---------------------------------------------------------


def parse_tokens(data: bytes, where: str) -> tuple[TokenRecord, ...]:
    """The records of a tokens file's bytes; TokensFileError naming `where` and the entry."""
    try:
        document = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TokensFileError(f"{where} is not UTF-8 JSON: {_first_line(e)}") from None
    if not isinstance(document, dict) or set(document) != {"version", "tokens"}:
        raise TokensFileError(f'{where}: want an object with exactly "version" and "tokens"')
    if document["version"] != FILE_VERSION:
        raise TokensFileError(f"{where}: version {document['version']!r} is not {FILE_VERSION}")
    entries = document["tokens"]
    if not isinstance(entries, list) or len(entries) > MAX_TOKENS:
        raise TokensFileError(f'{where}: "tokens" must be a list of at most {MAX_TOKENS} entries')
    records, ids, digests = [], set(), set()
    for number, entry in enumerate(entries, start=1):
        record = _parse_entry(entry, f"{where} token {number}")
        if record.token_id in ids:
            raise TokensFileError(f"{where} token {number}: id {record.token_id} appears twice")
        if record.digest in digests:
            raise TokensFileError(f"{where} token {number}: the same token hash appears twice")
        ids.add(record.token_id)
        digests.add(record.digest)
        records.append(record)
    return tuple(records)


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _first_line(error) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _parse_entry(entry, where: str) -> TokenRecord:
    if not isinstance(entry, dict):
        raise TokensFileError(f"{where}: not an object")
    unknown = set(entry) - {"id", "tenant", "label", "created", "sha256", "limits"}
    if unknown:
        raise TokensFileError(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    token_id = entry.get("id")
    if not isinstance(token_id, str) or not TOKEN_ID.fullmatch(token_id):
        raise TokensFileError(f"{where}: id must be 1-32 characters of a-z and 0-9")
    where = f"{where} (id {token_id})"
    tenant = check_tenant(entry.get("tenant"), where)
    label = check_label(entry.get("label", ""), where)
    created = entry.get("created")
    if not isinstance(created, str) or len(created) > 40:
        raise TokensFileError(f"{where}: created must be a timestamp string")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        # Never quote it: an operator may have pasted a clear token here.
        raise TokensFileError(f"{where}: sha256 must be 64 lowercase hex digits")
    limits = entry.get("limits", {})
    if not isinstance(limits, dict):
        raise TokensFileError(f"{where}: limits must be an object")
    return TokenRecord(token_id, tenant, created, bytes.fromhex(digest), label, parse_limits(limits, where))


def check_tenant(tenant, where: str = "tenant") -> str:
    if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
        raise TokensFileError(f"{where}: a tenant is 1-20 characters of a-z and 0-9")
    return tenant


def check_label(label, where: str = "label") -> str:
    if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS or not label.isprintable():
        raise TokensFileError(f"{where}: a label is at most {MAX_LABEL_CHARS} printable characters")
    return label


def parse_limits(limits: dict, where: str) -> TokenLimits:
    """TokenLimits from a JSON object (the file's, or relay-admin's options); null = default."""
    unknown = set(limits) - set(LIMIT_KEYS)
    if unknown:
        raise TokensFileError(f"{where}: unknown limits {', '.join(sorted(map(str, unknown)))}")
    values = {}
    for key in ("max_tunnels", "max_streams"):
        value = limits.get(key)
        if value is not None and (type(value) is not int or not 1 <= value <= 10**9):
            raise TokensFileError(f"{where}: {key} must be an integer from 1 to 10^9")
        values[key] = value
    rate = limits.get("max_new_streams_per_second")
    if rate is not None and (type(rate) not in (int, float) or not 0.01 <= rate <= 10**9):
        raise TokensFileError(f"{where}: max_new_streams_per_second must be a number from 0.01 to 10^9")
    values["max_new_streams_per_second"] = rate
    bandwidth = limits.get("bandwidth")
    if bandwidth is not None and (type(bandwidth) is not int or not MIN_BANDWIDTH <= bandwidth <= 10**12):
        raise TokensFileError(f"{where}: bandwidth must be bytes per second, from {MIN_BANDWIDTH} to 10^12")
    values["bandwidth"] = bandwidth
    ports = limits.get("ports")
    if ports is not None:
        if (
            not isinstance(ports, list) or len(ports) != 2 or not all(type(p) is int for p in ports)
            or not 1 <= ports[0] <= ports[1] <= 65535
        ):
            raise TokensFileError(f"{where}: ports must be [LO, HI] with 1 <= LO <= HI <= 65535")
        ports = (ports[0], ports[1])
    values["ports"] = ports
    names = limits.get("names")
    if names is not None:
        if not isinstance(names, list) or len(names) > MAX_NAMES:
            raise TokensFileError(f"{where}: names must be a list of at most {MAX_NAMES} names")
        for name in names:
            # The grammar of `tunnel-client --name` (relay/mux/control.py): a
            # token must be able to allow every name an agent may ask for.
            try:
                check_stable_name(name)
            except TunnelRequestError:
                raise TokensFileError(
                    f"{where}: a name is 1-{MAX_STABLE_NAME_CHARS} characters of a-z, 0-9 and inner single hyphens"
                ) from None
        names = frozenset(names)
    values["names"] = names
    return TokenLimits(**values)


def dump_tokens(records) -> bytes:
    document = {"version": FILE_VERSION, "tokens": [r.to_json() for r in records]}
    return (json.dumps(document, indent=1, sort_keys=False) + "\n").encode("utf-8")


def read_tokens(path: Path) -> tuple[TokenRecord, ...]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokensFileError(f"cannot read {path}: {e.strerror}") from None
    return parse_tokens(data, str(path))


def write_tokens(path: Path, records) -> None:
    _write_atomic(path, dump_tokens(records), SECRET_FILE_MODE)


@contextlib.contextmanager
def locked(state_dir: Path):
    """Hold the tokens file's write lock (for a read-modify-write)."""
    fd = os.open(Path(state_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), SECRET_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def new_token_id(taken) -> str:
    while True:
        token_id = secrets.token_hex(TOKEN_ID_BYTES)
        if token_id not in taken:
            return token_id


def now_text(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ensure_tokens_file(state_dir: Path, dev_hashes, *, replace_dev: bool) -> Path:
    """At relay start: create the tokens file from the development token
    hashes (agent-tokens) when it is missing, or, after --rotate-token
    (`replace_dev`), put them in place of the dev tenant's tokens. Raises
    TokensFileError for a file that does not parse."""
    path = Path(state_dir) / TOKENS_JSON
    with locked(state_dir):
        if path.exists() and not replace_dev:
            read_tokens(path)  # a bad file stops the start, with its reason
            return path
        records = list(read_tokens(path)) if path.exists() else []
        records = [r for r in records if r.tenant != DEV_TENANT]
        taken = {r.token_id for r in records}
        known = {r.digest for r in records}
        for digest in dev_hashes:
            if digest in known:
                continue
            token_id = new_token_id(taken)
            taken.add(token_id)
            records.insert(0, TokenRecord(token_id, DEV_TENANT, now_text(), digest, "development token"))
        write_tokens(path, records)
    return path


# -- the relay's view: check, reload ------------------------------------------------


class TokenStore:
    """The tokens the relay accepts, reloaded from the file on demand.

    `check_token` answers a presented token with its Grant; `grant_of(id)`
    the current grant of a token id (None once revoked); `on_reload`
    callables hear each new table (the node applies it to live links).
    """

    _log = Logger()

    def __init__(self, path: Path, defaults: SessionLimits = DEFAULT_LIMITS):
        self.path = Path(path)
        self.defaults = defaults
        self.on_reload: list = []
        self._records: tuple[TokenRecord, ...] = ()
        self._grants: dict[str, Grant] = {}
        self._stamp = None
        self._refused_stamp = None
        self._install(read_tokens(self.path), self._file_stamp())

    def _file_stamp(self):
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _install(self, records, stamp) -> None:
        self._records = records
        self._grants = {
            r.token_id: Grant(
                tenant=r.tenant, token_id=r.token_id,
                limits=r.limits.session_limits(self.defaults), names=r.limits.names,
            )
            for r in records
        }
        self._stamp = stamp
        self._refused_stamp = None

    @property
    def records(self) -> tuple[TokenRecord, ...]:
        return self._records

    def check_token(self, presented) -> Grant | None:
        """The grant of `presented`, or None. Compared with every stored
        digest without stopping at a match, so the time taken does not say
        which one matched, nor how far down the file it is."""
        if not isinstance(presented, str) or not presented:
            return None
        digest = hash_token(presented)
        matched = None
        for record in self._records:
            if hmac.compare_digest(digest, record.digest):
                matched = record
        return self._grants[matched.token_id] if matched is not None else None

    def grant_of(self, token_id: str) -> Grant | None:
        return self._grants.get(token_id)

    def reload(self) -> bool:
        """Read the file again; keep the last good table if it is bad (one
        log line). True if a new table is in force."""
        try:
            stamp = self._file_stamp()
            records = read_tokens(self.path)
        except (OSError, TokensFileError) as e:
            text = str(e) if isinstance(e, TokensFileError) else f"cannot read {self.path}: {e.strerror}"
            self._log.error("tokens file refused, the last good one stays in force: {error}", error=text)
            self._refused_stamp = self._stamp_or_missing()  # the periodic check skips this version
            return False
        self._install(records, stamp)
        tenants = len({r.tenant for r in records})
        self._log.info(
            "tokens file loaded: {count} token(s) of {tenants} tenant(s)", count=len(records), tenants=tenants,
        )
        for listener in list(self.on_reload):
            try:
                listener(self)
            except Exception:  # a bug there must not stop the periodic check
                self._log.failure("applying the new tokens failed")
        return True

    def reload_if_changed(self) -> None:
        """The periodic check: reload when the file's mtime, size or inode changed."""
        stamp = self._stamp_or_missing()
        if stamp != self._stamp and stamp != self._refused_stamp:
            self.reload()

    def _stamp_or_missing(self):
        try:
            return self._file_stamp()
        except OSError as e:
            return ("unreadable", e.errno)


def limits_text(limits: dict) -> str:
    """A token's limits (TokenLimits.to_json()) in one line, as relay-admin
    and the console show them: "max_tunnels=10 ports=30000-30099"; "" for none."""
    shown = []
    for key, value in limits.items():
        if key == "ports":
            value = f"{value[0]}-{value[1]}"
        elif key == "names":
            value = ",".join(value)
        shown.append(f"{key}={value}")
    return " ".join(shown)
