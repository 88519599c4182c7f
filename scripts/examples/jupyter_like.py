"""A notebook-style server behind an encrypted tunnel, as Jupyter is run on Modal.

Starts a small web server on a free local port whose page opens only with a
random token (`/?token=...`, as Jupyter's), gives it a public https:// URL
with `forward()`, prints the URL with the token, and serves until Ctrl-C or
`--seconds` have passed. Closing the `with` block ends the tunnel.

    twistd -n relay                                  # in one shell (dev defaults)
    set -a; . relay-state/client.env; set +a         # in another
    python scripts/examples/jupyter_like.py          # or --seconds 60
    # Notebook at https://<id>.tunnels.localhost:17443/?token=...
    curl --cacert relay-state/ca.pem 'https://<id>.tunnels.localhost:17443/?token=...'
"""

import argparse
import hmac
import http.server
import secrets
import threading
import urllib.parse

from client import forward


def start_notebook_server(token: str) -> http.server.ThreadingHTTPServer:
    """A page on 127.0.0.1:<free port> that needs ?token=<token>; served on a thread."""

    class Notebook(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            given = query.get("token", [""])[0]
            if hmac.compare_digest(given.encode(), token.encode()):
                status, body = 200, b"<h1>Your notebook</h1><p>In [1]: 6 * 7<br>Out[1]: 42</p>\n"
            else:
                status, body = 403, b"<h1>403</h1><p>This notebook needs its ?token=...</p>\n"
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass  # keep stdout for the URL

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Notebook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    args = parser.parse_args()

    token = secrets.token_urlsafe(13)
    server = start_notebook_server(token)
    try:
        with forward(server.server_port) as tunnel:
            print(f"Notebook at {tunnel.url}/?token={token}", flush=True)
            threading.Event().wait(args.seconds)  # Ctrl-C ends the wait (and the tunnel)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    print("Stopped.", flush=True)


if __name__ == "__main__":
    main()
