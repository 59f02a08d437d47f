"""The registry's I/O edge: boto3 against S3 and DynamoDB (AWS or any compatible endpoint).

Layout:
- S3 `<prefix>blobs/sha256/<hex>`: each distinct file once, named by its content.
- DynamoDB, one table keyed (pk, sk):
  - `model#NAME` / `version#V`: the version record (digest, files), written once, conditionally;
  - `model#NAME` / `alias#A`: which version an alias points at;
  - `model#NAME` / `event#<time>#<id>`: history (pushes, promotions);
  - `models` / `model#NAME`: the index `list` reads.
A version record is written last, after its blobs are in S3, so a crashed push
leaves at most unreferenced blobs; a retried push uploads only what is missing.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import boto3
import botocore.exceptions
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from promptpipe.contract.timestamps import format_time
from promptpipe.registry import errors
from promptpipe.registry.manifest import MARKER, FileEntry, Manifest, scan, sha256_file
from promptpipe.registry.refs import ModelRef, next_version
from promptpipe.registry.settings import RegistrySettings

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import TransactWriteItemTypeDef
    from mypy_boto3_s3 import S3Client

MiB = 1 << 20
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "AccessDenied",
    "AccessDeniedException",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "403",
    "Forbidden",
}
_ser, _de = TypeSerializer(), TypeDeserializer()


class Progress(Protocol):
    """Told about each phase (hashing, uploading, downloading) and the bytes done."""

    def phase(self, description: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...


class _Silent:
    def phase(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: str
    digest: str
    manifest: Manifest
    created_at: str
    created_by: str
    aliases: tuple[str, ...] = ()

    def as_json(self, files: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "size": self.manifest.size,
            "createdAt": self.created_at,
            "createdBy": self.created_by,
            "aliases": list(self.aliases),
        }
        if files:
            out["files"] = [f.model_dump() for f in self.manifest.files]
        return out


@dataclass(frozen=True)
class PushResult:
    record: VersionRecord
    created: bool  # False: this exact content was already published under that version
    uploaded_bytes: int
    skipped_bytes: int


@dataclass(frozen=True)
class HistoryEntry:
    at: str
    action: str
    version: str
    alias: str = ""
    previous: str = ""
    actor: str = ""
    revision: int = 0  # the model's revision this change made (0: recorded before revisions were)

    def as_json(self) -> dict[str, str | int]:
        return {
            "revision": self.revision,
            "at": self.at,
            "action": self.action,
            "version": self.version,
            "alias": self.alias,
            "previous": self.previous,
            "actor": self.actor,
        }


@dataclass(frozen=True)
class ModelSummary:
    name: str
    versions: tuple[str, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "versions": list(self.versions), "aliases": dict(self.aliases)}


def _now() -> str:
    # History rows sort by this text: microseconds keep two quick pushes in order.
    return format_time(precision="microseconds")


def _actor() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):  # no passwd entry for the uid, as in many containers
        return f"uid {os.getuid()}@{socket.gethostname()}"


def _item(**values: Any) -> dict[str, Any]:
    return {k: _ser.serialize(v) for k, v in values.items()}


def _plain(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _de.deserialize(v) for k, v in item.items()}


class Registry:
    def __init__(self, settings: RegistrySettings | None = None) -> None:
        self.settings = settings or RegistrySettings()
        s = self.settings
        config = Config(
            retries={"mode": "standard", "max_attempts": s.max_attempts},
            connect_timeout=s.connect_timeout_seconds,
            read_timeout=s.read_timeout_seconds,
            s3={"addressing_style": "path"} if (s.s3_endpoint_url or s.endpoint_url) else None,
        )
        session = boto3.session.Session(region_name=s.region)
        self._s3: S3Client = session.client("s3", endpoint_url=s.s3_endpoint_url or s.endpoint_url, config=config)
        self._db: DynamoDBClient = session.client("dynamodb", endpoint_url=s.endpoint_url, config=config)
        self._digests: dict[tuple[str, str], str] = {}
        self._transfer = TransferConfig(
            multipart_threshold=s.multipart_threshold_mb * MiB,
            multipart_chunksize=s.part_size_mb * MiB,
            max_concurrency=s.max_concurrency,
        )

    # -- errors ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        s = self.settings
        try:
            yield
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError) as e:
            raise errors.AuthError(
                f"{what}: no AWS credentials found ({e}); set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role"
            ) from None
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as e:
            # Refused, timed out connecting or reading, or closed mid-answer: the network's faults, retried
            # by botocore already.
            where = e.kwargs.get("endpoint_url", "the registry")
            raise errors.Unreachable(f"{what}: {_network_fault(e)} {where}") from None
        except botocore.exceptions.ClientError as e:
            code, message = _error_of(e)
            if code in ("NoSuchBucket",):
                raise errors.NotInitialized(
                    f"{what}: bucket {s.bucket!r} does not exist; run `promptpipe registry init`"
                ) from None
            if code == "ResourceNotFoundException":
                raise errors.NotInitialized(
                    f"{what}: table {s.table!r} does not exist; run `promptpipe registry init`"
                ) from None
            if code in _AUTH_CODES:
                raise errors.AuthError(f"{what}: the credentials were refused ({code}: {message})") from None
            raise errors.RegistryError(f"{what}: {code}: {message}") from None
        except botocore.exceptions.BotoCoreError as e:  # anything else botocore can raise (a bad answer, ...)
            raise errors.RegistryError(f"{what}: {type(e).__name__}: {e}") from None

    def _check_bucket(self, what: str) -> None:
        with self._errors(what):
            try:
                self._s3.head_bucket(Bucket=self.settings.bucket)
            except botocore.exceptions.ClientError as e:
                # HEAD has no body: the status code is all there is.
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:
                    raise botocore.exceptions.ClientError(
                        {"Error": {"Code": "NoSuchBucket", "Message": ""}}, "HeadBucket"
                    ) from None
                if status == 403:
                    raise errors.AuthError(
                        f"{what}: the credentials were refused for bucket {self.settings.bucket!r} (HTTP 403: "
                        "unknown key, wrong secret, or no s3:ListBucket permission)"
                    ) from None
                raise

    def _blob_key(self, sha256: str) -> str:
        return f"{self.settings.prefix}blobs/sha256/{sha256}"

    # -- setup ----------------------------------------------------------------------------------

    def init(self) -> list[str]:
        """Create the bucket and the table if absent; returns what was created."""
        s, created = self.settings, []
        try:
            self._check_bucket("registry init")  # asked first: us-east-1 answers 200 to re-creating your bucket
        except errors.NotInitialized:
            with self._errors("registry init"):
                region = self._s3.meta.region_name
                if region and region != "us-east-1":
                    self._s3.create_bucket(Bucket=s.bucket, CreateBucketConfiguration={"LocationConstraint": region})  # type: ignore[typeddict-item]
                else:
                    self._s3.create_bucket(Bucket=s.bucket)
            created.append(f"bucket {s.bucket}")
        with self._errors("registry init"):
            try:
                self._db.create_table(
                    TableName=s.table,
                    BillingMode="PAY_PER_REQUEST",
                    AttributeDefinitions=[
                        {"AttributeName": "pk", "AttributeType": "S"},
                        {"AttributeName": "sk", "AttributeType": "S"},
                    ],
                    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
                )
                created.append(f"table {s.table}")
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") != "ResourceInUseException":
                    raise
            self._db.get_waiter("table_exists").wait(TableName=s.table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        return created

    # -- reading --------------------------------------------------------------------------------

    def _query(self, pk: str, sk_prefix: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        values = {":pk": pk, ":sk": sk_prefix} if sk_prefix else {":pk": pk}
        kwargs: dict[str, Any] = {
            "TableName": self.settings.table,
            "ConsistentRead": True,
            "ExpressionAttributeValues": _item(**values),
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :sk)" if sk_prefix else "pk = :pk",
        }
        while True:
            page = self._db.query(**kwargs)
            items += [_plain(i) for i in page.get("Items", [])]
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _get(self, pk: str, sk: str, only: str = "") -> dict[str, Any] | None:
        """The item, or only the attribute `only` of it (an existence check reads no manifest)."""
        extra: dict[str, Any] = {"ProjectionExpression": only} if only else {}
        found = self._db.get_item(TableName=self.settings.table, Key=_item(pk=pk, sk=sk), ConsistentRead=True, **extra)
        return _plain(found["Item"]) if "Item" in found else None

    def aliases(self, name: str) -> dict[str, str]:
        with self._errors(f"aliases of {name}"):
            return {i["alias"]: i["version"] for i in self._query(f"model#{name}", "alias#")}

    def _record(self, item: Mapping[str, Any], aliases: Mapping[str, str]) -> VersionRecord:
        manifest = Manifest.model_validate_json(str(item["manifest"]))
        return VersionRecord(
            name=str(item["name"]),
            version=str(item["version"]),
            digest=str(item["digest"]),
            manifest=manifest,
            created_at=str(item["createdAt"]),
            created_by=str(item["createdBy"]),
            aliases=tuple(sorted(a for a, v in aliases.items() if v == item["version"])),
        )

    def _model(self, name: str) -> tuple[list[VersionRecord], dict[str, str]]:
        """A model's versions (oldest first) and aliases, from one query."""
        with self._errors(f"versions of {name}"):
            items = self._query(f"model#{name}", "")
        aliases = {i["alias"]: i["version"] for i in items if str(i["sk"]).startswith("alias#")}
        records = [self._record(i, aliases) for i in items if str(i["sk"]).startswith("version#")]
        return sorted(records, key=lambda r: r.created_at), aliases

    def versions(self, name: str) -> list[VersionRecord]:
        """Oldest first."""
        return self._model(name)[0]

    def models(self) -> list[ModelSummary]:
        with self._errors("list models"):
            names = [str(i["name"]) for i in self._query("models", "model#")]
        out = []
        for name in names:
            records, aliases = self._model(name)
            out.append(ModelSummary(name, tuple(r.version for r in records), aliases))
        return out

    def _newest(self, name: str) -> VersionRecord:
        records = self.versions(name)
        if not records:
            raise errors.NotFound(f"model {name!r} has no versions")
        return records[-1]

    def version_of(self, ref: ModelRef) -> str:
        """Only the version a reference names, in one read for `:VERSION` or `@ALIAS` (no manifest, no
        aliases): what the operator asks every few seconds of a pipeline following an alias."""
        with self._errors(f"resolve {ref}"):
            if ref.alias:
                alias = self._get(f"model#{ref.name}", f"alias#{ref.alias}")
                if alias is None:
                    raise errors.NotFound(f"model {ref.name} has no alias {ref.alias!r}")
                return str(alias["version"])
            if ref.version:
                if self._get(f"model#{ref.name}", f"version#{ref.version}", only="sk") is None:
                    raise errors.NotFound(f"model {ref.name} has no version {ref.version!r}")
                return ref.version
        return self._newest(ref.name).version

    def digest_of(self, name: str, version: str) -> str:
        """A version's digest, in one read of that attribute alone, then from memory: versions are immutable."""
        if (name, version) not in self._digests:
            with self._errors(f"resolve {name}:{version}"):
                item = self._get(f"model#{name}", f"version#{version}", only="digest")
            if item is None:
                raise errors.NotFound(f"model {name} has no version {version!r}")
            self._digests[(name, version)] = str(item["digest"])
        return self._digests[(name, version)]

    def resolve(self, ref: ModelRef) -> VersionRecord:
        """The version a reference names: `:VERSION`, `@ALIAS`, or bare: the newest."""
        if not ref.alias and not ref.version:
            return self._newest(ref.name)
        version = self.version_of(ref) if ref.alias else ref.version
        with self._errors(f"resolve {ref}"):
            item = self._get(f"model#{ref.name}", f"version#{version}")
            if item is None:
                raise errors.NotFound(f"model {ref.name} has no version {version!r}")
            return self._record(item, self.aliases(ref.name))

    def history(self, name: str) -> list[HistoryEntry]:
        with self._errors(f"history of {name}"):
            items = self._query(f"model#{name}", "event#")
        if not items and not self.versions(name):
            raise errors.NotFound(f"no model {name!r} in the registry")
        return [
            HistoryEntry(
                at=str(i["at"]),
                action=str(i["action"]),
                version=str(i["version"]),
                alias=str(i.get("alias", "")),
                previous=str(i.get("previous", "")),
                actor=str(i.get("actor", "")),
                revision=int(i.get("revision", 0)),
            )
            for i in sorted(items, key=lambda i: (int(i.get("revision", 0)), str(i["at"])))
        ]

    # -- writing --------------------------------------------------------------------------------

    def _revision(self, name: str) -> int:
        """The model's revision: how many changes it has had (pushes, promotions)."""
        item = self._get(f"model#{name}", REVISION_KEY)
        return int(item["revision"]) if item else 0

    def _recorded(self, name: str, revision: int, **values: str) -> list[TransactWriteItemTypeDef]:
        """The writes that record one change of the model, as revision `revision + 1`: the counter moves
        only from `revision` (so of two writers that read it alike, one fails and tries again), and the
        history entry is keyed by the new revision, so history has the order the changes took, not the
        order of the writers' clocks."""
        counter_key = _item(pk=f"model#{name}", sk=REVISION_KEY)
        moved: TransactWriteItemTypeDef = {
            "Update": {
                "TableName": self.settings.table,
                "Key": counter_key,
                "UpdateExpression": "SET revision = :next",
                "ConditionExpression": "attribute_not_exists(pk)" if revision == 0 else "revision = :current",
                "ExpressionAttributeValues": _item(**{":next": revision + 1})
                | ({} if revision == 0 else _item(**{":current": revision})),
            }
        }
        event: TransactWriteItemTypeDef = {
            "Put": {
                "TableName": self.settings.table,
                "Item": _item(
                    pk=f"model#{name}",
                    sk=f"event#{revision + 1:012d}",
                    revision=revision + 1,
                    at=_now(),
                    actor=_actor(),
                    **values,
                ),
            }
        }
        return [moved, event]

    def _upload(self, folder: Path, manifest: Manifest, progress: Progress) -> tuple[int, int]:
        """Upload the blobs S3 does not have yet; returns (uploaded, skipped) bytes."""
        unique = {f.sha256: f for f in manifest.files}
        progress.phase("uploading", sum(f.size for f in unique.values()))
        uploaded = skipped = 0
        with self._errors("upload"):
            for sha, f in unique.items():
                key = self._blob_key(sha)
                try:
                    head = self._s3.head_object(Bucket=self.settings.bucket, Key=key)
                    if head["ContentLength"] == f.size:
                        skipped += f.size
                        progress.advance(f.size)
                        continue
                except botocore.exceptions.ClientError as e:
                    if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                        raise
                try:
                    self._s3.upload_file(
                        str(folder / f.path),
                        self.settings.bucket,
                        key,
                        Config=self._transfer,
                        Callback=progress.advance,
                        ExtraArgs={"Metadata": {"sha256": sha}},
                    )
                except boto3.exceptions.S3UploadFailedError as e:
                    raise errors.RegistryError(f"upload of {f.path} failed: {e}") from None
                uploaded += f.size
        return uploaded, skipped

    def push(self, name: str, folder: Path, version: str | None = None, progress: Progress | None = None) -> PushResult:
        """Publish `folder` as NAME:VERSION, or without a version as the next `vN` (the existing version if
        this exact content is one already). Safe to retry; never overwrites."""
        progress = progress or _Silent()
        self._check_bucket(f"push {name}")
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        progress.phase("hashing", sum(p.stat().st_size for p in files))
        manifest = scan(folder, progress.advance)
        uploaded, skipped = self._upload(folder, manifest, progress)
        while True:
            existing_versions = self.versions(name)
            if version is None:  # the same content again is the version it already is, not a new one
                same = [r for r in existing_versions if r.digest == manifest.digest]
                if same:
                    return PushResult(same[-1], created=False, uploaded_bytes=uploaded, skipped_bytes=skipped)
            candidate = version or next_version([r.version for r in existing_versions])
            with self._errors(f"push {name}:{candidate}"):
                revision = self._revision(name)
            created_at = _now()
            record = _item(
                pk=f"model#{name}",
                sk=f"version#{candidate}",
                name=name,
                version=candidate,
                digest=manifest.digest,
                size=manifest.size,
                manifest=manifest.model_dump_json(),
                createdAt=created_at,
                createdBy=_actor(),
            )
            try:
                with self._errors(f"push {name}:{candidate}"):
                    try:
                        self._db.transact_write_items(
                            TransactItems=[
                                {
                                    "Put": {
                                        "TableName": self.settings.table,
                                        "Item": record,
                                        "ConditionExpression": "attribute_not_exists(pk)",
                                    }
                                },
                                {
                                    "Put": {
                                        "TableName": self.settings.table,
                                        "Item": _item(pk="models", sk=f"model#{name}", name=name),
                                    }
                                },
                                *self._recorded(name, revision, action="push", version=candidate),
                            ]
                        )
                    except botocore.exceptions.ClientError as e:
                        if _condition_failed(e.response, 0):
                            raise _Taken() from None
                        if _condition_failed(e.response, 2):  # another change to the model came first
                            continue
                        raise
            except _Taken:
                existing = self.resolve(ModelRef(name, version=candidate))
                if existing.digest == manifest.digest:
                    return PushResult(existing, created=False, uploaded_bytes=uploaded, skipped_bytes=skipped)
                if version:
                    raise errors.VersionExists(
                        f"{name}:{candidate} is already published with other content ({existing.digest}); "
                        "versions are immutable, push under a new version"
                    ) from None
                continue  # another push took vN first; take the next number
            published = VersionRecord(name, candidate, manifest.digest, manifest, created_at, _actor())
            return PushResult(published, created=True, uploaded_bytes=uploaded, skipped_bytes=skipped)

    def promote(self, name: str, version: str, alias: str, expected: str | None = None) -> str:
        """Point `alias` at `version`; returns the version it pointed at before ('' if new).

        With `expected`, only if the alias still points there (errors.Conflict otherwise, and nothing
        changes). Without, whatever it points at when the write lands, and `previous` in the history is
        what it pointed at then: a concurrent move is never lost from the history."""
        while True:
            with self._errors(f"promote {name}:{version}"):
                revision = self._revision(name)
                before = self._get(f"model#{name}", f"alias#{alias}")
                previous = str(before["version"]) if before else ""
                if expected is not None and previous != expected:
                    raise errors.Conflict(
                        f"{name}@{alias} points at {previous or 'nothing'} now, not {expected}: it moved meanwhile; "
                        "nothing changed"
                    )
                alias_put: dict[str, Any] = {
                    "TableName": self.settings.table,
                    "Item": _item(
                        pk=f"model#{name}",
                        sk=f"alias#{alias}",
                        alias=alias,
                        version=version,
                        revision=revision + 1,
                        updatedAt=_now(),
                    ),
                }
                try:
                    self._db.transact_write_items(
                        TransactItems=[
                            {
                                "ConditionCheck": {
                                    "TableName": self.settings.table,
                                    "Key": _item(pk=f"model#{name}", sk=f"version#{version}"),
                                    "ConditionExpression": "attribute_exists(pk)",
                                }
                            },
                            {"Put": alias_put},  # type: ignore[typeddict-item]
                            *self._recorded(
                                name, revision, action="promote", version=version, alias=alias, previous=previous
                            ),
                        ]
                    )
                except botocore.exceptions.ClientError as e:
                    if _condition_failed(e.response, 0):
                        raise errors.NotFound(f"model {name} has no version {version!r}") from None
                    if _condition_failed(e.response, 2):  # another change came first: read again
                        continue
                    raise
            return previous

    def rollback_alias(self, name: str, alias: str) -> tuple[str, str]:
        """Point `alias` back where its last promotion moved it from; returns (from, to). Only if the alias
        is still where that promotion put it: a promotion landing meanwhile makes this a Conflict."""
        promotions = [e for e in self.history(name) if e.action == "promote" and e.alias == alias]
        if not promotions:
            raise errors.NotFound(f"model {name} has no alias {alias!r}")
        last = promotions[-1]
        if not last.previous:
            raise errors.RegistryError(f"{name}@{alias} has no earlier version to go back to")
        self.promote(name, last.previous, alias, expected=last.version)
        return last.version, last.previous

    # -- pulling --------------------------------------------------------------------------------

    def pull(
        self, ref: ModelRef, dest: Path, progress: Progress | None = None, digest: str | None = None
    ) -> tuple[VersionRecord, bool]:
        """Download and verify into `dest`, which appears complete or not at all. With `digest`, only that
        content (the digest the operator resolved, pinned in the pod that pulls).

        Returns the record and whether anything was downloaded (False: `dest` already held it).
        """
        progress = progress or _Silent()
        record = self.resolve(ref)
        if record.manifest.digest != record.digest:
            raise errors.IntegrityError(
                f"{record.name}:{record.version}: its file list is not the one its digest {record.digest} names"
                f" ({record.manifest.digest}): the record was altered"
            )
        if digest is not None and record.digest != digest:
            raise errors.IntegrityError(
                f"{record.name}:{record.version} is {record.digest} in the registry, not {digest} as resolved"
            )
        if dest.exists():
            _verify_existing(dest, record)
            return record, False
        self._check_bucket(f"pull {ref}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            progress.phase("downloading", record.manifest.size)
            for f in record.manifest.files:
                self._download(f, partial / f.path, progress)
            (partial / MARKER).write_text(json.dumps(record.as_json(files=False), indent=2) + "\n")
            os.rename(partial, dest)  # atomic: the folder is whole or absent
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return record, True

    def _download(self, f: FileEntry, target: Path, progress: Progress) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(f"download {f.path}"):
            try:
                self._s3.download_file(
                    self.settings.bucket,
                    self._blob_key(f.sha256),
                    str(target),
                    Config=self._transfer,
                    Callback=progress.advance,
                )
            except botocore.exceptions.ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404 or e.response.get(
                    "Error", {}
                ).get("Code") in ("404", "NoSuchKey"):
                    raise errors.IntegrityError(
                        f"{f.path}: its artifact sha256:{f.sha256} is missing from the bucket"
                    ) from None
                raise
        size = target.stat().st_size
        got = sha256_file(target)
        if got != f.sha256 or size != f.size:
            raise errors.IntegrityError(
                f"{f.path}: downloaded content does not match the registry "
                f"(expected sha256 {f.sha256}, {f.size} bytes; got {got}, {size} bytes)"
            )


def _network_fault(e: botocore.exceptions.BotoCoreError) -> str:
    if isinstance(e, botocore.exceptions.ReadTimeoutError):
        return "no answer in time from"
    if isinstance(e, botocore.exceptions.ConnectTimeoutError):
        return "timed out connecting to"
    if isinstance(e, botocore.exceptions.ConnectionClosedError):
        return "connection closed by"
    return "cannot reach"


def _error_of(e: botocore.exceptions.ClientError) -> tuple[str, str]:
    code = str(e.response.get("Error", {}).get("Code", ""))
    message = str(e.response.get("Error", {}).get("Message", "")) or code
    # Some compatible servers answer a JSON API with an XML error body, which botocore leaves unparsed.
    if inner := re.search(r"<Code>([^<]+)</Code>", message):
        text = re.search(r"<Message>([^<]*)</Message>", message)
        code, message = inner.group(1), text.group(1) if text else inner.group(1)
    return code, message


class _Taken(Exception):
    pass


# The item holding a model's revision counter.
REVISION_KEY = "revision"


def _condition_failed(response: Mapping[str, Any], index: int) -> bool:
    reasons = response.get("CancellationReasons") or []
    return len(reasons) > index and reasons[index].get("Code") == "ConditionalCheckFailed"


def _verify_existing(dest: Path, record: VersionRecord) -> None:
    """A folder already there (a restarted init container) is used only if it is exactly this version."""
    marker = dest / MARKER
    try:
        held = json.loads(marker.read_text())
    except (OSError, ValueError):
        raise errors.RegistryError(
            f"{dest} exists and is not a pulled model; remove it or pick another folder"
        ) from None
    if held.get("digest") != record.digest:
        raise errors.RegistryError(
            f"{dest} holds {held.get('name')}:{held.get('version')}, not {record.name}:{record.version}"
        )
    for f in record.manifest.files:
        path = dest / f.path
        if not path.is_file() or sha256_file(path) != f.sha256:
            raise errors.IntegrityError(f"{dest}/{f.path} does not match the registry; remove {dest} and pull again")
