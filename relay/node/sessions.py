"""Agent sessions: the links of one agent, joined into one session.

An agent keeps N links (`tunnel-client --links N`). Its first link logs in
with its token and starts a session: the relay answers with the session's id
and a join secret (32 bytes from `secrets`, kept here only as a SHA-256
digest, never logged). Each further link sends the same token and
`join: {session, secret}`; a wrong secret, an unknown session or another
token's session is refused with GOAWAY(JOIN_REFUSED) and the live session is
not touched (docs/protocol.md, "Joining a session").

The session, not the link, holds tunnels: every live link of it serves each
of its tunnels (routing picks the link with the fewest streams), and the
per-session and per-token limits count a session once however many links it
has. A session ends when its last link goes; its tunnels then wait in their
grace period (relay/node/tunnels.py), and the agent's next first link starts
a new session and reclaims them.

What is not here: which tunnels a session holds and their lifecycle
(TunnelManager), the handshake itself (RelayLink).
"""

from __future__ import annotations

import hmac
import secrets

from relay.mux.control import JOIN_SECRET_BYTES, Join
from relay.node.directory import secret_digest

HEALTHY, DEGRADED, DOWN, INACTIVE = "Healthy", "Degraded", "Down", "Inactive"


class Session:
    """One agent's session: its grant, the links it asked for and has."""

    def __init__(self, session_id: str, grant, wanted_links: int, join_digest: bytes, started: float):
        self.session_id = session_id
        self.grant = grant
        self.wanted_links = wanted_links
        self.join_digest = join_digest
        self.started = started
        self.links: list = []  # its authenticated links, first one first
        self.tunnel_ids: set[str] = set()  # the tunnels it serves (owned, or as a replica)
        self.next_link_number = 0
        # One of its links said goodbye or DRAINING: the agent is stopping, so
        # its other links ending (one may close mid-join, without a GOAWAY)
        # end its tunnels too, rather than leave them waiting out the grace.
        self.stopping = False

    def live_links(self) -> list:
        return [link for link in self.links if not link.closed]

    @property
    def status(self) -> str:
        """Healthy with every link it asked for, Degraded with some, Down with none."""
        live = len(self.live_links())
        if live >= self.wanted_links:
            return HEALTHY
        return DEGRADED if live else DOWN

    def describe(self) -> dict:
        return {
            "session": self.session_id,
            "status": self.status,
            "wanted_links": self.wanted_links,
            "links": [
                {
                    "link": link.link_number,
                    "peer": link.peer,
                    "streams": len(link.streams),
                    "rtt_ms": None if link.rtt_seconds is None else round(link.rtt_seconds * 1000, 2),
                }
                for link in self.live_links()
            ],
        }


def tunnel_status(tunnel) -> str:
    """A tunnel's status from the relay's side: Healthy when every replica
    has all the links it asked for, Degraded when one is short, Down when no
    replica is connected (it waits in its grace period), Inactive when it
    was restored from the state folder and no agent has served it since
    this relay started."""
    sessions = [s for s in tunnel.sessions if s.live_links()]
    if not sessions:
        return INACTIVE if tunnel.restored else DOWN
    return HEALTHY if all(s.status == HEALTHY for s in sessions) else DEGRADED


class SessionTable:
    """The live sessions of one node, by id."""

    def __init__(self, clock):
        self.clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def values(self) -> list[Session]:
        return list(self._sessions.values())

    def start(self, link, wanted_links: int) -> str:
        """`link` starts a new session (its id is the link's); the join secret, for its reply only."""
        secret = secrets.token_urlsafe(JOIN_SECRET_BYTES)
        session = Session(link.session_id, link.grant, wanted_links, secret_digest(secret), self.clock.seconds())
        self._sessions[session.session_id] = session
        self._add(session, link)
        return secret

    def join(self, link, join: Join) -> Session | None:
        """The session `join` names, with `link` added, or None (refused, nothing changed)."""
        session = self._sessions.get(join.session)
        # Always compare, so an unknown session costs what a wrong secret does.
        digest = session.join_digest if session is not None else b"\0" * 32
        if not hmac.compare_digest(digest, secret_digest(join.secret)) or session is None:
            return None
        if getattr(session.grant, "token_id", None) != getattr(link.grant, "token_id", None):
            return None  # another token's session: its secret alone is not enough
        if not session.live_links():
            return None  # ending: the agent starts a new session instead
        link.session_id = session.session_id
        self._add(session, link)
        return session

    def _add(self, session: Session, link) -> None:
        link.session = session
        link.link_number = session.next_link_number
        session.next_link_number += 1
        session.links.append(link)

    def leave(self, link) -> bool:
        """`link` is gone; True if it was its session's last (the session ends)."""
        session = getattr(link, "session", None)
        if session is None:
            return False
        if link in session.links:
            session.links.remove(link)
        if session.links:
            return False
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
        return True
