"""The model registry against moto's standalone server, over HTTP with boto3 (the production code path)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import boto3
import pytest

from promptpipe.localproc import free_port
from promptpipe.registry import errors
from promptpipe.registry.manifest import MARKER, FileEntry, scan
from promptpipe.registry.refs import ModelRef, RefError, next_version, parse_ref
from promptpipe.registry.settings import RegistrySettings
from promptpipe.registry.store import Registry
from tests.support.faults import FaultyProxy, Mode
from tests.support.moto import make_model, moto_server, registry_env

MiB = 1 << 20


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def s3(settings: RegistrySettings):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name="us-east-1")


# -- references and manifests (pure) ------------------------------------------------------------


def test_references_parse_and_refuse_bad_names() -> None:
    assert parse_ref("smollm2") == ModelRef("smollm2")
    assert parse_ref("smollm2:v3") == ModelRef("smollm2", version="v3")
    assert parse_ref("smollm2@prod") == ModelRef("smollm2", alias="prod")
    for bad in ("Big Model", "m:", "m@", "m@Prod", "../m", "m:v1/../../x"):
        with pytest.raises(RefError, match="invalid"):
            parse_ref(bad)
    assert next_version([]) == "v1"
    assert next_version(["v1", "v9", "v10", "rc-1"]) == "v11"


def test_manifest_paths_can_never_leave_the_model_folder() -> None:
    for bad in ("/etc/passwd", "../x", "a/../../x", "a\\b", "", "./a"):
        with pytest.raises(ValueError, match="unsafe file path"):
            FileEntry(path=bad, size=1, sha256="0" * 64)


def test_the_digest_depends_on_content_only(tmp_path: Path) -> None:
    a = scan(make_model(tmp_path / "a", "x"))
    b = scan(make_model(tmp_path / "b", "x"))
    c = scan(make_model(tmp_path / "c", "y"))
    assert a.digest == b.digest != c.digest
    assert [f.path for f in a.files] == [
        "config.json",
        "model.safetensors",
        "tokenizer/special_tokens.json",
        "tokenizer/tokenizer.json",
    ]


# -- setup and errors ---------------------------------------------------------------------------


def test_nothing_works_before_init_and_the_error_says_so(registry_settings: RegistrySettings, tmp_path: Path) -> None:
    reg = Registry(registry_settings)
    with pytest.raises(errors.NotInitialized, match=f"bucket '{registry_settings.bucket}'.*promptpipe registry init"):
        reg.push("m", make_model(tmp_path / "m"))
    with pytest.raises(errors.NotInitialized, match=f"table '{registry_settings.table}'.*registry init"):
        reg.models()
    s3(registry_settings).create_bucket(Bucket=registry_settings.bucket)  # the bucket alone is not enough
    with pytest.raises(errors.NotInitialized, match="table"):
        reg.push("m", tmp_path / "m")
    assert "bucket" not in " ".join(reg.init()) and reg.init() == []  # init finishes the job, then is a no-op


def test_missing_models_versions_and_aliases_are_named(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound, match="no version 'v1'"):
        registry.resolve(ModelRef("nope", version="v1"))
    with pytest.raises(errors.NotFound, match="has no versions"):
        registry.resolve(ModelRef("nope"))
    registry.push("m", make_model(tmp_path / "m"))
    with pytest.raises(errors.NotFound, match="no alias 'prod'"):
        registry.resolve(ModelRef("m", alias="prod"))
    with pytest.raises(errors.NotFound, match="no version 'v7'"):
        registry.promote("m", "v7", "prod")
    assert registry.aliases("m") == {}


@pytest.mark.moto
def test_refused_credentials_are_an_auth_error(aws_env: dict[str, str], tmp_path: Path) -> None:
    with moto_server(require_auth=True) as url:
        reg = Registry(RegistrySettings(bucket="b", table="t", endpoint_url=url, region="us-east-1"))
        with pytest.raises(errors.AuthError, match=r"credentials were refused for bucket 'b' \(HTTP 403"):
            reg.push("m", make_model(tmp_path / "m"))
        with pytest.raises(
            errors.AuthError, match=r"credentials were refused .(UnrecognizedClientException|InvalidClientTokenId): "
        ):
            reg.models()


def test_missing_credentials_are_an_auth_error(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    reg = Registry(RegistrySettings(bucket="b", table="t", endpoint_url=moto_endpoint, region="us-east-1"))
    with pytest.raises(errors.AuthError, match="no AWS credentials found"):
        reg.models()


def test_network_faults_are_registry_errors_that_name_the_fault(registry: Registry) -> None:
    url = urllib.parse.urlsplit(str(registry.settings.endpoint_url))
    with FaultyProxy(str(url.hostname), int(url.port or 80)) as proxy:
        through = registry.settings.model_copy(
            update={"endpoint_url": f"http://{proxy.address}", "read_timeout_seconds": 1, "max_attempts": 1}
        )
        reg = Registry(through)
        assert reg.models() == []  # through the proxy, as it is
        proxy.mode = Mode.STALL
        with pytest.raises(errors.Unreachable, match=rf"no answer in time from http://{proxy.address}"):
            reg.models()
        proxy.mode = Mode.PASS
        closed = Registry(through.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port()}"}))
        with pytest.raises(errors.Unreachable, match="cannot reach"):
            closed.models()


# -- push and pull ------------------------------------------------------------------------------


def test_push_then_pull_round_trips_every_byte_with_multipart(registry: Registry, tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", big_mib=12)  # 12 MiB: three 5 MiB parts
    pushed = registry.push("smollm2", src, "v1")
    assert pushed.created and pushed.record.version == "v1"
    assert pushed.uploaded_bytes == pushed.record.manifest.size > 12 * MiB
    key = f"blobs/sha256/{hashlib.sha256((src / 'model.safetensors').read_bytes()).hexdigest()}"
    head = s3(registry.settings).head_object(Bucket=registry.settings.bucket, Key=key, PartNumber=1)
    assert head["PartsCount"] == 3  # really uploaded in parts

    record, downloaded = registry.pull(ModelRef("smollm2", version="v1"), tmp_path / "out" / "model")
    assert downloaded and record.digest == pushed.record.digest
    pulled = tree(tmp_path / "out" / "model")
    assert json.loads(pulled.pop(MARKER))["digest"] == record.digest
    assert pulled == tree(src)
    assert os.listdir(tmp_path / "out") == ["model"]  # no partial folder left

    # A restarted init container finds the folder: verified, not downloaded again.
    assert registry.pull(ModelRef("smollm2", alias=None), tmp_path / "out" / "model")[1] is False


def test_a_retried_push_uploads_nothing_and_a_changed_one_is_refused(registry: Registry, tmp_path: Path) -> None:
    first = registry.push("m", make_model(tmp_path / "a", "a"), "v1")
    again = registry.push("m", make_model(tmp_path / "a2", "a"), "v1")
    assert not again.created and again.uploaded_bytes == 0 and again.skipped_bytes == first.uploaded_bytes
    unversioned = registry.push("m", tmp_path / "a2")
    assert not unversioned.created and unversioned.record.version == "v1", "same content: no new version"
    with pytest.raises(errors.VersionExists, match="m:v1 is already published with other content"):
        registry.push("m", make_model(tmp_path / "b", "b"), "v1")
    assert registry.resolve(ModelRef("m", version="v1")).digest == first.record.digest
    # The refused push left its blobs (unreferenced); publishing that folder now uploads nothing more.
    second = registry.push("m", tmp_path / "b")
    assert second.record.version == "v2" and second.uploaded_bytes == 0
    # A new version shares the unchanged file: only what differs is uploaded.
    third = registry.push("m", make_model(tmp_path / "c", "c"))
    shared = len((tmp_path / "a" / "tokenizer" / "special_tokens.json").read_bytes())
    assert third.record.version == "v3" and third.skipped_bytes == shared
    assert third.uploaded_bytes == third.record.manifest.size - shared


def test_concurrent_pushes_of_one_version_publish_exactly_one(registry: Registry, tmp_path: Path) -> None:
    folders = [make_model(tmp_path / f"f{i}", f"seed{i}") for i in range(4)]
    for round_ in range(3):
        version = f"r{round_}"
        outcomes: list[object] = [None] * len(folders)
        barrier = threading.Barrier(len(folders))

        def push(i: int) -> None:
            reg = Registry(registry.settings)  # its own clients, as a second machine would have
            barrier.wait()
            try:
                outcomes[i] = reg.push("race", folders[i], version).record.digest
            except errors.VersionExists as e:
                outcomes[i] = e

        threads = [threading.Thread(target=push, args=(i,)) for i in range(len(folders))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes if isinstance(o, str)]
        assert len(winners) == 1, outcomes
        assert all(isinstance(o, errors.VersionExists) for o in outcomes if o not in winners)
        assert registry.resolve(ModelRef("race", version=version)).digest == winners[0]


def test_concurrent_pushes_without_a_version_each_get_their_own(registry: Registry, tmp_path: Path) -> None:
    folders = [make_model(tmp_path / f"f{i}", f"s{i}") for i in range(3)]
    results: list[str] = []
    barrier = threading.Barrier(len(folders))

    def push(folder: Path) -> None:
        reg = Registry(registry.settings)
        barrier.wait()
        results.append(reg.push("auto", folder).record.version)

    threads = [threading.Thread(target=push, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["v1", "v2", "v3"]
    assert sorted(r.version for r in registry.versions("auto")) == ["v1", "v2", "v3"]


def test_a_corrupted_artifact_fails_the_pull_and_leaves_nothing(registry: Registry, tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    registry.push("m", src, "v1")
    sha = hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
    client = s3(registry.settings)
    client.put_object(Bucket=registry.settings.bucket, Key=f"blobs/sha256/{sha}", Body=b'{"tampered": true}')
    dest = tmp_path / "out" / "model"
    with pytest.raises(errors.IntegrityError, match=f"config.json: .*expected sha256 {sha}"):
        registry.pull(ModelRef("m", version="v1"), dest)
    assert not dest.exists() and os.listdir(tmp_path / "out") == []

    client.delete_object(Bucket=registry.settings.bucket, Key=f"blobs/sha256/{sha}")
    with pytest.raises(errors.IntegrityError, match=f"config.json: its artifact sha256:{sha} is missing"):
        registry.pull(ModelRef("m", version="v1"), dest)
    assert os.listdir(tmp_path / "out") == []


def test_a_tampered_local_copy_is_not_trusted(registry: Registry, tmp_path: Path) -> None:
    registry.push("m", make_model(tmp_path / "src"), "v1")
    dest = tmp_path / "model"
    registry.pull(ModelRef("m", version="v1"), dest)
    (dest / "config.json").write_text("{}")
    with pytest.raises(errors.IntegrityError, match=r"config\.json does not match"):
        registry.pull(ModelRef("m", version="v1"), dest)
    registry.push("m", make_model(tmp_path / "src2", "b"), "v2")
    with pytest.raises(errors.RegistryError, match="holds m:v1, not m:v2"):
        registry.pull(ModelRef("m", version="v2"), dest)


# -- aliases and history ------------------------------------------------------------------------


def test_promotion_moves_an_alias_and_history_records_everything(registry: Registry, tmp_path: Path) -> None:
    registry.push("m", make_model(tmp_path / "a", "a"))
    registry.push("m", make_model(tmp_path / "b", "b"))
    assert registry.promote("m", "v1", "prod") == ""
    assert registry.promote("m", "v2", "prod") == "v1"
    registry.promote("m", "v1", "canary")
    assert registry.resolve(parse_ref("m@prod")).version == "v2"
    assert registry.resolve(parse_ref("m")).version == "v2"  # bare: the newest
    # What the operator polls: the same answers, without reading manifests.
    assert [registry.version_of(parse_ref(r)) for r in ("m@prod", "m", "m:v1")] == ["v2", "v2", "v1"]
    for missing in ("m@beta", "m:v9", "nope"):
        with pytest.raises(errors.NotFound):
            registry.version_of(parse_ref(missing))
    assert {r.version: r.aliases for r in registry.versions("m")} == {"v1": ("canary",), "v2": ("prod",)}
    events = [(e.action, e.version, e.alias, e.previous) for e in registry.history("m")]
    assert events == [
        ("push", "v1", "", ""),
        ("push", "v2", "", ""),
        ("promote", "v1", "prod", ""),
        ("promote", "v2", "prod", "v1"),
        ("promote", "v1", "canary", ""),
    ]
    assert registry.rollback_alias("m", "prod") == ("v2", "v1")
    assert registry.resolve(parse_ref("m@prod")).version == "v1"
    with pytest.raises(errors.NotFound, match="no model 'other'"):
        registry.history("other")
    assert [m.as_json() for m in registry.models()] == [
        {"name": "m", "versions": ["v1", "v2"], "aliases": {"canary": "v1", "prod": "v1"}}
    ]


# -- the command --------------------------------------------------------------------------------


def promptpipe(settings: RegistrySettings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "promptpipe.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **registry_env(settings)},
        timeout=120,
        check=False,
    )


def test_the_command_line_end_to_end(registry_settings: RegistrySettings, tmp_path: Path) -> None:
    init = promptpipe(registry_settings, "registry", "init", "-o", "json")
    assert init.returncode == 0, init.stderr
    assert json.loads(init.stdout)["created"] == [
        f"bucket {registry_settings.bucket}",
        f"table {registry_settings.table}",
    ]
    pushed = promptpipe(registry_settings, "model", "push", "smollm2", str(make_model(tmp_path / "m")), "-o", "json")
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["version"] == "v1" and json.loads(pushed.stdout)["created"] is True
    assert promptpipe(registry_settings, "model", "promote", "smollm2", "v1", "prod").returncode == 0
    listed = promptpipe(registry_settings, "model", "list", "-o", "json")
    assert json.loads(listed.stdout) == [{"name": "smollm2", "versions": ["v1"], "aliases": {"prod": "v1"}}]
    shown = promptpipe(registry_settings, "model", "show", "smollm2@prod")
    assert shown.returncode == 0 and "smollm2:v1" in shown.stdout and "model.safetensors" in shown.stdout
    pulled = promptpipe(registry_settings, "model", "pull", "smollm2@prod", str(tmp_path / "out"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "out" / "config.json").read_bytes() == (tmp_path / "m" / "config.json").read_bytes()
    history = json.loads(promptpipe(registry_settings, "model", "history", "smollm2", "-o", "json").stdout)
    assert [e["action"] for e in history] == ["push", "promote"]

    missing = promptpipe(registry_settings, "model", "show", "smollm2:v9")
    assert missing.returncode == 3 and "model smollm2 has no version 'v9'" in missing.stderr
    bad = promptpipe(registry_settings, "model", "show", "Bad Name")
    assert bad.returncode == 2 and "invalid model name 'Bad Name'" in bad.stderr
    immutable = promptpipe(registry_settings, "model", "push", "smollm2:v1", str(make_model(tmp_path / "n", "n")))
    assert immutable.returncode == 1 and "immutable" in immutable.stderr
    # A registry that cannot be reached is not a bad model: its own exit status, which a pod's download
    # retries on (the rollout does not take it for a model that fails).
    closed = registry_settings.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port()}"})
    away = promptpipe(closed, "model", "pull", "smollm2@prod", str(tmp_path / "again"))
    assert away.returncode == errors.UNREACHABLE_EXIT == 75 and "cannot reach" in away.stderr, away.stderr
    assert not (tmp_path / "again").exists()


def test_concurrent_promotions_and_rollbacks_keep_the_alias_and_its_history_one_story(
    registry: Registry, tmp_path: Path
) -> None:
    for i in range(1, 7):
        registry.push("m", make_model(tmp_path / f"s{i}", f"s{i}"), f"v{i}")
    registry.promote("m", "v1", "prod")
    start = threading.Barrier(8)
    conflicts: list[str] = []

    def promote(version: str) -> None:
        start.wait()
        registry.promote("m", version, "prod")

    def roll_back() -> None:
        start.wait()
        try:
            registry.rollback_alias("m", "prod")
        except errors.Conflict as e:  # the alias moved between reading the history and writing: refused
            conflicts.append(str(e))
        except errors.RegistryError as e:  # it ran first: nothing before v1 to go back to
            conflicts.append(str(e))

    workers = [threading.Thread(target=promote, args=(f"v{i}",)) for i in range(2, 7)]
    workers += [threading.Thread(target=roll_back) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)

    history = registry.history("m")
    moves = [e for e in history if e.alias == "prod"]
    assert len(moves) == 1 + 5 + 3 - len(conflicts)
    # One story: every move starts where the one before it left the alias, in revision order.
    for before, after in itertools.pairwise(moves):
        assert after.previous == before.version, [(e.revision, e.version, e.previous) for e in moves]
    assert [e.revision for e in history] == sorted({e.revision for e in history}), "unique, in order"
    assert registry.version_of(parse_ref("m@prod")) == moves[-1].version
    assert all("moved meanwhile" in c or "no earlier version" in c for c in conflicts), conflicts


def test_a_version_whose_file_list_was_altered_is_refused_on_pull(
    registry: Registry, registry_settings: RegistrySettings, tmp_path: Path
) -> None:
    record = registry.push("m", make_model(tmp_path / "model"), "v1").record
    with pytest.raises(errors.IntegrityError, match=r"is sha256:.* in the registry, not sha256:0+ as resolved"):
        registry.pull(parse_ref("m:v1"), tmp_path / "pinned", digest="sha256:" + "0" * 64)
    # Someone with write access to the table drops a file from the list, keeping the digest.
    altered = record.manifest.model_copy(update={"files": record.manifest.files[1:]})
    table = boto3.client("dynamodb", endpoint_url=registry_settings.endpoint_url, region_name=registry_settings.region)
    table.update_item(
        TableName=registry_settings.table,
        Key={"pk": {"S": "model#m"}, "sk": {"S": "version#v1"}},
        UpdateExpression="SET manifest = :m",
        ExpressionAttributeValues={":m": {"S": altered.model_dump_json()}},
    )
    with pytest.raises(errors.IntegrityError, match="its file list is not the one its digest"):
        registry.pull(parse_ref("m:v1"), tmp_path / "altered")
    assert not (tmp_path / "altered").exists()
