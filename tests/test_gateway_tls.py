"""TLS on the gateway's public ports (gRPC and HTTP), from a certificate and key on disk as a Secret volume
holds them; a renewed certificate is served to new connections without a restart."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import grpc
import openai
import pytest

from promptpipe.client import GenerationError, PipelineClient
from promptpipe.contract.spec import StageName
from promptpipe.waiting import wait_until
from tests.devcluster.pki import Pem, issue, make_ca
from tests.support.pipelines import RunningPipeline, synthetic_pipeline

pytestmark = pytest.mark.processes

HELLO = [{"role": "user", "content": "hello there"}]


def install(folder: Path, pem: Pem) -> None:
    """Both files replaced whole, as the kubelet swaps a Secret volume's."""
    for name, data in (("tls.crt", pem.cert), ("tls.key", pem.key)):
        partial = folder / f".{name}.partial"
        partial.write_bytes(data)
        os.replace(partial, folder / name)


async def answer(p: RunningPipeline, roots: bytes | None) -> str:
    client = PipelineClient(p.gateway, tls=True, root_certificates=roots) if roots else PipelineClient(p.gateway)
    async with client:
        return "".join([r.chunk.text async for r in client.generate("hello there", timeout=5)])


def https_answer(p: RunningPipeline, ca: Path) -> str:
    base = p.openai_base_url.replace("http://", "https://")
    with openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca))) as http:
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, http_client=http)
        content = client.chat.completions.create(model="synthetic", messages=HELLO).choices[0].message.content  # type: ignore[arg-type]
        return content or ""


def test_the_public_ports_serve_tls_and_follow_a_renewed_certificate(
    start_pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_ca, new_ca = make_ca("old-ca"), make_ca("new-ca")
    (tmp_path / "old-ca.crt").write_bytes(old_ca.cert)
    (tmp_path / "new-ca.crt").write_bytes(new_ca.cert)
    secret = tmp_path / "secret"
    secret.mkdir()
    install(secret, issue(old_ca, "gateway", ips=("127.0.0.1",), dns=("localhost",), server=True))
    monkeypatch.setenv("PROMPTPIPE_TLS_CERT_FILE", str(secret / "tls.crt"))
    monkeypatch.setenv("PROMPTPIPE_TLS_KEY_FILE", str(secret / "tls.key"))
    p = start_pipeline(synthetic_pipeline())

    assert asyncio.run(answer(p, old_ca.cert)).strip()
    assert https_answer(p, tmp_path / "old-ca.crt").strip()
    # Plain text is refused, and so is a certificate the client does not trust.
    for roots in (None, new_ca.cert):
        with pytest.raises(GenerationError) as err:
            asyncio.run(answer(p, roots))
        assert err.value.code is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(openai.APIConnectionError):
        https_answer(p, tmp_path / "new-ca.crt")
    pid = p.pid(StageName.STREAM)

    install(secret, issue(new_ca, "gateway", ips=("127.0.0.1",), dns=("localhost",), server=True))

    def renewed() -> bool:
        try:
            return bool(asyncio.run(answer(p, new_ca.cert)).strip())
        except GenerationError:
            return False

    wait_until(renewed, "gRPC to serve the renewed certificate", 10, every=0.5)
    wait_until(
        lambda: bool(https_answer(p, tmp_path / "new-ca.crt").strip()),
        "HTTPS to serve the renewed certificate",
        10,
        every=0.5,
        retry_on=(openai.APIConnectionError,),
    )
    assert p.pid(StageName.STREAM) == pid  # no restart


def test_a_half_written_certificate_keeps_the_previous_one(
    start_pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = make_ca("ca")
    secret = tmp_path / "secret"
    secret.mkdir()
    install(secret, issue(ca, "gateway", ips=("127.0.0.1",), server=True))
    monkeypatch.setenv("PROMPTPIPE_TLS_CERT_FILE", str(secret / "tls.crt"))
    monkeypatch.setenv("PROMPTPIPE_TLS_KEY_FILE", str(secret / "tls.key"))
    p = start_pipeline(synthetic_pipeline())
    (secret / "tls.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")
    log = Path(p.run.stages[StageName.STREAM.value].log)
    wait_until(lambda: "TLS certificate not reloaded" in log.read_text(), "the bad pair to be refused", 10)
    assert asyncio.run(answer(p, ca.cert)).strip()
