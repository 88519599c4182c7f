"""`tunnel-client`: the command line of the tunnel agent.

    tunnel-client forward 22 --unencrypted
    tunnel-client forward 22 5432 db.internal:5432 --unencrypted --json

Addresses go to stdout (one line, or one JSON object, per tunnel, flushed at
once); logs go to stderr. Settings come from --relay/--token/--ca, else from
TUNNEL_RELAY / TUNNEL_TOKEN / TUNNEL_CA (what `<state-dir>/client.env` sets).
Heavy imports (Twisted's reactor, TLS) wait until a command runs.
"""

import argparse
import json
import os
import resource
import signal
import sys
import time

from client.errors import ConfigurationError, TunnelError

DEFAULT_GRACE_PERIOD_SECONDS = 30.0  # as the relay's --grace-period

EPILOG = """\
environment:
  TUNNEL_RELAY  relay agent address, HOST:PORT (e.g. localhost:17000)
  TUNNEL_TOKEN  agent token (from the relay's client.env)
  TUNNEL_TOKEN_FILE  a file holding the agent token (Docker secrets, systemd credentials)
  TUNNEL_CA     CA file that signed the relay's certificate (unset: the system trust
                store, which SSL_CERT_FILE / SSL_CERT_DIR may point elsewhere)

exit codes: 2 usage or configuration, 3 token refused, 4 relay certificate not
trusted or for another name, 5 relay unreachable (--max-retries used up),
6 a limit or no free port, 7 an address lost, 8 protocol version mismatch

Load a relay's development settings with:  set -a; . relay-state/client.env; set +a
"""


def _add_common_options(command: argparse.ArgumentParser) -> None:
    kinds = command.add_argument_group("kind of tunnel (default: encrypted, the relay terminates TLS)")
    kinds.add_argument(
        "--unencrypted", action="store_true",
        help="raw TCP tunnel on a random public port of the relay (tcp://host:port)",
    )
    kinds.add_argument(
        "--tls-passthrough", action="store_true",
        help="the relay routes by SNI without terminating: the service speaks TLS itself",
    )
    kinds.add_argument("--cert", metavar="FILE",
                       help="with --tls-passthrough: the agent terminates TLS with this certificate chain")
    kinds.add_argument("--key", metavar="FILE", help="the private key of --cert")
    kinds.add_argument(
        "--alpn", action="append", metavar="PROTO",
        help="ALPN protocols the service speaks, e.g. h2 for HTTP/2 and gRPC "
        "(repeatable or comma-separated; default http/1.1)",
    )
    access = command.add_argument_group("visitor access (checked at L4; open by default)")
    access.add_argument(
        "--allow", action="append", metavar="CIDR",
        help="only visitors from this network (repeatable); others are closed and counted",
    )
    access.add_argument(
        "--client-ca", metavar="FILE",
        help="mutual TLS: visitors must present a certificate from this CA (encrypted tunnels)",
    )
    access.add_argument(
        "--proxy-protocol", choices=("v1", "v2"),
        help="write a PROXY protocol header with the visitor's address to the service",
    )
    address = command.add_argument_group("address (default: random, kept across reconnects within the grace period)")
    address.add_argument(
        "--name", metavar="NAME",
        help="a stable address tied to your tenant: https://NAME-<tenant>.<domain>, or a TCP port "
        "kept for NAME; the same after agent and relay restarts (1-32 of a-z, 0-9, inner hyphens)",
    )
    relay = command.add_argument_group("relay and agent")
    relay.add_argument("--json", action="store_true", help="print one JSON object per address")
    relay.add_argument("--relay", help="relay agent address HOST:PORT [env TUNNEL_RELAY]")
    relay.add_argument("--token", help="agent token [env TUNNEL_TOKEN]; visible in ps: prefer --token-file")
    relay.add_argument("--token-file", metavar="FILE", help="read the agent token from FILE")
    relay.add_argument("--ca", help="CA file for the relay's certificate [env TUNNEL_CA]")
    relay.add_argument("--config", metavar="FILE", help="agent TOML file (see the README)")
    relay.add_argument(
        "--links", type=int, default=None, metavar="N",
        help="TLS links kept to the relay, one session (default 2): losing one loses only its streams",
    )
    relay.add_argument(
        "--max-retries", type=int, default=None, metavar="N",
        help="give up (exit code 5) after the first attempt and N retries, or after N failed "
        "reconnects once a link was lost (0: exit as soon as it fails or is lost; for "
        "supervisors such as systemd or Docker); default: retry forever",
    )
    relay.add_argument(
        "--connect-timeout", type=float, default=None, metavar="SECONDS",
        help="give the relay this long to accept the TCP connection, and as long again for "
        "the TLS handshake (default 10)",
    )
    relay.add_argument(
        "--keepalive-interval", type=float, default=None, metavar="SECONDS",
        help="seconds between keepalive pings (default 10)",
    )
    relay.add_argument(
        "--keepalive-timeout", type=float, default=None, metavar="SECONDS",
        help="declare the link dead after this much silence (default 30)",
    )
    relay.add_argument(
        "--grace-period", type=float, default=None, metavar="SECONDS",
        help="on SIGTERM, how long visitors' connections in progress may take to finish "
        "(the relay stops sending new ones at once); a second SIGTERM or SIGINT stops at once "
        f"(default {DEFAULT_GRACE_PERIOD_SECONDS:g})",
    )
    relay.add_argument(
        "--no-console", action="store_true",
        help="print the plain address lines even in a terminal (the live view is drawn only "
        "when stdout is a terminal and neither --json nor --log-format json is given)",
    )
    relay.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    relay.add_argument(
        "--log-format", choices=("text", "json"), default=None,
        help="text (default) or json: one JSON object per line on stderr (time, level, namespace, message)",
    )
    relay.add_argument(
        "--metrics-port", metavar="[HOST:]PORT", default=None,
        help="serve /metrics (docs/metrics.md), /healthz and /ready on this port; HOST defaults to --metrics-interface",
    )
    relay.add_argument(
        "--metrics-interface", metavar="ADDR", default=None,
        help="address --metrics-port binds (default 127.0.0.1; keep it private: tunnel ids name hostnames)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel-client",
        description="Give local TCP services a public address through a tunnel relay.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    forward = commands.add_parser(
        "forward",
        help="forward local ports or named services",
        description=(
            "Open one tunnel per [HOST:]PORT, and one tunnel with a URL per --service. "
            "Encrypted by default: https://<id>.<relay domain>, TLS terminated by the relay."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    forward.add_argument(
        "targets", nargs="*", metavar="[HOST:]PORT",
        help="local port (host defaults to localhost), or HOST:PORT on the agent's network",
    )
    forward.add_argument(
        "--service", action="append", metavar="NAME=[HOST:]PORT[:MODE]",
        help="a named service in one shared tunnel: https://NAME-<id>.<domain>; "
        "MODE is tls (default), passthrough or tcp (repeatable)",
    )
    _add_common_options(forward)
    expose = commands.add_parser(
        "expose",
        help="expose listed local ports under one tunnel id: https://<port>-<id>.<domain>",
        description="One tunnel id; each listed port gets https://<port>-<id>.<domain>.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    expose.add_argument("--ports", action="append", required=True, metavar="P[,P...]",
                        help="local ports to expose, e.g. 3000,8080")
    _add_common_options(expose)
    return parser


def _settings(args) -> dict:
    """Merge the command line, the --config file and the environment, in that order."""
    from client.config import build_specs, load_agent_config, parse_ports

    file = load_agent_config(args.config) if args.config else {}

    def unset(value) -> bool:
        return value is None or value is False or value == []  # 0 is a real value (max_retries)

    def pick(name, env=None):
        value = getattr(args, name, None)
        if unset(value):
            value = file.get(name)
        if unset(value) and env:
            value = os.environ.get(env)
        return value

    relay = pick("relay", "TUNNEL_RELAY")
    token = args.token
    if not token and args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise ConfigurationError(f"cannot read --token-file {args.token_file}: {e.strerror}") from None
    token = token or pick("token") or _token_from_environment()
    ca = pick("ca", "TUNNEL_CA") or None
    if not relay:
        raise ConfigurationError("no relay address: set TUNNEL_RELAY or pass --relay HOST:PORT")
    if not token:
        raise ConfigurationError("no token: set TUNNEL_TOKEN or pass --token")
    if ca and not os.path.isfile(ca):
        raise ConfigurationError(f"CA file {ca} does not exist (TUNNEL_CA / --ca)")
    max_retries = pick("max_retries")
    if max_retries is not None and (not isinstance(max_retries, int) or max_retries < 0):
        raise ConfigurationError("--max-retries must be 0 or more")
    connect_timeout = pick("connect_timeout")
    if connect_timeout is not None and (
        isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) or not connect_timeout > 0
    ):
        raise ConfigurationError("--connect-timeout must be a number of seconds above 0")
    client_ca_path = pick("client_ca")
    client_ca = None
    if client_ca_path:
        try:
            with open(client_ca_path) as f:
                client_ca = f.read()
        except OSError as e:
            raise ConfigurationError(f"cannot read --client-ca {client_ca_path}: {e.strerror}") from None
    targets = list(getattr(args, "targets", None) or []) + [str(t) for t in file.get("forward", [])]
    services = list(getattr(args, "service", None) or []) + file.get("services", [])
    expose_ports = parse_ports(args.ports) if args.command == "expose" else ()
    specs = build_specs(
        targets=targets,
        services=services,
        expose_ports=expose_ports,
        unencrypted=bool(pick("unencrypted")),
        tls_passthrough=bool(pick("tls_passthrough")),
        alpn=(args.alpn or []) + [str(a) for a in file.get("alpn", [])],
        allow=(args.allow or []) + [str(a) for a in file.get("allow", [])],
        client_ca=client_ca,
        proxy_protocol=pick("proxy_protocol"),
        cert=pick("cert"),
        key=pick("key"),
        stable_name=pick("name"),
    )
    grace_period = pick("grace_period")
    if grace_period is None:
        grace_period = DEFAULT_GRACE_PERIOD_SECONDS
    if not isinstance(grace_period, (int, float)) or isinstance(grace_period, bool) or grace_period < 0:
        raise ConfigurationError("--grace-period must be 0 or more seconds")
    log_format = pick("log_format") or "text"
    if log_format not in ("text", "json"):
        raise ConfigurationError(f"log_format must be text or json, not {log_format!r}")
    return {
        "relay": relay, "token": token, "ca": ca, "specs": specs,
        "max_retries": max_retries, "connect_timeout": connect_timeout, "json": bool(pick("json")),
        "log_format": log_format,
        "grace_period": float(grace_period),
        "metrics": _metrics_address(pick("metrics_port"), pick("metrics_interface")),
        "links": pick("links"),
    }


def _token_from_environment() -> str | None:
    """TUNNEL_TOKEN, or the contents of the file TUNNEL_TOKEN_FILE names (a
    Docker secret, a systemd credential: the token stays out of `ps` and
    `docker inspect`); both set is ambiguous, so refused."""
    token, path = os.environ.get("TUNNEL_TOKEN"), os.environ.get("TUNNEL_TOKEN_FILE")
    if token and path:
        raise ConfigurationError("both TUNNEL_TOKEN and TUNNEL_TOKEN_FILE are set: keep one")
    if not path:
        return token
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise ConfigurationError(f"cannot read TUNNEL_TOKEN_FILE {path}: {e.strerror}") from None


def _metrics_address(port, interface) -> tuple[str, int] | None:
    """(host, port) for --metrics-port: `9100` binds 127.0.0.1:9100 (or
    --metrics-interface), `HOST:PORT` or `[IPv6]:PORT` binds HOST; 0 picks a free port."""
    if port is None or port == "":
        return None
    from client.config import parse_host_port

    try:
        return parse_host_port(port, str(interface) if interface else "127.0.0.1", lowest_port=0)
    except ConfigurationError as e:
        raise ConfigurationError(f"--metrics-port: {e}") from None


def _raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _start_logging(verbose: bool, log_format: str = "text", panel=None) -> None:
    """Log to stderr; or, with `panel` (the live view's log file), into the
    view, where a line written under it would tear its drawing."""
    from twisted.logger import (
        FileLogObserver,
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        PredicateResult,
        formatEvent,
        globalLogBeginner,
    )

    def format_line(event) -> str | None:
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += "\n" + event["log_failure"].getTraceback()
        level = event.get("log_level")
        prefix = "" if level in (LogLevel.info, LogLevel.debug) else f"{level.name}: "
        return f"tunnel-client: {prefix}{text}\n"

    def not_twisted_chatter(event) -> PredicateResult:
        # Twisted's own info lines ("Main loop terminated.", "Starting factory
        # ...") say nothing to a user: the agent reports in its own words.
        # Its warnings and errors still pass; -v shows everything.
        namespace = event.get("log_namespace") or ""
        level = event.get("log_level")
        if namespace.startswith("twisted.") and level in (LogLevel.debug, LogLevel.info):
            return PredicateResult.no
        return PredicateResult.maybe

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.debug if verbose else LogLevel.info)
    if log_format == "json":
        from relay.wire.jsonlog import json_file_observer

        output = json_file_observer(sys.stderr)
    else:
        output = FileLogObserver(panel if panel is not None else sys.stderr, format_line)
    predicates = [predicate] if verbose else [not_twisted_chatter, predicate]
    observer = FilteringLogObserver(output, predicates)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _print_tunnel(tunnel, as_json: bool) -> None:
    if as_json:
        lines = [json.dumps(item, separators=(", ", ": ")) for item in tunnel.describe()]
    else:
        lines = [endpoint.url for endpoint in tunnel.endpoints]
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def _error(message: str, log_format: str) -> None:
    """The line an error ends the agent with: JSON too under --log-format json."""
    if log_format == "json":
        from twisted.logger import LogLevel

        from relay.wire.jsonlog import json_line

        event = {"log_level": LogLevel.critical, "log_namespace": "tunnel-client", "log_format": "{error}",
                 "error": message, "log_time": time.time()}
        sys.stderr.write(json_line(event))
    else:
        sys.stderr.write(f"tunnel-client: error: {message}\n")
    sys.stderr.flush()


def _start_metrics(reactor, address: tuple[str, int], agent):
    """Listen for Prometheus scrapes; a Deferred firing with the port."""
    from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
    from twisted.web.server import Site

    from relay.wire.hostcheck import allowed_hosts_for
    from relay.wire.prommetrics import MetricsPage, metrics_registry

    host, port = address
    from client.health import AgentHealthPage

    page = MetricsPage(metrics_registry(agent.metrics, "tunnel_agent"), allowed_hosts_for(host))
    site = Site(AgentHealthPage(agent, page))
    site.noisy = False
    endpoint_type = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
    return endpoint_type(reactor, port, interface=host).listen(site)


def _console(args, settings):
    """The live terminal view (client/console.py), or None for the plain lines."""
    from client.console import LiveConsole, use_console

    if use_console(sys.stdout, as_json=settings["json"], log_format=settings["log_format"],
                   no_console=args.no_console):
        return LiveConsole(sys.stdout)
    return None


def _run(args) -> int:
    settings = _settings(args)
    _raise_open_file_limit()
    console = _console(args, settings)
    # Log lines go into the view only while stderr is that same terminal.
    panel = console.log_file() if console is not None and sys.stderr.isatty() else None
    _start_logging(args.verbose, settings["log_format"], panel)

    try:
        from relay.wire import reactor as relay_reactor
    except ImportError:  # no epoll (not Linux): Twisted's default reactor, links flush at once
        pass
    else:
        relay_reactor.install()  # the turn-end hook batches link writes (relay/wire/reactor.py)
    from twisted.internet import reactor
    from twisted.internet.error import ReactorNotRunning

    from client.agent import TunnelAgent
    from relay.wire.metrics import NULL_METRICS

    outcome = {"code": 0}

    def on_tunnel(tunnel, event):
        if event in ("open", "moved") and console is None:  # the view shows addresses itself
            _print_tunnel(tunnel, settings["json"])

    kwargs = {}
    if args.keepalive_interval is not None:
        kwargs["keepalive_interval_seconds"] = args.keepalive_interval
    if args.keepalive_timeout is not None:
        kwargs["keepalive_timeout_seconds"] = args.keepalive_timeout
    if settings["connect_timeout"] is not None:
        kwargs["connect_timeout_seconds"] = float(settings["connect_timeout"])
    if settings["links"] is not None:
        kwargs["links"] = settings["links"]
    holder = {}
    if settings["metrics"] is not None:
        from relay.wire.prommetrics import PrometheusMetrics

        # The agent's one link, read at scrape time for its open streams' bytes.
        kwargs["metrics"] = PrometheusMetrics(
            "agent", live_links=lambda: list(holder["agent"].ready_links),
            link_states=lambda: holder["agent"].link_states(),
        )
    else:
        kwargs["metrics"] = NULL_METRICS
    agent = holder["agent"] = TunnelAgent(
        reactor,
        settings["relay"],
        settings["token"],
        ca_path=settings["ca"],
        specs=settings["specs"],
        on_tunnel=on_tunnel,
        max_retries=settings["max_retries"],
        on_visitor=console.visitor_ended if console is not None else None,
        **kwargs,
    )

    def failed(failure):
        failure.trap(TunnelError)
        if console is None:
            _error(str(failure.value), settings["log_format"])
        else:  # said once the view has stopped drawing, below its last frame
            outcome["error"] = str(failure.value)
        outcome["code"] = failure.value.exit_code

    def finished(_):
        # After a signal the reactor is already stopping (agent.stop runs
        # "before shutdown") while reactor.running is still True.
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    agent.done.addErrback(failed).addBoth(finished)
    # The reactor's own handlers would stop at once on SIGTERM, and a second
    # signal only raises ReactorNotRunning inside it: ours replace them once it
    # runs. SIGTERM drains (agent.stop with the grace period, which the
    # before-shutdown trigger waits for); a second SIGTERM or a SIGINT forces.
    shutdown = {"grace": 0.0, "asked": False}

    def signalled(name):
        if name == "SIGTERM" and not shutdown["asked"]:
            shutdown["grace"] = settings["grace_period"]
        elif agent.draining:
            agent.stop()  # the second signal: stop at once
        if not shutdown["asked"]:
            shutdown["asked"] = True
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass

    def install_signal_handlers():
        for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            signal.signal(signum, lambda *_, name=name: reactor.callFromThread(signalled, name))

    reactor.callWhenRunning(install_signal_handlers)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: agent.stop(shutdown["grace"]))
    if settings["metrics"] is not None:
        from twisted.logger import Logger

        log = Logger(namespace="tunnel-client")

        def listening(port):
            address = port.getHost()
            log.info("metrics on http://{host}:{port}/metrics", host=address.host, port=address.port)

        def cannot_listen(failure):
            host, port = settings["metrics"]
            _error(f"cannot listen on --metrics-port {host}:{port}: {failure.getErrorMessage()}",
                   settings["log_format"])
            outcome["code"] = ConfigurationError.exit_code

        listen = _start_metrics(reactor, settings["metrics"], agent)
        listen.addCallbacks(listening, cannot_listen)
        if outcome["code"]:  # a TCP listen fails at once: no link, no reactor
            return outcome["code"]
    agent.start()  # raises ConfigurationError (e.g. an unreadable CA) before we block
    if console is None:
        reactor.run()
        return outcome["code"]
    console.start(reactor, agent)
    try:
        reactor.run()
    finally:
        console.stop()  # the last frame stays; the cursor comes back
    if "error" in outcome:
        _error(outcome["error"], settings["log_format"])
    return outcome["code"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _run(args)
    except TunnelError as e:
        _error(str(e), getattr(args, "log_format", None) or "text")
        code = e.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
