"""Who may use the admin port, and how a browser's forms are kept its own.

What this module is: the admin credential (a bearer token in the state
folder), the console's login sessions, their CSRF tokens and the Origin
check of a state-changing request. What it is not: the routes
(relay/node/admin.py) or the pages (relay/node/console.py).

Rule 1: the admin port binds loopback by default and then needs no
credential (development). Bound anywhere else, or with `--admin-auth token`,
every route but `/healthz` needs the credential: `Authorization: Bearer
<token>` (API, /metrics) or the session cookie a login with that token set.

Rule 2: a state-changing request (a POST) from a browser carries the CSRF
token of its session (an HMAC of the session id under a key made at start,
so it is tied to that session and never stored) and an Origin (or, failing
that, a Referer) naming this port's own origin. The session cookie is
HttpOnly and SameSite=Strict, so a cross-site page neither reads it nor has
it sent. A bearer request needs neither: no browser sends one by itself.
GET never changes state, so no GET needs either.

Rule 3: the token is made with `secrets` (256 bits), kept in
``<state-dir>/admin-token`` (mode 0600), compared with `hmac.compare_digest`
on its SHA-256, and never logged; sessions are kept by the SHA-256 of their
id, at most MAX_SESSIONS (the oldest goes), each for SESSION_SECONDS.
A rotated token (`relay-admin admin-token --rotate`) is picked up by the
periodic check and ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from relay.node.state import _write_atomic, new_token

ADMIN_TOKEN_FILE = "admin-token"
SECRET_FILE_MODE = 0o600
COOKIE_NAME = b"relay_console"
# A working day: a console left open overnight asks for the token again.
SESSION_SECONDS = 12 * 3600.0
# Sessions are made by logins (and, without a credential, by visits): a cap
# keeps a flood of them from growing the table; the oldest is dropped first.
MAX_SESSIONS = 256
AUTH_MODES = ("auto", "token")


def is_loopback_interface(interface: str) -> bool:
    """Whether a bind address reaches only this machine (0.0.0.0 and :: do not)."""
    text = interface.strip().strip("[]").lower()
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def auth_required(interface: str, mode: str) -> bool:
    """Rule 1: a credential is needed off loopback, or when asked for."""
    return mode == "token" or not is_loopback_interface(interface)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


# -- the token file (relay-admin and the relay) ----------------------------------


def admin_token_path(state_dir) -> Path:
    return Path(state_dir) / ADMIN_TOKEN_FILE


def read_admin_token(state_dir) -> str | None:
    """The stored token, or None if there is none yet."""
    try:
        text = admin_token_path(state_dir).read_text("ascii").strip()
    except FileNotFoundError:
        return None
    return text or None


def write_new_admin_token(state_dir) -> str:
    """Make a new token (replacing any), write it 0600 atomically, return it."""
    token = new_token()
    _write_atomic(admin_token_path(state_dir), (token + "\n").encode("ascii"), SECRET_FILE_MODE)
    return token


def ensure_admin_token(state_dir) -> str:
    """The stored token, made on the first start that needs one."""
    return read_admin_token(state_dir) or write_new_admin_token(state_dir)


class AdminCredential:
    """The admin token the relay accepts, re-read when its file changes."""

    def __init__(self, state_dir):
        self.state_dir = Path(state_dir)
        self._digest: bytes | None = None
        self._stamp = None
        self.generation = 0  # bumps on each new token: sessions of older ones end
        self.reload_if_changed()

    def _file_stamp(self):
        try:
            st = os.stat(admin_token_path(self.state_dir))
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        stamp = self._file_stamp()
        if stamp == self._stamp and self._digest is not None:
            return False
        token = read_admin_token(self.state_dir) if stamp is not None else None
        digest = _digest(token) if token else None
        changed = digest != self._digest
        self._digest, self._stamp = digest, stamp
        if changed:
            self.generation += 1
        return changed

    @property
    def configured(self) -> bool:
        return self._digest is not None

    def check(self, presented) -> bool:
        """Whether `presented` is the token, in constant time (on digests)."""
        if self._digest is None or not isinstance(presented, str) or not presented:
            return False
        return hmac.compare_digest(_digest(presented), self._digest)

    def check_authorization(self, header: bytes | None) -> bool:
        """An `Authorization: Bearer <token>` header naming the token."""
        if not header:
            return False
        try:
            scheme, _, value = header.decode("ascii").strip().partition(" ")
        except UnicodeDecodeError:
            return False
        return scheme.lower() == "bearer" and self.check(value.strip())


# -- sessions and CSRF ----------------------------------------------------------------


class Sessions:
    """Console sessions: id -> (expiry, credential generation), by the id's hash."""

    def __init__(self, clock, *, max_sessions: int = MAX_SESSIONS, seconds: float = SESSION_SECONDS):
        self.clock = clock
        self.max_sessions = max_sessions
        self.seconds = seconds
        self._key = secrets.token_bytes(32)  # CSRF tokens: HMAC of the session id under it
        self._sessions: dict[bytes, tuple[float, int]] = {}  # insertion order: oldest first

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, generation: int) -> str:
        while len(self._sessions) >= self.max_sessions:
            self._sessions.pop(next(iter(self._sessions)))
        session_id = secrets.token_urlsafe(32)
        self._sessions[_digest(session_id)] = (self.clock.seconds() + self.seconds, generation)
        return session_id

    def valid(self, session_id: str | None, generation: int) -> bool:
        if not session_id:
            return False
        key = _digest(session_id)
        entry = self._sessions.get(key)
        if entry is None:
            return False
        expires, made_for = entry
        if expires <= self.clock.seconds() or made_for != generation:
            del self._sessions[key]
            return False
        return True

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    def csrf_token(self, session_id: str) -> str:
        return hmac.new(self._key, session_id.encode("utf-8", "surrogatepass"), "sha256").hexdigest()

    def csrf_ok(self, session_id: str | None, presented) -> bool:
        if not session_id or not isinstance(presented, str) or not presented:
            return False
        return hmac.compare_digest(self.csrf_token(session_id).encode(), presented.encode("utf-8", "replace"))


def same_origin(origin: bytes | None, referer: bytes | None, host: bytes | None) -> bool:
    """Rule 2: the request names this port's own origin: http://<Host>, or
    https://<Host> behind a TLS proxy that keeps the Host.

    The Host was checked before (relay/wire/hostcheck.py), so it is ours;
    Origin is what browsers send on every POST; Referer is the fallback of
    older ones. Neither, or `Origin: null`: refused."""
    if not host:
        return False
    own = [scheme + host.strip().lower() for scheme in (b"http://", b"https://")]
    if origin is not None:
        return origin.strip().lower() in own
    if referer is not None:
        text = referer.strip().lower()
        return any(text == o or text.startswith(o + b"/") for o in own)
    return False
