"""Who an accepted agent token belongs to, and what it may do.

`check_token` callables (relay/node/state.py's, and the tokens file's) answer
a presented token with a `Grant` or None. The session (RelayLink) keeps its
grant for life: the tenant it belongs to, which token it presented (by id,
never the token), the limits its tunnels and visitors get, and the stable
names it may claim.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.node.limits import SessionLimits

# The tenant of the development token (state.py's agent-tokens file): no
# limits beyond the node's own defaults.
DEV_TENANT = "dev"


@dataclass(frozen=True)
class Grant:
    tenant: str
    token_id: str
    # None: the node's limits (what `twistd relay` was given).
    limits: SessionLimits | None = None
    # Stable names this token may claim; None: any name.
    names: frozenset[str] | None = None

    def allows_name(self, name: str) -> bool:
        return self.names is None or name in self.names


DEV_GRANT = Grant(tenant=DEV_TENANT, token_id="dev")
