"""The job file: one YAML document that describes one federation run, validated into typed config.

A job is horizontal (`hfl`: one parameter server, workers that keep their own rows) or
vertical (`vfl`: one leader that holds the labels, followers that hold other columns of
the same samples). `load_job` reads and checks the whole file up front and returns an
`HflJobConfig` or a `VflJobConfig`; every mistake it finds is reported at once, each as
"field.path: message". docs/jobs.md is the reference of every field.

Paths in the file may use `${VAR}` / `${VAR:-default}`; relative paths are taken from the
job file's directory. Every party reads the same job file, but each has only its own data,
so data paths are not checked for existence here (the loaders do that); the policy file,
which every party enforces, is.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import types
from abc import abstractmethod
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from enclavefl.errors import ConfigError, UsageError
from enclavefl.hfl.registry import BUILTIN as STRATEGY_REGISTRY
from enclavefl.jobs.quick import apply_quick_caps
from enclavefl.jobs.refs import JobCode, is_ref
from enclavefl.train.device import DEVICE_PATTERN
from enclavefl.train.tasks import (
    DEFAULT_LOSS,
    DEFAULT_METRICS,
    HIGHER_IS_BETTER,
    LOSSES,
    LOWER_IS_BETTER,
    METRICS,
    PRIMARY_METRICS,
    TaskType,
    primary_metric,
)
from enclavefl.validate import is_int, is_number

__all__ = [
    "Address",
    "Cifar10Data",
    "CriteoData",
    "CodeRef",
    "CsvData",
    "DataSpec",
    "HflEvaluationConfig",
    "HflJobConfig",
    "JobConfig",
    "JobSection",
    "ModelSpec",
    "OutputConfig",
    "PreprocessConfig",
    "PartitionSpec",
    "PartyConfig",
    "PrivacyConfig",
    "PythonData",
    "SklearnData",
    "StorageConfig",
    "StrategyConfig",
    "TaskConfig",
    "TeeConfig",
    "VflJobConfig",
    "VflModelConfig",
    "VflTrainingConfig",
    "WideDeepData",
    "WideDeepGenerate",
    "dump_job",
    "load_job",
    "load_party_job",
    "parse_job",
]

Mode = Literal["hfl", "vfl"]

# (coordinator, member) role of each mode; the coordinator is the one that listens.
ROLES: dict[str, tuple[str, str]] = {"hfl": ("server", "worker"), "vfl": ("leader", "follower")}
DATA_KINDS: dict[str, tuple[str, ...]] = {
    "hfl": ("csv", "cifar10", "criteo", "sklearn", "python"),
    "vfl": ("csv", "wide-deep", "sklearn"),
}
ROUND_STRATEGIES = tuple(name for name, entry in STRATEGY_REGISTRY.items() if entry.kind == "update")
STEP_STRATEGIES = tuple(name for name, entry in STRATEGY_REGISTRY.items() if entry.kind == "grad")
KEY_SCHEMES = ("file", "sgx-seal", "broker")
CRITEO_SPARSE_FIELDS = 26

_ERROR = "enclavefl"  # error type of every check written here (its message is final)


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError(_ERROR, message)


# --------------------------------------------------------------------------- value types

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(text: str) -> str:
    """Replace `${VAR}` and `${VAR:-default}` (shell semantics: empty counts as unset).

    A `${VAR}` whose variable is unset or empty is an error rather than an empty string,
    which would silently turn `${DATA}/x.csv` into `/x.csv`. A bare `$` stays literal.
    """

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise _invalid(f"environment variable {name} is not set (write ${{{name}:-DEFAULT}} for a fallback)")

    return _ENV_REF.sub(substitute, text)


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir") or Path.cwd())


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        return value  # the Path validator reports the wrong type
    text = _expand_env(value).strip()
    if not text:
        raise _invalid("empty path")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = _base_dir(info) / path
    return path.resolve()


ResolvedPath = Annotated[Path, BeforeValidator(_resolve_path)]
"""A path after `${VAR}` expansion, `~` expansion and resolution against the job directory."""


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise _invalid(f"file {path} not found" if not path.exists() else f"{path} is not a file")
    return path


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise _invalid(
            f"{value!r} is not a valid name: 1-63 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]
"""A party or job name: safe as a file name and in log lines."""

# RFC 1123 labels, plus '_' which container service names use.
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*")


class Address(NamedTuple):
    """A `host:port` endpoint; IPv6 hosts are written in brackets (`[::1]:50051`)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _parse_address(value: Any) -> Any:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise _invalid(f"expected 'host:port', got {type(value).__name__} {value!r}")
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise _invalid(f"expected 'host:port', got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _invalid(f"{host!r} in {value!r} is not an IPv6 address") from None
    elif ":" in host:
        raise _invalid(f"{value!r}: write an IPv6 host in brackets, e.g. [::1]:50051")
    elif not _HOSTNAME.fullmatch(host):
        raise _invalid(f"{host!r} in {value!r} is not a host name or IPv4 address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _invalid(f"port {port!r} in {value!r} is not a number in 1-65535")
    return Address(host, int(port))


AddressField = Annotated[Address, BeforeValidator(_parse_address), PlainSerializer(str, return_type=str)]


def _resolve_key_spec(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str):
        return value
    scheme, sep, rest = _expand_env(value).strip().partition(":")
    if not sep or scheme not in KEY_SCHEMES or not rest:
        raise _invalid(
            f"{value!r} is not a key spec: expected file:PATH, sgx-seal:mrenclave|mrsigner "
            "or broker:HOST:PORT/NAME"
        )
    if scheme == "file":
        return f"file:{_resolve_path(rest, info)}"
    return f"{scheme}:{rest}"


KeySpec = Annotated[str, BeforeValidator(_resolve_key_spec)]
"""A key source for sealing, as `enclavefl.seal.parse_key_spec` reads it; `file:` paths resolved."""


MAX_INT = 2**31 - 1
"""The largest count, size or seed a job file may give (rounds, rows, batch sizes, ...)."""
MAX_SECONDS = 30 * 24 * 3600.0
"""The longest timeout a job file may give (Python's waits overflow far above this)."""

Int = Annotated[int, Strict(), Field(le=MAX_INT)]
"""A YAML integer: not `true`, not `2.0`, not `1.0e30`, at most MAX_INT."""


def _real(value: Any) -> Any:
    if not is_number(value):
        raise _invalid(f"expected a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise _invalid(f"{value!r} is too large") from None
    if not math.isfinite(number):
        raise _invalid(f"must be a finite number, got {value!r}")
    return number


Bool = Annotated[bool, Strict()]
"""A YAML `true`/`false`: not 1, not the string "on"."""
Real = Annotated[float, BeforeValidator(_real), Field(allow_inf_nan=False)]
"""A finite number (`.inf`, `.nan` and `true` are refused); YAML integers are accepted."""
Seconds = Annotated[Real, Field(le=MAX_SECONDS)]


def _unique(values: tuple[Any, ...]) -> tuple[Any, ...]:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise _invalid(f"listed more than once: {', '.join(repeated)}")
    return values


def _check_metric(name: str, info: ValidationInfo) -> str:
    if name not in METRICS and not is_ref(name):
        raise _invalid(f"{name!r} is not a metric: one of {', '.join(METRICS)}, or 'package.module:function'")
    return _code_ref(name, info)


Metric = Annotated[str, AfterValidator(_check_metric)]
Metrics = Annotated[tuple[Metric, ...], Field(min_length=1), AfterValidator(_unique)]


def metric_name(metric: str) -> str:
    """The name a metric is reported under: built-ins as is, a user's function by its own name."""
    return metric.rpartition(":")[2].rpartition(".")[2]


class _Section(BaseModel):
    # Unknown keys are errors, so that a typo never silently falls back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------- data


class PartitionSpec(_Section):
    """Which part of a source shared by several workers this one reads.

    Every worker computes the same partitioning (seeded by job.seed) and keeps its part.
    """

    method: Literal["iid", "dirichlet"] = "iid"
    """iid: a seeded shuffle cut into equal parts; dirichlet: label skew (needs alpha)."""
    num_parts: Int = Field(ge=1)
    """How many parts the source is cut into."""
    index: Int = Field(ge=0)
    """This party's part, 0 <= index < num_parts."""
    alpha: Real | None = Field(None, gt=0, validate_default=True)
    """Dirichlet concentration: small gives each party few classes, large tends to IID."""

    @field_validator("index")
    @classmethod
    def _index_in_range(cls, index: int, info: ValidationInfo) -> int:
        parts = info.data.get("num_parts")
        if parts is not None and index >= parts:
            raise _invalid(f"{index} is out of range for num_parts {parts} (0..{parts - 1})")
        return index

    @field_validator("alpha")
    @classmethod
    def _alpha_for_dirichlet(cls, alpha: float | None, info: ValidationInfo) -> float | None:
        method = info.data.get("method")
        if method == "dirichlet" and alpha is None:
            raise _invalid("required by method dirichlet")
        if method == "iid" and alpha is not None:
            raise _invalid("only used by method dirichlet")
        return alpha


class CsvData(_Section):
    """A FATE-style CSV: `id,y,x0,..` (labelled) or `id,x0,..` (features only)."""

    kind: Literal["csv"]
    path: ResolvedPath
    id_column: str = "id"
    """The example-id column (vfl aligns rows on it)."""
    label: str | None = None
    """The label column (FATE files call it y); None for a party without labels."""
    features: tuple[str, ...] | None = Field(None, min_length=1)
    """Feature columns to use, in this order; None: every column but the id and label."""
    limit: int | None = Field(None, ge=1)
    """Read only the first `limit` rows (before partitioning); None: every row."""
    partition: PartitionSpec | None = None
    """Read only part of the rows (for several workers sharing one file); None: all rows."""

    @field_validator("features")
    @classmethod
    def _features_are_features(cls, features: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if features is None:
            return None
        _unique(features)
        for special in ("id_column", "label"):
            column = info.data.get(special)
            if column is not None and column in features:
                raise _invalid(f"{column!r} is the {special.replace('_column', '')} column, not a feature")
        return features


class Cifar10Data(_Section):
    """CIFAR-10 (python version) under `root`."""

    kind: Literal["cifar10"]
    root: ResolvedPath
    """The cifar-10-batches-py folder or the folder that holds it."""
    split: Literal["train", "test"] = "train"
    download: Bool = False
    """Download (MD5-checked) into root when the batches are missing."""
    partition: PartitionSpec | None = None


def _vocab_sizes(value: Any) -> Any:
    sizes = value if isinstance(value, list | tuple) else [value]
    if any(not is_int(v) or v < 2 for v in sizes):
        raise _invalid(f"expected an int >= 2 or a list of {CRITEO_SPARSE_FIELDS} such ints, got {value!r}")
    if isinstance(value, list | tuple):
        if len(value) != CRITEO_SPARSE_FIELDS:
            raise _invalid(f"a list needs one size per categorical field ({CRITEO_SPARSE_FIELDS}), got {len(value)}")
        return tuple(value)
    return value


class CriteoData(_Section):
    """Criteo display-advertising data: Kaggle train.txt (tab, no header) or label,I1..,C26 CSV."""

    kind: Literal["criteo"]
    path: ResolvedPath
    vocab_sizes: Annotated[Int | tuple[Int, ...], BeforeValidator(_vocab_sizes)] = 10_000
    """Hash buckets per categorical field: one int for all 26 fields, or 26 ints."""
    limit: Int | None = Field(None, ge=1)
    """Read only the first `limit` rows of the file (before partitioning)."""
    partition: PartitionSpec | None = None


class SklearnData(_Section):
    """A scikit-learn bundled data set, for demos (ids are the row numbers, labels the target)."""

    kind: Literal["sklearn"]
    name: Literal["digits", "breast_cancer", "diabetes"]
    """digits (10 classes), breast_cancer (binary) or diabetes (regression)."""
    features: tuple[str, ...] | None = Field(None, min_length=1)
    """Feature columns to use, in this order (sklearn's feature_names; a vertical split gives
    each party its own); None: every column."""
    partition: PartitionSpec | None = None

    @field_validator("features")
    @classmethod
    def _features_unique(cls, features: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if features is None else _unique(features)


def _user_ref(value: str, info: ValidationInfo) -> str:
    """A `module:function` reference (no built-in names), remembered for measurement."""
    if not is_ref(value):
        raise _invalid(f"{value!r} is not a 'package.module:function' reference")
    if info.context is not None:
        info.context.setdefault("code_refs", []).append(value)
    return value


UserRef = Annotated[str, AfterValidator(_user_ref)]


class PythonData(_Section):
    """Rows made by the user's own code: `factory(**args)` returns (inputs..., labels) arrays or a
    torch Dataset of (inputs..., labels) items."""

    kind: Literal["python"]
    factory: UserRef
    """'package.module:function' that loads this party's rows (it runs inside the party)."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the factory."""
    partition: PartitionSpec | None = None


class WideDeepGenerate(_Section):
    """How the synthetic wide&deep files are made when missing (Fedlearner's make_data.py sizes)."""

    rows: Int = Field(2000, ge=1)
    fields_per_party: Int = Field(512, ge=1)
    vocab_size: Int = Field(101, ge=2)


class WideDeepData(_Section):
    """One party's synthetic wide&deep file (`leader.npz`, `follower_0.npz`, ...)."""

    kind: Literal["wide-deep"]
    path: ResolvedPath
    generate: WideDeepGenerate | None = None
    """When set and the file is missing, every party's file is generated in its folder (seed: job.seed)."""


DataSpec = Annotated[
    CsvData | Cifar10Data | CriteoData | SklearnData | WideDeepData | PythonData,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------- sections


class TaskConfig(_Section):
    """What the model learns. Without this section: classification, binary when the model
    has one output column and multiclass when it has several."""

    type: TaskType
    """binary (labels 0/1), multiclass (labels 0..C-1) or regression (real labels)."""
    loss: str | None = Field(None, validate_default=True)
    """bce, cross_entropy, mse, mae, huber, or 'package.module:function'(outputs, labels) -> mean loss.
    Default: bce (binary), cross_entropy (multiclass), mse (regression)."""
    classes: int | None = Field(None, ge=2)
    """multiclass: the number of classes. Default: the model's output width."""

    @field_validator("loss")
    @classmethod
    def _loss_fits(cls, loss: str | None, info: ValidationInfo) -> str | None:
        task = info.data.get("type")
        if task is None:
            return loss
        if loss is None:
            return DEFAULT_LOSS[task]
        if loss in LOSSES:
            if task not in LOSSES[loss]:
                fitting = ", ".join(n for n, tasks in LOSSES.items() if task in tasks)
                raise _invalid(f"{loss} does not fit a {task} task; use one of {fitting} or 'package.module:function'")
            return loss
        if not is_ref(loss):
            raise _invalid(f"{loss!r} is not a loss: one of {', '.join(LOSSES)}, or 'package.module:function'")
        return _code_ref(loss, info)

    @field_validator("classes")
    @classmethod
    def _classes_for_multiclass(cls, classes: int | None, info: ValidationInfo) -> int | None:
        task = info.data.get("type")
        if classes is not None and task is not None and task != "multiclass":
            raise _invalid(f"only used by type multiclass, not {task}")
        return classes


def _metric_issues(at: str, metrics: tuple[str, ...] | None, task: TaskConfig | None) -> list[tuple[str, str]]:
    """Metrics the task cannot compute (auc on regression, r2 on classification)."""
    issues: list[tuple[str, str]] = []
    names = [metric_name(m) for m in metrics or ()]
    for i, metric in enumerate(metrics or ()):
        if metric in METRICS:
            fits = METRICS[metric]
            if task is None and "regression" in fits:
                issues.append((f"{at}[{i}]", f"{metric} is a regression metric: set task.type: regression"))
            elif task is not None and task.type not in fits:
                issues.append((f"{at}[{i}]", f"{metric} is not defined for a {task.type} task "
                                             f"(it is for {', '.join(fits)})"))
        elif names[i] in METRICS or names.count(names[i]) > 1:
            issues.append((f"{at}[{i}]", f"{metric!r} would be reported as {names[i]!r}, which another metric uses"))
    return issues


class JobSection(_Section):
    name: Name
    id: Name = Field(default_factory=lambda data: data.get("name", ""))
    """Bound into attestation and sealed files: keep it to resume from checkpoints. Default: name."""
    mode: Mode
    seed: Int = Field(0, ge=0)
    """Seeds partitioning, initialization and shuffling on every party."""


class PartyConfig(_Section):
    name: Name
    role: Literal["server", "worker", "leader", "follower"]
    address: AddressField | None = None
    """host:port: where the server/leader listens (required there); workers/followers only dial out."""
    data: DataSpec | None = None
    """This party's own data (none for the hfl server)."""
    device: Annotated[str, Field(pattern=f"^({DEVICE_PATTERN})$")] = "auto"
    """Where this party computes: auto (the first GPU when torch sees one, else the CPU), cpu, cuda, cuda:N."""


class TeeConfig(_Section):
    attester: Literal["auto", "gramine", "tdx", "simulated"] = "auto"
    """auto: whichever TEE the machine has."""
    pccs_url: str | None = None
    """PCCS to fetch quote collateral from (default: the verifier's)."""
    collateral: ResolvedPath | None = None
    """An offline collateral file instead of a PCCS."""
    allow_simulated_insecure: Bool = Field(False, validate_default=True)
    """Required for the simulated attester, whose evidence anyone can forge; the policy must also allow it."""
    verify: Literal["two-way", "server", "client"] = "two-way"
    """Who is attested: two-way (both ends); server: only the server/leader; client: only the others."""

    @field_validator("pccs_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise _invalid(f"{url!r} is not an http(s) URL")
        return url

    @field_validator("collateral")
    @classmethod
    def _one_collateral_source(cls, collateral: Path | None, info: ValidationInfo) -> Path | None:
        if collateral is not None and info.data.get("pccs_url") is not None:
            raise _invalid("give either pccs_url or collateral, not both")
        return collateral

    @field_validator("allow_simulated_insecure")
    @classmethod
    def _simulated_is_explicit(cls, allowed: bool, info: ValidationInfo) -> bool:
        if info.data.get("attester") == "simulated" and not allowed:
            raise _invalid("must be true to use attester 'simulated' (its evidence is INSECURE: self-reported)")
        return allowed


_BUILTIN_NAME = re.compile(r"[A-Za-z_][\w.-]*")
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _code_ref(value: str, info: ValidationInfo) -> str:
    """A built-in name or a `module:function` reference, remembered for measurement."""
    if is_ref(value):
        if info.context is not None:
            info.context.setdefault("code_refs", []).append(value)
    elif not _BUILTIN_NAME.fullmatch(value):
        raise _invalid(f"{value!r} is neither a built-in name nor a 'package.module:function' reference")
    return value


CodeRef = Annotated[str, AfterValidator(_code_ref)]
"""A built-in name or `module:function`/`module:Class`: user code, resolved only by
`enclavefl.jobs.refs.resolve_ref` and measured with the job (see `JobConfig.job_code`)."""


def _module_name(value: str) -> str:
    if not _MODULE_NAME.fullmatch(value):
        raise _invalid(f"{value!r} is not a Python module name (e.g. mypkg.models)")
    return value


class ModelSpec(_Section):
    framework: Literal["torch", "keras"] = "torch"
    """torch (the factory returns a torch.nn.Module) or keras (a keras.Model; needs
    pip install 'enclavefl[tf]')."""
    name: CodeRef
    """A built-in model (mlp, resnet56, dlrm, ...; keras: mlp, bottom_mlp, top_mlp) or
    'package.module:function'. `factory:` is another spelling of a 'module:function' name."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the model's constructor."""

    @model_validator(mode="before")
    @classmethod
    def _factory_is_a_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "factory" in data:
            if "name" in data:
                raise _invalid("give the model either `name` or `factory`, not both")
            data = {("name" if k == "factory" else k): v for k, v in data.items()}
        return data

    def uses_keras(self) -> bool:
        return self.framework == "keras"


class VflModelConfig(_Section):
    bottom: ModelSpec
    """Each follower's model over its own features; its output activations go to the leader."""
    top: ModelSpec
    """The leader's model over the activations; it computes the logits and the loss."""
    leader_bottom: Bool | ModelSpec = True
    """True: the leader also runs `bottom` on its own features; a model: the leader runs that
    one instead (a torch leader beside Keras followers, say).

    False: `top` reads the leader's own features itself (wide&deep's leader model).
    """

    @property
    def leader_bottom_spec(self) -> ModelSpec | None:
        """The leader's own bottom model, or None when the top reads the leader's features itself."""
        if isinstance(self.leader_bottom, ModelSpec):
            return self.leader_bottom
        return self.bottom if self.leader_bottom else None

    def uses_keras(self) -> bool:
        return any(spec.uses_keras() for spec in (self.bottom, self.top, self.leader_bottom_spec) if spec)


_REQUIRED = object()
# Fields of the strategy section every strategy shares; the others are parameters of the
# strategies in the registry that declare them (enclavefl.hfl.registry).
_SHARED_STRATEGY_FIELDS = ("lr", "momentum", "weight_decay")


def _strategy_params() -> dict[str, tuple[tuple[str, ...], Any]]:
    """parameter -> (strategies that use it, default for those); any other strategy rejects it."""
    table: dict[str, tuple[tuple[str, ...], Any]] = {
        "rounds": (ROUND_STRATEGIES, _REQUIRED),
        "local_epochs": (ROUND_STRATEGIES, 1),
        "steps": (STEP_STRATEGIES, _REQUIRED),
    }
    for entry in STRATEGY_REGISTRY.values():
        for field, info in entry.params.model_fields.items():
            if field in _SHARED_STRATEGY_FIELDS:
                continue
            users, _ = table.get(field, ((), None))
            table[field] = ((*users, entry.name), _REQUIRED if info.is_required() else info.default)
    return table


_STRATEGY_PARAMS = _strategy_params()

Fraction = Annotated[Real, Field(ge=0, lt=1)]


class StrategyConfig(_Section):
    """How the server combines the workers' work. Parameters a strategy does not use are errors."""

    name: str
    """A built-in strategy (see the table) or a user's class as 'package.module:Class'."""
    batch_size: Int = Field(ge=1)
    lr: Real = Field(gt=0)
    """Of the server SGD that applies averaged gradients (sgd strategies) or of the workers' local SGD (rounds)."""
    momentum: Fraction = 0.0
    weight_decay: Real = Field(0.0, ge=0)
    rounds: Int | None = Field(None, ge=1, validate_default=True)
    steps: Int | None = Field(None, ge=1, validate_default=True)
    local_epochs: Int | None = Field(None, ge=1, validate_default=True)
    mu: Real | None = Field(None, ge=0, validate_default=True)
    """FedProx proximal weight."""
    server_lr: Real | None = Field(None, gt=0, validate_default=True)
    beta1: Fraction | None = Field(None, validate_default=True)
    beta2: Fraction | None = Field(None, validate_default=True)
    tau: Real | None = Field(None, gt=0, validate_default=True)
    """FedAdam adaptivity (epsilon)."""
    max_staleness: Int | None = Field(None, ge=0, validate_default=True)
    """async-sgd: a gradient computed on a model more than this many versions old is dropped."""
    staleness_policy: Literal["refuse", "down-weight"] | None = Field(None, validate_default=True)
    """async-sgd, within max_staleness: refuse: full weight; down-weight: scaled by 1/(1 + staleness)."""
    trim_fraction: Real | None = Field(None, ge=0, lt=0.5, validate_default=True)
    """trimmed-mean: the fraction of workers' values cut from each end, per coordinate."""
    params: dict[str, Any] | None = Field(None, validate_default=True)
    """Parameters of a 'package.module:Class' strategy, checked by its `Params` model when it has one."""
    min_workers: Int | None = Field(None, ge=1)
    """Quorum: a round/step closes at its timeout once this many workers reported. None: every worker."""
    round_timeout_s: Seconds = Field(300.0, gt=0)
    done_grace_s: Seconds = Field(30.0, ge=0)
    """After the last round/step, how long the server waits for workers that joined but have
    not yet heard the run is done (a worker cut off near the end); 0: stop at once."""

    @field_validator("name")
    @classmethod
    def _known_strategy(cls, name: str, info: ValidationInfo) -> str:
        if name in STRATEGY_REGISTRY:
            return name
        if not is_ref(name):
            known = ", ".join(repr(n) for n in STRATEGY_REGISTRY)
            raise _invalid(f"got {name!r}, expected one of {known} or 'package.module:Class'")
        if info.context is not None:  # user code: measured with the job, imported when the server starts
            info.context.setdefault("code_refs", []).append(name)
        return name

    @field_validator("params")
    @classmethod
    def _params_of_user_strategy(cls, params: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        name = info.data.get("name")
        if name is None:
            return params
        if name in STRATEGY_REGISTRY:
            if params is not None:
                raise _invalid(f"only for 'package.module:Class' strategies; {name} takes its parameters as fields")
            return None
        return params or {}

    @field_validator(*_STRATEGY_PARAMS)
    @classmethod
    def _used_by_strategy(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.data.get("name")
        if name is None:  # the name itself is invalid and already reported
            return value
        users, default = _STRATEGY_PARAMS[str(info.field_name)]
        if name not in STRATEGY_REGISTRY and info.field_name in ("rounds", "local_epochs", "steps"):
            # A user's strategy runs rounds or steps as its `kind` says (checked when the
            # server imports it); the file gives one of the two.
            if info.field_name == "local_epochs" and value is None and info.data.get("rounds") is not None:
                return 1
            return value
        if name not in users:
            if value is not None:
                raise _invalid(f"not a parameter of {name}; used only by {', '.join(users)}")
            return None
        if value is None:
            if default is _REQUIRED:
                raise _invalid(f"required by {name}")
            return default
        return value


def _user_strategy_units(strategy: StrategyConfig) -> list[tuple[str, str]]:
    if strategy.name in STRATEGY_REGISTRY or not is_ref(strategy.name):
        return []
    if (strategy.rounds is None) == (strategy.steps is None):
        return [
            (
                "strategy.rounds",
                "a 'package.module:Class' strategy needs exactly one of rounds (kind update) or steps (kind grad)",
            )
        ]
    if strategy.steps is not None and strategy.local_epochs is not None:
        return [("strategy.local_epochs", "only with rounds")]
    return []


class HflEvaluationConfig(_Section):
    """Where the global model is evaluated during an hfl run."""

    where: Literal["server", "workers"] = "workers"
    """server: on evaluation.data; workers: each on a held-out part of its own rows, results pooled."""
    data: DataSpec | None = Field(None, validate_default=True)
    holdout_fraction: Real | None = Field(None, gt=0, lt=1, validate_default=True)
    """where: workers: the fraction of each worker's rows kept out of training (default 0.2)."""
    every: Int = Field(1, ge=1)
    """Evaluate every N rounds (round strategies) or steps (sgd strategies), and after the last."""
    metrics: Metrics | None = None
    """accuracy, auc (binary), logloss, macro_f1 (classification); rmse, mae, r2 (regression);
    or 'package.module:function'(outputs, labels) -> float. Default: accuracy, logloss
    (classification) or rmse, mae, r2 (regression)."""

    @field_validator("data")
    @classmethod
    def _data_for_server(cls, data: Any, info: ValidationInfo) -> Any:
        where = info.data.get("where")
        if where == "server" and data is None:
            raise _invalid("required when where is server")
        if where == "workers" and data is not None:
            raise _invalid("only used when where is server (workers evaluate on their own held-out rows)")
        return data

    @field_validator("holdout_fraction")
    @classmethod
    def _holdout_for_workers(cls, fraction: float | None, info: ValidationInfo) -> float | None:
        where = info.data.get("where")
        if where == "server" and fraction is not None:
            raise _invalid("only used when where is workers")
        if where == "workers" and fraction is None:
            return 0.2
        return fraction


class VflTrainingConfig(_Section):
    alignment: Literal["tee-join", "ecdh-psi"] = "ecdh-psi"
    """tee-join: ids go to the leader's enclave; ecdh-psi: private set intersection, safe without trusting the TEE."""
    epochs: Int = Field(ge=1)
    batch_size: Int = Field(ge=1)
    lr: Real = Field(gt=0)
    optimizer: str = "sgd"
    """sgd, adam, adagrad, or 'package.module:function' of the job's own code, called as
    function(params, lr=lr) (a torch.optim class fits: list torch under code:)."""
    momentum: Fraction = 0.0
    """sgd only."""
    pipeline_depth: Int = Field(1, ge=1)
    """Iterations in flight between leader and followers (1: lock-step)."""
    validation_fraction: Real = Field(0.2, gt=0, lt=1)
    """Fraction of the aligned rows held out for validation (the same rows on every party)."""
    metrics: Metrics | None = None
    """As evaluation.metrics in hfl jobs. Default: by task."""

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, optimizer: str, info: ValidationInfo) -> str:
        if optimizer not in ("sgd", "adam", "adagrad") and not is_ref(optimizer):
            raise _invalid(f"{optimizer!r} is not an optimizer: sgd, adam, adagrad, or 'package.module:function'")
        return _code_ref(optimizer, info)

    @field_validator("momentum")
    @classmethod
    def _momentum_for_sgd(cls, momentum: float, info: ValidationInfo) -> float:
        optimizer = info.data.get("optimizer")
        if momentum and optimizer not in (None, "sgd"):
            raise _invalid(f"only used by optimizer sgd, not {optimizer}")
        return momentum


class StorageConfig(_Section):
    """Sealed checkpoints; without this section nothing is checkpointed and a restart starts over."""

    checkpoint_dir: ResolvedPath
    """Each party writes under <checkpoint_dir>/<party name>/."""
    key: KeySpec
    """file:PATH (insecure, development), sgx-seal:mrenclave|mrsigner, or broker:HOST:PORT/NAME."""
    checkpoint_every: Int = Field(ge=1)
    """In rounds (round strategies), steps (sgd strategies) or iterations (vfl)."""
    keep_last: Int = Field(3, ge=1)

    def party_dir(self, party: str) -> Path:
        return self.checkpoint_dir / party


class PreprocessConfig(_Section):
    """Feature preprocessing each party applies to its own columns (vfl)."""

    standardize: bool = False
    """Scale every feature column to mean 0, std 1 with statistics fitted on this party's own
    training rows; they never leave the party, are sealed with its exported half and reused
    by predict."""


class OutputConfig(_Section):
    dir: ResolvedPath
    """Metrics, plots and exported models. Default: runs/<job name> under the current directory."""
    plot: Bool = True
    tensorboard: Bool = False
    """Write TensorBoard event files to <dir>/tensorboard (extra [tracking])."""
    mlflow: Bool | str | None = None
    """An MLflow tracking URI to log params, per-round metrics and the summary to; true: a
    file: store in <dir>/mlruns (extra [tracking])."""
    keep: Literal["last", "best"] = "last"
    """Which weights training exports (vfl): the last epoch's, or those of the evaluation with
    the best `best_by`."""
    best_by: str | None = None
    """keep: best: the metric that judges (one of the job's metrics; default: auc, else
    accuracy, r2, macro_f1, rmse, mae, logloss); the highest or the lowest by its kind."""

    @field_validator("mlflow")
    @classmethod
    def _mlflow_uri(cls, value: bool | str | None) -> bool | str | None:
        if value is False:
            return None
        if isinstance(value, str) and not re.match(r"^[a-z][a-z0-9+.-]*:", value):
            raise _invalid(f"expected a tracking URI such as file:/path/mlruns or http://host:5000, got {value!r}")
        return value


# --------------------------------------------------------------------------- the job


# mechanism -> (the policy's privacy unit it protects, the modes that run it)
PRIVACY_MECHANISMS: dict[str, tuple[str, str]] = {
    "dp-sgd": ("record", "hfl"),
    "dp-fedavg": ("worker", "hfl"),
    "randomized-response": ("label", "vfl"),
}


class PrivacyConfig(_Section):
    """How this job spends the policy's differential-privacy budget (policy `privacy:`).

    dp-sgd (hfl, unit record): every worker trains with DP-SGD (Opacus, extra [dp]);
    dp-fedavg (hfl, unit worker): the parameter server samples, clips and noises the
    workers' updates inside its enclave (`enclavefl.hfl.dp.DpFedAvg`; strategy fedavg);
    randomized-response (vfl, unit label): the leader trains on randomized labels.
    """

    mechanism: Literal["dp-sgd", "dp-fedavg", "randomized-response"]
    target_epsilon: float | None = Field(None, gt=0)
    """The epsilon to spend over the whole job (default: the policy's max_epsilon)."""
    noise_multiplier: float | None = Field(None, gt=0)
    """dp-sgd, dp-fedavg: a fixed noise multiplier instead of one calibrated to target_epsilon."""
    max_grad_norm: float | None = Field(None, gt=0, validate_default=True)
    """dp-sgd: the per-sample clipping norm C (default 1.0)."""
    max_update_norm: float | None = Field(None, gt=0, validate_default=True)
    """dp-fedavg: the L2 norm each worker's update is clipped to (default 1.0)."""
    fraction: float | None = Field(None, gt=0, le=1, validate_default=True)
    """dp-fedavg: the probability that each worker's update is used in a round (default 1.0)."""

    @field_validator("noise_multiplier")
    @classmethod
    def _one_noise_source(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("mechanism") not in ("dp-sgd", "dp-fedavg"):
            raise _invalid("only used by mechanisms dp-sgd and dp-fedavg")
        if value is not None and info.data.get("target_epsilon") is not None:
            raise _invalid("give either target_epsilon or noise_multiplier, not both")
        return value

    @field_validator("max_grad_norm")
    @classmethod
    def _clipping_for_dp_sgd(cls, value: float | None, info: ValidationInfo) -> float | None:
        mechanism = info.data.get("mechanism")
        if mechanism != "dp-sgd":
            if value is not None:
                raise _invalid(f"not used by mechanism {mechanism}")
            return None
        return 1.0 if value is None else value

    @field_validator("max_update_norm", "fraction")
    @classmethod
    def _central_dp_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        mechanism = info.data.get("mechanism")
        if mechanism != "dp-fedavg":
            if value is not None:
                raise _invalid(f"not used by mechanism {mechanism}")
            return None
        return 1.0 if value is None else value

    @property
    def unit(self) -> str:
        return PRIVACY_MECHANISMS[self.mechanism][0]


class JobConfig(_Section):
    """Sections common to both modes; `load_job` returns an HflJobConfig or a VflJobConfig."""

    MODE: ClassVar[str]

    job: JobSection
    parties: tuple[PartyConfig, ...]
    tee: TeeConfig = Field(default_factory=TeeConfig)
    policy: Annotated[ResolvedPath, AfterValidator(_existing_file)]
    """The attestation policy JSON every party enforces."""
    task: TaskConfig | None = None
    """What the model learns (binary, multiclass, regression); default: classification by output width."""
    storage: StorageConfig | None = None
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    output: OutputConfig
    code: Annotated[tuple[Annotated[str, AfterValidator(_module_name)], ...], AfterValidator(_unique)] = ()
    """Python modules that `module:function` references may use besides the modules beside the
    job file (e.g. an installed package); measured with the job."""
    _job_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _code_refs: tuple[str, ...] = PrivateAttr(default=())
    privacy: PrivacyConfig | None = None
    """Differential privacy; required when the policy carries a privacy budget."""

    @model_validator(mode="before")
    @classmethod
    def _default_output_dir(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        output = data.get("output", {})
        if isinstance(output, dict) and "dir" not in output:
            job = data.get("job")
            name = job.get("name") if isinstance(job, dict) else None
            runs = Path.cwd() / "runs"
            data = {**data, "output": {**output, "dir": str(runs / name if isinstance(name, str) else runs)}}
        return data

    @model_validator(mode="after")
    def _check_federation(self, info: ValidationInfo) -> JobConfig:
        issues = self._federation_issues()
        if issues:
            raise PydanticCustomError(
                "federation", "\n".join(f"{path}: {msg}" for path, msg in issues), {"issues": issues}
            )
        self._job_dir = _base_dir(info)
        self._code_refs = tuple(dict.fromkeys((info.context or {}).get("code_refs", ())))
        return self

    def __eq__(self, other: object) -> bool:
        # The same settings read from another directory are the same job (the round trip of
        # dump_job); where user code is looked up is not a setting.
        return type(other) is type(self) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable args: never hashable

    def job_code(self) -> JobCode:
        """Where this job's `module:function` references may load code from, and what they name."""
        return JobCode(self._job_dir, self.code, self._code_refs)

    @property
    def mode(self) -> str:
        return self.job.mode

    def party(self, name: str) -> PartyConfig:
        for party in self.parties:
            if party.name == name:
                return party
        raise UsageError(
            f"no party {name!r} in job {self.job.name!r}; parties: {', '.join(p.name for p in self.parties)}"
        )

    def metrics(self) -> tuple[str, ...]:
        """The metrics to report: the job's, or the task's defaults."""
        chosen = self._chosen_metrics()
        if chosen is not None:
            return chosen
        return DEFAULT_METRICS[self.task.type if self.task is not None else "binary"]

    @abstractmethod
    def _chosen_metrics(self) -> tuple[str, ...] | None:
        """The metrics the job file names (None: the task's defaults)."""

    def coordinator(self) -> PartyConfig:
        """The party that listens: the hfl server or the vfl leader."""
        role = ROLES[self.MODE][0]
        return next(p for p in self.parties if p.role == role)

    def members(self) -> list[PartyConfig]:
        """The parties that dial the coordinator: hfl workers or vfl followers, in file order."""
        role = ROLES[self.MODE][1]
        return [p for p in self.parties if p.role == role]

    def _keep_issues(self) -> list[tuple[str, str]]:
        """output.keep / best_by: a model to keep, and a metric whose best is known."""
        output = self.output
        if output.keep == "last":
            return [("output.best_by", "only used with keep: best")] if output.best_by is not None else []
        if self.MODE == "hfl":
            return [("output.keep", "best: hfl jobs export no model (the parameter server's sealed checkpoints are "
                                    "for resuming and always hold the newest round); keep: best is for vfl jobs, "
                                    "whose parties export their sealed model halves")]
        metrics = [metric_name(m) for m in self.metrics()]
        chosen = output.best_by or primary_metric(metrics)
        if chosen is None:
            return [("output.best_by", f"keep: best needs a metric to judge by; the job reports none of "
                                       f"{', '.join(PRIMARY_METRICS)} ({', '.join(metrics)}): add one to the metrics")]
        if chosen not in metrics:
            return [("output.best_by", f"{chosen!r} is not one of the job's metrics ({', '.join(metrics)})")]
        if chosen not in HIGHER_IS_BETTER | LOWER_IS_BETTER:
            return [("output.best_by", f"{chosen!r}: whether higher or lower is better is unknown (a user's "
                                       f"metric); judge by one of {', '.join(PRIMARY_METRICS)}")]
        return []

    def _federation_issues(self) -> list[tuple[str, str]]:
        """Checks across parties and sections, as (field path, message)."""
        mode = self.job.mode
        if mode != self.MODE:
            return [("job.mode", f"is {mode!r}, but this is a {self.MODE} job")]
        issues = self._party_list_issues()
        issues.extend(self._mode_issues())
        issues.extend(self._keep_issues())
        if self.privacy is not None:
            issues.extend(self._privacy_mechanism_issues(self.privacy))
        return issues

    def _party_list_issues(self) -> list[tuple[str, str]]:
        """Unique names, roles of this mode, exactly one coordinator (with an address), at
        least one member, and each party's data."""
        mode = self.job.mode
        coordinator, member = ROLES[mode]
        issues: list[tuple[str, str]] = []
        first_index: dict[str, int] = {}
        coordinators: list[int] = []
        members = 0
        for i, party in enumerate(self.parties):
            at = f"parties[{i}]"
            if party.name in first_index:
                issues.append(
                    (f"{at}.name", f"{party.name!r} is already the name of parties[{first_index[party.name]}]")
                )
            first_index.setdefault(party.name, i)
            if party.role not in ROLES[mode]:
                issues.append((f"{at}.role", f"{party.role!r} is not a role in {mode} mode ({', '.join(ROLES[mode])})"))
                continue
            if party.role == coordinator:
                issues.extend(self._coordinator_issues(at, party, coordinators))
                coordinators.append(i)
            else:
                members += 1
            issues.extend(self._party_data_issues(at, party))
        if not coordinators:
            issues.append(("parties", f"no {coordinator}: {mode} jobs have exactly one"))
        if not members:
            issues.append(("parties", f"no {member}: {mode} jobs need at least one"))
        return issues

    def _coordinator_issues(self, at: str, party: PartyConfig, earlier: list[int]) -> list[tuple[str, str]]:
        """A coordinator at `at`: the only one (`earlier`: the indices of those before it), with an address."""
        mode = self.job.mode
        coordinator, member = ROLES[mode]
        issues: list[tuple[str, str]] = []
        if earlier:
            issues.append(
                (
                    f"{at}.role",
                    f"a second {coordinator}: parties[{earlier[0]}] is the {coordinator}; "
                    f"{mode} jobs have exactly one",
                )
            )
        if party.address is None:
            issues.append(
                (
                    f"{at}.address",
                    f"required for the {coordinator}: it listens there and every {member} dials it",
                )
            )
        return issues

    def _privacy_mechanism_issues(self, privacy: PrivacyConfig) -> list[tuple[str, str]]:
        """The privacy mechanism suits the job's mode, strategy and task."""
        mode = self.job.mode
        issues: list[tuple[str, str]] = []
        runs_in = PRIVACY_MECHANISMS[privacy.mechanism][1]
        if runs_in != mode:
            issues.append(("privacy.mechanism", f"{privacy.mechanism} is for {runs_in} jobs (job.mode is {mode!r})"))
        elif privacy.mechanism == "dp-fedavg" and isinstance(self, HflJobConfig) and self.strategy.name != "fedavg":
            issues.append(
                (
                    "privacy.mechanism",
                    "dp-fedavg is the server's noised FedAvg: set strategy.name "
                    f"to fedavg (it is {self.strategy.name!r})",
                )
            )
        regression = self.task is not None and self.task.type == "regression"
        if privacy.mechanism == "randomized-response" and regression:
            issues.append(("privacy.mechanism", "randomized-response flips class labels: it needs classification"))
        return issues

    @abstractmethod
    def _party_data_issues(self, at: str, party: PartyConfig) -> list[tuple[str, str]]:
        """Checks of one party's data spec, for this mode."""

    @abstractmethod
    def _mode_issues(self) -> list[tuple[str, str]]:
        """Checks of the mode's own sections and across the parties' data."""


def _kind_issues(at: str, data: Any, mode: str) -> list[tuple[str, str]]:
    if data.kind not in DATA_KINDS[mode]:
        return [(f"{at}.kind", f"{data.kind!r} is not available in {mode} mode ({', '.join(DATA_KINDS[mode])})")]
    return []


def _auc_issues(at: str, metrics: tuple[str, ...], args: dict[str, Any], model_at: str) -> list[tuple[str, str]]:
    """auc is defined here for binary tasks (one logit); refuse it for a multi-class model
    instead of dropping it silently at the first evaluation."""
    if "auc" not in metrics:
        return []
    for name in ("out_features", "num_classes"):
        classes = args.get(name)
        if isinstance(classes, int) and classes > 1:
            return [
                (
                    at,
                    f"auc needs a binary task (one output), but {model_at}.{name} is {classes}: "
                    "a multi-class model; use accuracy and logloss",
                )
            ]
    return []


def _rows_source(data: Any) -> tuple[str, ...]:
    """What identifies the rows a data spec reads, before partitioning."""
    if isinstance(data, Cifar10Data):
        return ("cifar10", str(data.root), data.split)
    if isinstance(data, SklearnData):
        return ("sklearn", data.name)
    if isinstance(data, PythonData):
        return ("python", data.factory, repr(sorted(data.args.items())))
    return (data.kind, str(data.path))


class HflJobConfig(JobConfig):
    """Horizontal FL: a parameter server and workers that each train on their own rows."""

    MODE: ClassVar[str] = "hfl"

    model: ModelSpec
    strategy: StrategyConfig
    evaluation: HflEvaluationConfig = Field(default_factory=HflEvaluationConfig)
    trainer: UserRef | None = None
    """A worker's own training: 'package.module:function' called as function(data_spec, model,
    device=...) in each worker, returning a trainer (enclavefl.train.Trainer); default: the
    built-in local SGD over the party's data."""

    def server(self) -> PartyConfig:
        return self.coordinator()

    def workers(self) -> list[PartyConfig]:
        return self.members()

    def _party_data_issues(self, at: str, party: PartyConfig) -> list[tuple[str, str]]:
        if party.role == "server":
            if party.data is not None:
                return [
                    (
                        f"{at}.data",
                        "the server trains on no data; "
                        "give its test data as evaluation.data (evaluation.where: server)",
                    )
                ]
            return []
        if party.data is None:
            return [(f"{at}.data", "required for a worker")]
        issues = _kind_issues(f"{at}.data", party.data, "hfl")
        if isinstance(party.data, CsvData) and party.data.label is None:
            issues.append(
                (f"{at}.data.label", "required: a worker trains on labelled rows (FATE files call the column y)")
            )
        return issues

    def _chosen_metrics(self) -> tuple[str, ...] | None:
        return self.evaluation.metrics

    def _mode_issues(self) -> list[tuple[str, str]]:
        issues = _metric_issues("evaluation.metrics", self.evaluation.metrics, self.task)
        evaluation = self.evaluation.data
        if evaluation is not None:
            issues.extend(_kind_issues("evaluation.data", evaluation, "hfl"))
            if isinstance(evaluation, CsvData) and evaluation.label is None:
                issues.append(("evaluation.data.label", "required: evaluation needs labels"))
        issues.extend(self._shared_rows_issues())
        if self.task is None:  # a named task's metrics are checked by _metric_issues
            metrics = self.evaluation.metrics or ()
            issues.extend(_auc_issues("evaluation.metrics", metrics, self.model.args, "model.args"))
        issues.extend(_user_strategy_units(self.strategy))
        if self.preprocess.standardize:
            issues.append(
                (
                    "preprocess.standardize",
                    "vertical (vfl) jobs only for now: in hfl every worker would "
                    "scale differently under one shared model",
                )
            )
        workers = len(self.members())
        if self.strategy.min_workers is not None and workers and self.strategy.min_workers > workers:
            issues.append(
                ("strategy.min_workers", f"{self.strategy.min_workers} is more than the {workers} worker(s) in parties")
            )
        return issues

    def _shared_rows_issues(self) -> list[tuple[str, str]]:
        # CCZoo's DLRM sample gave three workers the same rows; here workers that read
        # one source must take distinct parts of one partitioning of it.
        issues: list[tuple[str, str]] = []
        readers: dict[tuple[Any, ...], list[tuple[int, PartitionSpec | None]]] = {}
        for i, party in enumerate(self.parties):
            if party.role != "worker" or party.data is None:
                continue
            source, part = _rows_source(party.data), getattr(party.data, "partition", None)
            earlier = readers.setdefault(source, [])
            if earlier:
                at = f"parties[{i}].data"
                j, first = earlier[0]
                if part is None or first is None:
                    issues.append(
                        (
                            at,
                            f"reads the same rows as parties[{j}] ({source[1]}); "
                            f"give each worker its own source or a partition",
                        )
                    )
                elif (part.method, part.num_parts, part.alpha) != (first.method, first.num_parts, first.alpha):
                    issues.append(
                        (
                            f"{at}.partition",
                            f"parties[{j}] cuts the same source differently; use the same method, num_parts and alpha",
                        )
                    )
                else:
                    clash = next((k for k, p in earlier if p is not None and p.index == part.index), None)
                    if clash is not None:
                        issues.append(
                            (
                                f"{at}.partition.index",
                                f"{part.index} is also the part of parties[{clash}]; each worker needs its own",
                            )
                        )
            earlier.append((i, part))
        return issues


class VflJobConfig(JobConfig):
    """Vertical FL: a leader with the labels and followers with other columns of the same samples."""

    MODE: ClassVar[str] = "vfl"

    model: VflModelConfig
    training: VflTrainingConfig

    def leader(self) -> PartyConfig:
        return self.coordinator()

    def followers(self) -> list[PartyConfig]:
        return self.members()

    def _party_data_issues(self, at: str, party: PartyConfig) -> list[tuple[str, str]]:
        if party.data is None:
            return [(f"{at}.data", f"required for a {party.role}")]
        issues = _kind_issues(f"{at}.data", party.data, "vfl")
        if isinstance(party.data, CsvData):
            if party.role == "leader" and party.data.label is None:
                issues.append((f"{at}.data.label", "required: the leader holds the labels"))
            if party.role == "follower" and party.data.label is not None:
                issues.append(
                    (f"{at}.data.label", "a follower holds no labels in vfl (only the leader does); remove it")
                )
        return issues

    def _chosen_metrics(self) -> tuple[str, ...] | None:
        return self.training.metrics

    def _mode_issues(self) -> list[tuple[str, str]]:
        issues = _metric_issues("training.metrics", self.training.metrics, self.task)
        specs = [(i, p.data) for i, p in enumerate(self.parties) if p.data is not None]
        if specs:
            first_i, first = specs[0]
            for i, data in specs[1:]:
                if data.kind != first.kind:
                    issues.append(
                        (
                            f"parties[{i}].data.kind",
                            f"{data.kind!r} differs from parties[{first_i}]'s {first.kind!r}; "
                            f"vfl parties hold the same kind of data",
                        )
                    )
                elif (
                    isinstance(data, WideDeepData)
                    and isinstance(first, WideDeepData)
                    and data.generate != first.generate
                ):
                    issues.append(
                        (
                            f"parties[{i}].data.generate",
                            f"differs from parties[{first_i}]'s: the parties' files are generated together",
                        )
                    )
        if self.task is None:
            issues.extend(
                _auc_issues("training.metrics", self.training.metrics or (), self.model.top.args, "model.top.args")
            )
        if self.preprocess.standardize and specs and not isinstance(specs[0][1], CsvData):
            issues.append(
                (
                    "preprocess.standardize",
                    f"scales numeric csv columns; {specs[0][1].kind!r} data are categorical ids (remove it)",
                )
            )
        return issues


# --------------------------------------------------------------------------- loading

_JOB_CLASSES: dict[str, type[JobConfig]] = {"hfl": HflJobConfig, "vfl": VflJobConfig}


class _JobLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base constructor reports it
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first_line[key] + 1})", key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_job(path: Path) -> JobConfig:
    """Read, expand and validate a job file; raises ConfigError naming every bad field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read job file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = yaml.load(text, Loader=_JobLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        # PyYAML composes nested nodes recursively: a deep enough document overflows it.
        raise ConfigError(
            f"{path}: invalid YAML: nested deeper than this parser can read "
            f"(a job file nests at most {MAX_DEPTH} levels)"
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = f" ({err.context})" if err.context else ""
        raise ConfigError(f"{where}: invalid YAML: {err.problem}{context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from None
    return parse_job(apply_quick_caps(data), base_dir=path.absolute().parent, source=str(path))


_Job = TypeVar("_Job", bound="JobConfig")


def load_party_job(
    job: str | Path, party: str | None, *, kind: type[_Job], role: str, runs: str
) -> tuple[Path, _Job, str]:
    """The job file (resolved), its config and the party to run (default: the coordinator).

    The job must be a `kind` job (`runs` says what the caller runs, for the error) and the
    party must have `role`; a UsageError says which it is otherwise.
    """
    job_file = Path(job).resolve()
    config = load_job(job_file)
    if not isinstance(config, kind):
        raise UsageError(f"{job_file} is a {config.mode} job; {runs}")
    name = party if party is not None else config.coordinator().name
    if config.party(name).role != role:
        raise UsageError(f"party {name!r} of {job_file} is a {config.party(name).role}, not a {role}")
    return job_file, config, name


def parse_job(data: Any, *, base_dir: Path, source: str = "job") -> JobConfig:
    """Validate an already parsed job document; relative paths are taken from `base_dir`."""
    if data is None:
        raise ConfigError(f"{source}: empty job file")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a job file is a mapping of sections (job, parties, ...), got {type(data).__name__}"
        )
    _check_size(data, source)
    job = data.get("job")
    mode = job.get("mode") if isinstance(job, dict) else None
    if not isinstance(mode, str) or mode not in _JOB_CLASSES:  # a list or map is not hashable
        found = "job.mode: required" if mode is None else f"job.mode: got {mode!r}"
        raise ConfigError(f"{source}: invalid job file:\n  {found}, expected 'hfl' or 'vfl'")
    cls = _JOB_CLASSES[mode]
    try:
        return cls.model_validate(data, context={"base_dir": Path(base_dir)})
    except ValidationError as err:
        lines = _describe_errors(err, cls)
        raise ConfigError(f"{source}: invalid job file:\n" + "\n".join(f"  {line}" for line in lines)) from None


MAX_DEPTH = 32
"""How deep a job document may nest (mappings and lists); real jobs use about 6 levels."""
MAX_NODES = 100_000
"""How many values a job document may hold, YAML aliases counted at every use."""


def _check_size(data: Any, source: str) -> None:
    """Refuse documents too deep or too large to validate safely, without recursing.

    Validation and the roles walk the document recursively, and YAML aliases make a small
    file expand into a huge tree ("billion laughs"); both are bounded here, once.
    """
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    nodes = 0
    while stack:
        node, depth, where = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ConfigError(
                f"{source}: invalid job file: more than {MAX_NODES} values (YAML aliases count at each use)"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{source}: invalid job file: {where or '(top level)'} nests deeper than {MAX_DEPTH} levels"
            )
        if isinstance(node, dict):
            stack.extend((v, depth + 1, f"{where}.{k}" if where else str(k)) for k, v in node.items())
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(node))


def dump_job(config: JobConfig) -> str:
    """The effective job as YAML (defaults filled in, paths absolute); `parse_job` reads it back equal."""
    data = config.model_dump(mode="json", exclude_none=True)
    ordered = {**{key: data[key] for key in _SECTION_ORDER if key in data}, **data}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)


_SECTION_ORDER = (
    "job",
    "parties",
    "tee",
    "policy",
    "privacy",
    "task",
    "model",
    "strategy",
    "training",
    "evaluation",
    "storage",
    "output",
    "code",
)


# --------------------------------------------------------------------------- error messages

_ALL_KINDS = tuple(dict.fromkeys(DATA_KINDS["hfl"] + DATA_KINDS["vfl"]))


def _describe_errors(err: ValidationError, root: type[JobConfig]) -> list[str]:
    lines: list[str] = []
    for error in err.errors():
        if error["type"] == "federation":
            lines.extend(f"{path}: {msg}" for path, msg in error["ctx"]["issues"])
            continue
        if error["type"] == "default_factory_not_called":
            continue  # a default computed from a field that is already reported as invalid
        loc = error["loc"]
        path = _path_text(loc)
        kind = error["type"]
        value = error.get("input")
        if kind == "missing":
            message = "required"
        elif kind == "extra_forbidden":
            message = _unknown_field(root, loc)
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            path += ".kind"
            got = f"unknown kind {error['ctx']['tag']!r}" if kind == "union_tag_invalid" else "required"
            message = f"{got}; expected one of {', '.join(_ALL_KINDS)}"
        elif kind == "literal_error":
            message = f"got {value!r}, expected {error['ctx']['expected']}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = f"expected a mapping of fields, got {type(value).__name__} {value!r}"
        elif kind == _ERROR or isinstance(value, dict | list):
            message = error["msg"]
        else:
            message = f"{error['msg']} (got {value!r})"
        lines.append(f"{path}: {message}")
    return lines


def _path_text(loc: tuple[Any, ...]) -> str:
    text = ""
    previous: Any = None
    for part in loc:
        if previous == "data" and part in _ALL_KINDS:
            pass  # the discriminator tag pydantic puts in the location
        elif isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
        previous = part
    return text or "(top level)"


def _unknown_field(root: type[JobConfig], loc: tuple[Any, ...]) -> str:
    key = str(loc[-1])
    if len(loc) == 1:
        other = next((m for m, cls in _JOB_CLASSES.items() if cls is not root and key in cls.model_fields), None)
        if other is not None:
            return f"only for {other} jobs (job.mode is {root.MODE!r})"
    valid = _field_names_at(root, loc[:-1])
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown field (did you mean {close[0]!r}?)"
    return f"unknown field; expected one of: {', '.join(valid)}" if valid else "unknown field"


def _field_names_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at `loc` (a pydantic error location), for suggestions."""
    candidates: list[Any] = [root]
    for part in loc:
        following: list[Any] = []
        for option in (t for c in candidates for t in _concrete_types(c)):
            if isinstance(part, int) and get_origin(option) in (tuple, list):
                following.append(get_args(option)[0])
            elif isinstance(option, type) and issubclass(option, BaseModel):
                if part in option.model_fields:
                    following.append(option.model_fields[part].annotation)
                elif "kind" in option.model_fields and part in get_args(option.model_fields["kind"].annotation):
                    following.append(option)
        candidates = following
    names: list[str] = []
    for option in (t for c in candidates for t in _concrete_types(c)):
        if isinstance(option, type) and issubclass(option, BaseModel):
            names.extend(n for n in option.model_fields if n not in names)
    return names


def _concrete_types(annotation: Any) -> list[Any]:
    """The alternatives of an annotation, with Annotated, Optional and unions unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _concrete_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _concrete_types(arg)]
    return [annotation]
