"""The user API at the package top level, lazily; the insecure namespace and its deprecated old names."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import enclavefl


def test_import_enclavefl_and_verify_help_do_not_import_torch() -> None:
    code = (
        "import sys, enclavefl, enclavefl.train, enclavefl.hfl, enclavefl.hfl.registry, enclavefl.jobs.config\n"
        "from enclavefl.train import FitResult, Trainer\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "from enclavefl.cli import main\n"
        "try:\n"
        "    main(['verify', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_every_exported_name_resolves() -> None:
    from enclavefl.extras import MissingExtra

    for name in enclavefl.__all__:
        try:
            assert getattr(enclavefl, name) is not None, name
        except MissingExtra as exc:  # an optional extra (e.g. [tf] for KerasTrainer) not installed here
            assert "pip install 'enclavefl[" in str(exc), name
    assert enclavefl.TorchTrainer.__module__ == "enclavefl.train.torch"
    assert callable(enclavefl.run_worker) and callable(enclavefl.serve)
    with pytest.raises(AttributeError):
        enclavefl.NoSuchName  # noqa: B018


def test_every_public_module_has_all() -> None:
    # The user API's modules, read from the source (no import: some need an optional extra).
    root = Path(enclavefl.__file__).parent
    paths = [*root.glob("train/*.py"), *root.glob("hfl/*.py"), root / "insecure.py", root / "jobs" / "api.py",
             root / "__init__.py"]  # fmt: skip
    missing = []
    for path in sorted(paths):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}  # fmt: skip
        if "__all__" not in assigned:
            missing.append(str(path.relative_to(root)))
    assert not missing, missing


def test_insecure_namespace_and_deprecated_old_names() -> None:
    from enclavefl import insecure
    from enclavefl.net.admission import Mode
    from enclavefl.seal import keys
    from enclavefl.tee.attesters import SimulatedAttester

    assert insecure.SimulatedAttester is SimulatedAttester
    assert insecure.FileKeySource is keys.FileKeySource and insecure.create_key_file is keys.create_key_file
    assert (insecure.VERIFY_SERVER_ONLY, insecure.VERIFY_CLIENT_ONLY) == (Mode.SERVER, Mode.CLIENT)
    from enclavefl import seal

    with pytest.warns(DeprecationWarning, match="import it from enclavefl.insecure"):
        assert seal.FileKeySource is keys.FileKeySource
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from enclavefl.seal import KeySource  # noqa: F401  (not moved: no warning)
