"""examples/hfl_default_credit.yaml end to end against the physical floor.

The job: `enclavefl run` of the example (a parameter server and three workers, each its
own attested process, sealed checkpoints, server evaluation every round, the plot), on a
copy of the example whose storage and output lie in a temporary directory (the data, the
model, the strategy and the policy are the example's).

The floor: one fresh local process (its own interpreter start and imports included) that
loads the three workers' rows and runs the same training steps of the same model (the
job's rounds x local epochs x batches, for every worker, one after the other, with the
same local SGD), and nothing else: no TEE, no network, no evaluation, no checkpoints.
`floor_one_worker_s` is the same for one worker only (the workers of the job train side
by side, when the machine has the cores).

The breakdown is read from the parties' log lines (millisecond timestamps):
process start and imports (launch -> every party's first line), attestation and admission
(-> the last worker joined), the first round, the other rounds' training, evaluation,
checkpoints, shutdown (last checkpoint -> the command returned, plot included).

    python bench/bench_floor.py [--repeat N]

Prints one JSON object; `ratio` = job wall / floor wall (target <= 2.5). These are shared
2-core machines: compare figures of one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hfl_default_credit.yaml"
SHARED_DATA = Path(os.environ.get("ENCLAVEFL_SHARED_DATA") or REPO.parent / "shared" / "data").resolve()
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def prepare(work: Path) -> Path:
    """The example job in `work`, its storage and output there too (and a key made for it)."""
    job = yaml.safe_load(EXAMPLE.read_text())
    shutil.copy(EXAMPLE.parent / job["policy"], work / job["policy"])
    job["storage"]["checkpoint_dir"] = str(work / "checkpoints")
    job["storage"]["key"] = f"file:{work / 'checkpoint.key'}"
    job["output"]["dir"] = str(work / "out")
    path = work / EXAMPLE.name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    subprocess.run([sys.executable, "-m", "enclavefl", "keygen", str(work / "checkpoint.key")],
                   check=True, capture_output=True)
    return path


def run_job(job_file: Path, out: Path) -> tuple[float, float]:
    env = {**os.environ, "ENCLAVEFL_SHARED_DATA": str(SHARED_DATA)}
    started_wall = time.time()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "enclavefl", "run", str(job_file), "--out", str(out)],
                          capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return started_wall, wall


def _lines(path: Path) -> list[tuple[float, str]]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        match = _STAMP.match(line)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.append((stamp, line[match.end():]))
    return found


def breakdown(out: Path, started: float, wall: float) -> dict[str, float]:
    logs = {p.stem: _lines(p) for p in (out / "logs").glob("*.log")}
    server = logs["server"]

    def first(pattern: str) -> float:
        return next(t for t, text in server if re.search(pattern, text))

    def every(pattern: str) -> list[float]:
        return [t for t, text in server if re.search(pattern, text)]

    started_up = max(lines[0][0] for lines in logs.values())
    joined = max(every(r"worker \S+ joined at version"))
    closes = every(r"round \d+/\d+ closed")
    evals = every(r"evaluation at version")
    checkpoints = every(r"checkpoint of version \d+ sealed")
    eval_s = sum(e - c for c, e in zip(closes, evals, strict=True))
    checkpoint_s = sum(k - e for e, k in zip(evals, checkpoints, strict=True))
    # Rounds after the first: from the previous round's last checkpoint to this close.
    training_s = sum(c - k for k, c in zip(checkpoints[:-1], closes[1:], strict=True))
    return {
        "process_start_and_imports_s": round(started_up - started, 3),
        "attestation_and_admission_s": round(joined - started_up, 3),
        "first_round_s": round(closes[0] - joined, 3),
        "other_rounds_training_s": round(training_s, 3),
        "evaluation_s": round(eval_s, 3),
        "checkpoints_s": round(checkpoint_s, 3),
        "shutdown_s": round(started + wall - checkpoints[-1], 3),
        "later_round_median_s": round(statistics.median(b - a for a, b in zip(closes, closes[1:], strict=False)), 3),
        "server_listening_after_attestation_s": round(
            first(r"serving on") - first(r"INSECURE simulated attestation|attestation"), 3),
    }


def floor(workers: list[str]) -> float:
    """Wall seconds of a fresh process that runs only the training steps of `workers`."""
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--floor", *workers], check=True,
                   env={**os.environ, "ENCLAVEFL_SHARED_DATA": str(SHARED_DATA), "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - started


def _floor_body(workers: list[str]) -> None:
    import numpy as np
    import torch

    from enclavefl.data.tabular import load_fate_csv
    from enclavefl.data.tensors import batch_indices
    from enclavefl.models import mlp
    from enclavefl.train.losses import default_loss
    from enclavefl.train.optim import PlainSGD

    torch.set_num_threads(1)
    job = yaml.safe_load(EXAMPLE.read_text())
    strategy, args = job["strategy"], job["model"]["args"]
    parties = {p["name"]: p for p in job["parties"]}
    for name in workers:
        path = parties[name]["data"]["path"].replace("${ENCLAVEFL_SHARED_DATA:-../../shared/data}", str(SHARED_DATA))
        table = load_fate_csv(path)
        x, y = torch.from_numpy(np.ascontiguousarray(table.X)), torch.from_numpy(table.y.astype(np.float32))
        torch.manual_seed(job["job"]["seed"])
        model = mlp(args["in_features"], tuple(args["hidden"]), args["out_features"])
        for round_ in range(strategy["rounds"]):
            optimizer = PlainSGD(model.parameters(), lr=strategy["lr"], momentum=strategy["momentum"])
            for epoch in range(strategy["local_epochs"]):
                seed = job["job"]["seed"] + round_ * strategy["local_epochs"] + epoch
                for index in batch_indices(len(y), strategy["batch_size"], shuffle=True, seed=seed):
                    picked = torch.from_numpy(index)
                    optimizer.zero_grad()
                    default_loss(model(x[picked]), y[picked]).backward()
                    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="job runs (the median is reported)")
    parser.add_argument("--floor", nargs="+", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.floor:
        _floor_body(options.floor)
        return
    workers = [p["name"] for p in yaml.safe_load(EXAMPLE.read_text())["parties"] if p["role"] == "worker"]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        for i in range(options.repeat):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            job_file = prepare(work)
            started, wall = run_job(job_file, work / "out")
            runs.append({"wall_s": round(wall, 3), **breakdown(work / "out", started, wall)})
            summary = json.loads((work / "out" / "summary.json").read_text())
            runs[-1]["auc"] = summary["metrics"].get("auc")
    floor_all = floor(workers)
    floor_one = floor(workers[:1])
    job_wall = statistics.median(r["wall_s"] for r in runs)
    ratio, ratio_one = round(job_wall / floor_all, 3), round(job_wall / floor_one, 3)
    print(json.dumps({
        "headline": [
            {"name": "hfl_default_credit job / floor (its training steps in one process)", "value": ratio,
             "op": "<=", "target": 2.5},
            {"name": "hfl_default_credit job / one worker's steps in one process", "value": ratio_one,
             "op": "<=", "target": 2.5},
        ],
        "job": str(EXAMPLE.relative_to(REPO)),
        "job_wall_s": job_wall,
        "floor_s": round(floor_all, 3),
        "floor_one_worker_s": round(floor_one, 3),
        "ratio": ratio,
        "ratio_to_one_worker_floor": ratio_one,
        "target_ratio": 2.5,
        "runs": runs,
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
    }, indent=2))


if __name__ == "__main__":
    main()
