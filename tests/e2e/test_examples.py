"""The examples in scripts/examples/, run as a user would: their own process,
with the relay's client.env as the environment, driven through the tunnel
they print, and stopped with Ctrl-C (SIGINT) within a bounded time.
"""

import http.client
import re
import signal
import socket
import ssl
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from tests.e2e.harness import PrivateSSHD, RelayProcess, _LineReader, free_port, openssh_tools, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "scripts" / "examples"


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    r = RelayProcess(tmp_path_factory.mktemp("examples") / "relay").start()
    yield r
    r.stop()
    assert "Traceback" not in r.log(), r.log()


class Example:
    """scripts/examples/<name> running in its own process."""

    def __init__(self, relay: RelayProcess, name: str, *args: str, cwd: Path):
        import os

        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # `client` comes from the installed package
        env.update(relay.client_env())
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args], env=env, cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.stdout = _LineReader(self.proc.stdout)
        self.stderr = _LineReader(self.proc.stderr)

    def line(self, timeout: float = 20) -> str:
        try:
            return self.stdout.next_line(timeout)
        except AssertionError:
            self.stderr.drain(0.5)
            raise AssertionError("no line from the example; stderr:\n" + "\n".join(self.stderr.all)) from None

    def interrupt(self, timeout: float = 10) -> int:
        """Ctrl-C; the exit code, which must come within `timeout`."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self.stdout.drain()
        self.stderr.drain()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def examples(tmp_path):
    started = []

    def run(relay, name, *args):
        example = Example(relay, name, *args, cwd=tmp_path)
        started.append(example)
        return example

    yield run
    for example in started:
        example.kill()


def https_get(relay: RelayProcess, url: str, timeout: float = 10) -> tuple[int, bytes]:
    """GET an https://<id>.tunnels.localhost URL: to 127.0.0.1, with its hostname as SNI, verified by the dev CA."""
    parts = urllib.parse.urlsplit(url)
    context = ssl.create_default_context(cafile=relay.client_env()["TUNNEL_CA"])

    class Loopback(http.client.HTTPSConnection):
        def connect(self):
            sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
            self.sock = context.wrap_socket(sock, server_hostname=self.host)

    connection = Loopback(parts.hostname, parts.port, timeout=timeout, context=context)
    try:
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_jupyter_like(relay, examples):
    """jupyter_like.py prints an https URL with a token; the page opens with that token only, and Ctrl-C closes the tunnel."""
    example = examples(relay, "jupyter_like.py", "--seconds", "60")
    match = re.fullmatch(r"Notebook at (https://[a-z2-7]{16}\.tunnels\.localhost:\d+)/\?token=(\S+)", example.line())
    assert match, "unexpected first line"
    base, token = match.groups()
    assert [t["url"] for t in relay.tunnels()] == [base]
    status, body = https_get(relay, f"{base}/?token={token}")
    assert status == 200 and b"Your notebook" in body
    assert https_get(relay, f"{base}/?token=wrong")[0] == 403
    assert https_get(relay, f"{base}/")[0] == 403
    assert example.interrupt() == 0
    assert example.stdout.all[-1] == "Stopped."
    assert relay.tunnels() == []


def test_jupyter_like_stops_after_seconds(relay, examples):
    """With --seconds, the example ends by itself and closes its tunnel."""
    example = examples(relay, "jupyter_like.py", "--seconds", "1")
    assert example.line().startswith("Notebook at https://")
    assert example.proc.wait(10) == 0
    assert relay.tunnels() == []


def test_tunnel_hub(relay, examples):
    """POST /start on the hub redirects (303) to a fresh tunnel URL serving that caller's own page; each caller gets another; Ctrl-C closes them all."""
    port = free_port()
    example = examples(relay, "tunnel_hub.py", "--port", str(port))
    assert example.line() == f"Tunnel hub at http://127.0.0.1:{port}/"

    hub = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    hub.request("GET", "/")
    response = hub.getresponse()
    assert response.status == 200 and b'<form method="post" action="/start">' in response.read()

    pages = {}
    for _ in range(2):
        hub.request("POST", "/start")
        response = hub.getresponse()
        response.read()
        assert response.status == 303
        location = response.getheader("Location")
        session, url = re.fullmatch(r"session ([0-9a-f]{16}) -> (\S+)", example.line()).groups()
        assert location == url and url.startswith("https://") and url.endswith(".tunnels.localhost:%d/" % relay.tls_port)
        status, body = https_get(relay, location)
        assert status == 200 and f"Private server {session}".encode() in body
        pages[location] = body
    hub.close()
    assert len(pages) == 2 and len(set(pages.values())) == 2  # two callers, two servers, two URLs
    assert sorted(t["url"] + "/" for t in relay.tunnels()) == sorted(pages)

    assert example.interrupt() == 0
    assert relay.tunnels() == []


@pytest.mark.skipif(
    not all(openssh_tools().values()),
    reason="openssh-client/openssh-server not installed (.ci/run installs them)",
)
def test_ssh_tunnel(relay, examples, tmp_path):
    """ssh_tunnel.py prints an `ssh -p PORT user@host` command that reaches the local sshd through the tunnel."""
    sshd = PrivateSSHD(tmp_path / "sshd")
    try:
        example = examples(relay, "ssh_tunnel.py", "--port", str(sshd.port), "--user", "someone")
        match = re.fullmatch(r"ssh -p (\d+) someone@(\S+)", example.line())
        assert match, "unexpected first line"
        port, host = int(match.group(1)), match.group(2)
        assert [t["url"] for t in relay.tunnels()] == [f"tcp://{host}:{port}"]
        out = subprocess.run(
            sshd.ssh_args(port, host) + ["echo", "through the tunnel"], capture_output=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"through the tunnel\n"
        assert example.interrupt() == 0
        wait_for(lambda: relay.tunnels() == [], 5, "the tunnel to close")
    finally:
        sshd.stop()
