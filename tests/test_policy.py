"""Policy: CCZoo compatibility, strict parsing, check semantics, RA_TLS_* env, digest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from enclavefl.errors import ConfigError, PolicyRejected
from enclavefl.tee.claims import Claims, TeeType
from enclavefl.tee.policy import Policy

MR_A = "1e4f3efafac6038dadaa94fdd248b93c82ae9f0a16642ff4bb07afe442aac56e"
MR_B = "39b02dbf3cd6d6c68eb227a5da019c3721162085116a614ab4be0d1f81199d8f"
SIGNER_X = "5add213ac35413033647621e2fab91edcc8b82f840426803feb8a603be2ce8d4"
SIGNER_Y = "ae483edd52e38b2ef67f3962b75ad47f987db8d3a42d0cd1ca7b6ee4c7035a6e"
MR_TD = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)
RTMRS = ("44" * 48, "00" * 47 + "01", "d8" * 48, "00" * 48)

# The dynamic_config.json CCZoo's PSI/gRPC RA-TLS samples use (their README), values filled in.
CCZOO_DYNAMIC_CONFIG = """{
    "verify_mr_enclave" : "on",
    "verify_mr_signer" : "on",
    "verify_isv_prod_id" : "on",
    "verify_isv_svn" : "on",
    "sgx_mrs": [
        {
            "mr_enclave" : "1e4f3efafac6038dadaa94fdd248b93c82ae9f0a16642ff4bb07afe442aac56e",
            "mr_signer" : "5add213ac35413033647621e2fab91edcc8b82f840426803feb8a603be2ce8d4",
            "isv_prod_id" : "0",
            "isv_svn" : "0"
        }
    ]
}
"""
# CCZoo's template with verification off (tdx-encrypted-tdvm-image ra-server), unfilled.
CCZOO_VERIFY_OFF = """{
    "verify_mr_enclave" : "off",
    "verify_mr_signer" : "off",
    "verify_isv_prod_id" : "off",
    "verify_isv_svn" : "off",
    "sgx_mrs": [
        {
            "mr_enclave" : "",
            "mr_signer" : "",
            "isv_prod_id" : "0",
            "isv_svn" : "0"
        }
    ]
}
"""


def sgx(**fields: Any) -> Claims:
    values: dict[str, Any] = {
        "tee": TeeType.SGX, "report_data": bytes(64), "tcb_status": "UpToDate",
        "mr_enclave": bytes.fromhex(MR_A), "mr_signer": bytes.fromhex(SIGNER_X),
        "isv_prod_id": 0, "isv_svn": 0,
    }  # fmt: skip
    values.update(fields)
    return Claims(**values)


def tdx(**fields: Any) -> Claims:
    values: dict[str, Any] = {
        "tee": TeeType.TDX, "report_data": bytes(64), "tcb_status": "UpToDate",
        "mr_td": bytes.fromhex(MR_TD), "rtmrs": tuple(bytes.fromhex(r) for r in RTMRS),
    }  # fmt: skip
    values.update(fields)
    return Claims(**values)


def simulated(**fields: Any) -> Claims:
    return sgx(tee=TeeType.SIMULATED, tcb_status="SimulatedInsecure", **fields)


def rejected(policy: Policy, claims: Claims) -> tuple[str, str]:
    with pytest.raises(PolicyRejected) as info:
        policy.check(claims)
    return info.value.check, info.value.reason


# -- CCZoo files -----------------------------------------------------------------------------


def test_cczoo_dynamic_config_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "dynamic_config.json"
    path.write_text(CCZOO_DYNAMIC_CONFIG)
    policy = Policy.load(path)
    assert policy.enabled_sgx_fields == ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn")
    entry = policy.sgx_mrs[0]
    assert (entry.mr_enclave, entry.mr_signer, entry.isv_prod_id, entry.isv_svn) == (
        MR_A, SIGNER_X, 0, 0,
    )  # fmt: skip
    assert policy.allowed_tcb_status == ("UpToDate",)
    assert (policy.allow_debug, policy.allow_simulated) == (False, False)
    policy.check(sgx(isv_svn=4))
    assert rejected(policy, sgx(mr_enclave=bytes.fromhex(MR_B)))[0] == "mr_enclave"
    assert rejected(policy, sgx(isv_prod_id=1))[0] == "isv_prod_id"


def test_cczoo_verify_off_template_loads_and_pins_nothing() -> None:
    policy = Policy.from_json(json.loads(CCZOO_VERIFY_OFF))
    assert policy.enabled_sgx_fields == ()
    policy.check(sgx(mr_enclave=bytes(32), isv_prod_id=9))


def test_cczoo_template_left_unfilled_is_config_error() -> None:
    unfilled = json.loads(CCZOO_VERIFY_OFF.replace('"off"', '"on"'))
    with pytest.raises(
        ConfigError, match=r"sgx_mrs\[0\]\.mr_enclave is empty but verify_mr_enclave is on"
    ):
        Policy.from_json(unfilled)


# -- strict parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"verify_mr_enclav": "on"}, "unknown key 'verify_mr_enclav'"),
        ({"allow_debug_enclave": True}, "unknown key 'allow_debug_enclave'"),
        ({"sgx_mrs": [{"mr_enclave": MR_A, "mrsigner": SIGNER_X}]}, "unknown key 'mrsigner' in sgx_mrs[0]"),
        ({"tdx_mrs": [{"rt_mr9": RTMRS[0]}]}, "unknown key 'rt_mr9' in tdx_mrs[0]"),
    ],
)  # fmt: skip
def test_unknown_keys_are_named(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_json(obj)
    assert message in info.value.reason


@pytest.mark.parametrize(
    "obj, field",
    [
        ({"sgx_mrs": [{"mr_enclave": MR_A[:-2]}]}, "sgx_mrs[0].mr_enclave: must be 64 hex characters"),
        ({"sgx_mrs": [{"mr_signer": "zz" * 32}]}, "sgx_mrs[0].mr_signer: must be 64 hex characters"),
        ({"sgx_mrs": [{"mr_enclave": 12}]}, "sgx_mrs[0].mr_enclave: must be a hex string"),
        ({"sgx_mrs": [{}, {"isv_svn": "-1"}]}, "sgx_mrs[1].isv_svn: must be an integer 0..65535"),
        ({"sgx_mrs": [{"isv_prod_id": 70000}]}, "sgx_mrs[0].isv_prod_id: must be within 0..65535"),
        ({"sgx_mrs": [{"isv_prod_id": True}]}, "sgx_mrs[0].isv_prod_id: must be an integer"),
        ({"tdx_mrs": [{"mr_td": MR_A}]}, "tdx_mrs[0].mr_td: must be 96 hex characters (48 bytes)"),
        ({"tdx_mrs": [{}]}, "tdx_mrs[0]: a tdx_mrs entry must give at least one of"),
        ({"verify_mr_signer": "yes"}, "verify_mr_signer: Input should be 'on' or 'off'"),
        ({"allow_debug": "false"}, "allow_debug: Input should be a valid boolean"),
        ({"allowed_tcb_status": ["UpToDate", "OutOfDat"]}, "allowed_tcb_status[1]: unknown TCB status 'OutOfDat'"),
        ({"allowed_tcb_status": ["Revoked"]}, "allowed_tcb_status[0]: Revoked can never be allowed"),
        ({"sgx_mrs": "everyone"}, "sgx_mrs: Input should be a valid tuple"),
    ],
)  # fmt: skip
def test_bad_values_name_the_field(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_json(obj)
    assert field in info.value.reason


def test_from_json_needs_an_object() -> None:
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        Policy.from_json([])  # type: ignore[arg-type]


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy .*absent.json"):
        Policy.load(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"verify_mr_enclave": "on",')
    with pytest.raises(ConfigError, match="policy .*broken.json is not valid JSON"):
        Policy.load(broken)
    typo = tmp_path / "typo.json"
    typo.write_text('{"alow_debug": true}')
    with pytest.raises(ConfigError, match="typo.json: invalid policy: unknown key 'alow_debug'"):
        Policy.load(typo)


def test_absent_verify_flags_follow_the_entries() -> None:
    policy = Policy.from_json({"sgx_mrs": [{"mr_enclave": MR_A, "isv_svn": 2}]})
    assert policy.enabled_sgx_fields == ("mr_enclave", "isv_svn")
    explicit = Policy.from_json({"verify_mr_enclave": "off", "sgx_mrs": [{"mr_enclave": MR_A}]})
    assert explicit.enabled_sgx_fields == ()


# -- check semantics ---------------------------------------------------------------------------


def test_default_policy() -> None:
    policy = Policy.default()
    policy.check(sgx(mr_enclave=bytes(32)))
    policy.check(tdx())
    assert rejected(policy, sgx(tcb_status="SWHardeningNeeded")) == (
        "tcb_status", "TCB status SWHardeningNeeded not allowed (allowed: UpToDate)",
    )  # fmt: skip
    assert rejected(policy, sgx(debug=True)) == ("debug", "debug enclave not allowed by policy")
    assert rejected(policy, tdx(debug=True)) == ("debug", "debug TD not allowed by policy")
    assert rejected(policy, simulated()) == (
        "simulated", "simulated evidence not allowed by policy",
    )  # fmt: skip


def test_any_entry_must_match_all_enabled_fields() -> None:
    policy = Policy.from_json({
        "verify_mr_enclave": "on", "verify_mr_signer": "on",
        "sgx_mrs": [{"mr_enclave": MR_A, "mr_signer": SIGNER_X},
                    {"mr_enclave": MR_B, "mr_signer": SIGNER_Y}],
    })  # fmt: skip
    policy.check(sgx())
    policy.check(sgx(mr_enclave=bytes.fromhex(MR_B), mr_signer=bytes.fromhex(SIGNER_Y)))
    # Each field matches some entry, but no single entry matches both.
    check, reason = rejected(policy, sgx(mr_signer=bytes.fromhex(SIGNER_Y)))
    assert check == "mr_signer"
    assert reason == "mr_signer mismatch: got ae483edd52e3…, policy allows [5add213ac354…]"
    check, reason = rejected(policy, sgx(mr_enclave=bytes(32)))
    assert (
        reason
        == "mr_enclave mismatch: got 000000000000…, policy allows [1e4f3efafac6…, 39b02dbf3cd6…]"
    )


def test_isv_svn_is_a_minimum() -> None:
    policy = Policy.from_values(mr_signer=SIGNER_X, isv_prod_id=0, isv_svn=2)
    policy.check(sgx(isv_svn=2))
    policy.check(sgx(isv_svn=65535))
    assert rejected(policy, sgx(isv_svn=1)) == ("isv_svn", "isv_svn 1 below minimum 2")


def test_verify_on_with_empty_sgx_mrs_rejects_clearly() -> None:
    policy = Policy.from_json({"verify_mr_signer": "on", "sgx_mrs": []})
    assert rejected(policy, sgx()) == (
        "mr_signer", "policy turns verify_mr_signer on but sgx_mrs is empty: no enclave is allowed",
    )  # fmt: skip


def test_debug_and_tcb_allowances() -> None:
    policy = Policy.from_values(
        mr_enclave=MR_A, allowed_tcb_status=["UpToDate", "SWHardeningNeeded"], allow_debug=True
    )
    policy.check(sgx(debug=True, tcb_status="SWHardeningNeeded"))
    assert rejected(policy, sgx(tcb_status="OutOfDate")) == (
        "tcb_status", "TCB status OutOfDate not allowed (allowed: UpToDate, SWHardeningNeeded)",
    )  # fmt: skip


def test_simulated_allowed_skips_tcb_but_not_identity_or_debug() -> None:
    policy = Policy.from_values(mr_enclave=MR_A, allow_simulated=True)
    policy.check(simulated())
    assert rejected(policy, simulated(mr_enclave=bytes.fromhex(MR_B)))[0] == "mr_enclave"
    assert rejected(policy, simulated(debug=True))[0] == "debug"
    # Hardware claims still need an allowed TCB status.
    assert rejected(policy, sgx(tcb_status="OutOfDate"))[0] == "tcb_status"


def test_tdx_identity() -> None:
    policy = Policy.from_json({"tdx_mrs": [{"mr_td": MR_TD, "rtmr1": RTMRS[1]}]})
    policy.check(tdx())
    policy.check(tdx(rtmrs=(bytes(48), bytes.fromhex(RTMRS[1]), bytes(48), bytes(48))))
    check, reason = rejected(policy, tdx(mr_td=bytes(48)))
    assert check == "mr_td" and reason.startswith(
        "mr_td mismatch: got 000000000000…, policy allows [91eb2b44d141…]"
    )
    check, reason = rejected(policy, tdx(rtmrs=(bytes(48),) * 4))
    assert check == "rtmr" and reason.startswith("rtmr1 mismatch: got 000000000000…")


def test_sgx_only_and_tdx_only_policies_refuse_the_other_tee() -> None:
    sgx_only = Policy.from_values(mr_enclave=MR_A)
    assert rejected(sgx_only, tdx()) == (
        "mr_td", "policy pins only SGX identities (sgx_mrs): no TDX guest is allowed",
    )  # fmt: skip
    tdx_only = Policy.from_json({"tdx_mrs": [{"mr_td": MR_TD}]})
    assert rejected(tdx_only, sgx()) == (
        "mr_enclave", "policy pins only TDX identities (tdx_mrs): no SGX enclave is allowed",
    )  # fmt: skip
    both = Policy.from_json({"sgx_mrs": [{"mr_enclave": MR_A}], "tdx_mrs": [{"mr_td": MR_TD}]})
    both.check(sgx())
    both.check(tdx())


# -- Gramine RA_TLS_* environment --------------------------------------------------------------

ANY = {"RA_TLS_MRENCLAVE": "any", "RA_TLS_MRSIGNER": "any",
       "RA_TLS_ISV_PROD_ID": "any", "RA_TLS_ISV_SVN": "any"}  # fmt: skip


def test_ra_tls_env_measurements() -> None:
    env = {"RA_TLS_MRENCLAVE": "any", "RA_TLS_MRSIGNER": SIGNER_X.upper(),
           "RA_TLS_ISV_PROD_ID": "0", "RA_TLS_ISV_SVN": "3"}  # fmt: skip
    policy = Policy.from_ra_tls_env(env)
    assert policy.enabled_sgx_fields == ("mr_signer", "isv_prod_id", "isv_svn")
    policy.check(sgx(mr_enclave=bytes.fromhex(MR_B), isv_svn=3))
    assert rejected(policy, sgx(isv_svn=2)) == ("isv_svn", "isv_svn 2 below minimum 3")
    assert rejected(policy, sgx(tcb_status="SWHardeningNeeded"))[0] == "tcb_status"
    assert rejected(policy, sgx(debug=True))[0] == "debug"


@pytest.mark.parametrize(
    "flags, allowed",
    [
        ({}, {"UpToDate"}),
        ({"HW_CONFIG_NEEDED"}, {"UpToDate", "ConfigurationNeeded"}),
        ({"OUTDATED_TCB_INSECURE"}, {"UpToDate", "OutOfDate"}),
        ({"SW_HARDENING_NEEDED"}, {"UpToDate", "SWHardeningNeeded"}),
        ({"OUTDATED_TCB_INSECURE", "HW_CONFIG_NEEDED"},
         {"UpToDate", "OutOfDate", "ConfigurationNeeded", "OutOfDateConfigurationNeeded"}),
        ({"HW_CONFIG_NEEDED", "SW_HARDENING_NEEDED"},
         {"UpToDate", "ConfigurationNeeded", "SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded"}),
    ],
)  # fmt: skip
def test_ra_tls_env_tcb_flags_follow_gramine(flags: set[str], allowed: set[str]) -> None:
    env = dict(ANY, **{f"RA_TLS_ALLOW_{flag}": "1" for flag in flags})
    assert set(Policy.from_ra_tls_env(env).allowed_tcb_status) == allowed


def test_ra_tls_env_flags_need_exactly_1() -> None:
    env = dict(
        ANY, RA_TLS_ALLOW_DEBUG_ENCLAVE_INSECURE="true", RA_TLS_ALLOW_OUTDATED_TCB_INSECURE="yes"
    )
    policy = Policy.from_ra_tls_env(env)
    assert (policy.allow_debug, policy.allowed_tcb_status) == (False, ("UpToDate",))
    assert Policy.from_ra_tls_env(dict(ANY, RA_TLS_ALLOW_DEBUG_ENCLAVE_INSECURE="1")).allow_debug


def test_ra_tls_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="RA_TLS_ISV_SVN is not set .*'any'"):
        Policy.from_ra_tls_env({k: v for k, v in ANY.items() if k != "RA_TLS_ISV_SVN"})
    with pytest.raises(ConfigError, match="RA_TLS_MRENCLAVE: must be 64 hex characters"):
        Policy.from_ra_tls_env(dict(ANY, RA_TLS_MRENCLAVE="abcd"))
    with pytest.raises(ConfigError, match="RA_TLS_ISV_PROD_ID: must be an integer"):
        Policy.from_ra_tls_env(dict(ANY, RA_TLS_ISV_PROD_ID="0x1"))


# -- digest, round trips -------------------------------------------------------------------------


def test_digest_of_default_policy_is_stable() -> None:
    # Peers compare digests: a change here breaks interoperability with older parties.
    assert Policy.default().digest().hex() == (
        "9f30e8b8c625223d1c43f8a44745ea57119f5e94d5a45c4f2b1e0f3a092ec803"
    )


def test_semantically_equal_policies_hash_equal() -> None:
    cczoo = Policy.from_json(json.loads(CCZOO_DYNAMIC_CONFIG))
    rewritten = Policy.from_json({
        "sgx_mrs": [
            {"isv_svn": 0, "isv_prod_id": 0, "mr_signer": SIGNER_X.upper(), "mr_enclave": MR_A},
            {"isv_svn": "0", "isv_prod_id": "0", "mr_signer": SIGNER_X, "mr_enclave": MR_A.upper()},
        ],
        "allowed_tcb_status": ["UpToDate", "UpToDate"],
        "verify_isv_svn": "on", "verify_isv_prod_id": "on",
        "verify_mr_signer": "on", "verify_mr_enclave": "on",
    })  # fmt: skip
    assert cczoo.digest() == rewritten.digest()
    # Values of fields that are not verified do not matter.
    assert Policy.from_json(json.loads(CCZOO_VERIFY_OFF)).digest() == Policy.default().digest()
    two = [{"mr_enclave": MR_A}, {"mr_enclave": MR_B}]
    assert (
        Policy.from_json({"sgx_mrs": two}).digest()
        == Policy.from_json({"sgx_mrs": two[::-1]}).digest()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"allowed_tcb_status": ["UpToDate", "SWHardeningNeeded"]},
        {"allow_debug": True},
        {"allow_simulated": True},
        {"sgx_mrs": [{"mr_enclave": MR_B}]},
        {"sgx_mrs": [{"mr_enclave": MR_A, "isv_svn": 1}]},
        {"tdx_mrs": [{"mr_td": MR_TD}]},
    ],
)
def test_different_policies_hash_differently(change: dict[str, Any]) -> None:
    base = {"sgx_mrs": [{"mr_enclave": MR_A}]}
    assert Policy.from_json(base).digest() != Policy.from_json({**base, **change}).digest()
    assert len(Policy.from_json(base).digest()) == 32


def test_to_json_round_trip_and_save_load(tmp_path: Path) -> None:
    policy = Policy.from_json({
        **json.loads(CCZOO_DYNAMIC_CONFIG),
        "tdx_mrs": [{"mr_td": MR_TD, "rtmr3": RTMRS[3]}],
        "allowed_tcb_status": ["UpToDate", "SWHardeningNeeded"],
        "allow_debug": True,
    })  # fmt: skip
    assert Policy.from_json(policy.to_json()) == policy
    assert policy.to_json()["tdx_mrs"] == [{"mr_td": MR_TD, "rtmr3": RTMRS[3]}]
    path = tmp_path / "policy.json"
    Policy.default().save(path)
    policy.save(path)  # overwrites atomically
    assert Policy.load(path) == policy
    assert Policy.load(path).digest() == policy.digest()
    assert [p.name for p in tmp_path.iterdir()] == ["policy.json"]


def test_from_values_matches_policy_init_use() -> None:
    policy = Policy.from_values(mr_enclave=bytes.fromhex(MR_A), mr_signer=SIGNER_X, isv_svn=1)
    assert policy.to_json()["sgx_mrs"] == [
        {"mr_enclave": MR_A, "mr_signer": SIGNER_X, "isv_svn": 1}
    ]
    assert policy.enabled_sgx_fields == ("mr_enclave", "mr_signer", "isv_svn")
    assert Policy.from_values().digest() == Policy.default().digest()
    with pytest.raises(ConfigError, match="sgx_mrs\\[0\\].mr_signer"):
        Policy.from_values(mr_signer="nothex")


def test_policy_is_immutable() -> None:
    policy = Policy.default()
    with pytest.raises(ValueError):
        policy.allow_debug = True  # type: ignore[misc]


def test_save_into_missing_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot write policy .*missing/policy.json"):
        Policy.default().save(tmp_path / "missing" / "policy.json")


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_policy_nested_deeply_is_config_error(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"sgx_mrs": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ConfigError, match="deep.json"):
        Policy.load(path)


# -- per-party pins (issue 12, item 4) -------------------------------------------------------------


def test_parties_pin_a_measurement_per_name() -> None:
    policy = Policy.from_json({
        "allow_simulated": True,
        "parties": {"leader": {"sgx_mrs": [{"mr_enclave": MR_A, "isv_svn": 2}]},
                    "td": {"tdx_mrs": [{"mr_td": MR_TD}]}},
    })  # fmt: skip
    policy.check_party("leader", simulated(isv_svn=3))
    policy.check_party("follower", simulated(mr_enclave=bytes.fromhex(MR_B)))  # not listed: the rest applies
    policy.check_party("td", tdx())
    for party, claims in [("leader", simulated(mr_enclave=bytes.fromhex(MR_B), isv_svn=3)),
                          ("leader", simulated(isv_svn=1)), ("leader", tdx()), ("td", simulated())]:  # fmt: skip
        with pytest.raises(PolicyRejected) as info:
            policy.check_party(party, claims)
        assert info.value.check == "party-identity" and repr(party) in info.value.reason


def test_parties_are_part_of_the_digest_only_when_given() -> None:
    base = {"allow_simulated": True}
    pinned = {**base, "parties": {"leader": {"sgx_mrs": [{"mr_enclave": MR_A}]}}}
    other = {**base, "parties": {"leader": {"sgx_mrs": [{"mr_enclave": MR_B}]}}}
    assert Policy.from_json(base).digest() == Policy.from_json({**base, "parties": {}}).digest()
    digests = {Policy.from_json(obj).digest() for obj in (base, pinned, other)}
    assert len(digests) == 3
    again = Policy.from_json(Policy.from_json(pinned).to_json())
    assert again.digest() == Policy.from_json(pinned).digest()


@pytest.mark.parametrize(
    "parties, problem",
    [
        ({"": {"sgx_mrs": [{"mr_enclave": MR_A}]}}, "party names must be"),
        ({"x": {}}, "must list sgx_mrs or tdx_mrs"),
        ({"x": {"sgx_mrs": [{}]}}, "must give at least one of"),
        ({"x": {"sgx_mrs": [{"mr_enclav": MR_A}]}}, "unknown key"),
        ({"x": {"sgx_mrs": [{"mr_enclave": "zz"}]}}, "64 hex"),
        (["x"], "parties"),
    ],
)
def test_bad_parties_are_config_errors(parties: Any, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        Policy.from_json({"parties": parties})


# -- CCZoo's TDX form, debuggable switch and trailing commas (issue 13) -------------------------

# CCZoo's TDX dynamic_config.json (grpc-ra-tls README, TDX backend), values filled in.
CCZOO_TDX_CONFIG = f"""{{
    "verify_mr_seam" : "off",
    "verify_mrsigner_seam" : "off",
    "verify_mr_td" : "on",
    "verify_mr_config_id" : "off",
    "verify_mr_owner" : "off",
    "verify_mr_owner_config" : "off",
    "verify_rt_mr0" : "on",
    "verify_rt_mr1" : "on",
    "verify_rt_mr2" : "on",
    "verify_rt_mr3" : "off",
    "tdx_mrs": [
        {{
            "mr_seam" : "",
            "mrsigner_seam" : "",
            "mr_td" : "{MR_TD}",
            "mr_config_id" : "",
            "mr_owner" : "",
            "mr_owner_config" : "",
            "rt_mr0" : "{RTMRS[0]}",
            "rt_mr1" : "{RTMRS[1]}",
            "rt_mr2" : "{RTMRS[2]}",
            "rt_mr3" : ""
        }}
    ]
}}
"""

# CCZoo's SGX form with the in-enclave verification and debuggable switches (Occlum, grpc_ratls).
CCZOO_SGX_DEBUGGABLE = f"""{{
    "verify_in_enclave" : "on",
    "verify_mr_enclave" : "on",
    "verify_mr_signer" : "off",
    "verify_isv_prod_id" : "off",
    "verify_isv_svn" : "off",
    "verify_enclave_debuggable" : "on",
    "sgx_mrs": [
        {{
            "mr_enclave" : "{MR_A}",
            "mr_signer" : "",
            "isv_prod_id" : 0,
            "isv_svn" : 0,
            "debuggable" : false
        }}
    ]
}}
"""


def test_cczoo_tdx_dynamic_config_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "dynamic_config.json"
    path.write_text(CCZOO_TDX_CONFIG)
    policy = Policy.load(path)
    assert policy.to_json()["tdx_mrs"] == [{"mr_td": MR_TD, "rtmr0": RTMRS[0], "rtmr1": RTMRS[1], "rtmr2": RTMRS[2]}]
    policy.check(tdx(rtmrs=tuple(bytes.fromhex(r) for r in (*RTMRS[:3], "ab" * 48))))  # rt_mr3 is off
    with pytest.raises(PolicyRejected) as info:
        policy.check(tdx(mr_td=bytes(48)))
    assert info.value.check == "mr_td"
    with pytest.raises(PolicyRejected) as info:
        policy.check(tdx(rtmrs=(bytes(48), *(bytes.fromhex(r) for r in RTMRS[1:]))))
    assert info.value.check == "rtmr"
    assert Policy.from_json(policy.to_json()).digest() == policy.digest()


def test_cczoo_tdx_seam_and_owner_fields_are_checked() -> None:
    config = json.loads(CCZOO_TDX_CONFIG)
    config["verify_mr_seam"] = "on"
    with pytest.raises(ConfigError, match=r"tdx_mrs\[0\]\.mr_seam is empty but verify_mr_seam is on"):
        Policy.from_json(config)
    config["tdx_mrs"][0]["mr_seam"] = "5e" * 48
    policy = Policy.from_json(config)
    policy.check(tdx(mr_seam=bytes.fromhex("5e" * 48)))
    with pytest.raises(PolicyRejected) as info:
        policy.check(tdx(mr_seam=bytes(48)))
    assert info.value.check == "mr_seam"


def test_cczoo_verify_in_enclave_and_enclave_debuggable(tmp_path: Path) -> None:
    path = tmp_path / "dynamic_config.json"
    path.write_text(CCZOO_SGX_DEBUGGABLE)
    policy = Policy.load(path)
    policy.check(sgx())
    with pytest.raises(PolicyRejected) as info:
        policy.check(sgx(debug=True))
    assert info.value.check == "debug"
    # An entry with "debuggable": true is an explicit opt-in, and then only debug enclaves match it.
    opted_in = json.loads(CCZOO_SGX_DEBUGGABLE)
    opted_in["sgx_mrs"][0]["debuggable"] = True
    debug_policy = Policy.from_json(opted_in)
    debug_policy.check(sgx(debug=True))
    with pytest.raises(PolicyRejected, match="debug attribute False"):
        debug_policy.check(sgx())
    assert debug_policy.digest() != policy.digest()
    # Where the verification runs does not change what is accepted.
    elsewhere = {**json.loads(CCZOO_SGX_DEBUGGABLE), "verify_in_enclave": "off"}
    assert Policy.from_json(elsewhere).digest() == policy.digest()


def test_trailing_comma_is_refused_at_the_comma(tmp_path: Path) -> None:
    path = tmp_path / "dynamic_config.json"
    path.write_text('{\n    "verify_mr_enclave" : "off",\n    "sgx_mrs": []  ,\n}\n')
    with pytest.raises(ConfigError) as info:
        Policy.load(path)
    assert "trailing comma at line 3 column 20" in info.value.reason
