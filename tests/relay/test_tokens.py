"""The tokens file (relay/node/tokens.py) and relay-admin (relay/node/relay_admin.py):
hashes only, atomic 0600 writes, the dev token's migration, a constant-time
check over every hash, strict parsing, and reloads that keep the last good table."""

import json
import os
import stat

import pytest
from twisted.logger import capturedLogs

from relay.node import relay_admin, state as relay_state, tokens
from relay.node.limits import SessionLimits
from relay.node.state import hash_token
from relay.node.tokens import TokenLimits, TokenRecord, TokenStore, TokensFileError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _record(token: str, tenant: str = "acme", token_id: str = "abc123", **limits) -> TokenRecord:
    return TokenRecord(token_id, tenant, tokens.now_text(), hash_token(token), "", TokenLimits(**limits))


def _admin(state_dir, *argv, capsys):
    """relay-admin in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        relay_admin.main(["--state-dir", str(state_dir), *argv])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


# -- the file ----------------------------------------------------------------------


def test_written_atomically_with_mode_0600_and_only_hashes(tmp_path):
    """The file is 0600 from its creation, holds the SHA-256 and never the token, and no temp file stays."""
    path = tmp_path / "tokens.json"
    tokens.write_tokens(path, [_record("clear-token-text")])
    assert _mode(path) == 0o600
    text = path.read_text()
    assert "clear-token-text" not in text and hash_token("clear-token-text").hex() in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.json"]
    assert tokens.read_tokens(path)[0].digest == hash_token("clear-token-text")


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """A crash between the temporary file and the rename leaves the previous file, and no temp file."""
    path = tmp_path / "tokens.json"
    tokens.write_tokens(path, [_record("one")])
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        tokens.write_tokens(path, [_record("one"), _record("two", token_id="def456")])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.json"]


def test_the_development_token_is_migrated_into_the_dev_tenant(tmp_path):
    """First start: the agent-tokens hash becomes the dev tenant's token with no limits; client.env's token is accepted."""
    state = relay_state.load_or_create(tmp_path, agent_address="localhost:17000")
    path = tokens.ensure_tokens_file(state.state_dir, state.token_hashes, replace_dev=state.new_token is not None)
    store = TokenStore(path)
    grant = store.check_token(state.new_token)
    assert grant is not None and grant.tenant == "dev" and grant.limits is None and grant.names is None
    assert [r.tenant for r in store.records] == ["dev"]
    assert _mode(path) == 0o600
    # A second start keeps the file as it is (a dev token revoked stays revoked).
    again = relay_state.load_or_create(tmp_path, agent_address="localhost:17000")
    before = path.read_bytes()
    tokens.ensure_tokens_file(again.state_dir, again.token_hashes, replace_dev=again.new_token is not None)
    assert path.read_bytes() == before


def test_rotate_token_replaces_only_the_dev_tenants_tokens(tmp_path, capsys):
    """--rotate-token: the old dev token stops working, the new one works, other tenants keep theirs."""
    first = relay_state.load_or_create(tmp_path, agent_address="localhost:17000")
    path = tokens.ensure_tokens_file(first.state_dir, first.token_hashes, replace_dev=True)
    code, acme_token, _ = _admin(tmp_path, "token", "add", "--tenant", "acme", capsys=capsys)
    assert code == 0
    rotated = relay_state.load_or_create(tmp_path, agent_address="localhost:17000", rotate_token=True)
    tokens.ensure_tokens_file(rotated.state_dir, rotated.token_hashes, replace_dev=True)
    store = TokenStore(path)
    assert store.check_token(first.new_token) is None
    assert store.check_token(rotated.new_token).tenant == "dev"
    assert store.check_token(acme_token.strip()).tenant == "acme"


def test_check_token_compares_with_every_hash_whichever_matches(tmp_path, monkeypatch):
    """The check runs compare_digest once per stored hash, for the first token, the last and a wrong one."""
    path = tmp_path / "tokens.json"
    records = [_record(f"token-{i}", token_id=f"id{i}") for i in range(5)]
    tokens.write_tokens(path, records)
    store = TokenStore(path)
    calls = []
    real = tokens.hmac.compare_digest
    monkeypatch.setattr(tokens.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for presented, token_id in (("token-0", "id0"), ("token-4", "id4"), ("wrong", None)):
        calls.clear()
        grant = store.check_token(presented)
        assert (grant.token_id if grant else None) == token_id
        assert len(calls) == 5
    assert store.check_token("") is None and store.check_token(None) is None
    assert store.check_token("\udc80") is None  # a lone surrogate hashes, never raises


def _document(**entry) -> bytes:
    base = {"id": "abc", "tenant": "acme", "label": "", "created": "2025-01-01T00:00:00Z", "sha256": "0" * 64}
    base.update(entry)
    return json.dumps({"version": 1, "tokens": [{k: v for k, v in base.items() if v is not ...}]}).encode()


@pytest.mark.parametrize(
    "data, says",
    [
        (b"{not json", "not UTF-8 JSON"),
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b'{"version": 2, "tokens": []}', "version 2"),
        (b'{"tokens": []}', "exactly"),
        (b'{"version": 1, "tokens": {}}', "must be a list"),
        (_document(tenant="Acme-1"), "tenant"),
        (_document(id="ID!"), "id must be"),
        (_document(sha256="pasted-clear-token-here"), "sha256 must be"),
        (_document(limits={"max_tunnels": 0}), "max_tunnels"),
        (_document(limits={"max_tunnels": True}), "max_tunnels"),
        (_document(limits={"bandwidth": 10}), "bandwidth"),
        (_document(limits={"ports": [5, 1]}), "ports"),
        (_document(limits={"names": ["Web"]}), "a name is"),
        (_document(limits={"speed": 1}), "unknown limits speed"),
        (_document(extra=1), "unknown keys extra"),
        (b'{"version": 1, "tokens": [{"id": "a", "tenant": "b", "created": "x", "sha256": "' + b"0" * 64
         + b'"}, {"id": "a", "tenant": "b", "created": "x", "sha256": "' + b"1" * 64 + b'"}]}', "appears twice"),
        (b'{"version": 1, "tokens": [1e400]}', "not an object"),
        (b'{"version": NaN, "tokens": []}', "not UTF-8 JSON"),
    ],
)
def test_a_bad_file_is_one_clear_error_naming_the_file(tmp_path, data, says):
    """Each kind of bad content is a TokensFileError naming the file and what is wrong, never quoting a hash."""
    with pytest.raises(TokensFileError) as error:
        tokens.parse_tokens(data, "tokens.json")
    assert says in str(error.value) and "tokens.json" in str(error.value)
    assert "pasted-clear-token-here" not in str(error.value)


def test_limits_become_session_limits_over_the_nodes_defaults():
    """A token's limits replace only what they set; the rest are the node's."""
    defaults = SessionLimits(max_tunnels=7)
    assert TokenLimits().session_limits(defaults) is None
    assert TokenLimits(names=frozenset({"web"})).session_limits(defaults) is None
    limits = TokenLimits(max_tunnels=3, bandwidth=10_000, ports=(30000, 30009), max_new_streams_per_second=5).session_limits(defaults)
    assert (limits.max_tunnels, limits.token_max_tunnels) == (7, 3)
    assert (limits.bandwidth_bytes_per_second, limits.port_range) == (10_000, (30000, 30009))
    assert (limits.new_streams_per_second, limits.new_streams_burst) == (5.0, 5)


# -- reload --------------------------------------------------------------------------


def test_reload_applies_a_good_file_and_keeps_the_last_good_one_on_a_bad_one(tmp_path):
    """A changed file is loaded (listeners hear it); a corrupt one logs one line and the old table stays."""
    path = tmp_path / "tokens.json"
    tokens.write_tokens(path, [_record("tok-a", max_tunnels=1)])
    store = TokenStore(path)
    heard = []
    store.on_reload.append(lambda table: heard.append(getattr(table.grant_of("abc123"), "limits", None)))
    tokens.write_tokens(path, [_record("tok-a", max_tunnels=2)])
    store.reload_if_changed()
    assert [limits.token_max_tunnels for limits in heard] == [2]
    path.write_bytes(b'{"version": 1, "tokens": [')  # an editor's half-saved file
    with capturedLogs() as events:
        store.reload_if_changed()
        store.reload_if_changed()  # the same bad file: no second line
        store.reload_if_changed()
    lines = [e for e in events if "tokens file refused" in e["log_format"]]
    assert len(lines) == 1 and "tokens.json" in lines[0]["error"]
    assert len(heard) == 1
    assert store.check_token("tok-a").limits.token_max_tunnels == 2
    path.unlink()
    with capturedLogs() as events:
        store.reload_if_changed()
        store.reload_if_changed()
    assert len([e for e in events if "tokens file refused" in e["log_format"]]) == 1
    assert store.check_token("tok-a") is not None
    tokens.write_tokens(path, [])
    store.reload_if_changed()
    assert store.check_token("tok-a") is None and heard[-1] is None  # revoked by the new file


# -- relay-admin ------------------------------------------------------------------------


def test_relay_admin_prints_a_new_token_once_and_never_a_stored_one(tmp_path, capsys):
    """add prints the token (stdout) once; list, change and revoke never print it or its hash."""
    code, out, err = _admin(
        tmp_path, "token", "add", "--tenant", "acme", "--max-tunnels", "10", "--bandwidth", "10MB",
        "--ports", "30000-30099", "--names", "web,api", "--label", "ci", capsys=capsys,
    )
    token = out.strip()
    assert code == 0 and len(token) >= 43 and "\n" not in token and "shown only now" in err
    [record] = tokens.read_tokens(tmp_path / "tokens.json")
    assert record.digest == hash_token(token)
    assert record.limits == TokenLimits(max_tunnels=10, bandwidth=10_000_000, ports=(30000, 30099), names=frozenset({"web", "api"}))
    digest = record.digest.hex()
    outputs = []
    for argv in (("token", "list"), ("token", "list", "--json"), ("token", "change", record.token_id, "--max-tunnels", "20", "--bandwidth", "default"),
                 ("token", "change", record.token_id, "--label", "x", "--json")):
        code, out, err = _admin(tmp_path, *argv, capsys=capsys)
        assert code == 0, err
        outputs.append(out + err)
    [listed] = json.loads(outputs[1])
    assert listed["tenant"] == "acme" and listed["id"] == record.token_id and listed["limits"]["max_tunnels"] == 10
    [changed] = tokens.read_tokens(tmp_path / "tokens.json")
    assert changed.limits.max_tunnels == 20 and changed.limits.bandwidth is None and changed.label == "x"
    code, out, err = _admin(tmp_path, "token", "revoke", record.token_id, capsys=capsys)
    outputs.append(out + err)
    assert code == 0 and tokens.read_tokens(tmp_path / "tokens.json") == ()
    for text in outputs:
        assert token not in text and digest not in text
    assert _mode(tmp_path / "tokens.json") == 0o600


def test_relay_admin_add_json_and_revoke_a_whole_tenant(tmp_path, capsys):
    """--json gives one object with the token; revoke --tenant removes all of its tokens and no other."""
    for tenant in ("acme", "acme", "beta"):
        code, out, _ = _admin(tmp_path, "token", "add", "--tenant", tenant, "--json", capsys=capsys)
        assert code == 0 and json.loads(out)["tenant"] == tenant and json.loads(out)["token"]
    code, out, _ = _admin(tmp_path, "token", "revoke", "--tenant", "acme", capsys=capsys)
    assert code == 0 and out.count("revoked") == 2
    assert [r.tenant for r in tokens.read_tokens(tmp_path / "tokens.json")] == ["beta"]


@pytest.mark.parametrize(
    "argv, code, says",
    [
        (("token", "add", "--tenant", "Bad-Name"), 2, "tenant"),
        (("token", "add", "--tenant", "a", "--max-tunnels", "ten"), 2, "whole number"),
        (("token", "add", "--tenant", "a", "--max-tunnels", "0"), 2, "max_tunnels"),
        (("token", "add", "--tenant", "a", "--bandwidth", "fast"), 2, "bytes per second"),
        (("token", "add", "--tenant", "a", "--ports", "30000"), 2, "LO-HI"),
        (("token", "add", "--tenant", "a", "--names", "Web"), 2, "a name is"),
        (("token", "add", "--tenant", "a", "--names", "a--b"), 2, "a name is"),
        (("token", "add", "--tenant", "a", "--names", ",,"), 2, "--names"),
        (("token", "change", "nosuchid", "--max-tunnels", "1"), 3, "no token"),
        (("token", "revoke", "--tenant", "nobody"), 3, "no tokens of tenant"),
    ],
)
def test_relay_admin_bad_input_is_a_clear_error_and_exit_code(tmp_path, capsys, argv, code, says):
    """Bad values exit 2, unknown ids or tenants 3, with one error line and the file unchanged."""
    _admin(tmp_path, "token", "add", "--tenant", "keep", capsys=capsys)
    before = (tmp_path / "tokens.json").read_bytes()
    got, out, err = _admin(tmp_path, *argv, capsys=capsys)
    assert got == code and says in err and err.startswith("relay-admin: error:") and "Traceback" not in err
    assert (tmp_path / "tokens.json").read_bytes() == before


def test_relay_admin_refuses_a_corrupt_file_and_a_missing_folder(tmp_path, capsys):
    """A corrupt tokens file is exit 1 and left as it is; so is a state folder that does not exist."""
    (tmp_path / "tokens.json").write_bytes(b"garbage")
    code, _, err = _admin(tmp_path, "token", "add", "--tenant", "a", capsys=capsys)
    assert code == 1 and "not UTF-8 JSON" in err
    assert (tmp_path / "tokens.json").read_bytes() == b"garbage"
    code, _, err = _admin(tmp_path / "nope", "token", "list", capsys=capsys)
    assert code == 1 and "not a relay state folder" in err


def test_relay_admin_on_a_folder_of_an_earlier_release_keeps_the_dev_token(tmp_path, capsys):
    """A first relay-admin command on a folder with agent-tokens only migrates the dev token first."""
    state = relay_state.load_or_create(tmp_path, agent_address="localhost:17000")
    (tmp_path / "tokens.json").unlink(missing_ok=True)
    _admin(tmp_path, "token", "add", "--tenant", "acme", capsys=capsys)
    store = TokenStore(tokens.ensure_tokens_file(tmp_path, state.token_hashes, replace_dev=False))
    assert store.check_token(state.new_token).tenant == "dev"


def test_a_token_may_allow_every_name_an_agent_may_ask_for(tmp_path, capsys):
    """--names takes the grammar of `tunnel-client --name`: hyphens inside, up to 32 characters."""
    long_name = "a" * 32
    code, _, err = _admin(tmp_path, "token", "add", "--tenant", "acme", "--names", f"my-app,{long_name}", capsys=capsys)
    assert code == 0, err
    [record] = tokens.read_tokens(tmp_path / "tokens.json")
    assert record.limits.names == frozenset({"my-app", long_name})
