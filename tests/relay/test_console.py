"""The web console and the admin port's credential (relay/node/console.py,
adminauth.py, admin.py) without sockets: requests go through a real
twisted.web Site on a StringTransport, the node is the real TunnelManager,
RelayLink and TokenStore over a real tokens file, agents are sans-IO
MuxConnections (tests/relay/node_helpers.py), and revoke is relay-admin's.
"""

import json
import re
import stat
from urllib.parse import urlencode

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.server import Site

from relay.mux import ErrorCode
from relay.mux import events as ev
from relay.node import adminauth, tokens
from relay.node.admin import AdminAPI
from relay.node.console import RateMeter, human_bytes
from relay.node.relay_admin import main as relay_admin, revoke_token
from relay.node.state import hash_token
from relay.node.tokens import TokenRecord, TokenStore
from tests.relay.node_helpers import Node

ACME, BETA = "acme-agent-token-never-shown", "beta-agent-token-never-shown"
OWN = b"127.0.0.1:17080"
ORIGIN = b"http://127.0.0.1:17080"


class Console:
    """A node with a tokens file, its admin API and a browser-ish client."""

    def __init__(self, tmp_path, interface="127.0.0.1", auth_mode="auto", label="ci <script>x</script>"):
        self.state_dir = tmp_path / "relay-state"
        self.state_dir.mkdir()
        self.path = self.state_dir / tokens.TOKENS_JSON
        tokens.write_tokens(self.path, [
            TokenRecord("acme1", "acme", tokens.now_text(), hash_token(ACME), label),
            TokenRecord("beta1", "beta", tokens.now_text(), hash_token(BETA), ""),
        ])
        self.store = TokenStore(self.path)
        self.node = Node()
        self.node.factory.check_token = self.store.check_token
        self.store.on_reload.append(lambda table: self.node.tunnels.apply_grants(table.grant_of))
        credential = None
        if adminauth.auth_required(interface, auth_mode):
            self.admin_token = adminauth.ensure_admin_token(self.state_dir)
            credential = adminauth.AdminCredential(self.state_dir)
        self.admin = AdminAPI(
            self.node.tunnels, self.node.metrics, 0.0, self.node.reactor, interface=interface,
            auth_mode=auth_mode, credential=credential, token_store=self.store,
            revoke=lambda token_id: defer.maybeDeferred(revoke_token, self.state_dir, token_id),
        )
        self.site = Site(self.admin.resource(), reactor=self.node.reactor)
        self.cookie = None

    def request(self, method, path, *, form=None, headers=None, host=OWN, keep_cookie=True):
        """One HTTP/1.0 request: (status, headers as a list of pairs, body)."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 17080), peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        channel.makeConnection(transport)
        body = urlencode(form).encode() if form is not None else b""
        lines = [f"{method} {path} HTTP/1.0".encode(), b"Host: " + host]
        if self.cookie and keep_cookie:
            lines.append(b"Cookie: relay_console=" + self.cookie)
        for name, value in (headers or {}).items():
            lines.append(name.encode() + b": " + value)
        if form is not None:
            lines += [b"Content-Type: application/x-www-form-urlencoded", b"Content-Length: %d" % len(body)]
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        head, _, answer = transport.value().partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        pairs = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(b":") for line in header_lines)]
        channel.connectionLost(Failure(ConnectionDone()))
        for name, value in pairs:
            if name == b"set-cookie" and keep_cookie:
                self.cookie = value.split(b";")[0].partition(b"=")[2] or None
        return int(status_line.split()[1]), pairs, answer

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def csrf_of(self, page: bytes) -> str:
        return re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()

    def agent(self, token=ACME):
        agent = self.node.agent(token)
        assert any(isinstance(e, ev.HelloReceived) for e in agent.events)
        return agent


def header(pairs, name: bytes):
    return [v for n, v in pairs if n == name]


# -- who needs a credential ---------------------------------------------------------


@pytest.mark.parametrize("interface", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_credential_unless_asked(interface):
    """Bound to a loopback address the admin port asks for no credential; with --admin-auth token it does."""
    assert not adminauth.auth_required(interface, "auto")
    assert adminauth.auth_required(interface, "token")


@pytest.mark.parametrize("interface", ["0.0.0.0", "::", "", "10.0.0.5", "relay.example.com", "2001:db8::1"])
def test_any_other_interface_needs_the_credential(interface):
    """Bound anywhere that is not loopback (all addresses, a LAN address, a name) the credential is required."""
    assert adminauth.auth_required(interface, "auto")


def test_an_admin_api_off_loopback_refuses_to_exist_without_a_credential():
    """A caller that forgot the credential gets an error, not an open admin port."""
    node = Node()
    with pytest.raises(ValueError):
        AdminAPI(node.tunnels, node.metrics, 0.0, node.reactor, interface="0.0.0.0")


def test_off_loopback_every_route_but_healthz_needs_the_token(tmp_path):
    """Without a credential: /healthz answers, the API and /metrics get 401 with WWW-Authenticate, pages go to /login."""
    c = Console(tmp_path, interface="0.0.0.0")
    assert c.get("/healthz")[0] == 200
    for path in ("/v1/tunnels", "/v1/console"):
        status, pairs, body = c.get(path)
        assert status == 401 and header(pairs, b"www-authenticate")
        assert b"tunnels" not in body.split(b"error")[0] and b"acme" not in body
    for path in ("/", "/tokens/acme1/revoke", "/tunnels/x/close"):
        status, pairs, body = c.get(path)
        assert (status, header(pairs, b"location")) == (303, [b"/login"])
        assert b"acme" not in body
    status, _, _ = c.request("POST", "/tunnels/x/close", form={"confirm": "yes"}, headers={"Origin": ORIGIN})
    assert status == 401


def test_a_bearer_token_opens_the_api_and_metrics_and_a_wrong_one_does_not(tmp_path):
    """Authorization: Bearer <admin token> is accepted on every route; another token, or another scheme, is 401."""
    c = Console(tmp_path, interface="0.0.0.0", auth_mode="token")
    good = {"Authorization": b"Bearer " + c.admin_token.encode()}
    assert c.get("/v1/tunnels", headers=good)[0] == 200
    assert c.get("/v1/console", headers=good)[0] == 200
    assert c.get("/", headers=good, keep_cookie=False)[0] == 200
    assert c.get("/metrics", headers=good)[0] == 404  # no metrics page in this node: past the gate
    token = c.admin_token.encode()
    other_last = b"B" if token.endswith(b"A") else b"A"  # a different token, never the same one
    for value in (b"Bearer " + token[:-1] + other_last, b"Bearer ", b"Basic " + c.admin_token.encode(),
                  c.admin_token.encode(), b"Bearer \xff"):
        assert c.get("/v1/tunnels", headers={"Authorization": value})[0] == 401


def test_the_admin_token_file_is_private_and_made_once(tmp_path):
    """The token is made from secrets on first need, mode 0600, and reused after."""
    c = Console(tmp_path, interface="0.0.0.0")
    path = c.state_dir / adminauth.ADMIN_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(c.admin_token) >= 43  # 32 random bytes, urlsafe base64
    assert adminauth.ensure_admin_token(c.state_dir) == c.admin_token


# -- login sessions ---------------------------------------------------------------------


def test_login_sets_an_httponly_samesite_strict_cookie_that_opens_the_console(tmp_path):
    """The right token at /login gives a session cookie (HttpOnly, SameSite=Strict) and the console; logout ends it."""
    c = Console(tmp_path, interface="0.0.0.0")
    status, _, page = c.get("/login")
    assert status == 200 and b'name="token"' in page and c.cookie is None
    status, pairs, _ = c.request("POST", "/login", form={"token": c.admin_token}, headers={"Origin": ORIGIN})
    assert (status, header(pairs, b"location")) == (303, [b"/"])
    [cookie] = header(pairs, b"set-cookie")
    assert b"HttpOnly" in cookie and b"SameSite=strict" in cookie.replace(b"Strict", b"strict")
    assert c.admin_token.encode() not in cookie
    status, _, page = c.get("/")
    assert status == 200 and b"acme" in page
    assert c.get("/v1/console")[0] == 200
    c.request("POST", "/logout", form={"csrf": c.csrf_of(page)}, headers={"Origin": ORIGIN})
    status, _, _ = c.get("/v1/console")
    assert status == 401


def test_a_wrong_token_at_login_gives_no_session_and_one_log_line_per_burst(tmp_path):
    """Wrong tokens are refused with 401 and no cookie; a burst of them logs one line without the token."""
    c = Console(tmp_path, interface="0.0.0.0")
    with capturedLogs() as events:
        for attempt in range(5):
            status, pairs, page = c.request("POST", "/login", form={"token": f"guess-{attempt}"}, headers={"Origin": ORIGIN})
            assert status == 401 and not header(pairs, b"set-cookie") and b"not the admin token" in page
    refused = [e for e in events if "login(s) with a wrong token" in e.get("log_format", "")]
    assert len(refused) == 1
    assert "guess-" not in repr(events) and c.admin_token not in repr(events)


def test_a_login_form_from_another_site_is_refused(tmp_path):
    """Login CSRF: a POST /login with a foreign Origin (or none at all) makes no session, even with the right token."""
    c = Console(tmp_path, interface="0.0.0.0")
    for headers in ({"Origin": b"http://evil.example"}, {"Origin": b"null"}, {}):
        status, pairs, _ = c.request("POST", "/login", form={"token": c.admin_token}, headers=headers)
        assert status == 403 and not header(pairs, b"set-cookie")


def test_a_rotated_token_ends_sessions_and_the_old_bearer(tmp_path):
    """relay-admin admin-token --rotate: the old token and every session made with it stop working at once."""
    c = Console(tmp_path, interface="0.0.0.0")
    old = c.admin_token
    c.request("POST", "/login", form={"token": old}, headers={"Origin": ORIGIN})
    assert c.get("/v1/console")[0] == 200
    new = adminauth.write_new_admin_token(c.state_dir)
    assert new != old
    assert c.get("/v1/console")[0] == 401
    assert c.get("/v1/console", headers={"Authorization": b"Bearer " + old.encode()})[0] == 401
    assert c.get("/v1/console", headers={"Authorization": b"Bearer " + new.encode()})[0] == 200


def test_sessions_are_capped_and_expire():
    """At most MAX_SESSIONS live (the oldest goes first), each for SESSION_SECONDS."""
    from twisted.internet.task import Clock

    clock = Clock()
    sessions = adminauth.Sessions(clock, max_sessions=4, seconds=60)
    made = [sessions.create(1) for _ in range(6)]
    assert len(sessions) == 4
    assert not sessions.valid(made[0], 1) and sessions.valid(made[5], 1)
    assert not sessions.valid(made[5], 2)  # a newer credential
    fresh = sessions.create(1)
    clock.advance(61)
    assert not sessions.valid(fresh, 1)


# -- CSRF and the confirm steps -----------------------------------------------------


def _tunnel(c):
    agent = c.agent()
    reply = agent.open()
    return agent, reply.body["tunnel"]["id"]


def test_get_shows_a_confirm_page_and_changes_nothing(tmp_path):
    """GET of a close or revoke route only renders its confirm form; the tunnel and the token stay."""
    c = Console(tmp_path)
    agent, tunnel_id = _tunnel(c)
    for path in (f"/tunnels/{tunnel_id}/close", "/tokens/acme1/revoke"):
        status, _, page = c.get(path)
        assert status == 200 and b'method="post"' in page and b'name="confirm"' in page
    assert tunnel_id in c.node.tunnels.tunnels and not agent.link.closed
    assert [r.token_id for r in tokens.read_tokens(c.path)] == ["acme1", "beta1"]
    assert c.request("GET", "/tunnels/nope/close")[0] == 404


def test_closing_a_tunnel_needs_the_sessions_csrf_token_and_our_origin_even_on_loopback(tmp_path):
    """On loopback with no login, a POST without the CSRF token, with another session's, or from another Origin is 403; the right one closes."""
    c = Console(tmp_path)
    agent, tunnel_id = _tunnel(c)
    path = f"/tunnels/{tunnel_id}/close"
    _, _, page = c.get(path)
    csrf = c.csrf_of(page)
    other = Console.__new__(Console)
    other.__dict__.update(c.__dict__, cookie=None)
    other.get("/")  # a session of its own
    refused = [
        dict(form={"confirm": "yes"}, headers={"Origin": ORIGIN}),
        dict(form={"confirm": "yes", "csrf": csrf}, headers={"Origin": b"http://evil.example"}),
        dict(form={"confirm": "yes", "csrf": csrf}, headers={"Referer": b"http://evil.example/" }),
        dict(form={"confirm": "yes", "csrf": csrf}, headers={}),
        dict(form={"confirm": "yes", "csrf": csrf + "0"}, headers={"Origin": ORIGIN}),
    ]
    for attempt in refused:
        assert c.request("POST", path, **attempt)[0] == 403, attempt
    assert other.request("POST", path, form={"confirm": "yes", "csrf": csrf}, headers={"Origin": ORIGIN})[0] == 403
    assert c.request("POST", path, form={"confirm": "yes", "csrf": csrf}, keep_cookie=False,
                     headers={"Origin": ORIGIN})[0] == 403  # no cookie: no session for that token
    assert tunnel_id in c.node.tunnels.tunnels
    # Without confirm=yes: back to the confirm page, nothing done.
    status, pairs, _ = c.request("POST", path, form={"csrf": csrf}, headers={"Origin": ORIGIN})
    assert (status, header(pairs, b"location")) == (303, [path.encode()])
    assert tunnel_id in c.node.tunnels.tunnels
    status, _, page = c.request("POST", path, form={"confirm": "yes", "csrf": csrf}, headers={"Referer": ORIGIN + b"/x"})
    assert status == 200 and b"is closed" in page
    assert tunnel_id not in c.node.tunnels.tunnels


def test_a_bearer_post_needs_no_csrf_token(tmp_path):
    """A bearer request is no browser's ambient credential: it may close a tunnel without the CSRF dance."""
    c = Console(tmp_path, interface="0.0.0.0")
    _, tunnel_id = _tunnel(c)
    status, _, _ = c.request("POST", f"/tunnels/{tunnel_id}/close", form={"confirm": "yes"},
                             headers={"Authorization": b"Bearer " + c.admin_token.encode()})
    assert status == 200 and tunnel_id not in c.node.tunnels.tunnels


def test_revoke_from_the_console_closes_that_tokens_agents_and_nobody_elses(tmp_path):
    """The confirmed revoke removes the token from the tokens file and its link gets GOAWAY(AUTH_FAILED); beta's link stays."""
    c = Console(tmp_path, interface="0.0.0.0")
    c.request("POST", "/login", form={"token": c.admin_token}, headers={"Origin": ORIGIN})
    acme, _ = _tunnel(c)
    beta = c.agent(BETA)
    status, _, page = c.get("/tokens/acme1/revoke")
    assert status == 200 and b"agents connected with it</th><td>1" in page
    with capturedLogs() as events:
        status, _, page = c.request("POST", "/tokens/acme1/revoke", form={"confirm": "yes", "csrf": c.csrf_of(page)},
                                    headers={"Origin": ORIGIN})
    assert status == 200 and b"revoked; 1 agent link(s) closed" in page
    goaways = [e for e in acme.pump() if isinstance(e, ev.GoAwayReceived)]
    assert [(g.code, g.message) for g in goaways] == [(ErrorCode.AUTH_FAILED, "token revoked")]
    assert not beta.link.closed
    assert [r.token_id for r in tokens.read_tokens(c.path)] == ["beta1"]
    assert c.store.check_token(ACME) is None
    assert ACME not in repr(events) and c.admin_token not in repr(events)
    # Again: the token is gone, a clear 404.
    _, _, page = c.get("/")
    status, _, page = c.request("POST", "/tokens/acme1/revoke", form={"confirm": "yes", "csrf": c.csrf_of(page)},
                                headers={"Origin": ORIGIN})
    assert status == 404 and b"no token with id" in page


def test_the_host_check_covers_the_console(tmp_path):
    """A rebinding page's Host gets 421 on the console, its JSON and the login, before any credential check."""
    c = Console(tmp_path, interface="0.0.0.0")
    for path in ("/", "/v1/console", "/login", "/tokens/acme1/revoke"):
        assert c.get(path, host=b"evil.example")[0] == 421
    assert c.request("POST", "/login", form={"token": c.admin_token}, host=b"evil.example",
                     headers={"Origin": b"http://evil.example"})[0] == 421


# -- what the console shows ----------------------------------------------------------


def test_the_console_shows_tenants_agents_and_tunnels_never_a_token(tmp_path):
    """Tokens by id and label (escaped), agents with peer and tenant, tunnels with addresses; no agent or admin token anywhere."""
    c = Console(tmp_path, interface="0.0.0.0")
    c.request("POST", "/login", form={"token": c.admin_token}, headers={"Origin": ORIGIN})
    agent, tunnel_id = _tunnel(c)
    status, pairs, page = c.get("/")
    assert status == 200
    [csp] = header(pairs, b"content-security-policy")
    assert b"default-src 'none'" in csp and b"frame-ancestors 'none'" in csp
    assert header(pairs, b"x-frame-options") == [b"DENY"]
    assert b"ci &lt;script&gt;x&lt;/script&gt;" in page and b"<script>x</script>" not in page
    snapshot = json.loads(c.get("/v1/console")[2])
    [row] = snapshot["tunnels"]
    assert row["id"] == tunnel_id and row["tenant"] == "acme" and row["urls"][0].startswith("tcp://relay.example:")
    [link] = snapshot["agents"]
    assert (link["tenant"], link["token_id"], link["token_label"], link["tunnels"]) == ("acme", "acme1", "ci <script>x</script>", 1)
    assert {t["id"] for t in snapshot["tokens"]} == {"acme1", "beta1"}
    for text in (page, json.dumps(snapshot).encode()):
        for secret in (ACME, BETA, c.admin_token, hash_token(ACME).hex()):
            assert secret.encode() not in text


def test_live_bytes_count_open_streams_and_never_fall_when_they_close(tmp_path):
    """A tunnel's bytes include its open streams' counters; when a stream closes its bytes move to the metrics, unchanged."""
    c = Console(tmp_path)
    agent, tunnel_id = _tunnel(c)
    tunnel = c.node.tunnels.tunnels[tunnel_id]
    [link] = tunnel.links

    class Open:  # what the view reads of a MuxStream: its counters
        reported_open = True
        bytes_in, bytes_out = 300, 1200
        tunnel_id = None

    stream = Open()
    stream.tunnel_id = tunnel_id
    link.streams[99] = stream
    per_tunnel, open_now = c.admin.console.live_bytes()
    assert per_tunnel[tunnel_id] == (1200, 300) and open_now == (1200, 300)
    del link.streams[99]
    c.node.metrics.stream_opened(tunnel_id, 0.001)
    c.node.metrics.stream_closed(tunnel_id, 300, 1200)
    per_tunnel, open_now = c.admin.console.live_bytes()
    assert per_tunnel[tunnel_id] == (1200, 300) and open_now == (0, 0)


def test_rates_are_bytes_over_the_last_seconds_and_forget_gone_tunnels():
    """The rate is the bytes moved since the oldest sample of the window, per second; a gone tunnel's samples go."""
    meter = RateMeter()
    assert meter.rates(0.0, {"t": (0, 0)}) == {"t": (0.0, 0.0)}
    assert meter.rates(1.0, {"t": (1000, 10)}) == {"t": (1000.0, 10.0)}
    assert meter.rates(2.0, {"t": (3000, 10)}) == {"t": (1500.0, 5.0)}
    for second in range(3, 12):
        rates = meter.rates(float(second), {"t": (3000 + 100 * (second - 2), 10)})
    assert rates["t"][0] == pytest.approx(100.0, rel=0.25) and rates["t"][1] == 0.0
    meter.rates(12.0, {})
    assert meter._samples == {}


def test_human_bytes():
    """Sizes read in binary units."""
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * 2**20)] == ["0 B", "1023 B", "1.0 KiB", "5.0 MiB"]


# -- relay-admin admin-token -------------------------------------------------------------


def test_relay_admin_prints_the_admin_token_and_rotates_it(tmp_path, capsys):
    """`relay-admin admin-token` makes (once) and prints the token; --rotate replaces it; the file stays 0600."""
    state = tmp_path / "relay-state"
    state.mkdir()
    for _ in range(2):
        with pytest.raises(SystemExit) as done:
            relay_admin(["--state-dir", str(state), "admin-token"])
        assert done.value.code == 0
    first, second = capsys.readouterr().out.split()
    assert first == second == adminauth.read_admin_token(state)
    with pytest.raises(SystemExit):
        relay_admin(["--state-dir", str(state), "admin-token", "--rotate"])
    rotated = capsys.readouterr().out.strip()
    assert rotated != first and rotated == adminauth.read_admin_token(state)
    assert stat.S_IMODE((state / adminauth.ADMIN_TOKEN_FILE).stat().st_mode) == 0o600
    with pytest.raises(SystemExit) as done:
        relay_admin(["--state-dir", str(tmp_path / "missing"), "admin-token"])
    assert done.value.code == 1


@pytest.mark.parametrize("origin, referer, ok", [
    (ORIGIN, None, True),
    (b"https://127.0.0.1:17080", None, True),  # behind a TLS proxy that keeps the Host
    (b"HTTP://127.0.0.1:17080", None, True),
    (b"http://127.0.0.1:17080.evil.example", None, False),
    (b"http://127.0.0.1:1708", None, False),
    (b"null", ORIGIN + b"/", False),  # an Origin that is there decides
    (None, ORIGIN + b"/tunnels/x/close", True),
    (None, ORIGIN + b".evil.example/", False),
    (None, None, False),
])
def test_same_origin_names_exactly_our_host(origin, referer, ok):
    """Origin (or, without one, Referer) must be http(s)://<our Host>, nothing that merely starts like it."""
    assert adminauth.same_origin(origin, referer, OWN) is ok
