"""The admin port's credential against a real `twistd relay`, with curl:
open on loopback, the admin token everywhere else (docs/security.md)."""

import stat
import subprocess

from tests.e2e.harness import RelayProcess
from tests.e2e.test_tenants import admin as relay_admin


def curl(relay: RelayProcess, path: str, *args: str) -> tuple[int, str]:
    """(HTTP status, body) of a GET to the admin port at 127.0.0.1."""
    done = subprocess.run(
        ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10", *args,
         f"http://127.0.0.1:{relay.admin_port}{path}"],
        capture_output=True, text=True, timeout=20,
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def test_on_loopback_the_console_needs_no_token_and_none_is_made(tmp_path):
    """The development default: the console and the API answer without a credential; no admin-token file appears."""
    relay = RelayProcess(tmp_path / "relay").start()
    try:
        status, page = curl(relay, "/")
        assert status == 200 and "tunnel-relay console" in page
        assert curl(relay, "/v1/console")[0] == 200
        assert not (relay.state_dir / "admin-token").exists()
    finally:
        relay.stop()


def test_off_loopback_every_route_but_healthz_needs_the_admin_token(tmp_path):
    """Bound to 0.0.0.0: the first start makes admin-token (0600) and logs how to print it (not the token);
    /healthz answers anyone, the rest want Authorization: Bearer; a rotated token ends the old one at once."""
    relay = RelayProcess(tmp_path / "relay", "--admin-interface=0.0.0.0").start()
    try:
        path = relay.state_dir / "admin-token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = relay_admin(relay, "admin-token").stdout.strip()
        assert token == path.read_text().strip()
        assert f"relay-admin --state-dir {relay.state_dir} admin-token" in relay.log()
        assert curl(relay, "/healthz")[0] == 200
        for route in ("/v1/tunnels", "/v1/console", "/metrics"):
            status, body = curl(relay, route)
            assert status == 401 and "Bearer" in body, (route, body)
        status, _ = curl(relay, "/")
        assert status == 303
        bearer = ("-H", f"Authorization: Bearer {token}")
        assert curl(relay, "/v1/console", *bearer)[0] == 200
        status, metrics = curl(relay, "/metrics", *bearer)
        assert status == 200 and "tunnel_relay_links" in metrics
        rotated = relay_admin(relay, "admin-token", "--rotate").stdout.strip()
        assert rotated != token
        assert curl(relay, "/v1/console", *bearer)[0] == 401
        assert curl(relay, "/v1/console", "-H", f"Authorization: Bearer {rotated}")[0] == 200
    finally:
        relay.stop()
    assert token not in relay.log() and rotated not in relay.log()
