"""Sample alignment: tee-join and ecdh-psi, driven in one process over their wire form."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavefl.errors import FormatError, Rejected, UsageError
from enclavefl.vfl.align import (
    AlignmentResult,
    IdKind,
    canonical_order,
    duplicate_pair,
    hash_ids,
    lex_order,
    match_rows,
)
from enclavefl.vfl.plan import TRAIN, Plan, validation_split
from enclavefl.vfl.psi import (
    EcdhPsiFollower,
    EcdhPsiLeader,
    PsiFollowerReply,
    PsiHello,
    PsiLeaderReply,
    hash_to_points,
    scalarmult_rows,
)
from enclavefl.vfl.teejoin import TeeJoinFollower, TeeJoinHello, TeeJoinIds, TeeJoinLeader, TeeJoinResult

# Every message that would cross the wire: (sender, receiver, tensors).
Transcript = list[tuple[str, str, dict[str, np.ndarray]]]


def over_wire(message: Any, cls: Any, sender: str, receiver: str, transcript: Transcript) -> Any:
    """What the receiver gets: the message rebuilt from copies of its tensors."""
    arrays = {name: np.array(value, copy=True) for name, value in message.to_arrays().items()}
    transcript.append((sender, receiver, arrays))
    return cls.from_arrays(arrays)


def run_protocol(
    leader: Any, parties: dict[str, Any], messages: tuple[type, type, type], transcript: Transcript
) -> tuple[AlignmentResult, dict[str, AlignmentResult]]:
    """Drive one alignment: hello to each follower, its answer back, then each one's result."""
    hello_cls, answer_cls, result_cls = messages
    for name, party in parties.items():
        hello = over_wire(leader.hello(), hello_cls, "leader", name, transcript)
        leader.receive(name, over_wire(party.answer(hello), answer_cls, name, "leader", transcript))
    own, results = leader.finish()
    return own, {
        name: party.finish(over_wire(results[name], result_cls, "leader", name, transcript))
        for name, party in parties.items()
    }


def run_tee_join(
    leader_ids: Any, followers: dict[str, Any], transcript: Transcript, *, order_key: bytes | None = None
) -> tuple[AlignmentResult, dict[str, AlignmentResult]]:
    leader = TeeJoinLeader(leader_ids, list(followers), order_key=order_key)
    parties = {name: TeeJoinFollower(ids) for name, ids in followers.items()}
    return run_protocol(leader, parties, (TeeJoinHello, TeeJoinIds, TeeJoinResult), transcript)


def run_psi(
    leader_ids: Any, followers: dict[str, Any], transcript: Transcript, *, workers: int = 1
) -> tuple[AlignmentResult, dict[str, AlignmentResult]]:
    leader = EcdhPsiLeader(leader_ids, list(followers), workers=workers)
    parties = {name: EcdhPsiFollower(ids, workers=workers) for name, ids in followers.items()}
    return run_protocol(leader, parties, (PsiHello, PsiFollowerReply, PsiLeaderReply), transcript)


METHODS: dict[str, Callable[..., tuple[AlignmentResult, dict[str, AlignmentResult]]]] = {
    "tee-join": run_tee_join,
    "ecdh-psi": run_psi,
}


def id_sets(sizes: Sequence[int], shared: int, *, kind: str = "str", seed: int = 7) -> list[list[Any]]:
    """Shuffled id lists: the first `shared` ids of the universe are in every list."""
    rng = np.random.default_rng(seed)
    total = shared + sum(size - shared for size in sizes)
    if kind == "str":
        universe: list[Any] = [f"patient-{secrets.token_hex(8)}-{i}" for i in range(total)]
    else:
        universe = [int(x) for x in rng.choice(2**62, size=total, replace=False) - 2**61]
    out, start = [], shared
    for size in sizes:
        own = universe[:shared] + universe[start : start + size - shared]
        start += size - shared
        out.append([own[i] for i in rng.permutation(size)])
    return out


def aligned_ids(ids: Sequence[Any], result: AlignmentResult) -> list[Any]:
    return [ids[i] for i in result.rows]


# --- correctness ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["str", "int"])
def test_both_methods_give_the_same_intersection_in_one_order_per_method(kind: str) -> None:
    leader_ids, follower_ids = id_sets([1200, 900], 400, kind=kind)
    expected = set(leader_ids) & set(follower_ids)
    sets = {}
    for method, run in METHODS.items():
        lead, follow = run(leader_ids, {"f": follower_ids}, [])
        assert lead.size == follow["f"].size == len(expected) == 400
        assert aligned_ids(leader_ids, lead) == aligned_ids(follower_ids, follow["f"]), method
        sets[method] = set(aligned_ids(leader_ids, lead))
    assert sets["tee-join"] == sets["ecdh-psi"] == expected


@pytest.mark.parametrize("method", METHODS)
def test_several_followers_share_one_order_over_the_common_intersection(method: str) -> None:
    u = [f"acct-{secrets.token_hex(8)}" for _ in range(900)]
    rng = np.random.default_rng(3)
    shuffled = lambda ids: [ids[i] for i in rng.permutation(len(ids))]  # noqa: E731
    # 150 ids in all three; others shared by two parties only, or owned by one.
    leader_ids = shuffled(u[:150] + u[150:230] + u[230:270] + u[300:600])
    f1 = shuffled(u[:150] + u[150:230] + u[600:700] + u[700:730])
    f2 = shuffled(u[:150] + u[230:270] + u[700:730] + u[800:900])
    lead, follow = METHODS[method](leader_ids, {"f1": f1, "f2": f2}, [])
    common = set(u[:150])
    order = aligned_ids(leader_ids, lead)
    assert set(order) == common
    assert aligned_ids(f1, follow["f1"]) == order
    assert aligned_ids(f2, follow["f2"]) == order


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    st.sets(st.integers(-(2**70), 2**70), min_size=1, max_size=25),
    st.sets(st.integers(-(2**70), 2**70), min_size=1, max_size=25),
    st.randoms(use_true_random=False),
)
def test_any_small_sets_align_identically_under_both_methods(
    left: set[int], right: set[int], rnd: Any
) -> None:
    leader_ids, follower_ids = list(left), list(right)
    rnd.shuffle(leader_ids)
    rnd.shuffle(follower_ids)
    for run in METHODS.values():
        lead, follow = run(leader_ids, {"f": follower_ids}, [])
        assert set(aligned_ids(leader_ids, lead)) == left & right
        assert aligned_ids(leader_ids, lead) == aligned_ids(follower_ids, follow["f"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["str", "int"])
def test_two_alignments_in_different_orders_give_the_same_split_and_batches(method: str, kind: str) -> None:
    leader_ids, follower_ids = id_sets([300, 260], 200, kind=kind)
    first_lead, first_follow = METHODS[method](leader_ids, {"f": follower_ids}, [])
    # The same data aligned again (a new session), the leader's rows also in another file order.
    shuffled = [leader_ids[i] for i in np.random.default_rng(5).permutation(len(leader_ids))]
    second_lead, second_follow = METHODS[method](shuffled, {"f": follower_ids}, [])
    assert aligned_ids(leader_ids, first_lead) != aligned_ids(shuffled, second_lead)  # the protocol's orders differ
    # int ids as a numpy array on one party, Python ints on the other: the same canonical order.
    leader_array = np.array(leader_ids) if kind == "int" else leader_ids
    orders = [
        aligned_ids(leader_ids, canonical_order(first_lead, leader_array)),
        aligned_ids(follower_ids, canonical_order(first_follow["f"], follower_ids)),
        aligned_ids(shuffled, canonical_order(second_lead, shuffled)),
        aligned_ids(follower_ids, canonical_order(second_follow["f"], follower_ids)),
    ]
    assert orders[0] == orders[1] == orders[2] == orders[3]
    canonical = canonical_order(first_lead, leader_ids)
    assert canonical_order(canonical, leader_ids) == canonical
    plan = Plan(TRAIN, rows=200, batch_size=16, epochs=2, seed=3, validation_fraction=0.25)
    train, validation = plan.split()
    order = np.array(orders[0], dtype=object)
    expected_train, expected_validation = validation_split(list(set(leader_ids) & set(follower_ids)),
                                                           validation_fraction=0.25, seed=3)
    assert set(order[validation]) == set(expected_validation.tolist()) and validation.size == 50
    assert set(order[train]) == set(expected_train.tolist())
    other_seed = validation_split(orders[0], validation_fraction=0.25, seed=4)[1]
    assert set(other_seed.tolist()) != set(expected_validation.tolist())


def test_tee_join_order_depends_only_on_the_key_not_on_row_order() -> None:
    leader_ids, follower_ids = id_sets([500, 400], 200)
    key = bytes(range(32))
    lead, _ = run_tee_join(leader_ids, {"f": follower_ids}, [], order_key=key)
    rng = np.random.default_rng(11)
    shuffled_leader = [leader_ids[i] for i in rng.permutation(500)]
    shuffled_follower = [follower_ids[i] for i in rng.permutation(400)]
    again, follow = run_tee_join(shuffled_leader, {"f": shuffled_follower}, [], order_key=key)
    assert aligned_ids(shuffled_leader, again) == aligned_ids(leader_ids, lead)
    assert aligned_ids(shuffled_follower, follow["f"]) == aligned_ids(leader_ids, lead)
    other, _ = run_tee_join(leader_ids, {"f": follower_ids}, [], order_key=bytes(32))
    assert aligned_ids(leader_ids, other) != aligned_ids(leader_ids, lead)


def test_empty_intersection_is_a_result_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    leader_ids, follower_ids = id_sets([50, 60], 0)
    for run in METHODS.values():
        with caplog.at_level(logging.WARNING, logger="enclavefl.vfl"):
            lead, follow = run(leader_ids, {"f": follower_ids}, [])
        assert lead.size == follow["f"].size == 0
    assert "intersection is empty" in caplog.text


def test_parallel_scalar_multiplication_matches_the_serial_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from enclavefl.vfl import psi

    # Small chunks so that a few thousand rows make several chunks per process (the cost here is
    # the pool's start, not the rows: 16,384-row chunks would need 20,000 rows).
    monkeypatch.setattr(psi, "_CHUNK_ROWS", 512)
    _, points = hash_to_points([f"row-{i}" for i in range(2_000)])
    secret = secrets.token_bytes(32)
    serial = scalarmult_rows(secret, points, workers=1)
    assert np.array_equal(scalarmult_rows(secret, points, workers=2), serial)
    assert not (serial == points).all(axis=1).any()
    points = points.copy()
    points[1_800] = 0  # a low-order point, in the last chunk: the refusal crosses the pool
    with pytest.raises(Rejected, match="row 1800 is a low-order point") as info:
        scalarmult_rows(secret, points, workers=2)
    assert info.value.check == "psi-point"


def test_blinding_commutes_and_differs_from_the_hash() -> None:
    _, points = hash_to_points(["a", "b", "c"])
    a, b = secrets.token_bytes(32), secrets.token_bytes(32)
    ab = scalarmult_rows(b, scalarmult_rows(a, points, 1), 1)
    ba = scalarmult_rows(a, scalarmult_rows(b, points, 1), 1)
    assert np.array_equal(ab, ba)
    assert len({row.tobytes() for row in ab}) == 3


# --- what crosses the wire -------------------------------------------------------------------


def plain_forms(value: Any) -> list[bytes]:
    """An id as raw bytes and under the plain (unkeyed) hashes an observer could try."""
    if isinstance(value, str):
        raw = [value.encode()]
    else:
        raw = [value.to_bytes(16, "little", signed=True), value.to_bytes(8, "little", signed=True)]
    hashes = []
    for data in raw:
        hashes += [
            hashlib.sha256(data).digest(),
            hashlib.blake2b(data, digest_size=16).digest(),
            hashlib.blake2b(data, digest_size=32).digest(),
        ]
    return raw + hashes


def wire_blobs(transcript: Transcript) -> list[bytes]:
    return [array.tobytes() for _, _, arrays in transcript for array in arrays.values()]


@pytest.mark.parametrize("kind", ["str", "int"])
@pytest.mark.parametrize("method", METHODS)
def test_no_id_or_plain_hash_crosses_the_wire(method: str, kind: str) -> None:
    leader_ids, follower_ids = id_sets([600, 500], 250, kind=kind, seed=5)
    transcript: Transcript = []
    METHODS[method](leader_ids, {"f": follower_ids}, transcript)
    senders = {(s, r) for s, r, _ in transcript}
    assert senders == {("leader", "f"), ("f", "leader")}
    blobs = wire_blobs(transcript)
    everyone = sorted(set(leader_ids) | set(follower_ids))
    plain_hashes = hash_ids(everyone, digest_size=16)[1]
    for value in everyone:
        for needle in plain_forms(value):
            assert not any(needle in blob for blob in blobs), f"{method}: an id form crossed the wire"
    # Our own internal hash of an id (before keying/blinding) never crosses either.
    wire_rows = {blob[i : i + 16] for blob in blobs for i in range(0, len(blob) - 15, 16)}
    assert not wire_rows & {row.tobytes() for row in plain_hashes}


def test_tee_join_follower_learns_nothing_of_leader_only_ids() -> None:
    base, follower_ids, extra = id_sets([400, 300, 700], 100, seed=9)
    # Two leaders with the same intersection with the follower but different (and differently
    # many) leader-only ids: with the same order key the follower receives identical results.
    shared = [x for x in base if x in set(follower_ids)]
    other_leader = shared + [x for x in extra if x not in set(follower_ids)]
    key = secrets.token_bytes(32)
    views = []
    for leader_ids in (base, other_leader):
        transcript: Transcript = []
        _, follow = run_tee_join(leader_ids, {"f": follower_ids}, transcript, order_key=key)
        to_follower = [arrays for s, _, arrays in transcript if s == "leader"]
        views.append([{k: v for k, v in arrays.items() if k != "session"} for arrays in to_follower])
        assert follow["f"].size == 100
    for first, second in zip(*views, strict=True):
        assert first.keys() == second.keys()
        for name in first:
            assert np.array_equal(first[name], second[name]), name


def test_psi_singly_blinded_values_cannot_be_matched_without_a_secret() -> None:
    leader_ids, follower_ids = id_sets([500, 400], 200, seed=13)
    transcript: Transcript = []
    lead, _ = run_psi(leader_ids, {"f": follower_ids}, transcript)
    hello, reply, leader_reply = (arrays for _, _, arrays in transcript)
    x, y = hello["blinded"], reply["blinded"]
    z, w = reply["reblinded"], leader_reply["reblinded"]
    as_set = lambda rows: {r.tobytes() for r in rows}  # noqa: E731
    hashed = as_set(hash_to_points(leader_ids)[1]) | as_set(hash_to_points(follower_ids)[1])
    # Singly blinded values are neither the ids' hashes nor comparable across parties,
    # although 200 ids are common to both.
    assert not as_set(x) & hashed and not as_set(y) & hashed
    assert not as_set(x) & as_set(y)
    # Only double-blinded values match, exactly on the intersection.
    assert len(as_set(z) & as_set(w)) == lead.size == 200
    # What the follower gets back is sized by its own set and the intersection only.
    assert w.shape == (400, 32) and leader_reply["positions"].shape == (200,)
    assert leader_reply["positions"].dtype == np.dtype("<u4") and x.dtype == np.uint8


def test_logs_hold_the_size_and_never_an_id(caplog: pytest.LogCaptureFixture) -> None:
    leader_ids, follower_ids = id_sets([300, 200], 120, seed=17)
    with caplog.at_level(logging.DEBUG, logger="enclavefl.vfl"):
        for run in METHODS.values():
            run(leader_ids, {"f": follower_ids}, [])
    assert caplog.records and all("120" in r.getMessage() for r in caplog.records)
    assert not any(value in caplog.text for value in leader_ids + follower_ids)


# --- results and messages on disk / on the wire -----------------------------------------------


def test_alignment_result_bytes_round_trip_and_refuse_damage() -> None:
    result = AlignmentResult(np.array([5, 0, 9, 2]))
    data = result.to_bytes()
    assert AlignmentResult.from_bytes(data) == result and result.size == 4
    assert AlignmentResult.from_bytes(AlignmentResult(np.empty(0, np.int64)).to_bytes()).size == 0
    with pytest.raises(FormatError, match="magic"):
        AlignmentResult.from_bytes(b"X" + data[1:])
    with pytest.raises(FormatError, match="expected"):
        AlignmentResult.from_bytes(data[:-3])
    twice = data[:16] + np.array([1, 1, 2, 3], "<i8").tobytes()
    with pytest.raises(FormatError, match="twice"):
        AlignmentResult.from_bytes(twice)
    with pytest.raises(FormatError, match="negative"):
        AlignmentResult.from_bytes(data[:16] + np.array([1, -1, 2, 3], "<i8").tobytes())
    assert result.rows.flags.writeable is False


def test_messages_are_fixed_width_tensors_and_bad_ones_are_refused() -> None:
    leader = EcdhPsiLeader(["a", "b"], ["f"], workers=1)
    arrays = leader.hello().to_arrays()
    assert arrays["blinded"].dtype == np.uint8 and arrays["blinded"].shape == (2, 32)
    with pytest.raises(FormatError, match="tensors"):
        PsiHello.from_arrays({k: v for k, v in arrays.items() if k != "id_kind"})
    with pytest.raises(FormatError, match="blinded"):
        PsiHello.from_arrays(arrays | {"blinded": arrays["blinded"][:, :31]})
    with pytest.raises(FormatError, match="id kind"):
        PsiHello.from_arrays(arrays | {"id_kind": np.array([9], np.uint8)})
    hello = TeeJoinLeader([1, 2], ["f"]).hello().to_arrays()
    with pytest.raises(FormatError, match="order_key"):
        TeeJoinHello.from_arrays(hello | {"order_key": hello["order_key"][:16]})
    with pytest.raises(FormatError, match="uint32"):
        TeeJoinResult.from_arrays({"session": hello["session"], "positions": np.arange(3, dtype=np.int64)})


# --- invalid input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "reason"),
    [
        (["a", "b", "a"], "duplicate id at rows 0 and 2"),
        (np.array([10, 20, 30, 20]), "duplicate id at rows 1 and 3"),
        ([], "empty"),
        (np.array([], dtype=np.int64), "empty"),
        (["a", 1], "mixed id types: row 0 is str, row 1 is int"),
        ([1, 2, "3"], "mixed id types"),
        ([1, True], "mixed id types"),
        ([True, False], "row 0 is bool"),
        ([1.0, 2.0], "row 0 is float"),
        (np.array([1.5, 2.5]), "dtype float64"),
        ("abc", "single str"),
        ([2**130], "128 bits"),
        (["ok", "\ud800"], "not valid Unicode"),
    ],
)
@pytest.mark.parametrize(
    "party", ["tee-join leader", "tee-join follower", "ecdh-psi leader", "ecdh-psi follower"]
)
def test_invalid_ids_are_refused_with_a_reason(party: str, ids: Any, reason: str) -> None:
    make = {
        "tee-join leader": lambda: TeeJoinLeader(ids, ["f"]),
        "tee-join follower": lambda: TeeJoinFollower(ids),
        "ecdh-psi leader": lambda: EcdhPsiLeader(ids, ["f"], workers=1),
        "ecdh-psi follower": lambda: EcdhPsiFollower(ids, workers=1),
    }[party]
    with pytest.raises(UsageError, match=reason):
        make()


def test_duplicate_error_names_rows_not_the_id() -> None:
    with pytest.raises(UsageError) as info:
        hash_ids(["secret-customer-42", "x", "secret-customer-42"], digest_size=16)
    assert "secret-customer-42" not in str(info.value)


def test_int_ids_hash_the_same_from_lists_and_arrays() -> None:
    values = [0, 1, -1, 2**40, -(2**63), 2**63 - 1]
    kind, from_list = hash_ids(values, digest_size=16)
    _, from_array = hash_ids(np.array(values, dtype=np.int64), digest_size=16)
    _, from_object = hash_ids(np.array(values, dtype=object), digest_size=16)
    _, from_uint = hash_ids(np.array([0, 1, 2**40, 2**64 - 1], dtype=np.uint64), digest_size=16)
    _, big = hash_ids([0, 1, 2**40, 2**64 - 1], digest_size=16)
    assert kind is IdKind.INT
    assert np.array_equal(from_list, from_array) and np.array_equal(from_list, from_object)
    assert np.array_equal(from_uint, big)


@pytest.mark.parametrize("method", METHODS)
def test_str_and_int_parties_are_told_their_id_kinds_differ(method: str) -> None:
    mismatch = "id kind mismatch: the leader has str ids, this follower has int ids"
    with pytest.raises(UsageError, match=mismatch):
        METHODS[method](["1", "2"], {"f": [1, 2]}, [])


def test_bad_options_are_refused() -> None:
    with pytest.raises(UsageError, match="workers"):
        EcdhPsiFollower(["a"], workers=0)
    with pytest.raises(UsageError, match="distinct"):
        EcdhPsiLeader(["a"], ["f", "f"])
    with pytest.raises(UsageError, match="at least one"):
        TeeJoinLeader(["a"], [])
    with pytest.raises(UsageError, match="order_key"):
        TeeJoinLeader(["a"], ["f"], order_key=b"short")


# --- protocol refusals -------------------------------------------------------------------------


def test_tee_join_leader_refuses_strangers_replays_and_other_sessions() -> None:
    leader = TeeJoinLeader(["a", "b", "c"], ["f"])
    follower = TeeJoinFollower(["b", "c", "d"])
    ids = follower.answer(leader.hello())
    with pytest.raises(Rejected) as info:
        leader.receive("mallory", ids)
    assert info.value.check == "align-peer"
    with pytest.raises(Rejected) as info:
        leader.receive("f", TeeJoinIds(bytes(16), ids.hashed))
    assert info.value.check == "align-session"
    with pytest.raises(UsageError, match=r"no ids yet from followers \['f'\]"):
        leader.finish()
    leader.receive("f", ids)
    with pytest.raises(Rejected) as info:
        leader.receive("f", ids)
    assert info.value.check == "align-protocol"


def test_tee_join_leader_refuses_a_follower_list_with_repeats() -> None:
    leader = TeeJoinLeader(["a", "b"], ["f"])
    hashed = TeeJoinFollower(["a", "z"]).answer(leader.hello()).hashed
    leader.receive("f", TeeJoinIds(leader.hello().session, np.concatenate([hashed, hashed[:1]])))
    with pytest.raises(Rejected) as info:
        leader.finish()
    assert info.value.check == "align-duplicates"


def test_tee_join_follower_refuses_bad_results() -> None:
    follower = TeeJoinFollower(["a", "b", "c"])
    with pytest.raises(UsageError, match="before the leader's hello"):
        follower.finish(TeeJoinResult(bytes(16), np.array([0])))
    hello = TeeJoinLeader(["a"], ["f"]).hello()
    follower.answer(hello)
    for positions in ([0, 3], [1, 1]):
        with pytest.raises(Rejected) as info:
            follower.finish(TeeJoinResult(hello.session, np.array(positions)))
        assert info.value.check == "align-result"


def test_psi_follower_refuses_a_position_outside_the_intersection() -> None:
    leader = EcdhPsiLeader(["a", "b", "c"], ["f"], workers=1)
    follower = EcdhPsiFollower(["b", "c", "d", "e"], workers=1)
    leader.receive("f", follower.answer(leader.hello()))
    _, replies = leader.finish()
    honest = replies["f"]
    assert honest.positions.size == 2
    outside = next(p for p in range(4) if p not in set(honest.positions.tolist()))
    with pytest.raises(Rejected) as info:
        follower.finish(PsiLeaderReply(honest.session, honest.reblinded, np.array([outside])))
    assert info.value.check == "psi-result"
    with pytest.raises(Rejected) as info:
        follower.finish(PsiLeaderReply(honest.session, honest.reblinded[:3], honest.positions))
    assert info.value.check == "align-protocol"
    assert follower.finish(honest).size == 2


def test_psi_leader_refuses_low_order_points_and_short_replies() -> None:
    leader = EcdhPsiLeader(["a", "b"], ["f"], workers=1)
    follower = EcdhPsiFollower(["b", "c"], workers=1)
    reply = follower.answer(leader.hello())
    with pytest.raises(Rejected) as info:
        leader.receive("f", PsiFollowerReply(reply.session, reply.blinded, reply.reblinded[:1]))
    assert info.value.check == "align-protocol"
    zero = reply.blinded.copy()
    zero[1] = 0  # u = 0 is a point of order 2: any scalar multiple is all-zero
    with pytest.raises(Rejected, match="row 1 is a low-order point") as info:
        leader.receive("f", PsiFollowerReply(reply.session, zero, reply.reblinded))
    assert info.value.check == "psi-point"


# --- byte-row helpers --------------------------------------------------------------------------


def test_rows_sharing_a_64_bit_prefix_sort_and_match_exactly() -> None:
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 256, size=(40, 16), dtype=np.uint8)
    rows[:20, :8] = rows[0, :8]  # half the rows share their first 8 bytes
    order = lex_order(rows)
    assert [rows[i].tobytes() for i in order] == sorted(r.tobytes() for r in rows)
    assert duplicate_pair(rows) == (-1, -1)
    left, right = rows[::2], rows[1::2].copy()
    right[:5] = left[:5]
    i, j = match_rows(left, right, what="test")
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(k, k) for k in range(5)]
    with_repeat = rows.copy()
    with_repeat[17] = with_repeat[3]
    assert duplicate_pair(with_repeat) == (3, 17)
    with pytest.raises(Rejected, match="second list repeats"):
        match_rows(rows[:5], np.concatenate([rows[5:], rows[6:7]]), what="test")
