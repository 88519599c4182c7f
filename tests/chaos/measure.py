"""What the chaos scenarios measure: a process's VmRSS and open fds (from
/proc), a tunnel's 1-byte round trip, byte-exact transfers, and the logs.

The margins live here, one constant each with its reason, so the tests and
scripts/soak.py judge by the same bounds.
"""

import hashlib
import os
import socket
import statistics
import struct
import threading
import time

# Python's allocator keeps freed arenas, so RSS after a flood stays above the
# start; what these bounds catch is growth per message (the unbounded
# replies-owed bug grew 22 MB/s, so a 2 s flood would have added 44 MB).
RSS_MARGIN_BYTES = 24 * 1024 * 1024
# After a flood the descriptors of its visitors and links are closed within a
# reactor turn or two; a few may be in flight when we look (accepts, the
# agent's reconnect, the log file), never hundreds.
FD_MARGIN = 8
# A well-behaved tunnel's 1-byte round trip after the flood: within 2x of
# before, plus 2 ms because loopback medians are a few hundred microseconds
# and the two shared cores add scheduler noise of that size.
RTT_FACTOR = 2.0
RTT_SLACK_SECONDS = 0.002
RTT_SAMPLES = 31
# Lines that must never appear in a relay log or an agent's stderr.
FORBIDDEN_LOG_TEXT = ("Unhandled Error", "Traceback")
# How long "flat after the flood" may take to settle.
SETTLE_SECONDS = 5.0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle_fds(pid: int, limit: int, seconds: float = SETTLE_SECONDS) -> int:
    """Wait (bounded) for `pid`'s fd count to drop to `limit`; the last count."""
    deadline = time.monotonic() + seconds
    count = fd_count(pid)
    while count > limit and time.monotonic() < deadline:
        time.sleep(0.05)
        count = fd_count(pid)
    return count


class RssWatch:
    """The peak VmRSS of some processes, sampled on a thread while a flood runs."""

    def __init__(self, *pids: int, interval: float = 0.05):
        self.pids = pids
        self.peak = {pid: rss_bytes(pid) for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for pid in self.pids:
                try:
                    self.peak[pid] = max(self.peak[pid], rss_bytes(pid))
                except OSError:
                    pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)


def round_trip_seconds(port: int, samples: int = RTT_SAMPLES, timeout: float = 5) -> float:
    """Median time for 1 byte to go through the tunnel at `port` to an echo
    service and back, over one connection (the first exchange is not counted)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for i in range(samples + 1):
            start = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise AssertionError("echo broke")
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def rtt_bound(before: float) -> float:
    return before * RTT_FACTOR + RTT_SLACK_SECONDS


def echo_transfer(port: int, size: int, timeout: float = 30, started: threading.Event | None = None) -> tuple[str, str]:
    """Send `size` random bytes through the echo tunnel at `port` while reading
    the echo; (sha256 sent, sha256 received). `last_transfer` keeps the counts
    and how it ended, for a report."""
    payload = os.urandom(size)
    got = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        def send():
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received, ended = 0, "EOF"
        try:
            while True:
                data = s.recv(262144)
                if not data:
                    break
                received += len(data)
                got.update(data)
                if started is not None:
                    started.set()  # the stream is accepted and flowing
        except OSError as e:
            ended = type(e).__name__
        sender.join(timeout)
    last_transfer.update(size=size, received=received, ended=ended)
    return hashlib.sha256(payload).hexdigest(), got.hexdigest()


last_transfer: dict = {}


def rst_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a visitor that vanishes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def forbidden_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(bad in line for bad in FORBIDDEN_LOG_TEXT)]
