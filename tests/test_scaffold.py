"""`enclavefl new`: every template writes a complete project that validates, measures its own
code, and ships container files that lint clean. (Running each project end to end, from the
installed wheel, is test_wheel.py's.)"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from enclavefl.cli import main
from enclavefl.jobs.config import load_job
from enclavefl.jobs.gramine import plan_manifest
from enclavefl.scaffold import TEMPLATES, create_project, project_name
from enclavefl.tee.measure import simulated_measurement
from enclavefl.tee.policy import Policy
from test_deploy_docker import hadolint

def party_measurement(project: Path) -> bytes:
    """What a party of the project reports (jobs/runtime.py's measurement)."""
    job = load_job(project / "job.yaml")
    return simulated_measurement([project / "job.yaml"], code=job.job_code().measured()).mr_enclave


COMMON_FILES = {"job.yaml", "policy.json", "model.py", "README.md", "Dockerfile", "compose.yaml", ".dockerignore",
                ".gitignore"}


@pytest.fixture(params=sorted(TEMPLATES))
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    create_project(tmp_path / "my-job", request.param)
    return tmp_path / "my-job"


def test_project_is_complete_and_valid(project: Path) -> None:
    assert {p.name for p in project.iterdir()} >= COMMON_FILES
    for path in project.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(encoding="utf-8"), f"unrendered placeholder in {path}"
    job = load_job(project / "job.yaml")
    assert job.job.name == "my-job"
    assert job.tee.attester == "simulated" and Policy.load(job.policy).allow_simulated
    for party in job.parties:
        if party.data is not None:
            assert party.data.path.is_file() and party.data.path.parent == project / "data"
    assert job.output.dir == project / "runs"


def test_data_is_generated_small_and_deterministic(tmp_path: Path) -> None:
    for template in TEMPLATES:
        create_project(tmp_path / f"a-{template}", template)
        create_project(tmp_path / f"b-{template}", template)
        for csv in (tmp_path / f"a-{template}" / "data").iterdir():
            assert csv.read_bytes() == (tmp_path / f"b-{template}" / "data" / csv.name).read_bytes()
            assert csv.stat().st_size < 200_000


def test_vfl_data_needs_alignment(tmp_path: Path) -> None:
    create_project(tmp_path / "v", "vfl-tabular")
    leader = [line.split(",")[0] for line in (tmp_path / "v" / "data" / "leader.csv").read_text().splitlines()[1:]]
    follower = [line.split(",")[0] for line in (tmp_path / "v" / "data" / "follower.csv").read_text().splitlines()[1:]]
    assert len(set(leader) & set(follower)) == 700
    assert set(leader) - set(follower) and set(follower) - set(leader)
    assert follower != sorted(follower), "the follower's rows come in its own order"


def test_readme_gives_run_pin_and_deploy(project: Path) -> None:
    readme = (project / "README.md").read_text()
    commands = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert commands is not None
    lines = commands.group(1).strip().splitlines()
    assert len(lines) == 3
    job = str(project / "job.yaml")
    assert lines[0].startswith(f"enclavefl run {job}")
    assert f"enclavefl measure --job {job} --json" in lines[1] and "enclavefl policy init --from-measure" in lines[1]
    assert lines[2].startswith(f"docker compose -f {project / 'compose.yaml'} up --build")


def test_pin_commands_of_the_readme_pin_this_project(project: Path, tmp_path: Path) -> None:
    """README step 2, as written (in a shell): the policy then pins exactly what the parties report."""
    readme = (project / "README.md").read_text()
    pin = re.search(r"```sh\n.*?\n(.*?)\s+# 2\. pin\n", readme, re.S).group(1)
    runner = CliRunner()
    measure, init = pin.split(" && ")
    args = measure.split()[1:]
    out = Path(args[args.index(">") + 1])
    result = runner.invoke(main, args[: args.index(">")])
    assert result.exit_code == 0, result.output
    out.write_text(result.output)
    result = runner.invoke(main, init.split()[1:])
    assert result.exit_code == 0, result.output
    policy = Policy.load(project / "policy.json")
    assert policy.allow_simulated and "mr_enclave" in policy.enabled_sgx_fields
    assert policy.sgx_mrs[0].mr_enclave == party_measurement(project).hex()


def test_the_code_beside_the_job_is_measured(project: Path) -> None:
    job = load_job(project / "job.yaml")
    code = sorted(project.glob("*.py"))
    assert sorted(job.job_code().measured().values()) == code, "every module of the project is measured"
    for module in code:
        before = party_measurement(project)
        with module.open("a") as handle:
            handle.write("\n# an edit\n")
        assert party_measurement(project) != before, module


def test_gramine_trusts_the_model_and_allows_the_data(project: Path) -> None:
    job = load_job(project / "job.yaml")
    party = job.parties[-1].name
    plan = plan_manifest(project / "job.yaml", party)
    assert f"file:{project / 'model.py'}" in plan.trusted
    assert f"file:{project / 'data'}/" in plan.allowed, "data is its own directory, not beside the code"


def test_dockerfile_lints_clean(project: Path) -> None:
    done = subprocess.run([hadolint(), "--format", "json", str(project / "Dockerfile")], capture_output=True,
                          text=True, check=False, timeout=60)
    findings = json.loads(done.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_compose_file_matches_the_spec_and_the_job(project: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    vendor = pytest.importorskip("check_jsonschema.builtin_schemas.vendor")
    from importlib import resources

    schema = json.loads(resources.files(vendor).joinpath("compose-spec.json").read_text())
    doc = yaml.safe_load((project / "compose.yaml").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [e.message for e in validator.iter_errors(doc)] == []
    job = load_job(project / "job.yaml")
    assert set(doc["services"]) == {p.name for p in job.parties}
    coordinator = job.parties[0]
    assert str(coordinator.address.port) in str(doc["services"][coordinator.name]["healthcheck"]["test"])
    for party in job.parties:
        service = doc["services"][party.name]
        assert service["command"] == ["party", "/project/job.yaml", "--name", party.name]
        mounted = [v.split(":")[0] for v in service["volumes"] if v.startswith("./")]
        own = {f"./data/{party.data.path.name}"} if party.data is not None else set()
        if getattr(job, "evaluation", None) is not None and job.evaluation.data is not None and party is coordinator:
            own.add(f"./data/{job.evaluation.data.path.name}")
        assert set(mounted) == own, f"{party.name} sees only its own data"


def test_new_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["new", str(tmp_path / "taken"), "--template", "hfl-tabular"])
    assert result.exit_code == 2 and "not an empty directory" in result.output
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]


def test_new_names_the_templates_for_an_unknown_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["new", str(tmp_path / "x"), "--template", "nope"])
    assert result.exit_code == 2
    assert all(name in result.output for name in TEMPLATES) and not (tmp_path / "x").exists()


def test_new_list_describes_every_template() -> None:
    result = CliRunner().invoke(main, ["new", "--list"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == list(TEMPLATES)


def test_project_name_is_a_valid_job_name(tmp_path: Path) -> None:
    assert project_name(tmp_path / "My Project!") == "My-Project"
    assert project_name(tmp_path / "___") == "enclavefl-project"


def test_every_template_folder_is_a_template() -> None:
    from importlib.resources import files

    folders = {entry.name for entry in files("enclavefl").joinpath("share", "templates").iterdir()
               if entry.is_dir() and not entry.name.startswith("_")}
    assert folders == set(TEMPLATES)


def test_the_image_installs_the_extras_the_job_needs(project: Path) -> None:
    from enclavefl.extras import extras_for_job

    needed = set(extras_for_job(load_job(project / "job.yaml")))
    spec = re.search(r'^ARG ENCLAVEFL_SPEC="enclavefl\[([a-z,]+)\]==', (project / "Dockerfile").read_text(), re.M)
    assert spec is not None and set(spec.group(1).split(",")) == needed
