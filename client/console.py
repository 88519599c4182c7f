"""tunnel-client's live status view in a terminal, made with rich (like ngrok's console).

What it is: the reactor takes a snapshot of the agent REFRESH_PER_SECOND
times a second (its tunnels and addresses, the link and its round-trip time,
the open visitors' byte counters, the visitors that ended, the last log
lines) and rich's `Live` draws the newest snapshot on its own thread. So the
data path pays nothing: the streams count their bytes anyway and are read
at refresh time, a visitor's end costs one append to a bounded deque, and a
terminal that stops reading (Ctrl-S, a stuck multiplexer) stalls the drawing
thread, never the reactor. Log lines go into the view's log panel rather
than to the terminal underneath it, where they would tear the drawing.

What it is not: output for programs. When stdout is not a terminal, with
--json, --log-format json or --no-console, the CLI prints the plain lines it
always did (client/cli.py `use_console`) and nothing here runs.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

# Redraws per second: often enough to watch a transfer, rarely enough that a
# snapshot (a walk over the open streams) stays off the profile.
REFRESH_PER_SECOND = 4
# Ended visitors kept for the view, and log lines: both bounded, whatever the traffic.
RECENT_VISITORS = 50
LOG_LINES = 50
# Rates are measured over this many snapshots (about 2 s): one 250 ms window
# jumps with every TCP burst.
RATE_SAMPLES = 9
# Open visitors listed at most: the rest are counted, not drawn.
OPEN_VISITORS_SHOWN = 50


def use_console(stdout, *, as_json: bool, log_format: str, no_console: bool, environ=os.environ) -> bool:
    """Whether `tunnel-client` draws the live view: only for a person at a
    terminal. Anything else (a pipe, a file, systemd's journal, --json, JSON
    logs, TERM=dumb) gets the plain lines programs and tests read."""
    if no_console or as_json or log_format != "text":
        return False
    if environ.get("TERM", "") == "dumb":
        return False
    try:
        return stdout.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def format_bytes(n: int) -> str:
    """1023 B, 1.0 KiB, 12.3 MiB: binary units, one decimal."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float) -> str:
    return f"{format_bytes(int(bytes_per_second))}/s" if bytes_per_second >= 1 else "-"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def format_address(address) -> str:
    host, port = getattr(address, "host", ""), getattr(address, "port", 0)
    if not host:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the snapshot: plain, immutable data, handed from the reactor to the drawing thread --

@dataclass(frozen=True)
class EndpointRow:
    url: str
    target: str


@dataclass(frozen=True)
class TunnelRow:
    tunnel_id: str | None
    status: str
    endpoints: tuple[EndpointRow, ...]
    open_visitors: int
    visitors_total: int
    bytes_in: int  # from visitors, to the service
    bytes_out: int  # from the service, to visitors
    rate_in: float
    rate_out: float


@dataclass(frozen=True)
class LinkRow:
    relay: str
    state: str  # "connecting", "live", "reconnecting", "stopped"
    session: str | None
    up_seconds: float | None
    rtt_seconds: float | None
    open_streams: int


@dataclass(frozen=True)
class VisitorRow:
    opened_at: float
    peer: str
    tunnel: str
    bytes_in: int
    bytes_out: int
    state: str  # "open", "closed", "failed" (never reached the service)
    seconds: float  # open for so far, or in all


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    links: tuple[LinkRow, ...]
    tunnels: tuple[TunnelRow, ...]
    visitors: tuple[VisitorRow, ...]
    more_open_visitors: int
    log: tuple[str, ...]


class _TunnelTotals:
    """What the ended visitors of one tunnel added up to, and recent totals for rates."""

    __slots__ = ("visitors", "bytes_in", "bytes_out", "samples")

    def __init__(self):
        self.visitors = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=RATE_SAMPLES)


class ConsoleModel:
    """The reactor's side of the view: hears visitors end and log lines, and
    takes snapshots of the agent. Only the reactor thread calls it."""

    def __init__(self):
        self.clock = None  # the agent's reactor, from attach()
        self.agent = None
        self.recent: deque[VisitorRow] = deque(maxlen=RECENT_VISITORS)
        self.log_lines: deque[str] = deque(maxlen=LOG_LINES)
        self._totals: dict[str | None, _TunnelTotals] = {}
        self._link = None  # the link last seen, and when it was first seen
        self._link_since = 0.0

    def attach(self, agent, clock) -> None:
        self.agent, self.clock = agent, clock

    # -- events (per visitor, per log line; never per byte) -------------------------

    def visitor_ended(self, stream) -> None:
        """TunnelAgent's on_visitor: a stream is closed, its counters final."""
        totals = self._totals_of(stream.tunnel_id)
        totals.visitors += 1
        totals.bytes_in += stream.bytes_in
        totals.bytes_out += stream.bytes_out
        now = self.clock.seconds()
        self.recent.append(VisitorRow(
            opened_at=stream.opened_at, peer=format_address(stream.getPeer()),
            tunnel=self._label(stream.tunnel_id), bytes_in=stream.bytes_in, bytes_out=stream.bytes_out,
            state="closed" if stream.reported_open else "failed", seconds=now - stream.opened_at,
        ))

    def log_line(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip():
                self.log_lines.append(line)

    def log_file(self) -> "_LogPanelFile":
        """A file for twisted.logger's FileLogObserver that writes into the log panel."""
        return _LogPanelFile(self)

    # -- snapshots ------------------------------------------------------------------------

    def _totals_of(self, tunnel_id) -> _TunnelTotals:
        totals = self._totals.get(tunnel_id)
        if totals is None:
            totals = self._totals[tunnel_id] = _TunnelTotals()
        return totals

    def _label(self, tunnel_id) -> str:
        tunnel = self.agent.tunnels_by_id.get(tunnel_id) if self.agent is not None else None
        return (tunnel.url or "?") if tunnel is not None else (tunnel_id or "?")

    def snapshot(self) -> Snapshot:
        now = self.clock.seconds()
        agent = self.agent
        link = agent.link if agent is not None else None
        # Every link of the agent's session (--links) carries visitors.
        links = [l for l in agent.ready_links if not l.closed] if agent is not None else []
        streams = [stream for each in links for stream in each.streams.values()]
        live_by_tunnel: dict[str | None, list] = {}
        for stream in streams:
            live_by_tunnel.setdefault(stream.tunnel_id, []).append(stream)
        tunnels = []
        for tunnel in (agent.tunnels if agent is not None else ()):
            totals = self._totals_of(tunnel.tunnel_id)
            live = live_by_tunnel.get(tunnel.tunnel_id, ())
            bytes_in = totals.bytes_in + sum(s.bytes_in for s in live)
            bytes_out = totals.bytes_out + sum(s.bytes_out for s in live)
            totals.samples.append((now, bytes_in, bytes_out))
            first = totals.samples[0]
            elapsed = now - first[0]
            rate_in = (bytes_in - first[1]) / elapsed if elapsed > 0 else 0.0
            rate_out = (bytes_out - first[2]) / elapsed if elapsed > 0 else 0.0
            endpoints = tuple(EndpointRow(e.url or "?", e.service.target) for e in tunnel.endpoints) or tuple(
                EndpointRow("(opening)", s.target) for s in tunnel.spec.services
            )
            status = tunnel.status
            if agent.stopped and status != "closed":
                status = "stopped"  # ending: its link is gone for good, not reconnecting
            tunnels.append(TunnelRow(
                tunnel_id=tunnel.tunnel_id, status=status, endpoints=endpoints,
                open_visitors=len(live), visitors_total=totals.visitors + len(live),
                bytes_in=bytes_in, bytes_out=bytes_out, rate_in=max(rate_in, 0.0), rate_out=max(rate_out, 0.0),
            ))
        # Totals of tunnels that ended stay out of memory too: keep only live ids.
        keep = {t.tunnel_id for t in (agent.tunnels if agent is not None else ())}
        for tunnel_id in [k for k in self._totals if k not in keep]:
            del self._totals[tunnel_id]
        open_rows = [
            VisitorRow(opened_at=s.opened_at, peer=format_address(s.getPeer()), tunnel=self._label(s.tunnel_id),
                       bytes_in=s.bytes_in, bytes_out=s.bytes_out, state="open", seconds=now - s.opened_at)
            for s in streams[-OPEN_VISITORS_SHOWN:]
        ]
        visitors = sorted(open_rows + list(self.recent), key=lambda v: v.opened_at, reverse=True)
        return Snapshot(
            taken_at=now, links=(self._link_row(agent, link, now, len(streams)),) if agent is not None else (),
            tunnels=tuple(tunnels), visitors=tuple(visitors),
            more_open_visitors=max(0, len(streams) - OPEN_VISITORS_SHOWN), log=tuple(self.log_lines),
        )

    def _link_row(self, agent, link, now: float, open_streams: int) -> LinkRow:
        relay = f"{agent.relay_host}:{agent.relay_port}"
        if link is not self._link:
            self._link, self._link_since = link, now
        if link is not None and link.ready and not link.closed:
            return LinkRow(relay, "live", link.session_id, now - self._link_since, link.rtt_seconds, open_streams)
        if agent.stopped:
            state = "stopped"
        elif any(t.status == "reconnecting" for t in agent.tunnels):
            state = "reconnecting"
        else:
            state = "connecting"
        return LinkRow(relay, state, None, None, None, 0)


class _LogPanelFile:
    """The file a FileLogObserver writes formatted lines to: the view's log panel."""

    def __init__(self, model: ConsoleModel):
        self._model = model

    def write(self, text: str) -> None:
        self._model.log_line(text)

    def flush(self) -> None:
        pass


# -- drawing (rich), on the Live thread: reads only a Snapshot ----------------------------

_STATE_STYLE = {"live": "green", "opening": "yellow", "connecting": "yellow", "reconnecting": "yellow",
                "closed": "red", "stopped": "red", "open": "green", "failed": "red"}


def render(snapshot: Snapshot):
    """The view of one snapshot: a rich renderable (tested without a terminal)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def state(text: str) -> Text:
        return Text(text, style=_STATE_STYLE.get(text, ""))

    title = Text.assemble(("tunnel-client", "bold"), "  (Ctrl+C to quit)")
    links = Table(title="Link", title_justify="left", box=None, expand=False, padding=(0, 2, 0, 0))
    for column in ("relay", "state", "session", "up", "RTT", "streams"):
        links.add_column(column, style="dim" if column == "session" else None)
    for link in snapshot.links:
        rtt = f"{link.rtt_seconds * 1000:.1f} ms" if link.rtt_seconds is not None else "-"
        up = format_duration(link.up_seconds) if link.up_seconds is not None else "-"
        links.add_row(link.relay, state(link.state), link.session or "-", up, rtt, str(link.open_streams))

    # A tunnel is two lines, its address and its figures, so it reads in 80 columns too.
    tunnels = Table(title="Tunnels", title_justify="left", box=None, show_header=False, padding=(0, 0))
    tunnels.add_column("tunnel")
    for row in snapshot.tunnels:
        for endpoint in row.endpoints:
            tunnels.add_row(Text.assemble((endpoint.url, "bold cyan"), " -> ", endpoint.target))
        # Counters are per tunnel id, shared by its addresses (named services).
        tunnels.add_row(Text.assemble("  ", state(row.status), (
            f"   open {row.open_visitors}   visitors {row.visitors_total}   "
            f"in {format_bytes(row.bytes_in)} ({format_rate(row.rate_in)})   "
            f"out {format_bytes(row.bytes_out)} ({format_rate(row.rate_out)})", "dim",
        )))
    if not snapshot.tunnels:
        tunnels.add_row("(none)")

    several = sum(len(t.endpoints) for t in snapshot.tunnels) > 1  # else the tunnel column says nothing
    visitors = Table(title="Visitors", title_justify="left", box=None, expand=False, padding=(0, 2, 0, 0))
    columns = ("time", "peer", "tunnel", "in", "out", "state", "for") if several else (
        "time", "peer", "in", "out", "state", "for")
    for column in columns:
        visitors.add_column(column, justify="right" if column in ("in", "out", "for") else "left",
                            no_wrap=column != "tunnel")
    for v in snapshot.visitors[:RECENT_VISITORS]:
        cells = [time.strftime("%H:%M:%S", time.localtime(v.opened_at)), v.peer]
        if several:
            cells.append(v.tunnel)
        cells += [format_bytes(v.bytes_in), format_bytes(v.bytes_out), state(v.state), format_duration(v.seconds)]
        visitors.add_row(*cells)
    blank = [""] * (len(columns) - 2)
    if snapshot.more_open_visitors:
        visitors.add_row("", f"... and {snapshot.more_open_visitors} more open", *blank)
    if not snapshot.visitors:
        visitors.add_row("-", "no visitors yet", *blank)

    parts = [title, Text(""), links, Text(""), tunnels, Text(""), visitors]
    if snapshot.log:
        log = Table(title="Log", title_justify="left", box=None, show_header=False, padding=(0, 0))
        log.add_column("line", overflow="fold", style="dim")
        for line in snapshot.log[-8:]:
            log.add_row(Text(line))
        parts += [Text(""), log]
    return Group(*parts)


class LiveConsole:
    """Runs the view: the reactor snapshots at REFRESH_PER_SECOND, rich's Live
    thread draws the latest snapshot at the same rate."""

    _log = Logger()

    def __init__(self, stream):
        self.reactor = None
        self.stream = stream
        self.model = ConsoleModel()
        self._snapshot: Snapshot | None = None
        self._live = None
        self._loop = None

    def visitor_ended(self, stream) -> None:
        self.model.visitor_ended(stream)

    def log_file(self) -> "_LogPanelFile":
        return self.model.log_file()

    def start(self, reactor, agent) -> None:
        from rich.console import Console
        from rich.live import Live

        self.reactor = reactor
        self.model.attach(agent, reactor)
        self._take()
        console = Console(file=self.stream)
        # Our own writes only: no proxy over sys.stdout/sys.stderr (the log
        # panel takes the log lines), the last frame stays when we stop.
        self._live = Live(
            console=console, get_renderable=self._renderable, auto_refresh=True,
            refresh_per_second=REFRESH_PER_SECOND, redirect_stdout=False, redirect_stderr=False,
            transient=False, vertical_overflow="crop",
        )
        self._live.start()
        self._loop = LoopingCall(self._take)
        self._loop.clock = self.reactor
        d = self._loop.start(1 / REFRESH_PER_SECOND, now=False)
        d.addErrback(lambda f: self._log.failure("the terminal view stopped updating", f))

    def _take(self) -> None:
        self._snapshot = self.model.snapshot()  # one reference swap: the Live thread reads it whole

    def _renderable(self):
        return render(self._snapshot)

    def stop(self) -> None:
        """Draw the last state once more and give the terminal back (cursor shown)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._live is not None:
            self._take()
            live, self._live = self._live, None
            live.stop()
