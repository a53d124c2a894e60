"""The job file: examples load, every class of mistake names its field, paths and round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import missing_shared_data

from enclavefl.errors import ConfigError, UsageError
from enclavefl.jobs.config import (
    Address,
    CriteoData,
    CsvData,
    HflJobConfig,
    JobConfig,
    VflJobConfig,
    WideDeepData,
    dump_job,
    load_job,
    load_party_job,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def hfl_job() -> dict[str, Any]:
    return {
        "job": {"name": "t-hfl", "mode": "hfl"},
        "parties": [
            {"name": "ps", "role": "server", "address": "localhost:50051"},
            {"name": "w0", "role": "worker", "data": {"kind": "csv", "path": "data/a.csv", "label": "y"}},
            {"name": "w1", "role": "worker", "data": {"kind": "csv", "path": "data/b.csv", "label": "y"}},
        ],
        "tee": {"attester": "simulated", "allow_simulated_insecure": True},
        "policy": "policy.json",
        "model": {"name": "mlp", "args": {"in_features": 4}},
        "strategy": {"name": "fedavg", "rounds": 2, "batch_size": 8, "lr": 0.1},
    }


def vfl_job() -> dict[str, Any]:
    return {
        "job": {"name": "t-vfl", "mode": "vfl"},
        "parties": [
            {"name": "lead", "role": "leader", "address": "127.0.0.1:50052",
             "data": {"kind": "csv", "path": "g.csv", "label": "y"}},
            {"name": "fol", "role": "follower", "data": {"kind": "csv", "path": "h.csv"}},
        ],
        "tee": {"attester": "simulated", "allow_simulated_insecure": True},
        "policy": "policy.json",
        "model": {"bottom": {"name": "bottom_mlp"}, "top": {"name": "top_mlp"}},
        "training": {"epochs": 1, "batch_size": 4, "lr": 0.1},
    }


def write_job(directory: Path, data: dict[str, Any] | str, name: str = "job.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.json").write_text(json.dumps({"allow_simulated": True}))
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def config_error(directory: Path, data: dict[str, Any] | str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_job(write_job(directory, data))
    return str(caught.value)


# --------------------------------------------------------------------------- examples


def test_all_examples_are_present() -> None:
    names = {p.name for p in EXAMPLE_FILES}
    assert names == {
        "hfl_default_credit.yaml",
        "hfl_cifar10_resnet.yaml",
        "hfl_criteo_dlrm.yaml",
        "vfl_default_credit.yaml",
        "vfl_breast.yaml",
        "vfl_wide_deep.yaml",
        "hfl_default_credit_dp.yaml",
        "vfl_default_credit_label_dp.yaml",
        "vfl_default_credit_keras.yaml",
        "hfl_default_credit_keras.yaml",
        "hfl_diabetes_regression.yaml",
        "vfl_diabetes_regression.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_example_loads_with_simulated_attestation(path: Path) -> None:
    config = load_job(path)
    expected = HflJobConfig if path.name.startswith("hfl_") else VflJobConfig
    assert isinstance(config, expected)
    assert config.tee.attester == "simulated" and config.tee.allow_simulated_insecure
    # Examples with a privacy budget use a simulated policy that carries it.
    policy = "policy-sim.json" if config.privacy is None else f"policy-sim-dp-{config.privacy.unit}.json"
    assert config.policy == (EXAMPLES / policy).resolve()
    assert config.coordinator().address is not None
    assert config.members()


def test_example_policy_allows_simulated_and_pins_nothing() -> None:
    policy = json.loads((EXAMPLES / "policy-sim.json").read_text())
    assert policy["allow_simulated"] is True and policy["allow_debug"] is False
    for field in ("verify_mr_enclave", "verify_mr_signer", "verify_isv_prod_id", "verify_isv_svn"):
        assert policy[field] == "off"


@pytest.mark.parametrize("name", ["hfl_default_credit", "vfl_default_credit", "vfl_breast"])
def test_tabular_examples_point_at_shared_data(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default (../../shared/data from examples/) must find the shared checkout beside the repo.
    monkeypatch.delenv("ENCLAVEFL_SHARED_DATA", raising=False)
    if not (REPO.parent / "shared" / "data" / "tabular").is_dir():
        missing_shared_data(REPO.parent / "shared" / "data" / "tabular")
    config = load_job(EXAMPLES / f"{name}.yaml")
    paths = [p.data.path for p in config.parties if isinstance(p.data, CsvData)]
    if isinstance(config, HflJobConfig) and isinstance(config.evaluation.data, CsvData):
        paths.append(config.evaluation.data.path)
    assert paths and all(
        p.is_file() and p.parent == (REPO.parent / "shared" / "data" / "tabular").resolve() for p in paths
    )


def test_hfl_default_credit_example() -> None:
    config = load_job(EXAMPLES / "hfl_default_credit.yaml")
    assert isinstance(config, HflJobConfig)
    assert config.server().name == "server" and len(config.workers()) == 3
    assert [p.data.path.name for p in config.workers() if isinstance(p.data, CsvData)] == [
        "default_credit_homo_guest.csv",
        "default_credit_homo_host_1.csv",
        "default_credit_homo_host_2.csv",
    ]
    assert config.strategy.name == "fedavg" and config.strategy.local_epochs == 2
    assert config.evaluation.where == "server"
    assert (
        isinstance(config.evaluation.data, CsvData)
        and config.evaluation.data.path.name == "default_credit_homo_test.csv"
    )
    assert config.model.args["hidden"] == [64, 32]


def test_cifar10_example_gives_each_worker_a_disjoint_half() -> None:
    config = load_job(EXAMPLES / "hfl_cifar10_resnet.yaml")
    assert isinstance(config, HflJobConfig)
    assert config.model.name == "resnet56" and config.strategy.name == "sync-sgd"
    assert config.strategy.momentum == 0.9
    parts = [p.data.partition for p in config.workers() if p.data is not None]
    assert [(p.method, p.num_parts, p.index) for p in parts if p] == [("iid", 2, 0), ("iid", 2, 1)]


def test_criteo_example_gives_each_worker_its_own_rows() -> None:
    config = load_job(EXAMPLES / "hfl_criteo_dlrm.yaml")
    assert isinstance(config, HflJobConfig)
    data = [p.data for p in config.workers()]
    assert len(data) == 4 and all(isinstance(d, CriteoData) for d in data)
    assert sorted(d.partition.index for d in data if d is not None and d.partition) == [0, 1, 2, 3]
    assert {"auc", "logloss"} <= set(config.evaluation.metrics)


def test_vfl_examples() -> None:
    credit = load_job(EXAMPLES / "vfl_default_credit.yaml")
    assert isinstance(credit, VflJobConfig)
    leader, (follower,) = credit.leader(), credit.followers()
    assert isinstance(leader.data, CsvData) and leader.data.label == "y"
    assert isinstance(follower.data, CsvData) and follower.data.label is None
    assert credit.training.validation_fraction == 0.2

    wide = load_job(EXAMPLES / "vfl_wide_deep.yaml")
    assert isinstance(wide, VflJobConfig)
    assert (wide.training.batch_size, wide.training.epochs) == (32, 2)
    assert wide.model.leader_bottom is False
    assert all(isinstance(p.data, WideDeepData) and p.data.generate for p in wide.parties)


# --------------------------------------------------------------------------- mistakes


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    job = hfl_job()
    job["strategy"]["local_epoch"] = 2
    job["parties"][1]["data"]["lable"] = "y"
    message = config_error(tmp_path, job)
    assert "strategy.local_epoch: unknown field (did you mean 'local_epochs'?)" in message
    assert "parties[1].data.lable: unknown field (did you mean 'label'?)" in message


def test_section_of_the_other_mode_is_named(tmp_path: Path) -> None:
    job = hfl_job()
    job["training"] = {"epochs": 1}
    assert "training: only for vfl jobs (job.mode is 'hfl')" in config_error(tmp_path, job)


def test_wrong_role_for_mode(tmp_path: Path) -> None:
    job = hfl_job()
    job["parties"][2]["role"] = "leader"
    assert "parties[2].role: 'leader' is not a role in hfl mode (server, worker)" in config_error(tmp_path, job)


def test_two_servers(tmp_path: Path) -> None:
    job = hfl_job()
    job["parties"].append({"name": "ps2", "role": "server", "address": "localhost:50060"})
    assert "parties[3].role: a second server: parties[0] is the server" in config_error(tmp_path, job)


def test_missing_worker_and_missing_leader(tmp_path: Path) -> None:
    job = hfl_job()
    job["parties"] = job["parties"][:1]
    assert "parties: no worker: hfl jobs need at least one" in config_error(tmp_path / "h", job)
    vfl = vfl_job()
    vfl["parties"] = vfl["parties"][1:]
    assert "parties: no leader: vfl jobs have exactly one" in config_error(tmp_path / "v", vfl)


def test_duplicate_party_names(tmp_path: Path) -> None:
    job = hfl_job()
    job["parties"][2]["name"] = "w0"
    assert "parties[2].name: 'w0' is already the name of parties[1]" in config_error(tmp_path, job)


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("localhost", "expected 'host:port'"),
        ("localhost:0", "not a number in 1-65535"),
        ("localhost:65536", "not a number in 1-65535"),
        ("localhost:http", "not a number in 1-65535"),
        ("::1:50051", "IPv6 host in brackets"),
        ("[zz::1]:50051", "not an IPv6 address"),
        ("bad host:50051", "not a host name"),
        (50051, "expected 'host:port'"),
    ],
)
def test_bad_address(tmp_path: Path, address: Any, fragment: str) -> None:
    job = hfl_job()
    job["parties"][0]["address"] = address
    message = config_error(tmp_path, job)
    assert "parties[0].address: " in message and fragment in message


def test_address_forms_parse(tmp_path: Path) -> None:
    job = hfl_job()
    job["parties"][0]["address"] = "[::1]:50051"
    job["parties"][1]["address"] = "ps_1.example.org:443"
    config = load_job(write_job(tmp_path, job))
    assert config.party("ps").address == Address("::1", 50051)
    assert str(config.party("ps").address) == "[::1]:50051"
    assert config.party("w0").address == Address("ps_1.example.org", 443)


def test_server_needs_an_address(tmp_path: Path) -> None:
    job = hfl_job()
    del job["parties"][0]["address"]
    assert "parties[0].address: required for the server" in config_error(tmp_path, job)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ({"lr": -0.1}, "strategy.lr: Input should be greater than 0 (got -0.1)"),
        ({"batch_size": 0}, "strategy.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ({"momentum": 1.5}, "strategy.momentum: Input should be less than 1 (got 1.5)"),
        ({"name": "fedsgd"}, "strategy.name: got 'fedsgd', expected"),
        ({"mu": 0.01}, "strategy.mu: not a parameter of fedavg; used only by fedprox"),
        ({"name": "fedprox"}, "strategy.mu: required by fedprox"),
        ({"steps": 10}, "strategy.steps: not a parameter of fedavg"),
        ({"max_staleness": 2}, "strategy.max_staleness: not a parameter of fedavg; used only by async-sgd"),
        ({"name": "sync-sgd"}, "strategy.steps: required by sync-sgd"),
        ({"name": "sync-sgd", "steps": 5}, "strategy.rounds: not a parameter of sync-sgd"),
        ({"server_lr": 0.5}, "strategy.server_lr: not a parameter of fedavg; used only by fedadam"),
        ({"min_workers": 3}, "strategy.min_workers: 3 is more than the 2 worker(s)"),
    ],
)
def test_bad_strategy_parameter(tmp_path: Path, strategy: dict[str, Any], expected: str) -> None:
    job = hfl_job()
    job["strategy"].update(strategy)
    assert expected in config_error(tmp_path, job)


def test_strategy_defaults_apply_only_to_their_strategy(tmp_path: Path) -> None:
    job = hfl_job()
    job["strategy"] = {"name": "fedadam", "rounds": 3, "batch_size": 8, "lr": 0.1, "beta2": 0.999}
    config = load_job(write_job(tmp_path / "adam", job))
    assert isinstance(config, HflJobConfig)
    s = config.strategy
    assert (s.server_lr, s.beta1, s.beta2, s.tau, s.local_epochs) == (0.01, 0.9, 0.999, 1e-3, 1)
    assert s.mu is None and s.steps is None and s.max_staleness is None and s.staleness_policy is None

    job["strategy"] = {"name": "async-sgd", "steps": 100, "batch_size": 8, "lr": 0.1}
    config = load_job(write_job(tmp_path / "async", job))
    assert isinstance(config, HflJobConfig)
    assert config.strategy.max_staleness == 4 and config.strategy.staleness_policy == "refuse"
    assert config.strategy.local_epochs is None


def test_every_error_is_listed_at_once(tmp_path: Path) -> None:
    job = hfl_job()
    job["strategy"]["lr"] = 0
    job["tee"]["verify"] = "both"
    job["parties"][1]["address"] = "nowhere"
    lines = config_error(tmp_path, job).splitlines()
    assert lines[0].endswith("job.yaml: invalid job file:")
    assert {line.strip().split(":")[0] for line in lines[1:]} == {"strategy.lr", "tee.verify", "parties[1].address"}


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = "job:\n  name: x\n  mode: hfl\nparties:\n  - name: ps\n    role: [server\n"
    message = config_error(tmp_path, text)
    assert "job.yaml:7:1: invalid YAML:" in message


def test_yaml_duplicate_key_is_an_error(tmp_path: Path) -> None:
    text = yaml.safe_dump(hfl_job(), sort_keys=False).replace("  mode: hfl\n", "  mode: hfl\n  mode: vfl\n")
    assert "job.yaml:4:3: invalid YAML: duplicate key 'mode' (first at line 3)" in config_error(tmp_path, text)


@pytest.mark.parametrize(("text", "fragment"), [("", "empty job file"), ("- 1\n", "got list")])
def test_not_a_job_document(tmp_path: Path, text: str, fragment: str) -> None:
    assert fragment in config_error(tmp_path, text)


def test_missing_or_bad_mode(tmp_path: Path) -> None:
    job = hfl_job()
    del job["job"]["mode"]
    assert "job.mode: required, expected 'hfl' or 'vfl'" in config_error(tmp_path / "a", job)
    job["job"]["mode"] = "xfl"
    assert "job.mode: got 'xfl', expected 'hfl' or 'vfl'" in config_error(tmp_path / "b", job)


def test_missing_policy_file(tmp_path: Path) -> None:
    job = hfl_job()
    job["policy"] = "no-such-policy.json"
    message = config_error(tmp_path, job)
    assert f"policy: file {tmp_path.resolve() / 'no-such-policy.json'} not found" in message


def test_missing_job_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read job file"):
        load_job(tmp_path / "absent.yaml")


def test_simulated_attester_needs_the_insecure_flag(tmp_path: Path) -> None:
    job = hfl_job()
    job["tee"] = {"attester": "simulated"}
    assert "tee.allow_simulated_insecure: must be true to use attester 'simulated'" in config_error(tmp_path, job)


def test_pccs_and_offline_collateral_exclude_each_other(tmp_path: Path) -> None:
    job = hfl_job()
    job["tee"].update(pccs_url="https://pccs.example:8081/sgx/certification/v4/", collateral="c.json")
    assert "tee.collateral: give either pccs_url or collateral, not both" in config_error(tmp_path, job)


def test_data_kind_must_fit_the_mode(tmp_path: Path) -> None:
    job = vfl_job()
    job["parties"][1]["data"] = {"kind": "cifar10", "root": "c"}
    message = config_error(tmp_path / "a", job)
    assert "parties[1].data.kind: 'cifar10' is not available in vfl mode (csv, wide-deep, sklearn)" in message
    job["parties"][1]["data"] = {"kind": "parquet"}
    message = config_error(tmp_path / "b", job)
    assert "parties[1].data.kind: unknown kind 'parquet'" in message


def test_labels_stay_with_the_vfl_leader(tmp_path: Path) -> None:
    job = vfl_job()
    job["parties"][1]["data"]["label"] = "y"
    del job["parties"][0]["data"]["label"]
    message = config_error(tmp_path, job)
    assert "parties[0].data.label: required: the leader holds the labels" in message
    assert "parties[1].data.label: a follower holds no labels" in message


def test_hfl_server_holds_no_training_data(tmp_path: Path) -> None:
    job = hfl_job()
    job["parties"][0]["data"] = {"kind": "sklearn", "name": "digits"}
    assert "parties[0].data: the server trains on no data" in config_error(tmp_path, job)


def test_workers_may_not_read_the_same_rows(tmp_path: Path) -> None:
    job = hfl_job()
    for party in job["parties"][1:]:
        party["data"] = {"kind": "sklearn", "name": "digits", "partition": {"num_parts": 2, "index": 0}}
    assert "parties[2].data.partition.index: 0 is also the part of parties[1]" in config_error(tmp_path / "a", job)
    del job["parties"][2]["data"]["partition"]
    assert "parties[2].data: reads the same rows as parties[1]" in config_error(tmp_path / "b", job)
    job["parties"][2]["data"]["partition"] = {"num_parts": 2, "index": 1}
    config = load_job(write_job(tmp_path / "c", job))
    assert [p.data.partition.index for p in config.members() if p.data and p.data.partition] == [0, 1]


def test_partition_checks(tmp_path: Path) -> None:
    job = hfl_job()
    job["parties"][1]["data"]["partition"] = {"method": "dirichlet", "num_parts": 2, "index": 2}
    message = config_error(tmp_path, job)
    assert "parties[1].data.partition.index: 2 is out of range for num_parts 2" in message
    assert "parties[1].data.partition.alpha: required by method dirichlet" in message


def test_hfl_evaluation_where(tmp_path: Path) -> None:
    job = hfl_job()
    job["evaluation"] = {"where": "server"}
    assert "evaluation.data: required when where is server" in config_error(tmp_path / "a", job)
    job["evaluation"] = {"where": "workers", "data": {"kind": "sklearn", "name": "digits"}}
    assert "evaluation.data: only used when where is server" in config_error(tmp_path / "b", job)
    job["evaluation"] = {"metrics": ["auc", "auc"]}
    assert "evaluation.metrics: listed more than once: auc" in config_error(tmp_path / "c", job)
    del job["evaluation"]
    config = load_job(write_job(tmp_path / "d", job))
    assert isinstance(config, HflJobConfig)
    assert (config.evaluation.where, config.evaluation.holdout_fraction) == ("workers", 0.2)


def test_storage_key_spec(tmp_path: Path) -> None:
    job = hfl_job()
    job["storage"] = {"checkpoint_dir": "ckpt", "key": "kms:abc", "checkpoint_every": 1}
    assert "storage.key: 'kms:abc' is not a key spec" in config_error(tmp_path / "a", job)
    job["storage"]["key"] = "file:keys/job.key"
    config = load_job(write_job(tmp_path / "b", job))
    assert config.storage is not None
    assert config.storage.key == f"file:{(tmp_path / 'b' / 'keys' / 'job.key').resolve()}"
    assert config.storage.party_dir("ps") == (tmp_path / "b" / "ckpt" / "ps").resolve()


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_job_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_job(tmp_path / "jobs", hfl_job())
    monkeypatch.chdir(tmp_path)
    config = load_job(Path("jobs/job.yaml"))
    assert config.party("w0").data.path == (tmp_path / "jobs" / "data" / "a.csv").resolve()  # type: ignore[union-attr]
    assert config.policy == (path.parent / "policy.json").resolve()


def test_defaults_for_id_and_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_job(write_job(tmp_path / "j", hfl_job()))
    assert config.job.id == "t-hfl" and config.job.seed == 0
    assert config.output.dir == tmp_path.resolve() / "runs" / "t-hfl" and config.output.plot is True
    assert config.tee.verify == "two-way"


def test_env_var_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = hfl_job()
    job["parties"][1]["data"]["path"] = "${EFL_TEST_DATA}/a.csv"
    job["parties"][2]["data"]["path"] = "${EFL_TEST_UNSET:-fallback}/b.csv"
    job["output"] = {"dir": "~/runs/${EFL_TEST_DATA_NAME:-x}"}
    monkeypatch.setenv("EFL_TEST_DATA", str(tmp_path / "shared"))
    monkeypatch.delenv("EFL_TEST_UNSET", raising=False)
    monkeypatch.setenv("EFL_TEST_DATA_NAME", "named")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_job(write_job(tmp_path / "j", job))
    assert config.party("w0").data.path == (tmp_path / "shared" / "a.csv").resolve()  # type: ignore[union-attr]
    assert config.party("w1").data.path == (tmp_path / "j" / "fallback" / "b.csv").resolve()  # type: ignore[union-attr]
    assert config.output.dir == (tmp_path / "home" / "runs" / "named").resolve()

    monkeypatch.delenv("EFL_TEST_DATA")
    message = config_error(tmp_path / "k", job)
    assert "parties[1].data.path: environment variable EFL_TEST_DATA is not set" in message


def test_examples_follow_the_shared_data_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVEFL_SHARED_DATA", str(tmp_path))
    config = load_job(EXAMPLES / "vfl_breast.yaml")
    assert config.party("guest").data.path == tmp_path.resolve() / "tabular" / "breast_hetero_guest.csv"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- API


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_dump_round_trips(path: Path, tmp_path: Path) -> None:
    config = load_job(path)
    text = dump_job(config)
    copy_path = tmp_path / "elsewhere" / "dumped.yaml"
    copy_path.parent.mkdir()
    copy_path.write_text(text)
    again = load_job(copy_path)
    assert again == config
    assert dump_job(again) == text


def test_party_lookup_and_role_helpers(tmp_path: Path) -> None:
    config = load_job(write_job(tmp_path / "h", hfl_job()))
    assert isinstance(config, HflJobConfig)
    assert config.server().name == "ps" and [w.name for w in config.workers()] == ["w0", "w1"]
    assert config.mode == "hfl"
    with pytest.raises(UsageError, match="no party 'w9' in job 't-hfl'; parties: ps, w0, w1"):
        config.party("w9")
    vfl = load_job(write_job(tmp_path / "v", vfl_job()))
    assert isinstance(vfl, VflJobConfig)
    assert vfl.leader().name == "lead" and [f.name for f in vfl.followers()] == ["fol"]


def test_config_is_immutable(tmp_path: Path) -> None:
    config: JobConfig = load_job(write_job(tmp_path, hfl_job()))
    with pytest.raises(Exception, match="frozen"):
        config.job.seed = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- hostile values (issue 12, item 8)


@pytest.mark.parametrize(
    ("section", "field", "text", "fragment"),
    [
        ("strategy", "rounds", "true", "strategy.rounds: Input should be a valid integer"),
        ("strategy", "rounds", "1e30", "strategy.rounds: Input should be a valid integer"),
        ("strategy", "rounds", "1.0e+30", "strategy.rounds: Input should be a valid integer"),
        ("strategy", "rounds", "3.0", "strategy.rounds: Input should be a valid integer"),
        ("strategy", "rounds", "4294967296", "strategy.rounds: Input should be less than or equal to 2147483647"),
        ("strategy", "batch_size", "'8'", "strategy.batch_size: Input should be a valid integer"),
        ("strategy", "lr", ".inf", "strategy.lr: must be a finite number"),
        ("strategy", "lr", ".nan", "strategy.lr: must be a finite number"),
        ("strategy", "lr", "true", "strategy.lr: expected a number, got bool True"),
        ("strategy", "lr", "'0.1'", "strategy.lr: expected a number, got str '0.1'"),
        ("strategy", "momentum", "-.inf", "strategy.momentum: must be a finite number"),
        ("strategy", "round_timeout_s", "1.0e+300", "strategy.round_timeout_s: Input should be less than or equal to"),
        ("job", "seed", "true", "job.seed: Input should be a valid integer"),
        ("tee", "allow_simulated_insecure", "'on'", "tee.allow_simulated_insecure: Input should be a valid boolean"),
        ("tee", "allow_simulated_insecure", "1", "tee.allow_simulated_insecure: Input should be a valid boolean"),
    ],
)
def test_numbers_and_flags_are_strict_finite_and_bounded(
    tmp_path: Path, section: str, field: str, text: str, fragment: str
) -> None:
    data = hfl_job()
    data[section][field] = "PLACEHOLDER"
    text_job = yaml.safe_dump(data, sort_keys=False).replace("PLACEHOLDER", text)
    assert fragment in config_error(tmp_path, text_job)


def test_integers_still_read_as_floats(tmp_path: Path) -> None:
    data = hfl_job()
    data["strategy"].update(lr=1, round_timeout_s=60)
    job = load_job(write_job(tmp_path, data))
    assert isinstance(job, HflJobConfig) and job.strategy.lr == 1.0 and isinstance(job.strategy.lr, float)


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    deep = "a:\n  args: " + "[" * 5000 + "]" * 5000 + "\n"
    assert "nested deeper than" in config_error(tmp_path, deep)
    nested = hfl_job()
    value: Any = 1
    for _ in range(40):
        value = {"x": value}
    nested["model"]["args"]["in_features"] = value
    assert "model.args.in_features.x.x" in config_error(tmp_path, nested)


def test_yaml_alias_bomb_is_refused_before_validation(tmp_path: Path) -> None:
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}, *a{i - 1}]"
        for i in range(1, 9)
    ]
    text = yaml.safe_dump(hfl_job(), sort_keys=False) + "\n".join(lines) + "\n"
    assert "more than 100000 values" in config_error(tmp_path, text)


def test_coordinator_address_and_privacy_mechanism_fit_the_job(tmp_path: Path) -> None:
    job = hfl_job()
    del job["parties"][0]["address"]
    assert "parties[0].address: required for the server: it listens there and every worker dials it" in config_error(
        tmp_path / "a", job
    )
    job = {**hfl_job(), "privacy": {"mechanism": "dp-fedavg"}}
    job["strategy"] = {**job["strategy"], "name": "fedprox", "mu": 0.01}
    assert "dp-fedavg is the server's noised FedAvg: set strategy.name to fedavg (it is 'fedprox')" in config_error(
        tmp_path / "b", job
    )
    vfl = {**vfl_job(), "privacy": {"mechanism": "randomized-response"}, "task": {"type": "regression"}}
    assert "randomized-response flips class labels: it needs classification" in config_error(tmp_path / "c", vfl)


def test_load_party_job_defaults_to_the_coordinator_and_checks_mode_and_role() -> None:
    job_file, config, name = load_party_job(
        EXAMPLES / "vfl_breast.yaml", None, kind=VflJobConfig, role="leader", runs="lead runs vfl jobs"
    )
    assert (job_file, name) == ((EXAMPLES / "vfl_breast.yaml").resolve(), "guest")
    assert isinstance(config, VflJobConfig)
    with pytest.raises(UsageError, match=r"is a vfl job; serve runs hfl jobs"):
        load_party_job(EXAMPLES / "vfl_breast.yaml", None, kind=HflJobConfig, role="server", runs="serve runs hfl jobs")
    with pytest.raises(UsageError, match=r"party 'host' of .* is a follower, not a leader"):
        load_party_job(EXAMPLES / "vfl_breast.yaml", "host", kind=VflJobConfig, role="leader", runs="")


def test_output_keep_best_is_checked_against_the_mode_and_the_metrics(tmp_path: Path) -> None:
    job = vfl_job()
    assert load_job(write_job(tmp_path / "default", job)).output.keep == "last"
    best = load_job(write_job(tmp_path / "best", {**job, "output": {"keep": "best", "best_by": "logloss"}}))
    assert (best.output.keep, best.output.best_by) == ("best", "logloss")
    assert "keep" in config_error(tmp_path / "bad", {**job, "output": {"keep": "first"}})
    message = config_error(tmp_path / "hfl", {**hfl_job(), "output": {"keep": "best"}})
    assert "output.keep" in message and "hfl jobs export no model" in message
    assert "only used with keep: best" in config_error(tmp_path / "by", {**job, "output": {"best_by": "auc"}})
    # The default metrics (accuracy, logloss) have no auc to judge by.
    message = config_error(tmp_path / "auc", {**job, "output": {"keep": "best", "best_by": "auc"}})
    assert "output.best_by" in message and "'auc' is not one of the job's metrics (accuracy, logloss)" in message
    user = {**job, "training": {**job["training"], "metrics": ["mymetrics:score"]}, "output": {"keep": "best"}}
    assert "needs a metric to judge by" in config_error(tmp_path / "user", user)
    user["output"] = {"keep": "best", "best_by": "score"}
    assert "whether higher or lower is better is unknown" in config_error(tmp_path / "user2", user)
