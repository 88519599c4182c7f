"""A tiny "hub": every visitor who presses Start gets a private web server
with its own public https:// URL, started on demand (Modal's "programmable
start-up", with a tunnel per request instead of a container).

GET / shows a form; POST /start starts a fresh server on a free local port
with a page of its own, opens an encrypted tunnel to it with the Twisted
form of the API (`open_tunnel()` returns a Deferred: klein runs on the
reactor, which must never block), and redirects (303) to the tunnel's URL.
Each server and its tunnel end after `--lifetime` seconds, or when the hub
stops (Ctrl-C).

    set -a; . relay-state/client.env; set +a
    python scripts/examples/tunnel_hub.py --port 8080
    curl -si -X POST http://127.0.0.1:8080/start | grep -i location
    # location: https://<id>.tunnels.localhost:17443/
"""

import argparse
import html
import http.server
import secrets
import threading

from klein import Klein
from twisted.internet import defer, endpoints, task, threads
from twisted.web.server import Site

from client import TunnelError, close_tunnel, open_tunnel

FORM = b"""<!doctype html>
<title>Tunnel hub</title>
<h1>Tunnel hub</h1>
<form method="post" action="/start"><button>Start my server</button></form>
"""


def start_private_server(session: str) -> http.server.ThreadingHTTPServer:
    """A fresh web server on 127.0.0.1:<free port>, serving a page for this session only."""
    body = f"<!doctype html><h1>Private server {session}</h1>\n".encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Hub:
    app = Klein()  # routes bound to each Hub instance (klein's "non-global state")

    def __init__(self, reactor, lifetime_seconds: float):
        self.reactor = reactor
        self.lifetime_seconds = lifetime_seconds
        self.sessions = {}  # session -> (server, tunnel)

    @app.route("/", methods=["GET"])
    def index(self, request):
        request.setHeader("Content-Type", "text/html; charset=utf-8")
        return FORM

    @app.route("/start", methods=["POST"])
    @defer.inlineCallbacks
    def start(self, request):
        # ... a real hub would check the caller's credentials here.
        session = secrets.token_hex(8)
        server = start_private_server(session)
        try:
            tunnel = yield open_tunnel(server.server_port, reactor=self.reactor)
        except TunnelError as e:
            yield threads.deferToThread(server.shutdown)
            request.setResponseCode(502)
            request.setHeader("Content-Type", "text/plain; charset=utf-8")
            return f"could not open a tunnel: {html.escape(str(e))}\n".encode()
        self.sessions[session] = (server, tunnel)
        self.reactor.callLater(self.lifetime_seconds, self.stop_session, session)
        print(f"session {session} -> {tunnel.url}/", flush=True)
        request.setResponseCode(303)
        request.setHeader("Location", f"{tunnel.url}/")
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        return f"Your server: {tunnel.url}/\n".encode()

    @defer.inlineCallbacks
    def stop_session(self, session: str):
        entry = self.sessions.pop(session, None)
        if entry is not None:
            server, tunnel = entry
            yield close_tunnel(tunnel)
            yield threads.deferToThread(server.shutdown)  # shutdown() blocks: not on the reactor

    def stop_all(self):
        return defer.DeferredList([self.stop_session(s) for s in list(self.sessions)])


async def main(reactor, argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="where the hub listens, on 127.0.0.1")
    parser.add_argument("--lifetime", type=float, default=900, help="seconds each private server lives")
    args = parser.parse_args(argv)

    hub = Hub(reactor, args.lifetime)
    endpoint = endpoints.TCP4ServerEndpoint(reactor, args.port, interface="127.0.0.1")
    await endpoint.listen(Site(hub.app.resource()))
    reactor.addSystemEventTrigger("before", "shutdown", hub.stop_all)  # Ctrl-C closes every tunnel
    print(f"Tunnel hub at http://127.0.0.1:{args.port}/", flush=True)
    await defer.Deferred()  # serve until the reactor stops


if __name__ == "__main__":
    import sys

    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
