"""At the open-file limit the relay keeps a reserve: visitors past it are
closed at once, while the admin port and new agent links are still served."""

import socket
import time

from tests.e2e.harness import AgentProcess, RelayProcess, connect, wait_for

NOFILE = 200


class LimitedRelay(RelayProcess):
    """A relay started under `prlimit --nofile=N:N` (both limits, so it cannot raise them)."""

    def args(self) -> list[str]:
        return ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--", *super().args()]


def test_visitors_past_the_reserve_are_closed_and_agents_and_admin_still_served(tmp_path, echo):
    """With 300 visitors against a 200-file limit, /healthz answers, a new agent gets a tunnel, no traceback is logged, and visitors work again after."""
    relay = LimitedRelay(tmp_path / "relay").start()
    first = second = None
    held = []
    try:
        first = AgentProcess(relay, "forward", str(echo.port), "--unencrypted")
        host, port = first.address()
        for _ in range(300):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(1.0)
        health = relay.admin("/healthz")  # the admin port is still served
        assert health["visitors_refused"].get("out_of_files", 0) > 0
        second = AgentProcess(relay, "forward", str(echo.port), "--unencrypted")
        second.address(timeout=20)  # a new agent link still logs in and gets a tunnel
        for sock in held:
            sock.close()
        held = []

        def echoes():
            try:
                with connect(port) as sock:
                    sock.sendall(b"ping\n")
                    return sock.recv(16) == b"ping\n"
            except OSError:
                return False

        wait_for(echoes, 20, "a visitor served again once the flood is gone")
        log = relay.log()
        assert "Traceback" not in log and "Unhandled Error" not in log
        assert log.count("open files near the limit") <= 3  # one line per burst, not per visitor
    finally:
        for sock in held:
            sock.close()
        for agent in (first, second):
            if agent is not None:
                agent.stop()
        relay.stop()
