"""The link's window cap end to end (docs/security.md, "On every link"): many
visitors that start a download and never read keep the relay's memory within a
bound that follows from `--link-buffer-cap`, while another visitor of the same
tunnel still gets its download byte-exact. Real `twistd -n relay` and
`tunnel-client` processes on loopback; every wait is bounded.
"""

import hashlib
import socket
import threading
import time

from tests.e2e.harness import AgentProcess, EchoServer, RelayProcess, connect, recv_all, wait_for

KiB = 1024
MiB = 1024 * KiB
# 2 MiB of stream windows (the first 256 KiB, then shrinking to 4 KiB: 384
# streams fit) and 2 MiB of growth: what the agent can make the relay buffer.
LINK_BUFFER_CAP = 4 * MiB
STALLED = 200
DOWNLOAD_BYTES = 4 * MiB
# What each stalled visitor costs the relay besides the bytes the cap bounds:
# its socket's protocol, splice and stream objects (2.4 KiB idle, measured by
# scripts/bench.py) and partial-write slack; and the allocator's margin (Python
# keeps freed arenas). Before the cap, each of them held a 256 KiB window
# (50 MiB for 200) plus whatever growth the 64 MiB budget lent.
PER_VISITOR_BYTES = 16 * KiB
RSS_MARGIN_BYTES = 16 * MiB
CONTENT = hashlib.sha256(b"link-buffer-cap").digest() * (DOWNLOAD_BYTES // 32)


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class DownloadServer(EchoServer):
    """Sends CONTENT to each connection, then closes its write side."""

    def handle(self, conn):
        conn.sendall(CONTENT)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass


def stalled_visitor(port: int) -> socket.socket:
    s = socket.socket()
    # A small receive buffer before connecting: the kernel holds little of the
    # download, so what the relay buffers shows in its own memory.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def test_stalled_downloads_keep_the_relay_within_the_cap_and_a_neighbour_stays_byte_exact(tmp_path):
    """200 visitors that never read a 4 MiB download keep the relay's VmRSS within its baseline
    + the 4 MiB link cap + 16 KiB per visitor + 16 MiB; another visitor of the same tunnel
    downloads byte-exact meanwhile, and none is refused."""
    relay = RelayProcess(tmp_path / "relay", f"--link-buffer-cap={LINK_BUFFER_CAP}", tunnel_ports=4).start()
    server = DownloadServer()
    agent = AgentProcess(relay, "forward", str(server.port), "--unencrypted")
    visitors = []
    try:
        _, port = agent.address()
        with connect(port) as warm:  # the data path's code and buffers, before the baseline
            assert recv_all(warm) == CONTENT
        time.sleep(0.5)
        baseline = vm_rss(relay.proc.pid)
        for _ in range(STALLED):
            visitors.append(stalled_visitor(port))
        wait_for(lambda: server.accepted >= STALLED + 1, 30, "the service to get every stalled visitor")
        time.sleep(2.0)  # the downloads fill every window and socket buffer on the way
        peak = vm_rss(relay.proc.pid)

        result = {}

        def download():
            with connect(port) as s:
                result["sha"] = hashlib.sha256(recv_all(s, timeout=60)).hexdigest()

        neighbour = threading.Thread(target=download, daemon=True)
        neighbour.start()
        deadline = time.monotonic() + 60
        while neighbour.is_alive() and time.monotonic() < deadline:
            peak = max(peak, vm_rss(relay.proc.pid))
            neighbour.join(0.1)
        assert not neighbour.is_alive(), "the neighbour's download did not finish within 60 s"
        assert result["sha"] == hashlib.sha256(CONTENT).hexdigest()

        bound = baseline + LINK_BUFFER_CAP + STALLED * PER_VISITOR_BYTES + RSS_MARGIN_BYTES
        grown = peak - baseline
        assert peak <= bound, (
            f"relay VmRSS grew {grown / MiB:.1f} MiB with {STALLED} stalled downloads "
            f"(bound {(bound - baseline) / MiB:.1f} MiB)"
        )
        refused = relay.admin("/healthz")
        assert "link_buffer_cap" not in str(refused), refused
        print(f"relay VmRSS: baseline {baseline / MiB:.1f} MiB, peak +{grown / MiB:.1f} MiB")
    finally:
        for s in visitors:
            s.close()
        agent.stop()
        server.close()
        relay.stop()
