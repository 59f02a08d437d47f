"""API keys: the key file's format, and the key ring the gateway checks calls against (pure)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from promptpipe.contract.apikeys import KeyFileError, hash_key, new_key, parse_keys
from promptpipe.gateway import openai_api as api
from promptpipe.gateway.grpc_api import with_tenant
from promptpipe.runtime.apikeys import ANONYMOUS, KeyRing
from promptpipe.runtime.errors import Unauthenticated
from promptpipe.runtime.watched_file import RELOAD_EVERY_SECONDS
from promptpipe.v1 import gateway_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    """As a Secret volume updates: a new file swapped in whole."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)


def test_a_key_file_maps_each_keys_hash_to_its_tenant_and_a_tenant_may_hold_several() -> None:
    a, b1, b2 = new_key(), new_key(), new_key()
    text = f"team-a: {hash_key(a)}\nteam-b: [{hash_key(b1)}, {hash_key(b2)}]\n"
    assert parse_keys(text, "keys.yaml") == {hash_key(a): "team-a", hash_key(b1): "team-b", hash_key(b2): "team-b"}
    assert a.startswith("pp-") and len(a) > 40 and new_key() != a
    assert parse_keys("", "keys.yaml") == {}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("team-a: pp-plaintextkey", "keys.yaml: team-a: must be sha256:<64 hex digits> (the key's hash, never the key"),
        (f"team-b: [{hash_key('x')}, nope]", "keys.yaml: team-b[1]: must be sha256:"),
        (f"Team A: {hash_key('x')}", "keys.yaml: 'Team A': a tenant is 1-63 lowercase"),
        (f"a: {hash_key('x')}\nb: {hash_key('x')}", "keys.yaml: b: the same key is also a's"),
        ("- just a list", "keys.yaml: must map each tenant"),
        ("a: [unclosed", "keys.yaml: not YAML"),
    ],
)
def test_a_malformed_key_file_is_refused_naming_the_entry(text: str, words: str) -> None:
    with pytest.raises(KeyFileError) as err:
        parse_keys(text, "keys.yaml")
    assert words in str(err.value)


def test_with_no_keys_the_gateway_is_open_and_says_so() -> None:
    ring = KeyRing()
    assert ring.open and ring.tenant_of(None) == ANONYMOUS
    assert "open to anyone" in ring.describe()


def test_a_call_needs_a_bearer_key_the_file_lists_and_gets_its_tenant(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "keys.yaml"
    write(path, f"team-a: {hash_key(key)}\n")
    ring = KeyRing(path)
    assert not ring.open and "1 keys of 1 tenants" in ring.describe()
    assert ring.tenant_of(f"Bearer {key}") == "team-a"
    assert ring.tenant_of(f"bearer  {key} ") == "team-a"
    for header, words in [
        (None, "an API key is required: send 'Authorization: Bearer <key>'"),
        (f"Basic {key}", "must be 'Bearer <key>'"),
        ("Bearer ", "must be 'Bearer <key>'"),
        (f"Bearer {key}x", "the API key is not valid"),
    ]:
        with pytest.raises(Unauthenticated, match=words):
            ring.tenant_of(header)
    inline = KeyRing(inline=f"team-b: {hash_key(key)}")
    assert inline.tenant_of(f"Bearer {key}") == "team-b"


def test_a_rewritten_key_file_rotates_the_keys_within_a_second_and_a_bad_edit_keeps_the_old_ones(
    tmp_path: Path,
) -> None:
    old, new = new_key(), new_key()
    path = tmp_path / "keys.yaml"
    write(path, f"team-a: {hash_key(old)}\n")
    clock = Clock()
    ring = KeyRing(path, clock=clock)
    assert ring.tenant_of(f"Bearer {old}") == "team-a"

    write(path, f"team-a: {hash_key(new)}\n")
    assert ring.tenant_of(f"Bearer {old}") == "team-a", "the file is looked at once a second at most"
    clock.now += RELOAD_EVERY_SECONDS
    assert ring.tenant_of(f"Bearer {new}") == "team-a"
    with pytest.raises(Unauthenticated):
        ring.tenant_of(f"Bearer {old}")

    write(path, "team-a: [half-written")
    clock.now += RELOAD_EVERY_SECONDS
    assert ring.tenant_of(f"Bearer {new}") == "team-a"
    path.unlink()
    clock.now += RELOAD_EVERY_SECONDS
    assert ring.tenant_of(f"Bearer {new}") == "team-a"


def test_a_missing_key_file_fails_the_start_not_the_first_call(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        KeyRing(tmp_path / "absent.yaml")


def test_the_tenant_travels_in_the_metadata_the_client_cannot_forge_once_keys_are_on() -> None:
    request = gateway_pb2.GenerateRequest(prompt="hi", metadata={"tenant": "someone-else"})
    with_tenant(request, "team-a")
    assert request.metadata["tenant"] == "team-a"
    open_call = gateway_pb2.GenerateRequest(prompt="hi")
    with_tenant(open_call, ANONYMOUS)
    assert "tenant" not in open_call.metadata
    # An open gateway has no tenants: a client naming one is not believed (nor passed on to the stages).
    forged = gateway_pb2.GenerateRequest(prompt="hi", metadata={"tenant": "team-a", "topic": "x"})
    with_tenant(forged, ANONYMOUS)
    assert dict(forged.metadata) == {"topic": "x"}


def test_a_refused_key_is_openais_401_invalid_api_key() -> None:
    err = api.api_error(Unauthenticated("the API key is not valid"))
    assert (err.status, err.type, err.code, err.message) == (
        401,
        "invalid_request_error",
        "invalid_api_key",
        "the API key is not valid",
    )


def test_keys_new_prints_a_key_and_the_line_that_lets_it_in() -> None:
    from typer.testing import CliRunner

    from promptpipe.cli.main import app

    result = CliRunner().invoke(app, ["keys", "new", "team-a"])
    assert result.exit_code == 0, result.output
    key, line = [ln for ln in result.stdout.splitlines() if ln.strip()][:2]
    assert parse_keys(line, "keys.yaml") == {hash_key(key): "team-a"}
    refused = CliRunner().invoke(app, ["keys", "new", "Team A"])
    assert refused.exit_code == 2 and "a tenant is 1-63 lowercase" in refused.output


def test_keys_new_with_a_key_file_writes_the_key_there_for_its_owner_alone_and_never_overwrites(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from promptpipe.cli.main import app

    path = tmp_path / "me.key"
    result = CliRunner().invoke(app, ["keys", "new", "me", "--key-file", str(path)])
    assert result.exit_code == 0, result.output
    key = path.read_text().strip()
    assert parse_keys(result.stdout, "keys.yaml") == {hash_key(key): "me"}
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = CliRunner().invoke(app, ["keys", "new", "me", "--key-file", str(path)])
    assert again.exit_code == 1 and "never overwritten" in again.output and path.read_text().strip() == key


def test_when_keys_are_required_and_none_are_configured_every_call_is_refused_saying_what_to_set() -> None:
    ring = KeyRing(required=True)
    assert not ring.open and ring.closed
    assert "every call is refused" in ring.describe()
    for authorization in (None, f"Bearer {new_key()}"):
        with pytest.raises(Unauthenticated) as err:
            ring.tenant_of(authorization)
        assert "spec.auth.apiKeysSecret" in err.value.message and "spec.auth.open: true" in err.value.message
