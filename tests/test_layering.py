"""Dependencies point down: leaf packages import no network, TEE or FL code.

ARCHITECTURE.md: `cli -> jobs -> hfl|vfl -> net -> tee|seal`; models, data, train and privacy
are leaves that know nothing of the network or the TEE; hfl and vfl never touch certificates
or quotes (no tee). Skipping a layer downward is fine; upward or sideways is not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "enclavefl"

# Small shared modules every layer may use: typed errors, atomic writes, optional-extra lookup,
# type checks of decoded values (validate.is_int: a bool is not an int), names imported on
# first use (lazy.lazy_exports, the packages' PEP 562 `__getattr__`).
SHARED = frozenset({"errors", "fsutil", "extras", "validate", "lazy"})
FL = frozenset({"net", "seal", "models", "data", "train", "privacy"})

# unit (a subpackage or a top-level module of enclavefl) -> the units it may import besides SHARED.
LAYERS: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "fsutil": frozenset(),
    "extras": frozenset(),
    "validate": frozenset(),
    "lazy": frozenset(),
    # The terminal (rich): presentation, for the CLI and the launcher's progress only.
    "console": frozenset(),
    "privacy": frozenset(),
    "models": frozenset(),
    "data": frozenset(),
    "train": frozenset(),
    "tee": frozenset(),
    "seal": frozenset(),
    "net": frozenset({"tee", "seal"}),
    "hfl": FL,
    "vfl": FL,
    # The deliberately insecure namespace re-exports simulation pieces of tee, seal and net.
    "insecure": frozenset({"tee", "seal", "net"}),
    "jobs": FL | {"hfl", "vfl", "tee", "console"},
    # `enclavefl new`: writes a project from templates; the version pins the image it names.
    "scaffold": frozenset({"__init__"}),
    "cli": FL | {"hfl", "vfl", "tee", "jobs", "console", "scaffold", "insecure", "__init__"},
    "__main__": frozenset({"cli"}),
    # The user API: names loaded lazily from every public package.
    "__init__": FL | {"hfl", "vfl", "tee", "jobs"},
}

# A dotted enclavefl module name written as a string: the lazy export tables (importlib).
_MODULE_STRING = re.compile(r"^enclavefl(\.[a-z_][a-z0-9_]*)+$")


def _is_module_name(text: str) -> bool:
    if not _MODULE_STRING.match(text):
        return False
    path = PACKAGE.joinpath(*text.split(".")[1:])
    return path.is_dir() or path.with_suffix(".py").exists()


def _unit_of(path: Path) -> str:
    first = path.relative_to(PACKAGE).parts[0]
    return first.removesuffix(".py")


def _target_unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "enclavefl" or len(parts) == 1:
        return None  # bare `import enclavefl`: the package is loaded before any module of it anyway
    name = parts[1]
    return name if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists() else "__init__"


def _imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every enclavefl module `path` imports: absolute, relative, and by name in a lazy table."""
    found: set[str] = set()
    package_parts = ["enclavefl", *path.relative_to(PACKAGE).parts[:-1]]
    text = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package_parts[: len(package_parts) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from enclavefl import jobs` imports the jobs package; `from enclavefl import X` the API.
            found.update(f"{base}.{alias.name}" if base == "enclavefl" else base for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _is_module_name(node.value):
            found.add(node.value)
    return {name for name in found if name == "enclavefl" or name.startswith("enclavefl.")}


def _sources() -> list[Path]:
    # share/ holds project templates: user code that imports the public API like any user.
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "share" not in p.relative_to(PACKAGE).parts]


def test_every_unit_has_a_layer() -> None:
    units = {_unit_of(path) for path in _sources()}
    assert units - set(LAYERS) == set(), "place new modules in LAYERS (tests/test_layering.py)"


def test_imports_follow_the_layers() -> None:
    wrong = []
    for path in _sources():
        unit = _unit_of(path)
        allowed = LAYERS[unit] | SHARED | {unit}
        for module in sorted(_imported_modules(path)):
            target = _target_unit(module)
            if target is not None and target not in allowed:
                wrong.append(f"{path.relative_to(PACKAGE)} ({unit}) imports {module} ({target})")
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_imports() -> None:
    # The checker itself: an upward import in a leaf must be found, in every form it can take.
    leaf = PACKAGE / "models" / "_layering_probe.py"  # parsed as if it lived there; never written
    sources = {
        "import enclavefl.net.client\n": "enclavefl.net.client",
        "from enclavefl.jobs import launcher\n": "enclavefl.jobs",
        "from enclavefl import vfl\n": "enclavefl.vfl",
        "from ..tee import quote\n": "enclavefl.tee",
        "def f():\n    from enclavefl.hfl.server import X\n": "enclavefl.hfl.server",
        "_EXPORTS = {'A': 'enclavefl.net.client'}\n": "enclavefl.net.client",
    }
    for text, module in sources.items():
        found = _imported_modules(leaf, text)
        assert module in found, (text, found)
        assert _target_unit(module) not in LAYERS["models"] | SHARED



# The CLI is a thin shell over the public API of the trust layers: it imports the package
# (`from enclavefl.tee import Policy`, names in that package's __all__), never a module inside
# it (`enclavefl.tee.quote`). Logic only the CLI needed belongs in the package.
PUBLIC_API_ONLY = ("tee", "net", "seal")


def _package_all(package: str) -> set[str]:
    tree = ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def _non_public_imports(path: Path, source: str | None = None) -> list[str]:
    """Imports of `path` that reach into tee, net or seal past their package's __all__."""
    wrong = []
    for module in sorted(_imported_modules(path, source)):
        parts = module.split(".")
        if len(parts) > 2 and parts[1] in PUBLIC_API_ONLY:
            wrong.append(f"{module} (a module inside enclavefl.{parts[1]})")
    text = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module in {f"enclavefl.{p}" for p in PUBLIC_API_ONLY}:
            exported = _package_all(node.module.split(".")[1])
            wrong.extend(f"{node.module}.{alias.name} (not in __all__)" for alias in node.names
                         if alias.name not in exported)  # fmt: skip
    return wrong


def test_cli_uses_only_the_public_api_of_tee_net_and_seal() -> None:
    wrong = _non_public_imports(PACKAGE / "cli.py")
    assert not wrong, "export it from the package (its __init__ __all__):\n" + "\n".join(wrong)


def test_the_public_api_check_sees_private_imports() -> None:
    cli = PACKAGE / "cli.py"
    for text in ("def f():\n    from enclavefl.tee.quote import verify_quote\n",
                 "import enclavefl.seal.keys\n",
                 "from enclavefl.net import health\n",
                 "from enclavefl.tee import _parse_hex\n"):  # fmt: skip
        assert _non_public_imports(cli, text), text
    assert not _non_public_imports(cli, "from enclavefl.tee import Policy\nfrom enclavefl.net import AttestedServer\n")
