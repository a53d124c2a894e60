"""Admission: how a client proves its attestation to a server without a TLS client certificate.

The client signs, with the key bound in its RA-TLS certificate, a canonical encoding of
(nonce, SHA-256 of the server certificate it pinned, job id, party name). The server checks
it all and issues a session token; sessions and nonces expire. No gRPC here: the server
module wires this logic to RPCs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path
from enum import StrEnum

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from enclavefl.errors import Check, FormatError, KeyBindingRejected, PolicyRejected, Rejected, UsageError
from enclavefl.net import enclavefl_pb2 as pb
from enclavefl.net.tensors import PROTOCOL_VERSION
from enclavefl.tee.attesters import Attester, make_attester
from enclavefl.tee.claims import Claims
from enclavefl.tee.collateral import CollateralSource, collateral_source
from enclavefl.tee.policy import Policy, load_policy
from enclavefl.tee.ratls import (
    PUBKEY_HASH_CLAIM,
    SERVER_NAME,
    RaTlsIdentity,
    certificate_public_key,
    load_certificate,
    make_certificate,
    verify_certificate,
)

__all__ = [
    "ADMISSION_DOMAIN",
    "ADMISSION_VERSION",
    "PARTY_CLAIM",
    "POLICY_HASH_CLAIM",
    "PRIVACY_CLAIM",
    "AdmissionRequest",
    "Admitter",
    "Mode",
    "NonceStore",
    "PartyCredentials",
    "Peer",
    "SessionStore",
    "admission_payload",
    "build_admission",
    "check_party_binding",
    "check_party_name",
    "check_policy_hash",
    "key_id",
    "log_verified",
    "make_identity",
    "sign_admission",
]

log = logging.getLogger("enclavefl.net")

ADMISSION_DOMAIN = "enclavefl-admission"
ADMISSION_VERSION = 1
POLICY_HASH_CLAIM = "policy-hash"
PARTY_CLAIM = "party"
PRIVACY_CLAIM = "privacy-budget"
NONCE_SIZE = 32
TOKEN_SIZE = 32
MAX_PARTY_CHARS = 128


class Mode(StrEnum):
    """Who is attested, as in CCZoo's `verify` options."""

    TWO_WAY = "two-way"  # both ends (default)
    SERVER = "server"  # only the server; clients are admitted without evidence
    CLIENT = "client"  # only the client; the client still pins the certificate it probed

    @property
    def verifies_server(self) -> bool:
        return self is not Mode.CLIENT

    @property
    def verifies_client(self) -> bool:
        return self is not Mode.SERVER


@dataclass(frozen=True)
class Peer:
    """An authenticated peer as FL code sees it: a party name and its verified claims.

    `claims` is None only when this side's mode does not attest that peer.
    """

    party: str
    claims: Claims | None

    @property
    def attested(self) -> bool:
        return self.claims is not None


def make_identity(
    attester: Attester, policy: Policy, *, party: str | None = None, common_name: str = SERVER_NAME
) -> RaTlsIdentity:
    """This party's RA-TLS identity; its claims include the digest of the policy it enforces,
    to name the difference when peers disagree its privacy budget, and its party name (a
    server admits a client only under the name its evidence binds)."""
    extra: dict[str, Any] = {POLICY_HASH_CLAIM: policy.digest(), PRIVACY_CLAIM: policy.privacy_claim()}
    if party is not None:
        check_party_name(party)
        extra[PARTY_CLAIM] = party
    return make_certificate(attester, extra_claims=extra, common_name=common_name)


def check_party_binding(claims: Claims, party: str, policy: Policy, who: str, *, required: bool = True) -> None:
    """`party` must be the name `claims` bind, and run what `policy` pins for that name.

    Without `required`, evidence that binds no name passes the first check (servers that are
    not enclavefl parties, e.g. a Gramine RA-TLS server, bind none)."""
    bound = claims.bound.get(PARTY_CLAIM)
    if bound != party and (required or bound is not None):
        raise Rejected(
            f"{who} calls itself {party!r} but its evidence binds "
            + (f"the name {bound!r}" if isinstance(bound, str) else "no party name"),
            check=Check.PARTY_NAME,
        )
    policy.check_party(party, claims)


def key_id(claims: Claims) -> bytes:
    """What identifies the attested key behind `claims` (the hash its evidence binds)."""
    entry = claims.bound.get(PUBKEY_HASH_CLAIM)
    return bytes(entry[1]) if isinstance(entry, list) and len(entry) == 2 else b""


def check_party_name(party: str) -> None:
    if not isinstance(party, str) or not party or len(party) > MAX_PARTY_CHARS or not party.isprintable():
        raise UsageError(f"party name must be 1..{MAX_PARTY_CHARS} printable characters, got {party!r}")


@dataclass(frozen=True)
class PartyCredentials:
    """What a party brings to every connection, as server or client.

    `identity`: its RA-TLS identity (None only for a client in mode "server", which sends
    no evidence); `policy`: what it requires of peers (its digest is in the identity's
    claims); `party` and `job_id`: its name and job; `mode`: who is attested (both ends
    must agree); `collateral` and `at`: for verifying hardware quotes (at: pinned time).
    """

    identity: RaTlsIdentity | None
    policy: Policy
    party: str
    job_id: str
    mode: Mode = Mode.TWO_WAY
    collateral: CollateralSource | None = None
    at: int | None = None

    def __post_init__(self) -> None:
        check_party_name(self.party)
        object.__setattr__(self, "mode", Mode(self.mode))

    @classmethod
    def create(
        cls,
        attester: Attester,
        policy: Policy,
        *,
        party: str,
        job_id: str,
        mode: Mode | str = Mode.TWO_WAY,
        collateral: CollateralSource | None = None,
        at: int | None = None,
    ) -> PartyCredentials:
        """Credentials with a fresh identity from `attester` (a new key and quote)."""
        return cls(make_identity(attester, policy, party=party), policy, party, job_id, Mode(mode), collateral, at)

    @classmethod
    def from_options(
        cls,
        attester: str = "auto",
        *,
        policy_path: Path | None,
        party: str,
        job_id: str,
        allow_simulated_insecure: bool = False,
        mode: Mode | str = Mode.TWO_WAY,
        collateral_file: Path | None = None,
        pccs_url: str | None = None,
    ) -> PartyCredentials:
        """Credentials from names and paths, as a command line gives them: the attester kind
        (`make_attester`), the policy file (None: the default policy), and where collateral
        for hardware quotes comes from (`collateral_source`). A new key and quote each call."""
        policy = load_policy(policy_path)
        collateral = collateral_source(collateral_file, pccs_url)
        made = make_attester(attester, allow_simulated_insecure=allow_simulated_insecure)
        return cls.create(made, policy, party=party, job_id=job_id, mode=mode, collateral=collateral)


def admission_payload(nonce: bytes, server_cert_sha256: bytes, job_id: str, party: str) -> bytes:
    """The canonical bytes a client signs to be admitted."""
    return cbor2.dumps([ADMISSION_DOMAIN, ADMISSION_VERSION, nonce, server_cert_sha256, job_id, party], canonical=True)


def sign_admission(identity: RaTlsIdentity, payload: bytes) -> bytes:
    return identity.private_key.sign(payload, ec.ECDSA(hashes.SHA384()))


def check_policy_hash(claims: Claims, policy: Policy, who: str) -> None:
    """The peer must enforce exactly our policy (a host cannot loosen its party's policy)."""
    theirs = claims.bound.get(POLICY_HASH_CLAIM)
    ours = policy.digest()
    if theirs != ours:
        # The budget claim is bound by the same evidence as the hash; it only explains.
        their_budget = claims.bound.get(PRIVACY_CLAIM, b"")
        if their_budget != policy.privacy_claim():
            raise PolicyRejected(
                f"privacy budget mismatch: {who} enforces {_budget_text(their_budget)}, "
                f"this party enforces {_budget_text(policy.privacy_claim())} (policy hash differs)",
                check=Check.PRIVACY,
            )
        got = theirs.hex() if isinstance(theirs, bytes) else repr(theirs)
        raise PolicyRejected(
            f"policy hash mismatch: {who} enforces {got}, this party enforces {ours.hex()}", check=Check.POLICY_HASH
        )


def _budget_text(claim: object) -> str:
    if claim == b"":
        return "no privacy budget"
    if not isinstance(claim, bytes):
        return f"an unreadable privacy budget {claim!r}"
    try:
        budget = json.loads(claim)
        return f"{budget['unit']}-level epsilon <= {budget['max_epsilon']:g}, delta = {budget['delta']:g}"
    except (ValueError, KeyError, TypeError, RecursionError):
        return f"an unreadable privacy budget {claim[:80]!r}"


def log_verified(role: str, party: str, claims: Claims) -> None:
    log.info(
        "%s %s attested: tee=%s mr_enclave=%s tcb=%s",
        role,
        party,
        claims.tee.value,
        claims.short_id(),
        claims.tcb_status,
    )
    if claims.insecure:
        log.warning(
            "INSECURE: %s %s relies on simulated evidence (self-reported, proves nothing); "
            "accepted only because the policy allows simulated evidence",
            role,
            party,
        )


class NonceStore:
    """Single-use, expiring nonces in bounded memory, fair between sources.

    A source (see guard.source_of) holds at most `per_source` unused nonces: issuing more
    drops its own oldest. It gets `rate_per_s` nonces a second on average (bursts of
    `per_source`); beyond that `issue` raises Rejected(check="rate-limit"). Beyond
    `capacity` nonces in all, the oldest of the source holding the most is dropped. So a
    flood from one source only ever evicts that source's own nonces.
    """

    def __init__(
        self,
        *,
        ttl_s: float = 30.0,
        capacity: int = 4096,
        per_source: int = 64,
        rate_per_s: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if capacity < 1 or per_source < 1 or not rate_per_s > 0:
            raise UsageError("nonce store capacity, per_source and rate_per_s must be positive")
        self.ttl_s = ttl_s
        self._capacity = capacity
        self._per_source = per_source
        self._rate = rate_per_s
        self._clock = clock
        self._by_source: dict[str, OrderedDict[bytes, float]] = {}
        self._source_of: dict[bytes, str] = {}
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, when)
        self._lock = threading.Lock()

    def issue(self, source: str = "local") -> bytes:
        """A fresh nonce for a client at `source`."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        with self._lock:
            now = self._clock()
            self._take_token(source, now)
            nonces = self._by_source.setdefault(source, OrderedDict())
            while nonces and next(iter(nonces.values())) < now:  # expired: issued in order
                self._drop_oldest(source)
                nonces = self._by_source.setdefault(source, OrderedDict())
            if len(nonces) >= self._per_source:
                self._drop_oldest(source)
            elif len(self._source_of) >= self._capacity:
                self._drop_oldest(max(self._by_source, key=lambda s: len(self._by_source[s])))
            self._by_source.setdefault(source, OrderedDict())[nonce] = now + self.ttl_s
            self._source_of[nonce] = source
        return nonce

    def consume(self, nonce: bytes) -> None:
        """Accept `nonce` once; unknown, reused or expired nonces are refused."""
        with self._lock:
            source = self._source_of.pop(nonce, None)
            expires = None
            if source is not None:
                nonces = self._by_source[source]
                expires = nonces.pop(nonce)
                if not nonces:
                    del self._by_source[source]
        if expires is None:
            raise Rejected(
                "admission nonce unknown or already used (replayed, or dropped under load: ask a fresh one)",
                check=Check.NONCE,
            )
        if self._clock() > expires:
            raise Rejected(f"admission nonce expired (nonces live {self.ttl_s:g} s)", check=Check.NONCE)

    def __len__(self) -> int:
        with self._lock:
            return len(self._source_of)

    def _drop_oldest(self, source: str) -> None:
        nonces = self._by_source[source]
        nonce, _ = nonces.popitem(last=False)
        del self._source_of[nonce]
        if not nonces:
            del self._by_source[source]

    def _take_token(self, source: str, now: float) -> None:
        tokens, when = self._buckets.pop(source, (float(self._per_source), now))
        tokens = min(float(self._per_source), tokens + (now - when) * self._rate)
        if len(self._buckets) >= self._capacity:  # bounded: forget the least recent source
            self._buckets.popitem(last=False)
        if tokens < 1:
            self._buckets[source] = (tokens, now)
            raise Rejected(
                f"too many admission nonces requested from {source} (at most {self._rate:g} a second)",
                check=Check.RATE_LIMIT,
            )
        self._buckets[source] = (tokens - 1, now)


@dataclass
class _Holder:
    """The attested key a party name is held by, and how recently it was used."""

    key: bytes
    in_flight: int = 0
    last_seen: float = 0.0


@dataclass(frozen=True)
class _Session:
    peer: Peer
    expires: float
    key: bytes | None  # None: the peer was not attested (mode "server")


class SessionStore:
    """Session tokens -> Peer, with expiry. Tokens are kept only as their SHA-256.

    A party name is held by one attested key at a time: while that key has a live session
    that has a call in progress or was used within `hold_s`, another key is refused the name
    (check "party-name-held"). Once the holder is idle (a party that died, or was stopped)
    another key may take the name, and the old key's sessions end then, so that two processes
    never act under one name.
    """

    def __init__(self, *, ttl_s: float = 600.0, hold_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.hold_s = hold_s
        self._clock = clock
        self._sessions: dict[bytes, _Session] = {}
        self._holders: dict[str, _Holder] = {}
        self._admitted: dict[str, Peer] = {}
        self._lock = threading.Lock()

    def issue(self, peer: Peer, key: bytes | None = None) -> bytes:
        """A session for `peer`, whose attested key is identified by `key` (see key_id)."""
        token = secrets.token_bytes(TOKEN_SIZE)
        with self._lock:
            now = self._clock()
            for digest in [d for d, session in self._sessions.items() if session.expires < now]:
                del self._sessions[digest]
            named = {session.peer.party for session in self._sessions.values()}
            for party in [p for p, h in self._holders.items() if p not in named and h.in_flight == 0]:
                del self._holders[party]  # no session left: the name is free (bounded memory)
            if key is not None:
                self._take_name(peer.party, key, now)
            self._sessions[hashlib.sha256(token).digest()] = _Session(peer, now + self.ttl_s, key)
            self._admitted[peer.party] = peer
        return token

    def _take_name(self, party: str, key: bytes, now: float) -> None:
        holder = self._holders.get(party)
        if holder is not None and holder.key != key:
            live = any(s.peer.party == party and s.key == holder.key for s in self._sessions.values())
            idle_s = now - holder.last_seen
            if live and (holder.in_flight > 0 or idle_s < self.hold_s):
                raise Rejected(
                    f"party name {party!r} is held by another attested key (a call in progress or one "
                    f"{idle_s:.1f} s ago); it is free once that party has been idle for {self.hold_s:g} s",
                    check=Check.PARTY_NAME_HELD,
                )
            for digest in [d for d, s in self._sessions.items() if s.peer.party == party and s.key != key]:
                del self._sessions[digest]  # the old holder is gone: its sessions end with it
            log.warning("party name %r passes to a new attested key (the previous one was idle)", party)
            holder = None
        if holder is None:
            self._holders[party] = _Holder(key, last_seen=now)
        else:
            holder.last_seen = now

    def admitted(self) -> dict[str, Peer]:
        """Every party admitted so far, as last admitted (sessions may have expired since)."""
        with self._lock:
            return dict(self._admitted)

    def lookup(self, token: bytes) -> Peer:
        """The peer of a live session; raises Rejected(check="session") otherwise."""
        with self._lock:
            return self._live(token).peer

    def begin(self, token: bytes) -> Peer:
        """Like lookup, and counts a call in progress on the session until `end(token)`."""
        with self._lock:
            session = self._live(token)
            holder = self._holder_of(session)
            if holder is not None:
                holder.in_flight += 1
                holder.last_seen = self._clock()
            return session.peer

    def end(self, token: bytes) -> None:
        """A call counted by `begin` is over (whatever became of the session meanwhile)."""
        with self._lock:
            session = self._sessions.get(hashlib.sha256(token).digest())
            holder = self._holder_of(session) if session is not None else None
            if holder is not None and holder.in_flight > 0:
                holder.in_flight -= 1
                holder.last_seen = self._clock()

    def _holder_of(self, session: _Session) -> _Holder | None:
        holder = self._holders.get(session.peer.party)
        return holder if holder is not None and holder.key == session.key else None

    def _live(self, token: bytes) -> _Session:
        digest = hashlib.sha256(token).digest()
        session = self._sessions.get(digest)
        if session is None:
            raise Rejected("session token unknown: attest again", check=Check.SESSION)
        if self._clock() > session.expires:
            del self._sessions[digest]
            raise Rejected("session expired: attest again", check=Check.SESSION)
        return session


@dataclass(frozen=True)
class AdmissionRequest:
    """What a client sends to be admitted (transport-neutral form of AdmitRequest)."""

    party: str
    job_id: str
    nonce: bytes
    server_cert_sha256: bytes
    certificate_der: bytes
    signature: bytes

    def to_proto(self) -> pb.AdmitRequest:
        """The AdmitRequest that carries this admission (field names are the same)."""
        return pb.AdmitRequest(version=PROTOCOL_VERSION, **dataclasses.asdict(self))

    @classmethod
    def from_proto(cls, message: pb.AdmitRequest) -> AdmissionRequest:
        """The admission an AdmitRequest carries (its version is the caller's to check)."""
        return cls(**{spec.name: getattr(message, spec.name) for spec in dataclasses.fields(cls)})


def build_admission(
    identity: RaTlsIdentity | None, *, nonce: bytes, server_cert_der: bytes, job_id: str, party: str
) -> AdmissionRequest:
    """The client's admission; without identity (mode "server") it carries no evidence."""
    server_hash = hashlib.sha256(server_cert_der).digest()
    if identity is None:
        return AdmissionRequest(party, job_id, nonce, server_hash, b"", b"")
    payload = admission_payload(nonce, server_hash, job_id, party)
    return AdmissionRequest(party, job_id, nonce, server_hash, identity.cert_der, sign_admission(identity, payload))


class Admitter:
    """Server side: verifies admissions against this server's certificate, job and policy."""

    def __init__(self, credentials: PartyCredentials, *, nonces: NonceStore, sessions: SessionStore) -> None:
        if credentials.identity is None:
            raise UsageError("a server needs an RA-TLS identity")
        self._server_cert_sha256 = hashlib.sha256(credentials.identity.cert_der).digest()
        self._job_id = credentials.job_id
        self._policy = credentials.policy
        self._mode = credentials.mode
        self._nonces = nonces
        self._sessions = sessions
        self._collateral = credentials.collateral
        self._at = credentials.at

    def admit(self, request: AdmissionRequest) -> tuple[Peer, bytes]:
        """Verify `request`; returns the admitted peer and its session token."""
        try:
            check_party_name(request.party)
        except UsageError as exc:
            raise FormatError(str(exc)) from exc
        self._nonces.consume(request.nonce)
        if request.server_cert_sha256 != self._server_cert_sha256:
            raise Rejected(
                "admission was made for another server's certificate: "
                f"got {request.server_cert_sha256.hex()[:16]}, this server's is {self._server_cert_sha256.hex()[:16]}",
                check=Check.SERVER_CERTIFICATE,
            )
        if request.job_id != self._job_id:
            raise Rejected(
                f"job id mismatch: got {request.job_id!r}, this server runs {self._job_id!r}", check=Check.JOB_ID
            )
        claims = self._verify_client(request) if self._mode.verifies_client else None
        if claims is None:
            log.warning(
                "INSECURE: admitted party %s without client attestation (mode %s)", request.party, self._mode.value
            )
        else:
            check_party_binding(claims, request.party, self._policy, "client")
            log_verified("admitted party", request.party, claims)
        peer = Peer(request.party, claims)
        return peer, self._sessions.issue(peer, key_id(claims) if claims is not None else None)

    def _verify_client(self, request: AdmissionRequest) -> Claims:
        if not request.certificate_der:
            raise Rejected(
                f"client sent no evidence; this server attests clients (mode {self._mode.value})",
                check=Check.CLIENT_EVIDENCE,
            )
        try:
            cert = load_certificate(request.certificate_der)
        except FormatError as exc:
            raise FormatError(f"client certificate: {exc}") from exc
        key = certificate_public_key(cert)
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            raise KeyBindingRejected("client certificate key is not ECDSA P-384", check=Check.ADMISSION_SIGNATURE)
        payload = admission_payload(request.nonce, request.server_cert_sha256, request.job_id, request.party)
        try:
            key.verify(request.signature, payload, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature as exc:
            raise KeyBindingRejected(
                "admission signature is not by the key of the client's certificate", check=Check.ADMISSION_SIGNATURE
            ) from exc
        claims = verify_certificate(cert, policy=self._policy, collateral=self._collateral, at=self._at)
        check_policy_hash(claims, self._policy, f"party {request.party}")
        return claims
