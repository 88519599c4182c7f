"""The figures of a run: the metrics and their units, `Results` (values per
round), the summary with medians and the ratios ours / baseline, and the table
printed at the end."""

import statistics

from .context import BASELINES, LABELS, OURS

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


# Said in every report: how to read some of the columns.
READING_NOTES = [
    "startup_ms in the direct column is the baseline: python -c 'import twisted.internet.reactor, OpenSSL'",
    "ssh -R: relay = the private sshd and its session processes, agent = the ssh client; "
    "frp: relay = frps, agent = frpc; ours: relay = twistd relay, agent = tunnel-client",
    "idle figures come from fresh relay/agent processes, after 20 warm-up connections",
]


def build_report(meta: dict, statuses: dict[str, str], res: Results, notes: list[str]) -> dict:
    """Everything the JSON file holds; `statuses`: path -> "ok" or why it did not run."""
    return {
        "meta": meta,
        "scenarios": {s: {"label": LABELS[s], "status": status} for s, status in statuses.items()},
        "metrics": res.summary(),
        "details": res.details,
        "errors": res.errors,
        "notes": notes + READING_NOTES,
    }


def print_report(report: dict, shown: list[str], rounds: int, json_path: str) -> None:
    """The table of medians and ratios, then what did not run, the notes and the errors."""
    print()
    print(f"tunnel-relay benchmark ({report['meta'].get('profile')}, {rounds} round(s), "
          f"{report['meta']['duration_s']} s): median (min-max) over rounds; ratios of medians")
    print(render_table(report["metrics"], shown, rounds))
    for s, scenario in report["scenarios"].items():
        if scenario["status"] != "ok":
            print(f"  {LABELS[s]}: {scenario['status']}")
    for note in report["notes"]:
        print(f"  note: {note}")
    for err in report["errors"]:
        print(f"  error: {err}")
    print(f"  every figure: {json_path}")
