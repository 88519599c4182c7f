"""`twistd relay`: options and the service tree of one relay node.

makeService() builds services and binds nothing itself: twistd starts them
(Twisted web/tap.py, transit relay server_tap.py). The development defaults
are fixed ports below the kernel's ephemeral range (32768-60999), away from
common services, and never overlapping each other:

    agent port 17000 (TLS)  encrypted tunnels 17443  admin 17080 (loopback)
    unencrypted tunnel ports 20000-29999
"""

import ipaddress
import re
import resource
import signal
import ssl
import sys

from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.web.server import Site

from relay.node.adminauth import AUTH_MODES
from relay.node.agents import (
    DEFAULT_HANDSHAKE_TIMEOUT_SECONDS,
    DEFAULT_LINK_BUFFER_CAP,
    AgentLinkFactory,
    AgentPortFactory,
)
from relay.mux import ErrorCode
from relay.wire.link import DEFAULT_KEEPALIVE_INTERVAL_SECONDS, DEFAULT_KEEPALIVE_TIMEOUT_SECONDS
from relay.node.drain import DEFAULT_GRACE_PERIOD_SECONDS, NodeDrain
from relay.node.listeners import PublicPorts
from relay.node.ports import PortAllocator
from relay.node.reservations import ReservationFile
from relay.node.tunnels import DEFAULT_GRACE_SECONDS, REPLICA_POLICIES, TunnelManager
from relay.wire.jsonlog import LOG_FORMATS, json_file_observer
from relay.wire.metrics import Counters
from relay.wire.prommetrics import MetricsPage, PrometheusMetrics, metrics_registry
from relay.wire.tcpio import LISTEN_BACKLOG

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# name -> (default, converter, help). Command line beats --config, which beats these.
SETTINGS = {
    "state-dir": ("relay-state", str, "Folder for the CA, certificates, token hash and client.env."),
    "agent-port": (17000, int, "TLS port agents dial."),
    "agent-interface": (None, str, "Address the agent port binds (default: --interface)."),
    "tls-port": (17443, int, "Shared TLS port of encrypted tunnels (443 in production); 0 disables them."),
    "domain": ("tunnels.localhost", str, "Encrypted tunnels get https://<id>.<domain>."),
    "cert": (None, str, "Certificate chain (PEM) for *.<domain>; default: issued by the dev CA."),
    "key": (None, str, "Private key (PEM) of --cert."),
    "agent-cert": (None, str, "Certificate chain (PEM) the agent port presents; default: --cert if it names the agents' host, else issued by the dev CA."),
    "agent-key": (None, str, "Private key (PEM) of --agent-cert."),
    "cert-check-seconds": (30.0, float, "How often to look for a renewed --cert/--key or --agent-cert/--agent-key (also on SIGHUP)."),
    "tokens-check-seconds": (2.0, float, "How often to look for a changed tokens file (also on SIGHUP)."),
    "admin-port": (17080, int, "Admin HTTP port (the web console at /, GET /healthz, GET /v1/tunnels, GET /metrics); 0 disables."),
    "admin-interface": ("127.0.0.1", str, "Address the admin port binds; keep it private."),
    "admin-auth": ("auto", str, "auto: the admin port needs its token (relay-admin admin-token) unless it binds loopback; token: always."),
    "admin-allowed-hosts": ("", str, "Comma-separated extra names the admin API accepts in Host (besides its address and localhost)."),
    "ports": ("20000-29999", str, "Range LO-HI of public ports for unencrypted tunnels."),
    "public-host": ("localhost", str, "Host name printed in tunnel addresses (and in client.env)."),
    "interface": ("127.0.0.1", str, "Address public tunnel ports bind (0.0.0.0 or :: in production)."),
    "grace-seconds": (DEFAULT_GRACE_SECONDS, float, "How long a dropped agent's tunnel waits for it to reconnect."),
    "grace-period": (DEFAULT_GRACE_PERIOD_SECONDS, float, "On SIGTERM, how long streams in progress may take to finish before the relay closes them and exits (a second SIGTERM or SIGINT: at once)."),
    "replica-policy": ("join", str, "A second live agent of a tenant's stable name: join (a replica of the tunnel; visitors spread over both) or refuse (name_in_use)."),
    "port-quarantine-seconds": (120.0, float, "How long a freed port rests before reuse."),
    "keepalive-interval": (DEFAULT_KEEPALIVE_INTERVAL_SECONDS, float, "Seconds between link pings."),
    "keepalive-timeout": (DEFAULT_KEEPALIVE_TIMEOUT_SECONDS, float, "Silence after which a link is dead."),
    "handshake-timeout": (DEFAULT_HANDSHAKE_TIMEOUT_SECONDS, float, "Deadline for an agent connection's TLS handshake and HELLO together, from the TCP accept."),
    "log-format": ("text", str, "text (twistd's own) or json: one JSON object per line (time, level, namespace, message)."),
    "node": (None, str, "This node's name in a fleet (docs/network.md): random encrypted tunnels get https://<id>.<node>.<domain>, unencrypted ones <node>.<domain>:<port> (unless --public-host is given)."),
    "registry": (None, str, "redis://HOST:PORT/DB: the fleet registry (needs --node): stable names are served by any node, one hop at most."),
    "peer-port": (17010, int, "With --registry: TLS port other nodes of the fleet dial to reach this node's tunnels."),
    "peer-interface": (None, str, "Address the peer port binds (default: --interface)."),
    "peer-host": (None, str, "Host other nodes dial for the peer port (default: --peer-interface)."),
    "fleet-ca": (None, str, "The fleet CA's certificate (PEM), shared by every node: it signs each node's peer certificate; default: the state folder's CA."),
    "fleet-ca-key": (None, str, "Private key (PEM) of --fleet-ca."),
    "link-buffer-cap": (DEFAULT_LINK_BUFFER_CAP, int, "Advanced: bytes one agent link may make the relay buffer (half for new streams' windows, which shrink as it fills; past it visitors are refused; half for window growth)."),
}
# A node's name is one DNS label of its hostnames.
NODE_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
# Smallest --link-buffer-cap: room for a few streams at the smallest window.
MIN_LINK_BUFFER_CAP = 64 * 1024


def parse_port_range(text: str) -> tuple[int, int]:
    try:
        low_text, high_text = str(text).split("-", 1)
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise usage.UsageError(f"--ports wants LO-HI, e.g. 20000-29999, not {text!r}") from None
    if not 1 <= low <= high <= 65535:
        raise usage.UsageError(f"--ports {text}: need 1 <= LO <= HI <= 65535")
    return low, high


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a tunnel-relay node. The first start creates the state folder with a "
        "development CA, the relay's certificate and an agent token, and writes "
        "<state-dir>/client.env for tunnel-client. Settings may also come from a TOML "
        "file (--config) with the same keys; the command line beats the file, the file "
        "beats the defaults."
    )
    optFlags = [
        ["rotate-token", None, "Replace the agent token (and rewrite client.env); old tokens stop working."],
    ]
    optParameters = [["config", "c", None, "TOML file with settings (same keys as the options)."]] + [
        [name, None, None, f"{text} [default: {default}]"] for name, (default, _, text) in SETTINGS.items()
    ]

    def postOptions(self):
        # twistd installs its default reactor only after parsing: ours goes
        # first unless --reactor chose another (relay/wire/reactor.py).
        try:
            from relay.wire import reactor as relay_reactor
        except ImportError:  # no epoll (not Linux): Twisted's default reactor
            pass
        else:
            relay_reactor.install()
        from_file = {}
        if self["config"]:
            try:
                with open(self["config"], "rb") as f:
                    from_file = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise usage.UsageError(f"--config {self['config']}: {e}") from None
            unknown = set(k.replace("_", "-") for k in from_file) - set(SETTINGS) - {"rotate-token"}
            if unknown:
                raise usage.UsageError(f"--config: unknown keys {', '.join(sorted(unknown))}")
            from_file = {k.replace("_", "-"): v for k, v in from_file.items()}
        public_host_given = self["public-host"] is not None or "public-host" in from_file
        for name, (default, convert, _) in SETTINGS.items():
            value = self[name]
            if value is None:
                value = from_file.get(name, default)
            if value is not None:
                try:
                    value = convert(value)
                except (TypeError, ValueError):
                    raise usage.UsageError(f"--{name}: bad value {value!r}") from None
            self[name] = value
        if from_file.get("rotate-token"):
            self["rotate-token"] = True
        if self["agent-interface"] is None:
            self["agent-interface"] = self["interface"]
        self["port-range"] = parse_port_range(self["ports"])
        for name in ("agent-port", "tls-port", "admin-port"):
            if not 0 <= self[name] <= 65535:
                raise usage.UsageError(f"--{name} {self[name]} is not a port")
        low, high = self["port-range"]
        for name in ("agent-port", "tls-port", "admin-port"):
            if low <= self[name] <= high:
                raise usage.UsageError(f"--{name} {self[name]} lies inside --ports {self['ports']}")
        if bool(self["cert"]) != bool(self["key"]):
            raise usage.UsageError("--cert and --key go together")
        if bool(self["agent-cert"]) != bool(self["agent-key"]):
            raise usage.UsageError("--agent-cert and --agent-key go together")
        self["agent-host"] = agent_host(self["public-host"], self["agent-interface"])
        self["agent-tls"] = agent_certificate_source(self)
        domain = (self["domain"] or "").strip(".").lower()
        if self["tls-port"] and (not domain or "." not in domain):
            # A wildcard needs two labels after "*." (OpenSSL refuses *.localhost).
            raise usage.UsageError(f"--domain {self['domain']!r}: use at least two labels, e.g. tunnels.localhost")
        self["domain"] = domain
        self._fleet_options(public_host_given)
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format wants one of {', '.join(LOG_FORMATS)}, not {self['log-format']!r}")
        if self["admin-auth"] not in AUTH_MODES:
            raise usage.UsageError(f"--admin-auth wants one of {', '.join(AUTH_MODES)}, not {self['admin-auth']!r}")
        if self["grace-period"] < 0:
            raise usage.UsageError("--grace-period must be 0 or more")
        if self["replica-policy"] not in REPLICA_POLICIES:
            raise usage.UsageError(f"--replica-policy wants one of {', '.join(REPLICA_POLICIES)}, not {self['replica-policy']!r}")
        if self["keepalive-timeout"] <= self["keepalive-interval"]:
            raise usage.UsageError("--keepalive-timeout must exceed --keepalive-interval")
        if self["link-buffer-cap"] < MIN_LINK_BUFFER_CAP:
            raise usage.UsageError(f"--link-buffer-cap must be at least {MIN_LINK_BUFFER_CAP} bytes")

    def _fleet_options(self, public_host_given: bool) -> None:
        """--node, --registry and the peer port (docs/network.md)."""
        node = self["node"]
        if node is not None:
            node = node.lower()
            if not NODE_LABEL.fullmatch(node):
                raise usage.UsageError(f"--node {self['node']!r}: want a DNS label (a-z, 0-9, -), e.g. r1")
            if not self["tls-port"]:
                raise usage.UsageError("--node needs encrypted tunnels (--tls-port): its names are under --domain")
            self["node"] = node
            if not public_host_given:
                # Unencrypted tunnels print the node's own name: DNS takes visitors there.
                self["public-host"] = f"{node}.{self['domain']}"
        if self["registry"]:
            from relay.node.registry import parse_registry_url

            if node is None:
                raise usage.UsageError("--registry needs --node")
            try:
                parse_registry_url(self["registry"])
            except ValueError as e:
                raise usage.UsageError(f"--registry: {e}") from None
            if not 0 < self["peer-port"] <= 65535:
                raise usage.UsageError(f"--peer-port {self['peer-port']} is not a port")
        if bool(self["fleet-ca"]) != bool(self["fleet-ca-key"]):
            raise usage.UsageError("--fleet-ca and --fleet-ca-key go together")
        if self["peer-interface"] is None:
            self["peer-interface"] = self["interface"]
        if self["peer-host"] is None:
            self["peer-host"] = self["peer-interface"]


def agent_host(public_host: str, agent_interface: str) -> str:
    """The host agents dial (client.env's TUNNEL_RELAY): --public-host, except
    that the default `localhost` becomes the agent port's address when that is
    one specific IP other than 127.0.0.1, which `localhost` may not reach
    (`--interface ::1`: /etc/hosts often maps localhost to 127.0.0.1 only)."""
    if public_host != "localhost":
        return public_host
    try:
        bound = ipaddress.ip_address(agent_interface)
    except ValueError:
        return public_host
    if bound.is_unspecified or bound == ipaddress.ip_address("127.0.0.1"):
        return public_host
    return str(bound)


def host_port(host: str, port: int) -> str:
    """HOST:PORT as tunnel-client parses it (client/config.py): [IPv6]:PORT."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def agent_certificate_source(options) -> str:
    """Which pair the agent port presents: "agent-cert", "cert" (the wildcard
    pair names the agents' host, so agents trust it as they trust visitors'
    certificates) or "dev" (issued by the development CA: agents need it)."""
    from relay.node.tlsfront import certificate_covers

    host = options["agent-host"]
    for name in ("agent-cert", "cert"):
        path = options[name]
        if not path:
            continue
        try:
            covers = certificate_covers(path, host)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--{name} {path}: not a readable PEM certificate ({e})") from None
        if covers:
            return name
        if name == "agent-cert":
            raise usage.UsageError(
                f"--agent-cert {path} does not name {host}, the host agents dial "
                "(--public-host): they would refuse it"
            )
    return "dev"


def development_names(options) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) the development certificate must name:
    localhost and loopback, the agents' host, and every address the relay binds
    that an agent could dial (not 0.0.0.0 or ::)."""
    hostnames, ips = [], ["127.0.0.1", "::1"]
    for value in (options["agent-host"], options["public-host"], "localhost", options["interface"], options["agent-interface"]):
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            if value not in hostnames:
                hostnames.append(value)
            continue
        if not ip.is_unspecified and str(ip) not in ips:
            ips.append(str(ip))
    return hostnames, ips


def raise_open_file_limit() -> int:
    """Every visitor is a socket: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            return soft
    return soft


# The services that accept agents and visitors: closed first when the node drains.
ACCEPTING_SERVICES = ("agent-port", "tls-port", "peer-port")


class RelayNode(service.MultiService):
    """The node's services, plus start/stop chores that need a running reactor.

    Stopping: SIGTERM drains (relay/node/drain.py) for at most
    `--grace-period`, then stops; a second SIGTERM or a SIGINT stops at once.
    twistd's own handlers cannot do that: a second `reactor.stop()` raises
    ReactorNotRunning from inside the reactor and changes nothing. So once the
    reactor runs (twistd installs its handlers on startup) ours replace them;
    the first signal calls `reactor.stop()`, whose before-shutdown trigger
    (stopService) waits for the drain's Deferred.
    """

    _log = Logger()

    def __init__(self, options, state, tunnels: TunnelManager, metrics: Counters, clock=None):
        super().__init__()
        self.options = options
        self.state = state
        self.tunnels = tunnels
        self.metrics = metrics
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.drain = NodeDrain(clock, tunnels, self._stop_accepting, options["grace-period"])
        self._stop_asked = False  # a signal called reactor.stop()
        self._force = False  # stop without draining

    tls_contexts = ()  # every TLSContexts of the node: the wildcard's, the agent port's
    token_store = None

    def reload(self) -> None:
        """SIGHUP: the certificates and the tokens file, each kept if its new version is bad."""
        for contexts in self.tls_contexts:
            contexts.reload()
        if self.token_store is not None:
            self.token_store.reload()

    log_observer = None  # --log-format json: given to twistd through the application

    def setServiceParent(self, parent):
        # twistd builds the Application after makeService and then starts its
        # logging with the application's ILogObserver component if it has one
        # (twisted/application/app.py AppLogger.start): so `--log-format json`
        # works as a plugin option, and twistd's own --logger still wins.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)
    journal = None  # relay/node/reservations.py ReservationFile

    def _stop_accepting(self) -> defer.Deferred:
        stops = [self.tunnels.ports.close_listeners()]
        for name in ACCEPTING_SERVICES:
            try:
                child = self.getServiceNamed(name)
            except KeyError:
                continue
            stops.append(defer.maybeDeferred(self.removeService, child))
        return defer.DeferredList(stops, consumeErrors=True)

    def install_signal_handlers(self, reactor) -> None:
        """SIGTERM drains, a second SIGTERM or a SIGINT stops at once. A
        signal handler may not touch the reactor's state: hop onto it first."""
        signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(self.signalled, "SIGTERM", reactor))
        signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(self.signalled, "SIGINT", reactor))

    def signalled(self, name: str, reactor) -> None:
        if name == "SIGTERM" and not self._stop_asked:
            self._log.info("SIGTERM: draining (SIGTERM again or SIGINT: stop at once)")
        else:
            self._force = True
            self._log.info("{signal}: stopping at once", signal=name)
            self.drain.force()  # no-op before the drain began: stopService sees _force
        if not self._stop_asked:
            self._stop_asked = True
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass  # already stopping for another reason

    def startService(self):
        if self.journal is not None:
            # Before the agent port listens: a reclaim must find what it reclaims.
            loaded = self.journal.load()
            if loaded is not None:
                d = self.tunnels.restore(*loaded)
                d.addErrback(lambda f: self._log.failure("restoring reservations failed", f))
            self.journal.start()
        super().startService()
        from twisted.internet import reactor

        reactor.callWhenRunning(self.install_signal_handlers, reactor)
        # SIGHUP: pick up renewed certificates and changed tokens now (a
        # signal handler may not touch the reactor's state, so hop onto the
        # reactor first).
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.reload))
        o = self.options
        self._log.info(
            "relay node up: agents on {agent_iface}:{agent_port}, tunnel ports {ports} on {iface}, "
            "encrypted tunnels https://<id>.{domain}:{tls_port}, admin on http://{admin_iface}:{admin_port}",
            agent_iface=o["agent-interface"], agent_port=o["agent-port"], ports=o["ports"],
            iface=o["interface"], admin_iface=o["admin-interface"], admin_port=o["admin-port"],
            domain=f"{o['node']}.{o['domain']}" if o["node"] else o["domain"], tls_port=o["tls-port"],
        )
        if o["agent-tls"] == "dev":
            self._log.info(
                "agent port certificate: the development CA's for {host} (agents need TUNNEL_CA={ca}; "
                "--agent-cert/--agent-key, or a --cert naming {host}, give it one the system store trusts)",
                host=o["agent-host"], ca=str(self.state.ca_cert_path),
            )
        else:
            self._log.info(
                "agent port certificate: {path} (--{source}); client.env has no TUNNEL_CA: agents check it "
                "against their system trust store",
                path=o[o["agent-tls"]], source=o["agent-tls"],
            )
        if self.state.client_env_path.exists():
            self._log.info(
                "next, on the agent's machine: set -a; . {env}; set +a; "
                "then: tunnel-client forward 22 --unencrypted",
                env=str(self.state.client_env_path),
            )
        else:
            self._log.warn(
                "{env} is missing and the relay keeps only the token's hash: restart with "
                "--rotate-token to issue a new token and rewrite it",
                env=str(self.state.client_env_path),
            )

    def stopService(self):
        if self._force:
            self.drain.force()
        d = self.drain.start()
        d.addCallback(lambda _: self._stop_now())
        return d

    def _stop_now(self) -> defer.Deferred:
        """What is left after the drain (or without one) is closed now."""
        if self.journal is not None:
            # The last snapshot, with every tunnel as it stands: a restart
            # counts their grace from now. Then frozen: what close_all ends
            # below stays reserved in the file.
            self.journal.close()
        unbound = self.tunnels.close_all()
        for link in list(self.tunnels.links):
            # Agents reconnect (with backoff) to whatever relay comes back.
            link.close_link(ErrorCode.NO_ERROR, "relay stopping")
        return defer.gatherResults([unbound, defer.maybeDeferred(super().stopService)], consumeErrors=True)


def _log_file(twistd_options):
    """Where twistd would write its text log: stdout with -n (or --logfile -),
    else --logfile (default twistd.log), so --log-format json changes only the format."""
    from twisted.python import logfile

    twistd_options = twistd_options or {}
    name = twistd_options.get("logfile") or ""
    if name == "-" or (not name and twistd_options.get("nodaemon", True)):
        return sys.stdout
    return logfile.LogFile.fromFullPath(name or "twistd.log")


def _console_options(o, state, store) -> dict:
    """The admin port's credential and the console's tokens (relay/node/adminauth.py, console.py)."""
    from twisted.internet import threads

    from relay.node import adminauth
    from relay.node.relay_admin import revoke_token

    credential = None
    if adminauth.auth_required(o["admin-interface"], o["admin-auth"]):
        adminauth.ensure_admin_token(state.state_dir)  # the first start off loopback makes it
        credential = adminauth.AdminCredential(state.state_dir)
        Logger().info(
            "the admin port asks for its token (Authorization: Bearer, or the console's login): "
            "relay-admin --state-dir {state_dir} admin-token prints it",
            state_dir=o["state-dir"],
        )
    return dict(
        auth_mode=o["admin-auth"], credential=credential, token_store=store, state_hint=o["state-dir"],
        # The tokens file's lock and fsync stay off the reactor thread.
        revoke=lambda token_id: threads.deferToThread(revoke_token, state.state_dir, token_id),
    )


class _Fleet:
    """A node's part in a fleet (docs/network.md): registry, directory, peer links."""

    def __init__(self, o, state, reactor):
        from relay.node.fleetdir import FleetDirectory
        from relay.node.peers import PeerLinks, PeerTLS, peer_dns_name
        from relay.node import state as relay_state
        from relay.node.registry import RedisRegistry

        self.options = o
        self.reactor = reactor
        peer_address = host_port(o["peer-host"], o["peer-port"])
        self.registry = RedisRegistry(reactor, o["registry"], o["node"], node_info={"peer": peer_address})
        ca_paths = (o["fleet-ca"], o["fleet-ca-key"]) if o["fleet-ca"] else None
        ca_path = o["fleet-ca"] or state.ca_cert_path
        cert_path, key_path = state.state_dir / "peer.pem", state.state_dir / "peer-key.pem"
        relay_state.issue_certificate(state, [peer_dns_name(o["node"], o["domain"])], cert_path, key_path,
                                      ca_paths=ca_paths, client_auth=True)
        self.peers = PeerLinks(reactor, self.registry, PeerTLS(cert_path, key_path, ca_path),
                               node=o["node"], domain=o["domain"])
        self.directory = FleetDirectory(reactor, self.registry, node=o["node"], domain=o["domain"], peers=self.peers)

    def start(self, node, tunnels, wildcard, metrics) -> None:
        from relay.node.peers import LocalRouting
        from relay.node.registry import RegistryService
        from relay.node.tlsfront import TLSFrontFactory

        o = self.options
        self.peers.front = TLSFrontFactory(LocalRouting(tunnels, self.directory), wildcard, self.reactor, metrics)
        RegistryService(self.registry, self.peers).setServiceParent(node)
        endpoint = f"tcp:{o['peer-port']}:interface={quoteStringArgument(o['peer-interface'])}:backlog={LISTEN_BACKLOG}"
        peer_port = strports.service(endpoint, self.peers.server_factory())
        peer_port.setName("peer-port")
        peer_port.setServiceParent(node)
        Logger().info(
            "fleet node {node}: registry {registry}, peer port {peer}; stable names https://<name>-<tenant>.{domain}",
            node=o["node"], registry=o["registry"], peer=host_port(o["peer-host"], o["peer-port"]), domain=o["domain"],
        )


def _fleet(o, state, reactor):
    return _Fleet(o, state, reactor) if o["registry"] else None


def makeService(options) -> service.IService:
    """twistd's entry point: the node, or one clear line and exit 1 when a file
    it starts from is unusable (twistd would print a traceback)."""
    from relay.node.tokens import TokensFileError

    try:
        return _make_node(options)
    except (TokensFileError, ssl.SSLError) as e:
        # SSLError: e.g. a key that does not match its certificate.
        raise SystemExit(f"twistd relay: cannot start: {e}") from None


def _make_node(options) -> service.IService:
    from twisted.internet import reactor

    from relay.node import state as relay_state

    raise_open_file_limit()
    o = options
    hostnames, ips = development_names(o)
    state = relay_state.load_or_create(
        o["state-dir"],
        agent_address=host_port(o["agent-host"], o["agent-port"]),
        hostnames=hostnames,
        ip_addresses=ips,
        rotate_token=o["rotate-token"],
        agents_need_ca=o["agent-tls"] == "dev",
    )
    low, high = o["port-range"]
    allocator = PortAllocator(low, high, o["port-quarantine-seconds"], reactor)
    # The Prometheus observer is a Counters too (the admin API reads it);
    # tenants and live links are looked up in the TunnelManager made next.
    metrics = PrometheusMetrics(
        "relay", tenant_of=lambda tunnel_id: tunnels.tunnel_tenant(tunnel_id), live_links=lambda: tunnels.links,
    )
    fleet = _fleet(o, state, reactor)
    tunnels = TunnelManager(
        reactor,
        PublicPorts(reactor, allocator, o["interface"]),
        public_host=o["public-host"],
        domain=o["domain"] if o["tls-port"] else None,
        tls_port=o["tls-port"],
        grace_seconds=o["grace-seconds"],
        metrics=metrics,
        directory=fleet.directory if fleet is not None else None,
        node=o["node"],
        replica_policy=o["replica-policy"],
    )
    node = RelayNode(o, state, tunnels, metrics, reactor)
    node.setName("relay")
    if o["log-format"] == "json":
        node.log_observer = json_file_observer(_log_file(getattr(options, "parent", None)))
    node.journal = tunnels.journal = ReservationFile(state.state_dir, reactor, tunnels.snapshot)

    from relay.node.tokens import TokenStore, ensure_tokens_file

    # The development token (agent-tokens) becomes the dev tenant's on the
    # first start; a new one (--rotate-token, a lost agent-tokens) replaces it.
    tokens_path = ensure_tokens_file(
        state.state_dir, state.token_hashes, replace_dev=state.new_token is not None
    )
    store = TokenStore(tokens_path, tunnels.limits)
    store.on_reload.append(lambda table: tunnels.apply_grants(table.grant_of))
    node.token_store = store
    TimerService(o["tokens-check-seconds"], store.reload_if_changed).setServiceParent(node)

    agent_factory = AgentLinkFactory(
        reactor,
        tunnels,
        store.check_token,
        metrics=metrics,
        handshake_timeout_seconds=o["handshake-timeout"],
        keepalive_interval_seconds=o["keepalive-interval"],
        keepalive_timeout_seconds=o["keepalive-timeout"],
        link_buffer_cap=o["link-buffer-cap"],
    )
    q = quoteStringArgument
    from relay.node.tlsfront import TLSContexts, TLSFrontFactory

    wildcard = None
    if o["cert"]:
        wildcard = TLSContexts(o["cert"], o["key"])
    elif o["tls-port"]:
        cert_path = state.state_dir / "wildcard.pem"
        key_path = state.state_dir / "wildcard-key.pem"
        names = [f"*.{o['domain']}", o["domain"]]
        if o["node"]:
            names.insert(0, f"*.{o['node']}.{o['domain']}")  # random tunnels: <id>.<node>.<domain>
        relay_state.issue_certificate(state, names, cert_path, key_path)
        wildcard = TLSContexts(cert_path, key_path)
    if o["agent-tls"] == "agent-cert":
        agent_contexts = TLSContexts(o["agent-cert"], o["agent-key"])
    elif o["agent-tls"] == "cert":
        agent_contexts = wildcard  # one pair, one reload
    else:
        agent_contexts = TLSContexts(state.cert_path, state.key_path)
    node.tls_contexts = tuple(c for c in dict.fromkeys((wildcard, agent_contexts)) if c is not None)

    # The agent link's TLS is our stdlib-ssl layer (relay/wire/tlslayer.py: one C
    # call per frame instead of Twisted's four), over a plain TCP endpoint. The
    # context is asked for per connection: a reload reaches new agents only.
    agent_endpoint = f"tcp:{o['agent-port']}:interface={q(o['agent-interface'])}:backlog={LISTEN_BACKLOG}"
    agent_port = strports.service(
        agent_endpoint,
        AgentPortFactory(
            agent_contexts.server_context, agent_factory, reactor,
            handshake_timeout_seconds=o["handshake-timeout"],
            on_handshake_failed=agent_factory.tls_handshake_failed,
        ),
    )
    agent_port.setName("agent-port")
    agent_port.setServiceParent(node)

    if o["tls-port"]:
        tls_endpoint = f"tcp:{o['tls-port']}:interface={q(o['interface'])}:backlog={LISTEN_BACKLOG}"
        tls_front = TLSFrontFactory(tunnels, wildcard, reactor, metrics)
        tls_front.visitor_fd_limit = agent_factory.visitor_fd_limit
        tls_service = strports.service(tls_endpoint, tls_front)
        tls_service.setName("tls-port")
        tls_service.setServiceParent(node)
    if fleet is not None:
        fleet.start(node, tunnels, wildcard, metrics)
    for contexts in node.tls_contexts:
        TimerService(o["cert-check-seconds"], contexts.reload_if_changed).setServiceParent(node)

    if o["admin-port"]:
        from relay.node.admin import AdminAPI

        allowed = [h.strip() for h in o["admin-allowed-hosts"].split(",") if h.strip()]
        admin = AdminAPI(
            tunnels, metrics, reactor.seconds(), reactor, interface=o["admin-interface"], allowed_hosts=allowed,
            **_console_options(o, state, store),
        )
        admin.metrics_page = MetricsPage(metrics_registry(metrics, "tunnel_relay"), admin.allowed_hosts)
        admin_endpoint = f"tcp:{o['admin-port']}:interface={q(o['admin-interface'])}"
        site = Site(admin.resource())
        site.noisy = False
        strports.service(admin_endpoint, site).setServiceParent(node)
    return node
