"""Soak: the chaos scenarios (tests/chaos/scenarios.py) at a larger scale,
round after round, for a bounded time; then a table of the worst margin each
reached, and exit status 1 if any bound was violated.

    .venv/bin/python scripts/soak.py --minutes 5 --scale 4

Loopback only: one relay, its agents and services on 127.0.0.1, started from
the installed package next to this interpreter (as tests/e2e/harness.py
does), in a temporary folder that is removed at the end. It stops by itself:
no new scenario starts past the deadline, and a watchdog (SIGALRM) ends the
run WATCHDOG_GRACE_SECONDS after it.
"""

import argparse
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.* and scripts.*

from tests.chaos.scenarios import SCENARIOS, Rig  # noqa: E402

# A scenario at scale 4 takes well under a minute; past the deadline plus
# this, the run is stuck, not slow.
WATCHDOG_GRACE_SECONDS = 180


def _watchdog(signum, frame):
    raise TimeoutError("soak overran its deadline: a scenario is stuck")


def run(minutes: float, scale: float, only: list[str]) -> int:
    chosen = [s for s in SCENARIOS if not only or any(o in s.__name__ for o in only)]
    if not chosen:
        print("no scenario matches", only, file=sys.stderr)
        return 2
    deadline = time.monotonic() + minutes * 60
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(int(minutes * 60 + WATCHDOG_GRACE_SECONDS))
    worst: dict[tuple[str, str], object] = {}
    violations = 0
    rounds = 0
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        rig = Rig(Path(folder))
        try:
            while time.monotonic() < deadline:
                rounds += 1
                for scenario in chosen:
                    if time.monotonic() >= deadline:
                        break
                    started = time.monotonic()
                    try:
                        margins = scenario(rig, scale)
                    except Exception as e:  # a scenario that cannot finish is a violation too
                        frames = traceback.extract_tb(e.__traceback__)
                        where = ([f for f in frames if "chaos" in f.filename] or frames)[-1]
                        errors.append(f"round {rounds} {scenario.__name__}: {type(e).__name__}: {e} "
                                      f"(at {Path(where.filename).name}:{where.lineno})")
                        violations += 1
                        continue
                    for margin in margins:
                        key = (margin.scenario, margin.what)
                        if key not in worst or margin.measured > worst[key].measured:
                            worst[key] = margin
                        if not margin.ok:
                            violations += 1
                            print(f"VIOLATED (round {rounds}): {margin}", flush=True)
                    print(f"round {rounds} {scenario.__name__}: {time.monotonic() - started:.1f} s", flush=True)
        finally:
            signal.alarm(0)
            rig.close()
    print(f"\n{rounds} round(s) at scale {scale:g}, {minutes:g} min; worst value of each margin:\n")
    print(f"{'scenario':34} {'margin':58} {'worst':>10} {'bound':>10}  ok")
    for (scenario, what), margin in worst.items():
        bound = "-" if margin.bound == float("inf") else f"{margin.bound:g}{margin.unit}"
        print(f"{scenario[:34]:34} {what[:58]:58} {margin.measured:>9g}{margin.unit:1} {bound:>10}  "
              f"{'yes' if margin.ok else 'NO'}")
    for error in errors:
        print("ERROR", error)
    print(f"\n{violations} violation(s)")
    return 1 if violations else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5, help="how long to run (default 5)")
    parser.add_argument("--scale", type=float, default=4, help="CHAOS_SCALE of each scenario (default 4)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only scenarios whose name contains NAME (repeatable)")
    args = parser.parse_args(argv)
    return run(args.minutes, args.scale, args.only)


if __name__ == "__main__":
    sys.exit(main())
