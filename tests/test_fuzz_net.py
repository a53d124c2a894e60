"""Fuzzing what a peer sends before and after admission, and the collateral a verifier reads:
each input ends in a typed enclavefl error, or is accepted with exactly what the unmutated
input would have given (the same party and claims; the tensors the headers announced)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import dcap_qvl
import numpy as np
import pytest
from conftest import PINNED_TIME, fuzz_settings, shared_file, sim_measurement, sim_policy
from hypothesis import given
from hypothesis import strategies as st

from enclavefl.errors import EnclaveflError, FormatError, Rejected, UsageError
from enclavefl.net import enclavefl_pb2 as pb
from enclavefl.net.admission import (
    AdmissionRequest,
    Admitter,
    Mode,
    NonceStore,
    PartyCredentials,
    SessionStore,
    build_admission,
    make_identity,
)
from enclavefl.net.tensors import (
    Chunk,
    Malformed,
    Message,
    decode_message,
    encode_message,
    parse_frame,
    serialize_frame,
)
from enclavefl.tee.attesters import SimulatedAttester
from enclavefl.tee.claims import Claims
from enclavefl.tee.collateral import OfflineCollateral
from enclavefl.tee.quote import verify_quote

GOOD = sim_measurement(b"fuzz net")
POLICY = sim_policy(GOOD)
JOB = "fuzz-net"
SERVER = PartyCredentials(
    make_identity(SimulatedAttester(GOOD), POLICY, party="server"), POLICY, "server", JOB, Mode.TWO_WAY
)
CLIENT = make_identity(SimulatedAttester(GOOD), POLICY, party="alice")


def _edit(data: bytes, edits: list[tuple[int, int]], cut: int | None, insert: bytes) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        if out:
            out[position % len(out)] = value
    if cut is not None and out:
        del out[cut % len(out) :]
    if insert and out:
        at = len(insert) % len(out)
        out[at:at] = insert
    return bytes(out)


MUTATION = st.tuples(
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4),
    st.one_of(st.none(), st.integers(min_value=0)),
    st.binary(max_size=6),
)


# -- the admission message -------------------------------------------------------------------


def _admitter() -> tuple[Admitter, NonceStore]:
    nonces = NonceStore(rate_per_s=1e9)
    return Admitter(SERVER, nonces=nonces, sessions=SessionStore()), nonces


def _admit(admitter: Admitter, raw: bytes) -> Any:
    try:
        message = pb.AdmitRequest.FromString(raw)
    except Exception as exc:  # the guard's deserializer turns exactly this into a refusal
        assert type(exc).__name__ == "DecodeError", exc
        return Malformed(str(exc))
    request = AdmissionRequest(
        message.party, message.job_id, message.nonce, message.server_cert_sha256, message.certificate_der,
        message.signature,
    )  # fmt: skip
    try:
        return admitter.admit(request)[0]
    except (Rejected, UsageError) as exc:
        assert exc.reason
        return exc


@fuzz_settings(80)
@given(mutation=MUTATION)
def test_mutated_admission_is_refused_or_admits_the_same_peer(mutation: tuple[Any, Any, bytes]) -> None:
    admitter, nonces = _admitter()
    request = build_admission(CLIENT, nonce=nonces.issue(), server_cert_der=SERVER.identity.cert_der, job_id=JOB,  # type: ignore[union-attr]
                              party="alice")  # fmt: skip
    wire = pb.AdmitRequest(
        version=1, party=request.party, job_id=request.job_id, nonce=request.nonce,
        server_cert_sha256=request.server_cert_sha256, certificate_der=request.certificate_der,
        signature=request.signature,
    ).SerializeToString()  # fmt: skip
    reference = _admit(_admitter()[0], wire)  # another server: its nonce is unknown there
    assert isinstance(reference, Rejected) and reference.check == "nonce"
    outcome = _admit(admitter, _edit(wire, *mutation))
    if not isinstance(outcome, (EnclaveflError, Malformed)):
        assert outcome.party == "alice"
        assert outcome.claims == _verified_claims()


def _verified_claims() -> Claims:
    from enclavefl.tee.ratls import verify_certificate

    return verify_certificate(CLIENT.cert_der, policy=POLICY)


@fuzz_settings(100)
@given(party=st.text(max_size=200), job=st.text(max_size=20), nonce=st.binary(max_size=40),
       cert=st.binary(max_size=400), signature=st.binary(max_size=120))  # fmt: skip
def test_random_admission_fields_are_refused(party: str, job: str, nonce: bytes, cert: bytes, signature: bytes) -> None:
    admitter, _ = _admitter()
    wire = pb.AdmitRequest(version=1, party=party, job_id=job, nonce=nonce, certificate_der=cert,
                           signature=signature).SerializeToString()  # fmt: skip
    assert isinstance(_admit(admitter, wire), (EnclaveflError, Malformed))


# -- the tensor stream decoder ---------------------------------------------------------------

ORIGINAL = Message(
    meta={"step": 3, "names": ["a", "b"]},
    tensors={"w": np.arange(24, dtype=np.float32).reshape(4, 6), "i": np.array([1, 2, 3], dtype=np.int64)},
)
WIRE = [serialize_frame(frame) for frame in encode_message(ORIGINAL, method="push", chunk_size=40)]


def _announced(frames: list[Any]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, the bytes of its chunks), as the frames announce them."""
    out: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    name = None
    for frame in frames:
        if isinstance(frame, Chunk):
            dtype, shape, data = out[name]  # type: ignore[index]
            out[name] = (dtype, shape, data + bytes(frame.data))  # type: ignore[index]
        elif frame.WhichOneof("kind") == "tensor":
            name = frame.tensor.name
            out[name] = (frame.tensor.dtype, tuple(frame.tensor.shape), b"")
    return out


@fuzz_settings(150)
@given(
    index=st.integers(min_value=0),
    mutation=MUTATION,
    reorder=st.one_of(st.none(), st.tuples(st.integers(min_value=0), st.integers(min_value=0))),
    drop=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_mutated_tensor_stream_is_refused_or_decodes_what_it_announces(
    index: int, mutation: tuple[Any, Any, bytes], reorder: tuple[int, int] | None, drop: int | None
) -> None:
    wire = list(WIRE)
    wire[index % len(wire)] = _edit(wire[index % len(wire)], *mutation)
    if reorder is not None:
        a, b = reorder[0] % len(wire), reorder[1] % len(wire)
        wire[a], wire[b] = wire[b], wire[a]
    if drop is not None:
        del wire[drop % len(wire)]
    frames = [parse_frame(raw) for raw in wire]
    try:
        method, message = decode_message(iter(frames))
    except FormatError as exc:
        assert exc.reason
        return
    announced = _announced(frames)
    assert set(message.tensors) == set(announced)
    for name, value in message.tensors.items():
        dtype, shape, data = announced[name]
        assert value.shape == shape and value.tobytes() == data
    if wire == WIRE:
        assert method == "push" and message.meta == ORIGINAL.meta


# -- collateral JSON -------------------------------------------------------------------------

JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)),
    max_leaves=6,
)
PIECES = ("tcb_info", "qe_identity")


@pytest.fixture(scope="module")
def sgx_sample() -> tuple[bytes, dict[str, Any], Claims]:
    folder: Path = shared_file("attestation")
    quote = (folder / "sgx_quote").read_bytes()
    doc = json.loads((folder / "sgx_quote_collateral.json").read_text())
    return quote, doc, verify_quote(quote, _Fixed(doc), at=PINNED_TIME)


class _Fixed:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.collateral = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(doc))

    def get(self, quote: bytes, *, at: int) -> Any:
        return self.collateral


@fuzz_settings(40)
@given(piece=st.sampled_from(PIECES), path=st.lists(st.text(max_size=12), min_size=1, max_size=3), value=JSONISH)
def test_mutated_collateral_json_is_refused_or_keeps_the_claims(
    sgx_sample: tuple[bytes, dict[str, Any], Claims], piece: str, path: list[str], value: Any
) -> None:
    quote, doc, claims = sgx_sample
    inner = json.loads(doc[piece])
    node = inner
    keys = list(node)
    # Half the time aim at a field that exists (issueDate, nextUpdate, tcbLevels...).
    first = keys[len(path[0]) % len(keys)] if len(path) % 2 else path[0]
    if len(path) == 1 or not isinstance(node.get(first), dict):
        node[first] = value
    else:
        node[first][path[1]] = value
    mutated = {**doc, piece: json.dumps(inner)}
    with tempfile.TemporaryDirectory() as folder:
        path_ = Path(folder) / "collateral.json"
        path_.write_text(json.dumps(mutated))
        try:
            outcome: Any = verify_quote(quote, OfflineCollateral(path_), at=PINNED_TIME)
        except EnclaveflError as exc:
            assert exc.reason
            return
    assert outcome == claims
