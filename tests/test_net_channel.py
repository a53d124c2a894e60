"""The attested channel end to end on loopback, with simulated evidence."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import sim_measurement, sim_policy
import torch

from enclavefl.errors import FormatError, KeyBindingRejected, PolicyRejected, Rejected, UsageError
from enclavefl.net import client as client_module
from enclavefl.net import enclavefl_pb2 as pb
from enclavefl.net import enclavefl_pb2_grpc as pb_grpc
from enclavefl.net.admission import AdmissionRequest, Mode, PartyCredentials, Peer, build_admission, make_identity
from enclavefl.net.client import AttestedClient, RetryPolicy, pinned_channel
from enclavefl.net.echo import ECHO_JOB, run_echo_client, start_echo_server
from enclavefl.net.errors import CallFailed, ConnectFailed, HandshakeFailed, PeerRefused
from enclavefl.net.exchange import call, exchange_callable
from enclavefl.net.probe import ProbedCertificate, fetch_certificate, probe_and_verify
from enclavefl.net.server import SESSION_METADATA_KEY, AttestedServer
from enclavefl.net.tensors import Message
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.measure import Measurement
from enclavefl.tee.policy import Policy
from enclavefl.tee.ratls import RaTlsIdentity

GOOD = sim_measurement(b"good enclave")
OTHER = sim_measurement(b"other enclave")
POLICY = sim_policy(GOOD)
JOB = "job-1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def identity(measurement: Measurement = GOOD, policy: Policy = POLICY, party: str = "alice") -> RaTlsIdentity:
    return make_identity(SimulatedAttester(measurement), policy, party=party)


def echo(peer: Peer, request: Message) -> Message:
    return Message(meta={**request.meta, "peer": peer.party, "attested": peer.attested}, tensors=request.tensors)


def make_server(
    *, port: int = 0, measurement: Measurement = GOOD, policy: Policy = POLICY, mode: str = "two-way",
    **kwargs: object,
) -> AttestedServer:  # fmt: skip
    credentials = PartyCredentials(identity(measurement, policy, "server"), policy, "server", JOB, Mode(mode))
    server = AttestedServer(credentials, port=port, **kwargs)  # type: ignore[arg-type]
    server.register("echo", echo)
    server.start()
    return server


_UNSET = object()


def make_client(port: int, *, party: str = "alice", measurement: Measurement = GOOD, policy: Policy = POLICY,
                mode: str = "two-way", me: object = _UNSET, **kwargs: object) -> AttestedClient:  # fmt: skip
    own = identity(measurement, policy, party) if me is _UNSET else me
    credentials = PartyCredentials(own, policy, party, JOB, Mode(mode))  # type: ignore[arg-type]
    kwargs.setdefault("retry", RetryPolicy(max_attempts=4, initial_backoff_s=0.01))
    return AttestedClient(f"127.0.0.1:{port}", credentials, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def server() -> Iterator[AttestedServer]:
    server = make_server()
    yield server
    server.stop(0)


def assert_serves(server: AttestedServer) -> None:
    """A good client still gets through."""
    with make_client(server.port, party="good") as client:
        answer = client.call("echo", Message(meta={"ping": 1}, tensors={"x": np.arange(3)}))
    assert answer.meta == {"ping": 1, "peer": "good", "attested": True}
    np.testing.assert_array_equal(answer.tensors["x"], np.arange(3))


# --- round trips ------------------------------------------------------------------------------


def test_two_way_round_trip_numpy_and_torch(server: AttestedServer) -> None:
    tensors = {
        "f32": np.random.default_rng(0).standard_normal((300, 70)).astype(np.float32),
        "i64": np.arange(-5, 5, dtype=np.int64),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float16),
        "bf16": torch.randn(1000, 3).to(torch.bfloat16),
        "t_f64": torch.randn(2, 2, dtype=torch.float64),
        "t_empty": torch.zeros(0, dtype=torch.int32),
    }
    with make_client(server.port, chunk_size=4096) as client:  # multi-chunk: f32 is ~20 chunks
        peer = client.connect()
        answer = client.call("echo", Message(meta={"step": 7}, tensors=tensors))
    assert peer.party == "server" and peer.attested
    assert peer.claims is not None and peer.claims.mr_enclave == GOOD.mr_enclave
    assert answer.meta == {"step": 7, "peer": "alice", "attested": True}
    for name, value in tensors.items():
        got = answer.tensors[name]
        if isinstance(value, torch.Tensor):
            assert isinstance(got, torch.Tensor) and got.dtype == value.dtype and torch.equal(got, value)
        else:
            assert isinstance(got, np.ndarray) and got.dtype == value.dtype
            np.testing.assert_array_equal(got, value)


def test_server_only_mode_admits_clients_without_evidence(caplog: pytest.LogCaptureFixture) -> None:
    server = make_server(mode="server")
    try:
        with caplog.at_level(logging.WARNING, logger="enclavefl.net"):
            with make_client(server.port, mode="server", me=None) as client:
                answer = client.call("echo", Message())
                assert client.server is not None and client.server.attested
        assert answer.meta == {"peer": "alice", "attested": False}
        assert "without client attestation (mode server)" in caplog.text
    finally:
        server.stop(0)


def test_client_only_mode_pins_without_verifying_the_server() -> None:
    # The server's measurement is not in the policy: mode "client" does not look at it.
    server = make_server(mode="client", measurement=OTHER)
    try:
        with make_client(server.port, mode="client") as client:
            answer = client.call("echo", Message())
            assert client.server == Peer("server", None)
        assert answer.meta == {"peer": "alice", "attested": True}
    finally:
        server.stop(0)


def test_client_without_evidence_is_refused_by_a_two_way_server(server: AttestedServer) -> None:
    with make_client(server.port, mode="server", me=None) as client:
        with pytest.raises(PeerRefused, match="client sent no evidence") as info:
            client.connect()
    assert info.value.check == "client-evidence"
    assert_serves(server)


def test_health_and_readiness(server: AttestedServer) -> None:
    server.set_ready(False)
    with make_client(server.port) as client:
        report = client.health()
        assert (report.ready, report.party, list(report.methods)) == (False, "server", ["echo"])
        with pytest.raises(ConnectFailed, match="reports not ready"):
            client.wait_ready(timeout_s=0.05)
        server.set_ready(True)
        assert client.wait_ready(timeout_s=5).ready


def test_wait_ready_times_out_on_a_closed_port() -> None:
    server = make_server()
    port = server.port
    server.stop(0)
    with make_client(port) as client, pytest.raises(ConnectFailed, match="not ready after"):
        client.wait_ready(timeout_s=0.1)


def test_handler_errors_reach_the_client_typed(server: AttestedServer, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(peer: Peer, request: Message) -> Message:
        raise Rejected("step 3 already committed", check="vfl-protocol")

    def crash(peer: Peer, request: Message) -> Message:
        raise RuntimeError("secret internals")

    def bad(peer: Peer, request: Message) -> Message:
        raise FormatError("tensor w has the wrong shape")

    def unsendable(peer: Peer, request: Message) -> Message:
        return Message(tensors={"s": np.array(["text"])})

    server.register("refuse", refuse)
    server.register("crash", crash)
    server.register("bad", bad)
    server.register("unsendable", unsendable)
    with make_client(server.port) as client:
        with pytest.raises(PeerRefused, match="step 3 already committed") as info:
            client.call("refuse", Message())
        assert info.value.check == "vfl-protocol"
        with caplog.at_level(logging.ERROR, logger="enclavefl.net"):
            with pytest.raises(CallFailed, match="INTERNAL") as failed:
                client.call("crash", Message())
        assert "secret internals" not in failed.value.reason and "secret internals" in caplog.text
        with pytest.raises(UsageError, match="rejected the request as malformed: tensor w has the wrong shape"):
            client.call("bad", Message())
        with pytest.raises(CallFailed, match="no handler for method 'nope'") as missing:
            client.call("nope", Message())
        assert missing.value.code == "UNIMPLEMENTED"
        with pytest.raises(CallFailed, match="INTERNAL"):
            client.call("unsendable", Message())
        with pytest.raises(UsageError, match="cannot be sent"):  # refused before anything is sent
            client.call("echo", Message(tensors={"s": np.array([{}])}))
        assert client.call("echo", Message()).meta["peer"] == "alice"


# --- refusals, each with its reason; the server keeps serving ---------------------------------


def test_client_measurement_not_in_policy(server: AttestedServer) -> None:
    with make_client(server.port, measurement=OTHER) as client:
        with pytest.raises(PeerRefused, match="mr_enclave mismatch") as info:
            client.call("echo", Message())
    assert info.value.check == "mr_enclave"
    assert_serves(server)


def test_server_measurement_not_in_policy() -> None:
    server = make_server(measurement=OTHER)
    try:
        with make_client(server.port) as client:
            with pytest.raises(PolicyRejected, match="mr_enclave mismatch") as info:
                client.call("echo", Message())
        assert info.value.check == "mr_enclave"
    finally:
        server.stop(0)


def test_simulated_evidence_when_not_allowed(server: AttestedServer) -> None:
    strict = Policy.from_values(mr_enclave=GOOD.mr_enclave)
    with pytest.raises(PolicyRejected, match="simulated evidence not allowed") as info:
        probe_and_verify("127.0.0.1", server.port, policy=strict)
    assert info.value.check == "simulated"

    strict_server = make_server(policy=strict, mode="client")
    try:
        with make_client(strict_server.port, mode="client", policy=strict) as client:
            with pytest.raises(PeerRefused, match="simulated evidence not allowed") as refused:
                client.connect()
        assert refused.value.check == "simulated"
    finally:
        strict_server.stop(0)
    assert_serves(server)


def test_different_policy_hash(server: AttestedServer) -> None:
    # Semantically different (also accepts OutOfDate TCBs), so the digests differ.
    looser = Policy.from_values(
        mr_enclave=GOOD.mr_enclave, allow_simulated=True, allowed_tcb_status=["UpToDate", "OutOfDate"]
    )
    with make_client(server.port, policy=looser) as client:  # the client notices first
        with pytest.raises(PolicyRejected, match="policy hash mismatch") as info:
            client.connect()
    assert info.value.check == "policy-hash"
    with make_client(server.port, policy=looser, mode="client") as client:  # and so does the server
        with pytest.raises(PeerRefused, match="policy hash mismatch") as refused:
            client.connect()
    assert refused.value.check == "policy-hash"
    assert_serves(server)


def test_admission_request_round_trips_through_its_protobuf() -> None:
    request = AdmissionRequest("alice", JOB, b"n" * 32, b"h" * 32, b"cert", b"sig")
    message = request.to_proto()
    assert message.version == 1
    assert (message.party, message.job_id, message.signature) == ("alice", JOB, b"sig")
    assert AdmissionRequest.from_proto(pb.AdmitRequest.FromString(message.SerializeToString())) == request


class RawAdmission:
    """Admission RPCs by hand, over a channel pinned to the server's certificate."""

    def __init__(self, server: AttestedServer) -> None:
        self.target = f"127.0.0.1:{server.port}"
        self.probed = fetch_certificate("127.0.0.1", server.port)
        self.channel = pinned_channel(self.target, self.probed, [])
        self.stub = pb_grpc.AdmissionStub(self.channel)

    def nonce(self) -> bytes:
        return self.stub.GetNonce(pb.NonceRequest(version=1)).nonce

    def admit(self, who: RaTlsIdentity | None, nonce: bytes, *, server_cert_der: bytes | None = None,
              signer: RaTlsIdentity | None = None, party: str = "alice") -> pb.AdmitResponse:  # fmt: skip
        request = build_admission(
            who, nonce=nonce, server_cert_der=server_cert_der or self.probed.der, job_id=JOB, party=party
        )
        signature = request.signature
        if signer is not None:  # re-sign with another key
            other = build_admission(
                signer, nonce=nonce, server_cert_der=server_cert_der or self.probed.der, job_id=JOB, party=party
            )
            signature = other.signature
        return self.stub.Admit(dataclasses.replace(request, signature=signature).to_proto())

    def refused(self, *args: object, **kwargs: object) -> tuple[str, str]:
        with pytest.raises(grpc.RpcError) as info:
            self.admit(*args, **kwargs)  # type: ignore[arg-type]
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        check = dict(info.value.trailing_metadata())["enclavefl-check"]
        return check, info.value.details()

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def raw(server: AttestedServer) -> Iterator[RawAdmission]:
    raw = RawAdmission(server)
    yield raw
    raw.close()


def test_replayed_admission(server: AttestedServer, raw: RawAdmission) -> None:
    me = identity()
    nonce = raw.nonce()
    assert len(raw.admit(me, nonce).session_token) == 32
    check, reason = raw.refused(me, nonce)
    assert check == "nonce" and "already used" in reason
    check, reason = raw.refused(me, secrets.token_bytes(32))
    assert check == "nonce"
    assert_serves(server)


def test_expired_nonce() -> None:
    clock = FakeClock()
    server = make_server(clock=clock, nonce_ttl_s=5)
    raw = RawAdmission(server)
    try:
        nonce = raw.nonce()
        clock.now += 6
        check, reason = raw.refused(identity(), nonce)
        assert check == "nonce" and "expired" in reason
    finally:
        raw.close()
        server.stop(0)


def test_admission_signed_by_another_key(server: AttestedServer, raw: RawAdmission) -> None:
    check, reason = raw.refused(identity(), raw.nonce(), signer=identity())
    assert check == "admission-signature"
    assert "not by the key of the client's certificate" in reason
    assert_serves(server)


def test_admission_made_for_another_servers_certificate(server: AttestedServer, raw: RawAdmission) -> None:
    other_server = identity()
    check, reason = raw.refused(identity(), raw.nonce(), server_cert_der=other_server.cert_der)
    assert check == "server-certificate" and "another server's certificate" in reason
    assert_serves(server)


def test_admission_with_a_certificate_bound_to_another_key(server: AttestedServer, raw: RawAdmission) -> None:
    # Evidence and certificate of one party, signature by a key that is not the cert's.
    me, thief = identity(), identity()
    forged = RaTlsIdentity(thief.private_key, me.certificate)
    check, _ = raw.refused(forged, raw.nonce())
    assert check == "admission-signature"
    assert issubclass(KeyBindingRejected, Rejected)
    assert_serves(server)


def test_missing_and_forged_session_tokens(server: AttestedServer) -> None:
    probed = fetch_certificate("127.0.0.1", server.port)
    channel = pinned_channel(f"127.0.0.1:{server.port}", probed, [])
    rpc = exchange_callable(channel)
    try:
        for metadata, reason in (
            ((), "no session token"),
            (((SESSION_METADATA_KEY, secrets.token_bytes(32)),), "session token unknown"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(rpc, "echo", Message(), metadata=metadata)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert reason in info.value.details()
    finally:
        channel.close()
    assert_serves(server)


def test_expired_session_is_refused_and_the_client_reattests(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    server = make_server(clock=clock, session_ttl_s=60)
    try:
        with make_client(server.port) as client:
            assert client.call("echo", Message()).meta["peer"] == "alice"
            token = client._connection.token  # type: ignore[union-attr]
            clock.now += 61
            channel = pinned_channel(client.target, client._connection.probed, [])  # type: ignore[union-attr]
            with pytest.raises(grpc.RpcError) as info:
                call(exchange_callable(channel), "echo", Message(), metadata=((SESSION_METADATA_KEY, token),))
            channel.close()
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "session expired" in info.value.details()
            with caplog.at_level(logging.INFO, logger="enclavefl.net"):
                assert client.call("echo", Message(meta={"again": True})).meta["again"] is True
            assert "UNAUTHENTICATED" in caplog.text and "attesting again" in caplog.text
            assert client._connection.token != token  # type: ignore[union-attr]
    finally:
        server.stop(0)


def test_concurrent_calls_share_one_session_and_survive_its_expiry() -> None:
    clock = FakeClock()
    server = make_server(clock=clock, session_ttl_s=60)
    errors: list[BaseException] = []
    try:
        with make_client(server.port) as client:
            client.connect()

            def worker(index: int) -> None:
                try:
                    for step in range(6):
                        if index == 0 and step == 3:
                            clock.now += 61  # every session now expired, calls in flight or not
                        answer = client.call("echo", Message(meta={"i": index, "s": step},
                                                             tensors={"x": np.full(5000, index)}))  # fmt: skip
                        assert answer.meta["i"] == index and answer.meta["s"] == step
                        np.testing.assert_array_equal(answer.tensors["x"], np.full(5000, index))
                except BaseException as exc:  # collected and re-raised in the test thread
                    errors.append(exc)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        server.stop(0)
    assert errors == []


# --- pinning and restarts -------------------------------------------------------------------


def test_server_replaced_between_probe_and_channel_fails_the_handshake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = make_server()
    port = first.port
    replacement: list[AttestedServer] = []

    def probe_then_swap(host: str, port_: int, *, timeout_s: float) -> ProbedCertificate:
        probed = fetch_certificate(host, port_, timeout_s=timeout_s)
        first.stop(0)
        replacement.append(make_server(port=port))  # a valid party, but another certificate
        return probed

    monkeypatch.setattr(client_module, "fetch_certificate", probe_then_swap)
    try:
        with make_client(port) as client:
            with pytest.raises(HandshakeFailed, match="no longer shows the certificate"):
                client.connect()
        monkeypatch.undo()
        assert_serves(replacement[0])  # probing the replacement itself works
    finally:
        for server in replacement:
            server.stop(0)


def test_client_reconnects_when_its_server_restarts_with_a_new_identity() -> None:
    first = make_server()
    port = first.port
    with make_client(port) as client:
        assert client.call("echo", Message(meta={"n": 1})).meta["n"] == 1
        old = client._connection.probed.sha256  # type: ignore[union-attr]
        first.stop(0)
        second = make_server(port=port)
        try:
            answer = client.call("echo", Message(meta={"n": 2}, tensors={"x": np.ones(4)}))
            assert answer.meta["n"] == 2
            assert client._connection.probed.sha256 != old  # type: ignore[union-attr]
        finally:
            second.stop(0)


def test_unreachable_server_is_a_typed_error_after_bounded_retries() -> None:
    server = make_server()
    port = server.port
    server.stop(0)
    with make_client(port, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.001)) as client:
        with pytest.raises(ConnectFailed, match="gave up after 3 attempts"):
            client.call("echo", Message())


# --- logs, probe, echo ------------------------------------------------------------------------


def test_logs_admitted_peers_and_insecure_evidence_but_never_secrets(caplog: pytest.LogCaptureFixture) -> None:
    me = identity()
    with caplog.at_level(logging.DEBUG):
        server = make_server()
        try:
            with make_client(server.port, me=me) as client:
                client.call("echo", Message())
                token = client._connection.token  # type: ignore[union-attr]
        finally:
            server.stop(0)
    net = [r for r in caplog.records if r.name == "enclavefl.net"]
    admitted = [r for r in net if r.levelno == logging.INFO and "admitted party alice attested" in r.getMessage()]
    assert len(admitted) == 1
    assert f"mr_enclave={GOOD.mr_enclave.hex()[:12]}" in admitted[0].getMessage()
    assert "tcb=SimulatedInsecure" in admitted[0].getMessage()
    insecure = [r for r in net if r.levelno == logging.WARNING and "INSECURE" in r.getMessage()]
    assert any("simulated evidence" in r.getMessage() and "alice" in r.getMessage() for r in insecure)
    assert any("simulated evidence" in r.getMessage() and "server" in r.getMessage() for r in insecure)
    text = caplog.text
    for secret in (token.hex(), repr(token), me.key_pem().decode()):
        assert secret not in text


def test_probe_and_verify_returns_the_server_claims(server: AttestedServer) -> None:
    claims = probe_and_verify("127.0.0.1", server.port, policy=POLICY, require_policy_hash=True)
    assert claims.mr_enclave == GOOD.mr_enclave
    assert claims.bound["policy-hash"] == POLICY.digest()
    with pytest.raises(ConnectFailed):
        probe_and_verify("127.0.0.1", 1, policy=POLICY)


def test_echo_server_and_client() -> None:
    attester = SimulatedAttester(GOOD)
    server = start_echo_server(PartyCredentials.create(attester, POLICY, party="echo-server", job_id=ECHO_JOB))
    try:
        client = PartyCredentials.create(attester, POLICY, party="echo-client", job_id=ECHO_JOB)
        result = run_echo_client(f"127.0.0.1:{server.port}", client, megabytes=3)
    finally:
        server.stop(0)
    assert result.server.party == "echo-server"
    assert result.server.claims is not None and result.server.claims.mr_enclave == GOOD.mr_enclave
    assert result.megabytes == 3.0 and result.throughput_mb_s > 0
    assert result.to_json()["server_claims"]["mr_enclave"] == GOOD.mr_enclave.hex()


def test_a_second_server_on_a_busy_port_fails_to_start() -> None:
    first = make_server()
    try:
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            make_server(port=first.port)
    finally:
        first.stop(0)
