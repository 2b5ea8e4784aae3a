"""Print pip constraints that pin every runtime dependency to pyproject.toml's lower bound.

``bash scripts/dev.sh lower`` installs hf_fp8 with these constraints into its own venv and
runs the smoke tests there, so the oldest versions pyproject admits are the ones CI tests.
torch is left out: its lower bound (2.11) has no CPU build on PyPI (only multi-GB CUDA builds),
so the smoke runs on the CPU torch the machine has; torch 2.11 itself is what the GPU machine runs.

Usage: ``python scripts/lower_bounds.py > constraints.txt``
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the extras a user's training run installs; pytest, ruff and matplotlib are tools, not runtime
EXTRAS = ("train",)
NOT_PINNED = {"torch": "no CPU build of the lower bound on PyPI"}


def lower_bounds(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{distribution: oldest supported version} from ``dependencies`` and the runtime extras."""
    try:
        import tomllib
    except ModuleNotFoundError as e:  # Python 3.10
        raise SystemExit("scripts/lower_bounds.py needs Python >= 3.11 (tomllib)") from e
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    bounds = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*(;.*)?", requirement)
        if match is None:
            continue  # no lower bound (tqdm, packaging): nothing to pin
        name, version = match.group(1), match.group(2)
        if name not in NOT_PINNED:
            bounds[name] = version
    return bounds


def main() -> None:
    for name, version in lower_bounds().items():
        print(f"{name}=={version}")
    for name, why in NOT_PINNED.items():
        print(f"# {name} not pinned: {why}", file=sys.stderr)


if __name__ == "__main__":
    main()
