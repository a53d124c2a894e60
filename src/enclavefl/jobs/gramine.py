"""Gramine-SGX enclaves for the parties of a job: render the manifest, sign it, read its identity.

One template (enclavefl/share/gramine/enclavefl.manifest.template, package data) serves every role. `plan_manifest`
decides, for one party of one job, what its enclave measures and what it may touch:

* trusted (hashed into mr_enclave): the Python interpreter, its libraries and standard
  library, site-packages, the enclavefl package, the job file, and the policy unless the
  policy pins mr_enclave (a file cannot list the hash of the enclave that contains it);
* allowed (readable, not measured): the party's data, its output directory, an offline
  collateral file, and the host's DCAP/network configuration. Data is never measured, so
  parties holding different data do not reject each other (CCZoo measured its data set);
* encrypted: the party's checkpoint directory, a Gramine `encrypted` mount keyed by the SGX
  sealing key (`sgx-seal:` key specs) or by a key the party provisions inside the enclave
  from its key source (`broker:`, `file:`; see `provision_mount_key`).

`render_manifest` fills the template; `build_enclave` then runs gramine-manifest and
gramine-sgx-sign where Gramine is installed and reads mr_enclave, mr_signer, isv_prod_id and
isv_svn back from the SIGSTRUCT. Where it is not, the manifest is still written and the
result says which tools were missing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import string
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path, PurePosixPath


import enclavefl
from enclavefl.errors import ConfigError, FormatError, UsageError
from enclavefl.fsutil import atomic_write_bytes
from enclavefl.jobs.config import (
    Cifar10Data,
    CriteoData,
    CsvData,
    HflJobConfig,
    JobConfig,
    SklearnData,
    WideDeepData,
    load_job,
)
from enclavefl.seal.keys import GRAMINE_KEYS_DIR, KeySource, derive_mount_key
from enclavefl.tee.measure import Measurement, mr_signer_of_key, read_sigstruct
from enclavefl.tee.policy import Policy

log = logging.getLogger(__name__)

__all__ = [
    "APP_NAME",
    "CHECKPOINT_KEY_NAME",
    "BuildResult",
    "EnclaveParams",
    "ManifestPlan",
    "Mount",
    "PythonRuntime",
    "build_enclave",
    "default_build_dir",
    "default_template_path",
    "mount_key_name",
    "plan_manifest",
    "provision_mount_key",
    "render_manifest",
    "write_measurement",
]

APP_NAME = "enclavefl"
"""Base name of the build outputs: run the enclave with `gramine-sgx enclavefl` in the build dir."""
CHECKPOINT_KEY_NAME = "enclavefl_checkpoints"
"""Gramine key name of the checkpoint mount when the party provisions the key itself."""
GRAMINE_TOOLS = ("gramine-manifest", "gramine-sgx-sign")
DEFAULT_SIGNING_KEY = Path("~/.config/gramine/enclave-key.pem")  # gramine-sgx-gen-private-key's
MEASUREMENT_FILE = "measurement.json"
HOST_DIRS_FILE = "host-dirs"  # directories the host creates before starting the enclave
TEMPLATE_NAME = "enclavefl.manifest.template"

# Host configuration the party reads but must not be measured: it differs between hosts,
# and nothing in it is trusted (collateral is verified by its signatures, peers by attestation).
HOST_CONFIG_FILES = (
    "/etc/sgx_default_qcnl.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/passwd",
    "/etc/group",
)
# The TLS roots for PCCS requests are code-like (they decide whom the party trusts): measured.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

_SEAL_KEY_NAMES = {"mrenclave": "_sgx_mrenclave", "mrsigner": "_sgx_mrsigner"}
_SIZE = re.compile(r"[1-9][0-9]*[KMG]")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")
_JINJA = ("{{", "{%", "{#")
_LIBOS = "file:{{ gramine.libos }}"
_RUNTIME_DIR = "{{ gramine.runtimedir() }}"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PythonRuntime:
    """The interpreter an enclave runs: what it loads from the host file system."""

    executable: Path
    """The interpreter binary itself (symlinks resolved): libos.entrypoint."""
    stdlib: Path
    site_packages: tuple[Path, ...]
    libpython: Path | None
    """The shared libpython the executable links against (None for a static build)."""
    arch_libdir: str
    """The multiarch system library directory, e.g. /lib/x86_64-linux-gnu."""
    package: Path
    """The enclavefl package directory (inside site-packages, or src/ for editable installs)."""

    @classmethod
    def current(cls) -> PythonRuntime:
        """The interpreter running this process, with its site-packages (venv-aware)."""
        site = tuple(dict.fromkeys(Path(sysconfig.get_path(k)) for k in ("purelib", "platlib")))
        libpython: Path | None = None
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):
            libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
            if libdir and soname and Path(libdir, soname).exists():
                libpython = Path(libdir, soname).resolve()
        multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
        return cls(
            executable=Path(sys.executable).resolve(),
            stdlib=Path(sysconfig.get_path("stdlib")).resolve(),
            site_packages=tuple(p.resolve() for p in site),
            libpython=libpython,
            arch_libdir=f"/lib/{multiarch}",
            package=Path(enclavefl.__file__).resolve().parent,
        )


@dataclass(frozen=True)
class EnclaveParams:
    """Sizes and identity numbers of the enclave (all part of its measurement)."""

    enclave_size: str = "8G"
    """Enclave memory: without EDMM it is committed (EPC, else RAM) when the enclave starts."""
    max_threads: int = 64
    """gRPC worker pool, torch threads and Gramine's helper threads all count."""
    isv_prod_id: int = 0
    isv_svn: int = 0
    """Raise it with every security fix: policies hold a minimum isv_svn."""
    edmm: bool = False
    """SGX2 dynamic memory (Linux 6.0+): pages added on demand instead of at start."""
    torch_threads: int = 4
    """OMP_NUM_THREADS and ENCLAVEFL_TORCH_THREADS inside the enclave."""

    def __post_init__(self) -> None:
        if not _SIZE.fullmatch(self.enclave_size):
            raise UsageError(f"enclave size must look like 512M, 8G or 1024K, got {self.enclave_size!r}")
        if not 4 <= self.max_threads <= 4096:
            raise UsageError(f"max_threads must be within 4..4096 (Gramine needs 4 of its own), got {self.max_threads}")
        for name in ("isv_prod_id", "isv_svn"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFF:
                raise UsageError(f"{name} must be within 0..65535, got {value}")
        if not 1 <= self.torch_threads < self.max_threads:
            raise UsageError(f"torch_threads must be within 1..{self.max_threads - 1}, got {self.torch_threads}")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Mount:
    """One `fs.mounts` entry; `uri` None for tmpfs."""

    path: str
    uri: str | None = None
    type: str = "chroot"
    key_name: str | None = None

    def toml(self) -> str:
        fields = [f"type = {_toml_str(self.type)}", f"path = {_toml_str(self.path)}"]
        if self.uri is not None:
            fields.append(f"uri = {_toml_str(self.uri)}")
        if self.key_name is not None:
            fields.append(f"key_name = {_toml_str(self.key_name)}")
        return "{ " + ", ".join(fields) + " }"


@dataclass(frozen=True)
class ManifestPlan:
    """Everything that distinguishes one party's manifest; `render_manifest` writes it out."""

    job_file: Path
    party: str
    entrypoint: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    start_dir: str
    mounts: tuple[Mount, ...]
    trusted: tuple[str, ...]
    allowed: tuple[str, ...]
    params: EnclaveParams
    policy_measured: bool
    checkpoint_mount: Mount | None
    output_dir: str
    notes: tuple[str, ...] = ()

    @property
    def host_dirs(self) -> tuple[str, ...]:
        """Directories that must exist on the host before the enclave starts (it mounts them)."""
        return (self.output_dir, *([self.checkpoint_mount.path] if self.checkpoint_mount else []))


def mount_key_name(key_spec: str) -> str:
    """The Gramine key of the checkpoint mount for a storage key spec.

    `sgx-seal:mrenclave|mrsigner` use Gramine's own sealing keys; any other source is turned
    into a mount key inside the enclave by `provision_mount_key` (named CHECKPOINT_KEY_NAME).
    """
    scheme, _, rest = key_spec.partition(":")
    if scheme == "sgx-seal":
        kind = rest.split("?", 1)[0]
        if kind not in _SEAL_KEY_NAMES:
            raise ConfigError(f"storage.key {key_spec!r}: sgx-seal kind must be one of {', '.join(_SEAL_KEY_NAMES)}")
        return _SEAL_KEY_NAMES[kind]
    return CHECKPOINT_KEY_NAME


@dataclass(frozen=True)
class _Entry:
    """A host path the enclave opens; directories cover everything below them."""

    path: Path
    is_dir: bool

    @property
    def uri(self) -> str:
        return f"file:{str(self.path).rstrip('/')}/" if self.is_dir else f"file:{self.path}"

    def meets(self, other: _Entry) -> bool:
        """The two cover a common file."""
        return (
            self.path == other.path
            or (self.is_dir and _inside(other.path, self.path))
            or (other.is_dir and _inside(self.path, other.path))
        )


def plan_manifest(
    job_file: Path,
    party: str,
    *,
    runtime: PythonRuntime | None = None,
    params: EnclaveParams = EnclaveParams(),
    measure_policy: bool | None = None,
) -> ManifestPlan:
    """What party `party`'s enclave measures, may read, and runs.

    `measure_policy` None: measure the policy unless it pins mr_enclave. The values of the
    `${VAR}`s the job file uses are written into the manifest, so that the enclave resolves
    the job's paths exactly as they resolve here.
    """
    runtime = runtime or PythonRuntime.current()
    job_file = Path(job_file).resolve()
    job = load_job(job_file)
    name = job.party(party).name
    measure_policy = _measures_policy(job, measure_policy)
    notes: list[str] = []
    if job.tee.attester == "simulated":
        notes.append(
            "tee.attester is 'simulated': this enclave would present INSECURE self-reported "
            "evidence; set tee.attester to gramine (or auto) for SGX"
        )
    code_dirs = _outermost([runtime.stdlib, *runtime.site_packages, runtime.package])
    trusted = _trusted_entries(runtime, job, job_file, code_dirs, measure_policy=measure_policy)
    allowed = _allowed_entries(job, name, trusted, measure_policy=measure_policy, notes=notes)
    checkpoint = _checkpoint_mount(job, name, allowed, notes=notes)
    _check_overlaps(trusted, allowed)
    env = _party_env(runtime, params, job, job_file, code_dirs)
    return ManifestPlan(
        job_file=job_file,
        party=name,
        entrypoint=str(runtime.executable),
        argv=_party_argv(runtime, job, job_file, name),
        env=tuple(sorted(env.items())),
        start_dir=str(job_file.parent),
        mounts=_mounts(trusted, allowed, checkpoint),
        trusted=tuple(dict.fromkeys([_LIBOS, f"file:{_RUNTIME_DIR}/", *(e.uri for e in trusted)])),
        allowed=tuple(dict.fromkeys(e.uri for e in allowed)),
        params=params,
        policy_measured=measure_policy,
        checkpoint_mount=checkpoint,
        output_dir=str(job.output.dir),
        notes=tuple(notes),
    )


def _measures_policy(job: JobConfig, measure_policy: bool | None) -> bool:
    """Whether the policy file is measured: asked for, or (None) unless it pins mr_enclave."""
    pins_enclave = "mr_enclave" in Policy.load(job.policy).enabled_sgx_fields
    if measure_policy is None:
        return not pins_enclave
    if measure_policy and pins_enclave:
        raise ConfigError(
            f"policy {job.policy} pins mr_enclave, so it cannot be measured into the enclave whose "
            "mr_enclave it lists; leave it unmeasured (peers compare its SHA-256 at admission)"
        )
    return measure_policy


def _trusted_entries(
    runtime: PythonRuntime, job: JobConfig, job_file: Path, code_dirs: Sequence[Path], *, measure_policy: bool
) -> list[_Entry]:
    """What the enclave measures: the interpreter and its libraries, the code, the job (and policy)."""
    return [
        _Entry(Path(runtime.arch_libdir), True),
        _Entry(Path("/usr" + runtime.arch_libdir), True),
        _Entry(runtime.executable, False),
        *([_Entry(runtime.libpython, False)] if runtime.libpython is not None else []),
        *(_Entry(d, True) for d in code_dirs),
        _Entry(job_file, False),
        # The user code the job's module:function references may load (jobs/refs.py).
        *(_Entry(path, path.is_dir()) for path in job.job_code().measured().values()),
        *([_Entry(job.policy, False)] if measure_policy else []),
        *([_Entry(CA_BUNDLE, False)] if CA_BUNDLE.is_file() else []),
    ]


def _allowed_entries(
    job: JobConfig, party: str, trusted: Sequence[_Entry], *, measure_policy: bool, notes: list[str]
) -> list[_Entry]:
    """What the enclave may read unmeasured: host configuration, its data, outputs, an
    unmeasured policy, offline collateral, a file: storage key (each with its note)."""
    allowed = [_Entry(Path(p), False) for p in HOST_CONFIG_FILES]
    data, data_notes = _data_allowance(job, party, [e.path for e in trusted])
    allowed += data
    notes += data_notes
    allowed.append(_Entry(job.output.dir, True))
    if not measure_policy:
        allowed.append(_Entry(job.policy, False))
    if job.tee.collateral is not None:
        allowed.append(_Entry(job.tee.collateral, False))
    if job.storage is not None and job.storage.key.startswith("file:"):
        allowed.append(_Entry(Path(job.storage.key.removeprefix("file:")), False))
        notes.append(
            "storage.key is a file: key on the host (INSECURE inside SGX: the host can read "
            "it); use sgx-seal:mrsigner or broker:HOST:PORT/NAME"
        )
    return allowed


def _checkpoint_mount(job: JobConfig, party: str, allowed: Sequence[_Entry], *, notes: list[str]) -> Mount | None:
    """The party's encrypted checkpoint mount (None without storage), with what to know about it."""
    if job.storage is None:
        return None
    key_spec = job.storage.key
    ckpt = job.storage.party_dir(party)
    checkpoint = Mount(path=str(ckpt), uri=f"file:{ckpt}", type="encrypted", key_name=mount_key_name(key_spec))
    if checkpoint.key_name == CHECKPOINT_KEY_NAME:
        notes.append(
            f"checkpoints: the party must provision Gramine key {CHECKPOINT_KEY_NAME!r} from its "
            f"{key_spec.split(':', 1)[0]}: key (enclavefl.jobs.gramine.provision_mount_key) before "
            "it opens its checkpoint directory"
        )
    if any(_inside(ckpt, e.path) for e in allowed if e.is_dir):
        notes.append(f"checkpoint directory {ckpt} lies inside an allowed directory: keep it apart")
    return checkpoint


def _party_env(
    runtime: PythonRuntime, params: EnclaveParams, job: JobConfig, job_file: Path, code_dirs: Sequence[Path]
) -> dict[str, str]:
    """The enclave's environment: the loader's, the job's code roots, Keras and TLS roots."""
    env = _loader_env(runtime, params, job_file)
    # Listed code: modules outside site-packages are found through PYTHONPATH, as here.
    code_roots = [path.parent for path in job.job_code().measured().values()
                  if not any(_inside(path, d) for d in code_dirs) and not _inside(path, job_file.parent)]
    if code_roots:
        env["PYTHONPATH"] = ":".join(dict.fromkeys([env["PYTHONPATH"], *map(str, code_roots)]))
    if job.model.uses_keras():  # type: ignore[attr-defined]
        env.update(_keras_env(params, code_dirs))
    if CA_BUNDLE.is_file():
        env["SSL_CERT_FILE"] = str(CA_BUNDLE)
    return env


def _mounts(trusted: Sequence[_Entry], allowed: Sequence[_Entry], checkpoint: Mount | None) -> tuple[Mount, ...]:
    """Gramine's runtime, the host directories holding what is trusted or allowed, /tmp, checkpoints."""
    mounts = [Mount(path="/lib", uri=f"file:{_RUNTIME_DIR}")]
    mounts += [Mount(path=str(d), uri=f"file:{d}") for d in _mount_roots([*trusted, *allowed])]
    mounts.append(Mount(path="/tmp", type="tmpfs"))
    if checkpoint is not None:
        mounts.append(checkpoint)
    return tuple(mounts)


def _party_argv(runtime: PythonRuntime, job: JobConfig, job_file: Path, party: str) -> tuple[str, ...]:
    """`enclavefl party` for this party. The command line is measured, so the host cannot add
    --resume after a crash: a party with storage always resumes (its first start finds no
    checkpoint and starts fresh)."""
    return (
        str(runtime.executable), "-m", "enclavefl", "party", str(job_file),
        "--name", party, "--out", str(job.output.dir), *(("--resume",) if job.storage is not None else ()),
    )  # fmt: skip


def _data_allowance(job: JobConfig, party: str, measured: Sequence[Path]) -> tuple[list[_Entry], list[str]]:
    """The party's own data: its directory, or only its files when that directory holds measured files."""
    specs = []
    own = job.party(party).data
    if own is not None:
        specs.append(own)
    if isinstance(job, HflJobConfig) and job.party(party).role == "server" and job.evaluation.data is not None:
        specs.append(job.evaluation.data)
    entries: list[_Entry] = []
    notes: list[str] = []
    for spec in specs:
        if isinstance(spec, SklearnData):
            continue  # bundled with scikit-learn: inside site-packages, already measured
        if isinstance(spec, Cifar10Data):
            directory, files = spec.root, [_Entry(spec.root, True)]
        elif isinstance(spec, (CsvData, CriteoData, WideDeepData)):
            directory, files = spec.path.parent, [_Entry(spec.path, False)]
        else:  # a new data kind must decide what it reads
            raise ConfigError(f"data kind {spec.kind!r} has no Gramine file rule yet")
        if any(_inside(m, directory) for m in measured):
            notes.append(
                f"data directory {directory} also holds measured files (the job, the code): only "
                f"{', '.join(str(f.path) for f in files)} is allowed; keep data in its own directory"
            )
            entries += files
        else:
            entries.append(_Entry(directory, True))
    return entries, notes


def _loader_env(runtime: PythonRuntime, params: EnclaveParams, job_file: Path) -> dict[str, str]:
    python_path = list(runtime.site_packages)
    if not any(_inside(runtime.package, s) for s in runtime.site_packages):
        python_path.append(runtime.package.parent)  # an editable install: src/ holds the package
    lib_path = ["/lib", runtime.arch_libdir, f"/usr{runtime.arch_libdir}"]
    if runtime.libpython is not None:
        lib_path.insert(1, str(runtime.libpython.parent))
    threads = str(params.torch_threads)
    env = {
        "LD_LIBRARY_PATH": ":".join(dict.fromkeys(lib_path)),
        "PATH": f"{runtime.executable.parent}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": ":".join(str(p) for p in python_path),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # trusted directories are read-only in the enclave
        "PYTHONUNBUFFERED": "1",
        "LANG": "C.UTF-8",
        "HOME": "/tmp",
        "XDG_CACHE_HOME": "/tmp/cache",  # collateral cache: in-enclave tmpfs
        "MPLCONFIGDIR": "/tmp/matplotlib",
        "OMP_NUM_THREADS": threads,
        "ENCLAVEFL_TORCH_THREADS": threads,
    }
    # The job's ${VAR}s must resolve inside the enclave as they do here.
    text = job_file.read_text(encoding="utf-8")
    for variable in sorted(set(_ENV_REF.findall(text))):
        if variable in env:
            raise ConfigError(f"{job_file}: ${{{variable}}} is set by the enclave manifest itself; use another name")
        value = os.environ.get(variable)
        if value:
            env[variable] = value
    return env


# A TensorFlow party: its native libraries load from site-packages (trusted with it), its
# thread pools are sized here (they count against sgx.max_threads), and importing it maps
# about 1.5 GB, so smaller enclaves fail at start rather than mid-training.
_TF_INTEROP_THREADS = 2
_TF_MIN_ENCLAVE_BYTES = 4 << 30
_GRPC_MIN_THREADS = 16
_GRAMINE_THREADS = 4


def _size_bytes(size: str) -> int:
    return int(size[:-1]) << {"K": 10, "M": 20, "G": 30}[size[-1]]


def _keras_env(params: EnclaveParams, code_dirs: Sequence[Path]) -> dict[str, str]:
    """Environment of a party whose job uses Keras; refuses an enclave that could not run it."""
    if _size_bytes(params.enclave_size) < _TF_MIN_ENCLAVE_BYTES:
        raise ConfigError(f"enclave size {params.enclave_size}: a Keras/TensorFlow party needs at least 4G")
    threads = 2 * params.torch_threads + _TF_INTEROP_THREADS + _GRPC_MIN_THREADS + _GRAMINE_THREADS
    if params.max_threads < threads:
        raise ConfigError(
            f"max_threads {params.max_threads}: a Keras/TensorFlow party needs at least {threads} "
            f"(torch and TensorFlow pools of {params.torch_threads}, {_TF_INTEROP_THREADS} inter-op, "
            f"{_GRPC_MIN_THREADS} gRPC, {_GRAMINE_THREADS} Gramine)"
        )
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    for module in ("keras", *(["tensorflow"] if backend == "tensorflow" else [])):
        spec = importlib.util.find_spec(module)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or not any(_inside(origin, d) for d in code_dirs):
            raise ConfigError(
                f"{module} is not installed in this Python's site-packages ({origin}): the enclave could not "
                "load it as a measured file; pip install 'enclavefl[tf]' into the environment you build from"
            )
    return {
        "KERAS_BACKEND": backend,  # measured: the host cannot switch a party's backend
        "TF_NUM_INTRAOP_THREADS": str(params.torch_threads),
        "TF_NUM_INTEROP_THREADS": str(_TF_INTEROP_THREADS),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "KERAS_HOME": "/tmp/keras",  # in-enclave tmpfs
    }


def _check_overlaps(trusted: Sequence[_Entry], allowed: Sequence[_Entry]) -> None:
    """Refuse plans where one host file would be both measured and unmeasured."""
    for a in allowed:
        for t in trusted:
            if a.meets(t):
                raise ConfigError(
                    f"{a.path} would be both measured and unmeasured (it meets measured {t.path}); "
                    "keep data, outputs and host configuration apart from the code and the job file"
                )


# --------------------------------------------------------------------------- rendering


def default_template_path() -> Path:
    """The manifest template shipped inside the package (enclavefl/share/gramine/).

    Package data, so a wheel and a source checkout build the same enclave.
    """
    resource = files("enclavefl").joinpath("share", "gramine", TEMPLATE_NAME)
    path = Path(str(resource))
    if not path.is_file():  # a zipped or stripped install: nothing gramine-manifest could read either
        raise UsageError(f"manifest template {TEMPLATE_NAME} is missing from the installed enclavefl package "
                         f"({path}); reinstall it, or pass --template")
    return path


def render_manifest(plan: ManifestPlan, template: str) -> str:
    """The manifest template of this party: TOML, with Gramine's {{ }} expressions left in."""
    values = [plan.entrypoint, *plan.argv, plan.start_dir, *(v for kv in plan.env for v in kv)]
    values += [m.path for m in plan.mounts] + [m.uri or "" for m in plan.mounts]
    values += [*plan.trusted, *plan.allowed]
    for value in values:
        own = value.replace(_LIBOS, "").replace(_RUNTIME_DIR, "")  # Gramine's, left for gramine-manifest
        if any(token in own for token in _JINJA) or "\n" in own:
            raise ConfigError(
                f"{value!r}: paths and values in a Gramine manifest may not contain {{{{, {{%, {{# or newlines"
            )
    p = plan.params
    mapping = {
        "entrypoint": _toml_str(plan.entrypoint),
        "argv": "[" + ", ".join(_toml_str(a) for a in plan.argv) + "]",
        "loader_env": "\n".join(f"loader.env.{name} = {_toml_str(value)}" for name, value in plan.env),
        "start_dir": _toml_str(plan.start_dir),
        "mounts": _toml_lines(m.toml() for m in plan.mounts),
        "enclave_size": _toml_str(p.enclave_size),
        "max_threads": str(p.max_threads),
        "edmm_enable": "true" if p.edmm else "false",
        "isv_prod_id": str(p.isv_prod_id),
        "isv_svn": str(p.isv_svn),
        "trusted_files": _toml_lines(f"{{ uri = {_toml_str(u)} }}" for u in plan.trusted),
        # Plain strings: the form every Gramine 1.x reads for allowed files.
        "allowed_files": _toml_lines(_toml_str(u) for u in plan.allowed),
    }
    try:
        return string.Template(template).substitute(mapping)
    except KeyError as exc:
        raise ConfigError(f"manifest template has an unknown placeholder ${{{exc.args[0]}}}") from None
    except ValueError as exc:
        raise ConfigError(f"manifest template is malformed: {exc} (write $$ for a literal $)") from None


def _toml_str(value: str) -> str:
    """A TOML basic string (control characters escaped; TOML forbids them raw)."""
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_lines(items: Iterable[str]) -> str:
    return "\n".join(f"  {item}," for item in items)


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class BuildResult:
    """What `build_enclave` wrote and, when Gramine signed it, the enclave's identity."""

    out_dir: Path
    template: Path
    """This party's manifest template (gramine-manifest input)."""
    plan: ManifestPlan
    manifest_sgx: Path | None = None
    sigstruct: Path | None = None
    measurement: Measurement | None = None
    missing_tools: tuple[str, ...] = ()

    @property
    def signed(self) -> bool:
        return self.measurement is not None


def default_build_dir(job_file: Path, party: str) -> Path:
    """Where `build_enclave` writes by default: build/gramine/<job name>/<party>."""
    return Path("build") / "gramine" / load_job(job_file).job.name / party


def build_enclave(
    job_file: Path,
    party: str,
    *,
    out_dir: Path | None = None,
    signing_key: Path | None = None,
    params: EnclaveParams = EnclaveParams(),
    runtime: PythonRuntime | None = None,
    template: Path | None = None,
    measure_policy: bool | None = None,
    tool_path: str | None = None,
) -> BuildResult:
    """Render party `party`'s manifest into `out_dir`; where Gramine is installed, sign it.

    Always writes enclavefl.manifest.template (this party's) and host-dirs (the directories
    to create before the enclave starts, one a line). `out_dir` None: `default_build_dir`.
    `tool_path` is the PATH searched for gramine-manifest and gramine-sgx-sign (default:
    $PATH). Signing adds enclavefl.manifest, enclavefl.manifest.sgx, enclavefl.sig and
    measurement.json (the `enclavefl measure --json` shape, for `policy init --from-measure`).
    """
    if out_dir is None:
        out_dir = default_build_dir(job_file, party)
    plan = plan_manifest(job_file, party, runtime=runtime, params=params, measure_policy=measure_policy)
    out_dir = Path(out_dir)
    rendered = _write_manifest_template(plan, template, out_dir)
    tools = {name: shutil.which(name, path=tool_path) for name in GRAMINE_TOOLS}
    missing = tuple(name for name, found in tools.items() if found is None)
    if missing:
        return BuildResult(out_dir=out_dir, template=rendered, plan=plan, missing_tools=missing)
    manifest_sgx, sigstruct, measurement = _sign_enclave(tools, rendered, out_dir, signing_key)
    write_measurement(measurement, out_dir / MEASUREMENT_FILE)
    return BuildResult(
        out_dir=out_dir,
        template=rendered,
        plan=plan,
        manifest_sgx=manifest_sgx,
        sigstruct=sigstruct,
        measurement=measurement,
    )


def _write_manifest_template(plan: ManifestPlan, template: Path | None, out_dir: Path) -> Path:
    """Render `plan` into `template` (default: the shipped one) in `out_dir`, with host-dirs beside it."""
    template_path = Path(template) if template is not None else default_template_path()
    try:
        template_text = template_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read manifest template {template_path}: {exc.strerror or exc}") from None
    text = render_manifest(plan, template_text)
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered = out_dir / TEMPLATE_NAME
    atomic_write_bytes(rendered, text.encode("utf-8"))
    atomic_write_bytes(out_dir / HOST_DIRS_FILE, "".join(f"{d}\n" for d in plan.host_dirs).encode("utf-8"))
    return rendered


def _sign_enclave(
    tools: dict[str, str | None], rendered: Path, out_dir: Path, signing_key: Path | None
) -> tuple[Path, Path, Measurement]:
    """gramine-manifest then gramine-sgx-sign; the SIGSTRUCT's identity, checked against the key."""
    key = Path(signing_key if signing_key is not None else DEFAULT_SIGNING_KEY).expanduser()
    if not key.is_file():
        raise UsageError(
            f"no enclave signing key at {key}: create one with gramine-sgx-gen-private-key, "
            "or pass --key (an RSA-3072 PEM, public exponent 3)"
        )
    expected_signer = mr_signer_of_key(key)
    manifest = out_dir / f"{APP_NAME}.manifest"
    manifest_sgx = out_dir / f"{APP_NAME}.manifest.sgx"
    sigstruct = out_dir / f"{APP_NAME}.sig"
    _run_tool([str(tools["gramine-manifest"]), str(rendered), str(manifest)])
    _run_tool([
        str(tools["gramine-sgx-sign"]), "--manifest", str(manifest), "--output", str(manifest_sgx),
        "--sigfile", str(sigstruct), "--key", str(key),
    ])  # fmt: skip
    measurement = read_sigstruct(sigstruct)
    if measurement.mr_signer != expected_signer:
        raise FormatError(
            f"{sigstruct}: mr_signer {measurement.mr_signer.hex()} is not that of the signing key "
            f"{key} ({expected_signer.hex()})"
        )
    return manifest_sgx, sigstruct, measurement


def write_measurement(measurement: Measurement, path: Path) -> None:
    """Write the identity as `enclavefl measure --json` prints it (input of `policy init --from-measure`)."""
    atomic_write_bytes(Path(path), (json.dumps(measurement.to_json(), indent=2) + "\n").encode())


def _run_tool(command: list[str]) -> None:
    log.info("running %s", " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise UsageError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise UsageError(f"{Path(command[0]).name} failed (exit {done.returncode}): " + " | ".join(tail))


# --------------------------------------------------------------------------- inside the enclave


def provision_mount_key(
    source: KeySource, *, name: str = CHECKPOINT_KEY_NAME, keys_dir: Path = GRAMINE_KEYS_DIR
) -> None:
    """Give Gramine the key of the encrypted checkpoint mount, derived from `source`'s KEK.

    Call it inside the enclave before the checkpoint directory is first opened. The mount key
    is HKDF-SHA256(KEK, info="enclavefl/gramine/encrypted-mount/v1/<name>"), so it never equals
    the key that seals the checkpoint files themselves. Writes 16 raw bytes to
    /dev/attestation/keys/<name> (`keys_dir`: tests stand a temporary directory in for it).
    """
    if name.startswith("_"):
        raise UsageError(f"Gramine key {name!r} is one of Gramine's own (names starting with _); it cannot be set")
    keys_dir = Path(keys_dir)
    if not keys_dir.is_dir():
        raise UsageError(f"{keys_dir} not found: encrypted-mount keys can be provisioned only inside a Gramine enclave")
    mount_key = derive_mount_key(source, name)
    try:
        with open(keys_dir / name, "wb") as f:
            f.write(mount_key)
    except OSError as exc:
        raise UsageError(f"cannot provision Gramine key {name!r}: {exc.strerror or exc}") from None
    log.info("provisioned the encrypted-mount key %r from %s", name, source.spec)


# --------------------------------------------------------------------------- paths


def _inside(path: Path | PurePosixPath, directory: Path | PurePosixPath) -> bool:
    """`path` is `directory` or below it (lexically)."""
    p, d = PurePosixPath(path), PurePosixPath(directory)
    return p == d or d in p.parents


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """The paths not inside another of them, in order."""
    unique = list(dict.fromkeys(Path(p) for p in paths))
    return [p for p in unique if not any(q != p and _inside(p, q) for q in unique)]


def _mount_roots(entries: Iterable[_Entry]) -> list[Path]:
    """Directories to expose at their host path: each entry's directory, nested ones dropped.

    Everything exposed is still subject to sgx.file_check_policy = "strict": a mount makes a
    file visible, only the trusted/allowed lists let the enclave open it.
    """
    dirs = [e.path if e.is_dir else e.path.parent for e in entries]
    dirs = [d for d in dirs if d != Path("/")]
    return sorted(_outermost(dirs), key=lambda p: (len(p.parts), str(p)))
