"""Step 1 of connecting: read a server's certificate over plain TLS and verify its evidence.

grpcio cannot run a custom certificate check (grpc issue 32635), so the client reads the
certificate itself (no CA check: the evidence is the trust anchor), verifies it, and then
pins exactly that certificate as the only root of its gRPC channel.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from enclavefl.errors import FormatError
from enclavefl.net.admission import check_policy_hash, log_verified
from enclavefl.net.errors import ConnectFailed
from enclavefl.tee.claims import Claims
from enclavefl.tee.policy import Policy
from enclavefl.tee.ratls import SERVER_NAME, load_certificate, verify_certificate

__all__ = [
    "ProbedCertificate",
    "fetch_certificate",
    "probe_and_verify",
    "verify_server_certificate",
]


@dataclass(frozen=True)
class ProbedCertificate:
    """The certificate a server showed at the probe."""

    der: bytes

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def certificate(self) -> x509.Certificate:
        return load_certificate(self.der)

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.der).digest()

    @property
    def common_name(self) -> str:
        try:
            names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError as exc:
            raise FormatError(f"server certificate subject does not parse: {exc}") from exc
        if len(names) != 1:
            raise FormatError(f"server certificate must have exactly one CN, has {len(names)}")
        return str(names[0].value)


def fetch_certificate(
    host: str, port: int, *, timeout_s: float = 5.0, server_name: str = SERVER_NAME
) -> ProbedCertificate:
    """The certificate the TLS server at host:port presents (not verified here).

    The probe asks for `server_name` (SNI), the name in enclavefl certificates, as the
    pinned gRPC channel does afterwards: asking for the dialed host instead would name a
    host the certificate does not list, which gRPC servers log as an error.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Deliberately no CA or hostname check: the certificate is verified by its evidence next.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2", "http/1.1"])  # gRPC servers refuse clients that do not offer h2
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as sock,
            context.wrap_socket(sock, server_hostname=server_name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectFailed(f"cannot read the TLS certificate of {host}:{port}: {exc}") from exc
    if not der:
        raise ConnectFailed(f"{host}:{port} presented no TLS certificate")
    try:
        load_certificate(der)
    except FormatError as exc:
        raise FormatError(f"{host}:{port} presented a certificate that does not parse: {exc}") from exc
    return ProbedCertificate(der)


def verify_server_certificate(
    probed: ProbedCertificate, *, policy: Policy, collateral: Any = None, at: int | None = None, who: str = "server"
) -> Claims:
    """Evidence, key binding and policy of a probed certificate, and its policy-hash claim."""
    claims = verify_certificate(probed.der, policy=policy, collateral=collateral, at=at)
    check_policy_hash(claims, policy, who)
    log_verified("server", who, claims)
    return claims


def probe_and_verify(
    host: str,
    port: int,
    *,
    policy: Policy,
    collateral: Any = None,
    at: int | None = None,
    require_policy_hash: bool = False,
    timeout_s: float = 5.0,
) -> Claims:
    """Verify the RA-TLS certificate of any TLS server (ours, Gramine's) by probing it only.

    The policy-hash claim is checked only with `require_policy_hash` (servers other than
    enclavefl parties do not carry one).
    """
    probed = fetch_certificate(host, port, timeout_s=timeout_s)
    if require_policy_hash:
        return verify_server_certificate(probed, policy=policy, collateral=collateral, at=at, who=f"{host}:{port}")
    claims = verify_certificate(probed.der, policy=policy, collateral=collateral, at=at)
    log_verified("server", f"{host}:{port}", claims)
    return claims
