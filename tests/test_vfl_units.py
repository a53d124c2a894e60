"""Vertical FL pieces without a network: the plan, sealed storage, the bridge's handlers."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import cbor2
import numpy as np
import pytest
import torch
from torch import nn

from enclavefl.errors import FormatError, Rejected, SealError, UsageError
from enclavefl.net.admission import Peer
from enclavefl.net.tensors import Message
from enclavefl.seal.keys import create_key_file
from enclavefl.seal.sealed import write_sealed
from enclavefl.vfl.align import AlignmentResult
from enclavefl.vfl.bridge import LeaderBridge, Rewind
from enclavefl.vfl.errors import FollowerRefused, FollowerUnavailable, ResumeFailed
from enclavefl.vfl.plan import EVAL, PREDICT, TRAIN, Plan
from enclavefl.vfl.state import PartyState
from enclavefl.vfl.storage import Aligned, Storage, ids_digest

# --- the plan ---------------------------------------------------------------------------------


def test_training_plan_covers_every_row_once_per_epoch_and_holds_out_validation() -> None:
    plan = Plan(TRAIN, rows=103, batch_size=10, epochs=3, seed=5, validation_fraction=0.2)
    train, validation = plan.split()
    assert validation.size == 21 and train.size == 82
    assert not set(train) & set(validation) and set(train) | set(validation) == set(range(103))
    assert plan.batches_per_epoch == 9 and plan.total == 3 * 10
    for epoch in range(3):
        steps = [plan.step(epoch * 10 + b) for b in range(10)]
        assert [s.kind for s in steps] == [TRAIN] * 9 + [EVAL]
        seen = np.concatenate([s.positions for s in steps[:9]])
        assert sorted(seen) == sorted(train) and seen.size == 82
        np.testing.assert_array_equal(steps[9].positions, validation)
    # Each epoch shuffles differently; the same numbers give the same batches.
    assert not np.array_equal(plan.step(0).positions, plan.step(10).positions)
    again = Plan(TRAIN, rows=103, batch_size=10, epochs=3, seed=5, validation_fraction=0.2)
    for i in range(plan.total):
        np.testing.assert_array_equal(plan.step(i).positions, again.step(i).positions)
    other_seed = Plan(TRAIN, rows=103, batch_size=10, epochs=3, seed=6, validation_fraction=0.2)
    assert not np.array_equal(plan.split()[1], other_seed.split()[1])


def test_plan_in_flight_bound_and_barriers() -> None:
    plan = Plan(TRAIN, rows=100, batch_size=10, epochs=2, pipeline_depth=3, checkpoint_every=5)
    # 8 training batches then an evaluation per epoch: iterations 0..8 and 9..17.
    assert [plan.kind(i) for i in (7, 8, 16, 17)] == [TRAIN, EVAL, TRAIN, EVAL]
    assert plan.required(0) == -1 and plan.required(1) == -1 and plan.required(3) == 0
    assert plan.is_checkpoint(4) and plan.required(5) == 4  # nothing in flight across a checkpoint
    assert plan.required(8) == 7  # an evaluation sees every update
    assert plan.required(9) == 8  # and nothing runs beside it
    assert plan.is_checkpoint(17) and not plan.is_checkpoint(16)  # the last iteration too
    strict = Plan(TRAIN, rows=100, batch_size=10, epochs=1)
    assert [strict.required(i) for i in range(1, 5)] == [0, 1, 2, 3]


def test_prediction_plan_walks_the_rows_in_order() -> None:
    plan = Plan(PREDICT, rows=25, batch_size=10)
    assert plan.total == 3 and plan.validation_rows == 0
    np.testing.assert_array_equal(np.concatenate([plan.step(i).positions for i in range(3)]), np.arange(25))
    assert {plan.step(i).kind for i in range(3)} == {PREDICT}


def test_plan_round_trip_and_refusals() -> None:
    plan = Plan(TRAIN, rows=50, batch_size=8, epochs=2, seed=3, pipeline_depth=2, checkpoint_every=4)
    assert Plan.from_meta(plan.to_meta()) == plan
    assert plan.differences(Plan(TRAIN, rows=50, batch_size=16, epochs=2, seed=3, pipeline_depth=2,
                                 checkpoint_every=4)) == ["batch_size: 8 vs 16"]  # fmt: skip
    with pytest.raises(FormatError, match="expected fields"):
        Plan.from_meta({**plan.to_meta(), "extra": 1})
    with pytest.raises(FormatError, match="'batch_size'"):
        Plan.from_meta({**plan.to_meta(), "batch_size": "8"})
    with pytest.raises(FormatError, match="batch_size must be an integer >= 1"):
        Plan.from_meta({**plan.to_meta(), "batch_size": 0})
    with pytest.raises(UsageError, match="leaves 0 validation"):
        Plan(TRAIN, rows=2, batch_size=1, validation_fraction=0.1)
    with pytest.raises(UsageError, match="outside the plan"):
        plan.step(plan.total)


# --- sealed storage ---------------------------------------------------------------------------


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    key = create_key_file(tmp_path / "key")
    return Storage(tmp_path / "state", key, "job-1", "host", checkpoint_every=2, keep_last=2)


def test_alignment_is_stored_sealed_and_bound_to_the_ids(storage: Storage) -> None:
    ids = np.array(["a", "b", "c", "d"])
    aligned = Aligned("tee-join", "ab" * 16, AlignmentResult(np.array([3, 0, 2])))
    assert storage.load_alignment(ids) is None
    storage.save_alignment(aligned, ids)
    raw = (storage.directory / "alignment.sealed").read_bytes()
    assert np.array([3, 0, 2], dtype="<i8").tobytes() not in raw  # sealed, not in clear
    loaded = storage.load_alignment(ids)
    assert loaded is not None and loaded.alignment_id == aligned.alignment_id and loaded.result == aligned.result
    assert storage.load_alignment(np.array(["a", "b", "c", "e"])) is None  # other data: align again
    other = Storage(storage.directory, storage.key, "job-2", "host")
    with pytest.raises(SealError) as info:
        other.load_alignment(ids)
    assert info.value.check == "job-id"
    # One sealed before alignments were ordered canonically (no order mark) is aligned again.
    record = {"method": "tee-join", "alignment_id": "ab" * 16, "ids_sha256": ids_digest(ids),
              "rows": aligned.result.to_bytes()}  # fmt: skip
    with write_sealed(storage.directory / "alignment.sealed", key=storage.key, job_id=storage.job_id,
                      name="vfl-alignment/host", version=1) as out:  # fmt: skip
        out.write(cbor2.dumps(record, canonical=True))
    assert storage.load_alignment(ids) is None


def test_checkpoints_are_pruned_and_cannot_be_swapped(storage: Storage) -> None:
    for iteration in (1, 3, 5):
        storage.save_checkpoint(iteration, {"iteration": iteration, "w": torch.full((2,), float(iteration))})
    assert storage.checkpoints() == [3, 5]
    assert torch.equal(storage.load_checkpoint(5)["w"], torch.full((2,), 5.0))
    # An older checkpoint renamed to pass for a newer one is refused.
    os.replace(storage.directory / "checkpoint-0000000003.sealed", storage.directory / "checkpoint-0000000007.sealed")
    with pytest.raises(SealError) as info:
        storage.load_checkpoint(7)
    assert info.value.check == "version"
    # Another party's checkpoint is refused too.
    guest = Storage(storage.directory, storage.key, "job-1", "guest")
    with pytest.raises(SealError) as info:
        guest.load_checkpoint(5)
    assert info.value.check == "artifact"
    storage.clear_checkpoints(after=5)
    assert storage.checkpoints() == [5]
    with pytest.raises(UsageError, match="keep_last must be at least 2"):
        Storage(storage.directory, storage.key, "job-1", "host", keep_last=1)


# --- the bridge's handlers, called directly ------------------------------------------------------

HOST, OTHER = Peer("host", None), Peer("other", None)


def established(plan: Plan, *, restorable: list[int] | None = None) -> LeaderBridge:
    bridge = LeaderBridge(["host"], restorable=lambda: restorable or [-1], poll_s=0.05)
    bridge.set_alignment("a1")
    answers: list[Message] = []
    joiner = threading.Thread(
        target=lambda: answers.append(bridge._on_join(HOST, Message(meta={"alignment": "a1", "restorable": [-1]})))
    )
    joiner.start()
    bridge.wait_for_reports(5)
    bridge.establish(plan, -1)
    joiner.join()
    answer = answers[0] if answers[0].meta["status"] == "ready" else bridge._on_join(
        HOST, Message(meta={"alignment": "a1", "restorable": [-1]})
    )
    assert answer.meta["status"] == "ready" and answer.meta["resume"] == -1
    assert Plan.from_meta(answer.meta["plan"]) == plan
    return bridge


def test_duplicates_are_dropped_and_replies_survive_a_repeated_call() -> None:
    plan = Plan(TRAIN, rows=20, batch_size=4, epochs=1)
    bridge = established(plan)
    session = bridge.session
    start = bridge._on_start(HOST, Message(meta={"session": session, "iteration": 0, "committed": -1}))
    assert start.meta == {"status": "wait", "commit_through": -1}  # not open yet
    bridge.open(0, timeout_s=1)
    start = bridge._on_start(HOST, Message(meta={"session": session, "iteration": 0, "committed": -1}))
    assert start.meta == {"status": "open", "iteration": 0, "sealed": -1}  # no checkpoint sealed yet
    act = {"act": torch.ones(4, 2)}
    send = {"session": session, "iteration": 0, "name": "act"}
    assert bridge._on_send(HOST, Message(meta=send, tensors=act)).meta["status"] == "ok"
    assert bridge._on_send(HOST, Message(meta=send, tensors={"act": torch.zeros(4, 2)})).meta["status"] == "duplicate"
    got = bridge.collect(0, "act", timeout_s=1)
    assert torch.equal(got["host"].tensors["act"], torch.ones(4, 2))  # the first copy counts
    assert bridge._on_send(HOST, Message(meta=send, tensors=act)).meta["status"] == "duplicate"
    bridge.post(0, "grad", {"host": Message(tensors={"grad": torch.full((4, 2), 0.5)})})
    bridge.finish(0)
    for _ in range(2):  # the answer was lost: the follower asks again, and gets the same
        again = bridge._on_send(HOST, Message(meta={**send, "reply": "grad"}, tensors=act))
        assert again.meta["status"] == "reply" and torch.equal(again.tensors["grad"], torch.full((4, 2), 0.5))
    recv = bridge._on_recv(HOST, Message(meta={"session": session, "iteration": 0, "name": "grad"}))
    assert recv.meta["status"] == "reply"
    # Committing 0 (carried by the next start) frees the reply; 1 opens after that.
    start = bridge._on_start(HOST, Message(meta={"session": session, "iteration": 1, "committed": 0}))
    assert start.meta == {"status": "wait", "commit_through": 0}  # the leader has not opened 1 yet
    bridge.open(1, timeout_s=1)
    start = bridge._on_start(HOST, Message(meta={"session": session, "iteration": 1, "committed": 0}))
    assert start.meta == {"status": "open", "iteration": 1, "sealed": -1}
    with pytest.raises(Rejected, match="committed or not open") as info:
        bridge._on_recv(HOST, Message(meta={"session": session, "iteration": 0, "name": "grad"}))
    assert info.value.check == "vfl-protocol"


def test_protocol_violations_and_stale_sessions() -> None:
    bridge = established(Plan(TRAIN, rows=20, batch_size=4, epochs=1))
    session = bridge.session
    with pytest.raises(Rejected, match="not a follower") as info:
        bridge._on_start(OTHER, Message(meta={"session": session, "iteration": 0, "committed": -1}))
    assert info.value.check == "vfl-party"
    with pytest.raises(Rejected, match="is not open"):
        bridge._on_send(HOST, Message(meta={"session": session, "iteration": 0, "name": "act"}, tensors={}))
    with pytest.raises(Rejected, match="never opened"):
        bridge._on_start(HOST, Message(meta={"session": session, "iteration": 0, "committed": 3}))
    with pytest.raises(FormatError, match="'iteration'"):
        bridge._on_start(HOST, Message(meta={"session": session, "iteration": "0", "committed": -1}))
    with pytest.raises(FormatError, match="message name"):
        bridge._on_send(HOST, Message(meta={"session": session, "iteration": 0, "name": "../x"}))
    stale = bridge._on_start(HOST, Message(meta={"session": "old:1", "iteration": 0, "committed": -1}))
    assert stale.meta == {"status": "rejoin", "instance": bridge.instance}
    with pytest.raises(Rejected, match="alignment") as info:
        bridge._on_join(HOST, Message(meta={"alignment": "a2", "restorable": [-1]}))
    assert info.value.check == "vfl-alignment"


def test_a_follower_rejoining_behind_the_leader_rewinds_everyone() -> None:
    plan = Plan(TRAIN, rows=40, batch_size=4, epochs=1, checkpoint_every=3)
    bridge = established(plan, restorable=[-1, 2])
    session = bridge.session
    for i in range(4):  # both finished 0..3; the follower checkpointed 2 (every 3)
        bridge.open(i, timeout_s=1)
        bridge.finish(i)
        bridge._on_start(HOST, Message(meta={"session": session, "iteration": i + 1, "committed": i}))
    # The follower restarts from its checkpoint of iteration 2.
    answer = bridge._on_join(HOST, Message(meta={"alignment": "a1", "restorable": [-1, 2]}))
    assert answer.meta["status"] == "ready" and answer.meta["resume"] == 2
    assert answer.meta["session"] != session
    with pytest.raises(Rewind) as info:
        bridge.open(4, timeout_s=1)
    assert info.value.iteration == 2
    bridge.rewound(2)
    bridge.open(3, timeout_s=1)  # the leader goes on from 3, after restoring 2
    # The old session is stale now.
    assert bridge._on_start(HOST, Message(meta={"session": session, "iteration": 3, "committed": 2})).meta[
        "status"
    ] == "rejoin"


def test_missing_followers_are_named_after_a_bounded_wait() -> None:
    bridge = LeaderBridge(["host", "host2"], restorable=lambda: [-1], poll_s=0.05)
    bridge.set_alignment("a1")
    with pytest.raises(FollowerUnavailable, match=r"\['host', 'host2'\] did not join training within 0.1 s") as info:
        bridge.wait_for_reports(0.1)
    assert info.value.parties == ("host", "host2")


def test_a_follower_that_refuses_the_leader_stops_its_wait_at_once() -> None:
    """vfl.refuse: the leader's wait for that follower ends with a typed refusal, not a timeout."""
    bridge = established(Plan(TRAIN, rows=20, batch_size=4, epochs=1))
    with pytest.raises(Rejected, match="not a follower"):
        bridge._on_refuse(OTHER, Message(meta={"check": "freshness", "reason": "no"}))
    with pytest.raises(FormatError, match="'reason'"):
        bridge._on_refuse(HOST, Message(meta={"check": "freshness"}))
    waiting = threading.Thread(target=lambda: bridge._on_refuse(
        HOST, Message(meta={"check": "freshness", "reason": "the leader came back older: 4 < 9"})
    ))  # fmt: skip
    waiting.start()
    # A wait far longer than any test: only the refusal can end it.
    with pytest.raises(FollowerRefused, match=r"^follower host refused this leader \(freshness\): the leader came "
                       r"back older: 4 < 9$") as info:  # fmt: skip
        bridge.wait_committed(0, timeout_s=3600)
    waiting.join()
    assert info.value.check == "freshness" and info.value.party == "host" and info.value.exit_code == 1
    # An unknown check (a newer follower's) still stops the leader, as unspecified.
    assert bridge._on_refuse(HOST, Message(meta={"check": "from-the-future", "reason": "x"})).meta["status"] == "noted"


# --------------------------------------------------------------------------- party state


def _party_state(tmp_path: Path, *, optimizer: bool) -> tuple[PartyState, Plan, Aligned]:
    model = nn.Linear(3, 2)
    storage = Storage(tmp_path / "ckpt", create_key_file(tmp_path / "key"), "job", "host",
                      checkpoint_every=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1) if optimizer else None
    aligned = Aligned("tee-join", "ab" * 16, AlignmentResult(np.arange(10)))
    return PartyState("host", model, opt, storage), Plan(TRAIN, 10, 2, epochs=1), aligned


def test_party_state_restores_what_it_saved_and_its_initial_state(tmp_path: Path) -> None:
    state, plan, aligned = _party_state(tmp_path, optimizer=True)
    initial = state.model.weight.detach().clone()
    state.model(torch.ones(4, 3)).sum().backward()
    state.optimizer.step()  # type: ignore[union-attr]
    trained = state.model.weight.detach().clone()
    state.save(3, plan=plan, aligned=aligned, extra={"history": [1.0]})
    assert state.stored() == [-1, 3]
    assert state.restore(-1, plan=plan, aligned=aligned) is None
    assert torch.equal(state.model.weight, initial)
    checkpoint = state.restore(3, plan=plan, aligned=aligned)
    assert checkpoint is not None and checkpoint["history"] == [1.0]
    assert torch.equal(state.model.weight, trained)
    assert state.optimizer.state_dict()["state"]  # type: ignore[union-attr]  # Adam's moments came back


def test_party_state_refuses_a_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    # The leader and the follower share this check; before, only the follower looked at the optimizer state.
    without, plan, aligned = _party_state(tmp_path, optimizer=False)
    without.save(1, plan=plan, aligned=aligned)
    model = nn.Linear(3, 2)
    trainer = PartyState("host", model, torch.optim.SGD(model.parameters(), lr=0.1), without.storage)
    with pytest.raises(ResumeFailed, match="holds no optimizer state, and this party trains with an optimizer"):
        trainer.restore(1, plan=plan, aligned=aligned)
    other = Aligned("tee-join", "cd" * 16, aligned.result)
    with pytest.raises(ResumeFailed, match="host: checkpoint of iteration 1 was written for another alignment"):
        without.restore(1, plan=plan, aligned=other)
    with pytest.raises(ResumeFailed, match="another plan"):
        without.restore(1, plan=Plan(TRAIN, 10, 5, epochs=1), aligned=aligned)
