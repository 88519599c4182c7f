"""Processes on loopback, for the benchmark and the end-to-end tests
(tests/e2e/harness.py imports these; one copy, so the two cannot drift):
free ports and port blocks, one bounded wait, whether a port listens (read
from /proc: no probe connection), stopping a child within a bound, `Proc` (a
child whose output lines are collected on threads), the CPU seconds and RSS
of a process or a process tree (psutil if installed, else /proc), and a
private OpenSSH server.

No dependency beyond the stdlib, and nothing about tunnels: what the
processes are is the caller's (bench stacks.py, the harness's RelayProcess),
as is what is measured through them (workloads.py).
"""

import getpass
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


def listening(port: int) -> bool:
    """Is something on this machine listening on `port` (any local address)? Read
    from /proc, no connection made: a probe connection would reach the service
    through a tunnel, and the relay would log it as a visitor."""
    want = f":{port:04X}"
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and parts[1].endswith(want):
                        return True
        except OSError:
            continue
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing holds now (the kernel's pick; another process may take it
    before the caller binds it, which loopback tests accept)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Blocks of tunnel ports for test and benchmark relays: above a development
# relay's 20000-29999 (README: tests pass while one runs, and its tunnels take
# ports from that range at any time) and below the kernel's ephemeral range
# (32768-60999), from which free_port() and every outgoing connection draw.
PORT_BLOCK_LOW, PORT_BLOCK_HIGH = 30000, 32767


def free_port_range(count: int, low: int = PORT_BLOCK_LOW, high: int = PORT_BLOCK_HIGH) -> tuple[int, int]:
    """A block of `count` ports that nothing holds now, outside a development
    relay's range and below the ephemeral range, as (first, last)."""
    for _ in range(200):
        start = random.randint(low, high - count)
        ok = True
        for port in range(start, start + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return start, start + count - 1
    raise RuntimeError("no free block of ports")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """`predicate()`'s first true value, polled every `interval` s; TimeoutError
    naming `what` once `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def stop_process(p: subprocess.Popen, timeout: float, sig: int = signal.SIGTERM) -> int:
    """Signal `p` (SIGTERM unless told) if it still runs, give it `timeout` s to
    exit, then SIGKILL; its exit code."""
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    return p.returncode


class Proc:
    """A child process: stdout (and optionally stderr) lines collected on threads,
    and copied with the rest of its output to `folder`/`name`.log."""

    def __init__(self, name: str, args: list, *, folder: Path, env=None, cwd=None, stdin_pipe=False,
                 stderr_lines=False):
        self.name = name
        self.args = [str(a) for a in args]
        self.lines: list[str] = []
        self.err_lines: list[str] = []
        self.log_path = Path(folder) / f"{name}.log"
        self._cond = threading.Condition()
        self._log_file = open(self.log_path, "ab")
        self.started = time.perf_counter()
        self.p = subprocess.Popen(
            self.args, cwd=cwd or folder, env=env,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr_lines else self._log_file,
        )
        self.pid = self.p.pid
        threading.Thread(target=self._read, args=(self.p.stdout, self.lines), daemon=True).start()
        if stderr_lines:
            threading.Thread(target=self._read, args=(self.p.stderr, self.err_lines), daemon=True).start()

    def _read(self, stream, out: list) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                out.append(line)
                self._cond.notify_all()
            try:
                self._log_file.write(raw)
                self._log_file.flush()
            except (ValueError, OSError):
                pass
        stream.close()

    def wait_line(self, match, timeout: float, stderr: bool = False) -> tuple[str, float]:
        """The first line (from the start) that `match` accepts, and when it came
        (seconds since start); TimeoutError otherwise."""
        lines, seconds = self.wait_lines(match, 1, timeout, stderr)
        return lines[0], seconds

    def wait_lines(self, match, count: int, timeout: float, stderr: bool = False) -> tuple[list[str], float]:
        out = self.err_lines if stderr else self.lines
        deadline = time.monotonic() + timeout
        seen = 0
        found: list[str] = []
        with self._cond:
            while True:
                while seen < len(out):
                    line = out[seen]
                    seen += 1
                    if match(line):
                        found.append(line)
                        if len(found) == count:
                            return found, time.perf_counter() - self.started
                if self.p.poll() is not None:
                    raise RuntimeError(f"{self.name} exited {self.p.returncode}: {self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no expected output within {timeout:g} s: {self.tail()}")
                self._cond.wait(min(left, 0.05))

    def tail(self, n: int = 6) -> str:
        text = ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            pass
        lines = (text.splitlines() or self.lines + self.err_lines)[-n:]
        return re.sub(r"\x1b\[[0-9;]*m", "", " | ".join(lines))[-800:]

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 5) -> None:
        if self.p.stdin:
            try:
                self.p.stdin.close()
            except OSError:
                pass
        stop_process(self.p, timeout)
        try:
            self._log_file.close()
        except OSError:
            pass


# -- CPU and memory of processes (psutil if present, else /proc) ---------------------------

try:
    import psutil
except ImportError:  # the README install has no psutil: /proc gives the same figures
    psutil = None

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            return [pid] + [c.pid for c in proc.children(recursive=True)]
        except psutil.Error:
            return []
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float | None:
    if psutil is not None:
        try:
            t = psutil.Process(pid).cpu_times()
            return t.user + t.system
        except psutil.Error:
            return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


def rss_bytes(pid: int) -> int:
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class Side:
    """The relay side or the agent side of a path: one process, or a process tree (sshd)."""

    def __init__(self, pid: int, tree: bool = False):
        self.pid, self.tree = pid, tree

    def pids(self) -> list[int]:
        return process_tree(self.pid) if self.tree else [self.pid]

    def cpu(self) -> dict[int, float]:
        out = {}
        for pid in self.pids():
            value = cpu_seconds(pid)
            if value is not None:
                out[pid] = value
        return out

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids())


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


# -- a private OpenSSH server ------------------------------------------------------------


def openssh_tools() -> dict[str, str | None]:
    """Where ssh, ssh-keygen and sshd are; None for a missing one. sshd is
    looked for in /usr/sbin too: it is often not on a user's PATH."""
    tools = {tool: shutil.which(tool) for tool in ("ssh", "ssh-keygen")}
    tools["sshd"] = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)
    return tools


class PrivateSSHD:
    """A private OpenSSH server on a free loopback port: its own config, host key
    and authorized_keys in `folder`; never the system's sshd or its config.
    Public key login as the current user; `ssh_args` gives a client command
    line that trusts nothing global either."""

    def __init__(self, folder: Path, env: dict | None = None, timeout: float = 15):
        self.tools = openssh_tools()
        missing = [tool for tool, path in self.tools.items() if path is None]
        if missing:
            raise RuntimeError(f"OpenSSH is not installed: no {', '.join(missing)}")
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        for key in (self.host_key, self.client_key):
            subprocess.run([self.tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True, timeout=30, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        (self.dir / "authorized_keys").write_text((self.dir / "client_ed25519.pub").read_text())
        self.config = self.dir / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.dir}/authorized_keys\nPidFile {self.dir}/sshd.pid\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nGatewayPorts no\n"
            "LogLevel ERROR\n"
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # privilege separation folder
        self.proc = Proc("sshd", [self.tools["sshd"], "-D", "-e", "-f", self.config], folder=self.dir, env=env)
        wait_for(lambda: listening(self.port) or not self.proc.alive(), timeout, "sshd")
        if not self.proc.alive():
            raise RuntimeError(f"sshd exited: {self.proc.tail()}")

    def ssh_args(self, port: int, host: str = "127.0.0.1", *, options: list[str] = (),
                 log_level: str = "ERROR") -> list[str]:
        """An ssh command line to this server, reached at host:port (itself, or a
        tunnel or delay line in front of it), ending with the destination: a remote
        command may follow. `options` (e.g. `-N`, `-R ...`) go before it."""
        return [
            self.tools["ssh"], "-F", "/dev/null", "-i", str(self.client_key), "-p", str(port),
            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.dir}/known_hosts",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", f"LogLevel={log_level}",
            *options, f"{self.user}@{host}",
        ]

    def stop(self) -> None:
        """Stop sshd, and the session processes it forked for clients that are still on."""
        pids = process_tree(self.proc.pid)
        self.proc.stop(3)
        for pid in pids[1:]:  # sessions of clients that are gone already end by themselves
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
