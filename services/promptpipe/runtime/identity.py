"""Stage identity at run time: the token a process sends with each call to another stage, and the check a
stage makes of who calls it, from the call's metadata, before its request is read.

The check verifies the token (a JWT: signature by one of the issuer's keys, issuer, the pipeline's
audience, expiry), maps its subject to one of the pipeline's processes and admits it only if the pipeline's
shape has that process call this one (`contract.identity.callers_of`). A token verified once is remembered
until it expires, so a call costs a dict lookup; the memory is dropped when the keys file changes (a key
taken out of it no longer admits anyone). See `promptpipe.contract.identity` for where tokens come from.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from promptpipe.contract.identity import TOKEN_METADATA, TOKEN_SECONDS, StageIdentity, callers_of, subject
from promptpipe.contract.spec import PipelineSpec, StageName
from promptpipe.runtime.errors import PermissionDenied, Unauthenticated, refusal
from promptpipe.runtime.watched_file import WatchedFile
from promptpipe.v1 import stage_pb2

log = logging.getLogger(__name__)

STAGE_SERVICE = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name
STAGE_METHODS = f"/{STAGE_SERVICE}/"  # the prefix of its methods' paths
# Queue stats do no work for the caller and carry nothing of a call: open to probes and tools.
UNCHECKED_METHODS = frozenset({f"{STAGE_METHODS}Stats"})
# A Kubernetes token is about 1 KiB; anything far larger is not one, and is not parsed.
MAX_TOKEN_CHARS = 8192
# Clocks of two nodes differ a little.
LEEWAY_SECONDS = 30
# Tokens remembered as verified; more distinct tokens than this at once is a flood, and the memory restarts.
MAX_REMEMBERED = 4096
# A minted token is signed again when this share of its life has passed (as the kubelet does).
RENEW_AT = 0.8


@dataclass(frozen=True)
class IssuerKeys:
    issuer: str
    keys: dict[str, jwt.PyJWK]  # by key id ("" for a key without one)


def parse_issuer_keys(text: str) -> IssuerKeys:
    """The keys file: {"issuer": ..., "keys": [JWK, ...]} (a JWK Set with its issuer)."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("issuer"), str) or not doc["issuer"]:
        raise ValueError("the identity keys file names no issuer")
    keys = {}
    for jwk in jwt.PyJWKSet.from_dict({"keys": doc.get("keys", [])}).keys:
        keys[jwk.key_id or ""] = jwk
    return IssuerKeys(doc["issuer"], keys)


class TokenSource(Protocol):
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What a call to another stage carries to say who makes it."""
        ...


class FileToken:
    """A token someone else writes and refreshes: the kubelet's projected ServiceAccount token."""

    def __init__(self, path: Path) -> None:
        self._file = WatchedFile(path, _token_text, "the stage's identity token", max_bytes=MAX_TOKEN_CHARS)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA, f"Bearer {self._file.value}"),)


def _token_text(text: str) -> str:
    token = text.strip()
    if token.count(".") != 2:
        raise ValueError("not a JWT")
    return token


class SignedToken:
    """Tokens this process signs itself with the local key (`promptpipe up`), renewed before they expire.
    The key's id is the one the keys file gives the matching public key."""

    def __init__(
        self, key_file: Path, keys: IssuerKeys, audience: str, subject: str, clock: Callable[[], float] = time.time
    ) -> None:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_file}: the local identity key must be an EC P-256 key")
        public = key.public_key().public_numbers()
        kids = [kid for kid, jwk in keys.keys.items() if _public_numbers(jwk) == public]
        if not kids:
            raise ValueError(f"{key_file}: its public key is not in the identity keys file")
        self._key = key
        self._kid = kids[0]
        self._claims = {"iss": keys.issuer, "aud": audience, "sub": subject}
        self._clock = clock
        self._renew_at = 0.0
        self._metadata: tuple[tuple[str, str], ...] = ()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        now = self._clock()
        if now >= self._renew_at:
            issued = int(now)
            claims = {**self._claims, "iat": issued, "nbf": issued, "exp": issued + TOKEN_SECONDS}
            token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._kid})
            self._metadata = ((TOKEN_METADATA, f"Bearer {token}"),)
            self._renew_at = now + TOKEN_SECONDS * RENEW_AT
        return self._metadata


def _public_numbers(jwk: jwt.PyJWK) -> object:
    public = jwk.key
    return public.public_numbers() if isinstance(public, ec.EllipticCurvePublicKey) else None


def token_source(identity: StageIdentity, process: StageName, keys: IssuerKeys, token_file: Path | None) -> TokenSource:
    """How `process` proves who it is: the token in `token_file` (the kubelet's, on a cluster), else tokens it
    signs itself (locally)."""
    if token_file is not None:
        return FileToken(token_file)
    if not identity.signing_key_file:
        raise ValueError("stage identity needs a token file (PROMPTPIPE_IDENTITY_TOKEN_FILE) or a signing key")
    account = identity.accounts[process]
    return SignedToken(Path(identity.signing_key_file), keys, identity.audience, subject(identity.namespace, account))


class NoToken:
    """A process without identity configured sends none (and its callees, if they check, refuse it)."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class CallerCheck:
    """Which of the pipeline's processes makes a call, from its token; refuses anyone else."""

    def __init__(
        self,
        identity: StageIdentity,
        callers: frozenset[StageName],
        keys: WatchedFile[IssuerKeys],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._audience = identity.audience
        self._keys = keys
        self._clock = clock
        accounts = {subject(identity.namespace, account): stage for stage, account in identity.accounts.items()}
        self._pipeline = accounts  # every process of the pipeline
        self._callers = {sub: stage for sub, stage in accounts.items() if stage in callers}
        self._verified: dict[str, tuple[float, str]] = {}  # token -> (expiry, subject)
        self._keys_version = keys.version

    def caller_of(self, authorization: str | None) -> StageName:
        """The calling process; Unauthenticated without a valid token, PermissionDenied for a process of the
        pipeline that does not call this one."""
        if not authorization:
            raise Unauthenticated("this stage takes calls from its pipeline's stages only: no identity token")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("the identity token must be 'Bearer <token>'")
        sub = self._subject(token)
        caller = self._callers.get(sub)
        if caller is None:
            other = self._pipeline.get(sub)
            who = f"the {other.value} stage" if other is not None else "this account"
            raise PermissionDenied(f"{who} may not call this stage")
        return caller

    def _subject(self, token: str) -> str:
        now = self._clock()
        keys = self._keys.value
        if self._keys.version != self._keys_version:
            self._verified.clear()  # a key taken out admits no one any more
            self._keys_version = self._keys.version
        known = self._verified.get(token)
        if known is not None and now < known[0]:
            return known[1]
        try:
            kid = jwt.get_unverified_header(token).get("kid") or ""
            key = keys.keys.get(kid) or (next(iter(keys.keys.values())) if len(keys.keys) == 1 and not kid else None)
            if key is None:
                raise Unauthenticated("the identity token is signed by a key this pipeline does not know")
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[key.algorithm_name],
                audience=self._audience,
                issuer=keys.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the identity token has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the identity token is for another pipeline") from None
        except jwt.InvalidTokenError as err:
            raise Unauthenticated(f"the identity token is not valid: {err}") from None
        sub = str(claims["sub"])
        if len(self._verified) >= MAX_REMEMBERED:
            self._verified.clear()
        self._verified[token] = (float(claims["exp"]) + LEEWAY_SECONDS, sub)
        return sub


class IdentityCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a Stage call whose token does not name a process that may call this one, before its request
    is read (UNAUTHENTICATED or PERMISSION_DENIED, from this stage)."""

    def __init__(
        self,
        check: CallerCheck,
        stage: str,
        refused: Callable[[str], None] = lambda _code: None,
        enforce: bool = True,
    ) -> None:
        self._check = check
        self._stage = stage
        self._refused = refused  # counts a refusal by its status code
        self._enforce = enforce  # False: count and log, and serve (StageIdentity.enforce)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if not method.startswith(STAGE_METHODS) or method in UNCHECKED_METHODS:
            return await continuation(details)  # health, reflection and Stats
        authorization = None
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_METADATA:
                authorization = value
                break
        try:
            self._check.caller_of(authorization if isinstance(authorization, str) else None)
        except (Unauthenticated, PermissionDenied) as exc:
            self._refused(exc.code.name)
            if not self._enforce:
                log.warning("served a call identity would refuse (not enforced yet): %s", exc.message)
                return await continuation(details)
            return refusal(exc, self._stage)
        return await continuation(details)


def keys_file(identity: StageIdentity) -> WatchedFile[IssuerKeys]:
    return WatchedFile(Path(identity.keys_file), parse_issuer_keys, "the pipeline's identity keys")


@dataclass(frozen=True)
class ProcessIdentity:
    """What one process of a pipeline sends with its calls, and the interceptors that check its callers."""

    tokens: TokenSource
    interceptors: tuple[IdentityCheck, ...]


def process_identity(
    identity: StageIdentity | None,
    spec: PipelineSpec,
    process: StageName,
    token_file: Path | None = None,
    refused: Callable[[str], None] = lambda _code: None,
) -> ProcessIdentity:
    """`process`'s tokens and its check of who calls it; without identity configured, neither (said at start)."""
    if identity is None:
        log.warning("no stage identity configured: this stage takes calls from anyone who reaches its port")
        return ProcessIdentity(NoToken(), ())
    keys = keys_file(identity)
    check = CallerCheck(identity, callers_of(spec, process), keys)
    tokens = token_source(identity, process, keys.value, token_file)
    return ProcessIdentity(tokens, (IdentityCheck(check, process.value, refused, identity.enforce),))
