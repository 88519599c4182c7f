"""The workloads, each run on one `Stack` and adding its figures to `Results`:
bulk both ways (+ CPU per GB), iperf3, many streams, ping-pong, new
connections, the WAN line, startup and forward() timings; the check after
each (`settle`), and the idle phase on fresh processes (RSS per visitor)."""

import json
import re
import statistics
import subprocess
import sys
import time

from . import benchnet as net
from .context import BENCHNET, LABELS, OURS, TUNNEL_CLIENT, Context
from .processes import cpu_delta, free_port
from .report import Results
from .stacks import SSH_FORWARD_ONLY, Relay, Stack, frp_stack, frpc_config, ours_stack, ssh_stack


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


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
    proc = ctx.spawn(name, args, env=env, stderr_lines=stderr)
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
            args = ctx.sshd.ssh_args(ctx.sshd.port, log_level="INFO",
                                     options=SSH_FORWARD_ONLY + ["-R", f"127.0.0.1:0:127.0.0.1:{echo}"])
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
        visitors = ctx.spawn(f"idle-visitors-{name}", [
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
