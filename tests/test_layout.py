"""The repo root shadows no installed distribution, and the top-level source folders are the
ones ``hf_fp8.kernels`` and ``hf_fp8.integrations`` import from.

Guards the failure a fresh clone hit with transformers 5.25: it requires HuggingFace's
``kernels`` package and imports it from its model code, and a regular package ``kernels/``
at the repo root (where ``python -m pytest``, ``python -c`` and notebooks put the root on
``sys.path``) was imported instead, so ``from_pretrained`` failed.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

import hf_fp8

OWN_DISTRIBUTION = "hf_fp8"
SOURCE_FOLDERS = ("kernels", "integrations")  # linked into hf_fp8/ (see pyproject.toml)


def _installed_top_level_names() -> dict[str, list[str]]:
    """Top-level import names of every installed distribution except this one."""
    own = {OWN_DISTRIBUTION, OWN_DISTRIBUTION.replace("_", "-")}
    names = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        others = [d for d in dists if d not in own]
        if others:
            names[name] = others
    return names


def _regular_root_modules() -> set[str]:
    """What the root puts on ``sys.path`` that beats an installed package of the same name: a
    folder with ``__init__.py`` or a ``.py`` file (a folder without one is a namespace portion,
    which any installed regular package wins over)."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
    return names


@pytest.mark.smoke
def test_no_regular_package_at_the_root_has_an_installed_distributions_name():
    installed = _installed_top_level_names()
    clashes = {name: installed[name] for name in _regular_root_modules() if name in installed}
    assert not clashes, (
        f"these repo-root packages shadow installed distributions (name: distributions): {clashes}; "
        "rename them or drop their __init__.py"
    )


def test_tests_import_nothing_that_only_the_repo_root_on_sys_path_provides():
    """Plain ``pytest`` does not put the repo root on ``sys.path`` (``python -m pytest`` does):
    a test that imports ``benchmarks.<x>`` (or ``examples``, ``scripts``) by name collects under
    one command and fails under the other. Load them by path (``helpers.import_benchmark``)."""
    import ast

    tests = Path(__file__).parent
    installed = _installed_top_level_names()
    root_only = {
        e.stem if e.suffix == ".py" else e.name
        for e in ROOT.iterdir()
        if not e.name.startswith(".") and (e.is_dir() or e.suffix == ".py")
    } - {OWN_DISTRIBUTION, tests.name, *installed}
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in root_only]
    assert not found, f"imports that need the repo root on sys.path (use helpers.import_benchmark): {found}"


def test_the_source_folders_are_not_regular_packages():
    """``kernels/`` and ``integrations/`` hold no ``__init__.py``: even when no distribution of
    that name is installed today, one that arrives later must win from the root."""
    for folder in SOURCE_FOLDERS:
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py makes the folder shadow `{folder}`"


@pytest.mark.smoke
def test_imports_from_the_root_resolve_to_installed_distributions_and_to_our_folders():
    """In a process started in the repo root (root first on ``sys.path``, as ``python -c`` has it):
    every root folder or file whose name an installed distribution also uses imports from that
    distribution, and ``hf_fp8.kernels`` / ``hf_fp8.integrations`` come from the top-level folders."""
    installed = _installed_top_level_names()
    clashing = sorted(
        entry.name if entry.is_dir() else entry.stem
        for entry in ROOT.iterdir()
        if (entry.name if entry.is_dir() else entry.stem) in installed
    )
    probe = f"""
import importlib.util, json
out = {{}}
for name in {clashing!r}:
    spec = importlib.util.find_spec(name)
    out[name] = [spec.origin] + list(spec.submodule_search_locations or [])
import hf_fp8.kernels.quant, hf_fp8.integrations.trainer
out["hf_fp8.kernels.quant"] = [hf_fp8.kernels.quant.__file__]
out["hf_fp8.integrations.trainer"] = [hf_fp8.integrations.trainer.__file__]
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for name in clashing:
        inside = [p for p in found[name] if p and str(ROOT) in p and ".venv" not in p]
        assert not inside, f"`import {name}` from the repo root finds {inside}, not the installed {installed[name]}"
    assert found["hf_fp8.kernels.quant"][0].startswith(str(ROOT / "hf_fp8" / "kernels"))
    assert found["hf_fp8.integrations.trainer"][0].startswith(str(ROOT / "hf_fp8" / "integrations"))


def test_hf_fp8_subpackages_are_the_top_level_folders():
    """``hf_fp8/kernels`` and ``hf_fp8/integrations`` are links to the top-level folders, not copies
    that could drift apart."""
    for folder in SOURCE_FOLDERS:
        link = ROOT / "hf_fp8" / folder
        assert link.is_symlink(), f"hf_fp8/{folder} must link to ../{folder}"
        assert link.resolve() == (ROOT / folder).resolve()
    assert hf_fp8.__file__.startswith(str(ROOT / "hf_fp8")), f"hf_fp8 is imported from {hf_fp8.__file__}"


def test_min_versions_in_code_match_pyproject():
    """The availability checks refuse what pyproject.toml does not support."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from hf_fp8.integrations import _availability

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    floors = {}
    for req in requirements:
        spec = req.split(";")[0].strip()
        if ">=" in spec:
            name, version = spec.split(">=")
            floors[name.strip()] = version.strip()
    checked = [p for p in _availability._MIN_VERSIONS if p in floors]
    assert {"transformers", "accelerate", "peft"} <= set(checked), checked
    for package in checked:
        version = _availability._MIN_VERSIONS[package]
        assert version == floors[package], f"{package}: code requires >= {version}, pyproject >= {floors[package]}"
