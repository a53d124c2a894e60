"""The attested channel under abuse: stalled and flooding unauthenticated calls, nonce
floods, garbage and oversized messages, hostile shapes and meta from an authenticated peer.

Timings are not asserted here (bench/bench_flood.py measures them); these tests assert
that the job completes and that good peers are admitted while the abuse goes on.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import tracemalloc
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import sim_credentials, sim_measurement, sim_policy
import torch
import torch.nn.functional as F
from flood import StalledFlood

from enclavefl.errors import FormatError, Rejected, UsageError
from enclavefl.hfl.server import ParameterServer
from enclavefl.hfl.registry import make_strategy
from enclavefl.hfl.worker import Worker
from enclavefl.models import mlp
from enclavefl.net import enclavefl_pb2 as pb
from enclavefl.net.admission import Mode, NonceStore, PartyCredentials, make_identity
from enclavefl.net.client import AttestedClient, RetryPolicy, pinned_channel
from enclavefl.net.exchange import exchange_callable
from enclavefl.net.errors import PartyNameHeld, PeerRefused
from enclavefl.net.guard import OpenCallGuard, OpenLimits, source_of
from enclavefl.net.probe import fetch_certificate
from enclavefl.net.server import SESSION_METADATA_KEY, AttestedServer
from enclavefl.net.tensors import PROTOCOL_VERSION, Chunk, LazyTensor, Message, decode_message
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.measure import Measurement
from enclavefl.tee.policy import Policy

GOOD = sim_measurement(b"hardened enclave")
POLICY = sim_policy(GOOD)
JOB = "hardening"


def credentials(party: str) -> PartyCredentials:
    return sim_credentials(party, GOOD, POLICY, JOB)


def client(port: int, party: str, host: str = "127.0.0.1") -> AttestedClient:
    return AttestedClient(
        f"{host}:{port}", credentials(party), retry=RetryPolicy(max_attempts=5, initial_backoff_s=0.05)
    )


def echo(peer: object, request: Message) -> Message:
    return request


@pytest.fixture
def server() -> Iterator[AttestedServer]:
    # "[::]" takes IPv4 and IPv6: floods come from ::1, good peers from 127.0.0.1, so the
    # two are different sources, as an attacker and a worker on different hosts are.
    server = AttestedServer(credentials("server"), host="[::]", open_limits=OpenLimits(request_timeout_s=1.0))
    server.register("echo", echo)
    server.start()
    yield server
    server.stop(grace_s=0)


def open_channel(port: int) -> grpc.Channel:
    return pinned_channel(f"127.0.0.1:{port}", fetch_certificate("127.0.0.1", port), [])


def raw_call(channel: grpc.Channel, method: str, payload: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method)(payload, timeout=10)
    return info.value


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- item 1: stalled unauthenticated calls --------------------------------------------------


def test_source_of_groups_by_address() -> None:
    assert source_of("ipv4:10.0.0.1:5000") == "10.0.0.1"
    assert source_of("ipv6:%5B::ffff:10.0.0.1%5D:5000") == "10.0.0.1"
    assert source_of("ipv6:[2001:db8::1]:1") == source_of("ipv6:[2001:db8::2]:2") == "2001:db8::/64"
    assert source_of("unix:/tmp/sock") == "unix:/tmp/sock"


def test_stalled_calls_are_cancelled_and_limited_per_source(server: AttestedServer) -> None:
    with StalledFlood(f"[::1]:{server.port}", calls=40, connections=2) as flood:
        time.sleep(1.6)  # past the 1 s request timeout
        held = flood.held
    limits = server._guard.limits
    assert flood.ended["RESOURCE_EXHAUSTED"] > 0  # beyond the per-source cap: refused at once
    assert flood.ended["CANCELLED"] > 0  # within it: cancelled after the timeout
    assert held <= 40
    assert server._guard.refused > 0 and limits.max_calls_per_source < 40
    # Refused on gRPC's serving thread, without a pool thread each (what keeps a flood cheap;
    # this fails if a gRPC upgrade changes what the guard's pool is handed).
    assert server._guard.refused_inline > 0


def test_open_pool_runs_anything_else_on_its_threads() -> None:
    guard = OpenCallGuard(OpenLimits(max_calls=1, max_calls_per_source=1))
    try:
        ran_on = guard._pool.submit(threading.current_thread).result(timeout=10)
        assert ran_on is not threading.current_thread()
    finally:
        guard.close()


def _blobs(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (rows,), generator=g)
    return torch.randn(rows, 6, generator=g) + F.one_hot(y, 6).float() * 2, y


@pytest.mark.integration  # end to end (parties over gRPC, or subprocesses): `make test`, not `make test-unit`
def test_job_completes_and_good_peer_is_admitted_under_1000_stalled_calls(server: AttestedServer) -> None:
    """Issue 12 item 1: 16 stalled Health calls used to hold every server thread."""
    torch.manual_seed(0)
    model = mlp(6, (8,), 3)
    strategy = make_strategy("fedavg", copy.deepcopy(model))
    workers = ["w1", "w2", "w3"]
    ps = ParameterServer(server, strategy, workers=workers, total=3, round_timeout_s=60)
    errors: dict[str, BaseException] = {}

    def work(party: str, seed: int) -> None:
        try:
            Worker.for_model(
                client(server.port, party), copy.deepcopy(model), _blobs(32, seed), batch_size=8, lr=0.1
            ).run()
        except BaseException as exc:  # reported below
            errors[party] = exc

    with StalledFlood(f"[::1]:{server.port}", calls=1000, connections=10) as flood:
        threads = [threading.Thread(target=work, args=(p, i), daemon=True) for i, p in enumerate(workers)]
        for thread in threads:
            thread.start()
        summary = ps.run()
        for thread in threads:
            thread.join(timeout=60)
        newcomer = client(server.port, "newcomer")
        assert newcomer.connect().party == "server"  # admitted while the flood is held
        newcomer.close()
        assert flood.opened >= 1000
    assert not errors, errors
    assert summary["version"] == 3
    assert server._guard.refused > 0


# -- item 2: nonce floods ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nonce_flood_from_one_source_evicts_only_its_own_nonces() -> None:
    clock = Clock()
    store = NonceStore(capacity=100, per_source=10, rate_per_s=1e9, clock=clock)
    good = store.issue("10.0.0.1")
    for _ in range(5000):
        clock.now += 1e-6  # 5000 nonces in 5 ms
        store.issue("10.0.0.66")
    assert len(store) <= 100
    store.consume(good)  # still there


def test_nonce_store_capacity_evicts_from_the_largest_source() -> None:
    clock = Clock()
    store = NonceStore(capacity=20, per_source=20, rate_per_s=1e9, clock=clock)
    good = store.issue("10.0.0.1")
    for _ in range(19):
        store.issue("10.0.0.66")
    for i in range(50):
        clock.now += 1e-6
        store.issue(f"10.1.0.{i % 3}")
    assert len(store) == 20
    store.consume(good)


def test_nonce_issuance_is_rate_limited_per_source() -> None:
    clock = Clock()
    store = NonceStore(per_source=5, rate_per_s=2.0, clock=clock)
    for _ in range(5):
        store.issue("10.0.0.66")
    with pytest.raises(Rejected) as info:
        store.issue("10.0.0.66")
    assert info.value.check == "rate-limit"
    store.issue("10.0.0.1")  # other sources are not affected
    clock.now += 0.5
    store.issue("10.0.0.66")  # one more token after 0.5 s at 2/s


def test_good_client_is_admitted_under_a_nonce_flood(server: AttestedServer) -> None:
    stop = threading.Event()
    issued = [0]

    def flood() -> None:
        channel = pinned_channel(f"[::1]:{server.port}", fetch_certificate("::1", server.port), [])
        get = channel.unary_unary(
            "/enclavefl.v1.Admission/GetNonce", request_serializer=pb.NonceRequest.SerializeToString
        )
        while not stop.is_set():
            try:
                get(pb.NonceRequest(version=PROTOCOL_VERSION), timeout=5)
                issued[0] += 1
            except grpc.RpcError:
                pass  # rate-limited: the flood goes on
        channel.close()

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        for i in range(3):
            good = client(server.port, f"good-{i}")
            assert good.connect().party == "server"
            good.close()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert issued[0] > 0


def test_client_retries_once_with_a_fresh_nonce(server: AttestedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    store = server._nonces
    real = store.consume
    refused: list[bytes] = []

    def evicted_once(nonce: bytes) -> None:
        if not refused:
            refused.append(nonce)
            raise Rejected("admission nonce unknown or already used", check="nonce")
        real(nonce)

    monkeypatch.setattr(store, "consume", evicted_once)
    good = client(server.port, "alice")
    assert good.connect().party == "server"
    assert len(refused) == 1


# -- items 7 and 9: garbage before admission, hostile input after it -----------------------------


@pytest.mark.parametrize(
    "method", ["/enclavefl.v1.Admission/Admit", "/enclavefl.v1.Admission/GetNonce", "/enclavefl.v1.Health/Check"]
)
@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12" + b"\xff" * 9 + b"\x01"])
def test_garbage_before_admission_is_one_warning_naming_the_peer(
    server: AttestedServer, caplog: pytest.LogCaptureFixture, method: str, payload: bytes
) -> None:
    caplog.set_level(logging.INFO)
    channel = open_channel(server.port)
    error = raw_call(channel, method, payload)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert not errors_logged(caplog)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "malformed" in r.getMessage()]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0].getMessage()
    channel.close()


def test_oversized_admission_is_refused_without_a_traceback(
    server: AttestedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    channel = open_channel(server.port)
    big = pb.AdmitRequest(version=PROTOCOL_VERSION, party="p", certificate_der=b"\x00" * (2 << 20))
    error = raw_call(channel, "/enclavefl.v1.Admission/Admit", big.SerializeToString())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "allowed" in (error.details() or "")
    assert server._guard.limits.max_request_bytes < 1 << 20  # well below 16 MiB
    assert not errors_logged(caplog)
    channel.close()


def test_admission_with_invalid_x509_version_is_refused_cleanly(
    server: AttestedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    channel = open_channel(server.port)
    nonce = channel.unary_unary(
        "/enclavefl.v1.Admission/GetNonce",
        request_serializer=pb.NonceRequest.SerializeToString,
        response_deserializer=pb.NonceResponse.FromString,
    )(pb.NonceRequest(version=PROTOCOL_VERSION), timeout=10)
    der = credentials("mallory").identity.cert_der  # type: ignore[union-attr]
    at = der.find(bytes([0xA0, 0x03, 0x02, 0x01, 0x02]))
    request = pb.AdmitRequest(
        version=PROTOCOL_VERSION, party="mallory", job_id=JOB, nonce=nonce.nonce,
        server_cert_sha256=fetch_certificate("127.0.0.1", server.port).sha256,
        certificate_der=der[: at + 4] + b"\x07" + der[at + 5 :], signature=b"sig",
    )  # fmt: skip
    error = raw_call(channel, "/enclavefl.v1.Admission/Admit", request.SerializeToString())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid X509 version" in (error.details() or "")
    assert not errors_logged(caplog)
    channel.close()


def _authenticated_frames(server: AttestedServer, frames: list[pb.Frame]) -> grpc.RpcError:
    good = client(server.port, "alice")
    good.connect()
    connection = good._connection
    assert connection is not None
    responses = exchange_callable(connection.channel)(
        iter(frames), metadata=((SESSION_METADATA_KEY, connection.token),), timeout=10
    )
    with pytest.raises(grpc.RpcError) as info:
        list(responses)
    good.close()
    return info.value


def test_zero_sized_tensor_with_a_huge_dimension_is_invalid_argument(
    server: AttestedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    header = pb.Frame(header=pb.CallHeader(version=PROTOCOL_VERSION, method="echo", meta_json="{}", tensor_count=1))
    tensor = pb.Frame(
        tensor=pb.TensorHeader(version=PROTOCOL_VERSION, name="t", dtype="float32", shape=[0, 2**63], nbytes=0,
                               kind="numpy")
    )  # fmt: skip
    error = _authenticated_frames(server, [header, tensor])
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert not errors_logged(caplog)
    # And through the client API, as any sender would declare it.
    good = client(server.port, "bob")
    with pytest.raises(UsageError, match="exceeds limit"):
        good.call("echo", Message(tensors={"t": LazyTensor("float32", (0, 2**62), lambda: [])}))
    good.close()


def test_deeply_nested_meta_is_invalid_argument(server: AttestedServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    meta = '{"a":' + "[" * 200_000 + "]" * 200_000 + "}"
    header = pb.Frame(header=pb.CallHeader(version=PROTOCOL_VERSION, method="echo", meta_json=meta, tensor_count=0))
    error = _authenticated_frames(server, [header])
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "nested too deeply" in (error.details() or "")
    assert not errors_logged(caplog)


def test_garbage_frame_from_an_authenticated_peer_is_invalid_argument(
    server: AttestedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    good = client(server.port, "alice")
    good.connect()
    connection = good._connection
    assert connection is not None
    raw = connection.channel.stream_stream("/enclavefl.v1.Exchange/Call")
    with pytest.raises(grpc.RpcError) as info:
        list(raw(iter([b"\x0a\xff\xff\xff"]), metadata=((SESSION_METADATA_KEY, connection.token),), timeout=10))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert not errors_logged(caplog)
    good.close()


def test_receive_path_allocates_only_what_arrives() -> None:
    """A header announcing 1 GiB and 1 KiB of data costs about 1 KiB, not 1 GiB."""
    header = pb.Frame(header=pb.CallHeader(version=PROTOCOL_VERSION, method="m", meta_json="{}", tensor_count=1))
    tensor = pb.Frame(
        tensor=pb.TensorHeader(version=PROTOCOL_VERSION, name="t", dtype="uint8", shape=[1 << 30], nbytes=1 << 30,
                               kind="numpy")
    )  # fmt: skip
    chunk = Chunk(0, b"\x01" * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="stream ended after 1024"):
            decode_message(iter([header, tensor, chunk]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_received_arrays_are_writable_and_exact() -> None:
    from enclavefl.net.tensors import encode_message

    value = np.arange(12, dtype=np.complex128).reshape(3, 4)
    _, message = decode_message(
        iter(encode_message(Message(tensors={"v": value, "e": np.zeros((0, 5))}), chunk_size=7))
    )
    assert np.array_equal(message.tensors["v"], value) and message.tensors["v"].flags.writeable
    assert message.tensors["e"].shape == (0, 5)


# -- item 4: party names are bound to the evidence ------------------------------------------------

OTHER = sim_measurement(b"another build")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def named_client(port: int, party: str, *, binds: str | None = None, measurement: Measurement = GOOD,
                 policy: Policy = POLICY) -> AttestedClient:  # fmt: skip
    me = make_identity(SimulatedAttester(measurement), policy, party=party if binds is None else binds)
    credentials = PartyCredentials(me, policy, party, JOB, Mode.TWO_WAY)
    return AttestedClient(f"127.0.0.1:{port}", credentials, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01))


def test_one_attested_identity_cannot_take_another_name(server: AttestedServer) -> None:
    with pytest.raises(PeerRefused) as info:
        named_client(server.port, "worker-2", binds="worker-1").connect()
    assert info.value.check == "party-name" and "'worker-1'" in info.value.reason
    unnamed = PartyCredentials(make_identity(SimulatedAttester(GOOD), POLICY), POLICY, "worker-2", JOB)
    with pytest.raises(PeerRefused, match="binds no party name"):
        AttestedClient(f"127.0.0.1:{server.port}", unnamed, retry=RetryPolicy(max_attempts=1)).connect()
    assert named_client(server.port, "worker-1").connect().party == "server"


def test_client_refuses_a_server_whose_evidence_binds_another_name() -> None:
    lying = PartyCredentials(make_identity(SimulatedAttester(GOOD), POLICY, party="ps"), POLICY, "server", JOB)
    server = AttestedServer(lying)
    server.start()
    try:
        with pytest.raises(Rejected) as info:
            named_client(server.port, "alice").connect()
        assert info.value.check == "party-name"
    finally:
        server.stop(0)


def test_a_name_held_by_a_live_key_is_refused_to_another_until_idle() -> None:
    clock = FakeClock()
    server = AttestedServer(credentials("server"), session_hold_s=10, clock=clock)
    release, entered = threading.Event(), threading.Event()

    def block(peer: object, request: Message) -> Message:
        entered.set()
        assert release.wait(30)
        return request

    server.register("echo", echo)
    server.register("block", block)
    server.start()
    try:
        real, second = named_client(server.port, "host-2"), named_client(server.port, "host-2")
        real.call("echo", Message(meta={"i": 1}))
        with pytest.raises(PartyNameHeld, match="held by another attested key"):
            second.connect()
        # A call in progress holds the name however long it runs.
        waiting = threading.Thread(target=lambda: real.call("block", Message()), daemon=True)
        waiting.start()
        assert entered.wait(10)
        clock.now += 60
        with pytest.raises(PartyNameHeld):
            second.connect()
        release.set()
        waiting.join(10)
        with pytest.raises(PartyNameHeld):  # just used: still held
            second.connect()
        clock.now += 11  # idle longer than session_hold_s: the name passes, the old sessions end
        assert second.connect().party == "server"
        with pytest.raises(PartyNameHeld):
            real.call("echo", Message())
        assert server.admitted()["host-2"].claims == second_claims(second)
    finally:
        server.stop(0)


def second_claims(client_: AttestedClient) -> object:
    from enclavefl.tee.ratls import verify_certificate

    return verify_certificate(client_._identity.cert_der, policy=POLICY)  # type: ignore[union-attr]


def test_policy_pins_a_measurement_per_party_name() -> None:
    policy = Policy.from_json({
        "sgx_mrs": [{"mr_enclave": GOOD.mr_enclave.hex()}, {"mr_enclave": OTHER.mr_enclave.hex()}],
        "allow_simulated": True,
        "parties": {"leader": {"sgx_mrs": [{"mr_enclave": GOOD.mr_enclave.hex()}]}},
    })  # fmt: skip
    own = PartyCredentials(make_identity(SimulatedAttester(GOOD), policy, party="server"), policy, "server", JOB)
    server = AttestedServer(own)
    server.start()
    try:
        with pytest.raises(PeerRefused) as info:
            named_client(server.port, "leader", measurement=OTHER, policy=policy).connect()
        assert info.value.check == "party-identity"
        assert named_client(server.port, "follower", measurement=OTHER, policy=policy).connect().party == "server"
        assert named_client(server.port, "leader", policy=policy).connect().party == "server"
    finally:
        server.stop(0)


def test_unreadable_privacy_claim_of_a_peer_is_named_not_raised() -> None:
    from enclavefl.net.admission import check_policy_hash
    from enclavefl.tee.claims import Claims, TeeType

    nested = b'{"unit": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    claims = Claims(TeeType.SIMULATED, bytes(64), "SimulatedInsecure", bound={"privacy-budget": nested})
    with pytest.raises(Rejected, match="unreadable privacy budget"):
        check_policy_hash(claims, POLICY, "peer")
