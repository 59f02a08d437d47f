"""The certificates a local control plane needs: a CA, the API server's serving
certificate, an admin client certificate (group system:masters), and the key pair
that signs service-account tokens. Pure: returns PEM bytes, writes nothing."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class ClusterPki:
    ca: Pem
    server: Pem
    admin: Pem
    service_account_key: bytes
    service_account_pub: bytes
    node: Pem | None = None  # the kubelet's client identity (system:node:NAME, group system:nodes)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical)
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_ca(cn: str) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(cn)
    cert = _issue(name, name, key.public_key(), key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    return Pem(cert, _key_pem(key))


def issue(
    ca: Pem,
    cn: str,
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    server: bool = False,
    client: bool = False,
) -> Pem:
    """A certificate signed by `ca`, for serving (`server`, under the names `dns` and `ips`) and/or as a client."""
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    issuer = x509.load_pem_x509_certificate(ca.cert).subject
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [
        u for u, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server), (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if on
    ]
    extensions: list[tuple[x509.ExtensionType, bool]] = [(x509.ExtendedKeyUsage(usages), False)]
    if dns or ips:
        names = [*(x509.DNSName(d) for d in dns), *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)]
        extensions.append((x509.SubjectAlternativeName(names), False))
    return Pem(_issue(_name(cn), issuer, key.public_key(), ca_key, extensions), _key_pem(key))


def make_pki(server_ips: tuple[str, ...] = (), node: str = "") -> ClusterPki:
    """`server_ips`: more addresses the API server is reached at (a node's, the `kubernetes` Service's);
    `node`: also issue that node's kubelet a client certificate."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("promptpipe-test-ca")
    ca_cert = _issue(
        ca_name, ca_name, ca_key.public_key(), ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)]
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes"),
            x509.DNSName("kubernetes.default"),
            x509.DNSName("kubernetes.default.svc"),
            x509.DNSName("kubernetes.default.svc.cluster.local"),
            *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", *server_ips)),
        ]
    )
    server_cert = _issue(
        _name("kube-apiserver"),
        ca_name,
        server_key.public_key(),
        ca_key,
        [(sans, False), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)],
    )

    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin_cert = _issue(
        _name("promptpipe-admin", "system:masters"),
        ca_name,
        admin_key.public_key(),
        ca_key,
        [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_pub = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    node_pem = None
    if node:
        node_key = ec.generate_private_key(ec.SECP256R1())
        node_cert = _issue(
            _name(f"system:node:{node}", "system:nodes"),
            ca_name,
            node_key.public_key(),
            ca_key,
            [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
        )
        node_pem = Pem(node_cert, _key_pem(node_key))
    return ClusterPki(
        Pem(ca_cert, _key_pem(ca_key)),
        Pem(server_cert, _key_pem(server_key)),
        Pem(admin_cert, _key_pem(admin_key)),
        _key_pem(sa_key),
        sa_pub,
        node_pem,
    )
