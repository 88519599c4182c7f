"""What one benchmark run shares between its parts: the programs it starts,
the names of the paths, the run's `Context` (settings, temp folder, children,
notes) and its log line."""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .processes import Proc

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
TUNNEL_CLIENT = BIN / "tunnel-client"
# Run as a script in its own process (the service, delay lines, idle visitors,
# the forward() timer), and imported here for the visitor-side clients.
BENCHNET = str(Path(__file__).resolve().parent / "benchnet.py")

SCENARIOS = ["direct", "ssh", "frp", "tcp", "tls"]
LABELS = {"direct": "direct", "ssh": "ssh -R", "frp": "frp", "tcp": "ours TCP", "tls": "ours TLS"}
OURS = ("tcp", "tls")
BASELINES = ("ssh", "direct", "frp")


class BudgetExceeded(BaseException):
    """The whole run's time limit passed: stop, report what we have."""


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


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

    def spawn(self, name: str, args: list, **kwargs) -> Proc:
        """A child of this run, logging to the temp folder; `cleanup` stops it."""
        proc = Proc(name, args, folder=self.tmp, **kwargs)
        self.procs.append(proc)
        return proc

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
