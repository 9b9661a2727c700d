"""Throw-away PKI for the mTLS tests and the mTLS demo (never for real use).

``make_pki(directory)`` writes, with the ``cryptography`` package (EC P-256, so it is fast):

    ca.crt                       the demo CA that signs the two certificates below
    server.crt / server.key      the IdP's certificate: SAN DNS idp.example.com, idp.test, IP 127.0.0.1
    client.crt / client.key      the client certificate Envoy presents (CN svc-a, clientAuth)
    rogue-ca.crt                 a second, unrelated CA ...
    rogue-server.crt / .key      ... and an IdP certificate it signed (same SANs): a server Envoy must refuse

As a script it fills a directory, e.g. the one ``envoy/mtls.yaml`` reads:

    .venv/bin/python tests/e2e/tls_certs.py envoy/certs
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_DNS_NAMES = ("idp.example.com", "idp.test")
SERVER_IPS = ("127.0.0.1",)
CLIENT_CN = "svc-a"


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca_cert: Path
    rogue_server_cert: Path
    rogue_server_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "oauth2-cc test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return builder.not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))


def _ca(cn: str):
    key = _key()
    b = x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
    b = _validity(b.public_key(key.public_key()).serial_number(x509.random_serial_number()))
    b = b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    b = b.add_extension(
        x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                      encipher_only=False, decipher_only=False),
        critical=True,
    )
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return b.sign(key, hashes.SHA256()), key


def _leaf(cn: str, ca_cert, ca_key, *, server: bool):
    key = _key()
    b = x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
    b = _validity(b.public_key(key.public_key()).serial_number(x509.random_serial_number()))
    b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    b = b.add_extension(
        x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                      encipher_only=False, decipher_only=False),
        critical=True,
    )
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if server:
        sans = [x509.DNSName(n) for n in SERVER_DNS_NAMES] + [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS
        ]
    else:
        sans = [x509.DNSName(f"{cn}.clients.idp.test")]
    b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    b = b.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
    )
    return b.sign(ca_key, hashes.SHA256()), key


def _write_cert(path: Path, cert) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


def make_pki(directory: str | Path) -> Pki:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("oauth2-cc demo CA")
    server, server_key = _leaf("idp.example.com", ca, ca_key, server=True)
    client, client_key = _leaf(CLIENT_CN, ca, ca_key, server=False)
    rogue, rogue_key = _ca("rogue CA")
    rogue_server, rogue_server_key = _leaf("idp.example.com", rogue, rogue_key, server=True)
    return Pki(
        dir=d,
        ca_cert=_write_cert(d / "ca.crt", ca),
        server_cert=_write_cert(d / "server.crt", server),
        server_key=_write_key(d / "server.key", server_key),
        client_cert=_write_cert(d / "client.crt", client),
        client_key=_write_key(d / "client.key", client_key),
        rogue_ca_cert=_write_cert(d / "rogue-ca.crt", rogue),
        rogue_server_cert=_write_cert(d / "rogue-server.crt", rogue_server),
        rogue_server_key=_write_key(d / "rogue-server.key", rogue_server_key),
    )


if __name__ == "__main__":
    out = make_pki(sys.argv[1] if len(sys.argv) > 1 else "envoy/certs")
    print(f"demo PKI written to {out.dir}/ (ca.crt, server.*, client.*): for demos and tests only")
