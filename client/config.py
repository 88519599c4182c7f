"""What the user asked for, as plain data: tunnel and service specs, parsed
from command-line arguments, an agent TOML file, or Python API keywords.

No Twisted here: the CLI parses and validates before it loads the reactor.
"""

import os
import sys

from client.errors import BadServiceNameError, ConfigurationError
from relay.mux.control import SERVICE_NAME, check_stable_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SERVICE_MODES = {"tls": ("tls", "terminate"), "https": ("tls", "terminate"),
                 "passthrough": ("tls", "passthrough"), "tcp": ("tcp", None)}
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")


def parse_host_port(text, default_host: str | None = None, *, lowest_port: int = 1) -> tuple[str, int]:
    """'22' -> (default_host, 22); 'db:5432'; '[::1]:22' -> ('::1', 22).
    `lowest_port` 0 lets a listening address ask for any free port."""
    text = str(text).strip()
    host, port_text = default_host, text
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ConfigurationError(f"bad address {text!r}: use [IPv6]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigurationError(f"bad address {text!r}: the port must be a number") from None
    if not lowest_port <= port <= 65535 or not host:
        raise ConfigurationError(f"bad address {text!r}: need [HOST:]PORT with PORT in {lowest_port}-65535")
    return host, port


def format_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServiceSpec:
    """One local target and how visitors reach it.

    kind "tcp": a public port on the relay (tcp://host:port).
    kind "tls": a hostname on the relay's TLS port; mode "terminate" (the relay
    speaks TLS with its wildcard certificate, the service gets plaintext) or
    "passthrough" (the service terminates; the relay only reads the SNI).
    """

    def __init__(self, host: str, port: int, *, name: str = "", kind: str = "tcp",
                 mode: str | None = None, alpn=(), proxy_protocol: str | None = None,
                 tls_files: tuple[str, str] | None = None, agent_client_ca: str | None = None):
        if kind not in ("tcp", "tls"):
            raise ConfigurationError(f"unknown service kind {kind!r}")
        if proxy_protocol not in (None, *PROXY_PROTOCOL_VERSIONS):
            raise ConfigurationError(f"--proxy-protocol must be v1 or v2, not {proxy_protocol!r}")
        self.host, self.port, self.name, self.kind = host, port, name, kind
        self.mode = (mode or "terminate") if kind == "tls" else None
        self.alpn = tuple(alpn) if kind == "tls" else ()
        self.proxy_protocol = proxy_protocol
        # passthrough terminated by the agent itself: (cert path, key path), and
        # the CA the agent then requires of visitors
        self.tls_files = tls_files if self.mode == "passthrough" else None
        self.agent_client_ca = agent_client_ca if self.tls_files else None

    @property
    def target(self) -> str:
        return format_target(self.host, self.port)

    def wire(self) -> dict:
        out = {"name": self.name, "kind": self.kind}
        if self.kind == "tls":
            out["mode"] = self.mode
            if self.alpn:
                out["alpn"] = list(self.alpn)
        return out


class TunnelSpec:
    """One tunnel id with one or more services."""

    def __init__(self, services: list[ServiceSpec], *, name: str | None = None,
                 allow=(), client_ca: str | None = None, stable_name: str | None = None):
        if not services:
            raise ConfigurationError("a tunnel needs at least one service")
        # The tenant's stable name (--name): an address that outlives the tunnel.
        self.stable_name = check_stable_name(stable_name) if stable_name is not None else None
        self.services = list(services)
        first = self.services[0]
        if name is None:
            if len(self.services) > 1 or first.name:
                name = ",".join(f"{s.name}={s.target}" for s in self.services)
            else:
                name = str(first.port) if first.host == "localhost" else first.target
        self.name = name
        self.allow = tuple(allow)
        self.client_ca = client_ca

    def wire(self) -> dict:
        out = {"name": self.name}
        if self.stable_name is not None:
            out["stable_name"] = self.stable_name
        out["services"] = [s.wire() for s in self.services]
        if self.allow:
            out["allow"] = list(self.allow)
        if self.client_ca:
            out["client_ca"] = self.client_ca
        return out


def check_service_name(name: str, *, port_addressed: bool = False) -> str:
    if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
        raise BadServiceNameError(
            None, f"bad service name {name!r}: use 1 to 20 characters of a-z and 0-9"
        )
    if name.isdigit() and not port_addressed:
        raise BadServiceNameError(
            None,
            f"bad service name {name!r}: all-digit names are port names (use `tunnel-client expose --ports`)"
        )
    return name


def parse_service(text: str) -> tuple[str, str, int, str, str | None]:
    """'web=8000' | 'ssh=22:tcp' | 'api=10.0.0.2:9000:passthrough' -> (name, host, port, kind, mode)."""
    name, sep, target = str(text).partition("=")
    if not sep or not target:
        raise ConfigurationError(f"--service wants NAME=[HOST:]PORT[:MODE], not {text!r}")
    check_service_name(name)
    kind, mode = None, None
    head, _, last = target.rpartition(":")
    if head and last in SERVICE_MODES:
        kind, mode = SERVICE_MODES[last]
        target = head
    host, port = parse_host_port(target, default_host="localhost")
    return name, host, port, kind, mode


def parse_alpn(values) -> tuple[str, ...]:
    out = []
    for value in values or ():
        for item in str(value).split(","):
            item = item.strip()
            if item:
                if len(item.encode()) > 255 or not item.isascii():
                    raise ConfigurationError(f"bad ALPN protocol {item!r}")
                out.append(item)
    return tuple(dict.fromkeys(out))


def parse_ports(values) -> list[int]:
    ports = []
    for value in values or ():
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            if not item.isdigit() or not 1 <= int(item) <= 65535:
                raise ConfigurationError(f"--ports wants port numbers such as 3000,8080, not {item!r}")
            ports.append(int(item))
    if not ports:
        raise ConfigurationError("expose needs --ports, e.g. --ports 3000,8080")
    return list(dict.fromkeys(ports))


def build_specs(*, targets=(), services=(), expose_ports=(), unencrypted=False,
                tls_passthrough=False, alpn=(), allow=(), client_ca: str | None = None,
                proxy_protocol: str | None = None, cert: str | None = None,
                key: str | None = None, stable_name: str | None = None) -> list[TunnelSpec]:
    """The tunnels a command line (or an API call) asks for.

    Each positional target is its own tunnel; all --service entries share one
    tunnel id; expose's ports share one tunnel id with port-named services.
    `stable_name` (--name) names the one tunnel asked for: a target, or the
    services (then each is https://SERVICE-NAME-<tenant>.<domain>).
    """
    if unencrypted and tls_passthrough:
        raise ConfigurationError("--unencrypted and --tls-passthrough exclude each other")
    if unencrypted and (alpn or client_ca):
        raise ConfigurationError("--alpn and --client-ca apply to encrypted tunnels, not --unencrypted")
    kind = "tcp" if unencrypted else "tls"
    mode = "passthrough" if tls_passthrough else "terminate"
    alpn = parse_alpn(alpn)
    if tls_passthrough and alpn:
        raise ConfigurationError("--alpn is for tunnels the relay terminates; in passthrough the service negotiates")
    if bool(cert) != bool(key):
        raise ConfigurationError("--cert and --key go together")
    if cert and not tls_passthrough:
        raise ConfigurationError("--cert/--key make the agent terminate TLS: use them with --tls-passthrough")
    if tls_passthrough and client_ca and not cert:
        raise ConfigurationError(
            "--client-ca is checked by whoever terminates TLS: in passthrough that is the service, "
            "or the agent given --cert/--key"
        )
    for path in (cert, key):
        if path and not os.path.isfile(path):
            raise ConfigurationError(f"{path} does not exist (--cert/--key)")
    tls_files = (cert, key) if cert else None
    agent_client_ca = client_ca if tls_files else None
    if tls_files:
        client_ca = None  # the agent checks it; the relay only passes bytes through
    common = {"allow": tuple(allow or ()), "client_ca": client_ca}
    specs = []
    for target in targets or ():
        host, port = parse_host_port(target, default_host="localhost")
        specs.append(TunnelSpec([ServiceSpec(host, port, kind=kind, mode=mode, alpn=alpn,
                                             proxy_protocol=proxy_protocol, tls_files=tls_files,
                                             agent_client_ca=agent_client_ca)], **common))
    if services:
        named, seen = [], set()
        for item in services:
            name, host, port, service_kind, service_mode = item if isinstance(item, tuple) else parse_service(item)
            if name in seen:
                raise ConfigurationError(f"service {name!r} given twice")
            seen.add(name)
            k = service_kind or kind
            named.append(ServiceSpec(host, port, name=name, kind=k, mode=service_mode or mode,
                                     alpn=alpn, proxy_protocol=proxy_protocol, tls_files=tls_files,
                                     agent_client_ca=agent_client_ca))
        specs.append(TunnelSpec(named, **common))
    if expose_ports:
        specs.append(TunnelSpec(
            [ServiceSpec("localhost", port, name=str(port), kind=kind, mode=mode, alpn=alpn,
                         proxy_protocol=proxy_protocol) for port in expose_ports],
            **common,
        ))
    if not specs:
        raise ConfigurationError("nothing to forward: give a [HOST:]PORT, --service NAME=PORT or a config file")
    if stable_name is not None:
        if len(specs) > 1:
            raise ConfigurationError(
                "--name names one tunnel: give one [HOST:]PORT, or --service entries (one tunnel), not both or several"
            )
        specs[0].stable_name = check_stable_name(stable_name)
    return specs


def load_agent_config(path: str) -> dict:
    """An agent TOML file: relay, token, ca, json, alpn, allow, client_ca (a
    file), proxy_protocol, unencrypted, tls_passthrough, name (a stable name),
    forward (a list of targets), links, log_format, metrics_port (9100 or "HOST:PORT"),
    metrics_interface, and [services] (name = "[HOST:]PORT[:MODE]")."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigurationError(f"cannot read the config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"config file {path}: {e}") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {"relay", "token", "ca", "json", "alpn", "allow", "client_ca", "proxy_protocol",
             "unencrypted", "tls_passthrough", "forward", "services", "max_retries", "connect_timeout",
             "cert", "key", "log_format", "metrics_port", "metrics_interface", "name", "grace_period",
             "links"}
    unknown = set(data) - known
    if unknown:
        raise ConfigurationError(f"config file {path}: unknown keys {', '.join(sorted(unknown))}")
    services = data.get("services", {})
    if not isinstance(services, dict):
        raise ConfigurationError(f"config file {path}: [services] maps names to \"[HOST:]PORT[:MODE]\"")
    data["services"] = [f"{name}={target}" for name, target in services.items()]
    for key in ("alpn", "allow", "forward"):
        value = data.get(key, [])
        data[key] = [value] if isinstance(value, (str, int)) else list(value)
    return data
