"""Fuzzing: quote and policy parsing end in an enclavefl error or a right result, never a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import PINNED_TIME, fuzz_settings, shared_file
from hypothesis import given
from hypothesis import strategies as st

from enclavefl.errors import ConfigError, EnclaveflError, FormatError, PolicyRejected
from enclavefl.tee.claims import Claims, TeeType
from enclavefl.tee.collateral import OfflineCollateral
from enclavefl.tee.policy import SGX_FIELDS, TCB_STATUSES, TDX_FIELDS, Policy
from enclavefl.tee.quote import verify_quote

FUZZ = fuzz_settings(150)


def _sample(name: str) -> tuple[bytes, OfflineCollateral, Claims]:
    folder: Path = shared_file("attestation")
    quote = (folder / f"{name}_quote").read_bytes()
    collateral = OfflineCollateral(folder / f"{name}_quote_collateral.json")
    return quote, collateral, verify_quote(quote, collateral, at=PINNED_TIME)


@pytest.fixture(scope="module", params=["sgx", "tdx"])
def sample(request: pytest.FixtureRequest) -> tuple[bytes, OfflineCollateral, Claims]:
    return _sample(request.param)


def _verify_or_error(quote: bytes, collateral: OfflineCollateral) -> Claims | EnclaveflError:
    try:
        return verify_quote(quote, collateral, at=PINNED_TIME)
    except EnclaveflError as exc:
        assert exc.reason  # every refusal says why
        return exc


@FUZZ
@given(data=st.binary(max_size=6000))
def test_random_bytes_never_verify(
    sample: tuple[bytes, OfflineCollateral, Claims], data: bytes
) -> None:
    _, collateral, _ = sample
    assert isinstance(_verify_or_error(data, collateral), EnclaveflError)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=6
    ),
    header_bias=st.booleans(),
)
def test_mutated_quote_is_refused_or_keeps_its_claims(
    sample: tuple[bytes, OfflineCollateral, Claims],
    edits: list[tuple[int, int]],
    header_bias: bool,
) -> None:
    quote, collateral, claims = sample
    mutated = bytearray(quote)
    # Half the runs aim at the header, report and signature-data lengths where parsing lives.
    span = 1100 if header_bias else len(quote)
    for position, value in edits:
        mutated[position % span] = value
    outcome = _verify_or_error(bytes(mutated), collateral)
    if isinstance(outcome, Claims):
        # Everything claims are made of is signed, so an accepted edit changed nothing claimed.
        assert outcome == claims


@FUZZ
@given(length=st.integers(min_value=0, max_value=6000))
def test_truncated_quote(sample: tuple[bytes, OfflineCollateral, Claims], length: int) -> None:
    quote, collateral, claims = sample
    length %= len(quote)
    outcome = _verify_or_error(quote[:length], collateral)
    # The TDX sample ends in 70 bytes of zero padding that may go; nothing else may.
    assert outcome == claims if isinstance(outcome, Claims) else isinstance(outcome, FormatError)


HEX32 = st.one_of(st.just("ab" * 32), st.text("0123456789abcdefABCDEFxz", max_size=70))
HEX48 = st.one_of(st.just("cd" * 48), st.text("0123456789abcdef", max_size=100))
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.sampled_from(["on", "off", "", "0", "65535", "65536", "any"]),
)  # fmt: skip
JSONISH = st.recursive(
    SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
SGX_ENTRY = st.dictionaries(
    st.sampled_from(SGX_FIELDS + ("config_svn",)),
    st.one_of(HEX32, SCALAR),
    max_size=5,
)
TDX_ENTRY = st.dictionaries(
    st.sampled_from(TDX_FIELDS + ("rt_mr0",)), st.one_of(HEX48, SCALAR), max_size=6
)
POLICY_KEYS = {
    **{f"verify_{name}": st.one_of(st.sampled_from(["on", "off"]), SCALAR) for name in SGX_FIELDS},
    "sgx_mrs": st.one_of(st.lists(SGX_ENTRY, max_size=3), JSONISH),
    "tdx_mrs": st.one_of(st.lists(TDX_ENTRY, max_size=2), JSONISH),
    "allowed_tcb_status": st.one_of(
        st.lists(st.sampled_from(TCB_STATUSES + ("Revoked", "uptodate")), max_size=4), JSONISH
    ),
    "allow_debug": st.one_of(st.booleans(), SCALAR),
    "allow_simulated": st.one_of(st.booleans(), SCALAR),
    "verify_mr_enclav": SCALAR,
    "parties": st.one_of(
        st.dictionaries(
            st.one_of(st.sampled_from(["leader", "w1"]), st.text(max_size=4)),
            st.one_of(st.fixed_dictionaries({}, optional={"sgx_mrs": st.lists(SGX_ENTRY, max_size=2),
                                                          "tdx_mrs": st.lists(TDX_ENTRY, max_size=2)}), JSONISH),
            max_size=2,
        ),
        JSONISH,
    ),  # fmt: skip
}
POLICY_OBJECTS = st.one_of(
    st.fixed_dictionaries({}, optional=POLICY_KEYS),
    st.dictionaries(st.text(max_size=12), JSONISH, max_size=4),
    JSONISH,
)
CLAIMS = st.builds(
    Claims,
    tee=st.sampled_from(list(TeeType)),
    report_data=st.binary(min_size=64, max_size=64),
    tcb_status=st.sampled_from(TCB_STATUSES + ("SimulatedInsecure",)),
    mr_enclave=st.sampled_from([b"", bytes.fromhex("ab" * 32), bytes(32)]),
    mr_signer=st.sampled_from([b"", bytes(32)]),
    isv_prod_id=st.integers(0, 0xFFFF),
    isv_svn=st.integers(0, 0xFFFF),
    debug=st.booleans(),
    mr_td=st.sampled_from([b"", bytes.fromhex("cd" * 48)]),
    rtmrs=st.lists(st.sampled_from([bytes(48), bytes.fromhex("cd" * 48)]), max_size=4).map(tuple),
)


@FUZZ
@given(obj=POLICY_OBJECTS, claims=CLAIMS)
def test_policy_parser_and_check(obj: Any, claims: Claims) -> None:
    try:
        policy = Policy.from_json(obj)
    except ConfigError as exc:
        assert exc.reason
        return
    assert Policy.from_json(policy.to_json()).digest() == policy.digest()
    for party in ("leader", "w1"):
        try:
            policy.check_party(party, claims)
        except PolicyRejected as exc:
            assert exc.check == "party-identity" and party in policy.parties
    try:
        policy.check(claims)
    except PolicyRejected as exc:
        assert exc.check in {"mr_enclave", "mr_signer", "isv_prod_id", "isv_svn", "tcb_status",
                             "debug", "simulated", "mr_td", "rtmr", "mr_seam", "mr_signer_seam",
                             "mr_config_id", "mr_owner", "mr_owner_config"}  # fmt: skip
