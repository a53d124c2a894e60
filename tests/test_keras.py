"""Keras 3 models (extra `[tf]`): KerasTrainer under the fit/evaluate contract, Keras vfl
halves beside torch ones, stable weight names, the missing-extra error.

The in-process tests use the TensorFlow backend; `test_torch_backend` runs the same checks
under KERAS_BACKEND=torch in one subprocess (a process has one Keras backend). Models are
tiny and shared so that the slow TensorFlow import is paid once.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from enclavefl import extras
from enclavefl.errors import UsageError
from enclavefl.insecure import create_key_file
from enclavefl.models import KERAS_BUILTINS, BottomMLP, mlp
from enclavefl.train.metrics import eval_stats

# Keras (and TensorFlow under it) is imported when the first test of this module runs, by the
# `keras_tf` fixture below, not at collection: `make test-unit` collects this module, deselects
# it (integration) and must not pay TensorFlow's import. These names are set by that fixture.
keras: Any = None
BCE: Any = None
KerasTrainer: Any = None
check_weights: Any = None
get_weights: Any = None
variable_names: Any = None
KerasHalf: Any = None
KerasOptimizer: Any = None
export_keras: Any = None
load_keras: Any = None


@pytest.fixture(scope="module", autouse=True)
def keras_tf() -> None:
    """Import Keras on the TensorFlow backend (the [tf] extra, installed by `make test`), or skip."""
    global keras, BCE, KerasTrainer, check_weights, get_weights, variable_names
    global KerasHalf, KerasOptimizer, export_keras, load_keras
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "tensorflow"  # read at Keras' first import; torch runs in a subprocess
    keras = pytest.importorskip("keras")
    from enclavefl.train.keras import KerasTrainer, check_weights, get_weights, variable_names
    from enclavefl.vfl.keras_half import KerasHalf, KerasOptimizer, export_keras, load_keras

    BCE = keras.losses.BinaryCrossentropy(from_logits=True)


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def build_keras_model(name: str, **kwargs: object) -> object:
    return KERAS_BUILTINS[name](**kwargs)



def data(rows: int = 96, features: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    return x, (x[:, 0] - x[:, 1] > 0).astype(np.float32)


def keras_twin(torch_model: torch.nn.Sequential, **kwargs) -> object:
    """The Keras MLP with the torch MLP's weights (Dense kernel = Linear weight transposed)."""
    model = build_keras_model("mlp", **kwargs)
    linears = [m for m in torch_model if isinstance(m, torch.nn.Linear)]
    names = variable_names(model)
    weights = {}
    for i, linear in enumerate(linears):
        layer = "logits" if i == len(linears) - 1 else f"hidden_{i}"
        weights[f"{layer}/kernel"] = linear.weight.detach().numpy().T.copy()
        weights[f"{layer}/bias"] = linear.bias.detach().numpy().copy()
    assert sorted(weights) == sorted(names)
    model.set_weights([weights[n] for n in names])
    return model


# -- names ---------------------------------------------------------------------------------


def test_names_are_stable_across_builds_and_independent_of_automatic_numbering() -> None:
    def sequential() -> object:
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])

    first, second = sequential(), sequential()  # Keras numbers the second one's layers dense_2, dense_3
    assert (
        variable_names(first)
        == variable_names(second)
        == ["dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias"]
    )
    assert variable_names(build_keras_model("mlp", in_features=3, hidden=[4])) == [
        "hidden_0/kernel", "hidden_0/bias", "logits/kernel", "logits/bias"]  # fmt: skip


def test_mismatched_variables_are_refused_with_the_names_that_differ() -> None:
    model = build_keras_model("mlp", in_features=3, hidden=[4])
    weights = get_weights(model)
    other = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dense(1, name="logits")]
    )
    with pytest.raises(
        UsageError, match=r"lack \['hidden/kernel', 'hidden/bias'\].*no \['hidden_0/bias', 'hidden_0/kernel'\]"
    ):
        check_weights(other, weights)
    wrong = {**weights, "hidden_0/kernel": np.zeros((3, 5), np.float32)}
    with pytest.raises(UsageError, match=r"hidden_0/kernel: model float32 \[3, 4\], weights float32 \[3, 5\]"):
        check_weights(model, wrong)
    before = get_weights(model)
    trainer = KerasTrainer(model, BCE, keras.optimizers.SGD(0.1), data(features=3))
    with pytest.raises(UsageError, match="hidden_0/kernel"):
        trainer.fit(wrong, {"round": 1})
    assert all(np.array_equal(before[n], v) for n, v in get_weights(model).items()), "nothing written on refusal"


# -- KerasTrainer ------------------------------------------------------------------------------


def test_one_round_equals_local_model_fit() -> None:
    x, y = data()
    keras.utils.set_random_seed(3)
    model = build_keras_model("mlp", in_features=5, hidden=[8])
    start = get_weights(model)
    trainer = KerasTrainer(model, BCE, keras.optimizers.SGD(0.05, momentum=0.9), (x, y), batch_size=16, seed=7)
    result = trainer.fit(start, {"round": 1, "local_epochs": 2})

    local = build_keras_model("mlp", in_features=5, hidden=[8])
    local.set_weights([start[n] for n in variable_names(local)])
    local.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=BCE)
    keras.utils.set_random_seed(7 + 1)  # the trainer's seed + round
    local.fit(x, y, batch_size=16, epochs=2, shuffle=True, verbose=0)
    expected = get_weights(local)
    assert result.num_examples == 96 and not result.is_update
    assert list(result.weights) == list(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(result.weights[name], value, atol=1e-6, rtol=0)
    assert any(not np.allclose(start[n], expected[n]) for n in start), "training moved the weights"


def test_evaluation_and_gradients_equal_the_torch_path_on_the_same_model() -> None:
    x, y = data()
    torch.manual_seed(0)
    reference = mlp(5, [8, 4], 1)
    model = keras_twin(reference, in_features=5, hidden=[8, 4])
    trainer = KerasTrainer(model, BCE, keras.optimizers.SGD(0.1), (x, y), (x, y), batch_size=96, shuffle=False)
    weights = get_weights(model)

    result = trainer.evaluate(weights, {})
    logits = reference(torch.from_numpy(x))
    expected = eval_stats(logits.detach(), torch.from_numpy(y)).summary()
    assert result.num_examples == 96
    for name in ("accuracy", "auc", "log_loss"):
        assert result.metrics[name] == pytest.approx(expected[name], abs=1e-6)
    assert result.loss == pytest.approx(expected["log_loss"], abs=1e-5)

    grads = trainer.gradients(weights, {"round": 1})  # one batch = every row, in order
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], torch.from_numpy(y))
    loss.backward()
    assert grads.num_examples == 96 and grads.metrics["loss"] == pytest.approx(float(loss), abs=1e-6)
    np.testing.assert_allclose(grads.gradients["hidden_0/kernel"], reference[0].weight.grad.numpy().T, atol=1e-6)
    np.testing.assert_allclose(grads.gradients["logits/bias"], reference[-1].bias.grad.numpy(), atol=1e-6)


def test_fedprox_round_stays_closer_to_the_global_weights() -> None:
    x, y = data()
    keras.utils.set_random_seed(0)
    model = build_keras_model("mlp", in_features=5, hidden=[8])
    start = get_weights(model)
    trainer = KerasTrainer(model, BCE, keras.optimizers.SGD(0.2), (x, y), batch_size=8)

    def distance(weights: dict[str, np.ndarray]) -> float:
        return float(sum(np.sum((weights[n] - start[n]) ** 2) for n in start))

    free = trainer.fit(start, {"round": 1, "local_epochs": 3, "mu": 1e-9})
    held = trainer.fit(start, {"round": 1, "local_epochs": 3, "mu": 2.0})
    assert np.isfinite(held.metrics["loss"]) and distance(held.weights) < 0.5 * distance(free.weights)


# -- under the parameter server ----------------------------------------------------------------


def test_fedavg_one_worker_one_round_equals_local_model_fit() -> None:
    from enclavefl.hfl.registry import make_strategy
    from enclavefl.hfl.server import ParameterServer
    from enclavefl.hfl.worker import Worker
    from enclavefl.train.keras import TorchMirror
    from test_hfl_roles import Federation, attested_server

    x, y = data(120)
    keras.utils.set_random_seed(11)
    initial = build_keras_model("mlp", in_features=5, hidden=[8])
    start = get_weights(initial)
    local = build_keras_model("mlp", in_features=5, hidden=[8])
    local.set_weights([start[n] for n in variable_names(local)])
    local.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=BCE)
    keras.utils.set_random_seed(0 + 1)  # the trainer's seed + round
    local.fit(x, y, batch_size=16, epochs=2, shuffle=True, verbose=0)

    server = attested_server()
    ps = ParameterServer(
        server, make_strategy("fedavg", TorchMirror(initial)), workers=["a"], total=1, round_timeout_s=60
    )
    fed = Federation(server, ps)
    # The worker's model starts from other weights: the server's state is what it trains.
    worker_model = build_keras_model("mlp", in_features=5, hidden=[8])
    fed.worker(
        "a",
        lambda c: Worker(
            c,
            KerasTrainer(
                worker_model, BCE, keras.optimizers.SGD(0.05, momentum=0.9), (x, y), batch_size=16, local_epochs=2
            ),
        ),
    )
    summary = fed.run()
    assert not fed.errors, fed.errors
    assert summary["version"] == 1
    got = {name: t.detach().numpy() for name, t in ps.model.state_dict().items()}
    for name, want in get_weights(local).items():
        np.testing.assert_allclose(got[name], want, atol=1e-6, rtol=0, err_msg=name)


def test_sync_sgd_steps_with_the_gradient_tape_gradients() -> None:
    from enclavefl.hfl.registry import make_strategy
    from enclavefl.hfl.server import ParameterServer
    from enclavefl.hfl.worker import Worker
    from enclavefl.train.keras import TorchMirror
    from test_hfl_roles import Federation, attested_server

    x, y = data(32)
    keras.utils.set_random_seed(5)
    initial = build_keras_model("mlp", in_features=5, hidden=[8])
    start = get_weights(initial)

    def full_batch_trainer() -> KerasTrainer:  # a fresh model and optimizer each, one batch of all rows
        return KerasTrainer(build_keras_model("mlp", in_features=5, hidden=[8]), BCE, keras.optimizers.SGD(0.1),
                            (x, y), batch_size=32, shuffle=False)  # fmt: skip

    reference = full_batch_trainer()
    grads = reference.gradients(start, {"round": 1}).gradients

    server = attested_server()
    ps = ParameterServer(server, make_strategy("sync-sgd", TorchMirror(initial), lr=0.5), workers=["a"], total=1,
                         round_timeout_s=60)  # fmt: skip
    fed = Federation(server, ps)
    trainer = full_batch_trainer()
    fed.worker("a", lambda c: Worker(c, trainer))
    fed.run()
    assert not fed.errors, fed.errors
    got = {name: t.detach().numpy() for name, t in ps.model.state_dict().items()}
    for name, value in start.items():
        np.testing.assert_allclose(got[name], value - 0.5 * grads[name], atol=1e-6, rtol=0, err_msg=name)


# -- vfl halves ----------------------------------------------------------------------------------


def test_keras_bottom_steps_like_the_torch_bottom() -> None:
    torch.manual_seed(0)
    reference = BottomMLP(4, out_features=3, hidden=(6,))
    half = KerasHalf(build_keras_model("bottom_mlp", in_features=4, out_features=3, hidden=[6]))
    linears = [m for m in reference.net if isinstance(m, torch.nn.Linear)]
    half.load_state_dict(
        {
            "hidden_0/kernel": linears[0].weight.detach().T,
            "hidden_0/bias": linears[0].bias.detach(),
            "out/kernel": linears[1].weight.detach().T,
            "out/bias": linears[1].bias.detach(),
        }
    )
    optimizer = KerasOptimizer([(half, keras.optimizers.SGD(0.1, momentum=0.9))])
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x = torch.from_numpy(data(32, 4)[0])
    for _ in range(3):  # the follower's loop: forward, zero_grad, backward(leader's gradient), step
        ours, theirs = half(x), reference(x)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        grad = torch.cos(theirs.detach())
        optimizer.zero_grad()
        ours.backward(grad)
        optimizer.step()
        torch_optimizer.zero_grad()
        theirs.backward(grad)
        torch_optimizer.step()
    torch.testing.assert_close(half.state_dict()["hidden_0/kernel"], linears[0].weight.detach().T, atol=1e-5, rtol=0)


def test_keras_top_returns_gradients_for_each_activation_and_checkpoints(tmp_path: Path) -> None:
    top = KerasHalf(build_keras_model("top_mlp", in_features=5, hidden=[4]))
    optimizer = KerasOptimizer([(top, keras.optimizers.Adam(0.01))])
    parts = [torch.randn(8, 2, requires_grad=True), torch.randn(8, 3, requires_grad=True)]
    logits = top(parts)
    assert logits.shape == (8, 1)
    optimizer.zero_grad()
    logits.sum().backward()
    assert parts[0].grad.shape == (8, 2) and parts[1].grad.shape == (8, 3) and parts[1].grad.abs().sum() > 0
    optimizer.step()
    saved = {k: v.clone() for k, v in top.state_dict().items()}
    state = optimizer.state_dict()
    optimizer.step()  # nothing pending: no change
    logits = top(parts)
    optimizer.zero_grad()
    logits.sum().backward()
    optimizer.step()
    top.load_state_dict(saved)
    optimizer.load_state_dict(state)
    assert all(torch.equal(saved[k], v) for k, v in top.state_dict().items())
    with pytest.raises(RuntimeError, match=r"lack \['hidden_0/kernel'\]"):
        top.load_state_dict({("hidden/kernel" if k == "hidden_0/kernel" else k): v for k, v in saved.items()})

    key = create_key_file(tmp_path / "key")
    path = export_keras(top.keras_model, tmp_path / "top.keras.sealed", key=key, job_id="j", artifact="vfl-model/p/top")
    assert b"PK" not in path.read_bytes()[:64]  # sealed, not a plain zip
    fresh = build_keras_model("top_mlp", in_features=5, hidden=[4])
    load_keras(fresh, path, key=key, job_id="j", artifact="vfl-model/p/top")
    assert all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), top.keras_model.get_weights(), strict=True))


# -- backends and the extra ---------------------------------------------------------------------

TORCH_BACKEND_CHECK = """
import numpy as np, torch, keras
assert keras.backend.backend() == "torch"
from enclavefl.models import KERAS_BUILTINS
build_keras_model = lambda name, **kw: KERAS_BUILTINS[name](**kw)
from enclavefl.train.keras import KerasTrainer, variable_names
from enclavefl.vfl.keras_half import KerasHalf, KerasOptimizer
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 5)).astype(np.float32); y = (x[:, 0] > 0).astype(np.float32)
model = build_keras_model("mlp", in_features=5, hidden=[8])
loss = keras.losses.BinaryCrossentropy(from_logits=True)
trainer = KerasTrainer(model, loss, keras.optimizers.SGD(0.5), (x, y), (x, y), batch_size=8)
start = trainer.get_weights()
fit = trainer.fit(start, {"round": 1, "local_epochs": 5})
grads = trainer.gradients(fit.weights, {"round": 2})
half = KerasHalf(build_keras_model("bottom_mlp", in_features=5, out_features=3))
opt = KerasOptimizer([(half, keras.optimizers.SGD(0.1))])
a = half(torch.from_numpy(x)); opt.zero_grad(); a.backward(torch.ones_like(a)); opt.step()
print(json.dumps({"names": variable_names(model), "auc": trainer.evaluate(fit.weights, {}).metrics["auc"],
                  "grads": sorted(grads.gradients), "half": sorted(half.state_dict())}))
"""


def test_torch_backend() -> None:
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + TORCH_BACKEND_CHECK],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["names"] == ["hidden_0/kernel", "hidden_0/bias", "logits/kernel", "logits/bias"]
    assert result["auc"] > 0.9 and result["grads"] == sorted(result["names"])
    assert result["half"] == ["hidden_0/bias", "hidden_0/kernel", "out/bias", "out/kernel"]


def test_without_the_extra_a_keras_job_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from click.testing import CliRunner

    from enclavefl.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.partition(".")[0] == "keras" else real(name, *a)
    )
    job = EXAMPLES / "vfl_default_credit_keras.yaml"
    result = CliRunner().invoke(main, ["run", str(job)])
    assert result.exit_code == 2, result.output
    assert "Keras models (model framework: keras)" in result.output and "pip install 'enclavefl[tf]'" in result.output
    with pytest.raises(extras.MissingExtra, match=r"pip install 'enclavefl\[tf\]'"):
        extras.import_from_extra("keras", "tf", needed_for="Keras trainers")


# -- jobs ----------------------------------------------------------------------------------------


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enclavefl", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )


# -- a mixed vertical job ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def test_mixed_vfl_job_torch_leader_keras_follower_trains_exports_and_predicts(
    tmp_path: Path, tabular_dir: Path
) -> None:
    job = yaml.safe_load((EXAMPLES / "vfl_default_credit_keras.yaml").read_text())
    job["parties"][0]["address"] = f"localhost:{_free_port()}"
    for party in job["parties"]:
        party["data"]["path"] = str(tabular_dir / Path(party["data"]["path"]).name)
    job["policy"] = str(EXAMPLES / "policy-sim.json")
    job["model"]["top"]["framework"] = "torch"  # the leader is torch throughout: its own bottom too
    job["model"]["leader_bottom"] = {"name": "bottom_mlp", "args": {**job["model"]["bottom"]["args"]}}
    # The example's own settings (10 epochs: validation AUC 0.770-0.776 from epoch 4 on, 0.7756
    # at the last), on the cheaper join; the last epoch is exported, so that predict below
    # reproduces the last validation.
    job["training"].update(alignment="tee-join")
    job["storage"] = {"checkpoint_dir": "ckpt", "key": "file:job.key", "checkpoint_every": 1000}
    job["output"] = {"dir": "out", "keep": "last"}
    create_key_file(tmp_path / "job.key")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))

    trained = _run(tmp_path, "run", str(job_file))
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metrics"]["auc"] >= 0.77
    model_dir = tmp_path / "out" / "model"
    assert b"PK" not in (model_dir / "host.model.keras.sealed").read_bytes()[:64]  # native .keras, sealed
    assert not list(model_dir.glob("guest.*.keras.sealed"))  # the torch leader has no Keras part

    # Predict on exactly the validation rows: the same AUC as the last validation.
    from enclavefl.jobs.config import load_job
    from enclavefl.seal.keys import parse_key_spec
    from enclavefl.vfl.plan import TRAIN, Plan
    from enclavefl.vfl.storage import Storage

    config = load_job(job_file)
    guest_csv = Path(job["parties"][0]["data"]["path"])
    with open(guest_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    ids = np.array([r["id"] for r in rows])
    storage = Storage(
        config.storage.party_dir("guest"), parse_key_spec(f"file:{tmp_path / 'job.key'}"), config.job.id, "guest"
    )
    aligned = storage.load_alignment(ids)
    assert aligned is not None
    plan = Plan(
        TRAIN,
        aligned.size,
        job["training"]["batch_size"],
        job["training"]["epochs"],
        job["job"]["seed"],
        job["training"]["validation_fraction"],
    )
    validation = aligned.rows[plan.split()[1]]
    subset = tmp_path / "validation_guest.csv"
    with open(subset, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[i] for i in sorted(validation.tolist()))
    host_csv = job["parties"][1]["data"]["path"]
    predicted = _run(tmp_path, "predict", str(job_file), "--input", f"guest={subset}", "--input", f"host={host_csv}")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    scores = json.loads((tmp_path / "out" / "summary-predict.json").read_text())["metrics"]
    assert scores["auc"] == pytest.approx(summary["metrics"]["auc"], abs=1e-4)


@pytest.mark.slow  # a fourth multi-process Keras job; the path it adds (trainer: and a Keras factory) is its own
def test_api_hfl_keras_example_runs_a_three_worker_fedavg_job(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "api_hfl_keras.py"), "--out", str(tmp_path), "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == "fedavg" and summary["rounds"] == 2
    assert all(p["attested"] and p["exit_code"] == 0 for p in summary["parties"].values()), summary["parties"]
    assert summary["metrics"]["auc"] > 0.9
