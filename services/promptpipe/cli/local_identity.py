"""Stage identity for `promptpipe up`: a signing key of the run's own and the keys file the stages check
tokens against, in a folder only the user can read (a new key for each run). Each stage process signs its
own tokens with the key (`promptpipe.runtime.identity.SignedToken`), as the kubelet writes them on a
cluster; a process of another user on the machine can neither read the key nor make a token."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from promptpipe.contract import topology
from promptpipe.contract.identity import KEYS_FILE, LOCAL_ISSUER, LOCAL_NAMESPACE, StageIdentity, audience
from promptpipe.contract.spec import PromptPipeline

SIGNING_KEY_FILE = "signing-key.pem"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public key as a JWK (RFC 7517), its id the RFC 7638 thumbprint."""
    numbers = key.public_numbers()
    members = {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }
    thumbprint = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return {**members, "kid": _b64(thumbprint), "alg": "ES256", "use": "sig"}


def _write_private(path: Path, data: bytes) -> None:
    """Written readable by the user only, from its first byte (never a moment world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def set_up(folder: Path, pipeline: PromptPipeline) -> StageIdentity:
    """A new key and keys file under `folder/identity` (mode 0700, files 0600), and what the stages read."""
    home = folder / "identity"
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(home / SIGNING_KEY_FILE, pem)
    keys = {"issuer": LOCAL_ISSUER, "keys": [public_jwk(key.public_key())]}
    _write_private(home / KEYS_FILE, json.dumps(keys, indent=2).encode())
    name = pipeline.metadata.name
    return StageIdentity(
        audience=audience(LOCAL_NAMESPACE, name),
        namespace=LOCAL_NAMESPACE,
        accounts={stage: f"{name}-{stage.value}" for stage in topology.processes(pipeline.spec)},
        keys_file=str(home / KEYS_FILE),
        signing_key_file=str(home / SIGNING_KEY_FILE),
    )
