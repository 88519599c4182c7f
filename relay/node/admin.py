"""Admin HTTP on loopback (klein): health, the live tunnel list, /metrics
and the web console (relay/node/console.py).

It binds 127.0.0.1 by default and then asks for no credential; bound
anywhere else (or with --admin-auth token) every route but /healthz needs
the admin token, as a bearer header or a console login
(relay/node/adminauth.py has the rules, docs/security.md the model). Only
two things change state, both POSTs from a confirm page with the session's
CSRF token and our own Origin: revoking a token and closing a tunnel.
Tokens and reclaim secrets never appear here.
Every request's Host header must name the address the port is bound to
(or `localhost`, or one of `allowed_hosts`): a page on another site that a
browser on the relay's machine opens cannot reach this API by rebinding
its own DNS name to 127.0.0.1 (DNS rebinding), since its Host stays its own.
Counts come from the metrics observer (relay/wire/metrics.py `Counters`),
the tunnel list from the node's `TunnelManager`: no counters of its own;
`/metrics` is the Prometheus page over the same observer (docs/metrics.md).
"""

import json
import secrets
from urllib.parse import quote

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource

from relay.node import console
from relay.node.adminauth import COOKIE_NAME, SESSION_SECONDS, Sessions, auth_required, same_origin
from relay.wire.hostcheck import LOOPBACK_NAMES, allowed_hosts_for, host_allowed, host_of  # noqa: F401 (re-exported)

# One line per this many seconds about refused console logins, not one per try.
LOGIN_LOG_SECONDS = 10.0
# The browser pages (a missing login sends them to /login; the API gets 401).
PAGE_PREFIXES = (b"/tokens/", b"/tunnels/")


class AdminAPI:
    app = Klein()
    _log = Logger()

    def __init__(self, tunnels, metrics, started_at: float, clock, *, interface: str = "127.0.0.1",
                 allowed_hosts=(), metrics_page=None, auth_mode: str = "auto", credential=None,
                 token_store=None, revoke=None, state_hint: str = "relay-state"):
        """`credential`: relay.node.adminauth.AdminCredential (needed when
        auth is required); `token_store`: the node's TokenStore (the console's
        tenants); `revoke(token_id)`: a Deferred firing with the records it
        removed from the tokens file, after which the store is reloaded."""
        self.tunnels = tunnels  # relay.node.tunnels.TunnelManager
        self.metrics = metrics  # relay.wire.metrics.Counters
        self.started_at = started_at
        self.clock = clock
        self.allowed_hosts = allowed_hosts_for(interface, allowed_hosts)
        self.metrics_page = metrics_page  # relay.wire.prommetrics.MetricsPage, or None
        self.auth_required = auth_required(interface, auth_mode)
        if self.auth_required and credential is None:
            raise ValueError("the admin port needs a credential off loopback")
        self.credential = credential
        self.sessions = Sessions(clock)
        self.token_store = token_store
        self._revoke = revoke
        self.state_hint = state_hint
        self.console = console.ConsoleView(tunnels, metrics, clock, self.health, token_store)
        self._refused_logins = 0
        self._refused_logged_at = None

    def host_allowed(self, request) -> bool:
        return host_allowed(request.getHeader(b"host"), self.allowed_hosts)

    def resource(self):
        """The web resource to serve: every route behind the Host and credential checks."""
        return _Guarded(self.app.resource(), self)

    # -- who is asking (relay/node/adminauth.py) ---------------------------------

    def _generation(self) -> int:
        return self.credential.generation if self.credential is not None else 0

    def session_of(self, request) -> str | None:
        """The request's valid session id (from its cookie), or None."""
        raw = request.getCookie(COOKIE_NAME)
        try:
            session_id = raw.decode("ascii") if raw else None
        except UnicodeDecodeError:
            return None
        return session_id if self.sessions.valid(session_id, self._generation()) else None

    def bearer_ok(self, request) -> bool:
        return self.credential is not None and self.credential.check_authorization(request.getHeader(b"authorization"))

    def authorized(self, request) -> bool:
        """Rule 1: no credential needed, or a bearer token, or a logged-in session."""
        if not self.auth_required:
            return True
        if self.credential is not None:
            self.credential.reload_if_changed()  # a rotated token ends old sessions at once
        return self.bearer_ok(request) or self.session_of(request) is not None

    def _start_session(self, request) -> str:
        session_id = self.sessions.create(self._generation())
        request.addCookie(
            COOKIE_NAME, session_id.encode("ascii"), path=b"/", httpOnly=True, sameSite="strict",
            max_age=str(int(SESSION_SECONDS)).encode(),
        )
        return session_id

    def _browser_session(self, request) -> str:
        """The session whose CSRF token the page's forms carry: the login's,
        or, where no login is needed, one made now for this browser."""
        session_id = self.session_of(request)
        return session_id if session_id is not None else self._start_session(request)

    def form_allowed(self, request) -> bool:
        """Rule 2: a POST with a bearer token, or from our own page: its
        session's CSRF token and our Origin (or Referer)."""
        if self.bearer_ok(request):
            return True
        if not same_origin(request.getHeader(b"origin"), request.getHeader(b"referer"), request.getHeader(b"host")):
            return False
        presented = _arg(request, b"csrf")
        return self.sessions.csrf_ok(self.session_of(request), presented)

    def _html(self, request, body_of, status: int = 200) -> bytes:
        """An HTML page under a CSP that allows only our own inline style and script."""
        nonce = secrets.token_urlsafe(16)
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(
            b"Content-Security-Policy",
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'".encode(),
        )
        return body_of(nonce)

    def _forbidden(self, request) -> bytes:
        return self._html(
            request,
            lambda nonce: console.render_message(
                "Refused", "This form did not come from this console (CSRF token or Origin missing or wrong): "
                "reload the console and try again.", nonce, error=True,
            ),
            status=403,
        )

    def _log_refused_login(self, request) -> None:
        self._refused_logins += 1
        now = self.clock.seconds()
        if self._refused_logged_at is None or now - self._refused_logged_at >= LOGIN_LOG_SECONDS:
            self._refused_logged_at = now
            self._log.warn(
                "admin console: {count} login(s) with a wrong token refused (last from {peer})",
                count=self._refused_logins, peer=getattr(request.getClientAddress(), "host", "?"),
            )
            self._refused_logins = 0

    def refuse_host(self, request) -> bytes:
        request.setResponseCode(421)  # Misdirected Request (RFC 9110 15.5.20)
        return self._json(request, {"error": "unexpected Host header"})

    def _json(self, request, body: dict) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(body, indent=1).encode() + b"\n"

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        body = self.health()
        if body["status"] == "draining":
            # A load balancer's health check takes the node out while it drains.
            request.setResponseCode(503)
        return self._json(request, body)

    def health(self) -> dict:
        """The /healthz body (the console shows it too)."""
        m = self.metrics
        refused = m.refused_by_reason
        draining = self.tunnels.draining
        body = {
            "status": "draining" if draining else "ok",
            "uptime_seconds": round(self.clock.seconds() - self.started_at, 3),
            "agents": len(self.tunnels.sessions),  # sessions: an agent of several links counts once
            "links": m.links_up,
            "tunnels": m.tunnels_open,
            "streams_active": m.streams_active,
            "streams_total": m.streams_total,
            "auth_failures": m.auth_failures,
            "tls_port_refused": {
                "unknown_names": refused["unknown_name"],
                "bad_hellos": refused["bad_hello"],
                "hello_timeouts": refused["hello_timeout"],
                "failed_handshakes": refused["handshake_failed"],
            },
            "visitors_refused": dict(sorted(refused.items())),
        }
        return body

    @app.route("/v1/tunnels", methods=["GET"])
    def tunnels(self, request):
        return self._json(request, {"tunnels": self.tunnels.describe(self.metrics.tunnel)})

    @app.route("/metrics", methods=["GET"])
    def prometheus(self, request):
        """Prometheus exposition (docs/metrics.md), rendered at scrape time."""
        if self.metrics_page is None:
            request.setResponseCode(404)
            return self._json(request, {"error": "metrics are off on this node"})
        return self.metrics_page.render_metrics(request)

    # -- the console (relay/node/console.py) --------------------------------------

    @app.route("/", methods=["GET"])
    def console_page(self, request):
        session_id = self._browser_session(request)
        logout = self.sessions.csrf_token(session_id) if self.auth_required else None
        snapshot = self.console.snapshot()
        return self._html(request, lambda nonce: console.render_console(snapshot, nonce, logout_csrf=logout))

    @app.route("/v1/console", methods=["GET"])
    def console_json(self, request):
        return self._json(request, self.console.snapshot())

    @app.route("/login", methods=["GET"])
    def login_page(self, request):
        if not self.auth_required or self.session_of(request) is not None:
            return _redirect(request, b"/")
        return self._html(request, lambda nonce: console.render_login(nonce, state_hint=self.state_hint))

    @app.route("/login", methods=["POST"])
    def login(self, request):
        if not self.auth_required:
            return _redirect(request, b"/")
        if not same_origin(request.getHeader(b"origin"), request.getHeader(b"referer"), request.getHeader(b"host")):
            return self._forbidden(request)  # login CSRF: a cross-site form logging us in as someone
        self.credential.reload_if_changed()
        if not self.credential.check(_arg(request, b"token")):
            self._log_refused_login(request)
            return self._html(
                request,
                lambda nonce: console.render_login(nonce, error="That is not the admin token.", state_hint=self.state_hint),
                status=401,
            )
        self.sessions.end(self.session_of(request))
        self._start_session(request)
        self._log.info("admin console: login from {peer}", peer=getattr(request.getClientAddress(), "host", "?"))
        return _redirect(request, b"/")

    @app.route("/logout", methods=["POST"])
    def logout(self, request):
        if not self.form_allowed(request):
            return self._forbidden(request)
        self.sessions.end(self.session_of(request))
        request.addCookie(COOKIE_NAME, b"", path=b"/", httpOnly=True, sameSite="strict", max_age=b"0")
        return _redirect(request, b"/login" if self.auth_required else b"/")

    @app.route("/tokens/<token_id>/revoke", methods=["GET"])
    def revoke_confirm(self, request, token_id):
        found = self.console.token(token_id)
        if found is None:
            return self._not_found(request, f"No token with id {token_id!r} (it may be revoked already).")
        record, links = found
        csrf = self.sessions.csrf_token(self._browser_session(request))
        facts = [("token", record.token_id), ("tenant", record.tenant), ("label", record.label or "-"),
                 ("created", record.created), ("agents connected with it", str(len(links)))]
        warning = (
            "Revoking removes the token from the tokens file. Its agents are closed at once (they exit and do not "
            "retry) and their tunnels end; the token cannot be restored, only a new one issued."
        )
        return self._html(request, lambda nonce: console.render_confirm(
            f"Revoke token {record.token_id}?", facts, warning, f"/tokens/{quote(token_id)}/revoke", csrf,
            "revoke the token", nonce,
        ))

    @app.route("/tokens/<token_id>/revoke", methods=["POST"])
    def revoke(self, request, token_id):
        if not self.form_allowed(request):
            return self._forbidden(request)
        if _arg(request, b"confirm") != "yes":
            return _redirect(request, f"/tokens/{quote(token_id)}/revoke".encode())
        if self._revoke is None or self.token_store is None:
            return self._not_found(request, "This node has no tokens file to revoke from.")
        found = self.console.token(token_id)
        links_before = len(found[1]) if found is not None else 0
        d = self._revoke(token_id)

        def done(gone):
            self.token_store.reload()  # closes the token's links now (TunnelManager.apply_grants)
            self._log.info("admin console: token {token} revoked", token=token_id)
            (record,) = gone
            text = (f"Token {record.token_id} of tenant {record.tenant} is revoked; "
                    f"{links_before} agent link(s) closed.")
            return self._html(request, lambda nonce: console.render_message("Revoked", text, nonce))

        def failed(failure):
            from relay.node.relay_admin import AdminError

            failure.trap(AdminError)
            status = 404 if failure.value.exit_code == 3 else 500
            return self._html(
                request, lambda nonce: console.render_message("Not revoked", str(failure.value), nonce, error=True),
                status=status,
            )

        d.addCallbacks(done, failed)
        d.addErrback(self._unexpected, request, "revoke")
        return d

    @app.route("/tunnels/<tunnel_id>/close", methods=["GET"])
    def close_confirm(self, request, tunnel_id):
        tunnel = self.tunnels.tunnels.get(tunnel_id)
        if tunnel is None:
            return self._not_found(request, f"No tunnel {tunnel_id!r} on this node (it may have ended).")
        csrf = self.sessions.csrf_token(self._browser_session(request))
        link = tunnel.pick_link()
        grant = getattr(link, "grant", None)
        facts = [("tunnel", tunnel_id)] + [("address", e.url) for e in tunnel.endpoints] + [
            ("tenant", grant.tenant if grant is not None else "-"),
            ("visitors now", str(self.metrics.tunnel(tunnel_id)["streams_active"])),
        ]
        warning = (
            "Closing ends the tunnel on this relay now: its visitors are cut and its addresses freed (a port rests "
            "in quarantine). The agent is not told and keeps its link; it gets a new address once it reconnects."
        )
        return self._html(request, lambda nonce: console.render_confirm(
            f"Close tunnel {tunnel_id}?", facts, warning, f"/tunnels/{quote(tunnel_id)}/close", csrf,
            "close the tunnel", nonce,
        ))

    @app.route("/tunnels/<tunnel_id>/close", methods=["POST"])
    def close_tunnel(self, request, tunnel_id):
        if not self.form_allowed(request):
            return self._forbidden(request)
        if _arg(request, b"confirm") != "yes":
            return _redirect(request, f"/tunnels/{quote(tunnel_id)}/close".encode())
        tunnel = self.tunnels.tunnels.get(tunnel_id)
        if tunnel is None:
            return self._not_found(request, f"No tunnel {tunnel_id!r} on this node (it may have ended).")
        for d in self.tunnels.close(tunnel, "closed from the admin console"):
            d.addErrback(lambda f: self._log.failure("unbinding a closed tunnel's port failed", f))
        return self._html(request, lambda nonce: console.render_message(
            "Closed", f"Tunnel {tunnel_id} is closed.", nonce,
        ))

    def _not_found(self, request, text: str) -> bytes:
        return self._html(request, lambda nonce: console.render_message("Not found", text, nonce, error=True), 404)

    def _unexpected(self, failure, request, what: str) -> bytes:
        self._log.failure("admin console: {what} failed", failure, what=what)
        return self._html(request, lambda nonce: console.render_message(
            "Failed", f"The {what} failed; the relay's log says why.", nonce, error=True,
        ), 500)


def _arg(request, name: bytes) -> str | None:
    """A form field (the first of that name), as text; None if absent or not UTF-8."""
    values = (request.args or {}).get(name)
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _redirect(request, location: bytes) -> bytes:
    request.setResponseCode(303)  # See Other: a POST's answer is fetched with GET
    request.setHeader(b"Location", location)
    request.setHeader(b"Cache-Control", b"no-store")
    return b""


class _Guarded(Resource):
    """Checks the Host header, then the credential, before klein sees the
    request (klein itself raises on a Host that is not UTF-8), so no route
    can forget either."""

    isLeaf = True

    def __init__(self, wrapped, admin: AdminAPI):
        super().__init__()
        self._wrapped = wrapped
        self._admin = admin

    def render(self, request):
        admin = self._admin
        if not admin.host_allowed(request):
            return admin.refuse_host(request)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"X-Frame-Options", b"DENY")  # no clickjacking of the confirm pages
        request.setHeader(b"Referrer-Policy", b"same-origin")
        path = request.path
        if path == b"/healthz" or path == b"/login" or admin.authorized(request):
            return self._wrapped.render(request)
        if request.method in (b"GET", b"HEAD") and (path == b"/" or path.startswith(PAGE_PREFIXES)):
            return _redirect(request, b"/login")
        request.setResponseCode(401)
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="tunnel-relay admin"')
        return admin._json(request, {"error": "the admin token is needed: Authorization: Bearer <token>"})
