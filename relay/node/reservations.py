"""What a relay restart must not lose: the reservations file of the state folder.

`reservations.json` (mode 0600) holds what a reclaim needs, and nothing
a visitor changes: each held tunnel's endpoints (service, kind, mode, ALPN,
port or hostname), the SHA-256 of its reclaim secret (never the secret),
its tenant and stable name, and its deadline if it already waits for its
agent; the stable names with their tenant and reserved ports; the port
quarantine. `TunnelManager` (relay/node/tunnels.py) feeds it: it calls
`changed()` when a tunnel opens, closes, loses or regains its agent, or a
name is claimed, and gives the `snapshot` to write. The routing records stay
the directory's (relay/node/directory.py); this is the node's own memory of
what it held, so a fleet directory (Redis) can stand in for MemoryDirectory
and the node still rebinds its own sockets after a restart.

Rule 1: cheap. Changes are coalesced: at most one write per
`write_delay_seconds` (0.5 s) after something changed, in a thread (the
write ends with an fsync), never one per visitor. The snapshot itself is
built in the reactor (about 5-10 us per tunnel: 25-60 ms for 5,000), so the
delay grows to 20 times the last build, at most `MAX_WRITE_DELAY_SECONDS`:
under constant churn the file costs the reactor at most 5 % of its time (below 2 s of delay). Between writes, every
`alive_seconds` (2 s) the file's mtime is set to now (one utime, no
rewrite): after a SIGKILL or a crash, the relay counts the grace period from
that stamp, so at most `alive_seconds` early.

Rule 2: atomic. Each write goes to a temporary file created 0600 and is
renamed over the old one (state.py `_write_atomic`), under a lock with a
sequence number, so an older snapshot never lands after a newer one.

Rule 3: a stop writes a last snapshot at once and then the file is frozen:
the tunnels the stopping relay ends are still in it, with the stop as the
moment it went down.

A file that cannot be read or parsed is set aside (renamed `.bad`) with one
log line, and the relay starts empty rather than not at all.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import defer, task
from twisted.logger import Logger

from relay.node.state import _write_atomic

RESERVATIONS_FILE = "reservations.json"
FORMAT_VERSION = 1
FILE_MODE = 0o600
DEFAULT_WRITE_DELAY_SECONDS = 0.5
DEFAULT_ALIVE_SECONDS = 2.0
MAX_WRITE_DELAY_SECONDS = 2.0
WRITE_COST_FACTOR = 20  # delay >= 20 x the snapshot's build time: <= 5 % of the reactor
# Stable names one tenant may hold: each keeps state for ever (and a TCP
# name a port of the range), so a tenant that may claim any name is bounded.
MAX_NAMES_PER_TENANT = 256


@dataclass
class NameRecord:
    """A stable name: the tenant it belongs to, and the public port reserved
    for each TCP service of it (service "" is the tunnel's unnamed one)."""

    tenant: str
    ports: dict[str, int] = field(default_factory=dict)


class NameRegistry:
    """Stable names -> their records. Names are global: the first tenant to
    claim a name owns it (its address is `<name>-<tenant>`, but a name held
    by two tenants would be two meanings of one word in a token's grant)."""

    def __init__(self):
        self._names: dict[str, NameRecord] = {}
        self._per_tenant: dict[str, int] = {}

    def get(self, name: str) -> NameRecord | None:
        return self._names.get(name)

    def count(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def claim(self, name: str, tenant: str) -> NameRecord:
        record = self._names.get(name)
        if record is None:
            record = self._names[name] = NameRecord(tenant)
            self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        return record

    def ports(self) -> set[int]:
        return {port for record in self._names.values() for port in record.ports.values()}

    def encode(self) -> dict:
        return {name: {"tenant": r.tenant, "ports": dict(r.ports)} for name, r in self._names.items()}

    def load(self, data: dict) -> None:
        for name, item in data.items():
            record = self.claim(str(name), str(item["tenant"]))
            record.ports.update({str(s): int(p) for s, p in item.get("ports", {}).items()})


def _write_file(path: Path, data: bytes, alive_at: float) -> None:
    """Replace `path` with `data` (0600 from creation, fsynced, renamed);
    its mtime is `alive_at`, the clock's now (Rule 1)."""
    _write_atomic(path, data, FILE_MODE)
    os.utime(path, (alive_at, alive_at))


def _touch(path: Path, alive_at: float) -> None:
    try:
        os.utime(path, (alive_at, alive_at))
    except FileNotFoundError:
        pass  # nothing written yet: nothing to count from


def _in_thread(f, *args) -> defer.Deferred:
    from twisted.internet import threads

    return threads.deferToThread(f, *args)


class ReservationFile:
    """The coalescing writer and the loader of `reservations.json`."""

    _log = Logger()

    def __init__(
        self,
        state_dir,
        clock,
        snapshot,
        *,
        write_delay_seconds: float = DEFAULT_WRITE_DELAY_SECONDS,
        alive_seconds: float = DEFAULT_ALIVE_SECONDS,
        run_blocking=_in_thread,
    ):
        """`snapshot()` is the dict to write; `run_blocking(f, *args)` runs a
        file operation off the reactor (a thread; tests run it inline)."""
        self.path = Path(state_dir) / RESERVATIONS_FILE
        self.clock = clock
        self.snapshot = snapshot
        self.write_delay_seconds = write_delay_seconds
        self.alive_seconds = alive_seconds
        self.run_blocking = run_blocking
        self.writes = 0  # snapshots written, for tests and the curious
        self.frozen = False
        self._call = None  # the pending coalesced write
        self._in_flight = None  # the Deferred of a write under way
        self._again = False  # changed while a write was under way
        self._alive = None
        self._lock = threading.Lock()
        self._seq = 0
        self._written_seq = 0
        self._delay_seconds = write_delay_seconds  # grows with the snapshot's cost

    # -- loading -------------------------------------------------------------------

    def load(self) -> tuple[dict, float] | None:
        """(snapshot, when the relay that wrote it was last alive), or None.
        Called once at start, before the reactor serves anyone."""
        try:
            data = self.path.read_bytes()
            alive_at = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as e:
            self._log.warn("cannot read {path}: {error}; starting without reservations", path=str(self.path), error=e)
            return None
        try:
            snapshot = json.loads(data)
            if not isinstance(snapshot, dict) or snapshot.get("version") != FORMAT_VERSION:
                raise ValueError(f"not a version {FORMAT_VERSION} reservations file")
            alive_at = max(float(snapshot.get("written_at", 0.0)), alive_at)
        except (ValueError, TypeError) as e:
            self._set_aside(e)
            return None
        return snapshot, alive_at

    def _set_aside(self, error) -> None:
        bad = self.path.with_name(self.path.name + ".bad")
        try:
            os.replace(self.path, bad)
        except OSError:
            pass
        self._log.warn(
            "{path} is unreadable ({error}); moved to {bad}, starting without reservations",
            path=str(self.path), error=str(error)[:200], bad=str(bad),
        )

    # -- writing -------------------------------------------------------------------

    def start(self) -> None:
        """Stamp the file's mtime every `alive_seconds` (Rule 1)."""
        self._alive = task.LoopingCall(self._stamp)
        self._alive.clock = self.clock
        self._alive.start(self.alive_seconds, now=False).addErrback(
            lambda f: self._log.failure("reservations stamp failed", f)
        )

    def _stamp(self) -> None:
        if self.frozen or self._in_flight is not None:
            return  # a write under way stamps the file itself
        d = self.run_blocking(_touch, self.path, self.clock.seconds())
        d.addErrback(lambda f: self._log.warn("cannot stamp {path}: {error}", path=str(self.path), error=f.value))

    def changed(self) -> None:
        """Something a reclaim needs changed: write within `write_delay_seconds`."""
        if self.frozen:
            return
        if self._in_flight is not None:
            self._again = True
            return
        if self._call is None:
            self._call = self.clock.callLater(self._delay_seconds, self._write)

    def _encode(self) -> tuple[int, bytes, float]:
        now = self.clock.seconds()
        started = time.perf_counter()  # a cost, not a time the logic depends on
        snapshot = dict(self.snapshot(), version=FORMAT_VERSION, written_at=now)
        data = json.dumps(snapshot, separators=(",", ":"), sort_keys=True).encode()
        cost = time.perf_counter() - started
        self._delay_seconds = min(
            MAX_WRITE_DELAY_SECONDS, max(self.write_delay_seconds, WRITE_COST_FACTOR * cost),
        )
        self._seq += 1
        return self._seq, data, now

    def _write_seq(self, seq: int, data: bytes, alive_at: float) -> None:
        with self._lock:
            if seq <= self._written_seq:
                return  # a newer snapshot is on disk already
            _write_file(self.path, data, alive_at)
            self._written_seq = seq

    def _write(self) -> None:
        self._call = None
        if self.frozen:
            return
        seq, data, now = self._encode()  # in the reactor: a consistent snapshot
        d = self._in_flight = self.run_blocking(self._write_seq, seq, data, now)
        self.writes += 1

        def done(result):
            self._in_flight = None
            if self._again:
                self._again = False
                self.changed()
            return result

        d.addBoth(done)
        d.addErrback(lambda f: self._log.warn(
            "cannot write {path}: {error}", path=str(self.path), error=f.value,
        ))

    def close(self) -> None:
        """The relay stops: write the last snapshot now, then freeze (Rule 3).
        Blocking on purpose: the reactor is stopping, and the snapshot must be
        on disk before the process ends."""
        if self.frozen:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._alive is not None and self._alive.running:
            self._alive.stop()
        seq, data, now = self._encode()
        try:
            self._write_seq(seq, data, now)
            self.writes += 1
        except OSError as e:
            self._log.warn("cannot write {path}: {error}", path=str(self.path), error=e)
        self.frozen = True
