"""The container's health check (deploy/docker/entrypoint.sh `healthcheck`).

    healthcheck relay   GET /healthz on the relay's admin port (loopback,
                        RELAY_ADMIN_PORT, default 17080): healthy if it answers
                        {"status": "ok"}.
    healthcheck agent   GET /metrics on the agent's TUNNEL_METRICS_PORT: healthy
                        while tunnel_agent_links_active is 1 (the link to the
                        relay is up), as the Tines tunnel's metrics port tells.

The mode defaults to TUNNEL_HEALTHCHECK, else relay. Exit 0 healthy, 1 not,
with one line saying why (docker inspect shows it). Stdlib only, 5 s at most.
"""

import json
import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 5


def _port(text: str) -> int:
    """'9100', '0.0.0.0:9100' or '[::]:9100' -> 9100."""
    return int(text.rsplit(":", 1)[-1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
        return response.read()


def check_relay() -> str | None:
    port = _port(os.environ.get("RELAY_ADMIN_PORT") or "17080")
    body = json.loads(_get(f"http://127.0.0.1:{port}/healthz"))
    if body.get("status") != "ok":
        return f"relay /healthz says {body.get('status')!r}"
    return None


def check_agent() -> str | None:
    port_text = os.environ.get("TUNNEL_METRICS_PORT")
    if not port_text:
        return "TUNNEL_METRICS_PORT is not set: the agent serves no metrics to check"
    text = _get(f"http://127.0.0.1:{_port(port_text)}/metrics").decode()
    for line in text.splitlines():
        if line.startswith("tunnel_agent_links_active "):
            if float(line.split()[1]) >= 1:
                return None
            return "the agent has no link to the relay"
    return "tunnel_agent_links_active missing from /metrics"


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else os.environ.get("TUNNEL_HEALTHCHECK") or "relay"
    checks = {"relay": check_relay, "agent": check_agent}
    if mode not in checks:
        print(f"healthcheck: unknown mode {mode!r} (relay or agent)", file=sys.stderr)
        return 2
    try:
        problem = checks[mode]()
    except (OSError, ValueError, urllib.error.URLError) as e:
        problem = f"{mode} not answering: {e}"
    if problem:
        print(f"healthcheck: unhealthy: {problem}", file=sys.stderr)
        return 1
    print(f"healthcheck: {mode} healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
