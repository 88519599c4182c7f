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
import sys

from client.errors import ConfigurationError, TunnelError

EPILOG = """\
environment:
  TUNNEL_RELAY  relay agent address, HOST:PORT (e.g. localhost:17000)
  TUNNEL_TOKEN  agent token (from the relay's client.env)
  TUNNEL_CA     CA file that signed the relay's certificate (default: system store)

Load a relay's development settings with:  set -a; . relay-state/client.env; set +a
"""


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
        help="forward one or more local ports",
        description="Open one tunnel per target over one link to the relay.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    forward.add_argument(
        "targets", nargs="+", metavar="[HOST:]PORT",
        help="local port (host defaults to localhost), or HOST:PORT on the agent's network",
    )
    forward.add_argument(
        "--unencrypted", action="store_true",
        help="raw TCP tunnel on a random public port of the relay (tcp://host:port)",
    )
    forward.add_argument("--json", action="store_true", help="print one JSON object per tunnel")
    forward.add_argument("--relay", help="relay agent address HOST:PORT [env TUNNEL_RELAY]")
    forward.add_argument("--token", help="agent token [env TUNNEL_TOKEN]")
    forward.add_argument("--ca", help="CA file for the relay's certificate [env TUNNEL_CA]")
    forward.add_argument(
        "--max-retries", type=int, default=None, metavar="N",
        help="give up after N failed reconnects (0: exit as soon as the link is lost; "
        "for supervisors such as systemd or Docker); default: retry forever",
    )
    forward.add_argument(
        "--keepalive-interval", type=float, default=None, metavar="SECONDS",
        help="seconds between keepalive pings (default 10)",
    )
    forward.add_argument(
        "--keepalive-timeout", type=float, default=None, metavar="SECONDS",
        help="declare the link dead after this much silence (default 30)",
    )
    forward.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    return parser


def _settings(args) -> dict:
    relay = args.relay or os.environ.get("TUNNEL_RELAY")
    token = args.token or os.environ.get("TUNNEL_TOKEN")
    ca = args.ca or os.environ.get("TUNNEL_CA") or None
    if not relay:
        raise ConfigurationError("no relay address: set TUNNEL_RELAY or pass --relay HOST:PORT")
    if not token:
        raise ConfigurationError("no token: set TUNNEL_TOKEN or pass --token")
    if ca and not os.path.isfile(ca):
        raise ConfigurationError(f"CA file {ca} does not exist (TUNNEL_CA / --ca)")
    if not args.unencrypted:
        raise ConfigurationError(
            "encrypted tunnels are not available on this version yet: "
            "add --unencrypted for a raw TCP tunnel (tcp://host:port)"
        )
    if args.max_retries is not None and args.max_retries < 0:
        raise ConfigurationError("--max-retries must be 0 or more")
    return {"relay": relay, "token": token, "ca": ca}


def _raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _start_logging(verbose: bool) -> None:
    from twisted.logger import (
        FileLogObserver,
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
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

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.debug if verbose else LogLevel.info)
    observer = FilteringLogObserver(FileLogObserver(sys.stderr, format_line), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _print_tunnel(tunnel, as_json: bool) -> None:
    if as_json:
        line = json.dumps(tunnel.describe(), separators=(", ", ": "))
    else:
        line = tunnel.url
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _forward(args) -> int:
    settings = _settings(args)
    from client.agent import TunnelAgent, TunnelSpec, parse_host_port

    specs = []
    for target in args.targets:
        host, port = parse_host_port(target, default_host="localhost")
        specs.append(TunnelSpec(host, port))
    _raise_open_file_limit()
    _start_logging(args.verbose)

    from twisted.internet import reactor
    from twisted.internet.error import ReactorNotRunning

    outcome = {"code": 0}

    def on_tunnel(tunnel, event):
        if event in ("open", "moved"):
            _print_tunnel(tunnel, args.json)

    kwargs = {}
    if args.keepalive_interval is not None:
        kwargs["keepalive_interval_seconds"] = args.keepalive_interval
    if args.keepalive_timeout is not None:
        kwargs["keepalive_timeout_seconds"] = args.keepalive_timeout
    agent = TunnelAgent(
        reactor,
        settings["relay"],
        settings["token"],
        ca_path=settings["ca"],
        specs=specs,
        on_tunnel=on_tunnel,
        max_retries=args.max_retries,
        **kwargs,
    )

    def failed(failure):
        failure.trap(TunnelError)
        sys.stderr.write(f"tunnel-client: error: {failure.value}\n")
        outcome["code"] = failure.value.exit_code

    def finished(_):
        # After a signal the reactor is already stopping (agent.stop runs
        # "before shutdown") while reactor.running is still True.
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    agent.done.addErrback(failed).addBoth(finished)
    # SIGINT/SIGTERM stop the reactor; say goodbye to the relay first.
    reactor.addSystemEventTrigger("before", "shutdown", agent.stop)
    agent.start()  # raises ConfigurationError (e.g. an unreadable CA) before we block
    reactor.run()
    return outcome["code"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "forward":
            code = _forward(args)
        else:  # pragma: no cover (argparse refuses unknown commands)
            code = 2
    except TunnelError as e:
        sys.stderr.write(f"tunnel-client: error: {e}\n")
        code = e.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
