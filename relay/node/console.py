"""The relay's web console: what the admin port shows a browser at `/`.

What this module is: the console's view of the node (`ConsoleView`: tenants
and their tokens, agents and their links, tunnels with live visitor counts,
bytes and byte rates, refused visitors, health) and its pages, rendered on
the server as plain HTML with a little inline script that polls
`/v1/console` (the same view, as JSON) every POLL_SECONDS and redraws the
tables. No build step and nothing fetched from elsewhere: the page's style
and script are inline, allowed by a per-response CSP nonce.

What it is not: the routes, the credential and the CSRF rules
(relay/node/admin.py, relay/node/adminauth.py). It never holds a token: a
token shows as its id and label (relay/node/tokens.py), a link as its
session id.

Each table is described once (TABLES): the server's first paint and the
script's redraws read the same columns, so the two cannot drift apart.
"""

from __future__ import annotations

import html
import json
from collections import deque
from datetime import datetime, timezone

POLL_SECONDS = 1.0
# Byte rates: the bytes moved over the last few seconds, from samples taken
# when the view is asked for (at most one per RATE_SAMPLE_SECONDS per
# tunnel, so any number of open consoles keeps the same few samples).
RATE_WINDOW_SECONDS = 5.0
RATE_SAMPLE_SECONDS = 0.5


class RateMeter:
    """Bytes per second of each live tunnel, each direction."""

    def __init__(self):
        self._samples: dict[str, deque] = {}

    def rates(self, now: float, totals: dict[str, tuple[int, int]]) -> dict[str, tuple[float, float]]:
        out = {}
        for tunnel_id, (to_service, to_visitor) in totals.items():
            samples = self._samples.setdefault(tunnel_id, deque(maxlen=int(RATE_WINDOW_SECONDS / RATE_SAMPLE_SECONDS) + 2))
            while len(samples) > 1 and now - samples[1][0] >= RATE_WINDOW_SECONDS:
                samples.popleft()
            if samples and now - samples[0][0] >= RATE_SAMPLE_SECONDS:
                then, s0, v0 = samples[0]
                elapsed = now - then
                out[tunnel_id] = (max(0, to_service - s0) / elapsed, max(0, to_visitor - v0) / elapsed)
            else:
                out[tunnel_id] = (0.0, 0.0)
            if not samples or now - samples[-1][0] >= RATE_SAMPLE_SECONDS:
                samples.append((now, to_service, to_visitor))
        for gone in set(self._samples) - set(totals):  # memory follows the live tunnels
            del self._samples[gone]
        return out


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConsoleView:
    """The node as the console shows it, built on each request from the
    node's own parts (no state of its own but the rate samples)."""

    def __init__(self, tunnels, metrics, clock, health, token_store=None):
        self.tunnels = tunnels  # relay.node.tunnels.TunnelManager
        self.metrics = metrics  # relay.wire.metrics.Counters
        self.clock = clock
        self.health = health  # () -> the /healthz body
        self.token_store = token_store  # relay.node.tokens.TokenStore, or None
        self.rates = RateMeter()

    def _records(self) -> dict:
        store = self.token_store
        return {r.token_id: r for r in store.records} if store is not None else {}

    def live_bytes(self) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
        """Bytes (visitor to service, service to visitor) of each tunnel, and
        of the streams open now on the whole node: closed streams' bytes come
        from the metrics, open ones' from their streams' counters."""
        per_tunnel = {}
        for tunnel_id in self.tunnels.tunnels:
            figures = self.metrics.tunnel(tunnel_id)
            # On the relay a stream's bytes_in come from the link: to the visitor.
            per_tunnel[tunnel_id] = [figures["bytes_out"], figures["bytes_in"]]
        open_now = [0, 0]
        for link in self.tunnels.links:
            for stream in list(link.streams.values()):
                if not stream.reported_open:  # as the metrics count them, so totals never fall
                    continue
                open_now[0] += stream.bytes_out
                open_now[1] += stream.bytes_in
                pair = per_tunnel.get(stream.tunnel_id)
                if pair is not None:
                    pair[0] += stream.bytes_out
                    pair[1] += stream.bytes_in
        return {k: (v[0], v[1]) for k, v in per_tunnel.items()}, (open_now[0], open_now[1])

    def snapshot(self) -> dict:
        now = self.clock.seconds()
        records = self._records()
        totals, open_now = self.live_bytes()
        rates = self.rates.rates(now, totals)
        tunnel_rows = []
        for item in self.tunnels.describe(self.metrics.tunnel):
            tunnel_id = item["id"]
            tunnel = self.tunnels.tunnels[tunnel_id]
            link = tunnel.pick_link()
            grant = getattr(link, "grant", None)
            to_service, to_visitor = totals.get(tunnel_id, (0, 0))
            rate_service, rate_visitor = rates.get(tunnel_id, (0.0, 0.0))
            tunnel_rows.append({
                "id": tunnel_id,
                "name": item.get("name") or "",
                "urls": [e["url"] for e in item["endpoints"]],
                "state": item["state"],
                "status": item["status"],  # Healthy, Degraded, Down or Inactive (relay/node/sessions.py)
                "replicas": [
                    f"{r['session']}: {len(r['links'])}/{r['wanted_links']} links" for r in item["replicas"]
                ],
                "tenant": grant.tenant if grant is not None else "",
                "agent": item["agent"] or "",
                "visitors": item.get("visitors", 0),
                "streams_total": item.get("streams_total", 0),
                "bytes_to_service": to_service,
                "bytes_to_visitors": to_visitor,
                "rate_to_service": round(rate_service, 1),
                "rate_to_visitors": round(rate_visitor, 1),
                "refused_total": item.get("refused_total", 0),
            })
        agent_rows = []
        # One row per session (an agent), however many links it has.
        for session in sorted(self.tunnels.sessions.values(), key=lambda s: s.started):
            grant = session.grant
            record = records.get(grant.token_id) if grant is not None else None
            links = session.live_links()
            agent_rows.append({
                "id": session.session_id,
                "peer": ", ".join(sorted({link.peer for link in links})),
                "since": _iso(session.started),
                "seconds": round(now - session.started),
                "tenant": grant.tenant if grant is not None else "",
                "token_id": grant.token_id if grant is not None else "",
                "token_label": record.label if record is not None else "",
                "status": session.status,
                "links": f"{len(links)}/{session.wanted_links}",
                "tunnels": sum(1 for i in session.tunnel_ids if i in self.tunnels.tunnels),
                "visitors": sum(len(link.streams) for link in links),
            })
        token_rows = []
        for record in records.values():
            links = [a for a in agent_rows if a["token_id"] == record.token_id]
            token_rows.append({
                "id": record.token_id,
                "tenant": record.tenant,
                "label": record.label,
                "created": record.created,
                "limits": _limits_text(record.limits.to_json()),
                "agents": len(links),
                "tunnels": sum(a["tunnels"] for a in links),
            })
        token_rows.sort(key=lambda row: (row["tenant"], row["created"], row["id"]))
        refused = dict(sorted(self.metrics.refused_by_reason.items()))
        health = dict(self.health())
        health.update(bytes_to_service=self.metrics.bytes_out + open_now[0],
                      bytes_to_visitors=self.metrics.bytes_in + open_now[1])
        return {
            "time": _iso(now),
            "health": health,
            "tokens": token_rows,
            "agents": agent_rows,
            "tunnels": tunnel_rows,
            "refused": [{"id": reason, "reason": reason, "count": count} for reason, count in refused.items()],
        }

    def token(self, token_id: str):
        """(record, agents of it) of a token id, or None."""
        record = self._records().get(token_id)
        if record is None:
            return None
        links = [link for link in self.tunnels.links if getattr(link.grant, "token_id", None) == token_id]
        return record, links


def _limits_text(limits: dict) -> str:
    from relay.node.tokens import limits_text

    return limits_text(limits) or "node defaults"


# -- the tables, described once -----------------------------------------------------
# A column: (key in the row, heading, format). Formats: text, num, bytes,
# rate, list, ago, and ("action", href template, link text) for a row's form.

TABLES = {
    "tunnels": [
        ("id", "tunnel", "text"), ("urls", "addresses", "list"), ("state", "state", "text"),
        ("status", "status", "text"), ("replicas", "replicas", "list"), ("tenant", "tenant", "text"), ("agent", "agent", "text"), ("visitors", "visitors", "num"),
        ("streams_total", "visits", "num"), ("bytes_to_service", "to service", "bytes"),
        ("bytes_to_visitors", "to visitors", "bytes"), ("rate_to_service", "rate to service", "rate"),
        ("rate_to_visitors", "rate to visitors", "rate"), ("refused_total", "refused", "num"),
        ("id", "", ("action", "/tunnels/{}/close", "close…")),
    ],
    "agents": [
        ("id", "agent", "text"), ("peer", "peer", "text"), ("since", "connected since", "text"),
        ("seconds", "for", "ago"), ("tenant", "tenant", "text"), ("token_id", "token", "text"),
        ("token_label", "token label", "text"), ("status", "status", "text"), ("links", "links", "text"),
        ("tunnels", "tunnels", "num"), ("visitors", "visitors", "num"),
    ],
    "tokens": [
        ("tenant", "tenant", "text"), ("id", "token", "text"), ("label", "label", "text"),
        ("created", "created", "text"), ("limits", "limits", "text"), ("agents", "agents", "num"),
        ("tunnels", "tunnels", "num"), ("id", "", ("action", "/tokens/{}/revoke", "revoke…")),
    ],
    "refused": [("reason", "reason", "text"), ("count", "visitors refused", "num")],
}
HEALTH_KEYS = (
    ("status", "status"), ("uptime_seconds", "uptime (s)"), ("agents", "agents"), ("tunnels", "tunnels"),
    ("streams_active", "visitors now"), ("streams_total", "visitors in all"), ("auth_failures", "refused agent tokens"),
    ("bytes_to_service", "bytes to services"), ("bytes_to_visitors", "bytes to visitors"),
)
TITLES = {
    "tunnels": "Tunnels", "agents": "Agents and their links", "tokens": "Tenants and tokens",
    "refused": "Refused visitors",
}

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    n = float(n)
    for unit in UNITS:
        if n < 1024 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _cell(row: dict, key: str, fmt) -> str:
    value = row.get(key, "")
    e = html.escape
    if isinstance(fmt, tuple):
        _, href, text = fmt
        return f'<td><a class="act" href="{e(href.format(value))}">{e(text)}</a></td>'
    raw = f' data-value="{e(str(value))}"' if fmt in ("num", "bytes", "rate") else ""
    if fmt == "bytes":
        shown = human_bytes(value)
    elif fmt == "rate":
        shown = human_bytes(value) + "/s"
    elif fmt == "list":
        shown = "<br>".join(e(str(v)) for v in value)
        return f'<td data-key="{e(key)}">{shown}</td>'
    elif fmt == "ago":
        shown = f"{value} s"
    else:
        shown = str(value)
    return f'<td data-key="{e(key)}"{raw}>{e(shown)}</td>'


def render_table(name: str, rows: list) -> str:
    columns = TABLES[name]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in columns)
    body = "".join(
        f'<tr data-id="{html.escape(str(row["id"]))}">' + "".join(_cell(row, k, f) for k, _, f in columns) + "</tr>"
        for row in rows
    )
    return (
        f'<section><h2>{html.escape(TITLES[name])} <small data-count="{name}">({len(rows)})</small></h2>'
        f'<table id="{name}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>'
    )


def render_health(health: dict) -> str:
    cells = "".join(
        f'<div><dt>{html.escape(label)}</dt><dd data-key="{key}">{html.escape(str(health.get(key, "")))}</dd></div>'
        for key, label in HEALTH_KEYS
    )
    return f'<section><h2>Node health</h2><dl id="health">{cells}</dl></section>'


STYLE = """
body{font:14px system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1b1f24;color:#fff;padding:.6em 1em;display:flex;gap:1em;align-items:center}
header h1{font-size:1.1em;margin:0;flex:1} header form{margin:0}
main{padding:0 1em 2em} section{margin-top:1.2em}
h2{font-size:1em;margin:.4em 0} small{color:#667}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #dde;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600} td[data-value]{text-align:right;font-variant-numeric:tabular-nums}
dl{display:flex;flex-wrap:wrap;gap:.5em;margin:0} dl div{background:#fff;border:1px solid #dde;padding:.3em .7em}
dt{font-size:.8em;color:#667} dd{margin:0;font-weight:600}
a.act{color:#a01818} .box{background:#fff;border:1px solid #dde;padding:1em;max-width:40em;margin:2em auto}
.err{color:#a01818} button{padding:.3em 1em} #stale{color:#a01818}
"""

# The script redraws the tables from /v1/console with the same TABLES the
# server used (given to it as JSON); textContent only, never innerHTML of data.
SCRIPT = """
(function(){
const T=JSON.parse(document.getElementById('tables').textContent);
const U=['B','KiB','MiB','GiB','TiB'];
function hb(n){let i=0;while(n>=1024&&i<U.length-1){n/=1024;i++;}return i?n.toFixed(1)+' '+U[i]:Math.round(n)+' B';}
function cell(row,key,fmt){const td=document.createElement('td');const v=row[key];
 if(Array.isArray(fmt)){const a=document.createElement('a');a.className='act';a.href=fmt[1].replace('{}',encodeURIComponent(v));a.textContent=fmt[2];td.appendChild(a);return td;}
 td.dataset.key=key;
 if(fmt==='list'){v.forEach(function(x,i){if(i)td.appendChild(document.createElement('br'));td.appendChild(document.createTextNode(x));});return td;}
 if(fmt==='num'||fmt==='bytes'||fmt==='rate'){td.dataset.value=String(v);}
 td.textContent=fmt==='bytes'?hb(v):fmt==='rate'?hb(v)+'/s':fmt==='ago'?v+' s':String(v);return td;}
function draw(data){
 for(const name in T){const body=document.querySelector('#'+name+' tbody');const rows=document.createDocumentFragment();
  data[name].forEach(function(row){const tr=document.createElement('tr');tr.dataset.id=row.id;
   T[name].forEach(function(c){tr.appendChild(cell(row,c[0],c[2]));});rows.appendChild(tr);});
  body.replaceChildren(rows);document.querySelector('[data-count='+name+']').textContent='('+data[name].length+')';}
 document.querySelectorAll('#health dd').forEach(function(dd){dd.textContent=String(data.health[dd.dataset.key]);});
 document.getElementById('updated').textContent=data.time;document.getElementById('stale').textContent='';}
function poll(){fetch('/v1/console',{credentials:'same-origin',cache:'no-store'})
 .then(function(r){if(r.status===401){location.href='/login';throw new Error('login');}if(!r.ok)throw new Error(r.status);return r.json();})
 .then(draw).catch(function(e){document.getElementById('stale').textContent=' (not updating: '+e.message+')';})
 .finally(function(){setTimeout(poll,POLL_MS);});}
setTimeout(poll,POLL_MS);
})();
"""


def page(title: str, body: str, nonce: str, *, script: str = "", header_extra: str = "") -> bytes:
    """A whole page: our style and (optional) script inline, under the CSP nonce."""
    e = html.escape
    script_tag = f'<script nonce="{e(nonce)}">{script}</script>' if script else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{e(title)}</title><style nonce=\"{e(nonce)}\">{STYLE}</style></head><body>"
        f"<header><h1>{e(title)}</h1>{header_extra}</header><main>{body}</main>{script_tag}</body></html>"
    ).encode("utf-8")


def logout_form(csrf: str | None) -> str:
    if csrf is None:
        return ""
    return (
        f'<form method="post" action="/logout"><input type="hidden" name="csrf" value="{html.escape(csrf)}">'
        '<button type="submit">log out</button></form>'
    )


def render_console(snapshot: dict, nonce: str, *, logout_csrf: str | None) -> bytes:
    tables_json = json.dumps({name: [[k, label, list(f) if isinstance(f, tuple) else f] for k, label, f in cols]
                              for name, cols in TABLES.items()})
    tables_json = tables_json.replace("</", "<\\/")  # JSON in a script element: "</" must not end it
    body = (
        f'<p>updated <span id="updated">{html.escape(snapshot["time"])}</span><span id="stale"></span>'
        f" · refreshes every {POLL_SECONDS:g} s · read-only but for revoking a token and closing a tunnel</p>"
        + render_health(snapshot["health"])
        + "".join(render_table(name, snapshot[name]) for name in ("tunnels", "agents", "tokens", "refused"))
        # JSON in a non-script type: data, not code.
        + f'<script type="application/json" id="tables">{tables_json}</script>'
    )
    script = SCRIPT.replace("POLL_MS", str(int(POLL_SECONDS * 1000)))
    return page("tunnel-relay console", body, nonce, script=script, header_extra=logout_form(logout_csrf))


def render_confirm(title: str, facts: list[tuple[str, str]], warning: str, action: str, csrf: str,
                   button: str, nonce: str) -> bytes:
    """The confirm step of revoke and close: a page of its own (works without script)."""
    e = html.escape
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts)
    body = (
        f'<div class="box"><h2>{e(title)}</h2><table>{rows}</table><p>{e(warning)}</p>'
        f'<form method="post" action="{e(action)}"><input type="hidden" name="csrf" value="{e(csrf)}">'
        f'<input type="hidden" name="confirm" value="yes"><button type="submit" id="confirm">{e(button)}</button> '
        '<a href="/" id="cancel">cancel</a></form></div>'
    )
    return page("tunnel-relay console", body, nonce)


def render_message(title: str, text: str, nonce: str, *, error: bool = False) -> bytes:
    e = html.escape
    body = (
        f'<div class="box"><h2>{e(title)}</h2><p class="{"err" if error else ""}" id="message">{e(text)}</p>'
        '<p><a href="/">back to the console</a></p></div>'
    )
    return page("tunnel-relay console", body, nonce)


def render_login(nonce: str, *, error: str = "", state_hint: str = "relay-state") -> bytes:
    e = html.escape
    body = (
        '<div class="box"><h2>Log in</h2>'
        + (f'<p class="err" id="message">{e(error)}</p>' if error else "")
        + '<form method="post" action="/login"><p><label>admin token<br>'
        '<input type="password" name="token" id="token" size="48" autocomplete="current-password" autofocus>'
        '</label></p><button type="submit" id="login">log in</button></form>'
        f"<p><small>On the relay's machine: <code>relay-admin --state-dir {e(state_hint)} admin-token</code>"
        "</small></p></div>"
    )
    return page("tunnel-relay console", body, nonce)
