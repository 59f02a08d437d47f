"""Stage identity: a call between a pipeline's processes proves which process makes it, and the callee admits
only the callers the pipeline's shape gives it, before it reads the request.

The pure half checks tokens as the stages do (signatures, issuer, audience, expiry, who may call whom, keys
rotated); the process half runs a local pipeline and calls its stages directly, as any process on the machine
could, then rotates a stage's token and the keys under load.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from promptpipe.cli import local_identity
from promptpipe.contract.identity import StageIdentity, callers_of, subject
from promptpipe.contract.pipeline_file import parse_pipeline
from promptpipe.contract.spec import PipelineSpec, PromptPipeline, StageName
from promptpipe.localproc import exits
from promptpipe.runtime.errors import PermissionDenied, Unauthenticated
from promptpipe.runtime.identity import (
    MAX_TOKEN_CHARS,
    CallerCheck,
    FileToken,
    IdentityCheck,
    IssuerKeys,
    SignedToken,
    TokenSource,
    parse_issuer_keys,
)
from promptpipe.runtime.watched_file import RELOAD_EVERY_SECONDS, WatchedFile
from promptpipe.v1 import stage_pb2, stage_pb2_grpc
from promptpipe.waiting import wait_until
from tests.support.calls import collect, stats
from tests.support.pipelines import RunningPipeline, synthetic_pipeline

StartPipeline = Callable[[dict[str, Any]], RunningPipeline]


def _pipeline(name: str = "idt") -> PromptPipeline:
    return parse_pipeline(synthetic_pipeline(name))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _keys(identity: StageIdentity) -> IssuerKeys:
    return parse_issuer_keys(Path(identity.keys_file).read_text())


def _token(identity: StageIdentity, stage: StageName, clock: Clock | None = None, audience: str = "") -> str:
    signed = SignedToken(
        Path(identity.signing_key_file),
        _keys(identity),
        audience or identity.audience,
        subject(identity.namespace, identity.accounts[stage]),
        clock or time.time,
    )
    return str(signed.metadata()[0][1])


@pytest.fixture
def identity(tmp_path: Path) -> StageIdentity:
    return local_identity.set_up(tmp_path, _pipeline())


def _check(identity: StageIdentity, callee: StageName, clock: Clock | None = None) -> CallerCheck:
    spec = _pipeline().spec
    keys = WatchedFile(Path(identity.keys_file), parse_issuer_keys, "keys", clock=clock or time.monotonic)
    return CallerCheck(identity, callers_of(spec, callee), keys, clock=clock or time.time)


# ---- who calls whom


def test_callers_follow_the_pipelines_shape_and_calls_within_a_process_need_none() -> None:
    spec = PipelineSpec.model_validate(synthetic_pipeline()["spec"])
    assert callers_of(spec, StageName.RAG) == {StageName.STREAM}
    assert callers_of(spec, StageName.POST) == {StageName.STREAM}
    assert callers_of(spec, StageName.INFERENCE) == {StageName.POST}
    assert callers_of(spec, StageName.STREAM) == set()
    # post fused into inference: the gateway calls that process (as post); nothing else calls it.
    fused = PipelineSpec.model_validate(synthetic_pipeline(fuse=["post"])["spec"])
    assert callers_of(fused, StageName.INFERENCE) == {StageName.STREAM}
    everything = PipelineSpec.model_validate(synthetic_pipeline(fuse=["rag", "assemble", "post", "inference"])["spec"])
    assert callers_of(everything, StageName.STREAM) == set()


# ---- the check, as a stage makes it


def test_the_local_key_and_keys_file_are_readable_by_the_user_only(identity: StageIdentity) -> None:
    folder = Path(identity.keys_file).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (identity.keys_file, identity.signing_key_file):
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600


def test_a_callee_admits_its_callers_token_and_names_the_caller(identity: StageIdentity) -> None:
    assert _check(identity, StageName.INFERENCE).caller_of(_token(identity, StageName.POST)) is StageName.POST
    assert _check(identity, StageName.RAG).caller_of(_token(identity, StageName.STREAM)) is StageName.STREAM


def test_a_process_of_the_pipeline_that_does_not_call_this_stage_is_denied(identity: StageIdentity) -> None:
    with pytest.raises(PermissionDenied, match="the stream stage may not call this stage"):
        _check(identity, StageName.INFERENCE).caller_of(_token(identity, StageName.STREAM))
    with pytest.raises(PermissionDenied, match="the post stage may not call this stage"):
        _check(identity, StageName.RAG).caller_of(_token(identity, StageName.POST))


def test_a_valid_token_of_an_account_that_is_no_stage_is_denied(identity: StageIdentity) -> None:
    stranger = SignedToken(
        Path(identity.signing_key_file),
        _keys(identity),
        identity.audience,
        subject(identity.namespace, "default"),  # a pod's own ServiceAccount, with the pipeline's audience
    )
    with pytest.raises(PermissionDenied, match="this account may not call"):
        _check(identity, StageName.INFERENCE).caller_of(stranger.metadata()[0][1])


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "no identity token"),
        ("", "no identity token"),
        ("Basic abc", "must be 'Bearer <token>'"),
        ("Bearer " + "a" * (MAX_TOKEN_CHARS + 1), "must be 'Bearer <token>'"),
        ("Bearer not.a.jwt", "not valid"),
    ],
)
def test_no_token_or_a_malformed_one_is_unauthenticated(
    identity: StageIdentity, authorization: str | None, message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        _check(identity, StageName.INFERENCE).caller_of(authorization)


def test_an_expired_token_is_unauthenticated(identity: StageIdentity) -> None:
    old = Clock()
    old.now = time.time() - 3600
    with pytest.raises(Unauthenticated, match="expired"):
        _check(identity, StageName.INFERENCE).caller_of(_token(identity, StageName.POST, old))


def test_a_token_for_another_pipeline_is_unauthenticated(identity: StageIdentity) -> None:
    other = _token(identity, StageName.POST, audience="promptpipe.io/local/another")
    with pytest.raises(Unauthenticated, match="for another pipeline"):
        _check(identity, StageName.INFERENCE).caller_of(other)


def test_a_token_signed_by_a_key_the_pipeline_does_not_know_is_unauthenticated(
    identity: StageIdentity, tmp_path: Path
) -> None:
    other = local_identity.set_up(tmp_path / "other", _pipeline())
    with pytest.raises(Unauthenticated, match="a key this pipeline does not know"):
        _check(identity, StageName.INFERENCE).caller_of(_token(other, StageName.POST))
    # The same, forged to name the pipeline's own key id: the signature does not hold.
    ours = next(iter(_keys(identity).keys))
    forged_keys = IssuerKeys(_keys(identity).issuer, {ours: _keys(other).keys[next(iter(_keys(other).keys))]})
    forged = SignedToken(
        Path(other.signing_key_file),
        forged_keys,
        identity.audience,
        subject("local", identity.accounts[StageName.POST]),
    )
    with pytest.raises(Unauthenticated, match="not valid"):
        _check(identity, StageName.INFERENCE).caller_of(forged.metadata()[0][1])


def _new_key(folder: Path) -> tuple[Path, dict[str, str]]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = folder / f"key-{time.monotonic_ns()}.pem"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    return path, local_identity.public_jwk(key.public_key())


def _write_keys(identity: StageIdentity, jwks: list[dict[str, str]]) -> None:
    """As a ConfigMap volume changes: the new file renamed into place whole."""
    partial = Path(identity.keys_file).with_suffix(".partial")
    partial.write_text(json.dumps({"issuer": "promptpipe-local", "keys": jwks}))
    partial.replace(identity.keys_file)


def test_keys_rotate_without_a_restart_and_a_key_taken_out_admits_no_one(
    identity: StageIdentity, tmp_path: Path
) -> None:
    clock = Clock()
    check = _check(identity, StageName.INFERENCE, clock)
    old_jwk = json.loads(Path(identity.keys_file).read_text())["keys"][0]
    old_token = _token(identity, StageName.POST)
    assert check.caller_of(old_token) is StageName.POST  # verified, and remembered
    new_path, new_jwk = _new_key(tmp_path)
    _write_keys(identity, [old_jwk, new_jwk])
    clock.now += RELOAD_EVERY_SECONDS
    new_identity = identity.model_copy(update={"signing_key_file": str(new_path)})
    assert check.caller_of(_token(new_identity, StageName.POST)) is StageName.POST
    assert check.caller_of(old_token) is StageName.POST, "both keys admit during the rotation"
    _write_keys(identity, [new_jwk])
    clock.now += RELOAD_EVERY_SECONDS
    with pytest.raises(Unauthenticated, match="does not know"):
        check.caller_of(old_token)  # remembered as verified before: forgotten with the key
    assert check.caller_of(_token(new_identity, StageName.POST)) is StageName.POST


def test_a_file_token_is_read_again_when_the_kubelet_refreshes_it(identity: StageIdentity, tmp_path: Path) -> None:
    path = tmp_path / "token"
    first = _token(identity, StageName.POST)
    path.write_text(first.removeprefix("Bearer ") + "\n")  # as the kubelet writes it: the bare token
    source = FileToken(path)
    assert source.metadata() == (("authorization", first),)
    later = Clock()
    later.now = time.time() + 5
    second = _token(identity, StageName.POST, later)
    assert second != first
    (tmp_path / "token.new").write_text(second.removeprefix("Bearer "))
    (tmp_path / "token.new").replace(path)
    wait_until(lambda: source.metadata() == (("authorization", second),), "the new token", timeout=5)


# ---- on a local pipeline: every stage's port, as any process on the machine reaches it


async def _call(
    target: str, stage: StageName, item: stage_pb2.WorkItem, identity: TokenSource | None
) -> grpc.StatusCode:
    metadata = identity.metadata() if identity is not None else ()
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 32 << 20)]) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        try:
            if stage in (StageName.RAG, StageName.ASSEMBLE):
                await stub.Process(item, timeout=30, metadata=metadata)
            else:
                async for _ in stub.Run(item, timeout=30, metadata=metadata):
                    pass
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


@pytest.mark.processes
async def test_every_stage_refuses_a_call_without_its_pipelines_token_and_its_own_calls_go_through(
    start_pipeline: StartPipeline,
) -> None:
    p = start_pipeline(synthetic_pipeline("idt", rag={"enabled": True}))
    big = stage_pb2.WorkItem(prompt="x" * (15 << 20))  # 15 MiB: refused from the headers, never parsed
    for stage in (StageName.RAG, StageName.ASSEMBLE, StageName.POST, StageName.INFERENCE):
        started = time.monotonic()
        assert await _call(p.target(stage), stage, big, None) is grpc.StatusCode.UNAUTHENTICATED, stage
        assert (await stats(p.stats_target(stage))).completed_total == 0, f"{stage} did no work for a stranger"
        assert time.monotonic() - started < 10
        assert p.metric(stage, "promptpipe_stage_callers_refused_total", code="UNAUTHENTICATED") == 1
    small = stage_pb2.WorkItem(prompt="hi")
    # A process of the pipeline calling what its shape does not have it call.
    gateway, post = p.identity_of(StageName.STREAM), p.identity_of(StageName.POST)
    assert await _call(p.target(StageName.INFERENCE), StageName.INFERENCE, small, gateway) is (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert await _call(p.target(StageName.RAG), StageName.RAG, small, post) is grpc.StatusCode.PERMISSION_DENIED
    assert p.metric(StageName.INFERENCE, "promptpipe_stage_callers_refused_total", code="PERMISSION_DENIED") == 1
    # The pipeline's own calls: through the gateway, every hop checked.
    out = await collect(p.gateway, "hello")
    assert out.error is None and out.summary is not None and out.summary.usage.completion_tokens == 16
    assert await _call(p.target(StageName.INFERENCE), StageName.INFERENCE, small, post) is grpc.StatusCode.OK


@pytest.mark.processes
async def test_a_stages_token_and_the_keys_rotate_under_load_with_no_call_failing_and_no_restart(
    start_pipeline: StartPipeline, tmp_path: Path
) -> None:
    """post reads its token from a file (as a pod reads the kubelet's); under steady calls the keys file gains a
    new key, post's token is replaced by one the new key signed, and every call still ends well."""
    p = start_pipeline(synthetic_pipeline("idt", model={"synthetic": {"tokensPerSecond": 400}}))
    identity = p.run_identity()
    token_file = tmp_path / "post-token"
    token_file.write_text(p.identity_of(StageName.POST).metadata()[0][1].removeprefix("Bearer "))
    os.kill(p.pid(StageName.POST), signal.SIGTERM)
    assert exits(p.pid(StageName.POST), 15)
    post = p.relaunch(StageName.POST, PROMPTPIPE_IDENTITY_TOKEN_FILE=str(token_file))
    try:
        assert (await collect(p.gateway, "warm")).error is None
        stop = asyncio.Event()
        outcomes = []

        async def steady() -> None:
            while not stop.is_set():
                outcomes.append(await collect(p.gateway, "under rotation"))

        load = [asyncio.create_task(steady()) for _ in range(4)]
        await asyncio.sleep(1)
        old_jwk = json.loads(Path(identity.keys_file).read_text())["keys"][0]
        new_path, new_jwk = _new_key(tmp_path)
        _write_keys(identity, [old_jwk, new_jwk])
        await asyncio.sleep(2 * RELOAD_EVERY_SECONDS)  # every stage has read the new keys
        renewed = identity.model_copy(update={"signing_key_file": str(new_path)})
        (tmp_path / "post-token.new").write_text(_token(renewed, StageName.POST).removeprefix("Bearer "))
        (tmp_path / "post-token.new").replace(token_file)
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*load)
        failed = [o.error for o in outcomes if o.error is not None]
        assert len(outcomes) > 20 and not failed, failed[:3]
        assert post.poll() is None, "post never restarted"
        # post sends what its file holds now: a token of a key no stage knows is refused at inference.
        stranger = local_identity.set_up(tmp_path / "stranger", parse_pipeline(synthetic_pipeline("idt")))
        token_file.write_text(_token(stranger, StageName.POST).removeprefix("Bearer "))
        await asyncio.sleep(2 * RELOAD_EVERY_SECONDS)
        refused = await collect(p.gateway, "with a stranger's token")
        assert refused.error is not None and refused.error.code is grpc.StatusCode.UNAUTHENTICATED
        assert "does not know" in refused.error.message
    finally:
        post.send_signal(signal.SIGTERM)
        post.wait(15)


class _Details(grpc.HandlerCallDetails):  # type: ignore[misc]
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = "/promptpipe.v1.Stage/Run"
        self.invocation_metadata = metadata


@pytest.mark.parametrize("enforce", [True, False])
async def test_not_enforced_during_an_upgrade_a_call_identity_would_refuse_is_counted_and_served(
    identity: StageIdentity, enforce: bool
) -> None:
    refused: list[str] = []
    interceptor = IdentityCheck(_check(identity, StageName.INFERENCE), "inference", refused.append, enforce)
    served = object()

    async def go_on(_: grpc.HandlerCallDetails) -> object:
        return served

    assert (
        await interceptor.intercept_service(go_on, _Details((("authorization", _token(identity, StageName.POST)),)))
        is served
    )
    handler = await interceptor.intercept_service(go_on, _Details(()))
    assert (handler is served) is not enforce
    assert refused == ["UNAUTHENTICATED"]
