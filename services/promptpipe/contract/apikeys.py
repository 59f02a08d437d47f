"""API keys' format, shared by the gateway that checks them and the CLI that makes them.

A key file (a Kubernetes Secret's key, a local file, or the PROMPTPIPE_API_KEYS variable) maps each tenant
to the sha256 of its keys, never the keys themselves; a tenant may hold several while one is rotated out:

    team-a: sha256:9f86d0...
    team-b: [sha256:2c26b4..., sha256:fcde2b...]
"""

from __future__ import annotations

import hashlib
import re
import secrets

import yaml

KEY_PREFIX = "pp-"
HASH_PREFIX = "sha256:"
TENANT = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


class KeyFileError(ValueError):
    """A key file that does not parse; the message names the entry."""


def new_key() -> str:
    """A key with 256 random bits: a plain hash is then as strong as a slow one, and cheap to check."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str, source: str) -> dict[str, str]:
    """The key file's entries as {hash: tenant}."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise KeyFileError(f"{source}: not YAML: {err}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise KeyFileError(f"{source}: must map each tenant to the sha256 of its keys")
    tenants: dict[str, str] = {}
    for tenant, hashes in doc.items():
        if not isinstance(tenant, str) or not TENANT.match(tenant):
            raise KeyFileError(f"{source}: {tenant!r}: a tenant is 1-63 lowercase letters, digits, '.', '_' or '-'")
        listed = hashes if isinstance(hashes, list) else [hashes]
        for i, h in enumerate(listed):
            if not isinstance(h, str) or not _HASH.match(h):
                where = tenant if not isinstance(hashes, list) else f"{tenant}[{i}]"
                raise KeyFileError(
                    f"{source}: {where}: must be sha256:<64 hex digits> (the key's hash, never the key:"
                    " `promptpipe keys new` makes both)"
                )
            if tenants.setdefault(h, tenant) != tenant:
                raise KeyFileError(f"{source}: {tenant}: the same key is also {tenants[h]}'s")
    return tenants
