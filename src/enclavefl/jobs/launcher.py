"""Run a whole job on this machine: every party as its own process, attesting and
connecting exactly as a remote party would, with progress, metrics, a summary and a plot.
"""

from __future__ import annotations

import ctypes
import math
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclavefl.errors import EnclaveflError, JobFailed, UsageError
from enclavefl.fsutil import atomic_write_bytes
from enclavefl.jobs.config import JobConfig, PartyConfig, load_job

__all__ = [
    "MEMBER_GRACE_S",
    "METRICS_FILE",
    "MetricsFollower",
    "PHASE_FILE",
    "PLOT_FILE",
    "PartyProcess",
    "RESULT_FILE",
    "RunResult",
    "SUMMARY_FILE",
    "append_metrics",
    "build_summary",
    "failure_report",
    "open_fresh_log",
    "party_command",
    "read_records",
    "result_file",
    "run_job",
    "start_party",
    "summary_file",
    "write_phase",
]

log = logging.getLogger("enclavefl.jobs")

__all__ = [
    "MEMBER_GRACE_S",
    "METRICS_FILE",
    "PHASE_FILE",
    "PLOT_FILE",
    "RESULT_FILE",
    "SUMMARY_FILE",
    "MetricsFollower",
    "PartyProcess",
    "RunResult",
    "append_metrics",
    "build_summary",
    "failure_report",
    "party_command",
    "read_records",
    "result_file",
    "run_job",
    "start_party",
    "summary_file",
    "write_phase",
]

METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "metrics.png"
PHASE_FILE = "phase.json"

_PR_SET_PDEATHSIG = 1

# After the coordinator is done, members get this long to finish before they are stopped.
MEMBER_GRACE_S = 30.0


@dataclass
class PartyProcess:
    name: str
    role: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: Any
    exit_code: int | None = None
    stopped: bool = False  # still running when the launcher stopped it
    exited_at: float = math.inf  # monotonic time the launcher saw it exit


@dataclass
class RunResult:
    """A local run: its summary.json, its output directory, and the parties that failed (exit codes)."""

    summary: dict[str, Any]
    out_dir: Path
    failed: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_if_failed(self) -> None:
        """Raise JobFailed naming the party that failed first (usually the cause), then the
        others, and where their logs are; nothing when every party succeeded."""
        if self.ok:
            return
        first, *others = self.summary.get("failures", [])
        then = "".join(f"; then {f['party']} (exit {f['exit_code']})" for f in others)
        raise JobFailed(
            f"party {first['party']} failed first (exit {first['exit_code']}): {first['error']}{then}; "
            f"logs in {self.out_dir}/logs"
        )


def result_file(task: str) -> str:
    """The coordinator's result of a task (training keeps the plain names)."""
    return RESULT_FILE if task == "train" else f"result-{task}.json"


def summary_file(task: str) -> str:
    return SUMMARY_FILE if task == "train" else f"summary-{task}.json"


def party_command(
    job_file: Path,
    name: str,
    out_dir: Path,
    *,
    resume: bool,
    task: str = "train",
    input_path: Path | None = None,
    write_split: bool = False,
) -> list[str]:
    cmd = [sys.executable, "-m", "enclavefl", "party", str(job_file), "--name", name, "--out", str(out_dir)]
    if task != "train":
        cmd += ["--task", task]
    if input_path is not None:
        cmd += ["--input", str(input_path)]
    if write_split:
        cmd += ["--write-split"]
    return cmd + (["--resume"] if resume else [])


def _child_env(parties: int) -> dict[str, str]:
    # Parties share this machine's cores; without a cap each torch process would use all.
    threads = str(max(1, (os.cpu_count() or 1) // parties))
    return {**os.environ, "ENCLAVEFL_TORCH_THREADS": threads, "OMP_NUM_THREADS": threads,
            "PYTHONUNBUFFERED": "1"}


def _load_prctl() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    except OSError:  # no libc to load (a static build): parties are then stopped by _stop only
        return None


# Resolved once, here: between fork and exec only async-signal-safe work is allowed, and
# loading a library there (dlopen takes locks another thread, e.g. the progress display,
# may hold at fork) can deadlock the child before it ever runs the party.
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the launcher dies, so no party is orphaned."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_party(
    job_file: Path,
    name: str,
    role: str,
    out_dir: Path,
    *,
    resume: bool,
    parties: int,
    task: str = "train",
    input_path: Path | None = None,
    write_split: bool = False,
) -> PartyProcess:
    log_path = out_dir / "logs" / f"{name}.log"
    log_file = open_fresh_log(log_path)
    process = subprocess.Popen(
        party_command(job_file, name, out_dir, resume=resume, task=task, input_path=input_path,
                      write_split=write_split),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=_child_env(parties),
        start_new_session=True,
        # Only prctl(PR_SET_PDEATHSIG) runs there, async-signal-safe; the launcher's threads hold no lock it needs.
        preexec_fn=_die_with_parent if _PRCTL is not None else None,  # noqa: PLW1509
    )
    return PartyProcess(name, role, process, log_path, log_file)


def open_fresh_log(path: Path) -> Any:
    """Open a party's log for this run: the previous run's log is kept once, as `<name>.log.1`,
    so a failed run's error never sits in the log of the successful rerun."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.replace(path, path.with_name(path.name + ".1"))
    return open(path, "wb")  # noqa: SIM115 - closed when the process is reaped


def _log_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _is_error(line: str) -> bool:
    return line.startswith(("enclavefl: error:", "enclavefl: rejected:")) or " ERROR " in line or " CRITICAL " in line


def _error_lines(path: Path, lines: int = 6) -> str:
    """A failed party's error lines; its log's tail (without connection retries) if none."""
    logged = _log_lines(path)
    errors = [line for line in logged if _is_error(line)]
    shown = errors or [line for line in logged if "failed (attempt " not in line]
    return "\n".join(shown[-lines:])


def _error(path: Path) -> str | None:
    """The party's own last error message (`enclavefl: error: ...`), else its last ERROR line."""
    logged = _log_lines(path)
    final = [line for line in logged if line.startswith(("enclavefl: error:", "enclavefl: rejected:"))]
    errors = final or [line for line in logged if _is_error(line)]
    if not errors and any(line.startswith("Traceback") for line in logged):
        errors = [line for line in logged if line.strip()][-1:]  # a crash: the exception line
    return errors[-1].removeprefix("enclavefl: error: ").removeprefix("enclavefl: ") if errors else None


def failure_report(procs: list[PartyProcess]) -> list[dict[str, Any]]:
    """Failed parties, the first to fail first: its error is usually the cause, and the others'
    (a refused connection, a peer that left) its consequences."""
    failed = [p for p in procs if p.exit_code not in (0, None) and not _left_behind(p, procs)]
    failed.sort(key=lambda p: (p.stopped, p.exited_at))
    return [
        {"party": p.name, "exit_code": p.exit_code, "first": index == 0,
         "error": _error(p.log_path) or ("stopped by the launcher after the others failed" if p.stopped
                                         else "no error message in its log")}
        for index, p in enumerate(failed)
    ]


def _read_phase(path: Path) -> str | None:
    try:
        phase = json.loads(path.read_text()).get("phase")
    except (OSError, ValueError, AttributeError):
        return None
    return phase if isinstance(phase, str) else None


def write_phase(out_dir: Path, phase: str) -> None:
    """The coordinator's current phase (attesting, aligning, training, exporting, ...), for progress."""
    atomic_write_bytes(out_dir / PHASE_FILE, json.dumps({"phase": phase}).encode())


class MetricsFollower:
    """Reads new lines of metrics.jsonl as the coordinator appends them."""

    def __init__(self, path: Path, *, from_end: bool = False) -> None:
        self.path = path
        self._offset = path.stat().st_size if from_end and path.exists() else 0
        self.records: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        new = [json.loads(line) for line in complete.splitlines() if line.strip()]
        self.records.extend(new)
        return new


def run_job(
    job_file: Path,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = None,
    task: str = "train",
    inputs: dict[str, Path] | None = None,
    on_phase: Callable[[str], None] | None = None,
    write_split: bool = False,
) -> RunResult:
    """Start every party of `job_file` as a local process and wait for the job to end.

    `task` is train, or for vertical jobs align or predict; `inputs` maps each party to
    its input file for predict.
    """
    job_file = Path(job_file).resolve()
    job = load_job(job_file)
    everyone = [job.coordinator(), *job.members()]
    inputs = _check_task_inputs(job, job_file, everyone, task, dict(inputs or {}))
    out = _prepare_out_dir(job, out_dir, task, resume=resume)

    started = time.monotonic()
    procs = [
        start_party(job_file, p.name, p.role, out, resume=resume, parties=len(everyone), task=task,
                    input_path=inputs.get(p.name), write_split=write_split)
        for p in everyone
    ]
    follower = MetricsFollower(out / METRICS_FILE, from_end=task != "train")
    warm_up = _PlottingWarmUp() if task == "train" and job.output.plot else None
    deadline = None if timeout_s is None else started + timeout_s
    _wait_for_parties(procs, follower, on_metrics, warm_up, deadline=deadline, on_phase=on_phase)

    summary = build_summary(job, out, procs, time.monotonic() - started, task=task)
    atomic_write_bytes(out / summary_file(task), json.dumps(summary, indent=2).encode())
    if task == "train" and job.output.plot and follower.records:
        from enclavefl.jobs.report import plot_metrics

        plot_metrics(follower.records, out / PLOT_FILE, title=job.job.name)
    failures = summary.get("failures", [])
    _log_failures(procs, failures)
    failed = {f["party"]: f["exit_code"] for f in failures}
    return RunResult(summary=summary, out_dir=out, failed=failed)  # type: ignore[arg-type]


def _wait_for_parties(
    procs: list[PartyProcess],
    follower: MetricsFollower,
    on_metrics: Callable[[dict[str, Any]], None] | None,
    warm_up: _PlottingWarmUp | None,
    *,
    deadline: float | None,
    on_phase: Callable[[str], None] | None,
) -> None:
    """Supervise the parties until the job is over (SIGTERM interrupts it), stop any left,
    and pass on every metrics record (the first starts the plotting warm-up)."""

    def forward(record: dict[str, Any]) -> None:
        if warm_up is not None:
            warm_up.start()
        if on_metrics is not None:
            on_metrics(record)

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _supervise(procs, follower, forward, deadline=deadline, on_phase=on_phase)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in procs:
            _stop(proc)
    for record in follower.poll():
        if on_metrics:
            on_metrics(record)


def _check_task_inputs(
    job: JobConfig, job_file: Path, everyone: list[PartyConfig], task: str, inputs: dict[str, Path]
) -> dict[str, Path]:
    """The task suits the job, and `inputs` name only its parties (for predict: every one)."""
    if task != "train" and job.mode != "vfl":
        raise UsageError(f"{task} is a step of vertical jobs; {job_file} is a {job.mode} job")
    unknown = sorted(set(inputs) - {p.name for p in everyone})
    if unknown:
        raise UsageError(f"--input for unknown parties {unknown}; the job's parties are {[p.name for p in everyone]}")
    if task == "predict":
        missing = [p.name for p in everyone if p.name not in inputs]
        if missing:
            raise UsageError(f"predict needs an input file for every party (--input NAME=PATH); missing: {missing}")
    return inputs


def _prepare_out_dir(job: JobConfig, out_dir: Path | None, task: str, *, resume: bool) -> Path:
    """The output directory, created; a fresh run removes the last run's results of this task."""
    out = Path(out_dir or job.output.dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from enclavefl.jobs.runtime import storage_key

    storage_key(job)  # simulation: create a missing file: key once, before the parties race for it
    stale = [result_file(task), summary_file(task), PHASE_FILE] + ([METRICS_FILE] if task == "train" else [])
    if not resume:
        for name in stale:
            (out / name).unlink(missing_ok=True)
    return out


def _log_failures(procs: list[PartyProcess], failures: list[dict[str, Any]]) -> None:
    """The first failure with the last error lines of its log, then one line for each other."""
    for index, failure in enumerate(failures):
        proc = next(p for p in procs if p.name == failure["party"])
        if index == 0:
            log.error("party %s failed first (exit %s): %s\nits last error lines (%s):\n%s", proc.name,
                      proc.exit_code, failure["error"], proc.log_path, _error_lines(proc.log_path))
        else:
            log.error("then party %s (exit %s): %s", proc.name, proc.exit_code, failure["error"])


def _left_behind(proc: PartyProcess, procs: list[PartyProcess]) -> bool:
    """A member the launcher stopped after the coordinator had finished the job without it
    (a quorum let the rounds close without a late or slow member): not a failure."""
    return proc is not procs[0] and proc.stopped and procs[0].exit_code == 0


class _PlottingWarmUp:
    """Imports matplotlib in the background once the parties train (the launcher only
    waits then), so that the plot at the end does not add that second or more to the job."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._import, name="plot-warm-up", daemon=True)
            self._thread.start()

    @staticmethod
    def _import() -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except ImportError as exc:  # the plot at the end reports it (with the extra to install)
            log.debug("matplotlib not importable yet: %s", exc)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _supervise(
    procs: list[PartyProcess],
    follower: MetricsFollower,
    on_metrics: Callable[[dict[str, Any]], None] | None,
    deadline: float | None,
    on_phase: Callable[[str], None] | None = None,
) -> None:
    watch = _Watch(procs, on_phase)
    while True:
        for record in follower.poll():
            if on_metrics:
                on_metrics(record)
        _reap(procs)
        watch.report_phase()
        if watch.over():
            return
        if deadline is not None and time.monotonic() > deadline:
            raise UsageError(f"job did not finish within its time limit; logs in {procs[0].log_path.parent}")
        time.sleep(0.05)  # cheap: a few polls; a party that exits is noticed at once


def _reap(procs: list[PartyProcess]) -> None:
    """Note the exit code and time of every party that has exited."""
    for proc in procs:
        if proc.exit_code is None:
            proc.exit_code = proc.process.poll()
            if proc.exit_code is not None:
                proc.exited_at = time.monotonic()


class _Watch:
    """When a local job is over: every party exited, the coordinator failed, or one side
    (the coordinator, or every member) has been gone for longer than MEMBER_GRACE_S."""

    def __init__(self, procs: list[PartyProcess], on_phase: Callable[[str], None] | None) -> None:
        self._procs = procs
        self._on_phase = on_phase
        self._phase_path = procs[0].log_path.parent.parent / PHASE_FILE
        self._last_phase: str | None = None
        self._coordinator_done_at: float | None = None
        self._members_done_at: float | None = None

    def report_phase(self) -> None:
        """Tell `on_phase` when the coordinator has entered a new phase."""
        if self._on_phase is None:
            return
        phase = _read_phase(self._phase_path)
        if phase is not None and phase != self._last_phase:
            self._last_phase = phase
            self._on_phase(phase)

    def over(self) -> bool:
        coordinator = self._procs[0]
        if coordinator.exit_code is not None and self._coordinator_done_at is None:
            self._coordinator_done_at = time.monotonic()
        if all(p.exit_code is not None for p in self._procs):
            return True
        if coordinator.exit_code not in (None, 0):
            log.error("coordinator %s failed (exit %s); stopping the other parties", coordinator.name,
                      coordinator.exit_code)
            return True
        now = time.monotonic()
        if self._coordinator_done_at is not None and now - self._coordinator_done_at > MEMBER_GRACE_S:
            log.warning("coordinator finished %.0f s ago; stopping the remaining parties", MEMBER_GRACE_S)
            return True
        if self._members_done_at is None and all(p.exit_code is not None for p in self._procs[1:]):
            self._members_done_at = now
        if self._members_done_at is not None and now - self._members_done_at > MEMBER_GRACE_S:
            # No local member is left to rejoin: the coordinator would only wait out its timeouts.
            log.error("every member has exited; stopping the coordinator %s", coordinator.name)
            return True
        return False


def _stop(proc: PartyProcess) -> None:
    if proc.process.poll() is None:
        proc.stopped = True
        os.killpg(proc.process.pid, signal.SIGTERM)
        try:
            proc.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.process.pid, signal.SIGKILL)
            proc.process.wait()
    if proc.exit_code is None:
        proc.exit_code = proc.process.returncode
        proc.exited_at = time.monotonic()
    proc.log_file.close()


def build_summary(
    job: JobConfig, out: Path, procs: list[PartyProcess], wall_s: float, *, task: str = "train"
) -> dict[str, Any]:
    """summary.json: what ran, the final metrics, and who was attested by whom."""
    result = _read_json(out / result_file(task)) or {}
    peers_seen: dict[str, Any] = result.get("peers", {})
    records = {p.name: _read_json(out / "parties" / f"{p.name}.json") or {} for p in procs}
    parties: dict[str, Any] = {}
    for proc in procs:
        record = records[proc.name]
        if proc is procs[0]:
            # The coordinator counts as attested when every member verified its evidence.
            attested = all(records[p.name].get("verified_coordinator", False) for p in procs[1:])
        else:
            attested = bool(peers_seen.get(proc.name, {}).get("attested", False))
        parties[proc.name] = {
            "role": proc.role,
            "tee": record.get("tee"),
            "mr_enclave": record.get("mr_enclave"),
            "attested": attested,
            "exit_code": proc.exit_code,
            **{key: record[key] for key in ("privacy", "stopped") if key in record},
        }
        if _left_behind(proc, procs):
            parties[proc.name]["note"] = "stopped by the launcher: the job finished without it"
        if task == "predict" and "dropped_rows" in record:
            parties[proc.name].update(input_rows=record.get("input_rows"), dropped_rows=record["dropped_rows"])
    summary: dict[str, Any] = {
        "job": job.job.name,
        "job_id": job.job.id,
        "mode": job.mode,
        "wall_s": round(wall_s, 3),
        "metrics": result.get("metrics", {}),
        "parties": parties,
    }
    split = _hfl_split(job, procs, records, summary["metrics"]) if task == "train" and job.mode == "hfl" else None
    if split is not None:
        summary["split"] = split
    for key in ("final", "best", "health"):
        if key in result:
            summary[key] = result[key]
    failures = failure_report(procs)
    if failures:
        summary["failures"] = failures
    summary.update(result.get("extra", {}))
    stopped_here = {result["stopped"]} if "stopped" in result else set()
    stopped = sorted({p["stopped"] for p in parties.values() if "stopped" in p} | stopped_here)
    if stopped:
        summary["stopped"] = "; ".join(stopped)
    spent = {name: p["privacy"] for name, p in parties.items() if "privacy" in p}
    if "privacy" in result:
        spent[procs[0].name] = result["privacy"]
    if spent:
        summary["privacy"] = spent
    return summary


def _hfl_split(
    job: JobConfig, procs: list[PartyProcess], records: dict[str, Any], metrics: dict[str, Any]
) -> dict[str, Any] | None:
    """Training and evaluation rows of an hfl run, as the workers recorded them."""
    workers = [records[p.name] for p in procs[1:] if "n_train" in records[p.name]]
    if not workers:
        return None
    where = job.evaluation.where  # type: ignore[attr-defined]
    if where == "workers":
        n_valid: Any = sum(int(r.get("n_valid", 0)) for r in workers)
        drawn = (
            "each worker holds out round(rows * holdout_fraction) of its own rows, by "
            "numpy.random.default_rng(seed).permutation(rows); --write-split writes each worker's ids"
        )
    else:
        n_valid = metrics.get("count")
        drawn = "the server evaluates on evaluation.data, every row of it"
    return {
        "n_train": sum(int(r["n_train"]) for r in workers),
        "n_valid": n_valid,
        "seed": job.job.seed,
        "evaluation": where,
        "drawn": drawn,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise EnclaveflError(f"cannot read {path}: {err}") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics.jsonl file (none if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def append_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    """Append one record to metrics.jsonl (one line per round/eval), flushed at once."""
    with open(out_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
