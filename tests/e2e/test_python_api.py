"""The Python API, end to end: `forward()` from plain and asyncio code, and
`open_tunnel()` / `close_tunnel()` from Twisted code, against a real relay.

pytest-twisted runs the global reactor in this process, so the plain and
asyncio styles (which run a private reactor on a background thread) are
tested in their own processes: small programs given to the venv's python
with the relay's client.env as their environment, which print JSON lines and
wait for a line on stdin where the test must act while a tunnel is open. The
Twisted style runs here, on pytest-twisted's reactor; its blocking visitors
run in threads so the agent, on the same reactor, can serve them.
"""

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import textwrap
import time

import pytest
import pytest_twisted

import client
from tests.e2e.harness import (
    EchoServer,
    LinkProxy,
    RelayProcess,
    _LineReader,
    connect,
    free_port,
    listening,
    recv_all,
    wait_for,
)

# Both ends of a link notice silence after 3 s; pings every second.
FAST_KEEPALIVE = ["--keepalive-interval", "1", "--keepalive-timeout", "3"]

# Put before every program: helpers it uses to report and to check a tunnel itself.
PRELUDE = '''
import json, os, socket, ssl, sys
from client import forward

def emit(**fields):
    print(json.dumps(fields), flush=True)

def wait_go():
    sys.stdin.readline()

def echo_tcp(host, port, payload):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data == payload, (data, payload)

def echo_tls(hostname, port, payload):
    context = ssl.create_default_context(cafile=os.environ["TUNNEL_CA"])
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname=hostname) as s:
        s.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = s.recv(65536)
            assert chunk, "closed early"
            data += chunk
    assert data == payload, (data, payload)

def echo(tunnel, payload):
    if tunnel.tcp_socket:
        echo_tcp(*tunnel.tcp_socket, payload)
    else:
        echo_tls(*tunnel.tls_socket, payload)
'''


# -- fixtures and helpers ------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """One relay for the happy paths; each test closes its tunnels, and the relay must not log a traceback."""
    r = RelayProcess(tmp_path_factory.mktemp("api") / "relay", tunnel_ports=200).start()
    yield r
    r.stop()
    assert "Traceback" not in r.log(), r.log()


@pytest.fixture(scope="module")
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def relays(tmp_path):
    """Relays with their own options (keepalive, grace); none may log a traceback."""
    started = []

    def start(*extra, name="relay", tunnel_ports=20):
        r = RelayProcess(tmp_path / name, *extra, tunnel_ports=tunnel_ports).start()
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
    for r in started:
        assert "Traceback" not in r.log(), r.log()


class Program:
    """A Python program using the API in its own process: JSON lines out, go-lines in."""

    def __init__(self, code: str, env: dict, cwd):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env, cwd=cwd,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.stdout = _LineReader(self.proc.stdout)
        self.stderr = _LineReader(self.proc.stderr)

    def read(self, timeout: float = 15) -> dict:
        try:
            return json.loads(self.stdout.next_line(timeout))
        except AssertionError:
            raise AssertionError(f"no line from the program; stderr:\n{self.stderr_text()}") from None

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 15) -> int:
        """Wait (bounded) for the program to exit; its exit code."""
        code = self.proc.wait(timeout)
        self.stdout.drain()
        self.stderr.drain()
        return code

    def stderr_text(self) -> str:
        self.stderr.drain(0.5)
        return "\n".join(self.stderr.all)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def programs(tmp_path):
    """Run programs with a relay's client.env (or none); all are killed at the end if still running."""
    started = []

    def run(code: str, relay: RelayProcess | None = None, **env_extra) -> Program:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # `client` comes from the installed package
        for key in ("TUNNEL_RELAY", "TUNNEL_TOKEN", "TUNNEL_CA"):
            env.pop(key, None)
        if relay is not None:
            env.update(relay.client_env())
        env.update(env_extra)
        program = Program(code, env, tmp_path)
        started.append(program)
        return program

    yield run
    for program in started:
        program.kill()


def assert_tcp_echo(port: int, payload: bytes) -> None:
    with connect(port) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, 10) == payload


def assert_tls_echo(relay: RelayProcess, hostname: str, port: int, payload: bytes) -> None:
    """Connect to 127.0.0.1:port with the hostname as SNI, verify with the dev CA, echo."""
    context = ssl.create_default_context(cafile=relay.client_env()["TUNNEL_CA"])
    with context.wrap_socket(connect(port), server_hostname=hostname) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            assert chunk, "the tunnel closed before the echo came back"
            got += chunk
    assert got == payload


def assert_serves(relay: RelayProcess, info: dict, payload: bytes) -> None:
    """`info` is a program's report of a tunnel: tcp_socket or tls_socket."""
    if info.get("tcp_socket"):
        assert_tcp_echo(info["tcp_socket"][1], payload)
    else:
        assert_tls_echo(relay, *info["tls_socket"], payload)


def listed_urls(relay: RelayProcess) -> list[str]:
    return [t["url"] for t in relay.tunnels()]


def no_tunnels(relay: RelayProcess) -> bool:
    return relay.tunnels() == []


# -- importing ----------------------------------------------------------------------------


def test_import_loads_no_twisted(programs):
    """`import client` (and every public name in it) loads no Twisted module and installs no reactor."""
    program = programs("""
        import client
        from client import forward, open_tunnel, close_tunnel, TunnelError
        emit(twisted=sorted(m for m in sys.modules if m == "twisted" or m.startswith("twisted.")))
    """)
    assert program.read() == {"twisted": []}
    assert program.finish() == 0


def test_every_public_name_has_a_docstring():
    """Every name `client` exports is documented where users look (help(), IDEs)."""
    for name in client.__all__:
        assert (getattr(client, name).__doc__ or "").strip(), name


# -- the three calling styles, TCP and TLS ---------------------------------------------------


KINDS = ["tcp", "tls"]


@pytest.mark.parametrize("kind", KINDS)
def test_with_forward(relay, echo, programs, kind):
    """`with forward(port)` gives a live tunnel whose address carries bytes to the port, and closes it on the way out."""
    program = programs(f"""
        with forward({echo.port}, unencrypted={kind == "tcp"}) as tunnel:
            emit(url=tunnel.url, tcp_socket=tunnel.tcp_socket, tls_socket=tunnel.tls_socket,
                 status=tunnel.status)
            wait_go()
        emit(status=tunnel.status)
    """, relay)
    info = program.read()
    assert info["status"] == "live"
    if kind == "tcp":
        assert info["url"] == f"tcp://localhost:{info['tcp_socket'][1]}" and info["tls_socket"] is None
    else:
        hostname, port = info["tls_socket"]
        assert info["url"] == f"https://{hostname}:{port}" and info["tcp_socket"] is None
        assert hostname.endswith(".tunnels.localhost") and port == relay.tls_port
    assert info["url"] in listed_urls(relay)
    assert_serves(relay, info, b"plain code\n" * 1000)
    program.go()
    assert program.read() == {"status": "closed"}
    assert program.finish() == 0
    assert no_tunnels(relay)
    if kind == "tcp":
        assert not listening(info["tcp_socket"][1])


@pytest.mark.parametrize("kind", KINDS)
def test_async_with_forward(relay, echo, programs, kind):
    """`async with forward(port)` gives a live tunnel without blocking the event loop, and closes it on the way out."""
    program = programs(f"""
        import asyncio

        async def main():
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            ticker = asyncio.create_task(tick())
            async with forward({echo.port}, unencrypted={kind == "tcp"}) as tunnel:
                emit(url=tunnel.url, tcp_socket=tunnel.tcp_socket, tls_socket=tunnel.tls_socket,
                     status=tunnel.status, loop_ran=ticks > 0)
                await asyncio.get_running_loop().run_in_executor(None, wait_go)
            ticker.cancel()
            emit(status=tunnel.status)

        asyncio.run(main())
    """, relay)
    info = program.read()
    assert info["status"] == "live" and info["loop_ran"], info
    assert info["url"] in listed_urls(relay)
    assert_serves(relay, info, b"asyncio\n" * 1000)
    program.go()
    assert program.read() == {"status": "closed"}
    assert program.finish() == 0
    assert no_tunnels(relay)


@pytest.fixture
def stop_twisted_agents():
    """The Twisted style keeps its shared link on the global reactor after its
    tunnels close (the next open_tunnel reuses it); end it with the test."""
    yield
    from twisted.internet import defer

    from client import api

    pytest_twisted.blockon(defer.DeferredList([agent.stop() for agent in list(api._agents.values())]))


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.inlineCallbacks
def test_open_tunnel_from_twisted(relay, echo, stop_twisted_agents, kind):
    """open_tunnel() fires with a live tunnel on the caller's reactor; close_tunnel() ends it at the relay."""
    from twisted.internet import threads

    from client import close_tunnel, open_tunnel

    env = relay.client_env()
    tunnel = yield open_tunnel(
        echo.port, unencrypted=kind == "tcp",
        relay=env["TUNNEL_RELAY"], token=env["TUNNEL_TOKEN"], ca=env["TUNNEL_CA"],
    )
    assert tunnel.status == "live"
    info = {"tcp_socket": tunnel.tcp_socket, "tls_socket": tunnel.tls_socket}
    assert (info["tcp_socket"] is None) == (kind == "tls")
    # Visitors block: they run on a thread while this reactor serves them.
    yield threads.deferToThread(assert_serves, relay, info, b"twisted\n" * 1000)
    assert tunnel.url in (yield threads.deferToThread(listed_urls, relay))
    yield close_tunnel(tunnel)
    assert tunnel.status == "closed"
    assert (yield threads.deferToThread(relay.tunnels)) == []


@pytest_twisted.inlineCallbacks
def test_a_stable_name_gives_the_same_address_to_each_new_tunnel(relay, echo, stop_twisted_agents):
    """open_tunnel(name=...) twice, closed in between, gives the same https://NAME-dev hostname and TCP port; a second live claim fails with NameInUseError."""
    from twisted.internet import threads

    from client import close_tunnel, open_tunnel

    env = relay.client_env()
    settings = {"relay": env["TUNNEL_RELAY"], "token": env["TUNNEL_TOKEN"], "ca": env["TUNNEL_CA"]}
    seen = []
    for _ in range(2):
        tls = yield open_tunnel(echo.port, name="pyweb", **settings)
        tcp = yield open_tunnel(echo.port, name="pydb", unencrypted=True, **settings)
        assert tls.hostname == "pyweb-dev.tunnels.localhost"
        info = {"tcp_socket": tcp.tcp_socket, "tls_socket": None}
        yield threads.deferToThread(assert_serves, relay, info, b"named\n" * 1000)
        seen.append((tls.url, tcp.url))
        if len(seen) == 2:
            with pytest.raises(client.NameInUseError):
                yield open_tunnel(echo.port, name="pydb", unencrypted=True, **settings)
        yield close_tunnel(tls)
        yield close_tunnel(tcp)
    assert seen[0] == seen[1]


@pytest_twisted.inlineCallbacks
def test_open_tunnel_errors_arrive_as_failures(stop_twisted_agents, tmp_path):
    """From Twisted code, configuration errors and an unreachable relay arrive as the Deferred's failure, never raised."""
    from client import open_tunnel

    d = open_tunnel(services={"Bad_Name": 8000}, relay="localhost:1", token="t")
    with pytest.raises(client.BadServiceNameError):
        yield d
    started = time.monotonic()
    with pytest.raises(client.RelayUnreachableError):
        yield open_tunnel(8000, relay=f"localhost:{free_port()}", token="t", connect_timeout=1)
    assert 0.9 < time.monotonic() - started < 3


# -- many threads, one link -----------------------------------------------------------------


def test_many_threads_open_and_close_at_once(relay, echo, programs):
    """16 threads x 5 tunnels each, opened and closed at once over one shared link: every address distinct and working, none left at the relay."""
    program = programs(f"""
        import threading

        urls, errors, lock = [], [], threading.Lock()
        start = threading.Barrier(16)

        def worker(n):
            try:
                start.wait()
                for i in range(5):
                    with forward({echo.port}, unencrypted=(n + i) % 2 == 0) as tunnel:
                        echo(tunnel, f"thread {{n}} round {{i}}\\n".encode() * 100)
                        with lock:
                            urls.append(tunnel.url)
                    assert tunnel.status == "closed"
            except Exception as e:
                with lock:
                    errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        emit(urls=urls, errors=errors, alive=sum(t.is_alive() for t in threads))
        wait_go()
    """, relay)
    report = program.read(timeout=60)
    assert report["errors"] == [] and report["alive"] == 0, report
    assert len(report["urls"]) == 80 and len(set(report["urls"])) == 80
    assert {u.split(":")[0] for u in report["urls"]} == {"tcp", "https"}
    assert no_tunnels(relay)
    assert relay.admin("/healthz")["agents"] == 1  # all 80 tunnels shared one link
    program.go()
    assert program.finish() == 0


# -- leaving a `with` by an exception ---------------------------------------------------


def test_exception_inside_with_releases_the_tunnel(relay, echo, programs):
    """An exception raised inside `with` / `async with` propagates, and the tunnel is closed at the relay with its port."""
    program = programs(f"""
        import asyncio

        try:
            with forward({echo.port}, unencrypted=True) as tunnel:
                echo(tunnel, b"before\\n")
                raise ValueError("boom")
        except ValueError as e:
            emit(style="sync", error=str(e), status=tunnel.status, port=tunnel.tcp_socket[1])
        wait_go()

        async def main():
            async with forward({echo.port}, unencrypted=True) as tunnel:
                echo(tunnel, b"before\\n")
                raise KeyError("bang")

        try:
            asyncio.run(main())
        except KeyError as e:
            emit(style="asyncio", error=str(e))
    """, relay)
    sync = program.read()
    assert sync["error"] == "boom" and sync["status"] == "closed"
    assert no_tunnels(relay) and not listening(sync["port"])
    program.go()
    assert program.read() == {"style": "asyncio", "error": "'bang'"}
    assert program.finish() == 0
    assert no_tunnels(relay)


def test_caller_giving_up_while_opening_leaves_no_tunnel(relay, echo, programs):
    """A task cancelled (or timed out) while its tunnel is being opened gets no tunnel, and the relay keeps none that arrived meanwhile."""
    program = programs(f"""
        import asyncio

        async def main():
            async with forward({echo.port}):
                pass  # the link is up: the next opens take one round trip

            async def use_a_tunnel():
                async with forward({echo.port}, unencrypted=True):
                    await asyncio.sleep(10)

            gave_up = 0
            for timeout in (0, 0.0005, 0.001, 0.002, 0.004):
                try:
                    await asyncio.wait_for(use_a_tunnel(), timeout)
                except asyncio.TimeoutError:
                    gave_up += 1
            emit(gave_up=gave_up)
            wait_go()

        asyncio.run(main())
    """, relay)
    assert program.read() == {"gave_up": 5}
    wait_for(lambda: no_tunnels(relay), 5, "every late grant to be given back")
    program.go()
    assert program.finish() == 0


@pytest_twisted.inlineCallbacks
def test_cancelled_open_tunnel_leaves_no_tunnel(relay, echo, stop_twisted_agents):
    """Cancelling open_tunnel()'s Deferred before the grant gives the tunnel back when it arrives."""
    from twisted.internet import defer, reactor, task, threads

    from client import open_tunnel

    env = relay.client_env()
    kwargs = dict(relay=env["TUNNEL_RELAY"], token=env["TUNNEL_TOKEN"], ca=env["TUNNEL_CA"])
    d = open_tunnel(echo.port, unencrypted=True, **kwargs)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        yield d
    yield task.deferLater(reactor, 0.5, lambda: None)  # the grant (if any) arrives, and is given back
    assert (yield threads.deferToThread(relay.tunnels)) == []


# -- errors --------------------------------------------------------------------------------


def test_relay_down_or_silent_raises_unreachable_within_connect_timeout(relay, programs):
    """Nothing listening, or a listener that never answers TLS: RelayUnreachableError once connect_timeout passes, not before and not much later."""
    program = programs(f"""
        import time
        from client import RelayUnreachableError

        with forward(8000):
            pass  # Twisted imported and the reactor thread up: the timings below are the waits

        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts TCP (the kernel does), never speaks TLS
        for name, address in (("down", "localhost:{free_port()}"),
                              ("silent", f"127.0.0.1:{{silent.getsockname()[1]}}")):
            started = time.monotonic()
            try:
                with forward(8000, relay=address, connect_timeout=1.5):
                    emit(name=name, error=None)
            except RelayUnreachableError as e:
                emit(name=name, error=type(e).__name__, seconds=time.monotonic() - started)
    """, relay)
    for name in ("down", "silent"):
        report = program.read()
        assert report["name"] == name and report["error"] == "RelayUnreachableError", report
        assert 1.4 < report["seconds"] < 3, report
    assert program.finish() == 0


def test_bad_token_raises_authentication_error_quickly(relay, programs):
    """A token the relay refuses raises AuthenticationError at once, not after connect_timeout."""
    program = programs("""
        import time
        from client import AuthenticationError

        started = time.monotonic()
        try:
            with forward(8000, token="not-the-token", connect_timeout=20):
                emit(error=None)
        except AuthenticationError as e:
            emit(error=type(e).__name__, seconds=time.monotonic() - started, message=str(e))
    """, relay)
    report = program.read()
    assert report["error"] == "AuthenticationError" and report["seconds"] < 5, report
    assert "not-the-token" not in report["message"]
    assert program.finish() == 0


def test_relay_certificate_from_another_ca_raises_verification_error(relay, programs):
    """A relay whose certificate the given CA did not issue raises RelayVerificationError at once, without a retry."""
    program = programs("""
        import time
        from client import RelayVerificationError

        started = time.monotonic()
        try:
            with forward(8000, ca="/etc/ssl/certs/ca-certificates.crt", connect_timeout=20):
                emit(error=None)
        except RelayVerificationError as e:
            emit(error=type(e).__name__, seconds=time.monotonic() - started)
    """, relay)
    report = program.read()
    assert report["error"] == "RelayVerificationError" and report["seconds"] < 5, report
    assert program.finish() == 0


def test_services_give_one_url_each(relay, echo, programs):
    """services={...} opens one tunnel id with a URL per named service, TLS or TCP by its mode, each reaching its port."""
    program = programs(f"""
        with forward(services={{"web": {echo.port}, "raw": "127.0.0.1:{echo.port}:tcp"}}) as tunnel:
            for name, endpoint in sorted(tunnel.services.items()):
                if endpoint.tcp_socket:
                    echo_tcp(*endpoint.tcp_socket, name.encode())
                else:
                    echo_tls(*endpoint.tls_socket, name.encode())
                emit(name=name, url=endpoint.url, first=tunnel.url)
    """, relay)
    raw, web = program.read(), program.read()
    assert raw["name"] == "raw" and raw["url"].startswith("tcp://localhost:")
    assert web["name"] == "web" and re.fullmatch(r"https://web-[a-z2-7]{16}\.tunnels\.localhost:\d+", web["url"])
    assert web["first"] == web["url"]  # tunnel.url is the first service's
    assert program.finish() == 0
    assert no_tunnels(relay)


def test_bad_service_name_raised_before_dialling(programs):
    """forward() refuses a bad service name itself: before any `with`, before Twisted is even loaded."""
    program = programs("""
        from client import BadServiceNameError, ConfigurationError

        for services in ({"Bad_Name": 8000}, {"12345": 8000}, {"x" * 21: 8000}):
            try:
                forward(services=services, relay="localhost:1", token="t")
                emit(error=None)
            except BadServiceNameError as e:
                emit(error=type(e).__name__, configuration=isinstance(e, ConfigurationError),
                     twisted_loaded="twisted" in sys.modules)
    """)
    for _ in range(3):
        assert program.read() == {"error": "BadServiceNameError", "configuration": True, "twisted_loaded": False}
    assert program.finish() == 0


# -- link loss ------------------------------------------------------------------------------


# Reports the tunnel's status (and url, and error) each time it changes, until
# the block ends on a go-line or on closing.
WATCH = """
    import threading, time

    go = threading.Event()
    threading.Thread(target=lambda: (wait_go(), go.set()), daemon=True).start()
    with forward({port}, unencrypted=True, relay="localhost:{proxy_port}", links=1) as tunnel:
        seen = None
        while not go.is_set():
            now = (tunnel.status, tunnel.url, type(tunnel.error).__name__ if tunnel.error else None)
            if now != seen:
                seen = now
                emit(status=now[0], url=now[1], error=now[2], message=str(tunnel.error or ""))
            if now[0] == "closed":
                break
            time.sleep(0.01)
    emit(status=tunnel.status, exited=True)
"""


def test_cut_link_reconnects_with_the_same_url(relays, echo, programs):
    """A link cut under a live tunnel makes it "reconnecting", then "live" again with the same url, serving again."""
    relay = relays(*FAST_KEEPALIVE)
    proxy = LinkProxy(relay.agent_port)
    try:
        program = programs(WATCH.format(port=echo.port, proxy_port=proxy.port), relay)
        live = program.read()
        assert live["status"] == "live"
        port = int(live["url"].rsplit(":", 1)[1])
        assert_tcp_echo(port, b"before the cut\n")
        assert proxy.cut() == 1  # links=1: its one link (tests/e2e/test_ha.py cuts one of two)
        assert program.read()["status"] == "reconnecting"
        back = program.read()
        assert back["status"] == "live" and back["url"] == live["url"], back
        assert_tcp_echo(port, b"after the cut\n")
        assert proxy.accepted == 2  # one new link, through the same path
        program.go()
        assert program.read() == {"status": "closed", "exited": True}
        assert program.finish() == 0
        assert no_tunnels(relay)
    finally:
        proxy.close()


# With one public port, the expired tunnel's port is in quarantine when the
# agent comes back: the relay cannot even offer a new address.
@pytest.mark.parametrize("tunnel_ports", [20, 1])
def test_link_away_past_grace_closes_with_tunnel_lost(relays, echo, programs, tunnel_ports):
    """A link silent past the relay's grace period ends the tunnel with TunnelLostError when the agent gets back, never with a new url."""
    relay = relays(*FAST_KEEPALIVE, "--grace-seconds", "1", tunnel_ports=tunnel_ports)
    proxy = LinkProxy(relay.agent_port)
    try:
        program = programs(WATCH.format(port=echo.port, proxy_port=proxy.port), relay)
        live = program.read()
        assert live["status"] == "live"
        proxy.blackhole()
        # The relay declares the link dead (3 s of silence), holds the port 1 s, frees it.
        wait_for(lambda: no_tunnels(relay), 10, "the relay to expire the tunnel")
        # The path comes back: the agent's next bytes meet a reset; it reconnects
        # at once and the relay offers only a new address.
        proxy.restore_new()
        proxy.cut(rst=True)
        reports = [program.read()]
        while reports[-1]["status"] != "closed":
            reports.append(program.read())
        lost = reports[-1]
        assert lost["error"] == "TunnelLostError" and live["url"] in lost["message"], reports
        assert {r["url"] for r in reports} == {live["url"]}  # never a new url
        assert program.read() == {"status": "closed", "exited": True}
        assert program.finish() == 0
        wait_for(lambda: no_tunnels(relay), 5, "the new address to be given back")
    finally:
        proxy.close()


# -- fork -------------------------------------------------------------------------------------


def test_forked_child_opens_its_own_tunnel(relay, echo, programs):
    """After os.fork(), the child starts afresh (its own reactor thread and link), opens a working tunnel and exits cleanly; the parent's tunnel is unharmed, even by the child leaving the parent's `with`."""
    program = programs(f"""
        with forward({echo.port}, unencrypted=True) as parent:
            echo(parent, b"parent before\\n")
            pid = os.fork()
            if pid == 0:
                with forward({echo.port}) as child:
                    echo(child, b"child\\n")
                    emit(who="child", url=child.url)
                sys.exit(0)  # SystemExit also leaves the parent's `with` in this process
            _, status = os.waitpid(pid, 0)
            echo(parent, b"parent after\\n")
            emit(who="parent", url=parent.url, child_exit=os.waitstatus_to_exitcode(status),
                 status=parent.status)
    """, relay)
    child = program.read(timeout=30)
    parent = program.read(timeout=30)
    assert child["who"] == "child" and child["url"].startswith("https://")
    assert parent == {"who": "parent", "url": parent["url"], "child_exit": 0, "status": "live"}
    assert program.finish() == 0
    assert "Traceback" not in program.stderr_text(), program.stderr_text()
    assert no_tunnels(relay)
