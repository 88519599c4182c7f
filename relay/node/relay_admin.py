"""`relay-admin`: the operator's command for the relay's tokens file.

    relay-admin --state-dir relay-state token add --tenant acme --max-tunnels 10
    relay-admin token list
    relay-admin token change 3f9c0a1b2d4e --bandwidth 10MB
    relay-admin token revoke 3f9c0a1b2d4e        (or --tenant acme)
    relay-admin admin-token [--rotate]           the admin port's bearer token

It edits ``<state-dir>/tokens.json`` (relay/node/tokens.py) under its lock,
atomically, so it is safe while the relay runs; the relay sees the change
within ``--tokens-check-seconds`` (2 s) or at once on SIGHUP. A new token is
printed once, by `token add`; nothing prints a stored token or its hash.

Exit codes: 0 done; 1 the tokens file cannot be read or written; 2 bad
input; 3 no such token or tenant.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

EXIT_FILE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3

# Decimal units as disk and network vendors write them, binary with "i".
UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
BANDWIDTH = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?(?:/s)?\s*", re.IGNORECASE)
CLEAR = "default"  # `token change ID --max-tunnels default`: back to the node's default


class AdminError(Exception):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def parse_bandwidth(text: str) -> int:
    """'10MB' -> 10000000 bytes per second; '1MiB' -> 1048576; '65536' -> 65536."""
    match = BANDWIDTH.fullmatch(text)
    if match is None:
        raise AdminError(f"--bandwidth {text!r}: want bytes per second, e.g. 1MB, 500KB, 2MiB", EXIT_USAGE)
    return int(float(match.group(1)) * UNITS[(match.group(2) or "").lower()])


def parse_ports(text: str) -> list[int]:
    try:
        low, high = (int(part) for part in text.split("-", 1))
    except ValueError:
        raise AdminError(f"--ports {text!r}: want LO-HI, e.g. 30000-30099", EXIT_USAGE) from None
    return [low, high]


def parse_names(text: str) -> list[str]:
    names = sorted({name.strip() for name in text.split(",") if name.strip()})
    if not names:
        raise AdminError(f"--names {text!r}: want NAME[,NAME...], e.g. web,api", EXIT_USAGE)
    return names


def _positive_int(option: str):
    def convert(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise AdminError(f"{option} {text!r}: want a whole number", EXIT_USAGE) from None
    return convert


def _number(option: str):
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise AdminError(f"{option} {text!r}: want a number", EXIT_USAGE) from None
        return int(value) if value.is_integer() else value
    return convert


# option, limits key, converter
LIMIT_OPTIONS = (
    ("--max-tunnels", "max_tunnels", _positive_int("--max-tunnels")),
    ("--max-streams", "max_streams", _positive_int("--max-streams")),
    ("--max-new-streams-per-second", "max_new_streams_per_second", _number("--max-new-streams-per-second")),
    ("--bandwidth", "bandwidth", parse_bandwidth),
    ("--ports", "ports", parse_ports),
    ("--names", "names", parse_names),
)
LIMIT_HELP = {
    "max_tunnels": "tunnels of this token at once (all its agents together)",
    "max_streams": "concurrent visitor streams of this token (all its tunnels together)",
    "max_new_streams_per_second": "new visitor streams per second, per tunnel",
    "bandwidth": "bytes per second per tunnel, each direction (1MB, 500KB, 2MiB)",
    "ports": "public port range LO-HI the token's TCP tunnels get ports from",
    "names": "comma-separated stable names the token may claim",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay-admin",
        description="Manage the agent tokens of a tunnel-relay node (its tokens file); safe while the relay runs.",
        epilog="Exit codes: 0 done, 1 tokens file unreadable or unwritable, 2 bad input, 3 no such token or tenant.",
    )
    parser.add_argument("--state-dir", default="relay-state", help="the relay's state folder [default: relay-state]")
    top = parser.add_subparsers(dest="area", metavar="{token,admin-token}")
    top.required = True
    token = top.add_parser("token", help="add, list, change or revoke agent tokens")
    commands = token.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def limit_options(command, clearable: bool):
        group = command.add_argument_group(
            "limits (absent: the node's default" + (f"; '{CLEAR}' clears one)" if clearable else ")")
        )
        for option, key, _ in LIMIT_OPTIONS:
            group.add_argument(option, dest=key, metavar="VALUE", help=LIMIT_HELP[key])

    add = commands.add_parser("add", help="issue a new token (printed once)")
    add.add_argument("--tenant", required=True, help="tenant the token belongs to (1-20 of a-z, 0-9)")
    add.add_argument("--label", default="", help="a note for operators")
    add.add_argument("--json", action="store_true", help="print one JSON object")
    limit_options(add, clearable=False)

    listing = commands.add_parser("list", help="list tokens (never a token or its hash)")
    listing.add_argument("--tenant", help="only this tenant's")
    listing.add_argument("--json", action="store_true", help="print a JSON array")

    change = commands.add_parser("change", help="change a token's limits or label")
    change.add_argument("token_id", metavar="ID")
    change.add_argument("--label")
    change.add_argument("--json", action="store_true", help="print the token as JSON")
    limit_options(change, clearable=True)

    revoke = commands.add_parser("revoke", help="revoke a token, or every token of a tenant")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("token_id", metavar="ID", nargs="?")
    target.add_argument("--tenant", help="revoke every token of this tenant")

    admin_token = top.add_parser(
        "admin-token", help="print the admin port's bearer token (made if missing), or --rotate it",
        description="The token the admin port and its web console ask for when bound off loopback "
        "(or with --admin-auth token): Authorization: Bearer <token>, or the console's login form.",
    )
    admin_token.add_argument("--rotate", action="store_true", help="replace it; the old one and its sessions stop working")
    return parser


def _limit_changes(args, clearable: bool) -> dict:
    changes = {}
    for option, key, convert in LIMIT_OPTIONS:
        text = getattr(args, key)
        if text is None:
            continue
        changes[key] = None if clearable and text == CLEAR else convert(text)
    return changes


def _limits(current: dict, changes: dict, where: str):
    from relay.node.tokens import TokensFileError, parse_limits

    merged = {k: v for k, v in {**current, **changes}.items() if v is not None}
    try:
        return parse_limits(merged, where)
    except TokensFileError as e:
        raise AdminError(str(e), EXIT_USAGE) from None


def _describe(record) -> str:
    from relay.node.tokens import limits_text

    return limits_text(record.limits.to_json()) or "(node defaults)"


def _print_records(records, as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.public() for r in records], indent=1))
        return
    rows = [("ID", "TENANT", "LABEL", "CREATED", "LIMITS")]
    rows += [(r.token_id, r.tenant, r.label or "-", r.created, _describe(r)) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])


def run(args) -> int:
    if args.area == "admin-token":
        return _admin_token(args)
    from relay.node.state import hash_token

    def change(records):
        from relay.node import tokens as store

        return _command(args, records, store, hash_token)

    result = edit_tokens(Path(args.state_dir), change)
    result()
    return 0


def edit_tokens(state_dir: Path, change):
    """Read-modify-write the tokens file under its lock: `change(records)`
    returns (result, the new records or None to leave the file); returns
    the result. AdminError for a missing folder or a bad file. Used by this
    command and by the console's revoke (relay/node/console.py)."""
    from relay.node import tokens as store
    from relay.node.state import TOKENS_FILE, _read_token_hashes

    state_dir = Path(state_dir)
    _check_state_dir(state_dir)
    path = state_dir / store.TOKENS_JSON
    try:
        with store.locked(state_dir):
            if not path.exists():
                # A relay of an earlier release: its development token first.
                legacy = state_dir / TOKENS_FILE
                hashes = _read_token_hashes(legacy) if legacy.exists() else ()
                records = [
                    store.TokenRecord(store.new_token_id(()), "dev", store.now_text(), d, "development token")
                    for d in hashes
                ]
            else:
                records = list(store.read_tokens(path))
            result, changed = change(records)
            if changed is not None:
                store.write_tokens(path, changed)
    except ValueError as e:  # TokensFileError, or a corrupt agent-tokens
        raise AdminError(f"{e} (fix or restore the file; a running relay keeps its last good copy)", EXIT_FILE) from None
    except OSError as e:
        raise AdminError(f"cannot use {path}: {e.strerror}", EXIT_FILE) from None
    return result


def _check_state_dir(state_dir: Path) -> None:
    if not state_dir.is_dir():
        raise AdminError(
            f"{state_dir} is not a relay state folder: start the relay once "
            f"(twistd -n relay --state-dir {state_dir}) or pass --state-dir",
            EXIT_FILE,
        )


def revoke_token(state_dir: Path, token_id: str) -> list:
    """Remove one token from the tokens file (as `token revoke ID`); its
    records gone. The relay closes its links on its next reload."""
    return edit_tokens(state_dir, lambda records: _revoke(records, token_id, None))


def _admin_token(args) -> int:
    """`relay-admin admin-token [--rotate]`: print the admin port's bearer
    token (relay/node/adminauth.py), making it if there is none."""
    from relay.node import adminauth

    state_dir = Path(args.state_dir)
    _check_state_dir(state_dir)
    try:
        if args.rotate:
            token = adminauth.write_new_admin_token(state_dir)
            sys.stderr.write(
                "relay-admin: a new admin token is in force within seconds; the old one and its "
                "console sessions stop working:\n"
            )
        else:
            token = adminauth.ensure_admin_token(state_dir)
    except (OSError, UnicodeDecodeError) as e:
        raise AdminError(f"cannot use {adminauth.admin_token_path(state_dir)}: {e}", EXIT_FILE) from None
    print(token)
    return 0


def _command(args, records, store, hash_token):
    """(what to print, the new records or None): all checks before any write."""
    if args.command == "add":
        tenant = _checked(store.check_tenant, args.tenant, "--tenant")
        label = _checked(store.check_label, args.label, "--label")
        limits = _limits({}, _limit_changes(args, clearable=False), "token add")
        from relay.node.state import new_token

        token = new_token()  # as the development token: 256 bits, never "-..."
        record = store.TokenRecord(
            store.new_token_id({r.token_id for r in records}), tenant, store.now_text(),
            hash_token(token), label, limits,
        )

        def show():
            if args.json:
                print(json.dumps(dict(record.public(), token=token)))
            else:
                sys.stderr.write(
                    f"relay-admin: token {record.token_id} of tenant {tenant} added; "
                    "it is shown only now (the relay keeps its hash):\n"
                )
                print(token)
        return show, records + [record]
    if args.command == "list":
        shown = [r for r in records if args.tenant is None or r.tenant == args.tenant]
        return (lambda: _print_records(shown, args.json)), None
    if args.command == "change":
        index = _find(records, args.token_id)
        record = records[index]
        changes = _limit_changes(args, clearable=True)
        if not changes and args.label is None:
            raise AdminError("token change: nothing to change (give a limit option or --label)", EXIT_USAGE)
        limits = _limits(record.limits.to_json(), changes, f"token {record.token_id}")
        label = record.label if args.label is None else _checked(store.check_label, args.label, "--label")
        record = replace(record, limits=limits, label=label)
        records = records[:index] + [record] + records[index + 1:]

        def show_changed():
            if args.json:
                print(json.dumps(record.public()))
            else:
                print(f"token {record.token_id} of tenant {record.tenant}: {_describe(record)}")
        return show_changed, records
    gone, kept = _revoke(records, args.token_id, args.tenant)

    def show_revoked():
        for r in gone:
            print(f"revoked token {r.token_id} of tenant {r.tenant}")
    return show_revoked, kept


def _revoke(records, token_id, tenant):
    """(the records that go, the records kept): one token, or a tenant's all."""
    if tenant is not None:
        gone = [r for r in records if r.tenant == tenant]
        if not gone:
            raise AdminError(f"no tokens of tenant {tenant!r}", EXIT_NOT_FOUND)
    else:
        gone = [records[_find(records, token_id)]]
    return gone, [r for r in records if r not in gone]


def _find(records, token_id: str) -> int:
    for index, record in enumerate(records):
        if record.token_id == token_id:
            return index
    raise AdminError(f"no token with id {token_id!r} (relay-admin token list shows them)", EXIT_NOT_FOUND)


def _checked(check, value, option: str):
    from relay.node.tokens import TokensFileError

    try:
        return check(value, option)
    except TokensFileError as e:
        raise AdminError(str(e), EXIT_USAGE) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad usage: argparse exits 2
    try:
        code = run(args)
    except AdminError as e:
        sys.stderr.write(f"relay-admin: error: {e}\n")
        code = e.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
