"""What the run is measured on: the tools found (OpenSSH, iperf3), the
versions of what is measured, and the machine."""

import os
import platform
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

from .context import TUNNEL_CLIENT, TWISTD, Context
from .processes import openssh_tools

REPO = Path(__file__).resolve().parents[2]


def check_tools(ctx: Context) -> None:
    if not (TWISTD.exists() and TUNNEL_CLIENT.exists()):
        sys.exit(f"bench: {TWISTD} or {TUNNEL_CLIENT} is missing: run this with the Python that has "
                 "tunnel-relay installed (python3 -m venv .venv && . .venv/bin/activate && pip install .)")
    ctx.tools.update(openssh_tools())
    ctx.tools["iperf3"] = shutil.which("iperf3")
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
        repo = REPO
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
